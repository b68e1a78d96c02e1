"""Putting stages on workers through tvm.rpc: local loopback workers, servers, tracker keys.

Each stage gets its own RPC session; the session is the stage's lifetime. Every RPC error is
mapped here to a DeployError that names the stage and the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
from tvm import rpc

from tvmpipe.proto.errors import DeployError, VersionMismatchError
from tvmpipe.proto.messages import check_handshake, handshake_info

from .library import PipelineLibrary, StageInfo

READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
CALL_LOCK_TIMEOUT_S = 30.0


class LocalWorker:
    """A ``tvmpipe-worker`` child process on loopback; it exits when this process goes away."""

    def __init__(self, host: str = "127.0.0.1", extra_args: Sequence[str] = ()):
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "tvmpipe.worker", "--host", host, "--port", "0"]
        command += ["--exit-with-parent", "--silent", *extra_args]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.host = host
        self.port: int | None = None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> tuple[str, int]:
        """Read the worker's ready line, polling with a deadline."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=0.2):
                    line = self.process.stdout.readline().decode(errors="replace")
                    if line.startswith("tvmpipe-worker ready"):
                        host, _, port = line.split()[-1].rpartition(":")
                        self.port = int(port)
                        return host, self.port
                    if not line:
                        break
                if self.process.poll() is not None:
                    break
        tail = self.stderr_tail()
        self.stop()
        raise DeployError(f"a local tvmpipe-worker did not start: {tail}")

    def stderr_tail(self, limit: int = 2000) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-limit:] or "(it printed nothing)"

    def stop(self, timeout: float = 5.0) -> None:
        """Close its stdin (it stops its sessions and exits), then insist."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


class PlainServerError(DeployError):
    """The server is TVM's own RPC server, without tvmpipe: the stage runs in relay mode."""


class StageSession:
    """One stage on one worker, through one RPC session; calls are serialised."""

    def __init__(self, stage: StageInfo, session: Any, peer: str):
        self.stage = stage
        self.peer = peer
        self._session: Any = session
        self._functions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.address = ""
        self.remote_pid: int | None = None
        self.devices: list[str] = []
        self.rpc_address = peer

    def call(self, name: str, *args: Any, wait: float = CALL_LOCK_TIMEOUT_S) -> Any:
        """Call a remote function; waits at most ``wait`` s for a call already under way."""
        if not self._lock.acquire(timeout=wait):
            raise DeployError(
                f"stage {self.stage.name!r} on worker {self.peer}: an earlier call has not "
                f"returned for {wait:.0f} s; the worker is unreachable"
            )
        try:
            if self._session is None:
                raise DeployError(
                    f"stage {self.stage.name!r}: its session on {self.peer} is closed"
                )
            try:
                func = self._functions.get(name)
                if func is None:
                    func = self._functions[name] = self._session.get_function(name)
                return func(*args)
            except Exception as exc:
                raise DeployError(
                    f"stage {self.stage.name!r} on worker {self.peer}: {name} failed: "
                    f"{_remote_message(exc)}"
                ) from exc
        finally:
            self._lock.release()

    def handshake(self) -> None:
        """Check versions; a server without tvmpipe raises PlainServerError (relay mode)."""
        try:
            reply = json.loads(self.call("tvmpipe.handshake", json.dumps(handshake_info())))
        except DeployError as exc:
            if "has no function 'tvmpipe.handshake'" in str(exc):
                raise PlainServerError(
                    f"stage {self.stage.name!r}: {self.peer} is a plain TVM RPC server"
                ) from exc
            raise
        check_handshake(handshake_info(), reply, f"worker {self.peer}")
        self.devices = list(reply.get("devices", []))
        self.remote_pid = reply.get("pid")
        self.rpc_address = str(reply.get("rpc_address", ""))
        if "@" in self.peer and self.rpc_address:  # placed by the tracker: name the worker
            self.peer = f"{self.rpc_address} ({self.peer})"

    def abort(self) -> None:
        """Break the session's TCP connection so that calls waiting on a lost board fail now.

        A TVM RPC call to an unreachable board waits for TCP to give up (minutes), holding the
        session; freeing the session then would block while holding the GIL.
        """
        host, _, port = self.rpc_address.rpartition(":")
        if not port.isdigit():
            return
        for conn in psutil.Process().net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == int(port) and conn.raddr.ip in (host, ""):
                with contextlib.suppress(OSError):
                    dup = socket.socket(fileno=os.dup(conn.fd))
                    try:
                        dup.shutdown(socket.SHUT_RDWR)
                    finally:
                        dup.close()

    def upload_and_load(self, lib: PipelineLibrary, relay: dict[str, Any] | None = None) -> None:
        """Ship the artifact and load it; with ``relay``, the stage runs on that plain server."""
        stage = self.stage
        if relay is None and stage.device not in self.devices:
            raise DeployError(
                f"stage {stage.name!r} needs device {stage.device!r} but worker {self.peer} has "
                f"only {', '.join(self.devices) or 'none'}"
            )
        path = lib.artifact_path(stage)
        with self._lock:
            try:
                self._session.upload(bytearray(path.read_bytes()), target=stage.artifact)
            except Exception as exc:
                raise DeployError(
                    f"stage {stage.name!r}: uploading {stage.artifact} to {self.peer} failed: "
                    f"{_remote_message(exc)}"
                ) from exc
        spec = {
            "name": stage.name,
            "kind": stage.kind,
            "artifact": stage.artifact,
            "sha256": stage.sha256,
            "device": stage.device,
            "inputs": stage.input_names,
            "python": stage.python,
            "cpu_affinity": stage.cpu_affinity,
            "num_threads": stage.num_threads,
            "relay": relay,
        }
        reply = json.loads(self.call("tvmpipe.stage.load", json.dumps(spec)))
        self.address = reply["address"]
        self.remote_pid = reply.get("pid", self.remote_pid)

    def close(self, stop: bool = True, timeout: float = 5.0) -> None:
        """Stop the stage and end the session (dropping the last reference closes it).

        ``stop=False`` for a worker known to be lost: a call to an unreachable board could
        wait for minutes. A call still under way is given ``timeout`` seconds.
        """
        if self._session is None:
            return
        if stop:
            with contextlib.suppress(DeployError):
                self.call("tvmpipe.stage.stop", wait=timeout)
        got = self._lock.acquire(timeout=timeout)
        if not got:  # a call is stuck on an unreachable peer: break its connection, wait again
            self.abort()
            got = self._lock.acquire(timeout=timeout)
        if not got:
            # Freeing the handles would block on the RPC endpoint's mutex, held by the stuck
            # call until TCP gives up (minutes): keep them for the life of the process.
            _stuck_sessions.append((self._session, self._functions))
            self._session, self._functions = None, {}
            return
        self._functions.clear()
        self._session = None
        self._lock.release()


