"""``make demo``: a real network split in three, deployed by tracker key, checked input by input.

It starts TVM's tracker and three ``tvmpipe-worker``\\ s on loopback (a LocalCluster under key
"demo"), imports SqueezeNet from the ``onnx`` package with seeded random weights, measures its
pieces and the links on those workers and plans the split (plan.py; measurements are cached, so
a second run is quicker), builds the stages and the unsplit model, streams the inputs through
the pipeline, and compares every result with the unsplit model run in this process. It prints
the plan, the per-stage statistics against the plan's predictions, both throughputs as measured,
and exits 1 if any result differs.

Each stage gets one TVM thread that may run on every core (``cpu_affinity``). Left to TVM's
defaults, creating a one-thread pool pins the thread that creates it to core 0, and the worker
creates it before the stage's first input, so every stage would share core 0;
``--stage-cores tvm`` shows that.

    python -m tvmpipe.orchestrator.demo [--inputs 64] [--stages 3] [--model light_squeezenet]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import tvm
from tvm import relax

from tvmpipe.proto.errors import TvmpipeError

from .build import build_pipeline
from .client import PipelineModule
from .localcluster import LocalCluster
from .models import example_input, load_onnx_model
from .plan import plan_pipeline
from .split import split_module
from .tune import (
    SHIPPED_DATABASE,
    apply_database,
    budget_text,
    database_for_host,
    host_target,
    read_kind,
)

KEY = "demo"
RTOL, ATOL = 1e-5, 1e-6
# Inputs in flight: enough to keep every stage busy with one queued behind it, and no more;
# more would only lengthen the queues, not raise throughput.
WINDOW_PER_STAGE = 2


@dataclass
class Run:
    """One way of computing the outputs of all inputs: how long it took, on how many cores."""

    label: str
    outputs: list[list[np.ndarray]]
    seconds: float
    cpu_seconds: float  # CPU time of every process involved, over the same interval

    @property
    def rate(self) -> float:
        return len(self.outputs) / self.seconds

    @property
    def cores(self) -> float:
        return self.cpu_seconds / self.seconds


# ----- the unsplit model in this process
def run_unsplit(executable: Any, mod: tvm.IRModule, inputs: Sequence[dict[str, np.ndarray]]) -> Run:
    """Every input through the unsplit model, with TVM's default threads.

    In a fresh thread with a fresh VirtualMachine, so it starts as cold as the stages do.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            vm = relax.VirtualMachine(executable, tvm.cpu())
            names = [p.name for p in mod["main"].params]
            args = [[tvm.runtime.tensor(x[n]) for n in names] for x in inputs]
            cpu, start = time.process_time(), time.perf_counter()
            outputs = [_as_list(vm["main"](*a)) for a in args]
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            # Only now: creating the thread pool to ask its size pins a one-thread pool.
            threads = int(tvm.get_global_func("runtime.NumThreads")())
            label = f"unsplit model in this process, {_plural(threads, 'thread')}"
            result["value"] = Run(label, outputs, seconds, cpu)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=work, name="tvmpipe-demo-unsplit")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    run: Run = result["value"]
    return run


def _as_list(value: Any) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    return [x for v in value for x in _as_list(v)]


def _cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    times = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            times[pid] = t.user + t.system
    return times


# ----- the pipeline on a loopback cluster
def run_pipeline(
    lib: Any, inputs: Sequence[dict[str, np.ndarray]], cluster: LocalCluster
) -> tuple[Run, dict[str, Any]]:
    """Stream the inputs through the pipeline on a LocalCluster; the run and the stats."""
    n_stages = len(lib.stages)
    with step("deploying the stages by tracker key"):
        pipe = PipelineModule(lib, tracker=cluster.tracker, progress=False)
    with pipe:
        window = WINDOW_PER_STAGE * n_stages
        pipe.report(show=False)  # its interval starts here
        with step(f"streaming {len(inputs)} inputs through the pipeline ({window} in flight)"):
            pids = [os.getpid(), *cluster.pids()]  # the stages' session processes included
            before, start = _cpu_seconds(pids), time.perf_counter()
            outputs = [list(o) for o in pipe.map(inputs, window=window)]
            seconds, after = time.perf_counter() - start, _cpu_seconds(pids)
        stats = pipe.stats()
        _name_workers(stats, cluster)
        stats["report"] = pipe.report(show=False)
    cpu = sum(after[p] - before[p] for p in after if p in before)
    label = f"pipeline, {_plural(n_stages, 'stage')} on {_plural(n_stages, 'worker')}"
    return Run(label, outputs, seconds, cpu), stats


