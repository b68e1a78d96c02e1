"""Noticing a lost stage: a worker killed, or a board whose link went down.

One thread per stage calls a cheap remote function every ``interval`` seconds. A call that
fails (the worker's process is gone: the connection is reset at once) or that has not
succeeded for ``deadline`` seconds (the link is down: TCP would wait minutes) marks the stage
lost, and the client fails every input in flight with an error naming it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from tvmpipe.proto.errors import DeployError

from .deploy import StageSession

INTERVAL_S = 0.5
DEADLINE_S = 2.0


class StageMonitor:
    def __init__(
        self,
        sessions: Sequence[StageSession],
        on_lost: Callable[[str, str], None],
        interval: float = INTERVAL_S,
        deadline: float = DEADLINE_S,
    ):
        self._on_lost = on_lost
        self._interval = interval
        self._deadline = deadline
        self._stopping = threading.Event()
        self._last_ok = {s.stage.name: time.monotonic() for s in sessions}
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=self._ping_loop, args=(s,), name=f"tvmpipe-ping-{s.stage.name}", daemon=True
            )
            for s in sessions
        ]
        self._watchdog = threading.Thread(target=self._watch, name="tvmpipe-watchdog", daemon=True)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._watchdog.start()

    def stop(self) -> None:
        """Stop watching; a ping stuck on an unreachable board is left to end with it."""
        self._stopping.set()
        self._watchdog.join(2)
        for thread in self._threads:
            thread.join(0.2)

    def _ping_loop(self, session: StageSession) -> None:
        name = session.stage.name
        while not self._stopping.wait(self._interval):
            try:
                session.call("tvmpipe.stage.stats", wait=self._deadline)
            except DeployError as exc:
                if not self._stopping.is_set():
                    self._on_lost(name, f"its worker {session.peer} stopped answering ({exc})")
                return
            with self._lock:
                self._last_ok[name] = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                stale = [n for n, t in self._last_ok.items() if now - t > self._deadline]
            for name in stale:
                self._on_lost(name, f"its worker has not answered for {self._deadline:.0f} s")
                with self._lock:
                    self._last_ok.pop(name, None)
