"""Comparison 4: a real network split in two against the unsplit model in one process.

SqueezeNet from the ``onnx`` package (seeded random weights) is cut where multiply-adds balance
(demo.py's estimate), then once more after timing the two stages alone: here a multiply-add of
the late layers costs more than one of the early layers (the first cut leaves the second stage
25 to 45% slower than the first; the row's note gives both). Each stage is pinned to its own
core with one TVM thread. The unsplit model runs in this process with one TVM thread, and with
two, each in a fresh thread configured like a stage so that TVM pins nothing behind our back.
On 2 cores the pipeline's ideal is twice the one-thread figure. Comparison 5's latency row for
this pipeline is measured here too, while the pipeline is up.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .bench_common import (
    Row,
    Settings,
    alternate,
    in_fresh_thread,
    median,
    stream_rate,
)
from .bench_latency import latency_rows
from .build import build_pipeline
from .client import PipelineModule
from .demo import mismatches
from .library import PipelineLibrary
from .macs import balanced_cuts, binding_costs
from .measure import candidate_cuts
from .models import example_input, load_onnx_model
from .split import split_module
from .tune import apply_database, find_database

NAME = "4 real network"
MODEL = "light_squeezenet"
CORES = ("0", "1")
TARGET = 1.7
WINDOW = 4  # two inputs per stage: one computing, one queued
INPUTS = (16, 4)  # per repetition: full, quick
CALIBRATION_RUNS = 5
LATENCY_REQUESTS = (6, 2)  # single requests per repetition: full, quick
TUNED_PIECES = 16  # make tune's --segments: the pieces whose workloads it tuned


def unsplit_rate(
    executable: Any, inputs: Sequence[dict[str, np.ndarray]], threads: int
) -> tuple[float, float]:
    """Inputs per second of the unsplit model in a fresh thread with ``threads`` TVM threads,
    and how many cores this process kept busy meanwhile."""

    def work() -> tuple[float, float]:
        vm = relax.VirtualMachine(executable, tvm.cpu())
        args = [[tvm.runtime.tensor(v) for v in item.values()] for item in inputs]
        vm["main"](*args[0])  # warm-up: the thread pool starts here
        cpu, start = time.process_time(), time.perf_counter()
        for a in args:
            vm["main"](*a)
        seconds = time.perf_counter() - start
        return len(args) / seconds, (time.process_time() - cpu) / seconds

    return in_fresh_thread(work, threads=threads)


def unsplit_outputs(executable: Any, inputs: Sequence[dict[str, np.ndarray]]) -> list[list[Any]]:
    def work() -> list[list[Any]]:
        vm = relax.VirtualMachine(executable, tvm.cpu())
        return [_numpy_list(vm["main"](*map(tvm.runtime.tensor, x.values()))) for x in inputs]

    return in_fresh_thread(work, threads=1)


def build(
    mod: tvm.IRModule, cuts: list[int], target: Any = "llvm", database: Path | None = None
) -> PipelineLibrary:
    cfg = split_module(mod, cuts)
    for module, core in zip(cfg.modules, CORES, strict=True):
        cfg[module].cpu_affinity = core
        cfg[module].num_threads = 1
        cfg[module].target = target
    with tvm.transform.PassContext(opt_level=3):
        return build_pipeline(cfg, database=database)


def stage_seconds(lib: PipelineLibrary, example: dict[str, np.ndarray]) -> list[float]:
    """Median seconds of each stage on one input, one TVM thread, in this process."""

    def work() -> list[float]:
        values: dict[str, Any] = dict(example)
        seconds = []
        for stage in lib.stages:
            runner = lib.runner(stage)
            feed = {name: values[name] for name in stage.input_names}
            outputs = runner(feed)  # warm-up
            times = []
            for _ in range(CALIBRATION_RUNS):
                start = time.perf_counter()
                runner(feed)
                times.append(time.perf_counter() - start)
            seconds.append(float(np.median(times)))
            for edge in lib.connections:
                if edge.src == stage.name:
                    values[edge.param] = outputs[edge.index]
        return seconds

    return in_fresh_thread(work, threads=1)


def rebalanced_cuts(costs: Sequence[float], cuts: list[int], seconds: Sequence[float]) -> list[int]:
    """Cuts that balance the costs once each stage's are scaled to its measured time."""
    bounds = [0, *cuts, len(costs)]
    weighted: list[float] = []
    for (lo, hi), took in zip(itertools.pairwise(bounds), seconds, strict=True):
        scale = took / max(sum(costs[lo:hi]), 1e-9)
        weighted.extend(c * scale for c in costs[lo:hi])
    return balanced_cuts(weighted, len(cuts) + 1)


def _snap(cuts: list[int], allowed: Sequence[int] | None) -> list[int]:
    """Each cut moved to the nearest allowed one (all allowed when None)."""
    if not allowed:
        return cuts
    return sorted({min(allowed, key=lambda a: abs(a - cut)) for cut in cuts})


