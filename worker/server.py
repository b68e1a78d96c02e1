"""The stage worker: a stock TVM RPC server with tvmpipe's functions registered.

TVM's Python RPC server forks one process per session. tvmpipe registers its functions before
the server starts, so every session process has them; a plain TVM client still sees an
ordinary RPC server. The controller, through the session, uploads a stage artifact and calls:

    tvmpipe.handshake(json) -> json          versions and devices, checked by both sides
    tvmpipe.stage.load(json) -> json         load the artifact on its device
    tvmpipe.stage.start(json) -> json        bind one data socket per sender (their addresses are
                                             the reply), connect to the next stages, start
    tvmpipe.stage.rewire(json)               a next stage was deployed again: send to its address;
                                             returns once the send thread has switched
    tvmpipe.stage.locate(int) -> json        where input #seq is: waiting for parts, sent, unseen
    tvmpipe.stage.traces() -> json           each recent input's timeline (when tracing)
    tvmpipe.clock() -> float                 this worker's time.time(), to align clocks
    tvmpipe.stage.set_params(bytes)          replace parameter-group weights (a proto blob)
    tvmpipe.stage.stats() -> json            counters, queue depths, service times
    tvmpipe.stage.stop()                     stop the loops and close the sockets
    tvmpipe.probe.sink(json) -> json         bind a link probe's receiver (worker/probe.py)
    tvmpipe.probe.send(json) -> json         time a link to a sink: latency and bandwidth
    tvmpipe.probe.result(json) -> json       what a sink received, once it is done
    tvmpipe.probe.memory() -> json           available and total memory, CPU cores

A stage lives as long as its session: the session loop is wrapped so that, however the session
ends (the controller closes it, or dies and its socket drops), the stage is stopped before the
session process exits.

Two guards wrap TVM's server too. With a secret (``--secret-file``) a connection is served only
if its key string carries a valid proof (proto/rpcauth.py); this is checked in the listening
process, before the session process is forked, so a refused client runs nothing. And every
session's path-taking functions (upload, download, remove, load_module, ...) are confined to the
session's own directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import tvm
import tvm.rpc.server as tvm_rpc_server
import tvm_ffi
from tvm.rpc import _ffi_api as rpc_ffi

from tvmpipe.proto.messages import check_handshake, decode_blob, handshake_info
from tvmpipe.proto.rpcauth import PROOF_OPTION, REFUSED, ProofChecker, worker_answer

from . import probe
from .placement import check_cores, pin_current_thread
from .relay import RelayRunner
from .runner import Runner, StageRunner, tvm_device
from .stage import QUEUE_BYTES, Destination, Stage

DEVICES = ("cpu", "cuda", "opencl", "vulkan", "metal", "rocm")


class WorkerState:
    """Per-process settings the session processes inherit through fork."""

    bind_host = "127.0.0.1"
    advertise_host = "127.0.0.1"
    rpc_port = 0
    stage: Stage | None = None
    work_dir: str | None = None  # the session's directory, removed by TVM when it ends
    secret: bytes | None = None
    checker: ProofChecker | None = None  # in the listening process: the sessions' proofs


def available_devices() -> list[str]:
    found = []
    for kind in DEVICES:
        try:
            tvm_device(kind)
            found.append(kind)
        except Exception:
            continue
    return found


def _handshake(peer_json: str) -> str:
    peer = json.loads(peer_json)
    check_handshake(handshake_info(), peer, "the controller", "this worker")
    rpc_address = f"{WorkerState.advertise_host}:{WorkerState.rpc_port}"
    reply = {**handshake_info(), "devices": available_devices(), "pid": os.getpid()}
    if WorkerState.secret is not None and isinstance(peer.get("challenge"), str):
        reply["answer"] = worker_answer(WorkerState.secret, peer["challenge"])
    return json.dumps({**reply, "rpc_address": rpc_address})


def _load(spec_json: str) -> str:
    if WorkerState.stage is not None:
        raise RuntimeError("this session already runs a stage; open a new session for another")
    spec = json.loads(spec_json)
    workpath = tvm.get_global_func("tvm.rpc.server.workpath")
    artifact = Path(workpath(spec["artifact"]))
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    if digest != spec["sha256"]:
        raise RuntimeError(f"artifact {artifact.name} arrived damaged (sha256 {digest[:12]}...)")
    device = spec["device"]
    relay = spec.get("relay")
    if relay:
        if spec["kind"] != "relax":
            raise RuntimeError(
                f"stage {spec['name']!r} is a Python function: a plain TVM RPC server cannot run "
                f"it; start 'tvmpipe-worker' on that board instead"
            )
        relay_runner = RelayRunner(relay, artifact, device, spec["inputs"])
        return _serve(spec, relay_runner)
    if device not in available_devices():
        raise RuntimeError(
            f"stage {spec['name']!r} needs device {device!r} but this worker has only "
            f"{', '.join(available_devices())}"
        )
    check_cores(spec.get("cpu_affinity"))
    python = spec.get("python")
    runner = StageRunner(
        spec["kind"],
        artifact,
        device,
        spec["inputs"],
        (python["module"], python["function"]) if python else None,
    )
    return _serve(spec, runner)


def _serve(spec: dict[str, Any], runner: Runner) -> str:
    """Bind the stage's data socket; it starts when the controller sends its wiring."""
    affinity, threads = spec.get("cpu_affinity"), spec.get("num_threads")
    WorkerState.stage = Stage(
        spec["name"],
        runner,
        WorkerState.bind_host,
        WorkerState.advertise_host,
        on_compute_start=lambda: pin_current_thread(
            affinity, threads, tvm_pool=spec["kind"] != "python"
        ),
        socket_dir=WorkerState.work_dir,
    )
    return json.dumps({"address": f"tcp://{WorkerState.advertise_host}", "pid": os.getpid()})


