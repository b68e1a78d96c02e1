"""Tune a pipeline's stages with MetaSchedule, measured on the workers that will run them.

A *kind* of worker is a target, a device and a tracker key: boards of one kind run the same
code equally fast, so each distinct workload (a fused TIR function) is tuned once per kind,
whatever stage or pipeline it came from. A database directory holds one MetaSchedule JSON
database per kind (``DIR/<kind id>/``, with ``kind.json`` saying what the kind is and where it
was measured), which ``build_pipeline(cfg, database=DIR)`` and ``plan_pipeline(...,
database=DIR)`` apply.

The trial budget is per workload: a workload that already holds ``trials`` records in the kind's
database is not tuned again, so an interrupted run resumes where it stopped (the JSON database
appends each batch of trials as it is measured) and a second run over the same workloads does
no trials at all. Trials are measured through ``tvm.rpc`` by MetaSchedule's RPCRunner: on a
worker the tracker hands out for the stage's key, on a given server, or by default on a
loopback ``tvmpipe-worker`` started here (so "local" means this machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.relax.pipeline import zero_pipeline
from tvm.s_tir import meta_schedule as ms

from tvmpipe.proto.errors import ConfigError

from .config import PipelineModuleConfig
from .library import tvm_version
from .progress import stage_progress
from .rewrite import concat_as_copies, convert_layout, for_inference
from .signature import is_relax_module

__all__ = [
    "KIND_FILE",
    "TaskResult",
    "SHIPPED_DATABASE",
    "apply_database",
    "database_for_host",
    "database_digest",
    "find_database",
    "budget_text",
    "model_budget_text",
    "host_target",
    "kind_id",
    "read_kind",
    "conv2d_layout",
    "tune_pipeline",
    "weight_prepack",
]

FAILED_RUN_S = 1e9  # MetaSchedule records a run that failed as 1e10 s
KIND_FILE = "kind.json"
# Tuned by ``make tune`` on the development machine, for ``make demo`` and ``tvmpipe bench``.
SHIPPED_DATABASE = Path(__file__).parent / "tuning_db"
_FILES = ("database_workload.json", "database_tuning_record.json")
# Workloads whose search ran dry (MetaSchedule stopped short of the trials it was allowed: a
# workload with one or a few possible schedules) and the budget they ran dry under: a run with
# no larger budget skips them, where it would search them again for a minute or two each.
DRY_FILE = "exhausted.json"
# kind.json: tuned with constant weights free to take the layout each schedule wants (the
# schedule reads them packed in tiles; the build repacks them once): SqueezeNet on a Zen 3 VM
# ran in 26.6 ms against 36.6 at the same budgets. New llvm kinds get it; a kind keeps its own.
PREPACK_FIELD = "weight_prepack"
LAYOUT_FREE = "layout_free_buffers"
# kind.json: the data layout convolutions are tuned and built in (TVM's ConvertLayout, with a
# permute where the model's own layout meets it). MetaSchedule's CPU search tiles NHWC much
# better than ONNX's NCHW: SqueezeNet's 3x3 convolution of 32 to 128 channels at 27x27 came to
# 1.34 ms after 64 trials in NHWC, against 1.92 ms after 128 in NCHW, on a Zen 3 VM. New llvm
# kinds get it; a kind without the field keeps the model's layout.
LAYOUT_FIELD = "conv2d_layout"
NEW_CPU_LAYOUT = "NHWC"
TRIALS_PER_BATCH = 32  # records reach the JSON file batch by batch: what an interrupt can lose
# Measurements (from the database, then this run) before XGBoost's scores replace random ones
COST_MODEL_WARMUP = TRIALS_PER_BATCH
RUN_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 60.0  # one candidate; a normal one builds in about a second


@dataclass
class TaskResult:
    """One workload of one kind: trials recorded before this run, trials run now, best time."""

    kind: str
    name: str
    workload: str  # structural hash of the fused TIR function
    trials_before: int
    trials_run: int
    best_s: float | None


# ----- kinds and their databases


def host_target() -> dict[str, Any]:
    """LLVM for this machine's CPU: without ``mcpu`` LLVM emits generic x86-64 (no AVX)."""
    return {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())}


def database_for_host(
    database: str | os.PathLike[str] = SHIPPED_DATABASE,
) -> tuple[Path | None, str]:
    """The database's kind for this machine's CPU (``host_target()``, any key), or None and
    a line saying what it was tuned for instead."""
    target = host_target()
    with contextlib.suppress(ConfigError):
        return find_database(database, target), ""
    root = Path(database)
    kinds = (
        [read_kind(p.parent) for p in sorted(root.glob(f"*/{KIND_FILE}"))] if root.is_dir() else []
    )
    what = "; ".join(
        f"{_describe(k['target'])} ({k['measured_on'].get('cpu_model', 'a board')})" for k in kinds
    )
    here = f"{_describe(_target_json(target))} ({_cpu_model()})"
    return None, f"the tuning database {root} is for {what or 'nothing'}, not this machine: {here}"


