"""A stage's data sockets: Unix sockets on loopback (in a private directory, removed when the
stage stops), TCP elsewhere; and an output goes out from the compute thread when it can, from
the send thread when the next stage has no room, in order either way."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import zmq

import tvmpipe.proto.transport as transport
from tvmpipe.proto.messages import Message, decode, encode
from tvmpipe.worker.stage import Destination, Stage

pytestmark = pytest.mark.timeout(30)


class Identity:
    input_names = ("x",)
    param_names = frozenset[str]()

    def __call__(self, inputs: Mapping[str, Any], owned: bool = False) -> list[np.ndarray]:
        return [np.asarray(inputs["x"])]


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.term()


def _sink(context: zmq.Context[Any], hwm: int = 1000) -> tuple[zmq.Socket[Any], str]:
    sink = context.socket(zmq.PULL)
    sink.setsockopt(zmq.LINGER, 0)
    sink.setsockopt(zmq.RCVHWM, hwm)
    sink.setsockopt(zmq.RCVTIMEO, 10_000)
    return sink, f"tcp://127.0.0.1:{sink.bind_to_random_port('tcp://127.0.0.1')}"


def _start(stage: Stage, sink_address: str, queue_bytes: int = 64 << 20) -> str:
    dest = Destination("client", sink_address, ((0, "0"),))
    return stage.start({"client": 1 << 20}, [dest], queue_bytes)["client"]


@pytest.mark.parametrize("transport_name", ["ipc", "tcp"])
def test_loopback_transport_and_its_directory(
    context: zmq.Context[Any], monkeypatch: pytest.MonkeyPatch, transport_name: str
) -> None:
    monkeypatch.setattr(transport, "LOOPBACK_TRANSPORT", transport_name)
    sink, sink_address = _sink(context)
    stage = Stage("s", Identity(), "127.0.0.1")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        address = _start(stage, sink_address)
        assert address.startswith(f"{transport_name}://")
        if transport_name == "ipc":
            folder = os.path.dirname(address[len("ipc://") :])
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700  # only its owner connects
        push.connect(address)
        x = np.arange(4, dtype="float32")
        push.send_multipart(encode(Message.data(0, "client", {"x": x})))
        np.testing.assert_array_equal(decode(sink.recv_multipart()).tensors["0"], x)
    finally:
        push.close(0)
        stage.stop()
        sink.close(0)
    if transport_name == "ipc":
        assert not os.path.exists(folder)


def test_outputs_stay_in_order_when_the_next_stage_is_full(context: zmq.Context[Any]) -> None:
    """The sink takes nothing at first: outputs pile up behind a full socket and go through the
    send thread; once it reads, every output arrives once, in order."""
    sink, sink_address = _sink(context, hwm=1)
    stage = Stage("s", Identity(), "127.0.0.1")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    count = 40
    try:
        push.connect(_start(stage, sink_address, queue_bytes=8 << 20))
        x = np.zeros(1 << 20, dtype="uint8")  # more than the kernel's socket buffers hold
        for seq in range(count):
            push.send_multipart(encode(Message.data(seq, "client", {"x": x + seq % 256})))
        deadline = time.monotonic() + 10
        while stage.snapshot()["send_queue"] == 0:
            assert time.monotonic() < deadline, "nothing waited for room downstream"
            time.sleep(0.01)
        got = [decode(sink.recv_multipart()) for _ in range(count)]
        assert [m.seq for m in got] == list(range(count))
        assert all(int(m.tensors["0"][0]) == m.seq % 256 for m in got)
        # an output counts as sent once its send returned, which may be after it arrived here
        deadline = time.monotonic() + 10
        while stage.snapshot()["sent"] < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stage.snapshot()["sent"] == count
    finally:
        push.close(0)
        stage.stop()
        sink.close(0)


class Slow:
    """A runner that computes for ``seconds`` and notes which thread prepared each input."""

    input_names = ("x",)
    param_names = frozenset[str]()

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.prepared_by: list[str] = []

    def prepare(self, inputs: dict[str, Any]) -> None:
        self.prepared_by.append(threading.current_thread().name)
        inputs["x"] = np.array(inputs["x"])  # a copy of the frame, as a device copy would be

    def __call__(self, inputs: Mapping[str, Any], owned: bool = False) -> list[np.ndarray]:
        time.sleep(self.seconds)
        return [np.asarray(inputs["x"])]


def test_the_next_input_is_received_while_the_current_one_computes(
    context: zmq.Context[Any],
) -> None:
    """Inputs queue up at a slow stage: each next one is received, joined and prepared by the
    receive thread while the one before computes, and is ready when the computation ends."""
    sink, sink_address = _sink(context)
    runner = Slow(0.1)
    stage = Stage("s", runner, "127.0.0.1")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    count = 6
    try:
        dest = Destination("client", sink_address, ((0, "0"),))
        push.connect(stage.start({"client": 4096}, [dest], trace=True)["client"])
        for seq in range(count):
            push.send_multipart(encode(Message.data(seq, "client", {"x": np.full(4, seq, "f4")})))
        for seq in range(count):
            assert decode(sink.recv_multipart()).tensors["0"][0] == seq
        deadline = time.monotonic() + 10  # a timeline closes just after its send returns
        while len(stage.traces()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        timeline = {record["seq"]: record for record in stage.traces()}
        stats = stage.snapshot()
    finally:
        push.close(0)
        stage.stop()
        sink.close(0)
    # The first input finds the stage idle; every later one was queued up behind the first.
    assert stats["received_ahead"] >= count - 2, stats
    assert runner.prepared_by and set(runner.prepared_by) == {"tvmpipe-s-receive"}
    ready_early = [s for s in range(2, count) if timeline[s]["complete"] < timeline[s - 1]["end"]]
    assert len(ready_early) >= count - 3, timeline


def _through_fast_stage(
    context: zmq.Context[Any], count: int, one_at_a_time: bool
) -> tuple[list[Message], dict[str, Any], Slow]:
    """``count`` inputs through a stage that computes nothing: each one after the result
    before it, or all at once; the outputs in arrival order, the stage's stats, its runner."""
    sink, sink_address = _sink(context)
    runner = Slow(0.0)
    stage = Stage("s", runner, "127.0.0.1")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    got: list[Message] = []
    try:
        dest = Destination("client", sink_address, ((0, "0"),))
        push.connect(stage.start({"client": 4096}, [dest])["client"])
        for seq in range(count):
            push.send_multipart(encode(Message.data(seq, "client", {"x": np.full(4, seq, "f4")})))
            if one_at_a_time:
                got.append(decode(sink.recv_multipart()))
        got += [decode(sink.recv_multipart()) for _ in range(count - len(got))]
        stats = stage.snapshot()
    finally:
        push.close(0)
        stage.stop()
        sink.close(0)
    assert [m.seq for m in got] == list(range(count))
    assert all(m.tensors["0"][0] == m.seq for m in got)
    return got, stats, runner


def test_a_lone_request_is_received_by_the_compute_thread(context: zmq.Context[Any]) -> None:
    """One input at a time: nothing queues up, so the receive thread is never woken and the
    input costs no thread hand-off."""
    _, stats, runner = _through_fast_stage(context, 40, one_at_a_time=True)
    # The receive thread reads ahead only while the runner computes, and each input here comes
    # only after the result before it was sent: however slow the machine, none is read ahead.
    assert stats["received_ahead"] == 0 and not runner.prepared_by, stats


def test_short_computations_are_not_read_ahead(context: zmq.Context[Any]) -> None:
    """Inputs queue up at a stage whose computations are short: handing each one from the
    receive thread to the compute thread would cost more than the overlap saves, so the compute
    thread receives them itself, and every output still comes, in order. (A computation the
    machine preempted looks long; the shortest of the last eight counts, so that two busy loops
    beside the test read none ahead, where a moving average read 46 of 200.)"""
    count = 200
    _, stats, runner = _through_fast_stage(context, count, one_at_a_time=False)
    assert stats["received_ahead"] <= count // 10, stats
    assert len(runner.prepared_by) == stats["received_ahead"], stats
