"""Start local workers by forking a process that has TVM imported already.

A ``tvmpipe-worker`` spends about 0.9 s of CPU importing TVM before it listens, and a pipeline
on the local default starts one per stage (again for every stage it replaces). The controller
(orchestrator/forks.py) starts this server once, as ``python -m tvmpipe.worker.forkserver FD``,
and asks it over the Unix socket FD for each worker: a JSON request with the worker's
arguments, environment and directory, and its standard input, output and error as file
descriptors (SCM_RIGHTS). The server forks, the child becomes that worker, and the server
answers with its pid: a worker ready in about 20 ms.

The server is single-threaded when it forks (TVM starts no thread on import; numpy's OpenBLAS
pool handles fork itself), reaps its children as they exit, and exits when the controller
closes the socket, which happens however the controller ends. A worker it started outlives it
and still exits when its own standard input closes (``--exit-with-parent``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import traceback
from typing import Any

MAX_REQUEST_BYTES = 1 << 20


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _become_worker(control: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: take the worker's descriptors, environment and arguments, run it."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the worker waits for its own sessions
        signal.signal(signal.SIGINT, signal.default_int_handler)
        control.close()
        if request.get("new_session"):
            os.setsid()  # a terminal's Ctrl-C reaches the controller only, which stops it
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        from tvmpipe.worker.__main__ import main

        code = main(list(request["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def serve(control: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the controller decides
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, MAX_REQUEST_BYTES, 3)
        except OSError:
            return
        if not data:
            return  # the controller is gone
        try:
            request = json.loads(data)
            if len(fds) != 3:
                raise ValueError(f"3 descriptors expected, {len(fds)} came")
        except ValueError as exc:
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"error": str(exc)}).encode())
            continue
        pid = os.fork()
        if pid == 0:
            _become_worker(control, request, fds)
        for fd in fds:
            os.close(fd)
        control.send(json.dumps({"pid": pid}).encode())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tvmpipe.worker.forkserver FD", file=sys.stderr)
        return 2
    control = socket.socket(fileno=int(argv[0]))
    import tvmpipe.worker.__main__
    import tvmpipe.worker.server  # noqa: F401 - TVM itself

    serve(control)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
