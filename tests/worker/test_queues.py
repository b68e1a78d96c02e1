"""ByteQueue: the stage's queues hold a bounded number of bytes, not only of items."""

from __future__ import annotations

import threading
import time

import pytest

from tvmpipe.worker.queues import ByteQueue

pytestmark = pytest.mark.timeout(30)


def test_bounded_by_bytes_before_items() -> None:
    q: ByteQueue[str] = ByteQueue(max_items=10, max_bytes=100)
    assert q.put("a", 60, timeout=0)
    assert q.put("b", 40, timeout=0)
    assert not q.put("c", 1, timeout=0.05)  # 100 bytes held: full although 2 of 10 items
    assert (q.qsize(), q.nbytes()) == (2, 100)
    assert q.get(timeout=0) == "a"
    assert q.put("c", 60, timeout=0)
    assert [q.get(timeout=0) for _ in range(2)] == ["b", "c"]
    assert q.nbytes() == 0


def test_bounded_by_items() -> None:
    q: ByteQueue[int] = ByteQueue(max_items=2, max_bytes=1 << 30)
    assert q.put(1, 1, timeout=0) and q.put(2, 1, timeout=0)
    assert not q.put(3, 1, timeout=0.05)


def test_an_item_larger_than_the_bound_passes_alone() -> None:
    q: ByteQueue[str] = ByteQueue(max_items=4, max_bytes=10)
    assert q.put("huge", 1000, timeout=0)  # empty: it may pass, or the stage would wedge
    assert not q.put("small", 1, timeout=0.05)  # but nothing joins it
    assert q.get(timeout=0) == "huge"
    assert q.put("small", 1, timeout=0)


def test_get_times_out_empty_and_wakes_a_waiting_put() -> None:
    q: ByteQueue[str] = ByteQueue(max_items=1, max_bytes=10)
    assert q.get(timeout=0.05) is None
    assert q.put("first", 5, timeout=0)
    done: list[bool] = []
    putter = threading.Thread(target=lambda: done.append(q.put("second", 5, timeout=5)))
    putter.start()
    time.sleep(0.1)
    assert not done  # waiting for room
    assert q.get(timeout=1) == "first"
    putter.join(5)
    assert done == [True]
    assert q.get(timeout=1) == "second"


def test_refuses_a_queue_without_room() -> None:
    with pytest.raises(ValueError):
        ByteQueue(max_items=0, max_bytes=10)