def _current() -> Stage:
    if WorkerState.stage is None:
        raise RuntimeError("no stage is loaded in this session; call tvmpipe.stage.load first")
    return WorkerState.stage


def _start(wiring_json: str) -> str:
    wiring = json.loads(wiring_json)
    destinations = [
        Destination(d["name"], d["address"], tuple((int(i), str(n)) for i, n in d["tensors"]))
        for d in wiring["destinations"]
    ]
    senders = {str(name): int(limit) for name, limit in wiring["senders"].items()}
    queue_bytes = int(wiring.get("queue_bytes", QUEUE_BYTES))
    epoch = int(wiring.get("epoch", 0))
    trace = bool(wiring.get("trace", False))
    security = wiring.get("security")
    addresses = _current().start(senders, destinations, queue_bytes, epoch, trace, security)
    return json.dumps({"addresses": addresses})


def _rewire(request_json: str) -> None:
    request = json.loads(request_json)
    _current().rewire(str(request["name"]), str(request["address"]))


def _locate(seq: int) -> str:
    return json.dumps(_current().locate(int(seq)))


def _traces() -> str:
    return json.dumps(_current().traces())


def _clock() -> float:
    return time.time()


def _set_params(blob: bytearray) -> None:
    _current().runner.set_params(decode_blob(bytes(blob)).tensors)


def _stats() -> str:
    return json.dumps(_current().snapshot())


def _stop() -> None:
    stage, WorkerState.stage = WorkerState.stage, None
    if stage is not None:
        stage.stop()


def register_functions() -> None:
    """Make tvmpipe's functions callable through any RPC session of this process."""
    for name, func in (
        ("tvmpipe.handshake", _handshake),
        ("tvmpipe.stage.load", _load),
        ("tvmpipe.stage.start", _start),
        ("tvmpipe.stage.rewire", _rewire),
        ("tvmpipe.stage.locate", _locate),
        ("tvmpipe.stage.traces", _traces),
        ("tvmpipe.clock", _clock),
        ("tvmpipe.stage.set_params", _set_params),
        ("tvmpipe.stage.stats", _stats),
        ("tvmpipe.stage.stop", _stop),
        *probe.FUNCTIONS,
    ):
        tvm_ffi.register_global_func(name, func, override=True)


def _die_with_parent() -> None:
    """The session process ends when its worker does, even on SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve_session(sock: Any, load_library: Any, work_path: Any) -> None:
    """TVM's per-session loop (tvm.rpc.server._serve_loop), with the stage stopped at its end."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    tvm_rpc_server._server_env(load_library, work_path)
    _confine_paths(str(work_path.path))
    WorkerState.work_dir = str(work_path.path)
    try:
        rpc_ffi.ServerLoop(sock.fileno())
    except Exception as exc:  # the controller went away mid-call: the session is over anyway
        logging.getLogger("RPCServer").info("session ended: %s", exc)
    finally:
        _stop()


