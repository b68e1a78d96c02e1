"""A plan: where to cut a model and where each stage runs, chosen from measured costs.

``plan_pipeline`` measures the candidate pieces of ``main`` on each kind of worker, the links
between the workers and the controller, and what memory each worker has (measure.py); the
solver (planner.py) picks the cuts and the worker of each stage that maximise throughput. The
Plan prints as a table, gives a ready PipelineModuleConfig, and is deployed as planned with
``PipelineModule(lib, plan=plan)`` or written as a cluster file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

from .config import PipelineModuleConfig
from .deploy import (
    REQUEST_TIMEOUT_S,
    LocalWorker,
    StageSession,
    check_tracker,
    connect_server,
    registered_workers,
    request_from_tracker,
    start_local_workers,
)
from .library import StageInfo
from .measure import (
    CONTROLLER,
    MeasureCache,
    candidate_cuts,
    measure_links,
    measure_memory,
    profile_compute,
    quota_of,
    static_profile,
)
from .planner import CLIENT, Costs, Device, Link, Solution, solve
from .split import split_module

LOCAL_KIND = "local"


@dataclass
class Plan:
    """Cuts (binding positions of ``main``), the solver's stages and how to reach each worker.

    ``where`` maps a device name to how PipelineModule reaches it: ``{"server": "host:port"}``,
    ``{"key": "big"}`` (through ``tracker``), or ``{}`` (a local loopback worker).
    """

    mod: tvm.IRModule
    cuts: list[int]  # binding positions; stage k runs bindings [cuts[k-1], cuts[k])
    boundaries: list[int]  # the candidate cuts the solver chose among (segment edges)
    solution: Solution
    targets: dict[str, Any]  # device kind -> target
    where: dict[str, dict[str, str]]
    tracker: tuple[str, int] | None = None
    measured: dict[str, Any] = field(default_factory=dict)  # what the costs came from

    @property
    def devices(self) -> list[Device]:
        return [stage.device for stage in self.solution.stages]

    @property
    def config(self) -> PipelineModuleConfig:
        """The pipeline as planned: cut, and each stage's target and tracker key set."""
        cfg = split_module(self.mod, self.cuts)
        for module, device in zip(cfg.modules, self.devices, strict=True):
            cfg[module].target = self.targets.get(device.kind, "llvm")
            key = self.where[device.name].get("key")
            if key:
                cfg[module].rpc_key = key
        return cfg

    def stage_times_s(self) -> list[float]:
        """Each stage's predicted compute time per input, as the running stage will measure it.

        The solver plans with the sum of its pieces' times; once it has chosen, each stage is
        built whole and timed on its worker (a whole stage is not quite the sum of its pieces:
        3-9 % more for SqueezeNet's), and those times are predicted here. A worker with a CPU
        quota (a cgroup's) gets only its share of each period, and the data plane's CPU
        (receiving, sending, encrypting: measured by the link probes) comes out of the same
        share. A stage that uses less than its share per input interval computes at full speed,
        one that would use more runs at the share's pace, and the stage that sets the pace
        always has its next input waiting.
        """
        times, _ = self._predicted()
        return times

    def predicted_rate(self) -> float:
        """Inputs per second the plan should run at (its data plane's CPU counted)."""
        _, bottleneck_s = self._predicted()
        return 1.0 / bottleneck_s if bottleneck_s > 0 else float("inf")

    def _predicted(self) -> tuple[list[float], float]:
        full = self.measured.get("full_speed", {})
        quotas = self.measured.get("quota", {})
        data_cpu = self.measured.get("data_cpu", {})
        costs = self.measured.get("costs")
        whole = self.measured.get("stage_full_speed")  # each planned stage, timed as built
        alone: list[float] = []
        cpu: list[float] = []
        shares: list[tuple[float, float] | None] = []
        for index, stage in enumerate(self.solution.stages):
            kind = stage.device.kind
            quota = quotas.get(kind)
            if kind not in full or not quota or quota[0] >= 1 or costs is None:
                timed = whole[index] if whole else stage.compute_s
                alone.append(timed)
                cpu.append(timed)
                shares.append(None)
                continue
            receive, send = data_cpu.get(kind, (0.0, 0.0))
            compute = whole[index] if whole else sum(full[kind][stage.first : stage.last])
            moved = receive * costs.cut_bytes[stage.first] + send * costs.cut_bytes[stage.last]
            alone.append(compute)
            cpu.append(compute + moved)
            shares.append(quota)
        sustained = [c / q[0] if q else c for c, q in zip(cpu, shares, strict=True)]
        transfers = [s.transfer_in_s for s in self.solution.stages]
        bottleneck_s = max([*transfers, self.solution.transfer_out_s, *sustained])
        if not whole:  # the solver's own figure stands for the untimed stages
            bottleneck_s = max(bottleneck_s, self.solution.bottleneck_s)
        times = []
        for fast, used, quota, pace in zip(alone, cpu, shares, sustained, strict=True):
            if quota is None:
                times.append(fast)
                continue
            interval = 0.0 if pace >= bottleneck_s else bottleneck_s  # 0: back to back
            service = quota_service_s(used, interval, *quota)
            times.append(max(fast, service))
        return times, bottleneck_s

    def placement(self) -> dict[str, Any]:
        """PipelineModule arguments that put each stage where the plan says."""
        places = [self.where[d.name] for d in self.devices]
        if all("server" in p for p in places):
            return {"servers": [p["server"] for p in places]}
        if all("key" in p for p in places):
            return {"tracker": self.tracker}
        if all(not p for p in places):
            return {}
        raise ValueError(
            "a plan mixes servers, tracker keys and local workers: write it as a "
            "cluster file (plan.write_cluster) and deploy with cluster="
        )

    def write_cluster(self, path: str | Path) -> Path:
        """The plan as a cluster file (see deploy/cluster.example.toml)."""
        lines = []
        if self.tracker is not None:
            lines += ["[tracker]", f'host = "{self.tracker[0]}"', f"port = {self.tracker[1]}", ""]
        for index, device in enumerate(self.devices, start=1):
            place = self.where[device.name]
            lines.append(f"[stages.mod{index}]")
            if "server" in place:
                lines.append(f'server = "{place["server"]}"')
            elif "key" in place:
                lines.append(f'key = "{place["key"]}"')
            lines.append("")
        path = Path(path)
        path.write_text("\n".join(lines))
        return path

    def __str__(self) -> str:
        rows = [("stage", "bindings", "worker", "compute ms", "transfer in ms", "memory MiB")]
        times, bottleneck_s = self._predicted()
        stages = zip(
            self.solution.stages,
            times,
            [0, *self.cuts],
            [*self.cuts, None],
            strict=True,
        )
        for index, (stage, compute_s, first, last) in enumerate(stages, start=1):
            rows.append(
                (
                    f"mod{index}",
                    f"{first}..{'end' if last is None else last - 1}",
                    stage.device.name,
                    f"{compute_s * 1e3:.2f}",
                    f"{stage.transfer_in_s * 1e3:.2f}",
                    f"{stage.memory_bytes / 2**20:.1f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        text = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        rate = 1.0 / bottleneck_s if bottleneck_s > 0 else float("inf")
        text.append(
            f"results to the client: {self.solution.transfer_out_s * 1e3:.2f} ms; bottleneck "
            f"{self.solution.bottleneck_s * 1e3:.2f} ms ({self.solution.bottleneck()}): "
            f"predicted {rate:.1f} inputs/s"
        )
        return "\n".join(text)


def quota_service_s(
    cpu_s: float, interval_s: float, cores: float, period_s: float, inputs: int = 200
) -> float:
    """Mean time from an input's start to its end on a worker whose cgroup grants ``cores``
    CPU-seconds per second in periods of ``period_s`` (Linux's CFS bandwidth control), each
    input needing ``cpu_s`` and arriving every ``interval_s`` (0: always one waiting).

    Simulated, period by period, over four phases of the arrivals against the periods: a stage
    well within its share runs at full speed, one that needs more than its share runs at the
    share's pace, and one close to it is throttled in the periods where two inputs meet.
    Periods are counted, not worked out from the time (which rounding would stall on), and the
    whole periods an input is throttled through are taken at once.
    """
    if cores >= 1 or cpu_s <= 0:
        return cpu_s
    share = cores * period_s
    means = []
    for phase in (0.0, 0.25, 0.5, 0.75):
        free_at, period, budget, total = 0.0, -1, 0.0, 0.0
        for k in range(inputs):
            start = max(phase * period_s + k * interval_s, free_at)
            arrived = math.floor(start / period_s)
            if arrived > period:  # a period of its own: a full share
                period, budget = arrived, share
            now, left = start, cpu_s
            while True:
                run = max(0.0, min(left, budget, (period + 1) * period_s - now))
                now, left, budget = now + run, left - run, budget - run
                if left <= 1e-12:
                    break
                period, budget = period + 1, share  # throttled, or the period ended
                whole = math.ceil(left / share) - 1  # periods spent throttled before the last
                period, left = period + whole, left - whole * share
                now = period * period_s
            free_at = now
            if k >= inputs // 10:  # after the first ones: the steady state
                total += now - start
        means.append(total / (inputs - inputs // 10))
    return float(sum(means) / len(means))


def cuts_from(boundaries: Sequence[int], solution: Solution) -> list[int]:
    """Binding positions of the solver's stages, from the segment edges it chose among."""
    return [boundaries[stage.first - 1] for stage in solution.stages[1:]]


def plan_pipeline(
    mod: tvm.IRModule,
    *,
    tracker: tuple[str, int] | None = None,
    keys: Sequence[str] | None = None,
    servers: Sequence[str] | None = None,
    max_stages: int = 3,
    targets: dict[str, Any] | None = None,
    device: str = "cpu",
    segments: int = 16,
    cache: MeasureCache | str | Path | None = None,
    deploy_timeout: float = REQUEST_TIMEOUT_S,
    progress: bool | None = None,
    database: str | Path | None = None,
    security: str = "auto",
) -> Plan:
    """Measure, on the workers the pipeline will run on, and plan the split.

    Workers: ``servers=[...]`` (each its own kind, named by its address), ``tracker=`` with
    ``keys`` (every worker registered under each key; workers of one key are one kind; default:
    every key the tracker has), or nothing: ``max_stages`` local loopback workers. ``targets``
    maps a kind (a key, a server address, or "local") to its target (default ``llvm``).
    Segment times are cached on disk (``cache``: a MeasureCache or its directory).
    ``database``: time the segments built with this tuning database (``tune_pipeline``).
    ``security``: the data plane's mode the pipeline will use; links are probed with it (its
    encryption costs a board CPU).
    """
    if servers is not None and tracker is not None:
        raise ValueError("give servers or tracker, not both")
    targets = dict(targets or {})
    store = cache if isinstance(cache, MeasureCache) else MeasureCache(cache)
    sessions: dict[str, StageSession] = {}
    workers: list[LocalWorker] = []
    devices: list[Device] = []
    where: dict[str, dict[str, str]] = {}
    try:
        if servers is not None:
            for address in servers:
                sessions[address] = connect_server(_probe(address), address, deploy_timeout)
                devices.append(Device(address, address, 0))
                where[address] = {"server": address}
        elif tracker is not None:
            registered = registered_workers(check_tracker(tracker))
            for key in keys or sorted(registered):
                count = registered.get(key, (0, 0))[0]
                for index in range(1, count + 1):
                    name = f"{key}#{index}"
                    sessions[name] = request_from_tracker(
                        _probe(name), tracker, key, deploy_timeout
                    )
                    devices.append(Device(name, key, 0))
                    where[name] = {"key": key}
        else:
            workers = start_local_workers(max_stages)
            for index, worker in enumerate(workers, start=1):
                name = f"local#{index}"
                address = f"{worker.host}:{worker.port}"
                sessions[name] = connect_server(_probe(name), address, deploy_timeout)
                devices.append(Device(name, LOCAL_KIND, 0))
                where[name] = {}
        for session in sessions.values():
            session.handshake()
        quotas: dict[str, tuple[float, float] | None] = {}
        measured_devices = []
        for d in devices:
            memory = measure_memory(sessions[d.name].rpc)
            quotas.setdefault(d.kind, quota_of(memory))  # workers of one kind are alike
            measured_devices.append(Device(d.name, d.kind, memory["available"]))
        devices = measured_devices
        boundaries = candidate_cuts(mod, segments)
        profile = static_profile(mod, boundaries)
        compute: dict[str, list[float]] = {}  # sustained: what a stage takes back to back
        full_speed: dict[str, list[float]] = {}  # one input after an idle moment
        cached: dict[str, bool] = {}
        for d in devices:
            if d.kind in compute:
                continue
            target = targets.setdefault(d.kind, "llvm")
            measured = profile_compute(
                mod,
                boundaries,
                target,
                sessions[d.name].rpc,
                d.kind,
                device,
                cache=store,
                progress=progress,
                database=database,
                rpc_key=where[d.name].get("key", ""),
                quota=quotas[d.kind],
            )
            full_speed[d.kind], cached[d.kind] = measured["times"], measured["cached"]
            quota = quotas[d.kind]
            share = min(1.0, quota[0]) if quota is not None else 1.0
            compute[d.kind] = [t / share for t in full_speed[d.kind]]
        links: dict[tuple[str, str], Link] = {}
        rpcs = {n: s.rpc for n, s in sessions.items()}
        kinds = {d.name: d.kind for d in devices}
        moved: dict[str, list[float]] = {}  # kind -> [send CPU s, bytes, receive CPU s, bytes]
        for link in measure_links(rpcs, progress=progress, security=security):
            for side, name in (("send", link["src"]), ("receive", link["dst"])):
                if name in kinds:
                    tally = moved.setdefault(kinds[name], [0.0, 0.0, 0.0, 0.0])
                    offset = 0 if side == "send" else 2
                    tally[offset] += link[f"{side}_cpu_s"]
                    tally[offset + 1] += link["bytes"]
            src = CLIENT if link["src"] == CONTROLLER else link["src"]
            links[(src, link["dst"])] = Link(link["bandwidth_Bps"], link["latency_s"])
            if src == CLIENT:  # results come back over the same wire
                links[(link["dst"], CLIENT)] = links[(src, link["dst"])]
        data_cpu = {  # kind -> CPU seconds per byte received, and per byte sent
            kind: (t[2] / t[3] if t[3] else 0.0, t[0] / t[1] if t[1] else 0.0)
            for kind, t in moved.items()
        }
        costs = Costs(
            compute, profile["cut_bytes"], profile["weights"], profile["activations"], links
        )
        solution = solve(costs, devices, max_stages)
        cuts = cuts_from(boundaries, solution)
        by_kind: dict[str, list[int]] = {}  # the planned stages each kind runs
        for index, stage in enumerate(solution.stages):
            by_kind.setdefault(stage.device.kind, []).append(index)
        whole: dict[int, float] = {}  # each planned stage, timed whole on a worker of its kind
        for kind, indices in by_kind.items():
            name = solution.stages[indices[0]].device.name
            measured = profile_compute(
                mod,
                cuts,
                targets[kind],
                sessions[name].rpc,
                kind,
                device,
                cache=store,
                progress=progress,
                database=database,
                rpc_key=where[name].get("key", ""),
                quota=quotas[kind],
                stages=indices,
            )
            whole.update(zip(indices, measured["times"], strict=True))
    finally:
        for session in sessions.values():
            session.close(stop=False)
        for worker in workers:
            worker.stop()
    return Plan(
        mod=mod,
        cuts=cuts,
        boundaries=list(boundaries),
        solution=solution,
        targets=targets,
        where=where,
        tracker=tracker,
        measured={
            "costs": costs,
            "cached": cached,
            "full_speed": full_speed,
            "quota": quotas,
            "data_cpu": data_cpu,
            "stage_full_speed": [whole[k] for k in range(len(solution.stages))],
        },
    )


def _probe(name: str) -> StageInfo:
    """A stand-in stage for deploy's messages while measuring on ``name``."""
    return StageInfo(f"planning on {name}", "relax", "", "", [], None)
