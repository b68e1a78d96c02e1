"""A loopback cluster: TVM's tracker and N ``tvmpipe-worker``\\ s registered under one key.

The demo, the tests and the benchmarks deploy through the same path as a real cluster of boards
(``PipelineModule(lib, tracker=cluster.tracker)`` with ``cfg[m].rpc_key = cluster.key``), so
this module starts the same processes a user would, on 127.0.0.1::

    with LocalCluster(3, key="demo") as cluster:
        with PipelineModule(lib, tracker=cluster.tracker) as pipe:
            ...

Or from a shell, until Ctrl-C::

    python -m tvmpipe.orchestrator.localcluster --workers 3 --key local

Every process it starts dies with it: the workers run with ``--exit-with-parent``, and the
tracker (``python -m tvm.exec.rpc_tracker``, which serves from a ``tvm.exec.popen_worker``
child) runs in its own process group with a watcher that ends the group when this process's
end of its stdin closes. ``close()`` stops the workers, then the tracker's whole group, and
waits for every one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

import psutil
from tvm.rpc import base as rpc_base

from tvmpipe.proto.errors import DeployError

from . import forks

__all__ = ["LocalCluster", "LocalClusterError", "tracker_summary"]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
POLL_S = 0.05
PORT_ATTEMPTS = 5

# Runs ``python -m tvm.exec.rpc_tracker ARGS`` unchanged, plus a thread that ends the tracker's
# process group (the tracker and its popen_worker child) once stdin reaches EOF, that is when
# the LocalCluster closes it or its process dies. Without it a killed parent leaves both behind:
# the popen_worker's tracker thread is not a daemon, so even its parent's death does not end it.
WITH_PARENT_BOOT = """\
import os, runpy, signal, sys, threading
def _watch():
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os.killpg(0, signal.SIGTERM)
threading.Thread(target=_watch, daemon=True).start()
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


class LocalClusterError(DeployError):
    """The loopback cluster could not start; the message carries the failing process's stderr."""


class _Child:
    """One started process, its stderr in a temporary file, and how to stop it for good."""

    def __init__(
        self,
        what: str,
        argv: Sequence[str] = (),
        *,
        group: bool,
        read_stdout: bool = False,
        worker: Sequence[str] = (),
    ):
        self.what = what
        self.group = group  # its own process group, ended as a whole
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._out = b""
        # stdin is a pipe only we hold: its EOF tells the child that we are gone. A worker's
        # stdout is a pipe only for the ready line (a --silent worker prints nothing else).
        # Each runs in a session of its own: Ctrl-C in a terminal reaches us only, and we stop
        # them in order.
        self.process: subprocess.Popen[bytes] | forks.ForkedProcess
        if worker:  # tvmpipe-worker's arguments: forked from one with TVM imported if it can
            self.process = forks.start_worker(worker, self.log, new_session=True)
            return
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if read_stdout else self.log,
            stderr=self.log,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr_tail(self, limit: int = 2000) -> str:
        if self.log.closed:
            return "(its log is closed)"
        self.log.seek(0)
        text = self.log.read().decode(errors="replace").strip()
        return text[-limit:] or "(it printed nothing)"

    def failure(self, message: str) -> LocalClusterError:
        code = self.process.poll()
        state = f"it exited with code {code}" if code is not None else "it is still running"
        tail = self.stderr_tail()
        return LocalClusterError(f"{self.what}: {message}; {state}; its stderr: {tail}")

    def read_line(self, deadline: float) -> str:
        """The next stdout line, or '' at EOF or the deadline: never blocks past it."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._out:
                left = deadline - time.monotonic()
                if left <= 0:
                    return ""
                if selector.select(timeout=min(0.2, left)):
                    chunk = os.read(fd, 4096)  # what is there: a partial line cannot block us
                    if not chunk:
                        return ""
                    self._out += chunk
                elif not self.alive():
                    return ""
        line, _, self._out = self._out.partition(b"\n")
        return line.decode(errors="replace") + "\n"

    def processes(self) -> list[psutil.Process]:
        """It and every descendant it has now (TVM forks session and popen_worker processes)."""
        try:
            me = psutil.Process(self.process.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Close stdin (it exits by itself), then SIGTERM, then SIGKILL; wait for all of it."""
        descendants = self.processes()[1:] if self.alive() else []
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                self._signal(sig)
            try:
                self.process.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        # What it started is not our child: poll for it, then insist. A group also catches
        # an orphan of an earlier crash, which the snapshot of descendants would miss.
        left = _group(self.process.pid) if self.group else descendants
        for sig in (signal.SIGTERM, signal.SIGKILL, None):
            left = _wait_gone(left, timeout)
            if not left or sig is None:
                break
            for proc in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(sig)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group:
                os.killpg(self.process.pid, sig)  # start_new_session: pgid == pid
            else:
                self.process.send_signal(sig)


