"""What the planner needs to know, measured on the real workers through tvm.rpc.

- ``candidate_cuts`` and ``static_profile`` read ``main`` alone: where it can be cut cheaply,
  and the bytes that cross each cut, the weights and the largest activation of each segment.
- ``measure_compute`` times each stage of a built pipeline on a worker, compiled for that
  worker's target and timed there by the VM's ``time_evaluator`` (not on the controller);
  ``profile_compute`` splits, builds and measures, and caches the times on disk.
- ``measure_link`` / ``measure_links`` time the ZeroMQ links between workers, and from the
  controller to each (worker/probe.py); ``measure_memory`` asks a worker what memory it has,
  to hold against ``memory_need``.

Everything returned is plain JSON-able dicts and lists. Progress lines go to stderr when it is
a terminal (or ``progress=True``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from tvmpipe.proto.errors import ConfigError, DeployError
from tvmpipe.proto.security import CURVE, Keyring
from tvmpipe.proto.version import PACKAGE_VERSION
from tvmpipe.worker import probe

from .build import build_pipeline
from .library import PipelineLibrary, tvm_version
from .split import (
    _bindings_of,
    _key,
    _leaves,
    _live,
    _main_of,
    _normalize_cuts,
    _parameter_free,
    _results_of,
    split_module,
)
from .tune import database_digest, find_database

__all__ = [
    "MeasureCache",
    "candidate_cuts",
    "measure_compute",
    "measure_link",
    "measure_links",
    "measure_memory",
    "memory_need",
    "profile_compute",
    "static_profile",
]

CONTROLLER = "controller"  # the source name of controller-to-worker links
PACE_PERIODS = 20  # a stage timed at its share's pace: over at least this many quota periods


# ----- static analysis of main


def tensor_bytes(ty: Any) -> int | None:
    """Bytes of a tensor type (a symbolic dimension counts as 1); None if not a tensor."""
    if not isinstance(ty, relax.TensorType):
        return None
    dtype = tvm.runtime.DataType(str(ty.dtype))
    count = 1
    if ty.shape is not None and isinstance(ty.shape, relax.ShapeExpr):
        for d in ty.shape.values:
            count *= int(d.value) if isinstance(d, tvm.tirx.IntImm) else 1
    return (count * dtype.bits * dtype.lanes + 7) // 8


class _Main:
    """main's bindings with liveness: which tensors cross each binding position."""

    def __init__(self, mod: tvm.IRModule):
        func = _main_of(mod)
        self.func = func
        self.bindings = _bindings_of(func)
        n = len(self.bindings)
        self.n = n
        results = _results_of(func, self.bindings)
        var_of = {_key(p): p for p in func.params}
        var_of.update({_key(b.var): b.var for b in self.bindings})
        index = {_key(b.var): i for i, b in enumerate(self.bindings)}
        uses = [
            [k for v in relax.analysis.free_vars(b.value) if (k := _key(v)) in var_of]
            for b in self.bindings
        ]
        const = _parameter_free(uses, index)
        live = _live({v for v, _ in results}, uses, index)
        self.live, self.const = live, const
        self.result_bytes = sum(
            tensor_bytes(_field(var_of[v].ty, path)) or 0 for v, path in results
        )
        self.input_bytes = sum(tensor_bytes(p.ty) or 0 for p in func.params)
        # Each tensor a live binding reads: where it is defined (a parameter: at its first
        # use, where the pipeline input enters) and its last use.
        first: dict[tuple[int, tuple[int, ...]], int] = {}
        last: dict[tuple[int, tuple[int, ...]], int] = {}
        for j in sorted(live):
            for v in uses[j]:
                i = index.get(v)
                if i is not None and const[i]:
                    continue  # parameter-free values are recomputed, never sent
                for path in _fields_read(self.bindings[j], v, var_of[v].ty):
                    first.setdefault((v, path), j)
                    last[(v, path)] = j
        # cross[k]: bytes live across position k; legal[k]: only tensors cross there.
        delta = [0] * (n + 2)
        blocked = [0] * (n + 2)
        for (v, path), end in last.items():
            start = index[v] if v in index else first[(v, path)]
            size = tensor_bytes(_field(var_of[v].ty, path))
            if end <= start:
                continue
            if size is None:
                blocked[start + 1] += 1
                blocked[end + 1] -= 1
            else:
                delta[start + 1] += size
                delta[end + 1] -= size
        self.cross, self.legal = [0] * (n + 1), [True] * (n + 1)
        running, stuck = 0, 0
        for k in range(n + 1):
            running += delta[k]
            stuck += blocked[k]
            self.cross[k], self.legal[k] = running, stuck == 0
        # work[k]: live computed bindings before k; every stage needs one.
        self.work = [0] * (n + 1)
        for i in range(n):
            self.work[i + 1] = self.work[i] + (i in live and not const[i])

    def segment_weights(self, lo: int, hi: int) -> int:
        seen: dict[int, int] = {}
        for b in self.bindings[lo:hi]:
            for c in _constants(b.value):
                seen[int(c.__chandle__())] = tensor_bytes(c.ty) or 0
        return sum(seen.values())

    def segment_activation(self, lo: int, hi: int) -> int:
        sizes = [
            tensor_bytes(ty) or 0
            for i in range(lo, hi)
            if i in self.live
            for _, ty in _leaves(self.bindings[i].var.ty)
        ]
        return max(sizes, default=0)


