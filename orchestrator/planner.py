"""The planner's solver: how many stages, where to cut and which worker runs each stage.

The model: ``main`` is G segments in order. A plan groups them into 1..max_stages consecutive,
non-empty stages, each on its own device, each within its device's memory (the weights of its
segments plus the largest activation among them). A pipeline's throughput is set by its slowest
part, so the cost of a plan is the largest of every stage's compute time and every crossing's
transfer time (client -> first stage, stage -> next stage, last stage -> client). ``solve``
finds a plan of least cost, and among those one with the fewest stages.

How ``solve`` is exact and fast: the optimum is one of finitely many values (a range's compute
sum on a kind, or a crossing's transfer time), and whether a plan of cost <= T exists is
monotone in T, so a binary search over the sorted candidates needs ~20 feasibility checks. A
check is a reachability over (set of devices used, last device, boundary reached); because
compute and memory only grow as a stage extends, the stages that may start at boundary i on a
device end anywhere in i+1..hi[i], so a running maximum over the allowed starts gives every
reachable end at once (numpy over the G boundaries). ``brute_force`` enumerates every plan; the
tests hold the two to the same optimum.

Pure Python and numpy: no TVM, no sockets.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tvmpipe.proto.errors import ConfigError

CLIENT = "client"


class PlanError(ConfigError):
    """No plan fits (memory, links, the stage limit), or the costs given cannot be planned."""


@dataclass(frozen=True)
class Device:
    name: str  # how a plan names the worker: "127.0.0.1:9091", "big#1", ...
    kind: str  # its kind (tracker key, or "local"): compute costs are per kind
    memory_bytes: int  # what a stage may use on it


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes per second
    latency: float  # seconds


@dataclass
class Costs:
    """What the solver knows of a model, its devices and the links between them.

    ``cut_bytes[g]`` crosses boundary g (before segment g): [0] is the pipeline's inputs (client
    -> first stage), [G] its outputs (last stage -> client). ``links`` misses a pair that cannot
    talk; ``"client"`` is the controller.
    """

    compute: dict[str, list[float]]  # kind -> seconds of each of the G segments, in order
    cut_bytes: list[int]  # G + 1 entries: bytes crossing each boundary
    weights: list[int]  # G entries: bytes of constants each segment holds
    activations: list[int]  # G entries: the largest tensor bytes live inside each segment
    links: dict[tuple[str, str], Link]  # (from name, to name) -> link


@dataclass
class StagePlan:
    first: int  # first segment (inclusive)
    last: int  # last segment (exclusive)
    device: Device
    compute_s: float  # its segments' compute on the device's kind
    transfer_in_s: float  # boundary `first` from the previous stage's device (or the client)
    memory_bytes: int  # sum(weights[first:last]) + max(activations[first:last])


@dataclass
class Solution:
    stages: list[StagePlan]
    transfer_out_s: float  # last stage -> client
    bottleneck_s: float  # max over every compute_s, transfer_in_s and transfer_out_s

    def bottleneck(self) -> str:
        """Which part sets the throughput, e.g. "stage 2 compute on big#1" (stages count from 1)."""
        for k, s in enumerate(self.stages, 1):
            if s.compute_s == self.bottleneck_s:
                return f"stage {k} compute on {s.device.name}"
        names = [CLIENT] + [s.device.name for s in self.stages] + [CLIENT]
        times = [s.transfer_in_s for s in self.stages] + [self.transfer_out_s]
        for k, t in enumerate(times):
            if t == self.bottleneck_s:
                return f"link {names[k]} -> {names[k + 1]}"
        return "nothing"  # unreachable for a Solution made here

    def describe(self) -> str:
        """A small table of the plan, for logs and the command line."""
        lines = [f"{len(self.stages)} stage(s), bottleneck {self.bottleneck_s:.6g} s: "]
        lines[0] += self.bottleneck()
        for k, s in enumerate(self.stages, 1):
            lines.append(
                f"  stage {k}: segments [{s.first}:{s.last}) on {s.device.name} ({s.device.kind})"
                f"  in {s.transfer_in_s:.6g} s  compute {s.compute_s:.6g} s"
                f"  memory {s.memory_bytes}/{s.device.memory_bytes} B"
            )
        lines.append(f"  out to {CLIENT}: {self.transfer_out_s:.6g} s")
        return "\n".join(lines)


def _link_time(costs: Costs, src: str, dst: str, nbytes: int) -> float:
    link = costs.links.get((src, dst))
    return math.inf if link is None else nbytes / link.bandwidth + link.latency


def _validate(costs: Costs, devices: Sequence[Device], max_stages: int) -> int:
    """Refuse malformed input up front, so the solver's monotonicity assumptions hold."""
    g = len(costs.weights)
    if g < 1:
        raise PlanError("the model has no segments to plan")
    if len(costs.activations) != g or len(costs.cut_bytes) != g + 1:
        raise PlanError(
            f"{g} segments need {g} activations and {g + 1} cut_bytes, got "
            f"{len(costs.activations)} and {len(costs.cut_bytes)}"
        )
    if max_stages < 1:
        raise PlanError(f"max_stages must be at least 1, got {max_stages}")
    if not devices:
        raise PlanError("no devices to plan on")
    names = [d.name for d in devices]
    if len(set(names)) != len(names) or CLIENT in names:
        raise PlanError(f"device names must be distinct and not {CLIENT!r}: {names}")
    for d in devices:
        times = costs.compute.get(d.kind)
        if times is None:
            raise PlanError(f"no compute costs for kind {d.kind!r} (device {d.name})")
        if len(times) != g or not all(math.isfinite(t) and t >= 0 for t in times):
            raise PlanError(f"kind {d.kind!r} needs {g} finite, non-negative compute times")
        if d.memory_bytes < 0:
            raise PlanError(f"device {d.name} has negative memory {d.memory_bytes}")
    if min(costs.weights + costs.activations + costs.cut_bytes) < 0:
        raise PlanError("weights, activations and cut_bytes must be non-negative")
    for pair, link in costs.links.items():
        if not (link.bandwidth > 0 and link.latency >= 0 and math.isfinite(link.latency)):
            raise PlanError(f"link {pair[0]} -> {pair[1]} needs bandwidth > 0, latency >= 0")
    return g