def _confine_paths(work_dir: str) -> None:
    """Register TVM's path-taking session functions again so that no path leaves ``work_dir``.

    TVM joins the client's path to the session's directory as given, so "/etc/x" or "../x"
    reach anywhere. upload, download and remove (C++) find their paths through workpath.
    """
    base = os.path.realpath(work_dir)

    def inside(path: str) -> str:
        full = os.path.realpath(os.path.join(base, path))
        if os.path.isabs(path) or full == base or os.path.commonpath([base, full]) != base:
            raise RuntimeError(
                f"path {path!r} is outside this session's directory: give the name of a file "
                f"in it (relative, without '..')"
            )
        return full

    def checked(name: str) -> Any:
        original = tvm_ffi.get_global_func(name)

        def call(path: str) -> Any:
            inside(path)
            return original(path)

        return call

    confined = {
        "tvm.rpc.server.workpath": inside,
        "tvm.rpc.server.load_module": checked("tvm.rpc.server.load_module"),
        "tvm.rpc.server.download_linked_module": checked("tvm.rpc.server.download_linked_module"),
    }
    for name, func in confined.items():
        tvm_ffi.register_global_func(name, func, override=True)


def _server_options(opts: list[str]) -> dict[str, Any]:
    """TVM's parsing of the client's key options, keeping the session's proof; a malformed
    -timeout is ignored (TVM's own parsing would raise and end the listening thread)."""
    try:
        parsed: dict[str, Any] = _original_parse(opts)
    except ValueError:
        parsed = {}
    proofs = [o[len(PROOF_OPTION) :] for o in opts if o.startswith(PROOF_OPTION)]
    if proofs:
        parsed["tvmpipe_proof"] = proofs[0]
    return parsed


def _refuse(sock: Any, addr: Any, reason: str) -> None:
    """Tell the client why (it receives an RPC error from rpc.connect) and hang up."""
    logging.getLogger("RPCServer").warning("refused a session from %s: %s", addr, reason)
    with contextlib.suppress(Exception):
        rpc_ffi.ReturnException(sock.fileno(), REFUSED + reason)
        # Read what the client sent before closing: closing on unread data resets the
        # connection, and the client would see the reset instead of the reason.
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(1.0)
        while sock.recv(65536):
            continue
    with contextlib.suppress(OSError):
        sock.close()


def _serving_that_survives(sock: Any, addr: Any, opts: Any, load_library: Any) -> None:
    """TVM's per-connection handler raises when a session process dies abnormally, which
    would end the listening thread and take the whole worker off the tracker; it also leaves
    the process in the session's directory, deleted soon after, where the next session fails.
    With a secret, a connection without a good proof is refused here, before any fork."""
    if WorkerState.checker is not None:
        reason = WorkerState.checker.refusal(opts.pop("tvmpipe_proof", None))
        if reason is not None:
            _refuse(sock, addr, reason)
            return
    cwd = os.getcwd()  # TVM moves into the session's directory and, on error, stays there
    try:
        _original_serving(sock, addr, opts, load_library)
    except (RuntimeError, OSError) as exc:
        logging.getLogger("RPCServer").warning("a session ended abnormally: %s", exc)
        os.chdir(cwd)
        with contextlib.suppress(OSError):
            sock.close()


_original_serving = tvm_rpc_server._serving
_original_parse = tvm_rpc_server._parse_server_opt


def install_session_hook() -> None:
    """Wrap TVM 0.27's session handlers; all three are looked up by name for each session."""
    tvm_rpc_server._serve_loop = _serve_session
    tvm_rpc_server._serving = _serving_that_survives
    tvm_rpc_server._parse_server_opt = _server_options


def run_server(
    host: str,
    port: int,
    port_end: int,
    tracker: tuple[str, int] | None,
    key: str,
    custom_addr: str | None,
    silent: bool,
    secret: bytes | None = None,
) -> Any:
    """Start listening (and registering with the tracker); returns TVM's server state.
    With ``secret``, only clients that prove they hold it get a session."""
    register_functions()
    install_session_hook()
    WorkerState.secret = secret
    WorkerState.checker = ProofChecker(secret) if secret is not None else None
    WorkerState.bind_host = host
    WorkerState.advertise_host = custom_addr or (
        host if host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    )
    state = tvm_rpc_server.PopenRPCServerState(
        host,
        port,
        port_end,
        False,
        tracker,
        key,
        None,
        custom_addr,
        silent,
    )
    WorkerState.rpc_port = state.port
    return state
