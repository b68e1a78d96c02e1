"""A Plan from the solver: its table, its configuration, and where it puts the stages."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmpipe.orchestrator.plan import Plan, cuts_from, quota_service_s
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
        measured={"costs": costs},
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


def test_a_stage_within_its_boards_cpu_share_is_predicted_at_full_speed() -> None:
    """The solver plans with sustained times (little has a quarter of a core: 4x its full-speed
    times back to back). little's light stage is not the bottleneck: it idles between inputs,
    and while one input fits in its share of a period it runs at full speed; when one input
    outlasts the share, it is throttled anyway."""
    mod = _chain(6)
    full = {"big": [1.0, 1.0, 1.0, 0.5], "little": [1.0, 1.0, 1.0, 0.5]}
    plan = _plan(mod, [2, 3, 5], LOPSIDED)  # little's sustained times: 4x its full speed
    assert plan.cuts == [5]
    plan.measured.update(full_speed=full, quota={"big": None, "little": (0.25, 10.0)})
    assert plan.stage_times_s() == pytest.approx([3.0, 0.5])
    assert "500.00" in str(plan)  # the table shows what the running stage will measure
    plan.measured["quota"]["little"] = (0.25, 0.1)  # a share of 25 ms: 0.5 s outlasts it
    assert plan.stage_times_s() == pytest.approx([3.0, 2.0], rel=0.1)
    # The data plane's CPU counts against the share: 16 B in at 10 s/B is 160 s of CPU per
    # input, far over a quarter core at this pace: little is the bottleneck, at its share's pace
    plan.measured["quota"]["little"] = (0.25, 10.0)
    plan.measured["data_cpu"] = {"little": (10.0, 0.0)}
    assert plan.stage_times_s() == pytest.approx([3.0, (0.5 + 160.0) / 0.25], rel=0.05)
    assert plan.predicted_rate() == pytest.approx(0.25 / 160.5)


def test_the_quota_model_runs_a_stage_at_full_speed_within_its_share_and_at_its_pace_beyond() -> (
    None
):
    """Linux's CFS bandwidth control, period by period: within the share full speed, beyond it
    the share's pace; close to it, the periods in which two inputs meet are throttled."""
    # 10 ms per input every 100 ms on a 0.5-core board (50 ms per 100 ms): never throttled
    assert quota_service_s(0.010, 0.100, 0.5, 0.1) == pytest.approx(0.010)
    # 80 ms per input, as fast as it can go: two periods' shares per input
    assert quota_service_s(0.080, 0.080, 0.5, 0.1) == pytest.approx(0.160, rel=0.05)
    # 40 ms every 85 ms: 94 % of the share, on average within it, yet some inputs wait
    near = quota_service_s(0.040, 0.085, 0.5, 0.1)
    assert 0.041 < near < 0.080
    assert quota_service_s(0.040, 0.010, 2.0, 0.1) == 0.040  # a whole core or more: no limit


def test_the_stage_that_sets_the_pace_is_predicted_back_to_back_at_its_share() -> None:
    """Measured on simulated boards: a 46 ms stage on half a core was predicted at 67 ms when
    inputs were taken to arrive once per bottleneck interval, and ran at 94 ms: it is the
    bottleneck, so its next input is always waiting and it runs at its share's pace."""
    mod = _chain(6)
    plan = _plan(mod, [2, 3, 5], {"big": [1.0] * 4, "little": [1.0] * 4})
    stages = plan.solution.stages
    little = next(k for k, s in enumerate(stages) if s.device.kind == "little")
    full = {"big": [0.001] * 4, "little": [0.0] * 4}
    full["little"][stages[little].first] = 0.046
    plan.measured.update(full_speed=full, quota={"big": None, "little": (0.5, 0.1)})
    plan.measured["stage_full_speed"] = [0.046 if k == little else 0.010 for k in range(2)]
    times = plan.stage_times_s()
    assert times[little] == pytest.approx(0.092, rel=0.05)
    assert plan.predicted_rate() == pytest.approx(1 / 0.092, rel=0.01)


def test_stages_timed_whole_replace_the_sum_of_their_pieces() -> None:
    """A whole stage is not the sum of its separately compiled pieces; once the planned stages
    are timed as built, their times are what the plan predicts."""
    mod = _chain(6)
    plan = _plan(mod, [2, 3, 5], LOPSIDED)
    assert plan.stage_times_s() == pytest.approx([3.0, 2.0])  # the pieces' sums
    plan.measured["stage_full_speed"] = [3.3, 2.1]
    assert plan.stage_times_s() == pytest.approx([3.3, 2.1])
    assert plan.predicted_rate() == pytest.approx(1 / 3.3)
    # on a quota board the whole stage's full-speed time is what its share paces
    plan.measured.update(
        full_speed={"big": [1.0, 1.0, 1.0, 0.5], "little": [1.0, 1.0, 1.0, 0.5]},
        quota={"big": None, "little": (0.25, 0.1)},
    )
    plan.measured["stage_full_speed"] = [3.0, 0.6]
    assert plan.stage_times_s()[1] == pytest.approx(0.6 / 0.25, rel=0.05)


def test_the_quota_model_handles_short_periods_and_long_stages_at_once() -> None:
    """A ResNet-50 stage of seconds on a board with 10 ms periods: hundreds of periods per
    input (working the period out from the time stalled on rounding), and the same paces."""
    import time

    started = time.perf_counter()
    assert quota_service_s(2.0, 0.0, 0.3, 0.01) == pytest.approx(2.0 / 0.3, rel=0.01)
    assert quota_service_s(2.0, 20.0, 0.3, 0.01) == pytest.approx(2.0 / 0.3, rel=0.01)
    assert quota_service_s(0.001, 0.05, 0.3, 0.01) == pytest.approx(0.001)
    assert quota_service_s(0.046, 0.0, 0.5, 0.01) == pytest.approx(0.092, rel=0.02)
    assert time.perf_counter() - started < 5
