"""``tvmpipe``: small command-line helpers around a pipeline package.

tvmpipe info PIPE_DIR     print a package's stages, targets, devices and graph
tvmpipe demo [...]        the demo of ``make demo``
tvmpipe cluster [...]     a loopback tracker and workers, until Ctrl-C
tvmpipe bench [...]       the benchmarks of ``make bench``: a table and a JSON file
tvmpipe soak [...]        the soak test of ``make soak``: many inputs, fds and memory flat
"""

from __future__ import annotations

import argparse
import sys

from .library import load_library


def _info(path: str) -> int:
    lib = load_library(path)
    print(f"pipeline package {path}")
    for stage in lib.stages:
        target = (stage.target or {}).get("kind", stage.kind) if stage.kind == "relax" else "python"
        triple = (stage.target or {}).get("mtriple", "")
        ins = ", ".join(f"{s.name}: {s.describe()}" for s in stage.inputs)
        print(f"  {stage.name}: {target} {triple} on {stage.device}, key {stage.rpc_key or '-'}")
        print(f"    inputs  {ins}")
        if stage.outputs is not None:
            print(f"    outputs {', '.join(s.describe() for s in stage.outputs)}")
    for b in lib.inputs:
        print(f"  input  {b.name} -> {b.stage}.{b.param} ({b.spec.describe()})")
    for e in lib.connections:
        print(f"  edge   {e.src}.output({e.index}) -> {e.dst}.{e.param}")
    for pos, o in enumerate(lib.outputs):
        print(f"  output {pos} <- {o.stage}.output({o.index})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="tvmpipe", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["info", "demo", "cluster", "bench", "soak"])
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = parser.parse_args(args[:1]).command, args[1:]
    if command == "info":
        info = argparse.ArgumentParser(prog="tvmpipe info")
        info.add_argument("package", help="a directory written by lib.export_library")
        return _info(info.parse_args(rest).package)
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

    return int(cluster_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
