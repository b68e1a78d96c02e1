"""``make soak``: stream many inputs and check that no process accumulates fds or memory.

A three-stage pipeline on local loopback workers: ``increment`` (a Python stage, x + 1),
``negate`` (a compiled Relax stage) and ``double`` (a Python stage, x * 2). Input i is a float32
tensor of the value i (64 KiB by default: from that size on ZeroMQ sends without copying, and
pyzmq tracks each buffer until it is sent), so every result is checked exactly and in order.
A producer thread calls ``set_input`` + ``run`` as fast as the window lets it; this thread
takes the results. At intervals and at the end it prints the open file descriptors and RSS of every
process involved: this client, each worker, each session process (where a stage runs).

It exits 1 if a result is wrong, if a process holds more fds at the end than after the
warm-up, or if a process's RSS ever exceeds its warm-up RSS by more than the tolerance; 2 if the
pipeline could not run at all.

    tvmpipe soak [--inputs 100000] [--kib 64] [--window 256] [--warmup N] [--rss-tolerance-mib 32]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import tvm
from tvm import relax

from tvmpipe.proto.errors import TvmpipeError

from . import forks
from .build import build_pipeline
from .client import PipelineModule
from .config import PipelineModuleConfig
from .library import PipelineLibrary

MIB = 1 << 20
VALUES = 1 << 20  # input i carries i % VALUES: every result stays exact in float32
WAIT_S = 60.0
SAMPLE_S = 0.5  # fds and RSS of every process, this often after the warm-up


# ----- the stages (module level: the workers import them from this module)


def increment(data: np.ndarray) -> np.ndarray:
    """First stage: ``data + 1``."""
    return data + 1


def double(data: np.ndarray) -> np.ndarray:
    """Last stage: ``data * 2``."""
    return data * 2


def negate_module(elements: int) -> tvm.IRModule:
    """Middle stage: ``main(data) -> -data``, compiled."""
    data = relax.Var("data", relax.TensorType([elements], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [data]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.negative(data))
        bb.emit_func_output(out)
    return bb.get()


def expected(i: int) -> float:
    return -((i % VALUES) + 1) * 2.0


def build_soak_pipeline(elements: int) -> PipelineLibrary:
    negate = negate_module(elements)
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (increment, "data")
    cfg.connect(increment, 0, negate, "data")
    cfg.connect(negate, 0, double, "data")
    cfg.outputs.append((double, 0))
    cfg[increment].name, cfg[negate].name, cfg[double].name = "increment", "negate", "double"
    cfg[negate].num_threads = 1  # no pool of spinning threads next to the Python stages
    with tvm.transform.PassContext(opt_level=3):
        return build_pipeline(cfg)


# ----- watching the processes


@dataclass
class Watched:
    """One process's fds and RSS: after the warm-up, the highest since, and the latest."""

    label: str
    proc: psutil.Process
    fds: list[int] = field(default_factory=list)  # [warm-up, max, latest]
    rss: list[float] = field(default_factory=list)  # MiB, the same

    def sample(self) -> None:
        try:
            with self.proc.oneshot():
                fds, rss = self.proc.num_fds(), self.proc.memory_info().rss / MIB
        except psutil.Error:
            return  # gone: the last sample stays, and the pipeline fails anyway
        if not self.fds:
            self.fds, self.rss = [fds, fds, fds], [rss, rss, rss]
        else:
            self.fds[1:] = [max(self.fds[1], fds), fds]
            self.rss[1:] = [max(self.rss[1], rss), rss]


def watched_processes(pipe: PipelineModule) -> list[Watched]:
    """This process, then each stage's session process and the worker that forked it."""
    me = psutil.Process()
    stages = pipe.stats()["stages"]
    stage_of = {data.get("pid"): name for name, data in stages.items()}
    found = [Watched("client", me)]
    for worker in forks.children():
        sessions = worker.children()
        names = [stage_of.get(s.pid, f"session {s.pid}") for s in sessions]
        found.append(Watched(f"worker({','.join(names) or '-'})", worker))
        found += [Watched(name, s) for name, s in zip(names, sessions, strict=True)]
    return found


def progress_line(done: int, total: int, rate: float, watched: list[Watched]) -> str:
    """The latest sample of every process, as ``label fds/RSS``."""
    parts = [f"{w.label} {w.fds[2]}/{w.rss[2]:.0f}" if w.fds else f"{w.label} -" for w in watched]
    return f"{done:>9,}/{total:,}  {rate:6.0f}/s  fds/RSS MiB: " + "  ".join(parts)


# ----- the run


def _produce(pipe: PipelineModule, count: int, elements: int, errors: list[BaseException]) -> None:
    try:
        for i in range(count):
            pipe.set_input("data", np.full(elements, i % VALUES, dtype="float32"))
            pipe.run()
    except BaseException as exc:  # handed to the main thread
        errors.append(exc)


def _next_result(pipe: PipelineModule, errors: list[BaseException]) -> list[np.ndarray]:
    """get_output returns [] at once while nothing is launched: the producer may lag behind."""
    deadline = time.monotonic() + WAIT_S
    while not errors and time.monotonic() < deadline:
        out = pipe.get_output(timeout=0.1)
        if out:
            return out
        time.sleep(0.001)
    return []


@dataclass
class Outcome:
    received: int = 0
    wrong: int = 0
    elapsed: float = 0.0
    stages: dict[str, Any] = field(default_factory=dict)


