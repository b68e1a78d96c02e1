"""``tvmpipe-worker`` / ``python -m tvmpipe.worker``: a TVM RPC server that runs pipeline stages.

It takes the flags of ``python -m tvm.exec.rpc_server``. ``--port N`` listens on exactly port N
(``--port-end M`` makes it the first free one in [N, M)); ``--port 0`` takes any free port; with
neither it takes the first free one in [9091, 9199), as TVM's server does. Once listening it
prints one line, ``tvmpipe-worker ready HOST:PORT``, which is how a parent that asked for
``--port 0`` learns the port. With ``--exit-with-parent`` it exits when its standard input
closes, which happens when the process that started it goes away, however it went.

``--secret-file PATH``: serve sessions only to controllers that prove they hold the secret in
PATH (proto/rpcauth.py); the file must be readable by its owner only. Without it, anyone who
reaches the port can run code here, and the worker says so once at start-up.

TVM is imported only once the flags are read, so ``tvmpipe-worker --help`` answers at once.
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

DEFAULT_PORT = 9091
DEFAULT_PORT_END = 9199  # without --port and --port-end: the first free port in [9091, 9199)
EPHEMERAL_RANGE = 100  # --port 0: a free port the OS gave out, and the next ones if it is taken


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tvmpipe-worker",
        description="A TVM RPC server that runs tvmpipe's pipeline stages; it takes the flags "
        "of python -m tvm.exec.rpc_server and prints 'tvmpipe-worker ready HOST:PORT' once "
        "it listens.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"port to listen on; 0 for any free port (default: the first free one in "
        f"[{DEFAULT_PORT}, {DEFAULT_PORT_END}))",
    )
    parser.add_argument(
        "--port-end",
        type=int,
        default=None,
        help="listen on the first free port in [PORT, PORT_END) instead of exactly PORT",
    )
    parser.add_argument("--tracker", help="RPC tracker to register with, as HOST:PORT")
    parser.add_argument("--key", default="", help="key to register under at the tracker")
    parser.add_argument(
        "--custom-addr", default=None, help="address to report to the tracker and to peer stages"
    )
    parser.add_argument("--silent", action="store_true", help="log errors only")
    parser.add_argument(
        "--secret-file",
        default=None,
        help="serve only controllers that prove they hold the secret in this file (mode 0600); "
        "without it, anyone who reaches the port can run code on this machine",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when standard input closes (for workers started by a PipelineModule)",
    )
    args = parser.parse_args(argv)
    if args.tracker and not args.key:
        parser.error("--tracker needs --key: the key stages ask the tracker for")
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--tracker must be HOST:PORT, got {args.tracker!r}")
    if args.port is not None and not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65536), got {args.port}")
    if args.port_end is not None:
        if args.port == 0:
            parser.error("--port-end needs a --port other than 0 (0 takes any free port)")
        start = DEFAULT_PORT if args.port is None else args.port
        if not start < args.port_end <= 65536:
            parser.error(f"--port-end must be in ({start}, 65536], got {args.port_end}")
    return args


def port_range(args: argparse.Namespace) -> tuple[int, int]:
    """The ports to try, [first, end): see the module docstring."""
    if args.port is None:
        return DEFAULT_PORT, args.port_end or DEFAULT_PORT_END
    if args.port == 0:
        port = _free_port(args.host)
        return port, min(port + EPHEMERAL_RANGE, 65536)
    return args.port, args.port_end or args.port + 1


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


NO_SECRET_WARNING = (
    "tvmpipe-worker: warning: no --secret-file: anyone who can reach {where} can run code on "
    "this machine as this user. Give --secret-file (the controller passes the same secret) "
    "and bind to loopback or a private network (--host)."
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secret = None
    if args.secret_file is not None:
        from tvmpipe.proto.rpcauth import SecretFileError, load_secret

        try:
            secret = load_secret(args.secret_file)
        except SecretFileError as exc:
            print(f"tvmpipe-worker: {exc}", file=sys.stderr)
            return 1
    if args.silent:
        logging.getLogger("RPCServer").setLevel(logging.ERROR)
    tracker = None
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        tracker = (host, int(port))
    port, port_end = port_range(args)
    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    if args.exit_with_parent:
        threading.Thread(target=_watch_stdin, name="tvmpipe-parent-watch", daemon=True).start()
    from .server import run_server  # imports TVM

    try:
        state = run_server(
            args.host, port, port_end, tracker, args.key, args.custom_addr, args.silent, secret
        )
    except (OSError, ValueError) as exc:  # TVM raises ValueError when every port is taken
        ports = f"port {port}" if port_end == port + 1 else f"ports [{port}, {port_end})"
        print(f"tvmpipe-worker: cannot listen on {args.host}, {ports}: {exc}", file=sys.stderr)
        return 1
    if secret is None:
        print(NO_SECRET_WARNING.format(where=f"{args.host}:{state.port}"), file=sys.stderr)
    print(f"tvmpipe-worker ready {args.host}:{state.port}", flush=True)
    while state.thread.is_alive():
        state.thread.join(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
