"""A plan: where to cut a model and where each stage runs, chosen from measured costs.

``plan_pipeline`` measures the candidate pieces of ``main`` on each kind of worker, the links
between the workers and the controller, and what memory each worker has (measure.py); the
solver (planner.py) picks the cuts and the worker of each stage that maximise throughput. The
Plan prints as a table, gives a ready PipelineModuleConfig, and is deployed as planned with
``PipelineModule(lib, plan=plan)`` or written as a cluster file.
"""

from __future__ import annotations

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
        for index, (stage, first, last) in enumerate(
            zip(self.solution.stages, [0, *self.cuts], [*self.cuts, None], strict=True), start=1
        ):
            rows.append(
                (
                    f"mod{index}",
                    f"{first}..{'end' if last is None else last - 1}",
                    stage.device.name,
                    f"{stage.compute_s * 1e3:.2f}",
                    f"{stage.transfer_in_s * 1e3:.2f}",
                    f"{stage.memory_bytes / 2**20:.1f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        text = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        rate = 1.0 / self.solution.bottleneck_s if self.solution.bottleneck_s > 0 else float("inf")
        text.append(
            f"results to the client: {self.solution.transfer_out_s * 1e3:.2f} ms; bottleneck "
            f"{self.solution.bottleneck_s * 1e3:.2f} ms ({self.solution.bottleneck()}): "
            f"predicted {rate:.1f} inputs/s"
        )
        return "\n".join(text)


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
) -> Plan:
    """Measure, on the workers the pipeline will run on, and plan the split.

    Workers: ``servers=[...]`` (each its own kind, named by its address), ``tracker=`` with
    ``keys`` (every worker registered under each key; workers of one key are one kind; default:
    every key the tracker has), or nothing: ``max_stages`` local loopback workers. ``targets``
    maps a kind (a key, a server address, or "local") to its target (default ``llvm``).
    Segment times are cached on disk (``cache``: a MeasureCache or its directory).
    ``database``: time the segments built with this tuning database (``tune_pipeline``).
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
        devices = [
            Device(d.name, d.kind, measure_memory(sessions[d.name].rpc)["available"])
            for d in devices
        ]
        boundaries = candidate_cuts(mod, segments)
        profile = static_profile(mod, boundaries)
        compute: dict[str, list[float]] = {}
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
            )
            compute[d.kind], cached[d.kind] = measured["times"], measured["cached"]
        links: dict[tuple[str, str], Link] = {}
        for link in measure_links({n: s.rpc for n, s in sessions.items()}, progress=progress):
            src = CLIENT if link["src"] == CONTROLLER else link["src"]
            links[(src, link["dst"])] = Link(link["bandwidth_Bps"], link["latency_s"])
            if src == CLIENT:  # results come back over the same wire
                links[(link["dst"], CLIENT)] = links[(src, link["dst"])]
    finally:
        for session in sessions.values():
            session.close(stop=False)
        for worker in workers:
            worker.stop()
    costs = Costs(compute, profile["cut_bytes"], profile["weights"], profile["activations"], links)
    solution = solve(costs, devices, max_stages)
    return Plan(
        mod=mod,
        cuts=cuts_from(boundaries, solution),
        boundaries=list(boundaries),
        solution=solution,
        targets=targets,
        where=where,
        tracker=tracker,
        measured={"costs": costs, "cached": cached},
    )


def _probe(name: str) -> StageInfo:
    """A stand-in stage for deploy's messages while measuring on ``name``."""
    return StageInfo(f"planning on {name}", "relax", "", "", [], None)
