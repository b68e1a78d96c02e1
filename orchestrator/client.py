"""PipelineModule: the queued, asynchronous client of the pipeline-executor RFC.

``set_input`` queues one value per input name; ``run`` takes the oldest complete input set,
numbers it and pushes it to the first stages without waiting; ``get_output`` returns results in
launch order. A receiver thread collects the output stages' messages and joins them by sequence
number. The number of inputs in flight (launched, result not yet handed back) is bounded by
``window``; ``run`` waits at most ``timeout`` seconds for room, then raises.

The parts, one job each: ``Fleet`` places and wires the stages (fleet.py), the ``Sequencer``
numbers inputs, keeps what is needed to send them again and orders results (sequencer.py),
``Recovery`` deploys a lost stage again and deals with overdue inputs (recovery.py, where the
rewire and resend protocol is written down), and this class is the API and the client's own
sockets around them.
"""

from __future__ import annotations

import collections
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from tvmpipe.proto.errors import (
    BackpressureTimeout,
    InputError,
    NothingToRunError,
    PipelineClosedError,
    PipelineError,
    ProtocolError,
    StageLostError,
)
from tvmpipe.proto.frames import NOBLOCK, recv_frames, send_frames
from tvmpipe.proto.messages import (
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    Message,
    MsgType,
    decode,
    encode,
)
from tvmpipe.proto.security import Guard
from tvmpipe.proto.shm import Inbox, Outbox, frames_bytes
from tvmpipe.proto.transport import local_endpoint

from .cluster import load_cluster, plan_from_arguments
from .deploy import REQUEST_TIMEOUT_S
from .fleet import Fleet
from .health import StageMonitor
from .library import PipelineLibrary, load_library
from .metrics import MetricsServer
from .recovery import Recovery
from .report import render
from .sequencer import InFlight, Sequencer
from .signature import TensorSpec
from .wiring import CLIENT, Wiring

if TYPE_CHECKING:
    from .plan import Plan

POLL_MS = 50
HWM = 64
RING_BYTES = 16 << 20  # the most a shared-memory ring to one stage holds
LINGER_MS = 1000
QUEUE_BYTES = 64 << 20  # what each stage may buffer, queues and sockets together
MAX_RESTARTS = 10
RESULT_TIMEOUT_S = 60.0
TRACE_KEPT = 4096  # inputs whose timeline the client keeps when tracing
TRACE_SETTLE_S = 2.0  # write_trace waits this long at most for the stages' last records


