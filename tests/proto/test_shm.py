"""Shared-memory rings (proto/shm.py) between real processes over real ZeroMQ Unix sockets.

Each test runs a sender in a child process (a ring is reached at /proc/PID/fd/FD of its owner)
and receives here: the offer travels with its data, slots come only once this side has mapped
the ring, a full ring or a ring that cannot be mapped sends on the socket, a slot is free again
when its last view dies, and a reference that does not hold is a ProtocolError, never a read
outside the ring.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import leaks
import msgpack
import numpy as np
import pytest
import zmq

from tvmpipe.proto.errors import ProtocolError
from tvmpipe.proto.messages import Message, decode, encode
from tvmpipe.proto.shm import MAGIC, MIN_BYTES, Inbox, Outbox, _Ring

pytestmark = pytest.mark.timeout(60)
SHAPE = (256, 1024)  # float32: 1 MiB
BUDGET = 8 << 20  # 8 slots of 1 MiB


def tensor(i: int) -> np.ndarray:
    return np.full(SHAPE, i, dtype="float32")


SENDER = """
import sys, numpy as np, zmq
from tvmpipe.proto.messages import Message, encode
from tvmpipe.proto.shm import Outbox
address, count, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
context = zmq.Context()
push = context.socket(zmq.PUSH)
push.connect(address)
outbox = Outbox(budget)
for i in range(count):
    x, y = (np.full((256, 1024), v, dtype="float32") for v in (i, -i))
    push.send_multipart(outbox.wrap(encode(Message.data(i, "sender", {"x": x, "y": y}))))
    if i == 0:
        sys.stdin.readline()  # the receiver has had the first message, and the offer
sys.stdin.read()  # the ring stays reachable at /proc/PID/fd until the test is done with it
outbox.close()
push.close(linger=1000)
context.term()
"""


@pytest.fixture
def pull(tmp_path: Path) -> Iterator[tuple[zmq.Socket[Any], str]]:
    with leaks.checked():
        context = zmq.Context()
        socket = context.socket(zmq.PULL)
        socket.setsockopt(zmq.RCVTIMEO, 20_000)
        address = f"ipc://{tmp_path}/s"
        socket.bind(address)
        try:
            yield socket, address
        finally:
            socket.close(linger=0)
            context.term()


def run_sender(
    address: str, count: int, budget: int = BUDGET, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A sender in its own process: a ring is reached at /proc/PID/fd/FD of its owner."""
    argv = [sys.executable, "-c", SENDER, address, str(count), str(budget)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, env={**os.environ, **(env or {})})


def receive_first(
    socket: zmq.Socket[Any], proc: subprocess.Popen[bytes], inbox: Inbox
) -> list[Any]:
    """The first message resolved (so the offer is taken), then the sender goes on."""
    frames = inbox.resolve(socket.recv_multipart(copy=False))
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    return frames


