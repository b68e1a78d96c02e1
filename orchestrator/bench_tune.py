"""Comparison 7: the default build and the tuned build against onnxruntime, one thread each.

SqueezeNet from the ``onnx`` package (seeded random weights, the same in every engine) runs
unsplit in this process: TVM's default build (``llvm``, what build_pipeline compiles for unless
told otherwise), the model built for this machine's CPU with the shipped tuning database (``make
tune``, its trial budget in the row), and onnxruntime with one intra-op and one inter-op thread
as the reference. All three run on the same single core (``ONE_CORE``): each TVM side in a fresh
thread with one TVM thread (bench_common.in_fresh_thread), onnxruntime in this thread; they
alternate, repetition by repetition. Left to float over both cores of a 2-core VM, TVM's thread
ran SqueezeNet in 13.8 to 18.5 ms from one measurement to the next (its new pool's helper thread
spins on the other core for a while, and a thread that moves leaves its caches behind), and in
12.2 ms on either core alone; onnxruntime's took 9.1 to 10 ms either way.

Then the tuned model cut in two and pipelined, a stage per core (comparison 4's pipeline, built
with the database), against the tuned model unsplit and onnxruntime, each on one and on two
threads. ResNet-50 gets the same three rows, with fewer timed runs (an untuned inference takes
seconds); its tuned row is built only where the shipped database has schedules for its workloads
(``make tune`` tunes SqueezeNet: ResNet-50 at the same budget needs many hours of a small CPU),
and says so otherwise. ``$TVMPIPE_BENCH_TUNE_MODELS`` (e.g. ``light_resnet50``) runs only the
models named. onnxruntime is an optional extra (``pip install 'tvmpipe[bench]'``); without it,
or on a machine the database was not tuned for, the rows say so.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .bench_common import Row, Settings, alternate, in_fresh_thread
from .bench_network import CORES, run_split
from .models import _light_dir, _onnx, _randomize_weights, example_input
from .tune import (
    SHIPPED_DATABASE,
    apply_database,
    database_for_host,
    host_target,
    model_budget_text,
    untuned_workloads,
)

NAME = "7 tuned vs onnxruntime"
MODEL = "light_squeezenet"  # the model make tune tunes, and the one pipelined here
MODELS = {MODEL: (20, 3), "light_resnet50": (2, 1)}  # timed runs per repetition: full, quick
MODELS_ENV = "TVMPIPE_BENCH_TUNE_MODELS"  # e.g. light_resnet50: run only these
TARGET = 1.5  # tuned ms / onnxruntime ms, for MODEL
SKIP_ORT = "skipped: pip install tvmpipe[bench]"
DEFAULT_TARGET = "llvm"
PIPELINED_INPUTS = (200, 20)  # per repetition: full, quick
ONE_CORE = str(max(os.sched_getaffinity(0)))  # core 0 takes more of the machine's interrupts


def onnx_model(name: str, seed: int = 0) -> Any:
    """The ONNX model with the seeded weights ``load_onnx_model`` gives TVM."""
    model = _onnx().load(str(_light_dir() / f"{name}.onnx"))
    _randomize_weights(model, np.random.default_rng(seed))
    return model


def tvm_timer(
    executable: Any, feed: dict[str, np.ndarray], runs: int, core: str | None = ONE_CORE
) -> Callable[[], float]:
    """Median ms per run of ``executable`` on one TVM thread, warmed up, in a fresh thread
    on ``core`` (None: floating over every core)."""

    def work() -> float:
        vm = relax.VirtualMachine(executable, tvm.cpu())
        args = [tvm.runtime.tensor(v) for v in feed.values()]
        vm["main"](*args)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            vm["main"](*args)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return lambda: in_fresh_thread(work, threads=1, cores=core)


@contextlib.contextmanager
def on_core(core: str | None) -> Iterator[None]:
    """The calling thread on ``core`` (None: unchanged) for the block, then as it was."""
    if core is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(core)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _run_once(executable: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(v) for v in feed.values()))
    return np.asarray(out.numpy())


def ort_timer(
    model: Any,
    feed: dict[str, np.ndarray],
    runs: int,
    tvm_executable: Any,
    name: str = MODEL,
    core: str | None = ONE_CORE,
) -> Callable[[], float] | None:
    """Median ms per run in onnxruntime on one thread (on ``core``: None, floating), once its
    output matches TVM's; None if onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    expected = session.run(None, feed)[0]
    got = _run_once(tvm_executable, feed)
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        worst = float(np.abs(got - expected).max())
        raise RuntimeError(f"onnxruntime and TVM disagree on {name}: max |diff| {worst:.3g}")

    def measure() -> float:
        times = []
        with on_core(core):
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return measure


