"""Putting stages on workers through tvm.rpc: local loopback workers, servers, tracker keys.

Each stage gets its own RPC session; the session is the stage's lifetime. Every RPC error is
mapped here to a DeployError that names the stage and the worker.

With a secret (the controller's secret file: ``secret_file=``, else ``$TVMPIPE_SECRET_FILE``)
every session is opened with a proof that this controller holds it, and every worker must prove
in its handshake that it holds it too, before anything is uploaded (proto/rpcauth.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
from tvm import rpc
from tvm.rpc import base as rpc_base

from tvmpipe.proto.errors import (
    DeployError,
    NoWorkerError,
    TrackerUnreachableError,
    VersionMismatchError,
)
from tvmpipe.proto.messages import check_handshake, handshake_info
from tvmpipe.proto.rpcauth import (
    ENV_SECRET_FILE,
    NO_PROOF,
    REFUSED,
    answer_is_right,
    load_secret,
    new_challenge,
    secret_file_from_env,
    session_proof,
)

from . import forks
from .library import PipelineLibrary, StageInfo

READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
CALL_LOCK_TIMEOUT_S = 30.0
TRACKER_TIMEOUT_S = 3.0  # a tracker that has not answered by then is reported unreachable
CONNECT_FLOOR_S = 2.0  # a worker granted at the last moment still gets this long to connect


class LocalWorker:
    """A ``tvmpipe-worker`` child process on loopback; it exits when this process goes away."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        secret_file: str | None = None,
    ):
        """``secret_file`` (default: ``$TVMPIPE_SECRET_FILE``, if set): the worker's secret."""
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        argv = ["--host", host, "--port", "0", "--exit-with-parent", "--silent", *extra_args]
        secret_file = secret_file or secret_file_from_env()
        if secret_file:
            argv += ["--secret-file", secret_file]
        self.process = forks.start_worker(argv, self._stderr)
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
    """The server is TVM's own RPC server, without tvmpipe: the stage may run in relay mode."""


class SecretError(DeployError):
    """The worker refused this controller's secret (or its lack), or did not prove its own."""