def finish(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(30) == 0


def test_the_offer_carries_its_data_and_then_slots_carry_it(
    pull: tuple[zmq.Socket[Any], str],
) -> None:
    socket, address = pull
    inbox = Inbox()
    proc = run_sender(address, 20)
    try:
        kinds = ["offer"]
        np.testing.assert_array_equal(decode(receive_first(socket, proc, inbox)).tensors["x"], 0)
        for i in range(1, 20):
            frames = socket.recv_multipart(copy=False)
            first = bytes(frames[0].buffer[: len(MAGIC)])
            kinds.append("offer" if len(frames) == 4 else "slot" if len(frames) == 2 else "plain")
            assert first == MAGIC or kinds[-1] == "plain"
            msg = decode(inbox.resolve(frames))
            np.testing.assert_array_equal(msg.tensors["x"], tensor(i))
            np.testing.assert_array_equal(msg.tensors["y"], tensor(-i))
            if kinds[-1] == "slot":  # aligned as TVM wants it, so it is used in place
                assert msg.tensors["x"].ctypes.data % 64 == msg.tensors["y"].ctypes.data % 64 == 0
            del msg
        # From the second message on, in slots (or on the socket while all four are in use).
        assert "slot" in kinds and "offer" not in kinds[1:], kinds
    finally:
        finish(proc)
        inbox.close()


def test_a_full_ring_sends_on_the_socket_and_a_slot_frees_when_its_views_die(
    pull: tuple[zmq.Socket[Any], str],
) -> None:
    """Everything held (a receiver that keeps its inputs, or one that is stopped): the
    sender goes on through the socket; nothing is lost or overwritten."""
    socket, address = pull
    inbox = Inbox()
    proc = run_sender(address, 30, budget=4 << 21)  # 4 slots of 2 MiB (each holds x and y)
    try:
        kept = [(0, decode(receive_first(socket, proc, inbox)))]
        kinds = []
        for i in range(1, 30):
            frames = socket.recv_multipart(copy=False)
            kinds.append(len(frames))
            kept.append((i, decode(inbox.resolve(frames))))
        for i, msg in kept:  # none overwritten while held
            np.testing.assert_array_equal(msg.tensors["x"], tensor(i))
        slots = kinds.count(2)
        assert slots == 4 and kinds.count(3) == 29 - slots, kinds  # the rest on the socket
    finally:
        finish(proc)
    kept.clear()
    gc.collect()
    ring = next(r for r in inbox._rings.values() if r is not None)
    assert not ring.state.any()  # every slot back to the sender
    inbox.close()


def test_a_ring_this_process_cannot_map_is_declined_and_nothing_is_lost(
    pull: tuple[zmq.Socket[Any], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in another pid namespace: /proc/PID/fd/FD is not the sender's ring."""
    socket, address = pull
    monkeypatch.setattr("tvmpipe.proto.shm._Mapped.__init__", _refuse)
    inbox = Inbox()
    proc = run_sender(address, 10)
    try:
        receive_first(socket, proc, inbox)
        for i in range(1, 10):
            frames = socket.recv_multipart(copy=False)
            assert len(frames) == 4  # an offer, every time: never accepted
            np.testing.assert_array_equal(decode(inbox.resolve(frames)).tensors["x"], tensor(i))
    finally:
        finish(proc)
        inbox.close()


def _refuse(self: Any, reference: dict[str, Any]) -> None:
    raise OSError("not mappable here")


def test_tvmpipe_shm_0_keeps_everything_on_the_socket(pull: tuple[zmq.Socket[Any], str]) -> None:
    socket, address = pull
    proc = run_sender(address, 3, env={"TVMPIPE_SHM": "0"})
    try:
        receive_first(socket, proc, Inbox())
        for i in range(1, 3):
            frames = socket.recv_multipart(copy=False)
            assert len(frames) == 3
            np.testing.assert_array_equal(decode(Inbox().resolve(frames)).tensors["y"], tensor(-i))
    finally:
        finish(proc)


def test_small_messages_and_unsent_slots() -> None:
    outbox = Outbox(BUDGET)
    small = encode(Message.data(0, "s", {"x": np.zeros(MIN_BYTES // 8, "float32")}))
    assert outbox.wrap(small) is small  # under MIN_BYTES: as they are
    big = encode(Message.data(1, "s", {"x": tensor(1)}))
    assert len(outbox.wrap(big)) == 3  # the offer
    ring = outbox._ring
    assert ring is not None
    ring.map[16] = 1  # as a receiver would, on mapping it
    assert len(outbox.wrap(big)) == 2 and ring.state.sum() == 1
    outbox.unsent()  # no room downstream: the slot is free again
    assert ring.state.sum() == 0
    outbox.close()
    assert outbox.wrap(big) is big  # closed: no new ring


def test_references_that_do_not_hold_are_refused(tmp_path: Path) -> None:
    ring = _Ring(1 << 20, 2)
    inbox = Inbox()
    header = encode(Message.data(0, "s", {"x": tensor(0)}))[0]
    base = {**ring.reference}
    try:
        assert inbox.resolve([MAGIC + msgpack.packb(base), header, b"x"])[0] is header
        for bad in (
            {"slot": 2, "offsets": [0], "sizes": [8]},  # no such slot
            {"slot": 0, "offsets": [0], "sizes": [(1 << 20) + 1]},  # past the slot
            {"slot": 0, "offsets": [-64], "sizes": [8]},
            {"slot": 0, "offsets": [0, 64], "sizes": [8]},
            {"slot": "0", "offsets": [0], "sizes": [8]},
        ):
            with pytest.raises(ProtocolError):
                inbox.resolve([MAGIC + msgpack.packb({**base, **bad}), header])
        for garbage in (MAGIC + b"\xff\xff", MAGIC + msgpack.packb({"pid": 1})):
            with pytest.raises(ProtocolError):
                inbox.resolve([garbage, header])
        stranger = {**base, "id": b"0" * 16, "slot": 0, "offsets": [0], "sizes": [8]}
        with pytest.raises(ProtocolError, match="cannot map"):  # not the ring it names
            inbox.resolve([MAGIC + msgpack.packb(stranger), header])
    finally:
        inbox.close()
        ring.close()
