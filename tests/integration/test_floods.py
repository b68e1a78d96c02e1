"""Floods: everything a stage holds fits in queue_bytes, and so does the client's input queue.

- A join stage fed by a slow branch and by a branch of 16 MiB tensors that runs far ahead holds
  back the fast branch instead of buffering it all: its peak RSS stays within queue_bytes plus a
  few messages, and every input arrives, right and in order.
- The same join with tiny tensors and more inputs in flight than a stage keeps partial input
  sets for: nothing is evicted to make room, every input arrives.
- A 200 MiB message pushed by hand at a stage that expects 16-byte tensors is refused by the
  socket (ZeroMQ's MAXMSGSIZE): the stage's RSS does not grow by it, and the pipeline goes on.
- ``set_input`` without ``run`` is bounded (by the window or by bytes): it raises a tvmpipe error
  that names the window or the queue before the client's RSS grows past the bound, and the
  values queued before still run.

Peaks are the kernel's: ``VmHWM`` of ``/proc/PID/status``, reset through ``clear_refs`` after a
warm-up, minus ``VmRSS`` at that moment. ``pytest -s`` prints every measurement.

The worker loads this file on its own (not as part of a package) to run the Python stages below,
so it imports nothing from the test suite at module level.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import psutil
import pytest
import zmq
import zmq.utils.monitor

from tvmpipe.orchestrator import (
    PipelineLibrary,
    PipelineModule,
    PipelineModuleConfig,
    build_pipeline,
)
from tvmpipe.proto.errors import TvmpipeError
from tvmpipe.proto.messages import Message, encode

MIB = 1 << 20
WAIT_S = 60.0
POLL_S = 0.02


# ----- Python stages (module level: the worker imports them by name, or loads this file)


def slow_echo(a):  # type: ignore[no-untyped-def]
    """Sleeps ``a.flat[1]`` seconds (the slow branch), then returns ``a``."""
    import time

    time.sleep(float(a.flat[1]))
    return a.copy()


def join_pair(a, big):  # type: ignore[no-untyped-def]
    """``[a[0], big[0], big[-1]]``: small, and names the input of each branch."""
    return np.array([a.flat[0], big.flat[0], big.flat[-1]], dtype=np.float32)


def negate(data):  # type: ignore[no-untyped-def]
    return -data


# ----- helpers


def _build(cfg: PipelineModuleConfig) -> PipelineLibrary:
    import tvm

    with tvm.transform.PassContext(opt_level=3):
        return build_pipeline(cfg)


@pytest.fixture(scope="module")
def join_lib() -> Iterator[PipelineLibrary]:
    """a -> slow (sleeps a[1] s) -> join.a; big -> join.big straight from the client."""
    cfg = PipelineModuleConfig()
    cfg.inputs["a"] = (slow_echo, "a")
    cfg.inputs["big"] = (join_pair, "big")
    cfg.connect(slow_echo, 0, join_pair, "a")
    cfg.outputs.append((join_pair, 0))
    cfg[slow_echo].name = "slow"
    cfg[join_pair].name = "join"
    lib = _build(cfg)
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def negate_lib() -> Iterator[PipelineLibrary]:
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (negate, "data")
    cfg.outputs.append((negate, 0))
    lib = _build(cfg)
    yield lib
    lib.close()


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """A process's peak RSS from now on: the kernel's high-water mark, reset here, and our
    own samples (``sample()``) where the mark cannot be reset."""

    def __init__(self, pid: int):
        self.pid = pid
        self.resettable = True
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.resettable = False
        self.start = _status_kib(pid, "VmRSS") * 1024
        self.sampled = self.start

    def sample(self) -> None:
        self.sampled = max(self.sampled, _status_kib(self.pid, "VmRSS") * 1024)

    def growth(self) -> int:
        self.sample()
        peak = _status_kib(self.pid, "VmHWM") * 1024 if self.resettable else self.sampled
        return max(peak, self.sampled) - self.start

    def how(self) -> str:
        return "VmHWM after clear_refs" if self.resettable else "VmRSS sampled every 20 ms"


def _stage(pipe: PipelineModule, name: str) -> dict[str, Any]:
    return dict(pipe.stats()["stages"][name])


def _wait_all(
    futures: list[Future[list[np.ndarray]]], on_poll: Any = None, timeout: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        if on_poll is not None:
            on_poll()
        time.sleep(POLL_S)


def _join_inputs(i: int, elements: int, pause: float) -> dict[str, np.ndarray]:
    return {
        "a": np.array([i, pause], dtype="float32"),
        "big": np.full(elements, i, dtype="float32"),
    }


def _check_join_results(futures: list[Future[list[np.ndarray]]]) -> list[str]:
    """What went wrong with each input: no result (lost), an error, or another's result."""
    problems = []
    for i, future in enumerate(futures):
        if not future.done():
            problems.append(f"input {i}: no result")
            continue
        error = future.exception()
        if error is not None:
            problems.append(f"input {i}: {type(error).__name__}: {error}"[:200])
            continue
        (out,) = future.result()
        if out.tolist() != [i, i, i]:
            problems.append(f"input {i}: got {out.tolist()}")
    return problems