def controller_secret(secret_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The secret in ``secret_file``, else in ``$TVMPIPE_SECRET_FILE``; None if neither."""
    path = secret_file or secret_file_from_env()
    return load_secret(path) if path else None


class StageSession:
    """One stage on one worker, through one RPC session; calls are serialised."""

    def __init__(self, stage: StageInfo, session: Any, peer: str, secret: bytes | None = None):
        self.stage = stage
        self.peer = peer
        self._secret = secret  # the worker must prove it holds it too
        self._session: Any = session
        self._functions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.address = ""
        self.remote_pid: int | None = None
        self.devices: list[str] = []
        self.rpc_address = peer
        # Set by the client when the stage runs in relay mode: the plain TVM server it relays
        # to ("host:port", or "key@host:port" through the tracker); None for a tvmpipe worker.
        self.relay_board: str | None = None

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
        """Check versions, and with a secret that the worker holds it; a server without
        tvmpipe raises PlainServerError (relay mode, if allowed)."""
        mine = handshake_info()
        if self._secret is not None:
            mine["challenge"] = challenge = new_challenge()
        try:
            reply = json.loads(self.call("tvmpipe.handshake", json.dumps(mine)))
        except DeployError as exc:
            if "has no function 'tvmpipe.handshake'" not in str(exc):
                raise
            reply = None
        if reply is None:  # raised here, unchained: TVM's error holds the session open
            where = self.peer
            if self.rpc_address != self.peer:  # placed by the tracker: name the server too
                where = f"{self.rpc_address} ({self.peer})"
            raise PlainServerError(f"stage {self.stage.name!r}: {where} is a plain TVM RPC server")
        check_handshake(mine, reply, f"worker {self.peer}")
        if self._secret is not None and not answer_is_right(
            self._secret, challenge, reply.get("answer")
        ):
            raise SecretError(
                f"stage {self.stage.name!r}: worker {self.peer} did not prove that it holds this "
                f"controller's secret (it runs without --secret-file, or with another secret, or "
                f"is not the worker it claims to be); nothing was sent to it"
            )
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

    @property
    def rpc(self) -> Any:
        """The tvm.rpc session itself (for measuring: upload, load_module, device)."""
        if self._session is None:
            raise DeployError(f"stage {self.stage.name!r}: its session on {self.peer} is closed")
        return self._session

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
    stage: StageInfo,
    address: str,
    timeout: float = REQUEST_TIMEOUT_S,
    secret: bytes | None = None,
) -> StageSession:
    """An RPC session with the server at ``address``, or a DeployError within ``timeout``.

    ``secret``: the controller's secret (default: that of ``$TVMPIPE_SECRET_FILE``, if set).

    Raises DeployError, within ``timeout``: nothing listens there ("refused the connection"),
    the host did not accept a TCP connection ("timed out"), or the server accepted it but did
    not answer TVM's RPC handshake ("did not answer").
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DeployError(f"stage {stage.name!r}: server address {address!r} is not HOST:PORT")
    what = f"stage {stage.name!r}: server {address}"
    hint = f"start a worker there (tvmpipe-worker --port {port}) or fix the address"
    secret = controller_secret() if secret is None else secret
    session = _connect_rpc(stage, what, host, int(port), "", timeout, hint, secret)
    return StageSession(stage, session, address, secret)


def _connect_rpc(
    stage: StageInfo,
    what: str,
    host: str,
    port: int,
    key: str,
    timeout: float,
    hint: str,
    secret: bytes | None,
) -> Any:
    """rpc.connect within ``timeout`` (at least CONNECT_FLOOR_S once the server has answered),
    with a proof of ``secret`` in the key string (a plain TVM server ignores it).

    A probe first: TVM's connect leaks its socket when it fails, and waits forever on a
    server that never answers.
    """
    deadline = time.monotonic() + timeout
    _probe_rpc(what, host, port, timeout, hint)
    remaining = max(CONNECT_FLOOR_S, deadline - time.monotonic())
    if secret is not None:
        key = f"{key} {session_proof(secret)}"
    try:
        return _bounded(
            lambda: rpc.connect(host, port, key, session_timeout=0),
            remaining,
            f"{what}: cannot open an RPC session",
            f"{what} answered but did not open an RPC session within {remaining:g} s",
        )
    except DeployError as exc:
        if REFUSED not in str(exc):
            raise
        reason = str(exc).split(REFUSED, 1)[1].strip()
        who = f"stage {stage.name!r}: the worker at {host}:{port}"
        if reason.startswith(NO_PROOF):
            raise SecretError(
                f"{who} requires a secret: pass secret_file=... to PipelineModule (or "
                f"secret_file in the cluster file's [controller], --secret-file to tvmpipe, "
                f"or ${ENV_SECRET_FILE}), the same secret as its --secret-file"
            ) from exc
        raise SecretError(f"{who} refused this controller's secret: {reason}") from exc


# Longer than any key a server expects: TVM's C++ server fails hard on a shorter one.
_PROBE_KEY = ("client:tvmpipe-probe-" + "-" * 256).encode()


def _probe_rpc(what: str, host: str, port: int, timeout: float, hint: str) -> None:
    """Check that a TVM RPC server answers at host:port, or raise DeployError saying why.

    The probe offers a key no server expects: TVM's servers (Python and C++) answer "key
    mismatch" and go on listening, with no session started and no tracker slot taken.
    """
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise DeployError(f"{what} {_os_reason(exc, timeout)}; {hint}") from exc
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(struct.pack("<ii", rpc_base.RPC_MAGIC, len(_PROBE_KEY)) + _PROBE_KEY)
        code = struct.unpack("<i", rpc_base.recvall(sock, 4))[0]
    except TimeoutError as exc:
        raise DeployError(
            f"{what} accepted the connection but did not answer TVM's RPC handshake within "
            f"{timeout:g} s; is it a TVM RPC server, and not busy with another session?"
        ) from exc
    except OSError as exc:
        raise DeployError(
            f"{what} closed the connection during TVM's RPC handshake ({_lower(exc)}); "
            f"is it a TVM RPC server?"
        ) from exc
    finally:
        sock.close()
    if code not in (rpc_base.RPC_CODE_MISMATCH, rpc_base.RPC_CODE_SUCCESS):
        raise DeployError(f"{what} answered, but not as a TVM RPC server; {hint}")


def _os_reason(exc: OSError, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"did not accept a connection within {timeout:g} s (timed out)"
    if exc.errno == errno.ECONNREFUSED:
        return "refused the connection (connection refused: nothing listens on that port)"
    if isinstance(exc, socket.gaierror):
        return f"cannot be resolved ({exc.strerror or exc})"
    return f"cannot be reached ({_lower(exc)})"


def _lower(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).lower()


def check_tracker(tracker: tuple[str, int], timeout: float = TRACKER_TIMEOUT_S) -> dict[str, Any]:
    """The tracker's summary if it answers within ``timeout``, else TrackerUnreachableError.

    For a check before waiting on the tracker: TVM's own client retries for 60 s.
    """
    sock = _open_tracker(tracker, timeout, "")
    try:
        return _tracker_summary(sock, tracker, "")
    finally:
        sock.close()


def _open_tracker(tracker: tuple[str, int], timeout: float, who: str) -> socket.socket:
    """A connection that passed the tracker's handshake within ``timeout``; the socket keeps
    the time left as its timeout, for the summary that follows."""
    host, port = tracker
    deadline = time.monotonic() + timeout
    where = f"{who}the RPC tracker at {host}:{port}"
    hint = f"; is the tracker running at {host}:{port}?"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TrackerUnreachableError(f"{where} {_os_reason(exc, timeout)}{hint}") from exc
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(struct.pack("<i", rpc_base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", rpc_base.recvall(sock, 4))[0]
        sock.settimeout(max(0.001, deadline - time.monotonic()))
    except OSError as exc:
        sock.close()
        reason = f"within {timeout:g} s" if isinstance(exc, TimeoutError) else f"({_lower(exc)})"
        raise TrackerUnreachableError(
            f"{where} accepted the connection but did not answer the tracker handshake "
            f"{reason}{hint}"
        ) from exc
    if magic != rpc_base.RPC_TRACKER_MAGIC:
        sock.close()
        raise TrackerUnreachableError(f"{where} answered, but is not a TVM RPC tracker{hint}")
    return sock


def _tracker_summary(sock: socket.socket, tracker: tuple[str, int], who: str) -> dict[str, Any]:
    try:
        rpc_base.sendjson(sock, [rpc_base.TrackerCode.SUMMARY])
        reply = rpc_base.recvjson(sock)
    except (OSError, ValueError) as exc:
        raise TrackerUnreachableError(
            f"{who}the RPC tracker at {tracker[0]}:{tracker[1]} did not send its summary "
            f"({_lower(exc)}); is the tracker running there?"
        ) from exc
    if not isinstance(reply, list) or reply[:1] != [rpc_base.TrackerCode.SUCCESS]:
        raise TrackerUnreachableError(
            f"{who}the RPC tracker at {tracker[0]}:{tracker[1]} sent an invalid summary: {reply!r}"
        )
    return reply[1]


def registered_workers(summary: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{key: (registered, free)}`` from a tracker summary.

    Registered servers are the tracker's server_info entries (key "server:<key>"), which stay
    while a server is in a session; free ones are queue_info's count of unclaimed servers.
    """
    counts: dict[str, list[int]] = {}
    for info in summary.get("server_info", []):
        kind, _, key = str(info.get("key", "")).partition(":")
        if kind == "server":
            counts.setdefault(key, [0, 0])[0] += 1
    for key, queue in summary.get("queue_info", {}).items():
        entry = counts.setdefault(key, [0, 0])
        entry[1] = int(queue.get("free", 0))
        entry[0] = max(entry[0], entry[1])  # a server that never sent its info still counts
    return {key: (total, free) for key, (total, free) in counts.items() if total}


def request_from_tracker(
    stage: StageInfo,
    tracker: tuple[str, int],
    key: str | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
    secret: bytes | None = None,
) -> StageSession:
    """Ask the tracker for a free worker registered under ``key`` (default: the stage's).

    The tracker hands out the worker's address and match key; this controller then connects to
    the worker directly, with a proof of ``secret`` (as in connect_server).

    Raises TrackerUnreachableError within min(TRACKER_TIMEOUT_S, timeout) if the tracker does
    not answer; NoWorkerError at once if no worker is registered under the key, or after
    ``timeout`` if all of them stay in use; DeployError if the granted worker cannot be
    connected (given at least CONNECT_FLOOR_S).
    """
    key = key or stage.rpc_key
    if not key:
        raise DeployError(
            f"stage {stage.name!r} has no rpc_key: set cfg[module].rpc_key to the key its "
            f"workers register under at the tracker"
        )
    host, port = tracker
    started = time.monotonic()
    who = f"stage {stage.name!r}: "
    sock = _open_tracker(tracker, min(TRACKER_TIMEOUT_S, timeout), who)
    try:
        workers = registered_workers(_tracker_summary(sock, tracker, who))
        if key not in workers:
            known = ", ".join(f"{k!r} ({n})" for k, (n, _) in sorted(workers.items()))
            raise NoWorkerError(
                f"{who}no worker is registered under key {key!r} at the tracker {host}:{port} "
                f"(registered: {known or 'none'}); start one with "
                f"`tvmpipe-worker --tracker {host}:{port} --key {key}`"
            )
        total = workers[key][0]
        try:
            rpc_base.sendjson(sock, [rpc_base.TrackerCode.REQUEST, key, "", 1])
            sock.settimeout(max(0.001, started + timeout - time.monotonic()))
            reply = rpc_base.recvjson(sock)
        except TimeoutError:
            # Closing the connection withdraws the request: the tracker skips requests whose
            # connection is closed, so the worker stays free for others.
            raise NoWorkerError(
                f"{who}all {total} worker(s) registered under key {key!r} at the tracker "
                f"{host}:{port} are in use; none became free within "
                f"{time.monotonic() - started:.1f} s (start more workers with --key {key})"
            ) from None
        except (OSError, ValueError) as exc:
            raise TrackerUnreachableError(
                f"{who}the RPC tracker at {host}:{port} dropped the connection while asked "
                f"for a worker with key {key!r} ({_lower(exc)}); is the tracker running?"
            ) from exc
    finally:
        sock.close()
    if not isinstance(reply, list) or reply[:1] != [rpc_base.TrackerCode.SUCCESS]:
        raise DeployError(f"{who}the tracker at {host}:{port} refused the request: {reply!r}")
    url, worker_port, matchkey = reply[1]
    remaining = max(CONNECT_FLOOR_S, started + timeout - time.monotonic())
    what = f"{who}worker {url}:{worker_port} (key {key!r}, from the tracker at {host}:{port})"
    hint = "check the address the worker registered (its --custom-addr) is reachable from here"
    secret = controller_secret() if secret is None else secret
    session = _connect_rpc(stage, what, url, int(worker_port), matchkey, remaining, hint, secret)
    placed = StageSession(stage, session, f"{key}@{host}:{port}", secret)
    placed.rpc_address = f"{url}:{worker_port}"  # until the worker says where it is
    return placed


def _bounded(
    func: Callable[[], Any], timeout: float, what: str, timed_out: str | None = None
) -> Any:
    """Run a blocking TVM call with a deadline: TVM's own calls have none.

    On timeout the call is left to finish in its daemon thread (it ends when the peer closes).
    """
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
        raise DeployError(timed_out or f"{what} within {timeout:g} s")
    if "error" in result:
        exc = result["error"]
        if isinstance(exc, VersionMismatchError):
            raise exc
        raise DeployError(f"{what}: {_remote_message(exc)}") from exc
    return result["value"]


def start_local_workers(
    count: int, host: str = "127.0.0.1", secret_file: str | None = None
) -> list[LocalWorker]:
    """Start ``count`` loopback workers at once and wait until each is listening."""
    workers = [LocalWorker(host, secret_file=secret_file) for _ in range(count)]
    try:
        for worker in workers:
            worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers
