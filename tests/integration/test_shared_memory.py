"""1 MiB tensors between processes on this machine go through shared-memory rings
(proto/shm.py); these try to break that: kills at random moments with slots in use, a stage
frozen with SIGSTOP while it holds slots, and a Python stage that never lets its inputs go.
Every result must still arrive, right, once, in order.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from modules import hoard_then_copy

from tvmpipe.orchestrator import PipelineLibrary, PipelineModule

from .test_recovery import input_sets as recovery_input_sets
from .test_recovery import paced_pipeline

pytestmark = pytest.mark.timeout(240)
SHAPE = (256, 1024)  # float32: 1 MiB
RESULT_WAIT_S = 30.0
RING = "/memfd:tvmpipe-ring"


@pytest.fixture(scope="module")
def paced() -> Iterator[PipelineLibrary]:
    lib = paced_pipeline(shape=SHAPE)
    yield lib
    lib.close()


def input_sets(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    return recovery_input_sets(count, seed, SHAPE)  # x[0, 0]: the Python stage's sleep


def maps_rings(pid: int | str) -> bool:
    return RING in Path(f"/proc/{pid}/maps").read_text()


def stream(pipe: PipelineModule, sets: list[dict[str, np.ndarray]], meddle: object) -> None:
    """Feed ``sets`` from a thread while ``meddle()`` runs in another; check every result."""
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for inputs in sets:
                for name, value in inputs.items():
                    pipe.set_input(name, value)
                pipe.run()
        except BaseException as exc:
            errors.append(exc)

    def interfere() -> None:
        try:
            meddle()  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce), threading.Thread(target=interfere)]
    for thread in threads:
        thread.start()
    try:
        for i, inputs in enumerate(sets):
            out = pipe.get_output(timeout=RESULT_WAIT_S)
            assert out, f"no result for input {i} within {RESULT_WAIT_S} s"
            np.testing.assert_allclose(out[0], inputs["y"] - inputs["x"], rtol=1e-6)
        assert pipe.get_output() == []  # nothing extra, nothing duplicated
    finally:
        for thread in threads:
            thread.join(RESULT_WAIT_S)
    assert not errors, errors


def test_results_come_through_rings_and_survive_kills_at_random_moments(
    paced: PipelineLibrary,
) -> None:
    chooser = random.Random(11)
    with PipelineModule(paced, restart=True, window=16) as pipe:

        def kill() -> None:
            for done in range(3):
                time.sleep(chooser.uniform(0.2, 0.6))
                session = chooser.choice(pipe._fleet.stage_sessions())
                assert session.remote_pid is not None
                os.kill(session.remote_pid, signal.SIGKILL)
                deadline = time.monotonic() + RESULT_WAIT_S
                while pipe.stats()["client"].get("restarts", 0) < done + 1:
                    assert time.monotonic() < deadline, "no restart"
                    time.sleep(0.05)

        stream(pipe, input_sets(30, seed=1), lambda: None)
        assert maps_rings("self")  # the last stage's ring: the client mapped it
        stream(pipe, input_sets(300, seed=2), kill)
        assert pipe.stats()["client"]["restarts"] == 3


def test_a_stage_frozen_while_it_holds_slots(paced: PipelineLibrary) -> None:
    """SIGSTOP the middle stage mid-stream: its sender's ring fills, the rest waits on the
    socket's high-water mark; after SIGCONT everything arrives."""
    with PipelineModule(paced, window=16) as pipe:
        middle = next(
            s
            for s in pipe._fleet.stage_sessions()
            if s.stage.kind == "relax" and len(s.stage.inputs) == 1  # negative
        )
        assert middle.remote_pid is not None

        def freeze() -> None:
            time.sleep(0.2)
            os.kill(middle.remote_pid, signal.SIGSTOP)  # type: ignore[arg-type]
            try:
                time.sleep(1.0)
            finally:
                os.kill(middle.remote_pid, signal.SIGCONT)  # type: ignore[arg-type]

        stream(pipe, input_sets(200, seed=3), freeze)
        assert maps_rings(middle.remote_pid)


def test_a_python_stage_that_keeps_every_input() -> None:
    """Its sender's slots never come back: the sender goes on through the socket."""
    lib = paced_pipeline(shape=SHAPE, first=hoard_then_copy)
    try:
        with PipelineModule(lib, window=8) as pipe:
            stream(pipe, input_sets(40, seed=4), lambda: None)
    finally:
        lib.close()
