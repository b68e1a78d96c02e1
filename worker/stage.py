"""A running stage: receive, join by sequence number, compute, send; three threads overlapped.

    receive   one PULL socket per sender --decode--> JoinTable (parts of seq k from every sender)
              --> the next complete input set, ready before the current one is computed
    compute   that input set --> runner(inputs) --> each destination with room now, else the
              send queue
    sender    send queue --> one message per destination (next stages, or the client)

Whoever is free receives. While inputs queue up (the last one was there before the stage asked
for it) and computing one takes long enough (``READ_AHEAD_MIN_S``), the receive thread takes
the sockets while the runner computes, and only then, and receives, decodes and joins the next
input set (``_prefetch_loop``), so that none of that is on the critical path of a stage that
waits on its device. Otherwise the compute thread receives itself: waking another thread
costs about 40 us of latency and CPU per input in CPython, which a lone request, a small
message or a short computation must not pay. The sockets are guarded by ``_recv_lock``; the
compute thread wakes the receive thread out of its poll (an inproc socket) when it wants them
back. For the same reason the compute thread sends a small output itself when that costs no
wait (``_hand_on``); the send thread takes large outputs, whose copy into shared memory costs
more than the hand-off, and what must wait for room downstream, so encoding and sending never
hold up the next computation. On loopback the receive sockets are Unix sockets
(proto/transport.py).

Every sender delivers exactly one message (data or error) per sequence number and epoch to each
of its destinations, so a stage knows when an input set is complete, and an error travels along
the same edges as data would have, reaching the client once per output stage. ZeroMQ sockets
are each used by one thread only. A message's sender is the socket it came in on: each sender
has its own, and a message whose ``from`` names another is dropped (counted as ``forged``).

Everything a stage holds is bounded by ``queue_bytes``, in four quarters: the receive sockets
(each sender's high-water mark, in messages of the largest size it may send), the partial input
sets (held back, never evicted: see joins.py; with the one complete set received ahead), the
send queue, and the outgoing sockets (their
high-water marks are set when the first message shows how big messages on that edge are). Each
receive socket refuses any frame larger than what its sender may send (ZeroMQ's MAXMSGSIZE).

``rewire`` returns only once the send thread has switched to the new address; messages still
queued for the old one are dropped with its socket. They were sent before the client sends
every input in flight again, in a new epoch (see orchestrator/recovery.py).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import zmq

from tvmpipe.proto.errors import ProtocolError
from tvmpipe.proto.frames import NOBLOCK, recv_frames, send_frames
from tvmpipe.proto.messages import (
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    Message,
    MsgType,
    RemoteError,
    decode,
    encode,
)
from tvmpipe.proto.security import Guard
from tvmpipe.proto.shm import Inbox, Outbox, frames_bytes
from tvmpipe.proto.transport import local_endpoint

from .joins import JoinTable
from .placement import name_os_thread
from .queues import ByteQueue
from .runner import Runner

POLL_MS = 50
QUEUE_DEPTH = 4  # outputs waiting to be sent
QUEUE_BYTES = 64 << 20  # all that a stage buffers: sockets, partial sets and send queue
HWM = 16  # the most ZeroMQ messages a socket buffers, however small
INLINE_SEND_BYTES = 64 << 10  # larger outputs go through the send thread: see _hand_on
# Read ahead only for computations this long: handing an input from the receive thread to the
# compute thread costs both threads a wake-up, and for a short one that costs more than the
# overlap saves (identity stages on a 2-core VM: 4 KiB streams 37 % and 1 MiB streams 15 %
# faster without it). The shortest of the last RECENT_COMPUTATIONS counts: a computation that
# the machine preempted looks long, never short.
READ_AHEAD_MIN_S = 0.5e-3
RECENT_COMPUTATIONS = 8
UNKNOWN_SIZE_HWM = 2  # from a sender whose tensors' sizes are not known (a Python stage's)
LINGER_MS = 1000
SAMPLES = 4096  # service times kept for the mean and p99
SENT_KEPT = 4096  # sequence numbers remembered as sent, for locate()
# Upper bounds (seconds) of the histogram buckets of service time and join wait (Prometheus's
# convention: cumulative counts per bound, the last bound is +Inf).
BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REWIRE_TIMEOUT_S = 10.0
_WAKE_NAMES = itertools.count()  # inproc endpoints of the receive thread's wake-up sockets
TRACE_KEPT = 4096  # inputs whose timeline a tracing stage keeps (the most recent)


@dataclass(frozen=True)
class Destination:
    """Where this stage's outputs go: ``tensors`` maps output index to the name it arrives as."""

    name: str
    address: str
    tensors: tuple[tuple[int, str], ...]


