"""PipelineModule: the queued, asynchronous client of the pipeline-executor RFC.

``set_input`` queues one value per input name; ``run`` takes the oldest complete input set,
numbers it and pushes it to the first stages without waiting; ``get_output`` returns results in
launch order. A receiver thread collects the output stages' messages and joins them by sequence
number. The number of inputs in flight (launched, result not yet handed back) is bounded by
``window``; ``run`` waits at most ``timeout`` seconds for room, then raises.

A lost stage fails every input in flight with a StageLostError, unless ``restart=True``: then a
recovery thread deploys the stage again where the plan puts it, points its upstream stages (or
this client) at its new address, and sends every input in flight again from the copies kept
here. Results are joined by sequence number and the first one wins, so every launched input
still yields exactly one result, in order.
"""

from __future__ import annotations

import collections
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from tvmpipe.proto.errors import (
    BackpressureTimeout,
    DeployError,
    InputError,
    NothingToRunError,
    PipelineClosedError,
    ProtocolError,
    StageLostError,
)
from tvmpipe.proto.messages import (
    MAX_FRAME_BYTES,
    Message,
    MsgType,
    decode,
    encode,
    encode_blob,
)

from .cluster import Placement, load_cluster, plan_from_arguments
from .deploy import (
    LocalWorker,
    PlainServerError,
    StageSession,
    connect_server,
    request_from_tracker,
    start_local_workers,
)
from .health import StageMonitor
from .library import PipelineLibrary, StageInfo, load_library
from .wiring import Wiring

CLIENT = "client"
POLL_MS = 50
HWM = 64
LINGER_MS = 1000
QUEUE_BYTES = 64 << 20  # what each stage may buffer, queues and sockets together
MAX_RESTARTS = 10


