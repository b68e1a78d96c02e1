"""Leak checks shared by the suites that start real processes and sockets.

``checked()`` wraps one test: it snapshots this process before, and afterwards polls with a
deadline (closes are asynchronous: a worker exits a little after its stdin closes, ZeroMQ ends
its I/O threads in ``term``) until nothing is left that was not there before: no child process
nor any process that inherited the test's token (orphans too), no new non-daemon or tvmpipe
thread, and no more file descriptors of any kind in this process than before (sockets above
all; also ZeroMQ's eventfds and epoll fds, pipes and files). Whatever leaked is described,
leaked processes are killed, and the test fails. State that outlives the test on purpose (a
module-scoped tracker, boards or pipeline) is set up before the snapshot, so it is not counted;
such a fixture must have made its connections before it yields, since ZeroMQ connects in the
background (one input through a pipeline does it).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import zmq

from tvmpipe.orchestrator import forks

TOKEN_ENV = "TVMPIPE_INTEGRATION_TEST_TOKEN"
DEADLINE_S = 10.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Snapshot:
    token: str
    processes: frozenset[tuple[int, float]]  # (pid, create_time) of the descendants
    threads: frozenset[int]
    fds: dict[int, str]  # fd -> what /proc/self/fd links it to


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = DEADLINE_S) -> list[int]:
    """Poll until every pid has exited; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if not gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not gone(p)]
    return alive


def _identity(proc: psutil.Process) -> tuple[int, float]:
    """A pid alone may be reused; with its start time it names one process."""
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return proc.pid, 0.0


def describe_process(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def _descendants() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if _alive(p)]


def _marked_processes(token: str) -> list[psutil.Process]:
    """Every live process that inherited this token, children and orphans alike."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TOKEN_ENV) == token and _alive(proc):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def open_fds() -> dict[int, str]:
    """This process's file descriptors and their targets (``socket:[inode]``, a path, ...)."""
    own = f"/proc/{os.getpid()}/fd"
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed in the meantime, or the listing's own fd
        if target != own and target != "/proc/self/fd":
            fds[int(name)] = target
    return fds


def fd_kind(target: str) -> str:
    """``socket``, ``pipe``, ``anon_inode:[eventfd]`` (ZeroMQ's mailboxes), ... or ``file``."""
    if target.startswith(("socket:", "pipe:")):
        return target.split(":")[0]
    return target if target.startswith("anon_inode:") else "file"


def start_pyzmq_gc() -> None:
    """pyzmq tracks zero-copy sends with one thread, context and socket per process, started
    at the first such send and kept until exit (7 fds): start them now, before a snapshot."""
    with zmq.Context() as context:
        pull = context.socket(zmq.PULL)
        push = context.socket(zmq.PUSH)
        pull.bind("inproc://tvmpipe-leaks-warm-up")
        push.connect("inproc://tvmpipe-leaks-warm-up")
        push.send(bytearray(zmq.COPY_THRESHOLD * 2), copy=False)
        pull.recv(copy=False)
        push.close(linger=0)
        pull.close(linger=0)


def take() -> Snapshot:
    start_pyzmq_gc()
    forks.ensure_started()  # this process's fork server for local workers lives until exit
    return Snapshot(
        token=uuid.uuid4().hex,
        processes=frozenset(_identity(p) for p in _descendants()),
        threads=frozenset(t.ident for t in threading.enumerate() if t.ident is not None),
        fds=open_fds(),
    )


def new_processes(before: Snapshot) -> list[psutil.Process]:
    found = {p.pid: p for p in _descendants() if _identity(p) not in before.processes}
    found.update({p.pid: p for p in _marked_processes(before.token)})
    return list(found.values())


def new_threads(before: Snapshot) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread()
        and t.ident not in before.threads
        and (not t.daemon or "tvmpipe" in t.name)
    ]


def new_fds(before: Snapshot) -> dict[int, str]:
    """Fds beyond the count of their kind before; by count, so that a long-lived ZeroMQ
    socket that reconnected (a new TCP socket for a closed one) is no leak."""
    now = open_fds()
    kinds = collections.Counter(fd_kind(t) for t in now.values())
    excess = kinds - collections.Counter(fd_kind(t) for t in before.fds.values())
    leaked = {}
    for fd, target in sorted(now.items()):
        kind = fd_kind(target)
        if excess[kind] > 0 and before.fds.get(fd) != target:
            excess[kind] -= 1
            leaked[fd] = target
    return leaked


def _describe_fds(fds: dict[int, str]) -> str:
    """Sockets with their addresses and, over loopback, the process at the other end."""
    mine = {}
    with contextlib.suppress(psutil.Error):
        mine = {c.fd: c for c in psutil.Process().net_connections(kind="all") if c.fd in fds}
    peers = {}
    if any(c.raddr for c in mine.values()):
        with contextlib.suppress(psutil.Error):
            peers = {(c.laddr, c.raddr): c.pid for c in psutil.net_connections(kind="inet")}
    described = []
    for fd, target in fds.items():
        text = f"fd {fd} {target}"
        conn = mine.get(fd)
        if conn is not None:
            text += f" {conn.laddr or ''} -> {conn.raddr or ''} {conn.status}"
            peer = peers.get((conn.raddr, conn.laddr)) if conn.raddr else None
            if peer is not None:
                with contextlib.suppress(psutil.Error):
                    text += f" (other end: {describe_process(psutil.Process(peer))})"
        described.append(text)
    return ", ".join(described)


def problems(before: Snapshot, deadline_s: float = DEADLINE_S) -> list[str]:
    """Poll until nothing new is left or the deadline passes; kill leaked processes; describe."""
    deadline = time.monotonic() + deadline_s
    while True:
        procs, threads, fds = new_processes(before), new_threads(before), new_fds(before)
        if not (procs or threads or fds) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    found = []
    if procs:
        found.append("processes left running: " + "; ".join(describe_process(p) for p in procs))
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)  # reaps those that are our children
    if threads:
        found.append(
            "threads left running: " + ", ".join(f"{t.name} (daemon={t.daemon})" for t in threads)
        )
    if fds:
        sockets = {fd: t for fd, t in fds.items() if t.startswith("socket:")}
        if sockets:
            found.append(f"{len(sockets)} socket(s) left open: " + _describe_fds(sockets))
        others = {fd: t for fd, t in fds.items() if fd not in sockets}
        if others:
            found.append(f"{len(others)} other fd(s) left open: " + _describe_fds(others))
    return found


@contextlib.contextmanager
def checked(deadline_s: float = DEADLINE_S) -> Iterator[Snapshot]:
    """Run the body with a fresh token in the environment (inherited by every process it
    starts); afterwards assert that it left nothing behind."""
    before = take()
    old = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = before.token
    try:
        yield before
    finally:
        if old is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = old
    found = problems(before, deadline_s)
    assert not found, " / ".join(found)