def _range_table(values: np.ndarray, op: np.ufunc) -> np.ndarray:
    """t[i, j] = op over values[i:j] accumulated left to right (0 where j <= i); shape (G, G+1).

    Accumulating each row from its own start (not prefix differences) keeps every row
    non-decreasing in j even in floating point, which the reachability relies on.
    """
    g = len(values)
    a = np.zeros((g, g + 1), dtype=values.dtype)
    j = np.arange(g + 1)
    take = j[None, :] > np.arange(g)[:, None]
    a[take] = np.broadcast_to(values[np.maximum(j - 1, 0)], (g, g + 1))[take]
    return op.accumulate(a, axis=1)


class _Tables:
    """Everything a feasibility check needs, computed once per solve."""

    def __init__(self, costs: Costs, devices: Sequence[Device]) -> None:
        self.g = g = len(costs.weights)
        self.devices = list(devices)
        self.compute = {
            d.kind: _range_table(np.asarray(costs.compute[d.kind], dtype=np.float64), np.add)
            for d in devices
        }
        self.memory = _range_table(np.asarray(costs.weights, dtype=np.int64), np.add)
        self.memory += _range_table(np.asarray(costs.activations, dtype=np.int64), np.maximum)
        # The last boundary a stage starting at i may reach within each device's memory.
        self.hi_mem = [(self.memory <= d.memory_bytes).sum(axis=1) - 1 for d in devices]
        cut = np.asarray(costs.cut_bytes, dtype=np.float64)
        n = len(devices)
        self.t_in = np.array(
            [_link_time(costs, CLIENT, d.name, costs.cut_bytes[0]) for d in devices]
        )
        self.t_out = np.array(
            [_link_time(costs, d.name, CLIENT, costs.cut_bytes[g]) for d in devices]
        )
        self.t_cross = np.full((n, n, g + 1), math.inf)
        for a, da in enumerate(devices):
            for b, db in enumerate(devices):
                link = costs.links.get((da.name, db.name))
                if a != b and link is not None:
                    self.t_cross[a, b] = cut / link.bandwidth + link.latency

    def candidates(self) -> np.ndarray:
        """Every value the optimum can take, sorted: range compute sums and transfer times."""
        upper = np.arange(self.g + 1)[None, :] > np.arange(self.g)[:, None]
        parts = [c[upper] for c in self.compute.values()]
        parts += [self.t_in, self.t_out, self.t_cross[:, :, 1 : self.g].ravel()]
        values = np.concatenate(parts)
        return np.unique(values[np.isfinite(values)])

    def reach(
        self, limit: float, max_stages: int
    ) -> tuple[list[dict[tuple[int, int], np.ndarray]], tuple[int, int], list[np.ndarray]] | None:
        """Is there a plan of cost <= limit? Layers of reachable ends, the finish, the hi arrays.

        layers[k][(mask, d)][j]: stages 1..k+1 can cover segments [0:j) on the devices in mask,
        the last on d, with every compute and crossing so far <= limit. The finish is the first
        (fewest stages) state that reaches G and can send the outputs to the client in time.
        """
        g, n = self.g, len(self.devices)
        hi_kind = {k: (c <= limit).sum(axis=1) - 1 for k, c in self.compute.items()}
        hi = [np.minimum(self.hi_mem[d], hi_kind[dev.kind]) for d, dev in enumerate(self.devices)]
        cross_ok = self.t_cross[:, :, :g] <= limit
        ends = np.arange(1, g + 1)
        layer: dict[tuple[int, int], np.ndarray] = {}
        for d in range(n):
            if self.t_in[d] <= limit and hi[d][0] >= 1:
                r = np.zeros(g + 1, dtype=bool)
                r[1 : hi[d][0] + 1] = True
                layer[(1 << d, d)] = r
        layers = [layer]
        for k in range(min(max_stages, n)):
            for (mask, d), r in sorted(layer.items()):
                if r[g] and self.t_out[d] <= limit:
                    return layers, (mask, d), hi
            if k + 1 == min(max_stages, n):
                break
            by_mask: dict[int, list[int]] = {}
            for mask, d in layer:
                by_mask.setdefault(mask, []).append(d)
            nxt: dict[tuple[int, int], np.ndarray] = {}
            for mask, lasts in sorted(by_mask.items()):
                for e in range(n):
                    if mask & (1 << e):
                        continue
                    starts = np.zeros(g, dtype=bool)
                    for d in lasts:
                        starts |= layer[(mask, d)][:g] & cross_ok[d, e]
                    if not starts.any():
                        continue
                    furthest = np.maximum.accumulate(np.where(starts, hi[e], -1))
                    r = np.zeros(g + 1, dtype=bool)
                    r[1:] = furthest >= ends
                    if r.any():
                        nxt[(mask | (1 << e), e)] = r
            layer = nxt
            layers.append(layer)
            if not layer:
                break
        return None

    def plan(self, limit: float, max_stages: int) -> Solution | None:
        """The fewest-stage plan of cost <= limit, walked back from the reachability, or None."""
        found = self.reach(limit, max_stages)
        if found is None:
            return None
        layers, (mask, d), hi = found
        cross_ok = self.t_cross <= limit
        spans: list[tuple[int, int, int]] = []
        j = self.g
        k = len(layers) - 1  # the finish is in the last layer
        while k > 0:
            prev_mask = mask & ~(1 << d)
            for p in range(len(self.devices)):
                r = layers[k - 1].get((prev_mask, p))
                if r is None:
                    continue
                ok = np.flatnonzero(r[:j] & cross_ok[p, d, :j] & (hi[d][:j] >= j))
                if ok.size:
                    spans.append((int(ok[0]), j, d))
                    mask, d, j = prev_mask, p, int(ok[0])
                    break
            else:  # pragma: no cover - the layers say a predecessor exists
                raise AssertionError("planner: no predecessor while walking back")
            k -= 1
        spans.append((0, j, d))
        return self._solution(spans[::-1])

    def _solution(self, spans: list[tuple[int, int, int]]) -> Solution:
        stages = []
        for k, (first, last, d) in enumerate(spans):
            dev = self.devices[d]
            t_in = self.t_in[d] if k == 0 else self.t_cross[spans[k - 1][2], d, first]
            stages.append(
                StagePlan(
                    first=first,
                    last=last,
                    device=dev,
                    compute_s=float(self.compute[dev.kind][first, last]),
                    transfer_in_s=float(t_in),
                    memory_bytes=int(self.memory[first, last]),
                )
            )
        t_out = float(self.t_out[spans[-1][2]])
        worst = max([t_out] + [max(s.compute_s, s.transfer_in_s) for s in stages])
        return Solution(stages=stages, transfer_out_s=t_out, bottleneck_s=worst)


