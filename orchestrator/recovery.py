"""Recovery: a lost stage deployed again, and no input left waiting for a result that can't come.

One thread per PipelineModule does both jobs below; everything it changes goes through the
client's ``RecoveryHooks`` (the pause, the client's sockets, the sequencer).

**Rewire and resend (``restart=True``).** When the monitor reports a stage lost:

1. The client pauses sending: inputs launched from now on are numbered and kept, not sent.
2. The stage is placed again (same loopback worker if it answers, else a new one; the same
   server; or a worker from the tracker by key, after checking in at most 5 s that the
   tracker answers). Its weights set with ``set_params`` are given again, and it starts in the
   current epoch, binding one receive socket per sender.
3. Every stage that sends to it is rewired; each rewire returns only once that stage's send
   thread sends to the new address. Whatever was queued for the old address is dropped with
   its socket: it was sent before step 5. If the client feeds the stage, the client's own
   socket is replaced likewise. A sender that cannot be rewired (it was lost meanwhile) has its
   session cut, so that the monitor reports it too; it is then deployed again (step 4), and
   its start wires it to the new address.
4. If another stage was lost meanwhile, it is handled first (back to 2), then:
5. The client opens a new epoch and sends every input whose result has not arrived, oldest
   first, and ends the pause.

Why every input yields exactly one result: an input whose result has not arrived is sent again
in the new epoch, after every socket it will travel on points at a live stage, so it arrives
unless another stage is lost (and then it is sent again, in a newer epoch). Each input goes out
at most once per epoch. Stages drop messages of an epoch older than the newest they have seen,
and partial input sets with them, so a stale part, such as one from a frozen stage that thaws
after it was replaced, never joins or crowds a newer one. The client keeps the first result
for each input and drops the rest, and hands results back in launch order.

**Overdue inputs.** Every quarter second the thread asks the sequencer for inputs whose result is
late (``result_timeout``: see sequencer.py). With ``restart=True`` they are sent again in a new
epoch, at most ``MAX_RESENDS`` times; otherwise, or after that, the input fails with a
ResultTimeoutError that names the stage where it stopped.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Protocol

from tvmpipe.proto.errors import ResultTimeoutError

from .deploy import StageSession, check_tracker
from .fleet import Fleet
from .health import StageMonitor
from .sequencer import InFlight

POLL_S = 0.05
OVERDUE_EVERY_S = 0.25
MAX_RESENDS = 3
TRACKER_CHECK_S = 3.0


class RecoveryHooks(Protocol):
    """What recovery needs from the client."""

    address: str
    queue_bytes: int

    def current_epoch(self) -> int: ...

    def replace_input_socket(self, stage: str, address: str) -> None: ...

    def resend_all(self, end_pause: bool) -> None: ...

    def overdue(self) -> list[InFlight]: ...

    def fail_stage(self, stage: str, reason: str) -> None: ...

    def fail_input(self, seq: int, error: Exception) -> None: ...


class Recovery:
    def __init__(
        self,
        client: RecoveryHooks,
        fleet: Fleet,
        monitor: StageMonitor,
        restart: bool,
        max_restarts: int,
    ):
        self.client = client
        self.fleet = fleet
        self.monitor = monitor
        self.restart = restart
        self.restarts_left = max_restarts
        self.restarts = 0
        self._losses: queue.Queue[tuple[StageSession, str]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tvmpipe-recovery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def will_restart(self) -> bool:
        return self.restart and self.restarts_left > 0

    def stage_lost(self, session: StageSession, reason: str) -> None:
        """From the monitor: queue a lost stage (the client has paused sending)."""
        self._losses.put((session, reason))

    def pending_losses(self) -> bool:
        return not self._losses.empty()

    def _loop(self) -> None:
        next_check = time.monotonic() + OVERDUE_EVERY_S
        while not self._stopping.is_set():
            try:
                lost, reason = self._losses.get(timeout=POLL_S)
            except queue.Empty:
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + OVERDUE_EVERY_S
                    self._handle_overdue()
                continue
            if self._redeploy(lost, reason):
                self.client.resend_all(end_pause=self._losses.empty())

    def _redeploy(self, lost: StageSession, reason: str) -> bool:
        """Steps 2 and 3 of the protocol; False (and the stage failed) if it cannot be done."""
        name = lost.stage.name
        if not self.will_restart():
            if self.restart:
                reason += "; it was deployed again as often as max_restarts allows"
            lost.abort()  # a call stuck on it would hold close() for minutes
            self.fleet.lost.append(lost)
            self.client.fail_stage(name, reason)
            return False
        self.restarts_left -= 1
        try:
            if self.fleet.plan.placements[name].key is not None:
                assert self.fleet.plan.tracker is not None
                check_tracker(self.fleet.plan.tracker, TRACKER_CHECK_S)
            session = self.fleet.replace(
                lost,
                self.client.address,
                self.client.queue_bytes,
                self.client.current_epoch(),
                lambda address: self.client.replace_input_socket(name, address),
            )
        except Exception as exc:
            self.fleet.lost.append(lost)
            self.client.fail_stage(name, f"{reason}; deploying it again failed: {exc}")
            return False
        self.monitor.watch(session)
        self.restarts += 1
        return True

    def _handle_overdue(self) -> None:
        late = self.client.overdue()
        if not late:
            return
        if self.restart and all(entry.resends < MAX_RESENDS for entry in late):
            for entry in late:
                entry.resends += 1
            self.client.resend_all(end_pause=False)
            return
        for entry in late:
            stage, where = self.fleet.locate(entry.seq)
            error = ResultTimeoutError(
                stage, f"input #{entry.seq} has had no result within result_timeout: {where}"
            )
            self.client.fail_input(entry.seq, error)