def _name_workers(stats: dict[str, Any], cluster: LocalCluster) -> None:
    """Replace a tracker placement (``key@tracker``) with the worker that serves the stage.

    Found through the process listening on the stage's data port; left as it is if that
    cannot be read.
    """
    listeners: dict[int, int] = {}
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.pid is not None and conn.laddr:
                listeners[conn.laddr.port] = conn.pid
    for data in stats["stages"].values():
        port = str(data.get("address", "")).rpartition(":")[2]
        pid = listeners.get(int(port)) if port.isdigit() else None
        worker = cluster.worker_of(pid) if pid is not None else None
        if worker is not None:
            data["worker"] = f"{worker[0]}:{worker[1]}"


# ----- comparing and reporting
def mismatches(got: Sequence[list[np.ndarray]], expected: Sequence[list[np.ndarray]]) -> list[str]:
    """One line per input whose outputs differ from the reference beyond RTOL/ATOL."""
    bad = []
    for i, (outs, refs) in enumerate(zip(got, expected, strict=True)):
        if len(outs) != len(refs):
            bad.append(f"input {i}: {len(outs)} outputs, expected {len(refs)}")
            continue
        for k, (out, ref) in enumerate(zip(outs, refs, strict=True)):
            try:
                np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
            except AssertionError:
                diff = np.abs(out.astype(np.float64) - ref) if out.shape == ref.shape else None
                detail = f"max |diff| {diff.max():.3g}" if diff is not None else "shape differs"
                bad.append(f"input {i}, output {k}: {detail} ({out.shape} vs {ref.shape})")
    return bad