# ----- a branch that runs ahead of its sibling


@pytest.mark.timeout(240)
def test_join_holds_a_fast_branch_of_big_tensors_within_queue_bytes(
    join_lib: PipelineLibrary,
) -> None:
    """30 inputs of 16 MiB on the fast branch, 0.1 s each on the slow one, queue_bytes 64 MiB:
    the join stage's peak RSS grows by at most queue_bytes + 5 messages (its queues and partial
    sets within queue_bytes, plus RCV_HWM = 2 messages per sender on its data socket and the
    one being computed), where buffering the whole fast branch would take 480 MiB."""
    count, elements, pause = 30, 4 * MIB, 0.1  # 16 MiB of float32 per input
    queue_bytes = 64 * MIB
    message = elements * 4
    bound = queue_bytes + 5 * message
    sets = [_join_inputs(i, elements, pause) for i in range(count)]
    with PipelineModule(join_lib, window=64, timeout=WAIT_S, queue_bytes=queue_bytes) as pipe:
        warm = [pipe.submit(_join_inputs(i, elements, 0.0)) for i in range(2)]
        for i, future in enumerate(warm):
            assert future.result(WAIT_S)[0].tolist() == [i, i, i]
        join = _stage(pipe, "join")
        pid = join["pid"]
        before_dropped = join.get("dropped", 0)
        peak = PeakRss(pid)
        held = {"held_bytes": 0, "queued_bytes": 0}

        def poll() -> None:
            peak.sample()
            data = _stage(pipe, "join")
            for key in held:
                held[key] = max(held[key], int(data.get(key, 0)))

        started = time.monotonic()
        futures = [pipe.submit(inputs, copy=False) for inputs in sets]
        _wait_all(futures, poll)
        elapsed = time.monotonic() - started
        growth = peak.growth()
        problems = _check_join_results(futures)
        join = _stage(pipe, "join")
    has_held = "held_bytes" in join
    print(
        f"\njoin stage pid {pid}: {count} inputs of {message // MIB} MiB in {elapsed:.1f} s; "
        f"RSS growth {growth / MIB:.1f} MiB ({peak.how()}), bound {bound / MIB:.0f} MiB "
        f"(queue_bytes {queue_bytes // MIB} MiB + 5 messages); peak held_bytes "
        f"{held['held_bytes'] / MIB:.1f} MiB{'' if has_held else ' (no such stat yet)'}, "
        f"queued_bytes {held['queued_bytes'] / MIB:.1f} MiB; dropped "
        f"{join.get('dropped', 0) - before_dropped}"
    )
    assert not problems, problems[:10]
    assert join.get("dropped", 0) == before_dropped, f"the join stage dropped inputs: {join}"
    assert growth <= bound, (
        f"the join stage's RSS grew by {growth / MIB:.0f} MiB while a branch ran ahead; "
        f"queue_bytes is {queue_bytes // MIB} MiB and {bound / MIB:.0f} MiB is the bound"
    )
    if has_held:
        assert held["held_bytes"] <= queue_bytes, held


@pytest.mark.timeout(180)
def test_join_evicts_nothing_when_a_branch_runs_far_ahead(join_lib: PipelineLibrary) -> None:
    """1,500 tiny inputs in flight, the slow branch 2 ms per input: the fast branch runs
    ahead by more partial input sets than a join keeps (1,024 today). It must be held back,
    not evicted: every input yields its result, nothing is dropped."""
    count, pause = 1500, 0.002
    sets = [_join_inputs(i, 4, pause) for i in range(count)]
    with PipelineModule(join_lib, window=count, timeout=WAIT_S) as pipe:
        started = time.monotonic()
        futures = [pipe.submit(inputs) for inputs in sets]
        _wait_all(futures, timeout=30.0)
        elapsed = time.monotonic() - started
        problems = _check_join_results(futures)
        join = _stage(pipe, "join")
    print(
        f"\n{count} tiny inputs through a join with a 2 ms branch: {elapsed:.1f} s, "
        f"{len(problems)} without their result, join dropped {join.get('dropped')}, "
        f"pending joins {join.get('pending_joins')}"
    )
    assert not problems, f"{len(problems)} inputs lost: {problems[:5]}"
    assert join.get("dropped", 0) == 0, join


# ----- a message larger than the stage can expect


