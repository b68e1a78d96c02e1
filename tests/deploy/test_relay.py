"""Relay mode: a stage on TVM's own RPC server (no tvmpipe there), where the user allows it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import pytest
from modules import rfc_example_reference

from tvmpipe.orchestrator import PipelineModule
from tvmpipe.orchestrator.deploy import LocalWorker
from tvmpipe.orchestrator.library import PipelineLibrary
from tvmpipe.orchestrator.localcluster import WITH_PARENT_BOOT

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def plain_server() -> Iterator[str]:
    """``python -m tvm.exec.rpc_server`` on loopback; its port read from its own log line."""
    with tempfile.TemporaryFile() as log:
        start = _free_port()
        # Wrapped so that it also ends if this test process is killed before its finally.
        command = [sys.executable, "-c", WITH_PARENT_BOOT, "tvm.exec.rpc_server"]
        command += ["--host", "127.0.0.1"]
        command += ["--port", str(start), "--port-end", str(start + 100)]
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            port = None
            while port is None and time.monotonic() < deadline:
                assert proc.poll() is None, "the TVM RPC server exited during start-up"
                log.seek(0)
                found = re.search(rb"bind to 127\.0\.0\.1:(\d+)", log.read())
                port = int(found.group(1)) if found else None
                time.sleep(0.05)
            assert port is not None, "the TVM RPC server did not report its port"
            yield f"127.0.0.1:{port}"
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def tvmpipe_workers() -> Iterator[list[str]]:
    workers = [LocalWorker() for _ in range(2)]
    try:
        yield [f"{host}:{port}" for host, port in (w.wait_ready() for w in workers)]
    finally:
        for worker in workers:
            worker.stop()


def test_stage_on_a_plain_tvm_server_runs_in_relay_mode(
    plain_server: str,
    tvmpipe_workers: list[str],
    rfc_lib: PipelineLibrary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(3)
    sets = [[rng.standard_normal((1, 4)).astype("float32") for _ in range(3)] for _ in range(20)]
    servers = [tvmpipe_workers[0], plain_server, tvmpipe_workers[1]]  # mod2 on the plain server
    with PipelineModule(rfc_lib, servers=servers, allow_relay=True) as pipe:
        # The relay is a local stage process; the board itself is the plain server.
        relay = pipe._fleet.stage_sessions()[1]
        assert relay.peer != plain_server
        assert relay.address.startswith(("tcp://127.0.0.1:", "ipc://"))
        outputs = list(pipe.map({"data_0": a, "data_1": b, "data_2": c} for a, b, c in sets))
        stats = pipe.stats()["stages"]
    for (a, b, c), out in zip(sets, outputs, strict=True):
        np.testing.assert_allclose(out[0], rfc_example_reference(a, b, c), rtol=1e-6)
    assert stats["mod2"]["processed"] == len(sets)
    # relay mode is visible: a warning naming the board, and stats() saying so
    assert stats["mod2"]["mode"] == "relay" and stats["mod2"]["board"] == plain_server
    assert "mode" not in stats["mod1"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("relay mode" in m and plain_server in m for m in warned), warned