class PipelineModule:
    """Deploys a PipelineLibrary and streams inputs through it.

    Where the stages run: by default one local loopback worker per stage, started here;
    ``servers=["host:port", ...]`` uses running workers in stage order; ``tracker=(host, port)``
    asks TVM's tracker for a worker by each stage's ``rpc_key``; ``cluster="file.toml"`` reads
    both from a cluster file. A stage on TVM's own RPC server (no tvmpipe there) runs in relay
    mode. ``client_host`` is the address the last stages send results to (this machine as the
    workers see it); ``bind_host`` is where this process listens (default: ``client_host``).

    ``restart=True`` deploys a lost stage again (at most ``max_restarts`` times) and sends the
    inputs in flight again; it keeps a copy of every input until its result arrives.
    ``queue_bytes`` bounds what each stage buffers.
    """

    def __init__(
        self,
        lib: PipelineLibrary | str | Path,
        *,
        servers: Sequence[str] | None = None,
        tracker: tuple[str, int] | None = None,
        cluster: str | Path | None = None,
        window: int = 256,
        timeout: float = 60.0,
        client_host: str | None = None,
        bind_host: str | None = None,
        restart: bool = False,
        max_restarts: int = MAX_RESTARTS,
        queue_bytes: int = QUEUE_BYTES,
    ):
        if sum(x is not None for x in (servers, tracker, cluster)) > 1:
            raise ValueError("give at most one of servers, tracker and cluster")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if queue_bytes < 1 << 16:
            raise ValueError(f"queue_bytes must be at least 64 KiB, got {queue_bytes}")
        self.lib = lib if isinstance(lib, PipelineLibrary) else load_library(lib)
        if cluster is not None:
            plan = load_cluster(cluster, self.lib)
        else:
            plan = plan_from_arguments(self.lib, servers, tracker)
        client_host = client_host or plan.client_host or "127.0.0.1"
        bind_host = bind_host or plan.bind_host
        self.window = window
        self.timeout = timeout
        self.wiring = Wiring(self.lib)
        self._plan = plan
        self._restart = restart
        self._restarts_left = max_restarts
        self._queue_bytes = queue_bytes
        self._closed = False
        self._local_workers: list[LocalWorker] = []
        self._worker_of: dict[str, LocalWorker] = {}  # "stage" or "stage relay" -> its worker
        self._sessions: list[StageSession] = []
        self._context = zmq.Context()
        self._pushes: dict[str, zmq.Socket[Any]] = {}
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque[np.ndarray]] = {
            name: collections.deque() for name in self.lib.input_names()
        }
        self._next_seq = 0
        self._launched: collections.deque[int] = collections.deque()  # by run(), not returned
        self._results: dict[int, list[np.ndarray] | Exception] = {}
        self._futures: dict[int, Future[list[np.ndarray]]] = {}
        self._in_flight = 0
        self._partial: dict[int, dict[str, Message]] = {}
        self._counters = collections.Counter[str]()
        self._stopping = threading.Event()
        self._receiver: threading.Thread | None = None
        self._monitor: StageMonitor | None = None
        self._lost: StageLostError | None = None
        self._lost_sessions: set[StageSession] = set()  # not asked to stop: they may hang
        self._copies: dict[int, dict[str, np.ndarray]] = {}  # restart=True: inputs in flight
        self._params_set: dict[str, dict[str, np.ndarray]] = {}  # replayed on a new deployment
        self._losses: queue.Queue[tuple[StageSession, str]] = queue.Queue()
        self._paused = threading.Event()  # a stage is being deployed again: hold inputs back
        self._recovery: threading.Thread | None = None
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self._pull.setsockopt(zmq.RCVHWM, HWM)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._client_host = client_host
        self._bind_host = bind_host or client_host
        port = self._pull.bind_to_random_port(f"tcp://{self._bind_host}")
        self.address = f"tcp://{client_host}:{port}"
        try:
            self._deploy()
        except BaseException:
            self.close()
            raise

    # ----- deployment
    def _deploy(self) -> None:
        local = [s.name for s in self.lib.stages if self._plan.placements[s.name] == Placement()]
        if local:  # started together: each takes a second or so to import TVM
            self._local_workers = start_local_workers(len(local), self._bind_host)
            self._worker_of = dict(zip(local, self._local_workers, strict=True))
        for stage in self.lib.stages:
            self._sessions.append(self._place(stage))  # closed by close() if a later step fails
        for session in self._sessions:
            session.call("tvmpipe.stage.start", self._start_message(session.stage.name))
        for stage_name in self.wiring.input_stages():
            self._pushes[stage_name] = self._input_socket(self._session_of(stage_name).address)
        self._monitor = StageMonitor(self._sessions, self._stage_lost)
        self._monitor.start()
        self._receiver = threading.Thread(
            target=self._receive_loop, name="tvmpipe-client-receive", daemon=True
        )
        self._receiver.start()

    def _place(self, stage: StageInfo) -> StageSession:
        """A session for ``stage`` where the plan puts it, with the stage loaded and weighted."""
        place = self._plan.placements[stage.name]
        stage = replace(stage, **place.options)
        relay: dict[str, Any] | None = None
        if place.server is not None:
            host, _, port = place.server.rpartition(":")
            session = connect_server(stage, place.server)
            relay = {"host": host, "port": port}
        elif place.key is not None:
            assert self._plan.tracker is not None
            session = request_from_tracker(stage, self._plan.tracker, place.key)
            relay = {"tracker": list(self._plan.tracker), "key": place.key}
        else:
            worker = self._local_worker(stage.name)
            session = connect_server(stage, f"{worker.host}:{worker.port}")
        try:
            try:
                session.handshake()
            except PlainServerError:
                if relay is None:
                    raise
                session.close()  # frees the plain server for the relay's own session
                session = self._relay_session(stage)
            else:
                relay = None
            session.upload_and_load(self.lib, relay)
            params = {**self.lib.initial_params(stage), **self._params_set.get(stage.name, {})}
            if params:
                session.call("tvmpipe.stage.set_params", _blob(params))
        except BaseException:
            session.close()
            raise
        return session

    def _local_worker(self, key: str, extra_args: Sequence[str] = ()) -> LocalWorker:
        """The loopback worker for ``key``; a new one if there is none or it died."""
        worker = self._worker_of.get(key)
        if worker is not None and worker.process.poll() is None:
            return worker
        if worker is not None:
            worker.stop()
            self._local_workers.remove(worker)
        worker = LocalWorker(self._bind_host, extra_args)
        self._local_workers.append(worker)
        worker.wait_ready()
        self._worker_of[key] = worker
        return worker

    def _start_message(self, stage: str) -> str:
        addresses = {s.stage.name: s.address for s in self._sessions}
        return self.wiring.start_message(stage, addresses, self.address, self._queue_bytes)

    def _input_socket(self, address: str) -> zmq.Socket[Any]:
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, HWM)
        push.setsockopt(zmq.LINGER, LINGER_MS)
        push.connect(address)
        return push

    # ----- the RFC's queue
    def set_input(self, name: str, value: Any, copy: bool = True) -> None:
        """Queue one value for pipeline input ``name``; refused at once if it cannot fit.

        ``copy=False``: the pipeline borrows ``value`` (if it is a C-contiguous array of the
        right dtype) instead of copying it; do not write to it until its result has arrived.
        """
        self._check_open()
        array = self.lib.check_input(name, value, copy)
        with self._cond:
            self._queues[name].append(array)

    def run(self) -> None:
        """Launch the oldest complete input set; returns without waiting for its result."""
        self._check_usable()
        with self._cond:
            self._check_complete_set()
            self._wait_for_room()  # a refused run leaves the set queued
            self._check_complete_set()
            inputs = {name: q.popleft() for name, q in self._queues.items()}
            seq = self._number(None)
        self._send(seq, inputs)

    def _check_complete_set(self) -> None:
        empty = [n for n, q in self._queues.items() if not q]
        if empty:
            raise NothingToRunError(f"no complete input set is queued; missing: {', '.join(empty)}")

    def get_output(self, timeout: float | None = None) -> list[np.ndarray]:
        """The next result in launch order; ``[]`` if it is not ready (after ``timeout`` s)."""
        self._check_open()
        with self._cond:
            if not self._launched:
                return []
            seq = self._launched[0]
            if timeout and seq not in self._results:
                self._cond.wait_for(lambda: seq in self._results or self._closed, timeout)
                self._check_open()
            if seq not in self._results:
                return []
            self._launched.popleft()
            result = self._results.pop(seq)
            self._in_flight -= 1
            self._cond.notify_all()
        if isinstance(result, Exception):
            raise result
        return result

    # ----- beyond the RFC
    def submit(self, inputs: Mapping[str, Any], copy: bool = True) -> Future[list[np.ndarray]]:
        """Launch one complete input set; the future holds its outputs (or the StageError).

        ``copy=False`` as for ``set_input``."""
        self._check_usable()
        names = set(self.lib.input_names())
        if set(inputs) != names:
            raise InputError(
                f"submit needs exactly the inputs {sorted(names)}; got {sorted(inputs)}"
            )
        arrays = {name: self.lib.check_input(name, value, copy) for name, value in inputs.items()}
        future: Future[list[np.ndarray]] = Future()
        future.set_running_or_notify_cancel()
        with self._cond:
            self._wait_for_room()
            seq = self._number(future)
        self._send(seq, arrays)
        return future

    def map(
        self, inputs: Iterable[Mapping[str, Any]], window: int | None = None, copy: bool = True
    ) -> Iterator[list[np.ndarray]]:
        """Outputs for each input set, in order, with at most ``window`` in flight."""
        limit = min(window or self.window, self.window)
        pending: collections.deque[Future[list[np.ndarray]]] = collections.deque()
        for item in inputs:
            if len(pending) >= limit:
                yield pending.popleft().result(self.timeout)
            pending.append(self.submit(item, copy))
        while pending:
            yield pending.popleft().result(self.timeout)

    def set_params(self, group: str, params: Mapping[str, Any]) -> None:
        """Replace some weights of a parameter group; inputs computed afterwards use them."""
        self._check_usable()
        if group not in self.lib.param_groups:
            raise KeyError(f"no parameter group {group!r}; groups: {sorted(self.lib.param_groups)}")
        stage = self.lib.stage(self.lib.param_groups[group])
        allowed = {p: spec for p, spec in zip(stage.input_names, stage.inputs, strict=True)}
        names = set(self.lib.initial_params(stage))
        arrays = {}
        for name, value in params.items():
            if name not in names:
                raise InputError(
                    f"param group {group!r} has no weight {name!r}; it has {sorted(names)}"
                )
            array = np.asarray(value)
            spec = allowed[name]
            if spec.dtype != str(array.dtype) or (
                spec.shape is not None
                and not spec.compatible(type(spec)(name, str(array.dtype), tuple(array.shape)))
            ):
                raise InputError(
                    f"param group {group!r}: {name} expects {spec.describe()}, got "
                    f"{array.dtype}{list(array.shape)}"
                )
            arrays[name] = array
        self._session_of(stage.name).call("tvmpipe.stage.set_params", _blob(arrays))
        self._params_set.setdefault(stage.name, {}).update(arrays)

    def stats(self) -> dict[str, Any]:
        """Per-stage counters from the workers, and the client's own."""
        self._check_open()
        stages = {}
        for session in list(self._sessions):
            try:
                data = json.loads(session.call("tvmpipe.stage.stats"))
            except DeployError as exc:  # lost, and being deployed again or failed
                data = {"unreachable": str(exc)}
            data.update(
                device=session.stage.device,
                worker=session.peer,
                address=session.address,
                pid=session.remote_pid,
            )
            stages[session.stage.name] = data
        with self._cond:
            client = {
                "launched": self._next_seq,
                "in_flight": self._in_flight,
                "queued_inputs": {n: len(q) for n, q in self._queues.items()},
                "waiting_results": len(self._results),
                "restarts_left": self._restarts_left if self._restart else 0,
                **self._counters,
            }
        return {"stages": stages, "client": client}

    # ----- lifetime
    def close(self) -> None:
        """Stop every stage, close sockets and sessions, stop the workers started here."""
        if self._closed:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.stop()
        if self._receiver is not None:
            self._receiver.join(5)
        if self._recovery is not None:
            self._recovery.join(5)
        for session in self._sessions:
            session.close(stop=session not in self._lost_sessions)
        self._sessions = []
        for push in self._pushes.values():
            push.close(linger=0)
        self._pull.close(linger=0)
        self._context.term()
        for worker in self._local_workers:
            worker.stop()
        self._local_workers = []
        for future in self._futures.values():
            if not future.done():
                future.set_exception(PipelineClosedError("the pipeline was closed"))
        self._futures.clear()

    def __enter__(self) -> PipelineModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- internals
    def _relay_session(self, stage: StageInfo) -> StageSession:
        """A local stage process that drives a plain TVM RPC server for this stage."""
        worker = self._local_worker(f"{stage.name} relay", ["--custom-addr", self._client_host])
        session = connect_server(stage, f"{worker.host}:{worker.port}")
        session.handshake()
        return session

    def _check_open(self) -> None:
        if self._closed:
            raise PipelineClosedError("this PipelineModule is closed; create a new one")

    def _check_usable(self) -> None:
        """Open, and no stage lost: new inputs could complete."""
        self._check_open()
        if self._lost is not None:
            raise self._lost

    def _stage_lost(self, session: StageSession, reason: str) -> None:
        """The monitor lost a session: deploy the stage again if asked to, else fail."""
        with self._cond:
            if self._lost is not None or self._closed:
                session.abort()  # a call stuck on it would hold close() for minutes
                self._lost_sessions.add(session)
                return
            if self._restart and self._restarts_left > 0:
                self._restarts_left -= 1
                self._paused.set()
                self._losses.put((session, reason))
                if self._recovery is None:
                    self._recovery = threading.Thread(
                        target=self._recovery_loop, name="tvmpipe-client-recovery", daemon=True
                    )
                    self._recovery.start()
                return
            if self._restart:
                reason += "; it was deployed again as often as max_restarts allows"
        self._fail(session.stage.name, reason)

    def _fail(self, stage: str, reason: str) -> None:
        """Fail every input in flight, and refuse new ones: they cannot complete."""
        error = StageLostError(stage, f"stage {stage!r} is lost: {reason}")
        with self._cond:
            if self._lost is not None or self._closed:
                return
            self._lost = error
            for session in self._sessions:
                if session.stage.name == stage:
                    session.abort()
                    self._lost_sessions.add(session)
            for seq in self._launched:
                self._results.setdefault(seq, error)
            futures = list(self._futures.values())
            self._futures.clear()
            self._in_flight -= len(futures)
            self._copies.clear()
            self._paused.clear()
            self._cond.notify_all()
        for future in futures:
            future.set_exception(error)

    # ----- recovery (restart=True)
    def _recovery_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                lost, reason = self._losses.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                continue
            try:
                self._redeploy(lost)
            except Exception as exc:
                self._fail(lost.stage.name, f"{reason}; deploying it again failed: {exc}")
                return

    def _redeploy(self, lost: StageSession) -> None:
        """Deploy the lost stage again, rewire its neighbours, send the inputs in flight again."""
        name = lost.stage.name
        lost.abort()
        lost.close(stop=False)
        session = self._place(self.lib.stage(name))
        with self._send_lock:
            with self._cond:
                if self._closed:
                    session.close()
                    return
                self._sessions = [session if s is lost else s for s in self._sessions]
            session.call("tvmpipe.stage.start", self._start_message(name))
            rewire = json.dumps({"name": name, "address": session.address})
            for upstream in self.wiring.upstream_stages(name):
                self._session_of(upstream).call("tvmpipe.stage.rewire", rewire)
            if name in self._pushes:
                self._pushes.pop(name).close(linger=0)
                self._pushes[name] = self._input_socket(session.address)
            assert self._monitor is not None
            self._monitor.watch(session)
            self._counters["restarts"] += 1
            with self._cond:
                pending = sorted(self._copies.items())
            for seq, inputs in pending:
                if not self._send_now(seq, inputs, resending=True):
                    return  # another stage was lost: its recovery sends them all again
            with self._cond:  # still holding _send_lock: an input held back meanwhile waits
                if self._losses.empty():  # for it, then sees the pause over and goes out
                    self._paused.clear()

    def _session_of(self, stage: str) -> StageSession:
        return next(s for s in self._sessions if s.stage.name == stage)

    def _wait_for_room(self) -> None:
        """Wait (holding ``_cond``) until the window has room; raise after ``timeout``."""
        if not self._cond.wait_for(
            lambda: self._in_flight < self.window or self._closed or self._lost, self.timeout
        ):
            raise BackpressureTimeout(
                f"{self._in_flight} inputs are in flight (window {self.window}) and none "
                f"finished within {self.timeout:.1f} s; call get_output() or raise the window"
            )
        self._check_usable()

    def _number(self, future: Future[list[np.ndarray]] | None) -> int:
        """Give the next input its sequence number (holding ``_cond``)."""
        seq = self._next_seq
        self._next_seq += 1
        self._in_flight += 1
        if future is None:
            self._launched.append(seq)
        else:
            self._futures[seq] = future
        return seq

    def _send(self, seq: int, inputs: dict[str, np.ndarray]) -> None:
        if self._restart:
            with self._cond:
                self._copies[seq] = inputs
        with self._send_lock:
            if not self._paused.is_set():  # else the recovery sends it with the others
                self._send_now(seq, inputs)

    def _send_now(self, seq: int, inputs: dict[str, np.ndarray], resending: bool = False) -> bool:
        """Send one input set (holding ``_send_lock``); False if a stage was lost meanwhile."""
        deadline = time.monotonic() + self.timeout
        for stage, tensors in self.wiring.client_messages(inputs):
            frames = encode(Message.data(seq, CLIENT, tensors))
            push = self._pushes[stage]
            try:  # the common case: room in the queue, no poll needed
                push.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                self._counters["bytes_out"] += sum(memoryview(f).nbytes for f in frames)
                continue
            except zmq.Again:
                pass
            while not push.poll(POLL_MS, zmq.POLLOUT):
                if (
                    self._closed
                    or self._lost
                    or (not self._losses.empty() if resending else self._paused.is_set())
                ):
                    return False
                if time.monotonic() > deadline:
                    error = BackpressureTimeout(
                        f"stage {stage!r} accepted no input for {self.timeout:.1f} s; input "
                        f"#{seq} was not delivered"
                    )
                    self._deliver(seq, error)
                    raise error
            push.send_multipart(frames, copy=False)
            self._counters["bytes_out"] += sum(memoryview(f).nbytes for f in frames)
        return True

    def _receive_loop(self) -> None:
        self._pull.setsockopt(zmq.RCVTIMEO, POLL_MS)  # so that the loop sees _stopping
        senders = self.wiring.output_stages()
        while not self._stopping.is_set():
            try:
                frames = self._pull.recv_multipart(copy=False)
            except zmq.Again:
                continue
            self._counters["bytes_in"] += sum(len(f.buffer) for f in frames)
            try:
                msg = decode(frames)
            except ProtocolError:
                self._counters["dropped"] += 1
                continue
            if msg.type is MsgType.STOP or msg.sender not in senders or not self._expects(msg.seq):
                self._counters["dropped"] += 1
                continue
            parts = self._partial.setdefault(msg.seq, {})
            parts[msg.sender] = msg
            if len(parts) == len(senders):
                del self._partial[msg.seq]
                try:
                    result = self.wiring.assemble_outputs(msg.seq, parts)
                except KeyError:
                    self._counters["dropped"] += 1
                    continue
                self._deliver(msg.seq, result)

    def _expects(self, seq: int) -> bool:
        """Launched here and not yet answered: anything else is a stray message."""
        with self._cond:
            if seq in self._futures:
                return True
            return seq not in self._results and seq in self._launched

    def _deliver(self, seq: int, result: list[np.ndarray] | Exception) -> None:
        with self._cond:
            self._copies.pop(seq, None)
            future = self._futures.pop(seq, None)
            if future is None:
                self._results[seq] = result
            else:
                self._in_flight -= 1
            self._counters["completed"] += 1
            self._cond.notify_all()
        if future is not None:
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _blob(arrays: Mapping[str, np.ndarray]) -> bytearray:
    tensors = {name: np.ascontiguousarray(value) for name, value in arrays.items()}
    return bytearray(encode_blob(Message.data(0, CLIENT, tensors)))
