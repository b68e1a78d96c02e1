"""Fixtures for the integration tests: a real TVM tracker, real tvmpipe workers, and after
every test a check that no process, thread or socket was left behind.

Every server listens on an ephemeral loopback port and is known to be ready by polling with a
deadline (its ready line, or its listening socket), never by sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import leaks
import psutil
import pytest
import tvm
from modules import rfc_example_modules, wire_rfc_example
from tvm import rpc

from tvmpipe.orchestrator import PipelineLibrary, PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.deploy import LocalWorker

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0


def build(cfg: PipelineModuleConfig) -> PipelineLibrary:
    with tvm.transform.PassContext(opt_level=3):
        return build_pipeline(cfg)


@pytest.fixture(scope="session")
def rfc_lib() -> Iterator[PipelineLibrary]:
    """DESIGN.md's three-module example, built once for the session."""
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, mod1, mod2, mod3)
    lib = build(cfg)
    yield lib
    lib.close()


# ----- leak checks


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After each test: no process, thread or file descriptor (socket) left (tests/leaks.py)."""
    with leaks.checked():
        yield


# ----- a real TVM tracker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listens_on(root: psutil.Process, port: int) -> bool:
    """Whether root or one of its descendants listens on port (the tracker binds in a child)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return True
        except psutil.Error:
            continue
    return False


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited by the deadline."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    # the group may hold the tracker's popen_worker after its parent exited
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def tracker_summary(tracker: tuple[str, int]) -> dict[str, Any]:
    session = rpc.connect_tracker(*tracker)
    try:
        return session.summary()  # type: ignore[no-any-return]
    finally:
        session.close()


def free_servers(tracker: tuple[str, int], key: str) -> int:
    """How many servers are registered and free under key."""
    queue = tracker_summary(tracker)["queue_info"].get(key, {})
    return int(queue.get("free", 0))


def wait_for_free_servers(
    tracker: tuple[str, int], key: str, count: int, timeout: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    free = free_servers(tracker, key)
    while free < count:
        assert time.monotonic() < deadline, (
            f"only {free} of {count} servers registered under key {key!r} within {timeout} s"
        )
        time.sleep(0.05)
        free = free_servers(tracker, key)


@pytest.fixture
def tracker() -> Iterator[tuple[str, int]]:
    """``python -m tvm.exec.rpc_tracker`` on a free loopback port; yields (host, port).

    The port is chosen here and the tracker is told to use only that one; it is ready once its
    own process tree listens there and it answers a summary request. If another process took the
    port in between, the tracker exits and another port is tried."""
    host = "127.0.0.1"
    for _ in range(5):
        port = _free_port()
        command = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host]
        command += ["--port", str(port), "--port-end", str(port + 1), "--silent"]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
            try:
                root = psutil.Process(proc.pid)
                deadline = time.monotonic() + READY_TIMEOUT_S
                while proc.poll() is None and not _listens_on(root, port):
                    assert time.monotonic() < deadline, "the tracker did not start listening"
                    time.sleep(0.05)
                if proc.poll() is not None:
                    continue  # the port was taken: try another
                assert "queue_info" in tracker_summary((host, port))
                yield host, port
                return
            finally:
                _stop_group(proc)
    pytest.fail("could not start a tracker on a free port in 5 tries")


# ----- tvmpipe workers started by hand


class Worker(LocalWorker):
    """tvmpipe's own loopback worker helper, with the names these tests use."""

    def __init__(self, tracker: tuple[str, int] | None = None, key: str | None = None):
        extra = (
            []
            if tracker is None
            else ["--tracker", f"{tracker[0]}:{tracker[1]}", "--key", str(key)]
        )
        super().__init__("127.0.0.1", extra)
        self.key = key

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


WorkerFactory = Callable[..., list[Worker]]


@pytest.fixture
def worker_factory() -> Iterator[WorkerFactory]:
    """``worker_factory(n, tracker=(host, port), key="k")`` starts n ``python -m tvmpipe.worker``
    on loopback ports (registered with the tracker under key if given, and then only returned
    once the tracker lists them as free); all are stopped when the test ends."""
    started: list[Worker] = []
    registered: dict[tuple[tuple[str, int], str], int] = {}

    def start(
        count: int = 1, *, tracker: tuple[str, int] | None = None, key: str | None = None
    ) -> list[Worker]:
        assert (tracker is None) == (key is None), "give both tracker and key, or neither"
        workers = []
        for _ in range(count):
            worker = Worker(tracker, key)
            started.append(worker)
            workers.append(worker)
        for worker in workers:
            worker.wait_ready()
        if tracker is not None and key is not None:
            total = registered[(tracker, key)] = registered.get((tracker, key), 0) + count
            wait_for_free_servers(tracker, key, total)
        return workers

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()
