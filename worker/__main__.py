"""``tvmpipe-worker`` / ``python -m tvmpipe.worker``: a TVM RPC server that runs pipeline stages.

It takes the flags of ``python -m tvm.exec.rpc_server``. Once listening it prints one line,
``tvmpipe-worker ready HOST:PORT``, which is how a parent that asked for ``--port 0`` learns the
port. With ``--exit-with-parent`` it exits when its standard input closes, which happens when
the process that started it goes away, however it went.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

import psutil

from .server import run_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tvmpipe-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=9091, help="first port to try; 0 for any free")
    parser.add_argument("--port-end", type=int, default=9199, help="end of the port range to try")
    parser.add_argument("--tracker", help="RPC tracker to register with, as HOST:PORT")
    parser.add_argument("--key", default="", help="key to register under at the tracker")
    parser.add_argument(
        "--custom-addr", default=None, help="address to report to the tracker and to peer stages"
    )
    parser.add_argument("--silent", action="store_true", help="log errors only")
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when standard input closes (for workers started by a PipelineModule)",
    )
    args = parser.parse_args(argv)
    if args.tracker and not args.key:
        parser.error("--tracker needs --key: the key stages ask the tracker for")
    return args


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _shutdown(*_: object) -> None:
    """End every session process first, then this one."""
    for child in psutil.Process().children(recursive=True):
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=3)
    for child in alive:
        child.kill()
    os._exit(0)


def _watch_stdin() -> None:
    # os.read, not sys.stdin: a fork while sys.stdin's lock is held deadlocks the child.
    fd = sys.stdin.fileno()
    try:
        while os.read(fd, 4096):
            continue
    except OSError:
        pass
    _shutdown()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.silent:
        logging.getLogger("RPCServer").setLevel(logging.ERROR)
    tracker = None
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        tracker = (host, int(port))
    port, port_end = args.port, args.port_end
    if port == 0:
        port = _free_port(args.host)
        port_end = port + 100
    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    if args.exit_with_parent:
        threading.Thread(target=_watch_stdin, name="tvmpipe-parent-watch", daemon=True).start()
    state = run_server(args.host, port, port_end, tracker, args.key, args.custom_addr, args.silent)
    print(f"tvmpipe-worker ready {args.host}:{state.port}", flush=True)
    while state.thread.is_alive():
        state.thread.join(0.5)


if __name__ == "__main__":
    main()
