"""send_frames and recv_frames carry a multipart message as pyzmq's *_multipart do: every frame,
in order, whole or not at all when the peer's queue is full."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from tvmpipe.proto.frames import NOBLOCK, recv_frames, send_frames

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    context: zmq.Context[Any] = zmq.Context()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    try:
        pull.setsockopt(zmq.RCVTIMEO, 5000)
        pull.setsockopt(zmq.RCVHWM, 1)
        push.setsockopt(zmq.SNDHWM, 1)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        yield push, pull
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()


@pytest.mark.parametrize("copy", [False, True])
def test_every_frame_arrives_in_order(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]], copy: bool
) -> None:
    push, pull = pair
    big = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: sent without a copy unless asked
    frames: list[Any] = [b"header", b"", big.data, b"tail"]
    send_frames(push, frames, copy=copy)
    send_frames(push, [b"alone"])
    got = recv_frames(pull)
    assert [bytes(f.buffer) for f in got[:2]] + [bytes(got[3].buffer)] == [b"header", b"", b"tail"]
    assert np.array_equal(np.frombuffer(got[2].buffer, dtype=np.float32), big)
    assert [f.bytes for f in recv_frames(pull)] == [b"alone"]


def test_a_full_queue_refuses_the_whole_message(
    pair: tuple[zmq.Socket[Any], zmq.Socket[Any]],
) -> None:
    """NOBLOCK at the high-water mark raises zmq.Again before any frame goes: nothing half-sent
    that the next message would be glued to."""
    push, pull = pair
    refused = 0
    for i in range(200):  # fill the pipe, the kernel buffers and the receiver's queue
        try:
            send_frames(push, [b"%d" % i, b"x" * 65536], NOBLOCK)
        except zmq.Again:
            refused += 1
            if refused == 3:
                break
    assert refused == 3, "the queue never filled"
    sent = i + 1 - refused
    for _ in range(sent):
        got = recv_frames(pull)
        assert len(got) == 2 and got[0].bytes.isdigit() and len(got[1].bytes) == 65536
    assert int(got[0].bytes) < i  # the refused ones never arrive, the others all do
    with pytest.raises(zmq.Again):
        recv_frames(pull, NOBLOCK)