def ort_rate(model: Any, feed: dict[str, np.ndarray], threads: int, runs: int) -> float | None:
    """Inputs per second of onnxruntime with ``threads`` intra-op threads; None without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    session.run(None, feed)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    return runs / (time.perf_counter() - start)


def pipelined_rows(model: Any, mod: Any, tuned_dir: Any, settings: Settings) -> list[Row]:
    """The tuned model cut in two, a stage per core (comparison 4's pipeline, tuned), against
    the tuned model unsplit and onnxruntime on one and on two threads, in turns."""
    feed = example_input(mod, seed=0)
    runs = settings.count(*PIPELINED_INPUTS)
    others: dict[str, Callable[[], float]] = {}
    if ort_rate(model, feed, 1, 1) is not None:
        others["ort 1"] = lambda: ort_rate(model, feed, 1, runs) or float("nan")
        others["ort 2"] = lambda: ort_rate(model, feed, 2, runs) or float("nan")
    split = run_split(
        mod,
        settings,
        target=host_target(),
        database=tuned_dir.parent,
        others=others,
        counts=PIPELINED_INPUTS,
    )
    what = f"{MODEL} tuned, {len(CORES)} stages pipelined: throughput"
    medians, samples = split.medians, split.samples
    rows = [
        Row(
            NAME,
            what,
            "inputs/s",
            medians["tvmpipe"],
            medians["one thread"],
            "tuned unsplit, 1 thread",
            samples={k: samples[k] for k in ("tvmpipe", "one thread")},
            note=f"each stage: its own core, 1 thread; {split.balance}",
        ),
        Row(
            NAME,
            what,
            "inputs/s",
            medians["tvmpipe"],
            medians["two threads"],
            "tuned unsplit, 2 threads",
            samples={k: samples[k] for k in ("tvmpipe", "two threads")},
        ),
    ]
    for key, label in (("ort 1", "onnxruntime, 1 thread"), ("ort 2", "onnxruntime, 2 threads")):
        base, side = (medians[key], samples[key]) if key in medians else (float("nan"), [])
        rows.append(
            Row(
                NAME,
                what,
                "inputs/s",
                medians["tvmpipe"],
                base,
                label if key in medians else SKIP_ORT,
                samples={"tvmpipe": samples["tvmpipe"], key: side},
            )
        )
    return rows


def run(settings: Settings) -> list[Row]:
    wanted = os.environ.get(MODELS_ENV)
    names = [n for n in MODELS if not wanted or n in wanted.split(",")]
    return [row for name in names for row in model_rows(name, settings)]


def model_rows(name: str, settings: Settings) -> list[Row]:
    """Default, tuned and onnxruntime, one thread each, in turns; MODEL also pipelined."""
    model = onnx_model(name)
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model)
    feed = example_input(mod, seed=0)
    runs = settings.count(*MODELS[name])
    target = tvm.target.Target(host_target())
    with tvm.transform.PassContext(opt_level=3):
        default = tvm.compile(mod, tvm.target.Target(DEFAULT_TARGET))
    sides: dict[str, Callable[[], float]] = {"default": tvm_timer(default, feed, runs)}
    tuned_dir, why_untuned = database_for_host(SHIPPED_DATABASE)
    if tuned_dir is not None:
        applied = apply_database(mod, target, tuned_dir)
        missing = untuned_workloads(applied)
        if missing:
            total = sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in applied.functions_items())
            why_untuned = (
                f"the shipped database has no schedules for {len(missing)} of its {total} "
                f"workloads (make tune tunes {MODEL})"
            )
            tuned_dir = None
        else:
            with tvm.transform.PassContext(opt_level=3):
                tuned = tvm.compile(applied, target)
            sides["tuned"] = tvm_timer(tuned, feed, runs)
    reference = ort_timer(model, feed, runs, default, name)
    if reference is not None:
        sides["onnxruntime"] = reference
    medians, samples = alternate(settings.reps, sides)
    base = medians.get("onnxruntime", float("nan"))
    label = "onnxruntime, 1 thread" if reference is not None else SKIP_ORT
    rows = [
        Row(
            NAME,
            f"{name} default build, 1 thread",
            "ms",
            medians["default"],
            base,
            label,
            higher_is_better=False,
            samples=samples,
            note=f"tvm.compile for {DEFAULT_TARGET} (build_pipeline's default target), no tuning",
        )
    ]
    if tuned_dir is None:
        rows.append(
            Row(NAME, f"{name} tuned: skipped", "ms", float("nan"), base, why_untuned, False)
        )
        return rows
    budget = model_budget_text(mod, host_target(), tuned_dir)
    rows.append(
        Row(
            NAME,
            f"{name} tuned ({budget}), 1 thread",
            "ms",
            medians["tuned"],
            base,
            label,
            higher_is_better=False,
            target=TARGET if reference is not None and name == MODEL else None,
            samples=samples,
            note=f"MetaSchedule database {tuned_dir.name}, made by make tune",
        )
    )
    if name != MODEL:
        return rows
    return rows + pipelined_rows(model, mod, tuned_dir, settings)
