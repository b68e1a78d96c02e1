"""No silent stall: an input whose result does not come fails with ResultTimeoutError, naming
the stage where it stopped, within result_timeout (plus the quarter-second check)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import tvm
from modules import unary_module

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.library import PipelineLibrary
from tvmpipe.proto.errors import ResultTimeoutError

from .stages import stuck_on_negative

pytestmark = pytest.mark.timeout(120)

RESULT_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    """mod1 (Relax, negates) -> mod2 (a Python stage stuck for 6 s on some inputs)."""
    first = unary_module("negative")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, stuck_on_negative, "data")
    cfg.outputs.append((stuck_on_negative, 0))
    with tvm.transform.PassContext(opt_level=3):
        built = build_pipeline(cfg)
    yield built
    built.close()


def test_a_late_result_fails_naming_the_stage(lib: PipelineLibrary) -> None:
    with PipelineModule(lib, result_timeout=RESULT_TIMEOUT_S) as pipe:
        ok = np.ones((1, 4), "float32")
        np.testing.assert_allclose(pipe.submit({"x": ok}).result(30)[0], -ok * 2)
        started = time.monotonic()
        stuck = pipe.submit({"x": np.full((1, 4), 100.0, "float32")})  # mod2 gets -400
        with pytest.raises(ResultTimeoutError) as caught:
            stuck.result(30)
        waited = time.monotonic() - started
        print(f"late result reported after {waited:.2f} s: {caught.value}")
        assert caught.value.stage == "mod2"
        assert "input #1" in str(caught.value) and "computing" in str(caught.value)
        assert waited < RESULT_TIMEOUT_S + 3.0
        assert pipe.stats()["client"]["failed"] == 1