class PipelineModule:
    """Deploys a PipelineLibrary and streams inputs through it.

    Where the stages run: by default one local loopback worker per stage, started here;
    ``servers=["host:port", ...]`` uses running workers in stage order; ``tracker=(host, port)``
    asks TVM's tracker for a worker by each stage's ``rpc_key``; ``cluster="file.toml"`` reads
    both from a cluster file. A stage on TVM's own RPC server (no tvmpipe there) runs in relay
    mode only with ``allow_relay=True`` (or per stage in the cluster file). ``secret_file``
    (default: the cluster file's, else ``$TVMPIPE_SECRET_FILE``): the workers' secret, which
    this controller proves it holds, and they prove they hold (README, Security).
    ``client_host`` is the address the last stages send results to (this machine as the
    workers see it); ``bind_host`` is where this process listens (default: ``client_host``).

    ``plan=`` (from ``plan_pipeline``) puts each stage where the plan says.
    ``metrics_port`` (0: any free port) serves Prometheus metrics at ``metrics_address``.
    ``trace=True`` records each input's timeline in every stage and here (the most recent
    ``TRACE_KEPT``), for ``write_trace``. ``progress``: deploying shows a bar on stderr
    (default: when it is a terminal; False: never).
    ``deploy_timeout`` bounds placing each stage. ``restart=True`` deploys a lost stage again
    (at most ``max_restarts`` times) and sends the inputs in flight again; it keeps a copy of
    every input until its result arrives. An input whose result has not come ``result_timeout``
    seconds (60) after it was sent, while no other result came either, is
    sent again (``restart=True``) or fails with ResultTimeoutError. ``queue_bytes`` bounds what
    each stage buffers; ``window`` bounds the inputs in flight and those queued by set_input.
    ``security``: who may send on the data plane. "auto" (default) admits only this pipeline's
    own parties, checked when they connect on loopback and encrypted (CURVE) elsewhere;
    "encrypt" everywhere, "auth" nowhere, "off" admits anyone (README, Security).
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
        deploy_timeout: float = REQUEST_TIMEOUT_S,
        result_timeout: float = RESULT_TIMEOUT_S,
        plan: Plan | None = None,
        metrics_port: int | None = None,
        trace: bool = False,
        progress: bool | None = None,
        security: str = "auto",
        secret_file: str | Path | None = None,
        allow_relay: bool = False,
    ):
        if sum(x is not None for x in (servers, tracker, cluster)) > 1:
            raise ValueError("give at most one of servers, tracker and cluster")
        self._plan = plan
        self._report_before: dict[str, Any] | None = None
        if plan is not None:
            if any(x is not None for x in (servers, tracker, cluster)):
                raise ValueError("give either plan or servers, tracker and cluster, not both")
            placed = plan.placement()
            servers, tracker = placed.get("servers"), placed.get("tracker")
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if queue_bytes < 1 << 16:
            raise ValueError(f"queue_bytes must be at least 64 KiB, got {queue_bytes}")
        if deploy_timeout <= 0 or result_timeout <= 0:
            raise ValueError("deploy_timeout and result_timeout must be positive")
        self.lib = lib if isinstance(lib, PipelineLibrary) else load_library(lib)
        if cluster is not None:
            places = load_cluster(cluster, self.lib)
        else:
            places = plan_from_arguments(self.lib, servers, tracker)
        client_host = client_host or places.client_host or "127.0.0.1"
        bind_host = bind_host or places.bind_host or client_host
        self.window = window
        self.timeout = timeout
        self.result_timeout = result_timeout
        self.queue_bytes = queue_bytes
        self.wiring = Wiring(self.lib, security)
        self._closed = False
        self._lost: StageLostError | None = None
        self._cond = threading.Condition()  # guards the sequencer, the queues and the pause
        self._send_lock = threading.Lock()  # guards the input sockets; taken before _cond
        self._sequencer = Sequencer(window, keep_copies=restart)
        self._paused = False  # a stage is being deployed again: hold inputs back
        self._queues: dict[str, collections.deque[np.ndarray]] = {
            name: collections.deque() for name in self.lib.input_names()
        }
        self._queued_bytes = 0
        self._partial: dict[int, dict[str, Message]] = {}
        self._counters = collections.Counter[str]()
        self._stopping = threading.Event()
        self._context = zmq.Context()
        self._pushes: dict[str, zmq.Socket[Any]] = {}
        self._outboxes: dict[str, Outbox] = {}  # shared-memory rings, to stages on this machine
        self._inbox = Inbox()  # the output stages' rings, on this machine
        self._guard = Guard(self._context, self.wiring.share(CLIENT))
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, HWM)
        self._pull.setsockopt(zmq.LINGER, 0)
        limit = self.wiring.output_frame_limit()
        self._pull.setsockopt(
            zmq.MAXMSGSIZE, max(MAX_HEADER_BYTES, limit) if limit else MAX_FRAME_BYTES
        )
        self._guard.serve(self._pull, self.wiring.output_stages(), f"tcp://{client_host}")
        self._socket_dir: str | None = None
        if local_endpoint(client_host) and sys.platform == "linux":
            # A Unix socket on loopback, as the stages' (stage.py), in Linux's abstract
            # namespace: no file to leave behind even if this process is killed
            self.address = f"ipc://@tvmpipe-{secrets.token_hex(12)}"
            self._pull.bind(self.address)
        elif local_endpoint(client_host):
            self._socket_dir = tempfile.mkdtemp(prefix="tvmpipe-")
            self.address = f"ipc://{self._socket_dir}/results.sock"
            self._pull.bind(self.address)
        else:
            port = self._pull.bind_to_random_port(f"tcp://{bind_host}")
            self.address = f"tcp://{client_host}:{port}"
        try:
            self._fleet = Fleet(
                self.lib,
                places,
                self.wiring,
                bind_host,
                client_host,
                deploy_timeout,
                secret_file or places.secret_file,
                allow_relay,
            )
        except BaseException:
            self._close_sockets()
            raise
        self._fleet.trace = trace
        self._timeline: collections.OrderedDict[int, dict[str, float]] | None = (
            collections.OrderedDict() if trace else None
        )
        self._clock_offsets: dict[str, float] = {}
        self._trace_lock = threading.Lock()  # the timeline: the sending and receiving threads
        self._monitor: StageMonitor | None = None
        self._recovery: Recovery | None = None
        self._receiver: threading.Thread | None = None
        self._metrics: MetricsServer | None = None
        self.metrics_address: str | None = None
        try:
            self._fleet.deploy(self.address, queue_bytes, epoch=0, progress=progress)
            for name in self.wiring.input_stages():
                self._pushes[name] = self._input_socket(name, self._fleet.addresses[name][CLIENT])
            self._monitor = StageMonitor(list(self._fleet.sessions.values()), self._stage_lost)
            self._recovery = Recovery(self, self._fleet, self._monitor, restart, max_restarts)
            self._receiver = threading.Thread(
                target=self._receive_loop, name="tvmpipe-client-receive", daemon=True
            )
            self._monitor.start()
            self._recovery.start()
            self._receiver.start()
            if trace:
                self._clock_offsets = self._fleet.clock_offsets()
            if metrics_port is not None:
                self._metrics = MetricsServer(self.stats, bind_host, metrics_port)
                self.metrics_address = self._metrics.address
        except BaseException:
            self.close()
            raise

    def _input_socket(self, stage: str, address: str) -> zmq.Socket[Any]:
        old = self._outboxes.pop(stage, None)
        if old is not None:
            old.close()
        if address.startswith("ipc://"):
            self._outboxes[stage] = Outbox(RING_BYTES)
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, HWM)
        push.setsockopt(zmq.LINGER, LINGER_MS)
        self._guard.present(push, stage, address)
        push.connect(address)
        return push

    # ----- the RFC's queue
    def set_input(self, name: str, value: Any, copy: bool = True) -> None:
        """Queue one value for pipeline input ``name``; refused at once if it cannot fit.

        At most ``window`` values, and ``queue_bytes`` (or one value, if larger), wait per
        input for ``run()``: past that, set_input raises BackpressureTimeout.
        ``copy=False``: the pipeline borrows ``value`` (if it is a C-contiguous array of the
        right dtype) instead of copying it; do not write to it until its result has arrived.
        """
        self._check_open()
        array = self.lib.check_input(name, value, copy)
        with self._cond:
            waiting = self._queues[name]
            if len(waiting) >= self.window or (
                waiting and self._queued_bytes + array.nbytes > self.queue_bytes
            ):
                raise BackpressureTimeout(
                    f"input {name!r} already has {len(waiting)} values queued "
                    f"({self._queued_bytes} bytes over all inputs; the bounds are window="
                    f"{self.window} values and queue_bytes={self.queue_bytes}): call run()"
                )
            waiting.append(array)
            self._queued_bytes += array.nbytes

    def run(self) -> None:
        """Launch the oldest complete input set; returns without waiting for its result."""
        self._check_usable()
        with self._cond:
            self._check_complete_set()
            self._wait_for_room()  # a refused run leaves the set queued
            self._check_complete_set()
            inputs = {name: q.popleft() for name, q in self._queues.items()}
            self._queued_bytes -= sum(a.nbytes for a in inputs.values())
            seq = self._sequencer.launch(inputs, None, time.monotonic())
        self._send(seq, inputs)

    def _check_complete_set(self) -> None:
        empty = [n for n, q in self._queues.items() if not q]
        if empty:
            raise NothingToRunError(f"no complete input set is queued; missing: {', '.join(empty)}")

    def get_output(self, timeout: float | None = None) -> list[np.ndarray]:
        """The next result in launch order; ``[]`` if it is not ready (after ``timeout`` s).

        With a timeout it waits even while nothing is launched: another thread may run()."""
        self._check_open()
        with self._cond:
            if timeout and not self._sequencer.result_ready():
                self._cond.wait_for(lambda: self._sequencer.result_ready() or self._closed, timeout)
                self._check_open()
            result = self._sequencer.next_result()
            if result is None:
                return []
            self._cond.notify_all()
        if isinstance(result, Exception):
            raise result
        return result

    # ----- beyond the RFC
    def submit(self, inputs: Mapping[str, Any], copy: bool = True) -> Future[list[np.ndarray]]:
        """Launch one complete input set; the future holds its outputs (or the StageError).

        ``copy=False`` as for ``set_input``. With ``copy=True`` and no ``restart``, the input
        is sent before submit returns, and the send itself takes the copy (into a shared-memory
        slot, or into ZeroMQ's own buffer): one copy of each tensor instead of two."""
        self._check_usable()
        names = set(self.lib.input_names())
        if set(inputs) != names:
            raise InputError(
                f"submit needs exactly the inputs {sorted(names)}; got {sorted(inputs)}"
            )
        send_copies = copy and not self._sequencer.keep_copies  # nothing keeps them after
        arrays = {
            name: self.lib.check_input(name, value, copy and not send_copies)
            for name, value in inputs.items()
        }
        future: Future[list[np.ndarray]] = Future()
        future.set_running_or_notify_cancel()
        with self._cond:
            self._wait_for_room()
            seq = self._sequencer.launch(arrays, future, time.monotonic())
        self._send(seq, arrays, send_copies)
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
        self._fleet.set_params(stage.name, arrays)

    def stats(self) -> dict[str, Any]:
        """Per-stage counters from the workers, and the client's own."""
        self._check_open()
        stages = self._fleet.stats()
        recovery = self._recovery
        with self._cond:
            client = {
                **self._sequencer.snapshot(),
                "queued_inputs": {n: len(q) for n, q in self._queues.items()},
                "queued_bytes": self._queued_bytes,
                "restarts": recovery.restarts if recovery else 0,
                "restarts_left": recovery.restarts_left if recovery and recovery.restart else 0,
                **self._counters,
            }
        client["security"] = self._guard.mode
        client["refused"] = self._guard.refused()
        return {"stages": stages, "client": client}

    def report(self, show: bool = True) -> str:
        """Per stage, the share of time computing, waiting and blocked since the last report
        (or the start); the bottleneck and what limits it; the plan's prediction if any.
        Printed unless ``show=False``; returned either way."""
        stages = self.stats()["stages"]
        planned = None
        if self._plan is not None and len(self._plan.solution.stages) == len(stages):
            planned = [s.compute_s for s in self._plan.solution.stages]
        after: dict[str, list[str]] = {}
        for edge in self.lib.connections:
            after.setdefault(edge.src, []).append(f"stage {edge.dst!r}")
        for out in self.lib.outputs:
            after.setdefault(out.stage, []).append("the client")
        text = render(stages, self._report_before, planned, after)
        self._report_before = stages
        if show:
            print(text)
        return text

    def write_trace(self, path: str | Path, png: bool = True) -> tuple[Path, Path | None]:
        """The recorded timelines as Chrome trace-event JSON (Perfetto opens it), one track per
        stage, clocks aligned; and a Gantt chart as a PNG beside it. Needs ``trace=True``."""
        if self._timeline is None:
            raise PipelineError("write_trace needs PipelineModule(..., trace=True)")
        from .trace import write_trace

        with self._trace_lock:
            client = [dict(r) for r in self._timeline.values() if "result" in r]
        stages = self._stage_traces(max((int(r["seq"]) for r in client), default=None))
        return write_trace(path, stages, client, self._clock_offsets, png=png)

    def _stage_traces(self, latest: int | None) -> dict[str, list[dict[str, float]]]:
        """The stages' timelines, once each holds ``latest``, the last input whose result came:
        a stage records an input as done only after its send returned, which may be after the
        result reached this process (waits at most TRACE_SETTLE_S)."""
        deadline = time.monotonic() + TRACE_SETTLE_S
        while True:
            stages = self._fleet.traces()
            settled = all(any(r.get("seq") == latest for r in recs) for recs in stages.values())
            if latest is None or settled or time.monotonic() > deadline:
                return stages
            time.sleep(POLL_MS / 1000)

    # ----- lifetime
    def close(self) -> None:
        """Stop every stage, close sockets and sessions, stop the workers started here."""
        if self._closed:
            return
        if self._metrics is not None:
            self._metrics.close()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.stop()
        if self._receiver is not None:
            self._receiver.join(5)
        if self._recovery is not None:
            self._recovery.stop()
        try:
            self._fleet.close()
        finally:
            self._close_sockets()
        with self._cond:
            futures = self._sequencer.fail_all(PipelineClosedError("the pipeline was closed"))
        for future in futures:
            if not future.done():
                future.set_exception(PipelineClosedError("the pipeline was closed"))

    def _close_sockets(self) -> None:
        with self._send_lock:
            for push in self._pushes.values():
                push.close(linger=0)
            for outbox in self._outboxes.values():
                outbox.close()
        self._pull.close(linger=0)
        self._inbox.close()
        self._guard.close()
        self._context.term()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> PipelineModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- checks
    def _check_open(self) -> None:
        if self._closed:
            raise PipelineClosedError("this PipelineModule is closed; create a new one")

    def _check_usable(self) -> None:
        """Open, and no stage lost: new inputs could complete."""
        self._check_open()
        if self._lost is not None:
            raise self._lost

    def _wait_for_room(self) -> None:
        """Wait (holding ``_cond``) until the window has room; raise after ``timeout``."""
        if not self._cond.wait_for(
            lambda: self._sequencer.has_room() or self._closed or self._lost, self.timeout
        ):
            raise BackpressureTimeout(
                f"{self._sequencer.in_flight} inputs are in flight (window {self.window}) and "
                f"none finished within {self.timeout:.1f} s; call get_output() or raise the window"
            )
        self._check_usable()

    # ----- sending
    def _send(self, seq: int, inputs: dict[str, np.ndarray], copy: bool = False) -> None:
        """Send one input set, unless a redeployment holds it back (the resend sends it).

        ``copy``: the caller may change the tensors once this returns, so the send copies."""
        with self._send_lock:
            with self._cond:
                if self._paused or not self._sequencer.take_send(seq, time.monotonic()):
                    return
                epoch = self._sequencer.epoch
            self._send_now(seq, epoch, inputs, copy)

    def _send_now(
        self, seq: int, epoch: int, inputs: dict[str, np.ndarray], copy: bool = False
    ) -> bool:
        """Send (holding ``_send_lock``); False if a stage was lost meanwhile."""
        if self._timeline is None:
            return self._send_frames(seq, epoch, inputs, copy)
        with self._trace_lock:  # the first send is the one timed
            record = self._timeline.setdefault(seq, {"seq": seq, "send_start": time.time()})
            if len(self._timeline) > TRACE_KEPT:
                self._timeline.popitem(last=False)
        sent = self._send_frames(seq, epoch, inputs, copy)
        with self._trace_lock:
            record.setdefault("send_end", time.time())
        return sent

    def _send_frames(self, seq: int, epoch: int, inputs: dict[str, np.ndarray], copy: bool) -> bool:
        deadline = time.monotonic() + self.timeout
        for stage, tensors in self.wiring.client_messages(inputs):
            frames = encode(Message.data(seq, CLIENT, tensors, epoch))
            push = self._pushes[stage]
            outbox = self._outboxes.get(stage)
            out = outbox.wrap(frames) if outbox else frames  # once: a slot waits with it
            try:  # the common case: room in the queue, no poll needed
                send_frames(push, out, NOBLOCK, copy=copy and _lends(out, frames))
                self._counters["bytes_out"] += sum(memoryview(f).nbytes for f in frames)
                continue
            except zmq.Again:
                pass
            while not push.poll(POLL_MS, zmq.POLLOUT):
                if self._closed or self._lost or self._paused:
                    if outbox:
                        outbox.unsent()
                    return False  # a lost stage: recovery sends it again, or it failed
                if time.monotonic() > deadline:
                    if outbox:
                        outbox.unsent()
                    error = BackpressureTimeout(
                        f"stage {stage!r} accepted no input for {self.timeout:.1f} s; input "
                        f"#{seq} was not delivered"
                    )
                    self._deliver(seq, error)
                    raise error
            send_frames(push, out, copy=copy and _lends(out, frames))
            self._counters["bytes_out"] += sum(memoryview(f).nbytes for f in frames)
        return True

    # ----- hooks for Recovery (recovery.py)
    def current_epoch(self) -> int:
        with self._cond:
            return self._sequencer.epoch

    def replace_input_socket(self, stage: str, address: str) -> None:
        with self._send_lock:
            self._pushes.pop(stage).close(linger=0)
            self._pushes[stage] = self._input_socket(stage, address)

    def resend_all(self, end_pause: bool) -> None:
        """Open a new epoch and send every input in flight again; maybe end the pause."""
        with self._send_lock:
            with self._cond:
                if self._closed or self._lost:
                    return
                pending = self._sequencer.resend_all(time.monotonic())
                epoch = self._sequencer.epoch
            for seq, inputs in pending:
                if not self._send_now(seq, epoch, inputs):
                    return  # another stage was lost: its recovery sends them all again
            with self._cond:  # still holding _send_lock: an input held back meanwhile waits
                if end_pause and self._recovery and not self._recovery.pending_losses():
                    self._paused = False

    def overdue(self) -> list[InFlight]:
        with self._cond:
            if self._paused:
                return []
            return self._sequencer.overdue(time.monotonic(), self.result_timeout)

    def fail_stage(self, stage: str, reason: str) -> None:
        """Fail every input in flight, and refuse new ones: they cannot complete."""
        error = StageLostError(stage, f"stage {stage!r} is lost: {reason}")
        with self._cond:
            if self._lost is not None or self._closed:
                return
            self._lost = error
            self._paused = False
            futures = self._sequencer.fail_all(error)
            self._cond.notify_all()
        for future in futures:
            future.set_exception(error)

    def fail_input(self, seq: int, error: Exception) -> None:
        with self._cond:
            future = self._sequencer.fail(seq, error, time.monotonic())
            self._cond.notify_all()
        if future is not None:
            future.set_exception(error)

    def _stage_lost(self, session: Any, reason: str) -> None:
        """From the monitor: deploy the stage again if asked to (pausing sends), else fail."""
        assert self._recovery is not None
        with self._cond:
            if self._lost is not None or self._closed:
                session.abort()  # a call stuck on it would hold close() for minutes
                self._fleet.lost.append(session)
                return
            if self._recovery.will_restart():
                self._paused = True
        self._recovery.stage_lost(session, reason)

    # ----- receiving
    def _receive_loop(self) -> None:
        self._pull.setsockopt(zmq.RCVTIMEO, POLL_MS)  # so that the loop sees _stopping
        senders = self.wiring.output_stages()
        while not self._stopping.is_set():
            try:
                frames = recv_frames(self._pull)
            except zmq.Again:
                continue
            try:
                frames = self._inbox.resolve(frames, copy=True)  # the caller keeps outputs
                self._counters["bytes_in"] += frames_bytes(frames)
                msg = decode(frames)
            except ProtocolError:
                self._counters["dropped"] += 1
                continue
            if self._guard.mode != "off" and msg.sender != _peer(frames[0]):
                self._counters["forged"] += 1  # an admitted party claiming to be another
                continue
            if msg.type is MsgType.STOP or msg.sender not in senders or not self._expects(msg.seq):
                self._counters["dropped"] += 1
                continue
            parts = self._partial.setdefault(msg.seq, {})
            if msg.sender in parts:
                self._counters["dropped"] += 1
                continue
            parts[msg.sender] = msg
            if len(parts) == len(senders):
                del self._partial[msg.seq]
                try:
                    result = self.wiring.assemble_outputs(msg.seq, parts)
                except KeyError:  # parts that do not hold the outputs they should
                    self._counters["bad_results"] += 1
                    continue
                if isinstance(result, list) and not self._matches_signature(result):
                    self._counters["bad_results"] += 1
                    continue
                self._deliver(msg.seq, result)
            elif len(self._partial) > self.window:
                self._partial = {s: p for s, p in self._partial.items() if self._expects(s)}

    def _matches_signature(self, outputs: list[np.ndarray]) -> bool:
        """Each output has the dtype and shape its stage declares (where they are known)."""
        for array, out in zip(outputs, self.lib.outputs, strict=True):
            specs = self.lib.stage(out.stage).outputs
            got = TensorSpec.of("", array)
            if specs is not None and not specs[out.index].compatible(got):
                return False
        return True

    def _expects(self, seq: int) -> bool:
        """Launched here and not yet answered: anything else is a stray or a duplicate."""
        with self._cond:
            return self._sequencer.expects(seq)

    def _deliver(self, seq: int, result: list[np.ndarray] | Exception) -> None:
        if self._timeline is not None:
            with self._trace_lock:
                record = self._timeline.get(seq)
                if record is not None:
                    record.setdefault("result", time.time())
        with self._cond:
            _, future = self._sequencer.accept(seq, result, time.monotonic())
            self._cond.notify_all()
        if future is not None:
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _lends(out: list[Any], frames: list[Any]) -> bool:
    """Whether the frames going out still borrow the tensors (no shared-memory slot took a
    copy): those sent with ``copy=False`` are read by ZeroMQ after the send returns."""
    return len(frames) > 1 and out[-1] is frames[-1]


def _peer(frame: zmq.Frame) -> str | None:
    """The party ZeroMQ authenticated for this message's connection (None: not authenticated)."""
    try:
        peer = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return peer if isinstance(peer, str) else None