def _describe(target: dict[str, Any]) -> str:
    """``llvm -mcpu=znver5``: the parts of a target that tell CPUs apart."""
    parts = [str(target.get("kind", "?"))]
    parts += [f"-{k}={target[k]}" for k in ("mtriple", "mcpu", "arch") if target.get(k)]
    return " ".join(parts)


def _target_json(target: Any) -> dict[str, Any]:
    exported: dict[str, Any] = json.loads(str(tvm.target.Target(target)))
    return exported


def kind_id(target: Any, device: str = "cpu", key: str = "") -> str:
    """A directory name for a kind: readable, and unique through a digest of the whole."""
    exported = _target_json(target)
    text = json.dumps({"target": exported, "device": device, "key": key}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    words = [exported.get("kind", "target"), exported.get("mcpu", ""), device, key or "any"]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(w for w in words if w))
    return f"{slug}-{digest}"


def _root(database: str | os.PathLike[str], *, create: bool) -> Path:
    root = Path(database)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"tuning database {root}: not a directory")
    if not root.exists():
        if not create:
            raise ConfigError(
                f"tuning database {root}: no such directory (tvmpipe tune --database {root} "
                f"makes one)"
            )
        root.mkdir(parents=True)
    return root


def find_database(
    database: str | os.PathLike[str], target: Any, device: str = "cpu", key: str = ""
) -> Path:
    """The directory of the kind's database under ``database``; ConfigError if it has none.

    A key's own database comes first; else the one tuned without a key (on local workers or
    servers), which holds for every worker with that target and device.
    """
    root = _root(database, create=False)
    for kind in dict.fromkeys([kind_id(target, device, key), kind_id(target, device, "")]):
        if (root / kind / _FILES[1]).is_file():
            return root / kind
    kinds = sorted(p.name for p in root.iterdir() if (p / KIND_FILE).is_file())
    raise ConfigError(
        f"tuning database {root} has nothing for target {tvm.target.Target(target)}, device "
        f"{device!r}, key {key or '(none)'!r} (expected {kind_id(target, device, key)}); it "
        f"holds {', '.join(kinds) or 'no kind'}: tune this kind first (tvmpipe tune)"
    )


