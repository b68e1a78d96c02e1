"""``tvmpipe``: command-line helpers around pipeline packages and the project's own checks.

tvmpipe info PIPE_DIR     print a package's stages, targets, devices and graph
tvmpipe plan MODEL [...]  measure a model's pieces on the workers and plan the split
tvmpipe tune MODEL [...]  tune a model's workloads with MetaSchedule on a worker of each kind
tvmpipe demo [...]        the demo of ``make demo``
tvmpipe cluster [...]     a loopback tracker and workers, until Ctrl-C
tvmpipe bench [...]       the benchmarks of ``make bench``: a table and a JSON file
tvmpipe soak [...]        the soak test of ``make soak``: many inputs, fds and memory flat

This module imports nothing heavy at the top: ``tvmpipe --help`` and ``tvmpipe --version`` must
answer at once, so each command imports TVM and the rest of tvmpipe only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

PROG = "tvmpipe"

# One line each, as ``tvmpipe --help`` lists them.
COMMANDS = {
    "info": "print an exported pipeline package: stages, devices, graph",
    "plan": "measure a model on the workers and plan where to cut and run it",
    "tune": "tune a model with MetaSchedule on its workers; results in a database per kind",
    "demo": "run a real network split into stages; check every result",
    "cluster": "run TVM's tracker and tvmpipe workers on loopback until Ctrl-C",
    "bench": "measure tvmpipe against its baselines: a table and a JSON file",
    "soak": "stream many inputs; check that fds and memory stay flat",
}


def version_text() -> str:
    """tvmpipe's version, and apache-tvm's from its metadata (TVM itself is not imported)."""
    text = f"{PROG} {_installed('tvmpipe') or 'unknown'}"
    tvm = _installed("apache-tvm")
    return f"{text} (apache-tvm {tvm})" if tvm else text


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the command list, ``--help`` and ``--version``.

    Each command parses its own options (``tvmpipe COMMAND --help``).
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A pipeline executor for Apache TVM: command-line helpers.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def info_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} info", description=COMMANDS["info"] + ".")
    parser.add_argument("package", help="a directory written by lib.export_library")
    return parser


def _info_lines(path: str) -> list[str]:
    from .library import load_library

    lib = load_library(path)
    lines = [f"pipeline package {path}"]
    for stage in lib.stages:
        target = (stage.target or {}).get("kind", stage.kind) if stage.kind == "relax" else "python"
        triple = (stage.target or {}).get("mtriple", "")
        ins = ", ".join(f"{s.name}: {s.describe()}" for s in stage.inputs)
        lines.append(
            f"  {stage.name}: {target} {triple} on {stage.device}, key {stage.rpc_key or '-'}"
        )
        lines.append(f"    inputs  {ins}")
        if stage.outputs is not None:
            lines.append(f"    outputs {', '.join(s.describe() for s in stage.outputs)}")
    for b in lib.inputs:
        lines.append(f"  input  {b.name} -> {b.stage}.{b.param} ({b.spec.describe()})")
    for e in lib.connections:
        lines.append(f"  edge   {e.src}.output({e.index}) -> {e.dst}.{e.param}")
    for pos, o in enumerate(lib.outputs):
        lines.append(f"  output {pos} <- {o.stage}.output({o.index})")
    return lines


def _info(path: str) -> int:
    """Print the package; a damaged or missing one is one line on stderr and exit status 1."""
    from pathlib import Path

    from tvmpipe.proto.errors import TvmpipeError

    try:
        lines = _info_lines(path)
    # A package that load_library accepted can still hold fields of the wrong type.
    except (TvmpipeError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if not reason.startswith((path, str(Path(path)))):
            reason = f"{path}: {reason}"
        print(f"{PROG} info: {reason}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} plan", description=COMMANDS["plan"] + ".")
    parser.add_argument("model", help="an .onnx file, or a model of the onnx package (light_...)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tracker", help="HOST:PORT of TVM's RPC tracker")
    where.add_argument("--servers", help="comma-separated HOST:PORT of tvmpipe-workers")
    parser.add_argument("--keys", help="tracker keys to plan over (default: every key)")
    parser.add_argument("--max-stages", type=int, default=3, help="at most this many (3)")
    parser.add_argument("--segments", type=int, default=16, help="pieces to measure (16)")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="KIND=TARGET",
        help="the target of a kind of worker (a key, or a server), e.g. "
        '\'rk3399={"kind": "llvm", "mtriple": "aarch64-linux-gnu"}\' (default llvm)',
    )
    parser.add_argument("--cache", help="where measurements are cached (~/.cache/tvmpipe)")
    parser.add_argument("--cluster-out", help="also write the plan as a cluster file here")
    parser.add_argument(
        "--secret-file", help="the workers' secret (their --secret-file; $TVMPIPE_SECRET_FILE)"
    )
    return parser


def use_secret_file(parser: argparse.ArgumentParser, path: str | None) -> None:
    """Check the workers' secret file now; the sessions of this command find it through
    $TVMPIPE_SECRET_FILE, as every connection to a worker does."""
    if path is None:
        return
    import os

    from tvmpipe.proto.rpcauth import ENV_SECRET_FILE, SecretFileError, load_secret

    try:
        load_secret(path)
    except SecretFileError as exc:
        parser.error(str(exc))
    os.environ[ENV_SECRET_FILE] = path


def _plan(rest: Sequence[str]) -> int:
    """Measure and plan; errors are one line on stderr and exit status 1."""
    import json
    from pathlib import Path

    from tvmpipe.proto.errors import TvmpipeError

    parser = plan_parser()
    args = parser.parse_args(rest)
    use_secret_file(parser, args.secret_file)
    targets = {}
    for item in args.target:
        kind, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--target {item!r}: expected KIND=TARGET")
        targets[kind] = json.loads(text) if text.startswith("{") else text
    tracker = None
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--tracker {args.tracker!r}: expected HOST:PORT")
        tracker = (host, int(port))
    from .models import load_onnx_file, load_onnx_model
    from .plan import plan_pipeline

    try:
        model = args.model
        mod = load_onnx_file(model) if Path(model).is_file() else load_onnx_model(model)
        plan = plan_pipeline(
            mod,
            tracker=tracker,
            keys=args.keys.split(",") if args.keys else None,
            servers=args.servers.split(",") if args.servers else None,
            max_stages=args.max_stages,
            segments=args.segments,
            targets=targets,
            cache=args.cache,
        )
    except (TvmpipeError, OSError, ValueError) as exc:
        print(f"{PROG} plan: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(plan)
    print(f"cuts: {plan.cuts}")
    if args.cluster_out:
        print(f"cluster file: {plan.write_cluster(args.cluster_out)}")
    return 0


def tune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} tune", description=COMMANDS["tune"] + ".")
    parser.add_argument("model", help="an .onnx file, or a model of the onnx package (light_...)")
    parser.add_argument("--database", required=True, help="the database directory (made if new)")
    parser.add_argument("--trials", type=int, default=64, help="trials per workload (64)")
    parser.add_argument(
        "--top",
        type=int,
        help="only the N workloads that take the most time (after a first pass over all)",
    )
    parser.add_argument(
        "--target",
        default="llvm",
        help="the workers' target: a string, JSON, or 'host' (llvm for this machine's CPU)",
    )
    parser.add_argument("--device", default="cpu", help="the workers' device (cpu)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tracker", help="HOST:PORT of TVM's RPC tracker (with --key)")
    where.add_argument("--server", help="HOST:PORT of a worker to measure on")
    parser.add_argument("--key", default="", help="the workers' tracker key")
    parser.add_argument("--cuts", help="also tune these stages, e.g. 42,82")
    parser.add_argument(
        "--segments", type=int, default=0, help="also tune the N pieces plan measures"
    )
    parser.add_argument(
        "--secret-file",
        help="the workers' secret (their --secret-file; $TVMPIPE_SECRET_FILE); with --server "
        "or the local default only",
    )
    return parser


def _tune(rest: Sequence[str]) -> int:
    """Tune; a summary per workload on stdout, errors one line on stderr and exit status 1."""
    import json
    from pathlib import Path

    from tvmpipe.proto.errors import TvmpipeError

    parser = tune_parser()
    args = parser.parse_args(rest)
    tracker = None
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--tracker {args.tracker!r}: expected HOST:PORT")
        if not args.key:
            parser.error("--tracker needs --key: the kind of worker to measure on")
        tracker = (host, int(port))
    if args.secret_file and args.tracker:
        parser.error("--secret-file works with --server or the local default, not --tracker yet")
    use_secret_file(parser, args.secret_file)
    from .measure import candidate_cuts
    from .models import load_onnx_file, load_onnx_model
    from .split import split_module
    from .tune import host_target, tune_pipeline

    target = args.target
    if target == "host":
        target = host_target()
    elif target.startswith("{"):
        target = json.loads(target)
    try:
        model = args.model
        mod = load_onnx_file(model) if Path(model).is_file() else load_onnx_model(model)
        pipelines: list[Any] = [mod]
        if args.cuts:
            pipelines.append(split_module(mod, [int(c) for c in args.cuts.split(",")]))
        if args.segments:
            pipelines.append(split_module(mod, candidate_cuts(mod, args.segments)))
        for cfg in pipelines[1:]:
            for module in cfg.modules:
                cfg[module].target = target
                cfg[module].device = args.device
                cfg[module].rpc_key = args.key
        results = []
        for pipeline in pipelines:
            stages = len(getattr(pipeline, "modules", [pipeline]))
            results += tune_pipeline(
                pipeline,
                args.database,
                trials=args.trials,
                target=target,
                device=args.device,
                key=args.key,
                tracker=tracker,
                servers=[args.server] * stages if args.server else None,
                top=args.top,
            )
    except (TvmpipeError, OSError, ValueError) as exc:
        print(f"{PROG} tune: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} tune: interrupted; what was measured is kept, run again to resume")
        return 130
    seen = set()  # a workload the pieces share with the whole model is listed once
    print(f"{'workload':<48} {'trials':>7} {'new':>5} {'best us':>10}")
    for r in results:
        if (r.kind, r.workload) in seen:
            continue
        seen.add((r.kind, r.workload))
        best = "-" if r.best_s is None else f"{r.best_s * 1e6:.1f}"
        print(f"{r.name[:48]:<48} {r.trials_before + r.trials_run:>7} {r.trials_run:>5} {best:>10}")
    print(f"database: {args.database} ({', '.join(sorted({r.kind for r in results}))})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Options before the command are tvmpipe's own; everything after it is the command's.
    at = next((i for i, arg in enumerate(args) if not arg.startswith("-")), len(args))
    command = parser.parse_args(args[: at + 1]).command  # exits for --help, --version, typos
    rest = args[at + 1 :]
    if command is None:
        parser.print_help()
        return 0
    if command == "info":
        return _info(info_parser().parse_args(rest).package)
    if command == "plan":
        return _plan(rest)
    if command == "tune":
        return _tune(rest)
    if command == "demo":
        from .demo import main as demo_main

        return int(demo_main(rest) or 0)
    if command == "bench":
        from .bench import main as bench_main

        return int(bench_main(rest) or 0)
    if command == "soak":
        from .soak import main as soak_main

        return int(soak_main(rest) or 0)
    from .localcluster import main as cluster_main

    return int(cluster_main(rest, prog=f"{PROG} cluster") or 0)


if __name__ == "__main__":
    sys.exit(main())
