"""pipe.report(): busy, waiting and blocked shares per stage, and the bottleneck named."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tvmpipe.orchestrator import PipelineModule
from tvmpipe.orchestrator.library import PipelineLibrary

pytestmark = pytest.mark.timeout(120)


def _x(i: int) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), float(i), "float32")}


def test_the_slow_stage_is_named_the_bottleneck(slow_lib: PipelineLibrary) -> None:
    with PipelineModule(slow_lib) as pipe:
        pipe.report(show=False)  # the interval starts here
        outputs = list(pipe.map(_x(i) for i in range(12)))
        text = pipe.report()
    assert [float(o[0][0, 0]) for o in outputs] == [-2.0 * i for i in range(12)]
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["stage", "worker", "inputs", "busy", "waiting", "blocked"]
    mod2 = next(line.split() for line in lines if line.startswith("mod2"))
    assert mod2[2] == "12" and int(mod2[3].rstrip("%")) >= 60  # computing most of the time
    assert "bottleneck: stage 'mod2'" in text and "compute-bound" in text


def test_a_starved_pipeline_blames_its_inputs(slow_lib: PipelineLibrary) -> None:
    with PipelineModule(slow_lib) as pipe:
        pipe.report(show=False)
        for i in range(3):  # one input at a time, with pauses: the stages mostly wait
            pipe.submit(_x(i)).result(30)
            time.sleep(0.4)
        text = pipe.report()
    assert "bottleneck: the inputs" in text, text