def stage_table(stats: dict[str, Any], predicted: Sequence[float] | None = None) -> list[str]:
    header: tuple[str, ...] = ("stage", "device", "worker", "cores", "threads", "inputs")
    header += ("mean ms", "p99 ms") + (() if predicted is None else ("planned ms",))
    rows = [header]
    for index, (name, s) in enumerate(stats["stages"].items()):
        planned = () if predicted is None else (f"{predicted[index] * 1e3:.1f}",)
        rows.append(
            (
                name,
                str(s.get("device", "?")),
                str(s.get("worker", "?")),
                ",".join(str(c) for c in s.get("cores", [])) or "?",
                str(s.get("threads", "?")),
                str(s.get("processed", 0)),
                f"{s.get('service_mean_s', 0.0) * 1e3:.1f}",
                f"{s.get('service_p99_s', 0.0) * 1e3:.1f}",
                *planned,
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    left = 4  # text columns; the numbers are right-aligned
    return [
        "  "
        + "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


@contextmanager
def step(what: str) -> Iterator[None]:
    """Print ``what...``, then how long it took, on the same line."""
    print(f"{what}...", end=" ", flush=True)
    start = time.perf_counter()
    yield
    print(f"{time.perf_counter() - start:.1f} s", flush=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tvmpipe demo", description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=64, help="inputs to stream (default 64)")
    parser.add_argument("--stages", type=int, default=3, help="pipeline stages (default 3)")
    parser.add_argument("--model", default="light_squeezenet", help="an onnx 'light' model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument("--cuts", help="where to cut main, e.g. 42,82 (default: planned)")
    parser.add_argument(
        "--database",
        default=str(SHIPPED_DATABASE),
        help="the tuning database to build from (default: the one make tune shipped); "
        "'none' builds untuned",
    )
    parser.add_argument(
        "--segments", type=int, default=16, help="candidate pieces the planner measures"
    )
    parser.add_argument(
        "--stage-threads", type=int, default=1, help="TVM threads per stage; 0: TVM's default"
    )
    parser.add_argument(
        "--stage-cores",
        default="all",
        help="cores each stage may use: 'all' (default), a list like '0-3', or 'tvm' for "
        "TVM's default placement",
    )
    args = parser.parse_args(argv)
    if args.inputs < 1 or args.stages < 1 or args.stage_threads < 0:
        parser.error("--inputs and --stages must be at least 1, --stage-threads at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    print(f"tvmpipe demo: {args.model} from the onnx package, seeded random weights")
    try:
        code = _demo(args)
    except TvmpipeError as exc:
        print(f"\nerror: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # everything started is stopped by the with blocks on the way out
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"done in {time.perf_counter() - start:.0f} s")
    return code


def _demo(args: argparse.Namespace) -> int:
    with step("loading the model"):
        mod = load_onnx_model(args.model, args.seed)
        inputs = [example_input(mod, seed=args.seed + i) for i in range(args.inputs)]
    bindings = len(mod["main"].body.blocks[0].bindings)
    target, database, tuned = _tuning(args.database)
    with step(f"starting TVM's tracker and {args.stages} workers under key {KEY!r}"):
        cluster = LocalCluster(args.stages, key=KEY)
    with cluster:
        predicted: list[float] | None = None
        if args.cuts:
            cuts = [int(c) for c in args.cuts.split(",")]
            print(f"{bindings} bindings; cut at {cuts} (as given)")
        else:
            with step(
                f"measuring {args.segments} pieces of main and the links on the workers, "
                f"planning up to {args.stages} stages"
            ):
                plan = plan_pipeline(
                    mod,
                    tracker=cluster.tracker,
                    keys=[KEY],
                    max_stages=args.stages,
                    segments=args.segments,
                    targets={KEY: target},
                    database=database,
                )
            cuts, predicted = plan.cuts, plan.stage_times_s()
            cached = (
                " (piece times from the cache)" if all(plan.measured["cached"].values()) else ""
            )
            print(f"{bindings} bindings; the plan{cached}:")
            print("\n".join(f"  {line}" for line in str(plan).splitlines()))
        cfg = split_module(mod, cuts)
        n_stages = len(cfg.modules)
        cores = _cores(args.stage_cores)
        threads = args.stage_threads or None
        for module in cfg.modules:
            cfg[module].target = target
            cfg[module].rpc_key = KEY
            cfg[module].num_threads = threads
            cfg[module].cpu_affinity = cores
        where = f"cores {cores}" if cores else "TVM's default placement"
        count = _plural(threads, "TVM thread") if threads else "TVM's default threads"
        print(f"each stage: {count}, {where}")
        building = f"building {n_stages} stages and the unsplit model (opt_level=3)"
        with step(building), tvm.transform.PassContext(opt_level=3):
            lib = build_pipeline(cfg, progress=False, database=database)  # lines of its own
            whole = mod if tuned is None else apply_database(mod, target, tuned)
            executable = tvm.compile(whole, tvm.target.Target(target))
        try:
            pipeline, stats = run_pipeline(lib, inputs, cluster)
        finally:
            lib.close()
    with step(f"running the unsplit model on the same {len(inputs)} inputs in this process"):
        unsplit = run_unsplit(executable, mod, inputs)

    print()
    print("\n".join(stage_table(stats, predicted)))
    if predicted is not None:
        print(
            "  (planned: each stage timed alone on one worker; in the pipeline the stages share "
            "this machine's cores)"
        )
    print()
    print("\n".join(f"  {line}" for line in stats["report"].splitlines()))
    print()
    for run in (pipeline, unsplit):
        print(
            f"  {run.label:<42} {run.rate:5.2f} inputs/s  {run.seconds:5.1f} s  "
            f"{run.cores:.1f} cores busy"
        )
    print(f"  {'speedup':<42} {pipeline.rate / unsplit.rate:5.2f}x")
    print()

    bad = mismatches(pipeline.outputs, unsplit.outputs)
    total = len(unsplit.outputs)
    if bad:
        print(f"{total - len(bad)}/{total} results match the unsplit model; these differ:")
        for line in bad[:20]:
            print(f"  {line}")
        if len(bad) > 20:
            print(f"  ... and {len(bad) - 20} more")
        return 1
    print(f"{total}/{total} results match the unsplit model (rtol {RTOL:g}, atol {ATOL:g})")
    return 0


def _tuning(spec: str) -> tuple[Any, str | None, Any]:
    """The target, the database and its kind for this machine; untuned with one line saying
    why when the database was tuned for another CPU."""
    if spec == "none":
        print("building untuned (--database none)")
        return "llvm", None, None
    tuned, why = database_for_host(spec)
    if tuned is None:
        print(f"{why}: building untuned (tvmpipe tune makes one for this machine)")
        return "llvm", None, None
    print(f"building with tuned schedules: {tuned} ({budget_text(read_kind(tuned))}, make tune)")
    return host_target(), spec, tuned


def _cores(spec: str) -> str | None:
    """The ``cpu_affinity`` for every stage: None leaves TVM's default placement."""
    if spec == "tvm":
        return None
    if spec == "all":
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    return spec


if __name__ == "__main__":
    sys.exit(main())
