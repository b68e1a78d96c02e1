"""A real 3-stage pipeline with trace=True: Chrome trace JSON with one event per input, per
stage and per phase, clocks aligned, and the Gantt chart's PNG beside it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tvm
from modules import unary_module

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.library import PipelineLibrary
from tvmpipe.orchestrator.trace import busiest_stage, write_trace
from tvmpipe.proto.errors import PipelineError

from .stages import slow_double

pytestmark = pytest.mark.timeout(120)
INPUTS = 10


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    """mod1 (Relax) -> mod2 (Python, 0.2 s: the bottleneck) -> mod3 (Relax)."""
    first, last = unary_module("negative"), unary_module("negative")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, slow_double, "data")
    cfg.connect(slow_double, 0, last, "data_0")
    cfg.outputs.append((last, 0))
    with tvm.transform.PassContext(opt_level=3):
        built = build_pipeline(cfg)
    yield built
    built.close()


@pytest.fixture(scope="module")
def fonts_loaded(tmp_path_factory: pytest.TempPathFactory) -> None:
    """matplotlib keeps the font files it has opened for the life of the process: open them
    before the per-test check for leaked file descriptors takes its snapshot."""
    record = {"seq": 0, "epoch": 0, "first_part": 1.0, "complete": 1.0, "start": 1.0}
    client = [{"seq": 0, "send_start": 1.0, "send_end": 1.0, "result": 2.0}]
    stages = {"s": [{**record, "end": 1.5, "sent": 1.6}]}
    write_trace(tmp_path_factory.mktemp("fonts") / "warm.json", stages, client)


def test_trace_of_a_real_pipeline(lib: PipelineLibrary, tmp_path: Path, fonts_loaded: None) -> None:
    with PipelineModule(lib, trace=True) as pipe:
        xs = [np.full((1, 4), float(i), "float32") for i in range(INPUTS)]
        outs = list(pipe.map({"x": x} for x in xs))
        json_path, png_path = pipe.write_trace(tmp_path / "run.json")
        stages = pipe._fleet.traces()
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out[0], 2 * x)
    events = json.loads(json_path.read_text())["traceEvents"]
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e["name"] == "process_name"
    }
    assert set(names.values()) == {"client", "mod1", "mod2", "mod3"}
    counts = Counter(
        (names[e["pid"]], e["name"].split(" #")[0]) for e in events if e.get("ph") in ("X", "i")
    )
    for stage in ("mod1", "mod2", "mod3"):
        for phase in ("wait", "queued", "compute", "send"):
            assert counts[(stage, phase)] == INPUTS, (stage, phase, counts)
    assert counts[("client", "send")] == INPUTS and counts[("client", "result")] == INPUTS
    # clocks aligned: each input is computed by mod1 before mod2, and mod2 before mod3
    start = {
        (names[e["pid"]], e["args"]["seq"]): e["ts"]
        for e in events
        if e.get("ph") == "X" and e["name"].startswith("compute")
    }
    for seq in range(INPUTS):
        assert start[("mod1", seq)] <= start[("mod2", seq)] <= start[("mod3", seq)]
    assert busiest_stage(stages) == "mod2"
    assert png_path is not None and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_trace_needs_trace_on(lib: PipelineLibrary, tmp_path: Path) -> None:
    with PipelineModule(lib) as pipe, pytest.raises(PipelineError, match="trace=True"):
        pipe.write_trace(tmp_path / "run.json")
