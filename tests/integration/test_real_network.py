"""A real network through real workers: ONNX's light SqueezeNet with seeded random weights,
split into three stages by split_module, deployed on local workers, every result checked
against the unsplit module compiled in this process."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmpipe.orchestrator import PipelineModule, split_module

from .conftest import build

pytest.importorskip("onnx")

from tvmpipe.orchestrator.models import example_input, load_onnx_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CUTS = [42, 82]  # inside fire modules: both expand branches of fire4 and fire7 cross the cuts
N_INPUTS = 4  # ~0.35 s an inference untuned; all four in flight at once


def test_squeezenet_split_in_three_matches_the_unsplit_model() -> None:
    mod = load_onnx_model("light_squeezenet", seed=0)
    inputs = [example_input(mod, seed) for seed in range(N_INPUTS)]
    with tvm.transform.PassContext(opt_level=3):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    params = [p.name for p in mod["main"].params]
    expected = [vm["main"](*(tvm.runtime.tensor(x[n]) for n in params)).numpy() for x in inputs]

    cfg = split_module(mod, CUTS)
    assert len(cfg.modules) == 3
    lib = build(cfg)
    try:
        assert [s.name for s in lib.stages] == ["mod1", "mod2", "mod3"]
        with PipelineModule(lib) as pipe:
            for x in inputs:
                for name, value in x.items():
                    pipe.set_input(name, value)
                pipe.run()
            outs = [pipe.get_output(timeout=60) for _ in inputs]
            assert pipe.get_output() == []
            stats = pipe.stats()["stages"]
        for out, want in zip(outs, expected, strict=True):
            assert len(out) == 1
            assert out[0].shape == want.shape
            np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)
        # the package's stages run in this process give the same numbers
        np.testing.assert_allclose(outs[0][0], lib.run_local(inputs[0])[0], rtol=1e-5, atol=1e-6)
        # different inputs give different outputs: a constant result would not be checked
        assert not np.allclose(outs[0][0], outs[1][0])
        assert all(stats[s]["processed"] == N_INPUTS for s in ("mod1", "mod2", "mod3"))
    finally:
        lib.close()