def _field(ty: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        ty = ty.fields[i]
    return ty


def _fields_read(binding: relax.Binding, v: int, ty: Any) -> list[tuple[int, ...]]:
    """The tensor fields of value v that a binding reads: one field for ``x = v[i]``."""
    value = binding.value
    if (
        isinstance(binding, relax.VarBinding)
        and isinstance(value, relax.TupleGetItem)
        and isinstance(value.tuple_value, relax.Var)
        and _key(value.tuple_value) == v
    ):
        index = int(value.index)
        return [(index, *p) for p, _ in _leaves(ty.fields[index])]
    return [p for p, _ in _leaves(ty)]


def _constants(expr: Any) -> list[tvm.ir.expr.Constant]:
    if isinstance(expr, tvm.ir.expr.Constant):
        return [expr]
    if isinstance(expr, relax.Call):
        return [c for arg in expr.args for c in _constants(arg)]
    if isinstance(expr, relax.Tuple):
        return [c for f in expr.fields for c in _constants(f)]
    if isinstance(expr, relax.TupleGetItem):
        return _constants(expr.tuple_value)
    return []


def candidate_cuts(mod: tvm.IRModule, segments: int) -> list[int]:
    """Up to ``segments - 1`` cut positions making about ``segments`` pieces of main's work.

    Each target position (an equal share of main's computed bindings) moves, within a third of
    a share, to the legal position where the fewest bytes cross. Every segment keeps at least
    one computed binding, so any subset of the cuts is a valid ``split_module`` argument.
    """
    m = _Main(mod)
    total = m.work[m.n]
    if segments <= 1 or total < 2:
        return []
    share = total / segments
    cuts: list[int] = []
    for s in range(1, segments):
        target = share * s
        window = [
            k
            for k in range(1, m.n)
            if m.legal[k]
            and abs(m.work[k] - target) <= share / 3
            and m.work[k] > (m.work[cuts[-1]] if cuts else 0)
            and m.work[k] < total
        ]
        if window:
            cuts.append(min(window, key=lambda k: (m.cross[k], abs(m.work[k] - target), k)))
    return cuts


def static_profile(mod: tvm.IRModule, cuts: Sequence[int]) -> dict[str, list[int]]:
    """Bytes per boundary and per segment, read from main's types and constants.

    ``cut_bytes`` (G + 1): main's inputs, the tensors live across each cut, main's outputs;
    ``weights`` (G): bytes of the constants in each segment's bindings;
    ``activations`` (G): the largest tensor a segment computes.
    """
    m = _Main(mod)
    positions = _normalize_cuts(cuts, m.n)
    bounds = [0, *positions, m.n]
    segments = list(itertools.pairwise(bounds))
    return {
        "cut_bytes": [m.input_bytes, *(m.cross[k] for k in positions), m.result_bytes],
        "weights": [m.segment_weights(lo, hi) for lo, hi in segments],
        "activations": [m.segment_activation(lo, hi) for lo, hi in segments],
    }


def memory_need(profile: Mapping[str, list[int]], first: int, last: int) -> int:
    """Bytes a stage of segments [first, last) needs: its weights, and an input and an output
    of its largest activation at once."""
    weights = sum(profile["weights"][first:last])
    return weights + 2 * max(profile["activations"][first:last], default=0)


# ----- compute, timed on the worker


def _say(progress: bool | None, text: str) -> None:
    if progress or (progress is None and sys.stderr.isatty()):
        print(f"tvmpipe measure: {text}", file=sys.stderr, flush=True)


def _random_input(spec: Any, rng: np.random.Generator) -> np.ndarray:
    if spec.dtype is None or spec.shape is None or None in spec.shape:
        raise ConfigError(
            f"input {spec.name!r} is {spec.describe()}: only inputs of known shape can be timed"
        )
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(spec.shape).astype(dtype)
    return np.zeros(spec.shape, dtype)  # indices and flags: zeros are always in range


def measure_compute(
    lib: PipelineLibrary,
    session: Any,
    device: str = "cpu",
    repeat: int = 5,
    *,
    min_repeat_ms: int = 20,
    progress: bool | None = None,
    quota: tuple[float, float] | None = None,
    stages: Sequence[int] | None = None,
) -> list[float]:
    """Median seconds of each stage of ``lib`` (or of those at ``stages``, in that order), run
    on the worker behind ``session``; a stage left out is neither uploaded nor timed.

    ``session`` is an open tvm.rpc session (tvmpipe-worker or TVM's own RPC server); each
    artifact is uploaded and loaded there, its inputs are random tensors on the remote device,
    and the remote VM times it, so no network time is counted. ``quota``: the worker may use
    that many cores of CPU time per period of that many seconds (its cgroup's); the times are
    then those of a stage at full speed, each timed within one period's share (``_full_speed``).
    """
    for stage in lib.stages:
        if stage.kind != "relax":
            raise ConfigError(
                f"stage {stage.name!r} is a Python function: only compiled Relax stages can be "
                f"timed on a worker"
            )
    rng = np.random.default_rng(0)
    times = []
    for stage in [lib.stages[i] for i in stages] if stages is not None else lib.stages:
        inputs = [_random_input(s, rng) for s in stage.inputs]
        try:
            times.append(
                _time_stage(lib, stage, inputs, session, device, repeat, min_repeat_ms, quota)
            )
        except Exception as exc:
            raise DeployError(
                f"stage {stage.name!r}: timing it on the worker ({device}) failed: {exc}"
            ) from exc
        _say(progress, f"{stage.name}: {times[-1] * 1e3:.3f} ms on {device}")
    return times


def _time_stage(
    lib: PipelineLibrary,
    stage: Any,
    inputs: list[np.ndarray],
    session: Any,
    device: str,
    repeat: int,
    min_repeat_ms: int,
    quota: tuple[float, float] | None = None,
) -> float:
    # A fresh name each time: rewriting a library the session has loaded would crash it.
    name = f"measure-{uuid.uuid4().hex[:12]}-{stage.artifact}"
    session.upload(bytearray(lib.artifact_path(stage).read_bytes()), target=name)
    dev = session.device(device)
    vm = relax.VirtualMachine(session.load_module(name), dev)
    vm.set_input("main", *(tvm.runtime.tensor(x, dev) for x in inputs))
    if quota is not None and quota[0] < 1:
        return _full_speed(vm, dev, repeat, *quota)
    timer = vm.time_evaluator(
        "invoke_stateful", dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms
    )
    return float(timer("main").median)


def _full_speed(vm: Any, dev: Any, repeat: int, cores: float, period_s: float) -> float:
    """Seconds of one run at full speed on a worker allowed ``cores`` of CPU per period.

    Timed back to back for a short while, a stage would use up its share early in a period and
    then wait, a mix of both speeds that depends on where the periods fall. A stage that fits
    in the share is timed at full speed: each timing starts after an idle period (TVM's
    cooldown between repeats, on the worker), and the first repeat, right after TVM's warm-up
    call, is left out. A longer one is throttled whatever the load: it is timed back to back
    over at least PACE_PERIODS periods, where its runs average the share's pace (``c / cores``)
    wherever the periods fall, and its full-speed time is that pace times ``cores``. (Working
    it out from single runs after an idle period came out 7 % short: a run may start with a
    full share just before a period ends and get a second one.)
    """
    share = cores * period_s
    cooldown_ms = int(1.2 * period_s * 1000)

    def timed(number: int, repeats: int) -> list[float]:
        timer = vm.time_evaluator(
            "invoke_stateful",
            dev,
            number=number,
            repeat=repeats + 1,
            cooldown_interval_ms=cooldown_ms,
            repeats_to_cooldown=1,
        )
        return [float(t) for t in timer("main").results[1:]]

    single = timed(1, 1)[0]
    if single > share:
        paced = vm.time_evaluator(
            "invoke_stateful",
            dev,
            number=1,
            repeat=repeat,
            min_repeat_ms=math.ceil(PACE_PERIODS * period_s * 1000),
        )
        return float(paced("main").median) * cores
    number = max(1, int(0.5 * share / max(single, 1e-9)))
    return float(np.median(timed(number, repeat)))


def profile_compute(
    mod: tvm.IRModule,
    cuts: Sequence[int],
    target: Any,
    session: Any,
    kind: str,
    device: str = "cpu",
    repeat: int = 5,
    *,
    cache: MeasureCache | None = None,
    progress: bool | None = None,
    database: str | os.PathLike[str] | None = None,
    rpc_key: str = "",
    quota: tuple[float, float] | None = None,
    stages: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Seconds per segment of ``split_module(mod, cuts)``, built for ``target`` and timed on the
    worker behind ``session`` (a worker of ``kind``), from ``cache`` when it has them; only the
    segments at ``stages`` (in that order) when given.
    ``database``: build with this tuning database (tune.py), for the kind of ``target``,
    ``device`` and ``rpc_key``; its digest is part of the cache key. ``quota``: the worker's
    CPU quota (cores, period): the times are then at full speed (``measure_compute``).

    Returns ``{"times": [...], "cached": bool, "key": str}``; on a cache hit nothing is built
    and ``session`` is not touched.
    """
    extra: dict[str, Any] = {"device": device}
    if stages is not None:
        extra["stages"] = [int(i) for i in stages]
    if quota is not None and quota[0] < 1:
        extra["cpu_quota"] = list(quota)
    if database is not None:
        extra["database"] = database_digest(find_database(database, target, device, rpc_key))
    key = MeasureCache.key(mod, cuts, target, kind, **extra)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            _say(progress, f"{kind}: {len(hit['times'])} segment times from the cache")
            return {"times": hit["times"], "cached": True, "key": key}
    cfg = split_module(mod, cuts)
    for module in cfg.modules:
        cfg[module].target = target
        cfg[module].device = device
        cfg[module].rpc_key = rpc_key
    _say(progress, f"{kind}: building {len(cfg.modules)} segments for {target}")
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg, database=database)
    try:
        times = measure_compute(
            lib, session, device, repeat, progress=progress, quota=quota, stages=stages
        )
    finally:
        lib.close()
    if cache is not None:
        cache.put(key, {"times": times, "kind": kind, "cuts": list(cuts)})
    return {"times": times, "cached": False, "key": key}


# ----- links and memory, through the probe functions of tvmpipe-worker


def _call(session: Any, name: str, *args: Any) -> Any:
    try:
        func = session.get_function(name)
    except Exception as exc:
        raise DeployError(
            f"the worker has no {name}: links and memory are measured by tvmpipe-worker, not "
            f"TVM's plain RPC server"
        ) from exc
    return func(*args)


def measure_link(
    dst: Any,
    src: Any = None,
    *,
    count: int = 8,
    size: int = 1 << 20,
    pings: int = 10,
    timeout: float = 10.0,
    security: str = "auto",
) -> dict[str, Any]:
    """Latency and bandwidth of the ZeroMQ link from ``src`` to ``dst`` (RPC sessions to
    tvmpipe-workers; ``src=None``: from this controller). Times are taken by the sender.
    ``security``: the data plane's mode (proto/security.py); the probe is secured as the data
    plane would be on this link (encrypted where it would encrypt), and its sink admits only
    this probe's sender.

    Returns ``{"latency_s", "rtt_s", "bandwidth_Bps", "bytes", "send_cpu_s",
    "receive_cpu_s", "encrypted", "refused"}``: the CPU seconds each side's process spent on
    the bytes, and how many connections the sink turned away (someone else tried to talk on
    the probe's socket).
    """
    ring = Keyring.generate(security, [(probe.SENDER, probe.SINK)])
    sink_request = {
        "count": count,
        "timeout": timeout,
        "security": ring.share(probe.SINK, [probe.SENDER], []),
    }
    sink = json.loads(_call(dst, "tvmpipe.probe.sink", json.dumps(sink_request)))
    if "mechanism" not in sink:
        raise DeployError(
            "the worker's link probe is older than this controller (it cannot authenticate the "
            "probe): update tvmpipe on it"
        )
    encrypted = sink["mechanism"] == CURVE
    request = json.dumps(
        {
            "address": sink["address"],
            "count": count,
            "size": size,
            "pings": pings,
            "timeout": timeout,
            "security": ring.share(probe.SENDER, [], [probe.SINK]),
        }
    )
    try:
        sent = json.loads(
            probe.send(request) if src is None else _call(src, "tvmpipe.probe.send", request)
        )
    finally:
        received = json.loads(
            _call(dst, "tvmpipe.probe.result", json.dumps({"id": sink["id"], "timeout": timeout}))
        )
    if not received.get("done"):
        raise DeployError(f"the link probe's sink did not receive everything: {received}")
    found = {k: sent[k] for k in ("latency_s", "rtt_s", "bandwidth_Bps", "bytes")}
    found["send_cpu_s"] = float(sent.get("send_cpu_s", 0.0))  # older workers: unknown
    found["receive_cpu_s"] = float(received.get("receive_cpu_s", 0.0))
    found["encrypted"] = encrypted
    found["refused"] = int(received.get("refused", 0))
    return found


def measure_links(
    sessions: Mapping[str, Any], *, progress: bool | None = None, **probe_args: Any
) -> list[dict[str, Any]]:
    """Every link stages may use: each ordered pair of workers, and the controller to each.

    ``sessions`` maps a worker name to its RPC session; each entry of the result is
    ``{"src", "dst", **measure_link's answer}`` (src "controller").
    """
    links = []
    for dst, dst_session in sessions.items():
        for src in [CONTROLLER, *(name for name in sessions if name != dst)]:
            src_session = None if src == CONTROLLER else sessions[src]
            link = measure_link(dst_session, src_session, **probe_args)
            links.append({"src": src, "dst": dst, **link})
            _say(
                progress,
                f"link {src} -> {dst}: {link['latency_s'] * 1e6:.0f} us, "
                f"{link['bandwidth_Bps'] / 1e6:.0f} MB/s"
                + (f", {link['refused']} outside connections refused" if link["refused"] else ""),
            )
    return links


def measure_memory(session: Any) -> dict[str, Any]:
    """``{"available", "total", "cpus", "cpu_quota", "cpu_period_s"}`` of the worker behind
    ``session`` (bytes, cores; the quota in cores per period, None when it has none)."""
    found = dict(json.loads(_call(session, "tvmpipe.probe.memory")))
    found.setdefault("cpu_quota", None)  # a worker of an older tvmpipe
    found.setdefault("cpu_period_s", None)
    return found


def quota_of(memory: Mapping[str, Any]) -> tuple[float, float] | None:
    """(cores, period in seconds) from ``measure_memory``'s answer; None without a quota."""
    if memory.get("cpu_quota") and memory.get("cpu_period_s"):
        return float(memory["cpu_quota"]), float(memory["cpu_period_s"])
    return None


# ----- the cache


class MeasureCache:
    """JSON files keyed by what a measurement depends on, so a second plan is quick.

    The directory is ``directory``, else ``$TVMPIPE_CACHE``, else ``~/.cache/tvmpipe/measure``.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        default = Path.home() / ".cache" / "tvmpipe" / "measure"
        self.directory = Path(directory or os.environ.get("TVMPIPE_CACHE") or default)

    @staticmethod
    def key(mod: tvm.IRModule, cuts: Sequence[int], target: Any, kind: str, **extra: Any) -> str:
        """sha256 of the module's structural hash, the cuts, the target, the worker kind and
        the versions (a new TVM or tvmpipe may compile differently)."""
        parts = {
            "module": str(tvm_ffi.structural_hash(mod)),
            "cuts": [int(c) for c in cuts],
            "target": tvm.target.Target(target).export(),
            "kind": kind,
            "tvmpipe": PACKAGE_VERSION,
            "tvm": tvm_version(),
            **extra,
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None  # absent, or half-written by a crash: measure again
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Write atomically: a reader sees the old file or the new one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(dict(value), f)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