def _numpy_list(value: Any) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    return [x for v in value for x in _numpy_list(v)]


@dataclass
class SplitRun:
    """One split pipeline streamed against the unsplit model (and any other sides given)."""

    medians: dict[str, float]
    samples: dict[str, list[float]]
    busy: dict[int, list[float]]  # threads -> cores the unsplit model kept busy, per repetition
    balance: str  # where it was cut, and why
    latency: Row | None


def run_split(
    mod: tvm.IRModule,
    settings: Settings,
    *,
    target: Any = "llvm",
    database: Path | None = None,
    others: dict[str, Callable[[], float]] | None = None,
    latency_what: str | None = None,
    counts: tuple[int, int] = INPUTS,
) -> SplitRun:
    """``mod`` cut in two (multiply-adds, then rebalanced by the stages' times), built for
    ``target`` (with the tuning ``database``), checked against the unsplit model, and streamed
    in turns with the unsplit model on one and two threads and the ``others`` (inputs/s);
    ``counts``: inputs per repetition, in a full run and a quick one."""
    costs = binding_costs(mod)
    # Tuned, a cut must fall where make tune's pieces end: a stage's edge elsewhere splits a
    # fused workload (a convolution from its bias) into ones the database never saw.
    allowed = candidate_cuts(mod, TUNED_PIECES) if database is not None else None
    first = _snap(balanced_cuts(costs, len(CORES)), allowed)
    example = example_input(mod, seed=0)
    cuts, rebalanced = first, ""
    if not settings.quick:  # a smoke test keeps the first cut: one build less
        lib = build(mod, first, target, database)
        try:
            first_seconds = stage_seconds(lib, example)
        finally:
            lib.close()
        cuts = _snap(rebalanced_cuts(costs, first, first_seconds), allowed)
        first_took = " / ".join(f"{s * 1e3:.0f}" for s in first_seconds)
        rebalanced = f"; by multiply-adds alone {first} ({first_took} ms)"
    lib = build(mod, cuts, target, database)
    if database is None:
        prepared = mod
    else:
        prepared = apply_database(mod, target, find_database(database, target))
    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(prepared, tvm.target.Target(target))
    count = settings.count(*counts)
    inputs = [example_input(mod, seed=i) for i in range(WINDOW + count)]
    latency = None
    try:
        seconds = stage_seconds(lib, example)
        with PipelineModule(lib, window=WINDOW) as pipe:
            settings.settle()
            outputs = [list(o) for o in pipe.map(inputs[:WINDOW], window=WINDOW)]
            bad = mismatches(outputs, unsplit_outputs(executable, inputs[:WINDOW]))
            if bad:
                raise RuntimeError(f"the split model differs from the unsplit model: {bad[0]}")
            busy: dict[int, list[float]] = {1: [], 2: []}

            def unsplit(threads: int) -> float:
                rate, cores = unsplit_rate(executable, inputs[:count], threads)
                busy[threads].append(cores)
                return rate

            medians, samples = alternate(
                settings.reps,
                {
                    "tvmpipe": lambda: stream_rate(pipe, inputs, WINDOW, WINDOW),
                    "one thread": lambda: unsplit(1),
                    "two threads": lambda: unsplit(2),
                    **(others or {}),
                },
            )
            if latency_what is not None:
                (latency,) = latency_rows(
                    latency_what, pipe, lib, inputs, settings, LATENCY_REQUESTS
                )
    finally:
        lib.close()
    took = " / ".join(f"{s * 1e3:.0f}" for s in seconds)
    balance = f"cut at {cuts} ({took} ms alone){rebalanced}"
    return SplitRun(medians, samples, busy, balance, latency)


def run(settings: Settings) -> list[Row]:
    mod = load_onnx_model(MODEL, seed=0)
    what = f"{MODEL}, {len(CORES)} stages"
    split = run_split(mod, settings, latency_what=what)
    medians, samples, busy = split.medians, split.samples, split.busy
    assert split.latency is not None
    return [
        Row(
            NAME,
            f"{what}: throughput",
            "inputs/s",
            medians["tvmpipe"],
            medians["one thread"],
            "unsplit, 1 thread",
            target=TARGET,
            samples={k: samples[k] for k in ("tvmpipe", "one thread")},
            note=f"each stage: its own core, 1 thread; {split.balance}",
        ),
        Row(
            NAME,
            f"{what}: throughput",
            "inputs/s",
            medians["tvmpipe"],
            medians["two threads"],
            "unsplit, 2 threads",
            samples={k: samples[k] for k in ("tvmpipe", "two threads")},
            note=f"the unsplit model kept {median(busy[2]):.2f} cores busy with 2 threads, "
            f"{median(busy[1]):.2f} with 1",
        ),
        split.latency,
    ]
