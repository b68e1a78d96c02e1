"""A stage lost mid-stream: every waiting call raises within seconds, naming the stage."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tvm
from modules import rfc_example_modules, wire_rfc_example

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.library import PipelineLibrary
from tvmpipe.proto.errors import StageLostError

pytestmark = pytest.mark.timeout(120)

DETECTION_LIMIT_S = 3.0


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, mod1, mod2, mod3)
    with tvm.transform.PassContext(opt_level=3):
        built = build_pipeline(cfg)
    yield built
    built.close()


def inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"data_{i}": rng.standard_normal((1, 4)).astype("float32") for i in range(3)}


@pytest.mark.parametrize("victim", ["worker", "session"])
def test_killed_worker_fails_waiting_calls_within_three_seconds(
    lib: PipelineLibrary, victim: str
) -> None:
    with PipelineModule(lib) as pipe:
        done = pipe.submit(inputs(0)).result(10)
        assert len(done) == 1
        session = pipe._sessions[1]
        if victim == "worker":
            os.kill(pipe._local_workers[1].process.pid, signal.SIGKILL)
        else:
            assert session.remote_pid is not None
            os.kill(session.remote_pid, signal.SIGKILL)
        killed = time.monotonic()
        future = pipe.submit(inputs(1))
        for name, value in inputs(2).items():
            pipe.set_input(name, value)
        pipe.run()
        with pytest.raises(StageLostError, match="stage 'mod2' is lost"):
            future.result(DETECTION_LIMIT_S + 2)
        detected = time.monotonic() - killed
        with pytest.raises(StageLostError, match="mod2"):
            pipe.get_output(timeout=1)
        with pytest.raises(StageLostError):
            pipe.submit(inputs(3))
        print(f"stage loss ({victim} killed) detected after {detected:.2f} s")
        assert detected < DETECTION_LIMIT_S, f"detected after {detected:.2f} s"
    # close() still stopped everything else: the suite's process check covers the rest.
