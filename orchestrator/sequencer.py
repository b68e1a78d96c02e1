"""The client's bookkeeping as a state machine: numbers, copies kept for resending, order.

No sockets, no threads and no clock of its own (callers pass ``now``), so that the races of
recovery can be tested on it alone; the caller holds one lock around every call.

- ``launch`` gives an input set the next sequence number. Until its result arrives the
  sequencer keeps the tensors (when ``keep_copies``: needed to send it again) and the epoch
  it was last sent in.
- ``take_send`` says whether an input still has to go out in the current epoch, and marks it
  sent: an input is sent at most once per epoch, so that no stage ever sees the same part twice
  in one epoch.
- ``resend_all`` opens a new epoch and returns every input in flight, to be sent again.
- ``accept`` takes a result once: the first that arrives for a number in flight. A duplicate
  (an input sent twice arrives twice) or a stray number is refused.
- ``next_result`` hands ``run()``'s results out in launch order; futures get theirs directly.
- ``overdue`` names the inputs whose result is late: none arrived for ``timeout`` seconds since
  the input was last sent and since the last result came (a busy pipeline is not a stalled
  one), or a later input's result came more than ``timeout`` seconds ago (inputs leave a
  pipeline in order, so this one was lost).
"""

from __future__ import annotations

import bisect
import collections
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

Result = list[np.ndarray] | Exception
# Upper bounds (seconds) of the end-to-end latency histogram's buckets; the last is +Inf.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class InFlight:
    seq: int
    inputs: dict[str, np.ndarray] | None
    future: Future[list[np.ndarray]] | None
    sent_at: float
    epoch: int = -1  # the epoch it was last sent in; -1: not sent yet
    overtaken_at: float | None = None  # when a later input's result arrived first
    resends: int = 0  # times it was found overdue and sent again
    launched_at: float = 0.0


class Sequencer:
    def __init__(self, window: int, keep_copies: bool):
        self.window = window
        self.keep_copies = keep_copies
        self.next_seq = 0
        self.epoch = 0
        self.last_result_at = 0.0
        self.counters = collections.Counter[str]()
        self._flight: dict[int, InFlight] = {}  # launched, result not arrived; in seq order
        self._ordered: collections.deque[int] = collections.deque()  # run(), not yet taken
        self._ready: dict[int, Result] = {}  # results waiting for get_output()
        self._futures = 0  # futures in flight
        self.latency_hist = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum = 0.0

    # ----- launching and sending
    @property
    def in_flight(self) -> int:
        """Launched and not handed back: counted against the window."""
        return self._futures + len(self._ordered)

    def has_room(self) -> bool:
        return self.in_flight < self.window

    def launch(
        self,
        inputs: dict[str, np.ndarray],
        future: Future[list[np.ndarray]] | None,
        now: float,
    ) -> int:
        seq = self.next_seq
        self.next_seq += 1
        copy = inputs if self.keep_copies else None
        self._flight[seq] = InFlight(seq, copy, future, now, launched_at=now)
        if future is None:
            self._ordered.append(seq)
        else:
            self._futures += 1
        return seq

    def take_send(self, seq: int, now: float) -> bool:
        """True if ``seq`` must be sent now, in the current epoch (and marks it sent)."""
        entry = self._flight.get(seq)
        if entry is None or entry.epoch >= self.epoch:
            return False
        entry.epoch = self.epoch
        entry.sent_at = now
        return True

    def resend_all(self, now: float) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Open a new epoch; every input in flight, to be sent again in it."""
        self.epoch += 1
        self.counters["resent_epochs"] += 1
        out = []
        for entry in self._flight.values():
            if entry.inputs is not None:
                entry.epoch = self.epoch
                entry.sent_at = now
                entry.overtaken_at = None
                out.append((entry.seq, entry.inputs))
        self.counters["resent"] += len(out)
        return out

    # ----- results
    def accept(self, seq: int, result: Result, now: float) -> tuple[bool, Future[Any] | None]:
        """Take a result for ``seq``; (False, None) if it is not in flight (a duplicate)."""
        entry = self._flight.pop(seq, None)
        if entry is None:
            self.counters["duplicates"] += 1
            return False, None
        self.last_result_at = now
        latency = now - entry.launched_at
        self.latency_hist[bisect.bisect_left(LATENCY_BUCKETS_S, latency)] += 1
        self.latency_sum += latency
        for earlier in self._flight.values():  # inputs launched before seq are overtaken
            if earlier.seq > seq:
                break
            if earlier.overtaken_at is None:
                earlier.overtaken_at = now
        self.counters["completed"] += 1
        if entry.future is None:
            self._ready[seq] = result
        else:
            self._futures -= 1
        return True, entry.future

    def expects(self, seq: int) -> bool:
        return seq in self._flight

    def result_ready(self) -> bool:
        return bool(self._ordered) and self._ordered[0] in self._ready

    def next_result(self) -> Result | None:
        """The oldest result of run() not handed back, once it has arrived; else None."""
        if not self._ordered or self._ordered[0] not in self._ready:
            return None
        return self._ready.pop(self._ordered.popleft())

    def waiting_for_run(self) -> int | None:
        """The number get_output() waits for next, if run() launched any."""
        return self._ordered[0] if self._ordered else None

    def overdue(self, now: float, timeout: float) -> list[InFlight]:
        """Inputs whose result is late (see the module docstring), oldest first."""
        late = []
        quiet_since = self.last_result_at
        for entry in self._flight.values():
            if entry.epoch < 0:
                continue  # not sent yet (held back during a redeployment)
            idle = now - max(entry.sent_at, quiet_since)
            overtaken = entry.overtaken_at is not None and now - entry.overtaken_at > timeout
            if idle > timeout or overtaken:
                late.append(entry)
        return late

    def mark_resent(self, entry: InFlight) -> None:
        entry.resends += 1

    def fail(self, seq: int, error: Exception, now: float) -> Future[Any] | None:
        """Give up on ``seq``: its result is ``error``."""
        accepted, future = self.accept(seq, error, now)
        if accepted:
            self.counters["completed"] -= 1
            self.counters["failed"] += 1
        return future

    def fail_all(self, error: Exception) -> list[Future[Any]]:
        """Every input in flight fails with ``error``; their futures, to be told."""
        futures = []
        for seq, entry in list(self._flight.items()):
            if entry.future is None:
                self._ready[seq] = error
            else:
                futures.append(entry.future)
        self._flight.clear()
        self._futures = 0
        return futures

    def snapshot(self) -> dict[str, Any]:
        return {
            "launched": self.next_seq,
            "in_flight": self.in_flight,
            "epoch": self.epoch,
            "waiting_results": len(self._ready),
            "latency_buckets_s": list(LATENCY_BUCKETS_S),
            "latency_hist": list(self.latency_hist),
            "latency_sum_s": self.latency_sum,
            **self.counters,
        }