def _no_plan_message(costs: Costs, devices: Sequence[Device], max_stages: int) -> str:
    """Say what does not fit: a segment no memory holds, a missing link, or the stage limit."""
    big = max(devices, key=lambda d: d.memory_bytes)
    for g, (w, a) in enumerate(zip(costs.weights, costs.activations, strict=True)):
        if w + a > big.memory_bytes:
            return (
                f"no plan fits: segment {g} alone needs {w + a} bytes (weights {w} + activation "
                f"{a}) but the largest device memory is {big.memory_bytes} bytes ({big.name})"
            )
    if not any((CLIENT, d.name) in costs.links for d in devices):
        return f"no plan fits: no device has a link from the {CLIENT}"
    if not any((d.name, CLIENT) in costs.links for d in devices):
        return f"no plan fits: no device has a link to the {CLIENT}"
    tables = _Tables(costs, devices)
    values = tables.candidates()
    more = tables.reach(float(values[-1]), len(devices)) if values.size else None
    if more is not None:
        need = len(more[0])
        return (
            f"no plan of at most {max_stages} stage(s) fits in the devices' memory and links: "
            f"the fewest that fit is {need} (total weights {sum(costs.weights)} bytes)"
        )
    return (
        f"no plan fits on these {len(devices)} device(s): every grouping either puts a stage on a "
        f"device without the memory for it (total weights {sum(costs.weights)} bytes, largest "
        f"memory {big.memory_bytes} bytes on {big.name}) or needs a link that does not exist"
    )