def _group(pgid: int) -> list[psutil.Process]:
    """The live processes of a process group."""
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and not _gone(proc):
                members.append(proc)
    return members


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll until every process is gone or the timeout passes; return those still there.

    Not ``psutil.wait_procs``: for a process that is not our child it waits out the whole
    timeout on a zombie that the reaper has not collected yet.
    """
    deadline = time.monotonic() + timeout
    left = [p for p in procs if not _gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = [p for p in left if not _gone(p)]
    return left


def _gone(proc: psutil.Process) -> bool:
    """Exited, or a zombie that only its (new) parent's reaping still keeps in the table."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just gave out as free; the caller must still cope with losing a race."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict[str, Any]:
    """The tracker's summary, with a timeout on every step.

    Speaks the same protocol as ``tvm.rpc.connect_tracker(host, port).summary()``, which is
    unfit for polling: it retries a refused connection by sleeping 5 s, and has no timeout.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack("<i", rpc_base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", rpc_base.recvall(sock, 4))[0]
        if magic != rpc_base.RPC_TRACKER_MAGIC:
            raise LocalClusterError(f"{host}:{port} is not a TVM RPC tracker")
        rpc_base.sendjson(sock, [rpc_base.TrackerCode.SUMMARY])
        reply = rpc_base.recvjson(sock)
    if not isinstance(reply, list) or len(reply) != 2 or reply[0] != rpc_base.TrackerCode.SUCCESS:
        raise LocalClusterError(f"the tracker at {host}:{port} answered {reply!r} to SUMMARY")
    summary: dict[str, Any] = reply[1]
    return summary


def free_workers(summary: dict[str, Any], key: str) -> int:
    """How many workers registered under ``key`` are waiting for a session."""
    return int(summary.get("queue_info", {}).get(key, {}).get("free", 0))


class LocalCluster:
    """TVM's tracker and ``n_workers`` tvmpipe workers under ``key``, all on ``host``.

    Starting blocks until the tracker answers and every worker is registered and free, or
    raises LocalClusterError (with the failing process's stderr) after ``timeout`` seconds;
    whatever started by then is stopped. Use it as a context manager or call ``close()``.
    """

    def __init__(
        self,
        n_workers: int,
        key: str = "local",
        host: str = "127.0.0.1",
        *,
        timeout: float = START_TIMEOUT_S,
        python: str = sys.executable,
        secret_file: str | None = None,
    ):
        if n_workers < 1:
            raise ValueError(f"a cluster needs at least one worker, got {n_workers}")
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"the tracker key must be a non-empty word, got {key!r}")
        self.key = key
        self.host = host
        self.n_workers = n_workers
        self.workers: list[tuple[str, int]] = []  # each worker's RPC address, in start order
        self._python = python
        self._secret_file = secret_file  # the workers' --secret-file
        self._timeout = timeout
        self._tracker: _Child | None = None
        self._tracker_port = 0
        self._workers: list[_Child] = []
        self._closed = False
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @property
    def tracker(self) -> tuple[str, int]:
        """The tracker's address, as ``PipelineModule(lib, tracker=...)`` takes it."""
        return (self.host, self._tracker_port)

    def summary(self) -> dict[str, Any]:
        """The tracker's summary (``queue_info`` per key, ``server_info``)."""
        self._check_open()
        return tracker_summary(*self.tracker)

    def pids(self) -> list[int]:
        """Every process of the cluster now: tracker, workers, and their children."""
        children = [c for c in (self._tracker, *self._workers) if c is not None]
        return sorted({p.pid for c in children for p in c.processes()})

    def worker_of(self, pid: int) -> tuple[str, int] | None:
        """The RPC address of the worker that is ``pid`` or started it (a session process)."""
        with contextlib.suppress(psutil.Error):
            lineage = {pid, *(p.pid for p in psutil.Process(pid).parents())}
            for child, address in zip(self._workers, self.workers, strict=False):
                if child.process.pid in lineage:
                    return address
        return None

    def check_alive(self) -> None:
        """Raise LocalClusterError if the tracker or a worker has exited."""
        self._check_open()
        for child in (self._tracker, *self._workers):
            if child is not None and not child.alive():
                raise child.failure("exited")

    def close(self) -> None:
        """Stop the workers (they end their sessions), then the tracker; wait for each."""
        if self._closed:
            return
        self._closed = True
        workers, self._workers = self._workers, []
        # Close every stdin first so the workers shut down in parallel, then wait for each.
        for child in workers:
            if child.process.stdin is not None:
                with contextlib.suppress(OSError):
                    child.process.stdin.close()
        for child in workers:
            child.stop()
        if self._tracker is not None:
            self._tracker.stop()
            self._tracker = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"tracker {self.host}:{self._tracker_port}"
        return f"LocalCluster({self.n_workers} workers, key={self.key!r}, {state})"

    # ----- start-up
    def _check_open(self) -> None:
        if self._closed:
            raise LocalClusterError("this LocalCluster is closed; start a new one")

    def _start(self) -> None:
        deadline = time.monotonic() + self._timeout
        if self._python == sys.executable:
            forks.ensure_started()  # it imports TVM while the tracker starts
        self._start_tracker(deadline)
        self._workers = [self._spawn_worker(i) for i in range(self.n_workers)]
        for child in self._workers:
            self.workers.append(self._wait_ready(child, deadline))
        self._wait_registered(deadline)

    def _start_tracker(self, deadline: float) -> None:
        """Start the tracker on a port that was free; on losing that race, try another."""
        for _ in range(PORT_ATTEMPTS):
            port = free_port(self.host)
            # --port-end port+1: the tracker binds exactly that port or exits, so the port we
            # poll is the port it serves (with a range it could quietly take the next one).
            argv = [self._python, "-c", WITH_PARENT_BOOT, "tvm.exec.rpc_tracker"]
            argv += ["--host", self.host, "--port", str(port), "--port-end", str(port + 1)]
            what = f"TVM's tracker on {self.host}:{port}"
            child = _Child(what, [*argv, "--silent"], group=True)
            self._tracker = child
            if self._wait_tracker(child, port, deadline):
                self._tracker_port = port
                return
            if "cannot bind" not in child.stderr_tail():
                raise child.failure("it exited during start-up")
            child.stop()  # someone else took the port meanwhile: pick another
            self._tracker = None
        raise LocalClusterError(f"found no free port for the tracker in {PORT_ATTEMPTS} tries")

    def _wait_tracker(self, child: _Child, port: int, deadline: float) -> bool:
        """True once it answers SUMMARY; False if it exited; raises at the deadline."""
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not child.alive():
                return False
            try:
                tracker_summary(self.host, port, timeout=max(0.1, deadline - time.monotonic()))
                return True
            except (OSError, ValueError, struct.error, LocalClusterError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(POLL_S)  # the pause between polls; wakes early if it exits
        raise child.failure(f"did not answer within {self._timeout:.0f} s (last: {last})")

    def _spawn_worker(self, index: int) -> _Child:
        argv = ["--host", self.host, "--port", "0"]
        argv += ["--tracker", f"{self.host}:{self._tracker_port}", "--key", self.key]
        argv += ["--exit-with-parent", "--silent"]
        if self._secret_file:
            argv += ["--secret-file", self._secret_file]
        what = f"tvmpipe-worker {index} (key {self.key!r})"
        if self._python == sys.executable:
            return _Child(what, group=False, worker=argv)
        python = [self._python, "-m", "tvmpipe.worker", *argv]
        return _Child(what, python, group=False, read_stdout=True)

    def _wait_ready(self, child: _Child, deadline: float) -> tuple[str, int]:
        """Read the worker's ``tvmpipe-worker ready HOST:PORT`` line."""
        while True:
            line = child.read_line(deadline)
            if line.startswith("tvmpipe-worker ready"):
                host, _, port = line.split()[-1].rpartition(":")
                return host, int(port)
            if not line:
                reason = "exited" if not child.alive() else "printed no ready line"
                raise child.failure(f"{reason} within {self._timeout:.0f} s")

    def _wait_registered(self, deadline: float) -> None:
        """Poll the tracker until all workers are free under the key."""
        free = 0
        while time.monotonic() < deadline:
            for child in (self._tracker, *self._workers):
                if child is not None and not child.alive():
                    raise child.failure("exited before every worker registered")
            with contextlib.suppress(OSError, ValueError, struct.error):
                free = free_workers(tracker_summary(*self.tracker), self.key)
            if free >= self.n_workers:
                return
            time.sleep(POLL_S)  # the pause between polls, bounded by the deadline
        tails = "; ".join(f"{c.what}: {c.stderr_tail(500)}" for c in self._workers)
        raise LocalClusterError(
            f"only {free} of {self.n_workers} workers registered under key {self.key!r} at "
            f"the tracker {self.host}:{self._tracker_port} within {self._timeout:.0f} s; {tails}"
        )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run a loopback cluster until Ctrl-C or SIGTERM; print where to reach it.

    ``prog`` is the name its help and errors give it (``tvmpipe cluster`` from the CLI).
    """
    parser = argparse.ArgumentParser(
        prog=prog or "python -m tvmpipe.orchestrator.localcluster",
        description="Start TVM's RPC tracker and N tvmpipe workers on loopback, until Ctrl-C.",
    )
    parser.add_argument("--workers", type=int, default=3, help="number of workers (default 3)")
    parser.add_argument("--key", default="local", help="tracker key of the workers (default local)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default loopback)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT_S,
        help=f"seconds to wait for start-up (default {START_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--secret-file", help="the workers' secret (see tvmpipe-worker --secret-file)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not args.key or any(c.isspace() for c in args.key):
        parser.error(f"--key must be a non-empty word, got {args.key!r}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout:g}")

    stop = threading.Event()

    def request_stop(*_: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting TVM's tracker and {args.workers} workers...", flush=True)
        with LocalCluster(
            args.workers, args.key, args.host, timeout=args.timeout, secret_file=args.secret_file
        ) as cluster:
            host, port = cluster.tracker
            print(f"tracker {host}:{port}; {args.workers} workers under key {args.key!r}:")
            for i, (whost, wport) in enumerate(cluster.workers):
                print(f"  worker {i}  {whost}:{wport}")
            print(f"use: PipelineModule(lib, tracker=({host!r}, {port})) with every stage's")
            print(f"     cfg[m].rpc_key = {args.key!r}; Ctrl-C stops the cluster", flush=True)
            while not stop.wait(0.5):
                cluster.check_alive()
            print("stopping...", flush=True)
    except LocalClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