def _consume(
    pipe: PipelineModule, args: argparse.Namespace, elements: int, watched: list[Watched]
) -> Outcome:
    """Take and check every result; sample the processes from the warm-up on."""
    errors: list[BaseException] = []
    producer = threading.Thread(
        target=_produce, args=(pipe, args.inputs, elements, errors), name="soak-producer"
    )
    done = Outcome()
    started = last_print = last_sample = time.monotonic()
    producer.start()
    try:
        for i in range(args.inputs):
            out = _next_result(pipe, errors)
            if not out:
                why = f"the producer failed: {errors[0]!r}" if errors else "it did not come"
                print(f"result {i}: {why}", file=sys.stderr)
                break
            done.received += 1
            got, want = out[0], expected(i)
            if got.shape != (elements,) or got[0] != want or not (got == want).all():
                done.wrong += 1
                if done.wrong <= 5:
                    print(f"result {i} is wrong: {got[:4]}..., expected {want}")
            now = time.monotonic()
            warm = done.received == args.warmup
            if warm or (done.received > args.warmup and now - last_sample >= SAMPLE_S):
                for w in watched:
                    w.sample()
                last_sample = now
            if warm or (done.received > args.warmup and now - last_print >= args.interval):
                rate = done.received / (now - started)
                print(progress_line(done.received, args.inputs, rate, watched), flush=True)
                last_print = now
        done.elapsed = time.monotonic() - started
        for w in watched:
            w.sample()
        rate = done.received / done.elapsed
        print(progress_line(done.received, args.inputs, rate, watched))
        done.stages = pipe.stats()["stages"]
    finally:
        pipe.close()  # a producer still waiting for room gets PipelineClosedError
        producer.join(WAIT_S)
    return done


def soak(args: argparse.Namespace) -> int:
    elements = max(1, args.kib * 1024 // 4)
    print(
        f"tvmpipe soak: {args.inputs:,} inputs of {elements * 4 / 1024:g} KiB through "
        f"increment (Python) -> negate (Relax) -> double (Python), window {args.window}; "
        f"baseline after {args.warmup:,} inputs"
    )
    lib = build_soak_pipeline(elements)
    try:
        with PipelineModule(lib, window=args.window) as pipe:
            watched = watched_processes(pipe)
            done = _consume(pipe, args, elements, watched)
    finally:
        lib.close()
    return report(args, watched, done)


def report(args: argparse.Namespace, watched: list[Watched], done: Outcome) -> int:
    """The final figures; 0 if everything came back right and nothing grew, else 1."""
    rate = done.received / done.elapsed if done.elapsed else 0.0
    print(f"\n{done.received:,} results in {done.elapsed:.1f} s ({rate:.0f}/s)")
    for name, data in done.stages.items():
        print(
            f"  stage {name:9} processed {data['processed']:,}  failed {data['failed']}  "
            f"dropped {data['dropped']}  service mean {data['service_mean_s'] * 1e6:.0f} us"
        )
    print(
        f"\n  {'process':20} {'pid':>7}  fds: warm  max  end  RSS MiB: warm   peak    end  growth"
    )
    problems = []
    for w in watched:
        if not w.fds:
            problems.append(f"{w.label} (pid {w.proc.pid}) could not be sampled")
            continue
        (fd_warm, fd_max, fd_end), (rss_warm, rss_peak, rss_end) = w.fds, w.rss
        growth = rss_peak - rss_warm
        print(
            f"  {w.label:20} {w.proc.pid:>7}  {fd_warm:9} {fd_max:4} {fd_end:4}  "
            f"{rss_warm:13.1f} {rss_peak:6.1f} {rss_end:6.1f} {growth:+7.1f}"
        )
        if fd_end > fd_warm:
            problems.append(f"{w.label}: fds grew from {fd_warm} to {fd_end}")
        if growth > args.rss_tolerance_mib:
            problems.append(f"{w.label}: RSS grew by {growth:.1f} MiB")
    if done.received < args.inputs:
        problems.append(f"only {done.received:,} of {args.inputs:,} results came")
    for name, data in done.stages.items():
        if data["processed"] != args.inputs or data["failed"] or data["dropped"]:
            problems.append(f"stage {name}: {data}")
    if done.wrong:
        problems.append(f"{done.wrong} wrong result(s)")
    if problems:
        print("\nFAILED: " + "; ".join(problems))
        return 1
    print(
        f"\nOK: {args.inputs:,} results correct and in order; after the warm-up no process "
        f"gained an fd, none grew by more than {args.rss_tolerance_mib:g} MiB of RSS"
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tvmpipe soak", description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs to stream")
    parser.add_argument("--kib", type=int, default=64, help="size of each input tensor")
    parser.add_argument("--window", type=int, default=256, help="inputs in flight at most")
    parser.add_argument(
        "--warmup", type=int, default=None, help="results before the baseline (default: 10%%)"
    )
    parser.add_argument(
        "--rss-tolerance-mib", type=float, default=32.0, help="RSS growth allowed per process"
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between reports")
    args = parser.parse_args(argv)
    if args.inputs < 1 or args.kib < 1 or args.window < 1:
        parser.error("--inputs, --kib and --window must be at least 1")
    if args.warmup is None:
        args.warmup = args.inputs // 10
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return soak(args)
    except TvmpipeError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
