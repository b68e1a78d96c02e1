"""The planner's solver: the same optimum as brute force on small random instances, its own
bookkeeping consistent, the edge cases (one device, one stage, nothing fits, a slow link, a fast
kind) and a ResNet50-sized module planned in seconds."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from tvmpipe.orchestrator.planner import (
    CLIENT,
    Costs,
    Device,
    Link,
    PlanError,
    Solution,
    brute_force,
    solve,
)

FAST = Link(bandwidth=1e12, latency=0.0)


def _all_links(names: list[str], link: Link = FAST) -> dict[tuple[str, str], Link]:
    every = [CLIENT, *names]
    return {(a, b): link for a in every for b in every if a != b}


def _costs(
    compute: dict[str, list[float]],
    *,
    names: list[str],
    weights: list[int] | None = None,
    cut: int = 0,
) -> Costs:
    g = len(next(iter(compute.values())))
    return Costs(
        compute=compute,
        cut_bytes=[cut] * (g + 1),
        weights=weights if weights is not None else [0] * g,
        activations=[0] * g,
        links=_all_links(names),
    )


def check_consistent(sol: Solution, costs: Costs, devices: list[Device], max_stages: int) -> None:
    """Recompute everything a Solution claims from its stages alone."""
    g = len(costs.weights)
    assert 1 <= len(sol.stages) <= max_stages
    assert [s.first for s in sol.stages] == [0] + [s.last for s in sol.stages[:-1]]
    assert sol.stages[-1].last == g and all(s.first < s.last for s in sol.stages)
    assert len({s.device.name for s in sol.stages}) == len(sol.stages)
    assert all(s.device in devices for s in sol.stages)
    src = CLIENT
    times = []
    for s in sol.stages:
        link = costs.links[(src, s.device.name)]
        compute = math.fsum(costs.compute[s.device.kind][s.first : s.last])
        memory = sum(costs.weights[s.first : s.last]) + max(costs.activations[s.first : s.last])
        assert s.compute_s == pytest.approx(compute, rel=1e-12, abs=1e-300)
        assert s.transfer_in_s == costs.cut_bytes[s.first] / link.bandwidth + link.latency
        assert s.memory_bytes == memory <= s.device.memory_bytes
        times += [s.compute_s, s.transfer_in_s]
        src = s.device.name
    out = costs.links[(src, CLIENT)]
    assert sol.transfer_out_s == costs.cut_bytes[g] / out.bandwidth + out.latency
    assert sol.bottleneck_s == max([*times, sol.transfer_out_s])
    assert sol.bottleneck() != "nothing"


def random_instance(rng: np.random.Generator, exact: bool) -> tuple[Costs, list[Device], int]:
    """G <= 7, up to 4 devices of 2 kinds, memory that sometimes excludes devices, some slow or
    missing links. ``exact``: integer times and power-of-two bandwidths, so ties are exact."""
    g = int(rng.integers(1, 8))
    n = int(rng.integers(1, 5))
    kinds = ["big", "little"]

    def times(scale: float) -> list[float]:
        if exact:
            return [float(t) for t in rng.integers(0, 10, size=g)]
        return list(rng.uniform(0, scale, size=g))

    compute = {"big": times(1.0), "little": times(3.0)}
    weights = [int(w) for w in rng.integers(0, 100, size=g)]
    activations = [int(a) for a in rng.integers(0, 50, size=g)]
    need = max(w + a for w, a in zip(weights, activations, strict=True))
    total = sum(weights) + max(activations)

    def memory() -> int:  # a quarter of the devices may be too small for some segment
        low = need // 2 if rng.random() < 0.25 else need
        return int(rng.integers(low, 2 * total + 2))

    devices = [
        Device(f"{kinds[i % 2]}#{i}", kinds[int(rng.integers(0, 2))], memory()) for i in range(n)
    ]
    names = [CLIENT] + [d.name for d in devices]
    links = {}
    for a in names:
        for b in names:
            if a == b or rng.random() < 0.1:
                continue
            if exact:
                bw = float(2 ** int(rng.integers(3, 8)))
                links[(a, b)] = Link(bw, float(rng.integers(0, 2)))
            else:
                bw = float(rng.choice([1e1, 1e2, 1e3, 1e4]))  # 1e1: a slow link
                links[(a, b)] = Link(bw, float(rng.uniform(0, 0.5)))
    cut_bytes = [int(c) for c in rng.integers(0, 200, size=g + 1)]
    costs = Costs(compute, cut_bytes, weights, activations, links)
    return costs, devices, int(rng.integers(1, 5))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("exact", [False, True])
def test_same_optimum_as_brute_force_on_random_instances(exact: bool) -> None:
    rng = np.random.default_rng(1234 + exact)
    solved = refused = 0
    for _ in range(400):
        costs, devices, max_stages = random_instance(rng, exact)
        try:
            ref = brute_force(costs, devices, max_stages)
        except PlanError:
            with pytest.raises(PlanError, match="no plan"):
                solve(costs, devices, max_stages)
            refused += 1
            continue
        sol = solve(costs, devices, max_stages)
        assert sol.bottleneck_s == pytest.approx(ref.bottleneck_s, rel=1e-12)
        check_consistent(sol, costs, devices, max_stages)
        check_consistent(ref, costs, devices, max_stages)
        if exact:  # exact ties: both prefer the fewest stages
            assert len(sol.stages) == len(ref.stages)
        solved += 1
    print(f"\n{solved} solved, {refused} with no plan (both agree)")
    assert solved > 250 and refused > 5  # the generator covers both


def test_one_device_and_one_stage() -> None:
    dev = Device("only", "cpu", 1000)
    costs = _costs({"cpu": [1.0, 2.0, 3.0]}, names=["only"])
    sol = solve(costs, [dev], max_stages=4)
    assert [(s.first, s.last, s.device.name) for s in sol.stages] == [(0, 3, "only")]
    assert sol.bottleneck_s == 6.0 and sol.bottleneck() == "stage 1 compute on only"

    two = [Device("a", "cpu", 1000), Device("b", "cpu", 1000)]
    costs = _costs({"cpu": [1.0, 2.0, 3.0]}, names=["a", "b"])
    assert len(solve(costs, two, max_stages=1).stages) == 1
    sol = solve(costs, two, max_stages=2)  # [1, 2] | [3]
    assert [(s.first, s.last) for s in sol.stages] == [(0, 2), (2, 3)] and sol.bottleneck_s == 3.0


def test_equal_cost_prefers_fewer_stages() -> None:
    # The last segment dominates: splitting the rest off gains nothing, so one stage it is.
    devices = [Device("a", "cpu", 1000), Device("b", "cpu", 1000)]
    costs = _costs({"cpu": [0.0, 0.0, 5.0]}, names=["a", "b"])
    sol = solve(costs, devices, max_stages=2)
    assert len(sol.stages) == 1 and sol.bottleneck_s == 5.0


def test_memory_too_small_everywhere_names_the_segment() -> None:
    devices = [Device("a", "cpu", 100), Device("b", "cpu", 150)]
    costs = _costs({"cpu": [1.0, 1.0]}, names=["a", "b"], weights=[50, 200])
    for planner in (solve, brute_force):
        with pytest.raises(PlanError, match=r"segment 1 alone needs 200 bytes.*150 bytes \(b\)"):
            planner(costs, devices, 2)
    assert issubclass(PlanError, ValueError)


def test_memory_needs_more_stages_than_allowed() -> None:
    devices = [Device("a", "cpu", 100), Device("b", "cpu", 100)]
    costs = _costs({"cpu": [1.0, 1.0]}, names=["a", "b"], weights=[80, 80])
    with pytest.raises(PlanError, match=r"at most 1 stage.*the fewest that fit is 2"):
        solve(costs, devices, 1)
    sol = solve(costs, devices, 2)
    assert [s.memory_bytes for s in sol.stages] == [80, 80]


def test_no_link_from_the_client() -> None:
    devices = [Device("a", "cpu", 100)]
    costs = _costs({"cpu": [1.0]}, names=["a"])
    del costs.links[(CLIENT, "a")]
    with pytest.raises(PlanError, match="no device has a link from the client"):
        solve(costs, devices, 1)


def test_a_slow_link_makes_fewer_stages_better() -> None:
    devices = [Device("a", "cpu", 1000), Device("b", "cpu", 1000)]
    costs = _costs({"cpu": [1.0, 1.0, 1.0, 1.0]}, names=["a", "b"], cut=100)
    assert len(solve(costs, devices, 2).stages) == 2  # fast links: split 2 | 2, bottleneck 2 s
    costs.links[("a", "b")] = costs.links[("b", "a")] = Link(bandwidth=10.0, latency=0.0)
    sol = solve(costs, devices, 2)  # the only crossing takes 10 s: stay on one device (4 s)
    assert len(sol.stages) == 1 and sol.bottleneck_s == pytest.approx(4.0)
    costs.links[("a", "b")] = Link(bandwidth=100.0, latency=0.5)  # 1.5 s: splitting wins again
    sol = solve(costs, devices, 2)
    assert [s.device.name for s in sol.stages] == ["a", "b"]
    assert sol.bottleneck_s == 2.0 and sol.stages[1].transfer_in_s == 1.5


def test_the_link_can_be_the_bottleneck() -> None:
    devices = [Device("a", "cpu", 1000)]
    costs = _costs({"cpu": [1.0]}, names=["a"], cut=100)
    costs.links[("a", CLIENT)] = Link(bandwidth=10.0, latency=0.0)
    sol = solve(costs, devices, 1)
    assert sol.bottleneck_s == 10.0 and sol.bottleneck() == "link a -> client"


def test_a_fast_kind_gets_the_heavy_part() -> None:
    devices = [Device("little#1", "little", 1000), Device("big#1", "big", 1000)]
    light, heavy = [1.0, 1.0], [8.0, 8.0, 8.0]
    costs = _costs(
        {"little": [4 * t for t in light + heavy], "big": light + heavy},
        names=[d.name for d in devices],
    )
    sol = solve(costs, devices, 2)
    assert [(s.first, s.last, s.device.name) for s in sol.stages] == [
        (0, 2, "little#1"),
        (2, 5, "big#1"),
    ]
    assert sol.bottleneck_s == 24.0 and sol.bottleneck() == "stage 2 compute on big#1"
    print("\n" + sol.describe())


def _resnet_sized(rng: np.random.Generator, g: int, devices: list[Device]) -> Costs:
    kinds = sorted({d.kind for d in devices})
    base = rng.gamma(0.5, 1e-3, size=g)  # a few heavy convolutions among many cheap bindings
    compute = {k: list(base * (1 + i)) for i, k in enumerate(kinds)}
    names = [d.name for d in devices]
    links = _all_links(names, Link(bandwidth=1e9, latency=1e-4))
    links[(names[0], names[1])] = Link(bandwidth=1e7, latency=1e-3)  # one slow pair
    return Costs(
        compute=compute,
        cut_bytes=[int(c) for c in rng.integers(1, 4 << 20, size=g + 1)],
        weights=[int(w) for w in rng.integers(0, 1 << 20, size=g)],
        activations=[int(a) for a in rng.integers(0, 4 << 20, size=g)],
        links=links,
    )


@pytest.mark.timeout(120)
def test_a_resnet50_sized_module_plans_in_seconds() -> None:
    rng = np.random.default_rng(7)
    devices = [
        Device("big#1", "big", 1 << 30),
        Device("big#2", "big", 1 << 30),
        Device("little#1", "little", 160 << 20),
        Device("little#2", "little", 160 << 20),
    ]
    costs = _resnet_sized(rng, 400, devices)
    start = time.perf_counter()
    sol = solve(costs, devices, max_stages=4)
    took = time.perf_counter() - start
    print(f"\nG=400, 4 devices, max_stages=4: {took:.2f} s\n{sol.describe()}")
    check_consistent(sol, costs, devices, 4)
    assert took < 20


@pytest.mark.timeout(300)
def test_eight_devices_eight_stages_within_bounds() -> None:
    rng = np.random.default_rng(8)
    devices = [Device(f"w#{i}", ["big", "little"][i % 2], 1 << 30) for i in range(8)]
    costs = _resnet_sized(rng, 400, devices)
    start = time.perf_counter()
    sol = solve(costs, devices, max_stages=8)
    took = time.perf_counter() - start
    print(f"\nG=400, 8 devices, max_stages=8: {took:.2f} s, {len(sol.stages)} stages")
    check_consistent(sol, costs, devices, 8)
    assert took < 60
