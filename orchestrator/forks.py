"""Local workers forked from a server that has TVM imported (worker/forkserver.py).

``start_worker(argv, stdin, stdout, stderr)`` returns a process handle shaped like
``subprocess.Popen``'s (``pid``, ``poll``, ``wait``, ``terminate``, ``kill``). On Linux the
first call starts one fork server for this process, and each worker after that is ready in
about 20 ms instead of about a second of importing TVM. ``TVMPIPE_FORKSERVER=0``, or another
platform, starts each worker as a fresh ``python -m tvmpipe.worker`` instead.

The server exits when this process closes its end of the socket (``shutdown()``, or however this
process ends). Each worker gets this process's environment and directory as they are when it is
started, not as they were when the server was.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

import psutil

ENV_SWITCH = "TVMPIPE_FORKSERVER"
REPLY_TIMEOUT_S = 60.0  # the first reply waits for the server to import TVM
POLL_S = 0.01


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get(ENV_SWITCH, "1") != "0"


class ForkedProcess:
    """A worker the fork server started: not this process's child, so it is watched through
    psutil, and its exit status is not known (``returncode`` is -1 once it has exited)."""

    def __init__(self, pid: int, stdin: IO[bytes] | None, stdout: IO[bytes] | None):
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        try:
            self._process: psutil.Process | None = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._process = None

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self._process):
            self.returncode = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"tvmpipe-worker pid {self.pid}", timeout or 0.0)
            time.sleep(POLL_S)
        return -1

    def terminate(self) -> None:
        self._signal("terminate")

    def kill(self) -> None:
        self._signal("kill")

    def send_signal(self, sig: int) -> None:
        self._signal("send_signal", sig)

    def _signal(self, how: str, *args: int) -> None:
        if self._process is not None and self.poll() is None:  # psutil checks it is still it
            with contextlib.suppress(psutil.NoSuchProcess):
                getattr(self._process, how)(*args)


def _alive(process: psutil.Process | None) -> bool:
    try:
        return process is not None and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ForkServer:
    """One ``python -m tvmpipe.worker.forkserver`` and the socket this process asks it on."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tvmpipe.worker.forkserver", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.socket = ours
        self.socket.settimeout(REPLY_TIMEOUT_S)

    def fork(self, argv: Sequence[str], fds: Sequence[int], new_session: bool = False) -> int:
        """A worker with ``argv`` and standard streams ``fds`` (in a session of its own with
        ``new_session``); its pid."""
        request = {
            "argv": list(argv),
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "new_session": new_session,
        }
        socket.send_fds(self.socket, [json.dumps(request).encode()], list(fds))
        reply = json.loads(self.socket.recv(4096) or b'{"error": "the fork server exited"}')
        if "pid" not in reply:
            raise OSError(f"the fork server refused a worker: {reply.get('error')}")
        return int(reply["pid"])

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        self.socket.close()  # the server's recv ends: it exits
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_lock = threading.Lock()
_server: ForkServer | None = None
_server_pid = 0  # the process that started it: a forked child starts its own


def _current() -> ForkServer:
    """This process's fork server, started (or started again) on first use (holding _lock)."""
    global _server, _server_pid
    if _server is not None and (_server_pid != os.getpid() or not _server.alive()):
        if _server_pid == os.getpid():
            _server.close()
        _server = None
    if _server is None:
        _server, _server_pid = ForkServer(), os.getpid()
    return _server


def ensure_started() -> None:
    """Start the fork server now (it imports TVM in the background), if it is used at all."""
    if enabled():
        with _lock:
            _current()


def server_pid() -> int | None:
    """This process's fork server, if one is running."""
    with _lock:
        if _server is None or _server_pid != os.getpid() or not _server.alive():
            return None
        return _server.process.pid


def children() -> list[psutil.Process]:
    """This process's children, with the workers its fork server started in the place of the
    fork server itself."""
    server = server_pid()
    found = []
    for child in psutil.Process().children():
        if child.pid != server:
            found.append(child)
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            found += child.children()
    return found


def shutdown() -> None:
    """Stop this process's fork server; the workers it started keep running."""
    with _lock:
        _shutdown_locked()


def _shutdown_locked() -> None:
    global _server
    if _server is not None and _server_pid == os.getpid():
        _server.close()
    _server = None


def start_worker(
    argv: Sequence[str], stderr: IO[Any], new_session: bool = False
) -> subprocess.Popen[bytes] | ForkedProcess:
    """``tvmpipe-worker argv`` with pipes on its stdin and stdout; stderr into ``stderr``;
    ``new_session``: in a session of its own, out of reach of a terminal's Ctrl-C."""
    if not enabled():
        return subprocess.Popen(
            [sys.executable, "-m", "tvmpipe.worker", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=new_session,
        )
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    fds = [stdin_read, stdout_write, stderr.fileno()]
    try:
        with _lock:
            try:
                pid = _current().fork(argv, fds, new_session)
            except (OSError, ValueError):  # it died since: once more, with a new one
                _shutdown_locked()
                pid = _current().fork(argv, fds, new_session)
    except BaseException:
        os.close(stdin_write)
        os.close(stdout_read)
        raise
    finally:
        os.close(stdin_read)
        os.close(stdout_write)
    return ForkedProcess(pid, os.fdopen(stdin_write, "wb"), os.fdopen(stdout_read, "rb"))