def read_kind(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``kind.json`` says about a kind's database: target, device, key, where measured."""
    data: dict[str, Any] = json.loads((Path(directory) / KIND_FILE).read_text())
    return data


def database_digest(directory: str | os.PathLike[str]) -> str:
    """sha256 over a kind's workload and record files: which tuning a build used."""
    digest = hashlib.sha256()
    for name in _FILES:
        path = Path(directory) / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def _prepare(mod: tvm.IRModule, target: tvm.target.Target, kind: dict[str, Any]) -> tvm.IRModule:
    """Legalize and fuse, as MetaSchedule's task extraction and the database both expect, after
    the kind's transforms (``kind.json``): convolutions in its ``conv2d_layout`` (and there,
    batch norms and ONNX's Sum decomposed to fuse, ``rewrite.for_inference``, and
    concatenations on the channels as copies, ``rewrite.concat_as_copies``), and with
    ``weight_prepack`` each workload's constant weights marked free to take the layout its
    schedule wants (which makes them part of the workload: another database entry)."""
    layout = kind.get(LAYOUT_FIELD)
    with target:
        if layout:
            mod = concat_as_copies(convert_layout(for_inference(mod), str(layout)))
        prepared: tvm.IRModule = zero_pipeline()(mod)
        if kind.get(PREPACK_FIELD):
            prepared = _mark_layout_free(prepared)
    return prepared


def _mark_layout_free(mod: tvm.IRModule) -> tvm.IRModule:
    """TVM's AttachAttrLayoutFreeBuffers, less the empty marks it leaves on functions with no
    constant weight: those stay the workloads they were (a relu tuned before still applies)."""
    marked = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    for gv, func in marked.functions_items():
        marks = func.attrs.get(LAYOUT_FREE) if isinstance(func, tvm.tirx.PrimFunc) else None
        if marks is not None and len(marks) == 0:
            marked[gv] = func.without_attr(LAYOUT_FREE)
    return marked


def weight_prepack(directory: str | os.PathLike[str]) -> bool:
    """Whether a kind's database was tuned with weights free to change layout (``kind.json``'s
    ``weight_prepack``; databases from before it have none, and are applied without)."""
    return bool(_transforms(directory).get(PREPACK_FIELD, False))


def conv2d_layout(directory: str | os.PathLike[str]) -> str | None:
    """The layout a kind's convolutions were tuned in (``kind.json``'s ``conv2d_layout``);
    None: the model's own."""
    layout = _transforms(directory).get(LAYOUT_FIELD)
    return str(layout) if layout else None


def _transforms(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``_prepare`` needs of a kind: its kind.json, or nothing for a bare database."""
    path = Path(directory) / KIND_FILE
    return read_kind(directory) if path.is_file() else {}


def apply_database(mod: tvm.IRModule, target: Any, directory: str | os.PathLike[str]) -> Any:
    """``mod`` fused, with each workload the database knows replaced by its best schedule;
    the rest is left for the default compile. Where the schedule packs a constant weight
    into another layout, the packing is done here, once (folded into a new constant)."""
    target = tvm.target.Target(target)
    kind = _transforms(directory)
    prepared = _prepare(mod, target, kind)
    with tempfile.TemporaryDirectory(prefix="tvmpipe-best-") as best:
        _copy_best_records(Path(directory), Path(best))
        database = ms.database.JSONDatabase(work_dir=best, allow_missing=False)
        with target, database:
            applied: tvm.IRModule = relax.transform.MetaScheduleApplyDatabase()(prepared)
    return _pack_weights(applied, target) if kind.get(PREPACK_FIELD) else applied


def _pack_weights(applied: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Split each schedule's weight repacking off into its own function and run it now on the
    constant weights (FoldConstant), so that a stage repacks nothing per input."""
    with target:
        packed = relax.transform.SplitLayoutRewritePreproc()(applied)
        packed = relax.transform.FoldConstant()(packed)
        result: tvm.IRModule = relax.transform.DeadCodeElimination()(packed)
    return result


def untuned_workloads(applied: tvm.IRModule) -> list[str]:
    """The functions of an ``apply_database`` result that the database had no schedule for:
    they build with the default (naive) schedule. A stage cut where no tuned piece ends
    splits a fused workload (a convolution from its bias) into ones nobody tuned."""
    return sorted(
        gv.name_hint
        for gv, func in applied.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc)
        and not (func.attrs and func.attrs.get("tirx.is_scheduled"))
    )


def _copy_best_records(directory: Path, into: Path) -> None:
    """Copy a kind's database with only each workload's fastest measured record.

    Applying uses that one record per workload, but MetaSchedule's JSONDatabase parses every
    record's trace when it opens: 11 s for make tune's 2,165 records, in every stage's build.
    The choice is the one its ``get_top_k`` makes: the lowest mean time among records whose
    runs all succeeded (a failed run is recorded as 1e10 s).
    """
    if not (directory / _FILES[0]).is_file() or not (directory / _FILES[1]).is_file():
        raise ConfigError(f"tuning database {directory}: its workload or record file is missing")
    best: dict[int, tuple[float, str]] = {}
    with open(directory / _FILES[1]) as records:
        for line in records:
            if not line.strip():
                continue
            workload, (_, run_secs, *_) = json.loads(line)
            if not run_secs or any(s is None or float(s) >= FAILED_RUN_S for s in run_secs):
                continue
            mean = sum(float(s) for s in run_secs) / len(run_secs)
            if workload not in best or mean < best[workload][0]:
                best[workload] = (mean, line)
    shutil.copyfile(directory / _FILES[0], into / _FILES[0])
    with open(into / _FILES[1], "w") as records:
        records.writelines(line.rstrip("\n") + "\n" for _, line in best.values())


# ----- tuning


def tune_pipeline(
    pipeline: PipelineModuleConfig | tvm.IRModule,
    database: str | os.PathLike[str],
    *,
    trials: int = 64,
    target: Any = "llvm",
    device: str = "cpu",
    key: str = "",
    tracker: tuple[str, int] | None = None,
    servers: Sequence[str] | None = None,
    progress: bool | None = None,
    seed: int = 0,
    top: int | None = None,
) -> list[TaskResult]:
    """Tune every workload of every stage to ``trials`` trials in its kind's database.

    ``top``: only the ``top`` workloads of each kind that take the most time (the best time
    known so far, times how often the stages call it; a workload not measured yet comes
    first), so that a larger budget goes where the time is: tune everything to a few trials,
    then the heaviest to many.

    ``pipeline``: a PipelineModuleConfig (each Relax stage's target, device and rpc_key give its
    kind; Python stages are skipped) or one module (``target``, ``device``, ``key``).
    Measured through the tracker by each stage's key, on ``servers`` (stage order, as
    PipelineModule places them), or on a loopback worker started here.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be a positive int (per workload), got {trials!r}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"top must be a positive int (workloads per kind), got {top!r}")
    if tracker is not None and servers is not None:
        raise ConfigError("give servers or tracker, not both")
    root = _root(database, create=True)
    stages = _stages(pipeline, target, device, key)
    if tracker is not None and not all(k for _, _, _, k in stages):
        raise ConfigError("tuning through a tracker needs an rpc_key on every stage (or key=)")
    if servers is not None and len(servers) < len(stages):
        raise ConfigError(f"{len(stages)} stages but {len(servers)} servers")
    kinds: dict[str, list[tuple[tvm.IRModule, tvm.target.Target, str, str, str | None]]] = {}
    for index, (mod, stage_target, stage_device, stage_key) in enumerate(stages):
        server = servers[index] if servers is not None else None
        name = kind_id(stage_target, stage_device, stage_key)
        kinds.setdefault(name, []).append((mod, stage_target, stage_device, stage_key, server))
    results: list[TaskResult] = []
    with _meta_schedule_logs(root):
        for name, members in kinds.items():
            results += _tune_kind(root / name, members, trials, tracker, progress, seed, top)
    return results


def _tune_kind(
    directory: Path,
    members: list[tuple[tvm.IRModule, tvm.target.Target, str, str, str | None]],
    trials: int,
    tracker: tuple[str, int] | None,
    progress: bool | None,
    seed: int,
    top: int | None = None,
) -> list[TaskResult]:
    """Every distinct workload of one kind's stages (or its ``top`` heaviest), to ``trials``
    records in its database."""
    _, target, device, key, server = members[0]
    directory.mkdir(exist_ok=True)
    where = _where(tracker, key, server)
    _write_kind(directory, target, device, key, where, trials, top, finished=False)
    contexts, weights = _contexts([m for m, *_ in members], target, directory, seed, trials)
    database = ms.database.JSONDatabase(work_dir=str(directory))
    done: dict[int, list[Any]] = {}
    for record in database.get_all_tuning_records():
        done.setdefault(_workload_hash(record.workload.mod), []).append(record)
    before = [len(done.get(_workload_hash(c.mod), [])) for c in contexts]
    kind = directory.name
    results = [
        TaskResult(
            kind, str(c.task_name), f"{_workload_hash(c.mod):x}", n, 0, _best(database, c.mod)
        )
        for c, n in zip(contexts, before, strict=True)
    ]
    dry = _read_dry(directory)
    todo = [
        i
        for i in _heaviest(results, weights, top)
        if before[i] < trials and dry.get(results[i].workload, 0) < trials
    ]
    if not todo:
        _write_kind(directory, target, device, key, where, trials, top, finished=True)
        return results
    total = sum(trials - before[i] for i in todo)
    with (
        _interrupt_flag() as interrupted,
        _runner(tracker, key, server) as runner,
        stage_progress(f"tuning {kind}", total, progress) as bar,
    ):
        bar.unit = "trial"
        builder = _Builder()
        for position, index in enumerate(todo, start=1):
            context, result = contexts[index], results[index]
            left = trials - before[index]
            counter = _Progress(bar, f"task {position}/{len(todo)} {result.name}", result)
            try:
                ms.tune_tasks(
                    tasks=[context],
                    task_weights=[1.0],
                    work_dir=str(directory),
                    max_trials_global=left,
                    num_trials_per_iter=min(TRIALS_PER_BATCH, left),
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model=_cost_model(context, done.get(_workload_hash(context.mod), [])),
                    measure_callbacks=[*ms.MeasureCallback.create("default"), counter],
                )
            except Exception:
                if interrupted():  # it came back through TVM as another error
                    raise KeyboardInterrupt from None
                raise
            result.best_s = _best(database, context.mod)
            if interrupted():
                raise KeyboardInterrupt  # what was measured is in the database already
            if result.trials_run < left:  # the search found nothing more to measure
                dry[result.workload] = trials
                (directory / DRY_FILE).write_text(json.dumps(dry, indent=2) + "\n")
    _write_kind(directory, target, device, key, where, trials, top, finished=True)
    return results


def _stages(
    pipeline: PipelineModuleConfig | tvm.IRModule, target: Any, device: str, key: str
) -> list[tuple[tvm.IRModule, tvm.target.Target, str, str]]:
    if isinstance(pipeline, tvm.IRModule):
        return [(pipeline, tvm.target.Target(target), device, key)]
    if not isinstance(pipeline, PipelineModuleConfig):
        raise ConfigError(f"tune a PipelineModuleConfig or an IRModule, not {type(pipeline)}")
    stages = []
    for module in pipeline.topological_order():
        if is_relax_module(module):
            s = pipeline[module]
            bound = module
            if s.params:
                values = {k: tvm.runtime.tensor(v) for k, v in s.params.items()}
                bound = relax.transform.BindParams("main", values)(module)
            stages.append((bound, tvm.target.Target(s.target), s.device, s.rpc_key))
    if not stages:
        raise ConfigError("the pipeline has no Relax stage to tune")
    return stages


def _where(tracker: tuple[str, int] | None, key: str, server: str | None) -> dict[str, Any]:
    """Where a kind's trials are measured, as kind.json records it."""
    if tracker is not None:
        return {"tracker": f"{tracker[0]}:{tracker[1]}", "key": key}
    if server is not None:
        return {"server": server}
    return {
        "local": True,
        "cpu": str(tvm.target.codegen.llvm_get_system_cpu()),
        "cpu_model": _cpu_model(),
        "triple": str(tvm.target.codegen.llvm_get_system_triple()),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _write_kind(
    directory: Path,
    target: tvm.target.Target,
    device: str,
    key: str,
    where: dict[str, Any],
    trials: int,
    top: int | None,
    *,
    finished: bool,
) -> None:
    """What the kind is and where it was measured; once a pass has ``finished``, its budget:
    the largest per workload so far, or for the ``top`` heaviest workloads the latest pass with
    that ``top`` (``make tune`` gives the 8 heaviest one budget and the heaviest a larger one).
    A pass that was interrupted or failed leaves the budgets of the passes before it."""
    old = read_kind(directory) if (directory / KIND_FILE).is_file() else {}
    per_workload = int(old.get("trials_per_workload", 0))
    heaviest = _heaviest_passes(old)
    if finished and top is None:
        per_workload = max(trials, per_workload)
    elif finished and top:  # the latest pass with this top: its heaviest as of now
        heaviest = [p for p in heaviest if p["workloads"] != top]
        heaviest.append({"workloads": top, "trials": trials})
        heaviest.sort(key=lambda p: -p["workloads"])
    data: dict[str, Any] = {
        "target": _target_json(target),
        "device": device,
        "key": key,
        "measured_on": where,
        "tvm": tvm_version(),
        "trials_per_workload": per_workload,
    }
    if heaviest:
        data["heaviest"] = heaviest
    new_cpu_kind = not old and target.kind.name == "llvm"
    data[PREPACK_FIELD] = bool(old.get(PREPACK_FIELD, new_cpu_kind))
    layout = old.get(LAYOUT_FIELD, NEW_CPU_LAYOUT if new_cpu_kind else None)
    if layout:
        data[LAYOUT_FIELD] = layout
    (directory / KIND_FILE).write_text(json.dumps(data, indent=2) + "\n")


def budget_text(kind: dict[str, Any]) -> str:
    """A kind's tuning budget in words, from its kind.json (``read_kind``)."""
    text = f"{kind.get('trials_per_workload', '?')} trials per workload"
    for heavy in _heaviest_passes(kind):
        which = f"the {heavy['workloads']} heaviest" if heavy["workloads"] > 1 else "the heaviest"
        text += f", {heavy['trials']} for {which}"
    return text


def model_budget_text(mod: tvm.IRModule, target: Any, directory: str | os.PathLike[str]) -> str:
    """The trials a kind's database holds for ``mod``'s own workloads, in words: the fewest any
    of them had, then how many had each larger budget of the kind. A workload whose search ran
    dry counts at the budget it ran dry at. ``budget_text`` tells the budgets of make tune's
    passes, which ranked another model's workloads: a second model tuned into the same kind can
    have had less, and its figures must say so."""
    target = tvm.target.Target(target)
    kind = _transforms(directory)
    with target:
        tasks = ms.relax_integration.extract_tasks(
            _prepare(mod, target, kind), _tuning_target(target)
        )
    counts = _record_counts(Path(directory))
    dry = _read_dry(Path(directory))
    hashes = {_workload_hash(task.dispatched[0]) for task in tasks}
    trials = sorted(max(counts.get(h, 0), dry.get(f"{h:x}", 0)) for h in hashes)
    if not trials:
        return "no workloads"
    fewest = trials[0]
    text = f"{fewest} trials per workload"
    levels = {int(kind.get("trials_per_workload", 0))}
    levels |= {p["trials"] for p in _heaviest_passes(kind)}
    for level in sorted(levels):
        more = sum(t >= level for t in trials)
        if level > fewest and more:
            text += f", {level} for {more} of {len(trials)}"
    return text


def _record_counts(directory: Path) -> dict[int, int]:
    """How many records a kind's database holds per workload (its structural hash)."""
    try:
        with open(directory / _FILES[0]) as workloads:
            hashes = [int(json.loads(line)[0]) for line in workloads if line.strip()]
        with open(directory / _FILES[1]) as records:
            counts: dict[int, int] = {}
            for line in records:
                if line.strip():
                    workload = hashes[int(line[1 : line.index(",")])]
                    counts[workload] = counts.get(workload, 0) + 1
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(f"tuning database {directory} cannot be read: {exc}") from exc
    return counts


def _heaviest_passes(kind: dict[str, Any]) -> list[dict[str, int]]:
    """kind.json's ``heaviest``: a list of ``{"workloads", "trials"}``, most workloads first
    (one such dict in kinds made before a second ``top`` pass existed)."""
    heaviest = kind.get("heaviest") or []
    passes = [heaviest] if isinstance(heaviest, dict) else list(heaviest)
    return [{"workloads": int(p["workloads"]), "trials": int(p["trials"])} for p in passes]


def _tuning_target(target: tvm.target.Target) -> tvm.target.Target:
    """MetaSchedule's CPU rules need ``num-cores``; stages default to one thread each."""
    exported = _target_json(target)
    if exported.get("kind") == "llvm" and not exported.get("num-cores"):
        exported["num-cores"] = 1
    return tvm.target.Target(exported)


INTRINSICS_PACKAGE = "tvm.s_tir.tensor_intrin"
# The tensor intrinsics each target kind's default schedule rules may name.
INTRINSICS_BY_KIND = {
    "llvm": ("x86", "arm_cpu", "riscv_cpu", "hexagon"),
    "cuda": ("cuda",),
    "rocm": ("rocm",),
    "metal": ("metal",),
}


def _register_intrinsics(target: tvm.target.Target) -> None:
    """Register only the tensor intrinsics the target's schedule rules may use.

    Every ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose package parses every
    backend's intrinsics with TVMScript; each parse walks the caller's stack with ``inspect``,
    which scans all of ``sys.modules`` per frame: 14 s of CPU before the first trial (CUDA's
    alone 6 s; the CPU backends' 1.3 s). With a bare package in its place, importing the package
    is free and the kinds' modules are imported one by one as targets need them.
    """
    if INTRINSICS_PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(INTRINSICS_PACKAGE)
        if spec is None or spec.submodule_search_locations is None:
            return  # another TVM layout: MetaSchedule imports what it needs itself
        package = types.ModuleType(INTRINSICS_PACKAGE, "tvm's tensor intrinsics, by backend")
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = INTRINSICS_PACKAGE
        sys.modules[INTRINSICS_PACKAGE] = package
    names = INTRINSICS_BY_KIND.get(target.kind.name)
    if names is None:  # a kind not listed: every backend's, as TVM would
        names = tuple(n for kind in INTRINSICS_BY_KIND.values() for n in kind)
    for name in names:
        importlib.import_module(f"{INTRINSICS_PACKAGE}.{name}")


def _heaviest(results: list[TaskResult], weights: list[float], top: int | None) -> list[int]:
    """Indices of the ``top`` workloads that take the most time (all when ``top`` is None):
    best time times weight, unmeasured ones first; in their original order."""
    if top is None or top >= len(results):
        return list(range(len(results)))

    def cost(i: int) -> float:
        best = results[i].best_s
        return math.inf if best is None else best * weights[i]

    return sorted(sorted(range(len(results)), key=cost, reverse=True)[:top])


def _contexts(
    modules: list[tvm.IRModule], target: tvm.target.Target, directory: Path, seed: int, trials: int
) -> tuple[list[ms.TuneContext], list[float]]:
    """One tune context per distinct workload of the modules (first appearance kept), and
    how many times the modules call each.

    The evolutionary search keeps its default population (512) from 32 trials up; a smaller
    budget gets a smaller one, which would only cost time to evolve.
    """
    tuning_target = _tuning_target(target)
    _register_intrinsics(tuning_target)
    population = max(64, min(512, 16 * trials))
    kind = _transforms(directory)
    seen: dict[int, ms.TuneContext] = {}
    weights: dict[int, float] = {}
    for mod in modules:
        tasks = ms.relax_integration.extract_tasks(_prepare(mod, target, kind), tuning_target)
        strategy = ms.search_strategy.EvolutionarySearch(population_size=population)
        contexts, task_weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(directory), strategy=strategy, num_threads=1, seed=seed
        )
        for context, weight in zip(contexts, task_weights, strict=True):
            key = _workload_hash(context.mod)
            seen.setdefault(key, context)
            weights[key] = weights.get(key, 0.0) + float(weight)
    return list(seen.values()), [weights[k] for k in seen]


def _read_dry(directory: Path) -> dict[str, int]:
    """DRY_FILE's workloads (structural hash, hex) and budgets; empty if there is none yet."""
    try:
        data = json.loads((directory / DRY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}


def _workload_hash(mod: tvm.IRModule) -> int:
    return int(tvm_ffi.structural_hash(mod))


def _best(database: ms.database.JSONDatabase, mod: tvm.IRModule) -> float | None:
    if not database.has_workload(mod):
        return None
    top = database.get_top_k(database.commit_workload(mod), 1)
    if not top or not top[0].run_secs:
        return None
    return sum(float(s) for s in top[0].run_secs) / len(top[0].run_secs)


def _cost_model(context: ms.TuneContext, records: Sequence[Any]) -> ms.cost_model.CostModel:
    """XGBoost's model when the xgboost package is installed, else random scores (the search
    is then evolutionary on measured times alone).

    The model first learns from the workload's records already in the database, so a resumed
    run is guided from its first batch. MetaSchedule's model scores at random until it has seen
    100 measurements in the current run, so each pass of ``make tune`` (32, then 96 more trials
    per workload) had searched at random throughout.
    """
    try:
        import xgboost  # noqa: F401
    except ImportError:
        return ms.cost_model.RandomModel()
    model = ms.cost_model.XGBModel(num_warmup_samples=COST_MODEL_WARMUP)
    candidates, results = _replayed(context, records)
    if candidates:
        model.update(context, candidates, results)
    return model


def _replayed(context: ms.TuneContext, records: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """The records' schedules, replayed on the context's workload, as measured candidates and
    their results (what a cost model learns from)."""
    candidates, results = [], []
    for record in records:
        schedule = tvm.s_tir.Schedule(context.mod)
        try:
            record.trace.apply_to_schedule(schedule, remove_postproc=False)
        except Exception:  # a record this TVM cannot replay teaches nothing
            continue
        arguments = ms.arg_info.ArgInfo.from_entry_func(schedule.mod, remove_preproc=True)
        candidates.append(ms.MeasureCandidate(schedule, arguments))
        results.append(ms.runner.RunnerResult([float(s) for s in record.run_secs or []], None))
    return candidates, results


@derived_object
class _Builder(ms.builder.PyBuilder):
    """Builds each candidate in a forked child of this process, one per core at a time, and
    gives up on one after BUILD_TIMEOUT_S: a few candidates keep LLVM busy for many minutes.

    MetaSchedule's LocalBuilder starts fresh processes for every batch, each of which spends
    about 17 s importing TVM's tensor intrinsics before it builds anything, and kills builds
    after 30 s, which a loaded machine reaches; a fork has everything imported already. The
    other threads here (the runner's pool) are idle while a batch builds, and a child only
    compiles, writes its files and exits.
    """

    def build(self, build_inputs: list[Any]) -> list[Any]:
        if _INTERRUPTED:
            raise _Interrupted("tuning interrupted")
        paths = [
            # A directory per artifact: MetaSchedule's RemoveBuildArtifact deletes it whole.
            Path(tempfile.mkdtemp(prefix="tvmpipe-tune-")) / "candidate.tar"
            for _ in build_inputs
        ]
        try:
            if not hasattr(os, "fork"):
                errors = [_build_candidate(i, p) for i, p in zip(build_inputs, paths, strict=True)]
            else:
                errors = _build_forked(build_inputs, paths, len(os.sched_getaffinity(0)))
        except BaseException:
            for path in paths:
                shutil.rmtree(path.parent, ignore_errors=True)
            raise
        for path, error in zip(paths, errors, strict=True):
            if error:  # no artifact for RemoveBuildArtifact to remove
                shutil.rmtree(path.parent, ignore_errors=True)
        return [
            ms.builder.BuilderResult(None if error else str(path), error)
            for path, error in zip(paths, errors, strict=True)
        ]


def _build_candidate(build_input: Any, path: Path) -> str | None:
    """Build and export one candidate; the error as text, or None."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    try:
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(build_input.mod)
        tvm.compile(mod, target=build_input.target).export_library(str(path), fcompile=tar)
    except Exception as exc:
        return f"build failed: {type(exc).__name__}: {exc}"
    return None


def _build_forked(build_inputs: list[Any], paths: list[Path], parallel: int) -> list[str | None]:
    errors: list[str | None] = [None] * len(paths)
    pending = list(range(len(paths)))
    running: dict[int, tuple[int, float]] = {}  # pid -> (candidate, deadline)
    try:
        _run_builds(build_inputs, paths, parallel, errors, pending, running)
    finally:  # interrupted: no child outlives the call
        for pid in running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return errors


def _run_builds(
    build_inputs: list[Any],
    paths: list[Path],
    parallel: int,
    errors: list[str | None],
    pending: list[int],
    running: dict[int, tuple[int, float]],
) -> None:
    while pending or running:
        if _INTERRUPTED:
            raise _Interrupted("tuning interrupted")
        while pending and len(running) < parallel:
            index = pending.pop(0)
            pid = os.fork()
            if pid == 0:  # the child: build, leave any error beside the artifact, exit
                code = 1
                try:
                    error = _build_candidate(build_inputs[index], paths[index])
                    if error:
                        paths[index].with_suffix(".error").write_text(error)
                    else:
                        code = 0
                finally:
                    os._exit(code)
            running[pid] = (index, time.monotonic() + BUILD_TIMEOUT_S)
        time.sleep(0.01)
        for pid, (index, deadline) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() < deadline:
                continue
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                errors[index] = f"build timed out after {BUILD_TIMEOUT_S:.0f} s"
            elif status != 0:
                report = paths[index].with_suffix(".error")
                errors[index] = report.read_text() if report.is_file() else "build failed"
            del running[pid]


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Counts each measured batch on the bar, with the best time of the task so far."""

    def __init__(self, bar: Any, label: str, result: TaskResult):
        self.bar = bar
        self.label = label
        self.result = result

    def apply(
        self,
        task_scheduler: Any,
        task_id: int,
        measure_candidates: list[Any],
        builder_results: list[Any],
        runner_results: list[Any],
    ) -> None:
        times = [
            sum(float(s) for s in r.run_secs) / len(r.run_secs)
            for r in runner_results
            if r.run_secs and not r.error_msg
        ]
        if times:
            best = min(times)
            if self.result.best_s is None or best < self.result.best_s:
                self.result.best_s = best
        self.result.trials_run += len(runner_results)
        best_text = "-" if self.result.best_s is None else f"{self.result.best_s * 1e6:.1f} us"
        self.bar.set_postfix_str(f"{self.label}, best {best_text}", refresh=False)
        self.bar.update(len(runner_results))


_INTERRUPTED: list[int] = []  # Ctrl-C seen while tuning (the signal numbers)


class _Interrupted(Exception):
    """Raised by the builder after Ctrl-C: the batch in progress is dropped, nothing of it
    reaches the database."""


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[Callable[[], bool]]:
    """Ctrl-C stops tuning at the next build. A KeyboardInterrupt raised inside MetaSchedule's
    C++ loop can abort the process (std::terminate); so the first Ctrl-C is only noted, and
    the builder stops the batch; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        _INTERRUPTED.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupted: stopping (Ctrl-C again: at once)", file=sys.stderr)

    _INTERRUPTED.clear()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(_INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _meta_schedule_logs(root: Path) -> Iterator[None]:
    """MetaSchedule's tables go to each kind's logs/ directory and the console gets warnings
    only; its log files under ``root`` are closed afterwards (it leaves them open).

    MetaSchedule configures its logger by the names of the handlers it already has, and fails
    on one without a name (pytest's capture handlers end up there): those are set aside while
    tuning and put back afterwards."""
    name = "tvm.s_tir.meta_schedule"
    logger = logging.getLogger(name)
    saved = logger.level
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(saved)
        for handler in unnamed:
            logger.addHandler(handler)
        names = [n for n in logging.Logger.manager.loggerDict if n.startswith(name)]
        for each in map(logging.getLogger, names):
            for handler in list(each.handlers):
                path = Path(getattr(handler, "baseFilename", "/"))
                if path.is_relative_to(root.resolve()):
                    each.removeHandler(handler)
                    handler.close()


@contextlib.contextmanager
def _runner(
    tracker: tuple[str, int] | None, key: str, server: str | None
) -> Iterator[ms.runner.RPCRunner]:
    """An RPCRunner to a tracker's key, a server, or a loopback worker started (and stopped)
    here."""
    from .deploy import start_local_workers

    workers = []
    if tracker is not None:
        # Asked once here, so that a refusal fails now with its reason, not every trial.
        _connect_tracker(tracker, key).close(stop=False)
        config = ms.runner.RPCConfig(
            tracker_host=tracker[0],
            tracker_port=tracker[1],
            tracker_key=key,
            session_timeout_sec=int(RUN_TIMEOUT_S),
        )
        create = _tracker_session
    else:
        if server is None:
            workers = start_local_workers(1)
            server = f"{workers[0].host}:{workers[0].port}"
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"server address {server!r} is not HOST:PORT")
        # RPCConfig insists on tracker fields; _connect_direct reads them as the server's.
        config = ms.runner.RPCConfig(
            tracker_host=host,
            tracker_port=int(port),
            tracker_key="direct",
            session_timeout_sec=int(RUN_TIMEOUT_S),
        )
        create = _connect_direct
    runner = None
    try:
        runner = ms.runner.RPCRunner(config, f_create_session=create, f_cleanup=_cleanup)
        yield runner
    finally:
        if runner is not None:
            runner.pool.shutdown()
        for worker in workers:
            worker.stop()


def _cleanup(session: Any, remote_path: str | None) -> None:
    """Remove the trial's upload; the worker removes the session's directory when it ends.
    (MetaSchedule's default also removes "", which tvmpipe-worker refuses.)"""
    if session is not None and remote_path:
        with contextlib.suppress(Exception):
            session.remove(remote_path)


def _connect_tracker(tracker: tuple[str, int], key: str) -> Any:
    """A worker of ``key`` from the tracker, as deploying asks for one: the tracker names it,
    this process connects with the proof of the secret (TVM's own request offers none)."""
    from .deploy import controller_secret, request_from_tracker
    from .library import StageInfo

    where = StageInfo(f"tuning on {key}", "relax", "", "", [], None)
    secret = controller_secret()
    session = request_from_tracker(where, tracker, key, RUN_TIMEOUT_S, secret)
    if secret is not None:
        try:  # the worker proves it holds the secret too: no impostor gets the candidates
            session.handshake()
        except BaseException:
            session.close(stop=False)
            raise
    return session


def _tracker_session(config: Any) -> Any:
    """In MetaSchedule's runner process: a session with a worker of the tracker's key."""
    return _connect_tracker((config.tracker_host, config.tracker_port), config.tracker_key).rpc


def _connect_direct(config: Any) -> Any:
    """In MetaSchedule's runner process: a session with the server itself, no tracker; with
    the proof of the secret in $TVMPIPE_SECRET_FILE when there is one (README, Security)."""
    from tvmpipe.proto.rpcauth import session_proof

    from .deploy import controller_secret

    secret = controller_secret()
    key = "" if secret is None else f" {session_proof(secret)}"
    return tvm.rpc.connect(config.tracker_host, config.tracker_port, key)
