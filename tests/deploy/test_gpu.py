"""The RFC's heterogeneous case: a CUDA stage between two CPU stages (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from modules import binary_module, unary_module

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig, build_pipeline


def _has_cuda() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not _has_cuda(), reason="no CUDA GPU on this machine"),
]


def test_cuda_stage_between_two_cpu_stages() -> None:
    first, middle, last = unary_module("exp"), binary_module("multiply"), unary_module("negative")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.inputs["y"] = (middle, "data_1")
    cfg.connect(first, 0, middle, "data_0")
    cfg.connect(middle, 0, last, "data_0")
    cfg.outputs.append((last, 0))
    cfg[middle].target = "cuda"
    cfg[middle].device = "cuda"
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg)
    rng = np.random.default_rng(0)
    sets = [(rng.standard_normal((1, 4)).astype("float32"),) * 2 for _ in range(20)]
    try:
        with PipelineModule(lib) as pipe:
            outs = list(pipe.map({"x": x, "y": y} for x, y in sets))
            devices = {name: s["device"] for name, s in pipe.stats()["stages"].items()}
        for (x, y), out in zip(sets, outs, strict=True):
            np.testing.assert_allclose(out[0], -(np.exp(x) * y), rtol=1e-5)
        assert devices == {"mod1": "cpu", "mod2": "cuda", "mod3": "cpu"}
    finally:
        lib.close()