def solve(costs: Costs, devices: Sequence[Device], max_stages: int) -> Solution:
    """The plan of least bottleneck (then fewest stages), exactly, by binary search on its cost.

    Raises PlanError (a ValueError) naming what does not fit when no plan exists.
    """
    _validate(costs, devices, max_stages)
    tables = _Tables(costs, devices)
    values = tables.candidates()
    # Every plan's cost is one of the values (inf, a missing link, is not among them), so the
    # largest one admits every plan: if it admits none, there is none.
    if not values.size or tables.reach(float(values[-1]), max_stages) is None:
        raise PlanError(_no_plan_message(costs, devices, max_stages))
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if tables.reach(float(values[mid]), max_stages) is not None:
            hi = mid
        else:
            lo = mid + 1
    best = tables.plan(float(values[lo]), max_stages)
    assert best is not None
    return best


def brute_force(costs: Costs, devices: Sequence[Device], max_stages: int) -> Solution:
    """Every plan, costed directly: the reference ``solve`` is tested against (tiny G only)."""
    g = _validate(costs, devices, max_stages)
    best: Solution | None = None
    for k in range(1, min(max_stages, len(devices), g) + 1):
        for cuts in itertools.combinations(range(1, g), k - 1):
            bounds = (0, *cuts, g)
            for order in itertools.permutations(devices, k):
                stages = []
                src = CLIENT
                for first, last, dev in zip(bounds, bounds[1:], order, strict=False):
                    mem = sum(costs.weights[first:last]) + max(costs.activations[first:last])
                    if mem > dev.memory_bytes:
                        break
                    compute = math.fsum(costs.compute[dev.kind][first:last])
                    t_in = _link_time(costs, src, dev.name, costs.cut_bytes[first])
                    stages.append(StagePlan(first, last, dev, compute, t_in, mem))
                    src = dev.name
                else:
                    t_out = _link_time(costs, src, CLIENT, costs.cut_bytes[g])
                    worst = max([t_out] + [max(s.compute_s, s.transfer_in_s) for s in stages])
                    if math.isfinite(worst) and (best is None or worst < best.bottleneck_s):
                        best = Solution(stages, t_out, worst)
    if best is None:
        raise PlanError(_no_plan_message(costs, devices, max_stages))
    return best
