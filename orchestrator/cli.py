"""``tvmpipe``: command-line helpers around pipeline packages and the project's own checks.

tvmpipe info PIPE_DIR     print a package's stages, targets, devices and graph
tvmpipe plan MODEL [...]  measure a model's pieces on the workers and plan the split
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

PROG = "tvmpipe"

# One line each, as ``tvmpipe --help`` lists them.
COMMANDS = {
    "info": "print an exported pipeline package: stages, devices, graph",
    "plan": "measure a model on the workers and plan where to cut and run it",
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
    return parser


def _plan(rest: Sequence[str]) -> int:
    """Measure and plan; errors are one line on stderr and exit status 1."""
    import json
    from pathlib import Path

    from tvmpipe.proto.errors import TvmpipeError

    parser = plan_parser()
    args = parser.parse_args(rest)
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
