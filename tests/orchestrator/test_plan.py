"""A Plan from the solver: its table, its configuration, and where it puts the stages."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmpipe.orchestrator.plan import Plan, cuts_from
from tvmpipe.orchestrator.planner import Costs, Device, Link, solve

pytestmark = pytest.mark.timeout(120)


def _chain(n: int) -> tvm.IRModule:
    """main(x) = x + 1 + 2 + ... + n, one binding each."""
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            value: relax.Expr = x
            for k in range(1, n + 1):
                value = bb.emit(relax.op.add(value, relax.const(float(k), "float32")))
            out = bb.emit_output(value)
        bb.emit_func_output(out)
    return bb.get()


LOPSIDED = {"big": [1.0, 1.0, 1.0, 0.5], "little": [4.0, 4.0, 4.0, 2.0]}


def _plan(mod: tvm.IRModule, boundaries: list[int], compute: dict[str, list[float]]) -> Plan:
    devices = [Device("fast", "big", 1 << 30), Device("slow", "little", 1 << 30)]
    segments = len(boundaries) + 1
    fast = Link(1e9, 1e-5)
    links = {(a, b): fast for a in ("client", "fast", "slow") for b in ("client", "fast", "slow")}
    costs = Costs(compute, [16] * (segments + 1), [0] * segments, [16] * segments, links)
    solution = solve(costs, devices, max_stages=2)
    return Plan(
        mod=mod,
        cuts=cuts_from(boundaries, solution),
        boundaries=boundaries,
        solution=solution,
        targets={"big": "llvm", "little": "llvm"},
        where={"fast": {"server": "127.0.0.1:9001"}, "slow": {"server": "127.0.0.1:9002"}},
    )


def test_the_fast_kind_gets_the_heavy_part_and_the_table_says_so() -> None:
    mod = _chain(6)
    # four segments split at bindings 2, 3 and 5; the little board is 4x slower, the last
    # segment light
    plan = _plan(mod, [2, 3, 5], LOPSIDED)
    assert plan.cuts == [5]  # big takes three segments (3 s), little the light one (2 s)
    assert [d.name for d in plan.devices] == ["fast", "slow"]
    table = str(plan)
    print(table)
    assert "mod1" in table and "mod2" in table and "fast" in table and "slow" in table
    assert "predicted" in table and "3000.00" in table


def test_the_config_is_cut_where_the_plan_says_and_runs_like_the_model(tmp_path: Path) -> None:
    mod = _chain(6)
    plan = _plan(mod, [2, 3, 5], LOPSIDED)
    cfg = plan.config
    assert len(cfg.modules) == 2
    with tvm.transform.PassContext(opt_level=3):
        from tvmpipe.orchestrator import build_pipeline

        lib = build_pipeline(cfg)
    try:
        x = np.zeros((1, 4), "float32")
        np.testing.assert_allclose(lib.run_local({"x": x})[0], x + 21)
    finally:
        lib.close()
    assert plan.placement() == {"servers": ["127.0.0.1:9001", "127.0.0.1:9002"]}
    written = tomllib.loads(plan.write_cluster(tmp_path / "cluster.toml").read_text())
    assert written["stages"]["mod1"]["server"] == "127.0.0.1:9001"
    assert written["stages"]["mod2"]["server"] == "127.0.0.1:9002"