_stuck_sessions: list[Any] = []  # sessions whose call never returned, and their functions


def _remote_message(exc: BaseException) -> str:
    text = str(exc)
    marker = "Error caught from RPC call:"
    if marker in text:
        text = text.split(marker, 1)[1]
    return text.strip()


def connect_server(
    stage: StageInfo, address: str, timeout: float = REQUEST_TIMEOUT_S
) -> StageSession:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DeployError(f"stage {stage.name!r}: server address {address!r} is not HOST:PORT")
    session = _bounded(
        lambda: rpc.connect(host, int(port), session_timeout=0),
        timeout,
        f"stage {stage.name!r}: cannot open an RPC session with {address}",
    )
    return StageSession(stage, session, address)


def request_from_tracker(
    stage: StageInfo,
    tracker: tuple[str, int],
    key: str | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> StageSession:
    """Ask the tracker for a free worker registered under ``key`` (default: the stage's)."""
    key = key or stage.rpc_key
    if not key:
        raise DeployError(
            f"stage {stage.name!r} has no rpc_key: set cfg[module].rpc_key to the key its "
            f"workers register under at the tracker"
        )
    host, port = tracker
    holder: dict[str, Any] = {}

    def request() -> Any:
        holder["tracker"] = tracker_session = rpc.connect_tracker(host, port)
        return tracker_session.request(key, session_timeout=0, max_retry=1)

    def give_up() -> None:
        if "tracker" in holder:
            holder["tracker"].close()

    session = _bounded(
        request,
        timeout,
        f"stage {stage.name!r}: the tracker at {host}:{port} gave no free worker with key {key!r}",
        on_timeout=give_up,
    )
    return StageSession(stage, session, f"{key}@{host}:{port}")


def _bounded(
    func: Callable[[], Any],
    timeout: float,
    what: str,
    on_timeout: Callable[[], None] | None = None,
) -> Any:
    """Run a blocking TVM call with a deadline: TVM's own calls have none."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = func()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, name="tvmpipe-rpc-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if on_timeout is not None:
            on_timeout()
        raise DeployError(f"{what} within {timeout:.0f} s")
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, VersionMismatchError):
            raise exc
        raise DeployError(f"{what}: {_remote_message(exc)}") from exc
    return result["value"]


def start_local_workers(count: int, host: str = "127.0.0.1") -> list[LocalWorker]:
    """Start ``count`` loopback workers at once and wait until each is listening."""
    workers = [LocalWorker(host) for _ in range(count)]
    try:
        for worker in workers:
            worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers
