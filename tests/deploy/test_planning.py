"""plan_pipeline on real loopback workers: measured, cached, solved, deployed as planned."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmpipe.orchestrator import PipelineModule, build_pipeline
from tvmpipe.orchestrator.plan import plan_pipeline

pytestmark = pytest.mark.timeout(300)


def _matmul_chain(n: int, size: int = 64) -> tvm.IRModule:
    """main(x) = tanh(... tanh(x @ W1) ... @ Wn): n pieces of equal work."""
    rng = np.random.default_rng(0)
    x = relax.Var("x", relax.TensorType((size, size), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            value: relax.Expr = x
            for _ in range(n):
                w = relax.const(rng.standard_normal((size, size)).astype("float32") / size)
                value = bb.emit(relax.op.tanh(bb.emit(relax.op.matmul(value, w))))
            out = bb.emit_output(value)
        bb.emit_func_output(out)
    return bb.get()


def test_a_plan_measured_on_local_workers_runs_as_planned(tmp_path: Path) -> None:
    mod = _matmul_chain(8)
    started = time.monotonic()
    plan = plan_pipeline(mod, max_stages=2, segments=8, cache=tmp_path / "cache")
    first = time.monotonic() - started
    print(plan)
    assert plan.measured["cached"] == {"local": False}
    assert len(plan.solution.stages) == 2 and len(plan.cuts) == 1
    assert all(s.compute_s > 0 for s in plan.solution.stages)
    whole = plan.measured["stage_full_speed"]  # each planned stage built whole, timed there
    assert len(whole) == 2 and all(t > 0 for t in whole)
    assert plan.stage_times_s() == whole
    for stage, t in zip(plan.solution.stages, whole, strict=True):
        assert 0.3 < t / stage.compute_s < 3, (whole, plan.solution.describe())
    assert list((tmp_path / "cache").glob("*.json")), "nothing was cached"
    started = time.monotonic()
    again = plan_pipeline(mod, max_stages=2, segments=8, cache=tmp_path / "cache")
    print(f"first plan {first:.1f} s, second (cached) {time.monotonic() - started:.1f} s")
    assert again.measured["cached"] == {"local": True}
    assert again.cuts == plan.cuts

    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(plan.config)
    try:
        x = np.random.default_rng(1).standard_normal((64, 64)).astype("float32")
        with PipelineModule(lib, plan=plan) as pipe:
            out = pipe.submit({"x": x}).result(60)[0]
            assert len(pipe.stats()["stages"]) == 2
        np.testing.assert_allclose(out, lib.run_local({"x": x})[0], rtol=1e-5, atol=1e-6)
    finally:
        lib.close()


def test_tvmpipe_plan_on_an_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tvmpipe plan MODEL.onnx``: measured on local workers, printed, written to a file."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    nodes, inits, name = [], [], "x"
    for k in range(4):
        w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype("float32"), f"w{k}")
        inits.append(w)
        nodes += [helper.make_node("MatMul", [name, f"w{k}"], [f"m{k}"])]
        nodes += [helper.make_node("Tanh", [f"m{k}"], [f"t{k}"])]
        name = f"t{k}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 32])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [32, 32])],
        inits,
    )
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))

    from tvmpipe.orchestrator.cli import main

    argv = ["plan", str(path), "--max-stages", "2", "--segments", "4"]
    argv += ["--cache", str(tmp_path / "cache"), "--cluster-out", str(tmp_path / "c.toml")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    print(out)
    assert "bottleneck" in out and "predicted" in out and "local#" in out
    assert (tmp_path / "c.toml").is_file()

    assert main(["plan", str(tmp_path / "missing.onnx"), "--max-stages", "2"]) == 1
    assert capsys.readouterr().err.startswith("tvmpipe plan: ")
