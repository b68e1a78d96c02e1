"""Deploy fails fast and says why: an unreachable tracker, a key no worker has, workers all in
use, a silent server and a closed port, each reported within its bound, naming what to fix.

Real TVM trackers and tvmpipe workers on ephemeral loopback ports; times are measured with
time.monotonic and printed (pytest -s). Bounds are generous: the machine may be busy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tvmpipe.orchestrator.deploy import (
    TRACKER_TIMEOUT_S,
    LocalWorker,
    check_tracker,
    connect_server,
    registered_workers,
    request_from_tracker,
)
from tvmpipe.orchestrator.library import StageInfo
from tvmpipe.proto.errors import DeployError, NoWorkerError, TrackerUnreachableError

STAGE = StageInfo(name="mod1", kind="relax", artifact="", sha256="", inputs=[], outputs=None)
PROMISE_S = 5.0  # what the issue promises for an unreachable tracker
SLACK_S = 2.5  # for a busy, shared machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free(tracker: tuple[str, int], key: str) -> int:
    return registered_workers(check_tracker(tracker)).get(key, (0, 0))[1]


def _wait_free(tracker: tuple[str, int], key: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _free(tracker, key) < count:
        assert time.monotonic() < deadline, f"{count} free worker(s) under {key!r} in {timeout} s"
        time.sleep(0.05)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with contextlib.suppress(ProcessLookupError):  # and the tracker's own child
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


@pytest.fixture(scope="module")
def tracker() -> Iterator[tuple[str, int]]:
    """TVM's tracker on a free loopback port, with one tvmpipe worker under key "a"."""
    port = _free_port()
    command = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--port-end", str(port + 1), "--silent"]
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = ("127.0.0.1", port)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the tracker exited during start-up"
            try:
                check_tracker(address)
                break
            except TrackerUnreachableError:
                assert time.monotonic() < deadline, "the tracker did not start in 60 s"
                time.sleep(0.05)
        worker = LocalWorker(extra_args=["--tracker", f"127.0.0.1:{port}", "--key", "a"])
        worker.wait_ready()
        _wait_free(address, "a", 1)
        yield address
    finally:
        if worker is not None:
            worker.stop()
        _stop_group(proc)


@pytest.mark.timeout(60)
def test_a_tracker_that_is_not_running_is_reported_at_once() -> None:
    port = _free_port()  # nothing listens here
    started = time.monotonic()
    with pytest.raises(TrackerUnreachableError, match=rf"127\.0\.0\.1:{port}.*refused") as info:
        request_from_tracker(STAGE, ("127.0.0.1", port), "a")
    elapsed = time.monotonic() - started
    print(f"\ntracker not running: {elapsed:.3f} s: {info.value}")
    assert "stage 'mod1'" in str(info.value) and "is the tracker running" in str(info.value)
    assert elapsed < PROMISE_S
    with pytest.raises(TrackerUnreachableError, match="refused"):
        check_tracker(("127.0.0.1", port))


@pytest.mark.timeout(60)
def test_a_tracker_that_never_answers_is_reported_within_five_seconds() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = ("127.0.0.1", silent.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(TrackerUnreachableError, match="did not answer") as info:
            request_from_tracker(STAGE, address, "a")  # timeout: REQUEST_TIMEOUT_S (60 s)
        elapsed = time.monotonic() - started
    print(f"\nsilent tracker: {elapsed:.3f} s (check bound {TRACKER_TIMEOUT_S} s): {info.value}")
    assert TRACKER_TIMEOUT_S - 0.1 < elapsed < PROMISE_S


@pytest.mark.timeout(120)
def test_a_key_no_worker_has_is_reported_at_once(tracker: tuple[str, int]) -> None:
    started = time.monotonic()
    with pytest.raises(NoWorkerError, match=r"no worker is registered under key 'b'") as info:
        request_from_tracker(STAGE, tracker, "b", timeout=30)
    elapsed = time.monotonic() - started
    print(f"\nkey without workers: {elapsed:.3f} s: {info.value}")
    assert "registered: 'a' (1)" in str(info.value) and "--key b" in str(info.value)
    assert elapsed < 3.0


@pytest.mark.timeout(120)
def test_all_workers_in_use_is_reported_after_the_timeout(tracker: tuple[str, int]) -> None:
    held = request_from_tracker(STAGE, tracker, "a", timeout=30)
    try:
        started = time.monotonic()
        with pytest.raises(NoWorkerError, match=r"all 1 worker\(s\) .* 'a' .* in use") as info:
            request_from_tracker(STAGE, tracker, "a", timeout=2)
        elapsed = time.monotonic() - started
        print(f"\nall workers in use (timeout 2 s): {elapsed:.3f} s: {info.value}")
        assert 1.9 < elapsed < 2 + SLACK_S
    finally:
        held.close()
    # The request that timed out was withdrawn: the worker, free again, is not handed to it.
    _wait_free(tracker, "a", 1, timeout=30)
    time.sleep(0.5)
    assert _free(tracker, "a") == 1
    again = request_from_tracker(STAGE, tracker, "a", timeout=30)
    try:
        again.handshake()
    finally:
        again.close()
    _wait_free(tracker, "a", 1, timeout=30)  # as the module's next test expects it


@pytest.mark.timeout(60)
def test_a_silent_server_is_reported_within_the_timeout() -> None:
    with socket.socket() as silent:  # accepts TCP (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(DeployError, match=rf"server {address} .*did not answer") as info:
            connect_server(STAGE, address, timeout=2)
        elapsed = time.monotonic() - started
    print(f"\nsilent server (timeout 2 s): {elapsed:.3f} s: {info.value}")
    assert "stage 'mod1'" in str(info.value)
    assert 1.9 < elapsed < 2 + SLACK_S


@pytest.mark.timeout(60)
def test_a_closed_port_is_refused_at_once() -> None:
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(DeployError, match=rf"stage 'mod1': server {address} refused") as info:
        connect_server(STAGE, address, timeout=30)
    elapsed = time.monotonic() - started
    print(f"\nclosed port: {elapsed:.3f} s: {info.value}")
    assert elapsed < 2.0
