"""``tvmpipe bench`` / ``make bench``: tvmpipe side by side with its baselines, on this machine.

    tvmpipe bench [--json build/bench.json] [--reps 5] [--quick] [--only 1,3] [--busy-ms 10]

1. data plane: one hop between stage workers against raw pyzmq in the same process layout
2. orchestration: chains of 2, 4, 8 "accelerator" stages against the ideal 1/T
3. tvm.rpc by hand: the same compiled stages on the same RPC servers, driven from here
4. real network: SqueezeNet split over 2 cores against the unsplit model (1 and 2 threads)
5. latency: one request at a time through a pipeline against ``run_local``
6. planning: the planned split on 3 unequal simulated boards against a sweep and multiply-adds
7. tuning: SqueezeNet built from the shipped tuning database against onnxruntime, one thread
8. security: the data plane authenticated (the default) and encrypted, against it off

Each comparison runs both sides in this run, alternating repetitions, and reports medians.
It prints one table and writes the same figures, the raw samples and the machine as JSON.
The exit status is 1 only if a comparison could not run (``--strict``: or missed a target).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import (
    bench_accel,
    bench_dataplane,
    bench_handdriven,
    bench_network,
    bench_plan,
    bench_security,
    bench_tune,
)
from .bench_common import Row, Settings

BUSY_MS = 10.0
# Left out of --quick unless named in --only: 6 and 7 take minutes; 8 deploys six pipelines
# that comparison 1 already smoke-tests without security
SLOW_COMPARISONS = ("6", "7", "8")


def comparisons(args: argparse.Namespace) -> dict[str, Callable[[Settings], list[Row]]]:
    """Rows of comparison 5 come from 3 and 4, which have the pipelines deployed."""
    return {
        "1": bench_dataplane.run,
        "2": lambda s: bench_accel.run(s, args.busy_ms),
        "3": bench_handdriven.run,
        "4": bench_network.run,
        "6": bench_plan.run,
        "7": bench_tune.run,
        "8": bench_security.run,
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("apache-tvm", "pyzmq", "numpy", "msgpack", "tvmpipe"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    import zmq

    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libzmq": zmq.zmq_version(),
        "versions": versions,
        "load_average": list(os.getloadavg()),
        "sleep_10ms_ms": sleep_overshoot(),
    }


def sleep_overshoot(ms: float = 10.0, samples: int = 20) -> float:
    """What ``time.sleep(0.010)`` takes here, median in ms: machines of one kind differ, and
    the sleeping "accelerator" stages of comparison 2 can go no faster than it."""
    taken = []
    for _ in range(samples):
        start = time.perf_counter()
        time.sleep(ms / 1e3)
        taken.append((time.perf_counter() - start) * 1e3)
    return sorted(taken)[samples // 2]


def table(rows: Sequence[Row]) -> list[str]:
    header = ("comparison", "metric", "unit", "tvmpipe", "baseline", "vs", "ratio", "target", "met")
    lines = [header]
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        lines.append(
            (
                r.comparison,
                r.metric,
                r.unit,
                _num(r.tvmpipe),
                _num(r.baseline),
                r.baseline_label,
                f"{r.ratio:.2f}",
                r.target_text,
                met,
            )
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    numeric = {3, 4, 6}
    return [
        "  ".join(
            cell.rjust(w) if c in numeric else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tvmpipe bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 5, quick 1)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short streams, no rebalanced cut, no comparisons 6 to 8: a smoke test",
    )
    parser.add_argument("--only", help="comparisons to run, e.g. 1,3 (5 comes with 3 and 4)")
    parser.add_argument(
        "--busy-ms", type=float, default=BUSY_MS, help=f"T of comparison 2 (default {BUSY_MS:g})"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)
    if args.reps < 1 or args.busy_ms <= 0:
        parser.error("--reps and --busy-ms must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = Settings(reps=args.reps, quick=args.quick)
    chosen = comparisons(args)
    if args.only:
        wanted = set(args.only.replace(" ", "").split(","))
        unknown = wanted - set(chosen) - {"5"}
        if unknown:
            print(f"tvmpipe bench: no comparison {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        if "5" in wanted:  # its rows come from the pipelines 3 and 4 deploy
            wanted |= {"3", "4"}
        chosen = {k: v for k, v in chosen.items() if k in wanted}
    elif args.quick:  # planning sweeps dozens of pipelines on simulated boards: minutes
        for key in SLOW_COMPARISONS:
            chosen.pop(key)
    info = machine()
    print(
        f"tvmpipe bench: {info['cpu_count']} x {info['cpu_model']}, python {info['python']}, "
        f"apache-tvm {info['versions']['apache-tvm']}, libzmq {info['libzmq']}; "
        f"{settings.reps} repetitions, medians; load average {info['load_average'][0]:.2f}; "
        f"time.sleep(0.010) takes {info['sleep_10ms_ms']:.2f} ms",
        flush=True,
    )
    rows: list[Row] = []
    errors: dict[str, str] = {}
    start = time.perf_counter()
    for key, run in chosen.items():
        print(f"comparison {key}...", end=" ", flush=True)
        began = time.perf_counter()
        try:
            rows.extend(run(settings))
        except Exception as exc:
            errors[key] = "".join(traceback.format_exception(exc))
            print(f"failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"{time.perf_counter() - began:.0f} s", flush=True)
    rows.sort(key=lambda r: r.comparison)  # stable: 5's rows gather at the end
    print()
    print("\n".join(table(rows)))
    missed = [r for r in rows if r.met is False]
    print(
        f"\n{sum(r.met is True for r in rows)} of {sum(r.met is not None for r in rows)} targets "
        f"met; {time.perf_counter() - start:.0f} s in all"
    )
    for key, text in errors.items():
        print(f"\ncomparison {key} failed:\n{text}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info["load_average_end"] = list(os.getloadavg())  # other work on the machine skews both
        report = {
            "machine": info,
            "settings": {"reps": settings.reps, "quick": settings.quick, "busy_ms": args.busy_ms},
            "rows": [r.to_json() for r in rows],
            "targets_met": not missed,
            "errors": errors,
            "seconds": time.perf_counter() - start,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    if errors or (args.strict and missed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