@pytest.mark.timeout(180)
def test_oversized_message_is_refused_by_the_socket(rfc_lib: PipelineLibrary) -> None:
    """A 200 MiB tensor from "mod1" pushed by hand at mod2, which expects 16 bytes: the stage's
    RSS grows by less than half of it (its socket refuses the message: MAXMSGSIZE), and the
    pipeline still works afterwards."""
    size = 200 * MIB
    limit = size // 2
    rng = np.random.default_rng(3)
    names = ("data_0", "data_1", "data_2")
    sets = [{n: rng.standard_normal((1, 4)).astype("float32") for n in names} for _ in range(20)]
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    monitor = push.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
    try:
        # security off: with it on, the frame is refused at the handshake already
        # (test_data_plane_security.py); this checks the socket's own size limit
        with PipelineModule(rfc_lib, security="off") as pipe:
            _check_rfc(pipe, sets[:2])  # warm: every connection made
            mod2 = _stage(pipe, "mod2")
            pid, address = mod2["pid"], mod2["address"]
            counters = ("received", "failed", "dropped", "bytes_in")
            before = {k: mod2.get(k, 0) for k in counters}
            peak = PeakRss(pid)
            huge = np.zeros((1, size // 4), dtype="float32")  # zero pages: cheap to send
            frames = encode(Message.data(10**9, "mod1", {"data_0": huge}))
            push.setsockopt(zmq.LINGER, 0)
            push.connect(address)
            push.send_multipart(frames, copy=False)
            started = time.monotonic()
            outcome = ""
            while not outcome and time.monotonic() < started + WAIT_S:
                peak.sample()
                if monitor.poll(0):
                    event = zmq.utils.monitor.recv_monitor_message(monitor)
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        outcome = "the stage dropped the connection"
                    continue
                now = _stage(pipe, "mod2")
                changed = [k for k in counters if now.get(k, 0) != before[k]]
                if changed:
                    outcome = "the stage read it: " + ", ".join(
                        f"{k} {before[k]} -> {now.get(k)}" for k in changed
                    )
                time.sleep(POLL_S)
            growth = peak.growth()
            del huge, frames
            _check_rfc(pipe, sets[2:])
            after = _stage(pipe, "mod2")
    finally:
        push.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=0)
        context.term()
    print(
        f"\n{size // MIB} MiB message at mod2 (pid {pid}): {outcome or 'no sign either way'} "
        f"after {time.monotonic() - started:.1f} s; RSS growth {growth / MIB:.1f} MiB "
        f"({peak.how()}), limit {limit // MIB} MiB; stats after: received "
        f"{after.get('received')}, failed {after.get('failed')}, dropped {after.get('dropped')}"
    )
    assert outcome, f"neither a dropped connection nor a read within {WAIT_S} s"
    assert growth < limit, (
        f"mod2's RSS grew by {growth / MIB:.0f} MiB for one {size // MIB} MiB message it "
        f"cannot use: its socket took it in ({outcome})"
    )


def _check_rfc(pipe: PipelineModule, sets: list[dict[str, np.ndarray]]) -> None:
    futures = [pipe.submit(inputs) for inputs in sets]
    for inputs, future in zip(sets, futures, strict=True):
        expected = inputs["data_2"] - (inputs["data_0"] + inputs["data_1"]) ** 2
        np.testing.assert_allclose(future.result(WAIT_S)[0], expected, rtol=1e-5)


# ----- the set_input queue


@pytest.mark.timeout(120)
def test_set_input_queue_is_bounded(negate_lib: PipelineLibrary) -> None:
    """set_input of 1 MiB values, 50 times the window, without run: a tvmpipe error naming
    the window or the queue comes before the client's RSS has grown by queue_bytes + window
    values + 32 MiB; every value accepted before it still runs, in order."""
    window, value_bytes, queue_bytes = 8, MIB, 16 * MIB
    calls = 50 * window
    bound = queue_bytes + window * value_bytes + 32 * MIB
    shape = (value_bytes // 4,)
    me = psutil.Process()
    refused: TvmpipeError | None = None
    accepted = 0
    with PipelineModule(negate_lib, window=window, timeout=1.0, queue_bytes=queue_bytes) as pipe:
        pipe.set_input("data", np.full(shape, -1, dtype="float32"))
        pipe.run()
        np.testing.assert_array_equal(pipe.get_output(timeout=WAIT_S)[0], 1)
        start = peak = me.memory_info().rss
        started = time.monotonic()
        for i in range(calls):
            try:
                pipe.set_input("data", np.full(shape, i, dtype="float32"))
            except TvmpipeError as exc:
                refused = exc
                break
            accepted += 1
            peak = max(peak, me.memory_info().rss)
        waited = time.monotonic() - started
        growth = peak - start
        ran = 0
        for i in range(accepted):
            pipe.run()
            out = pipe.get_output(timeout=WAIT_S)
            assert out, f"no result for queued value {i}"
            np.testing.assert_array_equal(out[0], -float(i))
            ran += 1
    print(
        f"\nset_input x {calls} (1 MiB each, window {window}, queue_bytes "
        f"{queue_bytes // MIB} MiB): accepted {accepted}, then "
        f"{type(refused).__name__ if refused else 'nothing'} after {waited:.1f} s: {refused}; "
        f"client RSS growth {growth / MIB:.1f} MiB, bound {bound / MIB:.0f} MiB; "
        f"{ran} queued values ran"
    )
    assert refused is not None, (
        f"set_input accepted all {calls} values ({calls * value_bytes // MIB} MiB, window "
        f"{window}) without an error; the client's RSS grew by {growth / MIB:.0f} MiB"
    )
    assert re.search(r"window|queue", str(refused), re.IGNORECASE), refused
    assert growth <= bound, f"client RSS grew by {growth / MIB:.0f} MiB, bound {bound / MIB}"
