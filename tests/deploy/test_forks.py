"""Local workers come from a fork server that imported TVM once (orchestrator/forks.py): each
takes this process's environment as it is when the worker starts, a fork server that
died is replaced, and the fork server goes away with the process that started it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import psutil
import pytest
from leaks import wait_gone
from modules import rfc_example_reference

from tvmpipe.orchestrator import PipelineModule, forks
from tvmpipe.orchestrator.deploy import LocalWorker
from tvmpipe.orchestrator.library import PipelineLibrary

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not forks.enabled(), reason="the fork server is Linux's"),
]


def test_a_worker_takes_the_environment_of_its_start(
    rfc_lib: PipelineLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    forks.ensure_started()  # before the change below: the server's own environment differs
    monkeypatch.setenv("TVMPIPE_LOOPBACK_TRANSPORT", "tcp")
    x = [np.full((1, 4), v, dtype="float32") for v in (1.0, 2.0, 3.0)]
    with PipelineModule(rfc_lib) as pipe:
        server = forks.server_pid()
        workers = pipe._fleet.local_workers
        parents = [psutil.Process(w.process.pid).ppid() for w in workers]
        assert server is not None and parents == [server] * len(workers), (server, parents)
        # the stages read the variable when they bind: TCP, not the default Unix sockets
        addresses = [a for senders in pipe._fleet.addresses.values() for a in senders.values()]
        assert addresses and all(a.startswith("tcp://") for a in addresses), addresses
        out = pipe.submit({"data_0": x[0], "data_1": x[1], "data_2": x[2]}).result(30)
        np.testing.assert_allclose(out[0], rfc_example_reference(*x))


def test_a_fork_server_that_died_is_replaced() -> None:
    forks.ensure_started()
    first = forks.server_pid()
    assert first is not None
    psutil.Process(first).kill()
    assert wait_gone([first]) == []
    worker = LocalWorker()
    try:
        worker.wait_ready()
        second = forks.server_pid()
        assert second not in (None, first)
        assert psutil.Process(worker.process.pid).ppid() == second
    finally:
        worker.stop()
        forks.shutdown()  # the leak check knows the first one only; the next test starts one
    assert wait_gone([worker.process.pid]) == []


def test_without_the_fork_server_a_worker_is_a_fresh_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(forks.ENV_SWITCH, "0")
    worker = LocalWorker()
    try:
        worker.wait_ready()
        assert isinstance(worker.process, subprocess.Popen)
        assert psutil.Process(worker.process.pid).ppid() == os.getpid()
    finally:
        worker.stop()


CONTROLLER = """
import os
from tvmpipe.orchestrator import forks
from tvmpipe.orchestrator.deploy import LocalWorker
worker = LocalWorker()
worker.wait_ready()
print(forks.server_pid(), worker.process.pid, flush=True)
os._exit(0)  # no clean-up at all: as if killed
"""


def test_the_fork_server_and_its_workers_end_with_their_controller() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CONTROLLER], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stderr[-2000:]
    server, worker = (int(p) for p in result.stdout.split())
    assert wait_gone([server, worker]) == [], (
        "the fork server or its worker outlived its controller"
    )