@dataclass
class StageStats:
    """Counters the controller reads through ``tvmpipe.stage.stats``."""

    received: int = 0
    received_ahead: int = 0  # input sets the receive thread had ready before they were asked for
    processed: int = 0
    failed: int = 0
    sent: int = 0
    dropped: int = 0
    forged: int = 0  # a message whose ``from`` is not the sender of its socket
    bytes_in: int = 0
    bytes_out: int = 0
    service_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=SAMPLES)
    )
    busy_s: float = 0.0  # the runner computing
    waiting_s: float = 0.0  # the compute thread waiting for an input set (or its parts)
    blocked_s: float = 0.0  # the compute thread waiting for room in the send queue
    send_blocked_s: float = 0.0  # the send thread waiting for room downstream
    service_hist: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    service_sum_s: float = 0.0
    join_hist: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    join_sum_s: float = 0.0

    def observe(self, hist: list[int], seconds: float) -> None:
        hist[bisect.bisect_left(BUCKETS_S, seconds)] += 1

    def summary(self) -> dict[str, Any]:
        times = np.array(self.service_times) if self.service_times else np.zeros(1)
        return {
            "received": self.received,
            "received_ahead": self.received_ahead,
            "processed": self.processed,
            "failed": self.failed,
            "sent": self.sent,
            "dropped": self.dropped,
            "forged": self.forged,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "service_mean_s": float(times.mean()),
            "service_p99_s": float(np.percentile(times, 99)),
            "busy_s": self.busy_s,
            "waiting_s": self.waiting_s,
            "blocked_s": self.blocked_s,
            "send_blocked_s": self.send_blocked_s,
            "buckets_s": list(BUCKETS_S),
            "service_hist": list(self.service_hist),
            "service_sum_s": self.service_sum_s,
            "join_wait_hist": list(self.join_hist),
            "join_wait_sum_s": self.join_sum_s,
        }


