"""A running stage: receive, join by sequence number, compute, send; two threads overlapped.

    compute   PULL --decode--> join parts of seq k from every expected sender
              --> runner(inputs) --> send queue (or a RemoteError for seq k)
    sender    send queue --> one message per destination (next stages, or the client)

Receiving in the compute thread saves a thread hand-off per input (about 40 us of latency and
CPU in CPython); ZeroMQ's I/O thread already reads ahead while the stage computes. Sending
stays in its own thread, so that encoding and sending overlap the next computation.

Every sender delivers exactly one message (data or error) per sequence number to each of its
destinations, so a stage knows when an input set is complete, and an error travels along the
same edges as data would have, reaching the client once per output stage. ZeroMQ sockets are
each used by one thread only.

Everything a stage buffers is bounded in bytes (``queue_bytes``): the send queue holds at most
half, and each outgoing socket's high-water mark is set, when its first message shows how big
messages on that edge are, to hold at most the other half. The data socket buffers at most
``RCV_HWM`` messages per sender. When the stage falls behind, it stops reading and TCP pushes
back on the producers.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zmq

from tvmpipe.proto.errors import ProtocolError
from tvmpipe.proto.messages import (
    MAX_FRAME_BYTES,
    Message,
    MsgType,
    RemoteError,
    decode,
    encode,
)

from .queues import ByteQueue
from .runner import Runner

POLL_MS = 50
QUEUE_DEPTH = 4  # outputs waiting to be sent
QUEUE_BYTES = 64 << 20  # all that a stage buffers, send queue and sockets
HWM = 16  # the most ZeroMQ messages an outgoing socket buffers, however small
RCV_HWM = 2  # messages buffered per sender on the data socket
LINGER_MS = 1000
SAMPLES = 4096  # service times kept for the mean and p99
MAX_PENDING_JOINS = 1024  # partial input sets kept while waiting for their other senders


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
    processed: int = 0
    failed: int = 0
    sent: int = 0
    dropped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    service_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=SAMPLES)
    )

    def summary(self) -> dict[str, Any]:
        times = np.array(self.service_times) if self.service_times else np.zeros(1)
        return {
            "received": self.received,
            "processed": self.processed,
            "failed": self.failed,
            "sent": self.sent,
            "dropped": self.dropped,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "service_mean_s": float(times.mean()),
            "service_p99_s": float(np.percentile(times, 99)),
        }


class Stage:
    """One stage's data plane around a StageRunner; ``start`` after ``bind``, ``stop`` always."""

    def __init__(
        self,
        name: str,
        runner: Runner,
        bind_host: str,
        on_compute_start: Callable[[], dict[str, Any]] | None = None,
    ):
        self.name = name
        self.runner = runner
        self._on_compute_start = on_compute_start
        self.placement: dict[str, Any] = {}  # cores and threads, as the compute thread sees them
        self.stats = StageStats()
        self._context = zmq.Context()
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self._pull.setsockopt(zmq.RCVHWM, RCV_HWM)
        self._pull.setsockopt(zmq.LINGER, 0)
        self.port = self._pull.bind_to_random_port(f"tcp://{bind_host}")
        self._destinations: list[Destination] = []
        self._pushes: dict[str, zmq.Socket[Any]] = {}  # made by the send loop, on first use
        self._rewires: dict[str, str] = {}  # destination name -> its new address
        self._senders: frozenset[str] = frozenset()
        self._socket_bytes = QUEUE_BYTES // 2
        self._send_queue: ByteQueue[tuple[int, Any]] = ByteQueue(QUEUE_DEPTH, QUEUE_BYTES // 2)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pending: dict[int, dict[str, Message]] = {}
        self._lock = threading.Lock()

    def start(
        self,
        senders: list[str],
        destinations: list[Destination],
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        """Start the loops; ``senders`` feed this stage, which buffers at most ``queue_bytes``."""
        if self._threads:
            raise RuntimeError(f"stage {self.name!r} is already running")
        if queue_bytes < 2:
            raise ValueError(f"queue_bytes must be at least 2, got {queue_bytes}")
        self._senders = frozenset(senders)
        self._destinations = list(destinations)
        self._socket_bytes = queue_bytes // 2
        self._send_queue = ByteQueue(QUEUE_DEPTH, queue_bytes // 2)
        self._pull.setsockopt(zmq.RCVTIMEO, POLL_MS)  # so that the compute loop sees stop()
        for target, label in (
            (self._compute_loop, "compute"),
            (self._send_loop, "send"),
        ):
            thread = threading.Thread(
                target=target, name=f"tvmpipe-{self.name}-{label}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loops, then close the sockets with a bounded linger and the context."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._pull.close(linger=0)
        for push in self._pushes.values():
            push.close(linger=LINGER_MS)
        self._context.term()

    def rewire(self, name: str, address: str) -> None:
        """Send to destination ``name`` at ``address`` from now on (it was deployed again).

        Messages still buffered for the old address are dropped: the client sends every input
        that was in flight again.
        """
        if name not in {d.name for d in self._destinations}:
            raise ValueError(f"stage {self.name!r} sends nothing to {name!r}")
        with self._lock:
            self._rewires[name] = address

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            summary = self.stats.summary()
            summary["pending_joins"] = len(self._pending)
        summary.update(self.placement)
        summary["send_queue"] = self._send_queue.qsize()
        summary["queued_bytes"] = self._send_queue.nbytes()
        return summary

    # ----- the two loops
    def _receive(self) -> tuple[int, Any] | None:
        """The next complete input set, or None after ``POLL_MS`` without one."""
        try:
            frames = self._pull.recv_multipart(copy=False)
        except zmq.Again:
            return None
        size = sum(len(f.buffer) for f in frames)
        try:
            msg = decode(frames)
            self._check_sender(msg)
        except ProtocolError:
            with self._lock:
                self.stats.dropped += 1
            return None
        with self._lock:
            self.stats.bytes_in += size
        if msg.type is MsgType.STOP:
            return None
        return self._join(msg)

    def _check_sender(self, msg: Message) -> None:
        if msg.type is not MsgType.STOP and msg.sender not in self._senders:
            raise ProtocolError(f"stage {self.name!r} expects no messages from {msg.sender!r}")

    def _join(self, msg: Message) -> tuple[int, Any] | None:
        """Add one sender's part of seq; return the input set once every sender delivered."""
        with self._lock:
            parts = self._pending.setdefault(msg.seq, {})
            if msg.sender in parts:
                self.stats.dropped += 1  # a duplicate: keep the first
                return None
            parts[msg.sender] = msg
            if len(parts) < len(self._senders):
                if len(self._pending) > MAX_PENDING_JOINS:  # evict the longest waiting
                    del self._pending[next(iter(self._pending))]
                    self.stats.dropped += 1
                return None
            del self._pending[msg.seq]
        errors = [m.error for m in parts.values() if m.type is MsgType.ERROR]
        inputs: dict[str, Any] = {}
        for part in parts.values():
            inputs.update(part.tensors)
        expected = set(self.runner.input_names) - self.runner.param_names
        with self._lock:
            if not errors and set(inputs) != expected:
                self.stats.dropped += 1  # not an input set of this stage
                return None
            self.stats.received += 1
        return (msg.seq, errors[0]) if errors else (msg.seq, inputs)

    def _compute_loop(self) -> None:
        if self._on_compute_start is not None:
            self.placement = self._on_compute_start()
        while not self._stopping.is_set():
            item = self._receive()
            if item is None:
                continue
            seq, payload = item
            if isinstance(payload, RemoteError):
                self._put(self._send_queue, (seq, payload), 0)
                continue
            started = time.perf_counter()
            try:
                result: Any = self.runner(payload)
                self._check_outputs(result)
            except Exception as exc:
                result = RemoteError.from_exception(self.name, exc)
            elapsed = time.perf_counter() - started
            with self._lock:
                self.stats.service_times.append(elapsed)
                if isinstance(result, RemoteError):
                    self.stats.failed += 1
                else:
                    self.stats.processed += 1
            self._put(self._send_queue, (seq, result), _nbytes(result))

    def _check_outputs(self, outputs: list[np.ndarray]) -> None:
        wanted = max((i for dest in self._destinations for i, _ in dest.tensors), default=-1)
        if wanted >= len(outputs):
            raise ValueError(
                f"stage {self.name!r} returned {len(outputs)} output(s) but output({wanted}) "
                f"is connected"
            )

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._apply_rewires()
            item = self._get(self._send_queue)
            if item is None:
                continue
            seq, result = item
            for dest in self._destinations:
                frames = self._frames(seq, dest, result)
                size = sum(len(memoryview(f)) for f in frames)
                if not self._send(dest.name, frames, size):
                    return
                with self._lock:
                    self.stats.bytes_out += size
            with self._lock:
                self.stats.sent += 1

    def _frames(self, seq: int, dest: Destination, result: Any) -> list[Any]:
        """The message for one destination; an output that cannot travel fails this input."""
        if not isinstance(result, RemoteError):
            try:
                return encode(Message.data(seq, self.name, {n: result[i] for i, n in dest.tensors}))
            except ProtocolError as exc:
                result = RemoteError.from_exception(self.name, exc)
        return encode(Message.failure(seq, self.name, result))

    def _send(self, name: str, frames: list[Any], size: int) -> bool:
        """Send, waiting while the peer's queue is full; False once the stage is stopping."""
        try:  # the common case: room in the queue, no poll needed
            self._socket(name, size).send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            pass
        while not self._stopping.is_set():
            self._apply_rewires()
            push = self._socket(name, size)
            if push.poll(POLL_MS, zmq.POLLOUT):
                push.send_multipart(frames, copy=False)
                return True
        return False

    def _socket(self, name: str, message_bytes: int) -> zmq.Socket[Any]:
        """The socket to ``name``; its high-water mark holds ``_socket_bytes`` of such messages."""
        push = self._pushes.get(name)
        if push is None:
            dest = next(d for d in self._destinations if d.name == name)
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, max(1, min(HWM, self._socket_bytes // message_bytes)))
            push.setsockopt(zmq.LINGER, LINGER_MS)
            push.connect(dest.address)
            self._pushes[name] = push
        return push

    def _apply_rewires(self) -> None:
        """In the send thread, which owns the sockets: reconnect moved destinations."""
        with self._lock:
            rewires, self._rewires = self._rewires, {}
        for name, address in rewires.items():
            old = self._pushes.pop(name, None)
            if old is not None:
                old.close(linger=0)
            self._destinations = [
                replace(d, address=address) if d.name == name else d for d in self._destinations
            ]

    # ----- bounded queues that give way to stop()
    def _put(self, q: ByteQueue[Any], item: Any, nbytes: int) -> None:
        while not self._stopping.is_set():
            if q.put(item, nbytes, timeout=POLL_MS / 1000):
                return

    def _get(self, q: ByteQueue[Any]) -> Any:
        return q.get(timeout=POLL_MS / 1000)


def _nbytes(result: Any) -> int:
    """What a stage's outputs hold in memory (0 for an error)."""
    if isinstance(result, RemoteError):
        return 0
    return sum(int(getattr(t, "nbytes", 0)) for t in result)
