"""Noticing a lost stage: a worker killed, or a board whose link went down.

One thread per stage session calls a cheap remote function every ``interval`` seconds. A call
that fails (the worker's process is gone: the connection is reset at once) or that has not
succeeded for ``deadline`` seconds (the link is down: TCP would wait minutes) marks the session
lost, once, and ``on_lost(session, reason)`` decides what follows: fail every input in flight,
or deploy the stage again and ``watch`` its new session.
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
        on_lost: Callable[[StageSession, str], None],
        interval: float = INTERVAL_S,
        deadline: float = DEADLINE_S,
    ):
        self._on_lost = on_lost
        self._interval = interval
        self._deadline = deadline
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._last_ok: dict[StageSession, float] = {}  # sessions watched and not yet lost
        self._threads: list[threading.Thread] = []
        self._watchdog = threading.Thread(target=self._watch, name="tvmpipe-watchdog", daemon=True)
        self._initial = list(sessions)

    def start(self) -> None:
        for session in self._initial:
            self.watch(session)
        self._watchdog.start()

    def watch(self, session: StageSession) -> None:
        """Start pinging one more session (a stage deployed again)."""
        with self._lock:
            self._last_ok[session] = time.monotonic()
            thread = threading.Thread(
                target=self._ping_loop,
                args=(session,),
                name=f"tvmpipe-ping-{session.stage.name}",
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Stop watching; a ping stuck on an unreachable board is left to end with it."""
        self._stopping.set()
        if self._watchdog.is_alive():
            self._watchdog.join(2)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(0.2)

    def _ping_loop(self, session: StageSession) -> None:
        while not self._stopping.wait(self._interval):
            with self._lock:
                if session not in self._last_ok:
                    return  # reported lost by the watchdog
            try:
                session.call("tvmpipe.stage.stats", wait=self._deadline)
            except DeployError as exc:
                self._report(session, f"its worker {session.peer} stopped answering ({exc})")
                return
            with self._lock:
                if session in self._last_ok:
                    self._last_ok[session] = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                stale = [s for s, t in self._last_ok.items() if now - t > self._deadline]
            for session in stale:
                self._report(session, f"its worker has not answered for {self._deadline:.0f} s")

    def _report(self, session: StageSession, reason: str) -> None:
        """Tell ``on_lost`` about a session once, unless the monitor is stopping."""
        with self._lock:
            if self._stopping.is_set() or self._last_ok.pop(session, None) is None:
                return
        self._on_lost(session, reason)