class Stage:
    """One stage's data plane around a Runner; ``start`` binds and runs, ``stop`` always."""

    def __init__(
        self,
        name: str,
        runner: Runner,
        bind_host: str,
        advertise_host: str = "",
        on_compute_start: Callable[[], dict[str, Any]] | None = None,
        socket_dir: str | None = None,
    ):
        self.name = name
        self._socket_dir = socket_dir  # for Unix sockets; None: a private one, made on use
        self._own_dir: str | None = None
        self.runner = runner
        self._bind_host = bind_host
        self._advertise_host = advertise_host or bind_host
        self._on_compute_start = on_compute_start
        self.placement: dict[str, Any] = {}  # cores and threads, as the compute thread sees them
        self.stats = StageStats()
        self._context = zmq.Context()
        self._guard = Guard(self._context, None)
        self._pulls: dict[str, zmq.Socket[Any]] = {}  # sender name -> its own data socket
        self._destinations: list[Destination] = []
        self._by_name: dict[str, Destination] = {}  # the same, by name
        self._names: tuple[str, ...] = ()  # the destinations' names, in order
        self._wanted = -1  # the highest output index a destination takes
        self._pushes: dict[str, zmq.Socket[Any]] = {}  # made by the send loop, on first use
        self._outboxes: dict[str, Outbox] = {}  # shared-memory rings, to Unix-socket peers
        self._inbox = Inbox()  # the rings of this stage's senders on this machine
        self._rewires: dict[str, tuple[str, threading.Event]] = {}  # name -> new address
        self._socket_bytes = QUEUE_BYTES // 4
        # outputs the compute thread could not send at once: seq, epoch, result, destinations
        self._send_queue: ByteQueue[tuple[int, int, Any, tuple[str, ...]]] = ByteQueue(
            QUEUE_DEPTH, QUEUE_BYTES
        )
        self._send_lock = threading.Lock()  # the sending sockets: either thread may send
        self._joins = JoinTable(frozenset({"client"}), QUEUE_BYTES)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sent: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._computing: int | None = None  # the input the runner has now
        self._recv_lock = threading.Lock()  # the receive sockets and the join table's reading
        self._ahead: collections.deque[tuple[int, int, Any]] = collections.deque()  # at most 1
        self._ahead_changed = threading.Condition()
        self._computing_now = threading.Event()  # the receive thread's cue to read ahead
        self._queued_up = False  # the last input set was there before it was asked for
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT_COMPUTATIONS)
        self._wake_in: zmq.Socket[Any] | None = None  # the compute thread's end
        self._wake_out: zmq.Socket[Any] | None = None  # the receive thread's end
        self._ahead_poller: zmq.Poller | None = None  # the receive thread's, for one sender
        self._own_poller: zmq.Poller | None = None  # the compute thread's, for one sender
        self._first_part: dict[int, float] = {}  # seq -> when its first part came (joins)
        self._started_at = time.perf_counter()
        self._trace: collections.deque[dict[str, float]] | None = None  # done, when tracing
        self._timeline: dict[int, dict[str, float]] = {}  # inputs under way, when tracing
        self._lock = threading.Lock()

    def start(
        self,
        senders: Mapping[str, int],
        destinations: list[Destination],
        queue_bytes: int = QUEUE_BYTES,
        epoch: int = 0,
        trace: bool = False,
        security: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """Bind one socket per sender and start the loops; returns each sender's address.

        ``senders`` maps each sender to the largest frame it may send (0: unknown); the stage
        buffers at most ``queue_bytes`` and starts in ``epoch``. ``trace``: keep each input's
        timeline (``traces()``). ``security``: this stage's share of the pipeline's keys
        (proto/security.py); each socket admits only its own sender.
        """
        if self._threads:
            raise RuntimeError(f"stage {self.name!r} is already running")
        if not senders:
            raise ValueError(f"stage {self.name!r} has no senders")
        if queue_bytes < 4:
            raise ValueError(f"queue_bytes must be at least 4, got {queue_bytes}")
        quarter = queue_bytes // 4
        self._guard = Guard(self._context, security)
        addresses: dict[str, str] = {}
        for sender, max_frame in senders.items():
            limit = max(MAX_HEADER_BYTES, max_frame) if max_frame > 0 else MAX_FRAME_BYTES
            pull = self._context.socket(zmq.PULL)
            per_sender = quarter // len(senders)
            hwm = min(HWM, per_sender // max_frame) if max_frame > 0 else UNKNOWN_SIZE_HWM
            pull.setsockopt(zmq.RCVHWM, max(1, hwm))
            pull.setsockopt(zmq.MAXMSGSIZE, limit)
            pull.setsockopt(zmq.LINGER, 0)
            self._guard.serve(pull, [sender], f"tcp://{self._advertise_host}")
            self._pulls[sender] = pull
            addresses[sender] = self._bind(pull, len(addresses))
        self._set_destinations(list(destinations))
        self._wanted = max((i for d in destinations for i, _ in d.tensors), default=-1)
        self._socket_bytes = quarter
        self._send_queue = ByteQueue(QUEUE_DEPTH, quarter)
        self._joins = JoinTable(frozenset(senders), quarter, epoch)
        self._started_at = time.perf_counter()
        if trace:
            self._trace = collections.deque(maxlen=TRACE_KEPT)
        wake = f"inproc://tvmpipe-wake-{next(_WAKE_NAMES)}"
        self._wake_out = self._context.socket(zmq.PAIR)
        self._wake_out.setsockopt(zmq.LINGER, 0)
        self._wake_out.bind(wake)
        self._wake_in = self._context.socket(zmq.PAIR)
        self._wake_in.setsockopt(zmq.LINGER, 0)
        self._wake_in.setsockopt(zmq.SNDHWM, 1)  # one pending wake-up is enough
        self._wake_in.connect(wake)
        loops = (
            (self._compute_loop, "compute"),
            (self._prefetch_loop, "receive"),
            (self._send_loop, "send"),
        )
        for target, label in loops:
            thread = threading.Thread(
                target=target, name=f"tvmpipe-{self.name}-{label}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return addresses

    def _bind(self, pull: zmq.Socket[Any], index: int) -> str:
        """Bind a receive socket; its address as senders see it."""
        if local_endpoint(self._advertise_host):
            if self._socket_dir is None:
                self._socket_dir = self._own_dir = tempfile.mkdtemp(prefix="tvmpipe-")  # 0700
            address = f"ipc://{self._socket_dir}/{self.name[:16]}-{index}.sock"
            pull.bind(address)
            return address
        port = pull.bind_to_random_port(f"tcp://{self._bind_host}")
        return f"tcp://{self._advertise_host}:{port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loops, then close the sockets with a bounded linger and the context."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for _, done in self._rewires.values():
                done.set()
        for pull in self._pulls.values():
            pull.close(linger=0)
        for wake in (self._wake_in, self._wake_out):
            if wake is not None:
                wake.close(linger=0)
        for push in self._pushes.values():
            push.close(linger=LINGER_MS)
        for outbox in self._outboxes.values():
            outbox.close()
        self._inbox.close()
        self._guard.close()
        self._context.term()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def rewire(self, name: str, address: str, timeout: float = REWIRE_TIMEOUT_S) -> None:
        """Send to destination ``name`` at ``address`` from now on (it was deployed again).

        Returns once the send thread has switched; what was queued for the old address is
        dropped with its socket (the client sends every input in flight again afterwards).
        """
        if name not in {d.name for d in self._destinations}:
            raise ValueError(f"stage {self.name!r} sends nothing to {name!r}")
        done = threading.Event()
        with self._lock:
            self._rewires[name] = (address, done)
        if not done.wait(timeout):
            raise TimeoutError(f"stage {self.name!r} did not switch to {address} in {timeout} s")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            summary = self.stats.summary()
            summary["pending_joins"] = len(self._joins)
            summary["held_bytes"] = self._joins.held_bytes
            summary["epoch"] = self._joins.epoch
            summary["stale"] = self._joins.counters.stale
            summary["duplicates"] = self._joins.counters.duplicates
        summary["refused"] = self._guard.refused()
        summary["security"] = self._guard.mode
        summary.update(self.placement)
        summary["uptime_s"] = time.perf_counter() - self._started_at
        summary["send_queue"] = self._send_queue.qsize()
        summary["queued_bytes"] = self._send_queue.nbytes()
        return summary

    def locate(self, seq: int) -> dict[str, Any]:
        """Where input ``seq`` is in this stage: waiting for parts, computing, sent, or unseen."""
        with self._lock:
            waiting = self._joins.waiting_for(seq)
            if waiting is not None:
                return {"state": "waiting", "for": waiting}
            if seq == self._computing:
                return {"state": "computing"}
            if any(item[0] == seq for item in tuple(self._ahead)):
                return {"state": "received"}
            if seq in self._sent:
                return {"state": "sent"}
        return {"state": "unseen"}

    # ----- the compute loop
    def _receive(self, wake: zmq.Socket[Any] | None = None) -> tuple[int, int, Any] | None:
        """The next complete input set, or None after ``POLL_MS`` without one (holding
        ``_recv_lock``); ``wake``: a socket whose message ends the wait early."""
        if len(self._pulls) == 1 and wake is None:  # the compute thread, one sender
            sender, pull = next(iter(self._pulls.items()))
            if self._own_poller is None:
                self._own_poller = zmq.Poller()
                self._own_poller.register(pull, zmq.POLLIN)
            if not self._own_poller.poll(0):  # cheaper than a refused recv's zmq.Again
                self._queued_up = False
                if not self._own_poller.poll(POLL_MS):
                    return None
            frames = recv_frames(pull)
        elif len(self._pulls) == 1:  # the receive thread: its one sender or a wake-up
            sender, pull = next(iter(self._pulls.items()))
            if self._ahead_poller is None:
                self._ahead_poller = zmq.Poller()
                self._ahead_poller.register(pull, zmq.POLLIN)
                self._ahead_poller.register(wake, zmq.POLLIN)
            if not any(sock is pull for sock, _ in self._ahead_poller.poll(POLL_MS)):
                return None
            if not self._computing_now.is_set():  # it came after the computation: not ahead
                return None
            frames = recv_frames(pull)
        else:
            with self._lock:
                readable = self._joins.readable()
            poller = zmq.Poller()
            for name in readable:
                poller.register(self._pulls[name], zmq.POLLIN)
            if wake is not None:
                poller.register(wake, zmq.POLLIN)
            ready = dict(poller.poll(0))
            if not ready:
                self._queued_up = self._queued_up and wake is not None  # the compute thread waits
                ready = dict(poller.poll(POLL_MS))
            if not any(self._pulls[n] in ready for n in readable):
                return None
            if wake is not None and not self._computing_now.is_set():
                return None  # it came after the computation: the compute thread takes it
            sender = next(n for n in readable if self._pulls[n] in ready)
            frames = recv_frames(self._pulls[sender])
        try:
            resolved = self._inbox.resolve(frames)
            size = frames_bytes(resolved)
            msg = decode(resolved)
        except ProtocolError:
            with self._lock:
                self.stats.dropped += 1
            return None
        if msg.sender != sender:  # an admitted sender posing as another
            with self._lock:
                self.stats.forged += 1
            return None
        del frames, resolved
        with self._lock:
            self.stats.bytes_in += size
            if msg.type is MsgType.STOP:
                return None
            epoch = self._joins.epoch
            parts = self._joins.offer(msg, size)
            if len(self._joins.senders) > 1:
                self._time_join(msg.seq, parts is not None, epoch != self._joins.epoch)
            if self._trace is not None:
                self._mark_arrival(msg.seq, msg.epoch, parts is not None)
            if parts is None:
                return None
        del msg
        return self._assemble(parts)

    def _mark_arrival(self, seq: int, epoch: int, complete: bool) -> None:
        """Tracing: when an input's first and last parts came (holding ``_lock``)."""
        now = time.time()
        record = self._timeline.get(seq)
        if record is None or record["epoch"] != epoch:
            record = self._timeline[seq] = {"seq": seq, "epoch": epoch, "first_part": now}
            if len(self._timeline) > TRACE_KEPT:
                del self._timeline[next(iter(self._timeline))]
        if complete:
            record["complete"] = now

    def _mark(self, seq: int, phase: str) -> None:
        """Tracing: when input ``seq`` reached ``phase``; "sent" closes its timeline."""
        if self._trace is None:
            return
        with self._lock:
            record = self._timeline.get(seq)
            if record is None:
                return
            record[phase] = time.time()
            if phase == "sent":
                self._trace.append(self._timeline.pop(seq))

    def traces(self) -> list[dict[str, float]]:
        """The timelines of the most recent inputs (empty unless started with ``trace``)."""
        with self._lock:
            return list(self._trace or ())

    def _time_join(self, seq: int, complete: bool, new_epoch: bool) -> None:
        """How long an input set waited for its last part (holding ``_lock``)."""
        if new_epoch:
            self._first_part.clear()
        now = time.perf_counter()
        if not complete:
            self._first_part.setdefault(seq, now)
            return
        waited = now - self._first_part.pop(seq, now)
        self.stats.observe(self.stats.join_hist, waited)
        self.stats.join_sum_s += waited

    def _assemble(self, parts: dict[str, Message]) -> tuple[int, int, Any] | None:
        """An input set's tensors by name, or the first error one of its parts carried."""
        first = next(iter(parts.values()))
        seq, epoch = first.seq, first.epoch
        errors = [m.error for m in parts.values() if m.type is MsgType.ERROR]
        inputs: dict[str, Any] = {}
        for part in parts.values():
            inputs.update(part.tensors)
        parts.clear()  # the runner holds the only references to the received tensors
        expected = set(self.runner.input_names) - self.runner.param_names
        with self._lock:
            if not errors and set(inputs) != expected:
                self.stats.dropped += 1  # not an input set of this stage
                return None
            self.stats.received += 1
        return (seq, epoch, errors[0]) if errors else (seq, epoch, inputs)

    def _compute_loop(self) -> None:
        name_os_thread("compute")
        if self._on_compute_start is not None:
            self.placement = self._on_compute_start()
        while not self._stopping.is_set():
            idle = time.perf_counter()
            item = self._next_input()
            waited = time.perf_counter() - idle
            with self._lock:
                self.stats.waiting_s += waited
            if item is None:
                continue
            seq, epoch, payload = item
            del item
            if isinstance(payload, RemoteError):
                self._hand_on(seq, epoch, payload)
                continue
            self._mark(seq, "start")
            started = time.perf_counter()
            self._computing = seq
            if self._queued_up and min(self._recent, default=READ_AHEAD_MIN_S) >= READ_AHEAD_MIN_S:
                self._computing_now.set()
            try:
                result: Any = self.runner(payload, owned=True)
                self._check_outputs(result)
            except Exception as exc:
                result = RemoteError.from_exception(self.name, exc)
            self._computing_now.clear()  # read ahead only while computing
            del payload
            self._computing = None
            elapsed = time.perf_counter() - started
            self._recent.append(elapsed)
            self._mark(seq, "end")
            with self._lock:
                self.stats.service_times.append(elapsed)
                self.stats.busy_s += elapsed
                self.stats.service_sum_s += elapsed
                self.stats.observe(self.stats.service_hist, elapsed)
                if isinstance(result, RemoteError):
                    self.stats.failed += 1
                else:
                    self.stats.processed += 1
            self._hand_on(seq, epoch, result)
            del result  # sent, or the send thread holds it now: the only copy

    def _next_input(self) -> tuple[int, int, Any] | None:
        """The input set received ahead, else one received here (None after ``POLL_MS``)."""
        self._queued_up = True  # until the compute thread has to wait for one
        item = self._take_ahead()
        if item is not None:
            return item
        if self._recv_lock.locked():  # the receive thread is polling: the sockets, please
            with contextlib.suppress(zmq.Again):
                self._wake_in.send(b"", zmq.NOBLOCK)  # type: ignore[union-attr]
        if not self._recv_lock.acquire(timeout=POLL_MS / 1000):
            return None
        try:
            item = self._take_ahead()  # it may have finished one meanwhile
            return item if item is not None else self._receive()
        finally:
            self._recv_lock.release()

    def _take_ahead(self) -> tuple[int, int, Any] | None:
        with self._ahead_changed:
            if not self._ahead:
                return None
            self._ahead_changed.notify()
            self.stats.received_ahead += 1  # only the compute thread writes it
            return self._ahead.popleft()

    def _prefetch_loop(self) -> None:
        """While the runner computes, receive the next input set and hold it ready."""
        name_os_thread("receive")
        wake = self._wake_out
        assert wake is not None
        while not self._stopping.is_set():
            if not self._computing_now.wait(POLL_MS / 1000):
                continue
            with self._ahead_changed:
                if self._ahead:  # one is enough: wait until the compute thread takes it
                    self._ahead_changed.wait(POLL_MS / 1000)
                    continue
            with self._recv_lock:
                while wake.poll(0):  # wake-ups sent while this thread was not polling
                    wake.recv()
                while self._computing_now.is_set() and not self._stopping.is_set():
                    item = self._receive(wake)
                    if item is not None:
                        if isinstance(item[2], dict):
                            self._prepare(item[2])
                        with self._ahead_changed:
                            self._ahead.append(item)
                        break

    def _prepare(self, inputs: dict[str, Any]) -> None:
        """Convert an input set received ahead for the device; a failure is left for the
        computation to meet and report."""
        with contextlib.suppress(Exception):  # the runner's call meets it again, for this input
            self.runner.prepare(inputs)

    def _set_destinations(self, destinations: list[Destination]) -> None:
        self._destinations = destinations
        self._by_name = {d.name: d for d in destinations}
        self._names = tuple(d.name for d in destinations)

    def _check_outputs(self, outputs: list[np.ndarray]) -> None:
        wanted = self._wanted
        if wanted >= len(outputs):
            raise ValueError(
                f"stage {self.name!r} returned {len(outputs)} output(s) but output({wanted}) "
                f"is connected"
            )

    # ----- sending
    def _hand_on(self, seq: int, epoch: int, result: Any) -> None:
        """Send a small output from the compute thread if that costs no wait, else queue it.

        Sending here saves a thread hand-off per input (tens of microseconds, which is most of
        a small hop); it happens only when nothing is queued before it, nothing is being sent,
        and every destination has room, so the computation never waits on the network. An
        output of ``INLINE_SEND_BYTES`` or more always goes through the send thread: copying
        1 MiB into a shared-memory slot and sending it took 0.55 ms of the compute thread, which
        held a chain of 10 ms stages at 0.89 of its ideal rate (0.95-0.98 through the send
        thread, on a 2-core Zen 3 VM), unless no input is waiting: then the copy delays no
        computation, and a lone request saves the hand-off (through three 1 MiB stages, about a
        tenth of its latency and of each stage's CPU). Whatever could not go now goes the same
        way, in order.
        """
        pending = self._names
        nbytes = _nbytes(result)
        inline = nbytes < INLINE_SEND_BYTES or self._nothing_waiting()
        if inline and self._send_lock.acquire(blocking=False):
            try:
                if not self._send_queue.qsize():
                    self._apply_rewires()
                    pending = self._send_now(seq, epoch, result, pending)
            finally:
                self._send_lock.release()
        if pending:
            self._put((seq, epoch, result, pending), nbytes)

    def _nothing_waiting(self) -> bool:
        """No input is here for the compute thread: none received ahead, none queued up behind
        the last, and none in a socket (unless the receive thread has them: then one is coming)."""
        if self._ahead or self._queued_up or not self._recv_lock.acquire(blocking=False):
            return False
        try:
            return not any(cast(int, p.get(zmq.EVENTS)) & zmq.POLLIN for p in self._pulls.values())
        finally:
            self._recv_lock.release()

    def _send_now(
        self, seq: int, epoch: int, result: Any, names: tuple[str, ...]
    ) -> tuple[str, ...]:
        """Send to each destination that has room now (holding ``_send_lock``); the rest."""
        if epoch < self._joins.epoch:
            return ()  # stale: every receiver drops it, and the input is on its way again
        for index, name in enumerate(names):
            frames, size = self._frames(seq, epoch, name, result)
            push = self._socket(name, size)
            frames = self._wrap(name, frames)
            try:
                send_frames(push, frames, NOBLOCK)
            except zmq.Again:
                self._unsent(name)
                return names[index:]
            with self._lock:
                self.stats.bytes_out += size
        self._done_sending(seq)
        return ()

    def _done_sending(self, seq: int) -> None:
        self._mark(seq, "sent")
        with self._lock:
            self.stats.sent += 1
            self._sent[seq] = None
            if len(self._sent) > SENT_KEPT:
                self._sent.popitem(last=False)

    def _send_loop(self) -> None:
        """Sends what the compute thread could not, waiting for room downstream."""
        name_os_thread("send")
        while not self._stopping.is_set():
            if not self._send_queue.wait(timeout=POLL_MS / 1000):
                with self._send_lock:
                    self._apply_rewires()
                continue
            with self._send_lock:  # taken before the queue is read: see _hand_on
                self._apply_rewires()
                item = self._send_queue.get(timeout=0)
                if item is None:
                    continue
                seq, epoch, result, names = item
                del item
                if epoch < self._joins.epoch:
                    continue  # stale, as in _send_now
                for name in names:
                    frames, size = self._frames(seq, epoch, name, result)
                    if not self._send(name, frames, size):
                        return
                    with self._lock:
                        self.stats.bytes_out += size
                    del frames
                del result
                self._done_sending(seq)

    def _frames(self, seq: int, epoch: int, name: str, result: Any) -> tuple[list[Any], int]:
        """The message for one destination and its size; an output that cannot travel fails
        this input."""
        dest = self._by_name[name]
        frames = None
        if not isinstance(result, RemoteError):
            try:
                tensors = {n: result[i] for i, n in dest.tensors}
                frames = encode(Message.data(seq, self.name, tensors, epoch))
            except ProtocolError as exc:
                result = RemoteError.from_exception(self.name, exc)
        if frames is None:
            frames = encode(Message.failure(seq, self.name, result, epoch))
        return frames, sum(len(memoryview(f)) for f in frames)

    def _send(self, name: str, frames: list[Any], size: int) -> bool:
        """Send, waiting while the peer's queue is full; False once the stage is stopping.

        The message is wrapped once: a tensor copied into a shared-memory slot keeps its slot
        while it waits for room (copying it again after every wait cost a second copy of
        each tensor to the stage before a slower one), unless a rewire replaced the socket."""
        push = self._socket(name, size)
        wrapped = self._wrap(name, frames)
        try:  # the common case: room in the queue, no poll needed
            send_frames(push, wrapped, NOBLOCK)
            return True
        except zmq.Again:
            pass
        blocked = time.perf_counter()
        try:
            while not self._stopping.is_set():
                if self._rewires:
                    self._unsent(name)  # its ring may be closed by the rewire
                    self._apply_rewires()
                    push = self._socket(name, size)
                    wrapped = self._wrap(name, frames)
                if push.poll(POLL_MS, zmq.POLLOUT):
                    send_frames(push, wrapped)
                    return True
            self._unsent(name)
            return False
        finally:
            with self._lock:
                self.stats.send_blocked_s += time.perf_counter() - blocked

    def _wrap(self, name: str, frames: list[Any]) -> list[Any]:
        """The frames as they go to ``name``: tensors in a shared-memory slot where it can."""
        outbox = self._outboxes.get(name)
        return frames if outbox is None else outbox.wrap(frames)

    def _unsent(self, name: str) -> None:
        outbox = self._outboxes.get(name)
        if outbox is not None:
            outbox.unsent()

    def _socket(self, name: str, message_bytes: int) -> zmq.Socket[Any]:
        """The socket to ``name``; its high-water mark holds ``_socket_bytes`` of such messages."""
        push = self._pushes.get(name)
        if push is None:
            dest = self._by_name[name]
            per_dest = self._socket_bytes // max(1, len(self._destinations))
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, max(1, min(HWM, per_dest // max(1, message_bytes))))
            push.setsockopt(zmq.LINGER, LINGER_MS)
            self._guard.present(push, dest.name, dest.address)
            push.connect(dest.address)
            self._pushes[name] = push
            if dest.address.startswith("ipc://"):
                self._outboxes[name] = Outbox(per_dest // 2)
        return push

    def _apply_rewires(self) -> None:
        """Holding ``_send_lock``, which guards the sending sockets: reconnect moved
        destinations."""
        if not self._rewires:
            return
        with self._lock:
            rewires, self._rewires = self._rewires, {}
        for name, (address, done) in rewires.items():
            old = self._pushes.pop(name, None)
            if old is not None:
                old.close(linger=0)
            outbox = self._outboxes.pop(name, None)
            if outbox is not None:
                outbox.close()
            self._set_destinations(
                [replace(d, address=address) if d.name == name else d for d in self._destinations]
            )
            done.set()

    def _put(self, item: tuple[int, int, Any, tuple[str, ...]], nbytes: int) -> None:
        """Queue an output for the send thread, waiting for room (gives way to stop())."""
        if self._send_queue.put(item, nbytes, timeout=0):
            return
        blocked = time.perf_counter()
        while not self._stopping.is_set():
            if self._send_queue.put(item, nbytes, timeout=POLL_MS / 1000):
                break
        with self._lock:
            self.stats.blocked_s += time.perf_counter() - blocked


def _nbytes(result: Any) -> int:
    """What a stage's outputs hold in memory (0 for an error)."""
    if isinstance(result, RemoteError):
        return 0
    return sum(int(getattr(t, "nbytes", 0)) for t in result)
