"""A stage lost mid-stream: every waiting call raises within seconds, naming the stage."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tvmpipe.orchestrator import PipelineModule
from tvmpipe.orchestrator.library import PipelineLibrary
from tvmpipe.proto.errors import StageLostError

pytestmark = pytest.mark.timeout(120)

DETECTION_LIMIT_S = 3.0


def inputs(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 4)).astype("float32")}


@pytest.mark.parametrize("victim", ["worker", "session"])
def test_killed_worker_fails_waiting_calls_within_three_seconds(
    slow_lib: PipelineLibrary, victim: str
) -> None:
    with PipelineModule(slow_lib) as pipe:
        first = inputs(0)
        np.testing.assert_allclose(pipe.submit(first).result(10)[0], -first["x"] * 2)
        futures = [pipe.submit(inputs(i)) for i in range(1, 6)]  # about 1 s of work in flight
        for name, value in inputs(9).items():
            pipe.set_input(name, value)
        pipe.run()
        session = pipe._fleet.stage_sessions()[1]
        assert session.remote_pid is not None
        victim_pid = (
            pipe._fleet.local_workers[1].process.pid if victim == "worker" else session.remote_pid
        )
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(StageLostError, match="stage 'mod2' is lost"):
            futures[-1].result(DETECTION_LIMIT_S + 2)
        detected = time.monotonic() - killed
        with pytest.raises(StageLostError, match="mod2"):
            pipe.get_output(timeout=1)
        with pytest.raises(StageLostError):
            pipe.submit(inputs(10))
        print(f"stage loss ({victim} killed) detected after {detected:.2f} s")
        assert detected < DETECTION_LIMIT_S, f"detected after {detected:.2f} s"
    # close() still stopped everything else: the suite's process check covers the rest.
