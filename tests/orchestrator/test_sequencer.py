"""The client's sequencer on its own: numbering, one send per epoch, resends, first result wins,
launch order, overdue inputs; and random interleavings of all of those."""

from __future__ import annotations

import random
from concurrent.futures import Future

import numpy as np
import pytest

from tvmpipe.orchestrator.sequencer import Sequencer

pytestmark = pytest.mark.timeout(60)


def _inputs(seq: int) -> dict[str, np.ndarray]:
    return {"x": np.full(2, seq)}


def test_numbers_in_order_and_results_come_back_in_launch_order() -> None:
    s = Sequencer(window=8, keep_copies=False)
    seqs = [s.launch(_inputs(i), None, now=0.0) for i in range(3)]
    assert seqs == [0, 1, 2]
    assert s.accept(2, [np.zeros(1)], now=1.0)[0]
    assert s.next_result() is None  # #0 is not back yet
    s.accept(0, [np.ones(1)], now=1.0)
    s.accept(1, [np.full(1, 2.0)], now=1.0)
    assert [float(s.next_result()[0][0]) for _ in range(3)] == [1.0, 2.0, 0.0]  # type: ignore[index]
    assert s.next_result() is None and s.in_flight == 0


def test_first_result_wins_and_duplicates_are_refused() -> None:
    s = Sequencer(window=8, keep_copies=True)
    future: Future[list[np.ndarray]] = Future()
    seq = s.launch(_inputs(0), future, now=0.0)
    assert s.accept(seq, [np.ones(1)], now=0.1) == (True, future)
    assert s.accept(seq, [np.zeros(1)], now=0.2) == (False, None)
    assert s.counters["duplicates"] == 1 and s.in_flight == 0


def test_an_input_goes_out_once_per_epoch() -> None:
    s = Sequencer(window=8, keep_copies=True)
    seq = s.launch(_inputs(0), None, now=0.0)
    assert s.take_send(seq, now=0.0)
    assert not s.take_send(seq, now=0.0)
    resent = s.resend_all(now=1.0)
    assert [r[0] for r in resent] == [seq] and s.epoch == 1
    assert not s.take_send(seq, now=1.0)  # the resend already sent it in epoch 1
    late = s.launch(_inputs(1), None, now=1.0)
    assert s.take_send(late, now=1.0)  # launched after the resend: sent once, in epoch 1


def test_held_back_inputs_go_out_with_the_resend() -> None:
    s = Sequencer(window=8, keep_copies=True)
    held = [s.launch(_inputs(i), None, now=0.0) for i in range(3)]  # never sent: paused
    assert [seq for seq, _ in s.resend_all(now=0.5)] == held


def test_window_counts_what_was_not_handed_back() -> None:
    s = Sequencer(window=2, keep_copies=False)
    s.launch(_inputs(0), None, now=0.0)
    s.launch(_inputs(1), Future(), now=0.0)
    assert not s.has_room()
    s.accept(1, [np.ones(1)], now=0.1)  # a future's slot frees on arrival
    assert s.has_room()
    s.accept(0, [np.ones(1)], now=0.1)  # run()'s slot frees when get_output takes it
    assert s.in_flight == 1
    s.next_result()
    assert s.in_flight == 0


def test_overdue_when_quiet_or_overtaken_not_when_busy() -> None:
    s = Sequencer(window=8, keep_copies=True)
    a = s.launch(_inputs(0), None, now=0.0)
    b = s.launch(_inputs(1), None, now=0.0)
    for seq in (a, b):
        s.take_send(seq, now=0.0)
    assert s.overdue(now=5.0, timeout=10.0) == []
    s.accept(b, [np.ones(1)], now=5.0)  # b overtook a at t=5
    assert s.overdue(now=12.0, timeout=10.0) == []  # results came 7 s ago: not quiet
    assert [e.seq for e in s.overdue(now=15.5, timeout=10.0)] == [a]  # overtaken 10.5 s ago
    c = s.launch(_inputs(2), None, now=20.0)
    s.take_send(c, now=20.0)
    s.resend_all(now=20.0)
    assert s.overdue(now=25.0, timeout=10.0) == []
    assert [e.seq for e in s.overdue(now=31.0, timeout=10.0)] == [a, c]


def test_fail_all_reaches_futures_and_get_output() -> None:
    s = Sequencer(window=8, keep_copies=True)
    future: Future[list[np.ndarray]] = Future()
    s.launch(_inputs(0), None, now=0.0)
    s.launch(_inputs(1), future, now=0.0)
    error = RuntimeError("lost")
    assert s.fail_all(error) == [future]
    assert s.next_result() is error


@pytest.mark.parametrize("seed", range(200))
def test_random_interleavings_deliver_each_input_exactly_once_in_order(seed: int) -> None:
    """Launches, sends, resends (new epochs), losses and duplicate deliveries in random order:
    every input is sent at most once per epoch and comes back exactly once, in launch order."""
    rng = random.Random(seed)
    s = Sequencer(window=16, keep_copies=True)
    sent: dict[tuple[int, int], int] = {}  # (seq, epoch) -> times sent
    wire: list[int] = []  # seqs on their way: may arrive, be lost, or arrive twice
    now = 0.0
    launched = 0
    taken: list[int] = []
    while launched < 60 or s.in_flight:
        now += 0.01
        action = rng.random()
        if action < 0.3 and launched < 60 and s.has_room():
            seq = s.launch(_inputs(launched), None, now)
            launched += 1
            if rng.random() < 0.8 and s.take_send(seq, now):
                sent[(seq, s.epoch)] = sent.get((seq, s.epoch), 0) + 1
                wire.append(seq)
        elif action < 0.35:
            wire.clear()  # a stage was lost with everything on its way
            for seq, _ in s.resend_all(now):
                sent[(seq, s.epoch)] = sent.get((seq, s.epoch), 0) + 1
                wire.append(seq)
        elif action < 0.8 and wire:
            seq = wire.pop(rng.randrange(len(wire)))
            s.accept(seq, [np.full(1, seq)], now)
            if rng.random() < 0.2:
                wire.append(seq)  # delivered twice
        else:
            result = s.next_result()
            if result is not None:
                assert not isinstance(result, Exception)
                taken.append(int(result[0][0]))
        if not wire and s.in_flight and rng.random() < 0.5:
            for seq, _ in s.resend_all(now):  # what the overdue check does
                sent[(seq, s.epoch)] = sent.get((seq, s.epoch), 0) + 1
                wire.append(seq)
    assert taken == list(range(60))
    assert max(sent.values()) == 1
