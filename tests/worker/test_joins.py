"""A stage's join table on its own: parts joined by number, epochs, held back in bytes."""

from __future__ import annotations

import numpy as np
import pytest

from tvmpipe.proto.messages import Message
from tvmpipe.worker.joins import JoinTable

pytestmark = pytest.mark.timeout(30)


def _part(seq: int, sender: str, epoch: int = 0) -> Message:
    return Message.data(seq, sender, {sender: np.zeros(1, "float32")}, epoch)


def test_a_set_completes_when_every_sender_delivered() -> None:
    table = JoinTable(frozenset({"a", "b"}), max_bytes=1000)
    assert table.offer(_part(0, "a"), 10) is None
    assert table.waiting_for(0) == ["b"]
    parts = table.offer(_part(0, "b"), 10)
    assert parts is not None and set(parts) == {"a", "b"}
    assert len(table) == 0 and table.held_bytes == 0


def test_one_sender_needs_no_table() -> None:
    table = JoinTable(frozenset({"a"}), max_bytes=1)
    assert table.offer(_part(5, "a"), 10_000) is not None
    assert len(table) == 0


def test_duplicates_keep_the_first() -> None:
    table = JoinTable(frozenset({"a", "b"}), max_bytes=1000)
    first = _part(0, "a")
    table.offer(first, 10)
    assert table.offer(_part(0, "a"), 10) is None
    assert table.counters.duplicates == 1
    parts = table.offer(_part(0, "b"), 10)
    assert parts is not None and parts["a"] is first


def test_a_newer_epoch_discards_older_partial_sets_and_stale_parts() -> None:
    table = JoinTable(frozenset({"a", "b"}), max_bytes=1000)
    table.offer(_part(0, "a", epoch=0), 10)
    table.offer(_part(1, "a", epoch=0), 10)
    assert table.offer(_part(2, "a", epoch=1), 10) is None
    assert table.epoch == 1 and len(table) == 1 and table.counters.discarded_sets == 2
    assert table.held_bytes == 10
    assert table.offer(_part(2, "b", epoch=0), 10) is None  # a frozen stage thawed
    assert table.counters.stale == 1
    assert table.offer(_part(2, "b", epoch=1), 10) is not None


def test_past_the_bound_only_awaited_senders_are_read() -> None:
    table = JoinTable(frozenset({"a", "b", "c"}), max_bytes=100)
    assert table.readable() == {"a", "b", "c"}
    table.offer(_part(0, "a"), 60)
    table.offer(_part(0, "b"), 60)  # 120 held: over the bound
    assert table.readable() == {"c"}  # a and b ran ahead; nothing is evicted
    assert table.offer(_part(0, "c"), 60) is not None
    assert table.readable() == {"a", "b", "c"}


def test_the_set_count_is_bounded_too() -> None:
    table = JoinTable(frozenset({"a", "b"}), max_bytes=10**9, max_sets=3)
    for seq in range(3):
        table.offer(_part(seq, "a"), 1)
    assert table.readable() == {"b"}
