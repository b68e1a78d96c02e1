"""Chaos: with restart=True, no mix of faults loses, duplicates, corrupts or reorders a result.

The pipeline is DESIGN.md's three-stage example (``rfc_lib``: mod1 = a + b, mod2 = x * x,
mod3 = c - y) on tiny (1, 4) tensors. Input ``g`` of round ``r`` (input ``i`` of that round) is

    data_0 = [i, 0, 0, 0]   data_1 = [0, 0, 0, 0]   data_2 = [0, r, g, 0]

so its result is ``[-i*i, r, g, 0]``: element 2 names the input the result belongs to, element 0
checks that both of mod3's parts (through mod1 and mod2, and straight from the client) belong to
that same input. A result equal to another input's is a duplicate or a misordered result; one
equal to no input's is wrong.

Faults, from a chaos thread, at random moments of the stream (when the producer has submitted a
random number of inputs), possibly overlapping: SIGKILL of a stage's worker (the parent of its
session process: a local worker, child of this test), SIGKILL of a session process, and SIGSTOP
of a session or a worker for 0.5 to 4 s, then SIGCONT. A session frozen for longer than the
client's loss deadline (about 2 s) is replaced and thaws later. Every process stopped here gets
its SIGCONT in a ``finally``.

``TVMPIPE_CHAOS_SEED=N`` replays a seed (the faults chosen and when; timing still varies),
``TVMPIPE_CHAOS_ROUNDS=N`` runs N rounds (4 in ``make test``, 20 in ``make chaos``);
``pytest -s`` prints each round.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import pytest

import tvmpipe.orchestrator.fleet as fleet_module
from tvmpipe.orchestrator import PipelineLibrary, PipelineModule, forks
from tvmpipe.proto.errors import PipelineError, StageLostError, TvmpipeError

SEED = int(os.environ.get("TVMPIPE_CHAOS_SEED", "20250611"))
ROUNDS = int(os.environ.get("TVMPIPE_CHAOS_ROUNDS", "4"))  # make chaos: 20
INPUTS = 1000
WINDOW = 256  # inputs in flight: enough to keep three tiny stages busy
MAX_RESTARTS = 1000
RESULT_TIMEOUT_S = 10.0  # result_timeout=: an input without a result this long is sent again
COLLECT_S = 60.0  # after its last submit, a round's results must all arrive within this
REPLACED_S = 30.0  # a frozen stage is replaced (stats pid changes) within this
EXIT_S = 15.0  # a replaced session process that thawed has exited within this
STOP_MIN_S, STOP_MAX_S = 0.5, 4.0
POLL_S = 0.01
RETARGET_S = 10.0  # a stage being deployed again has a live process to hit within this
STAGES = ("mod1", "mod2", "mod3")
KINDS = ("kill worker", "kill session", "stop session", "stop worker")


# ----- helpers


def make_pipe(lib: PipelineLibrary, **options: Any) -> PipelineModule:
    """``PipelineModule(lib, result_timeout=..., **options)``; without result_timeout where the
    client does not take it yet (a note is printed)."""
    try:
        return PipelineModule(lib, result_timeout=RESULT_TIMEOUT_S, **options)  # type: ignore[call-arg]
    except TypeError as exc:
        if "result_timeout" not in str(exc):
            raise
        print(f"note: PipelineModule takes no result_timeout yet ({exc}); running without it")
        return PipelineModule(lib, **options)


def inputs_for(r: int, i: int) -> dict[str, np.ndarray]:
    g = r * INPUTS + i
    return {
        "data_0": np.array([[i, 0, 0, 0]], dtype="float32"),
        "data_1": np.zeros((1, 4), dtype="float32"),
        "data_2": np.array([[0, r, g, 0]], dtype="float32"),
    }


def expected_for(g: int) -> np.ndarray:
    r, i = divmod(g, INPUTS)
    return np.array([[-(i * i), r, g, 0]], dtype="float32")


def identify(out: list[np.ndarray]) -> int | None:
    """The input ``g`` a result belongs to, or None if it is no input's result."""
    if len(out) != 1 or out[0].shape != (1, 4) or out[0].dtype != np.float32:
        return None
    value = float(out[0][0, 2])
    if not value.is_integer() or value < 0:
        return None
    g = int(value)
    return g if np.array_equal(out[0], expected_for(g)) else None


def _ours(pid: int | None) -> psutil.Process | None:
    """``pid`` if it is a live process started under this test (a local worker, or a session
    forked by one), never anyone else's."""
    if not isinstance(pid, int):
        return None
    for proc in psutil.Process().children(recursive=True):
        if proc.pid == pid:
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    return proc
            return None
    return None


def session_pids(pipe: PipelineModule) -> dict[str, int]:
    """Each stage's session process, as ``stats()`` names it (missing while unreachable)."""
    found = {}
    for name, data in pipe.stats()["stages"].items():
        pid = data.get("pid")
        if isinstance(pid, int):
            found[name] = pid
    return found


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            text = what if isinstance(what, str) else what()
            raise AssertionError(f"{text}: not within {timeout} s")
        time.sleep(0.05)


@dataclass(order=True)
class Fault:
    at_input: int  # fires once the producer has submitted this many inputs
    kind: str = field(compare=False)
    stage: str = field(compare=False)
    seconds: float = field(compare=False, default=0.0)  # how long a SIGSTOP lasts


def plan_faults(rng: random.Random) -> list[Fault]:
    faults = [
        Fault(
            rng.randrange(50, INPUTS - 50),
            rng.choice(KINDS),
            rng.choice(STAGES),
            round(rng.uniform(STOP_MIN_S, STOP_MAX_S), 2),
        )
        for _ in range(rng.randint(1, 3))
    ]
    return sorted(faults)


class Chaos:
    """Fires planned faults from one thread and sends SIGCONT on time from another."""

    def __init__(self, pipe: PipelineModule, faults: list[Fault], submitted: Callable[[], int]):
        self.pipe = pipe
        self.faults = list(faults)
        self.submitted = submitted
        self.done: list[str] = []  # what was done, for the report
        self.errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thaws: list[tuple[float, int]] = []  # (monotonic time, pid), a heap
        self._frozen: set[int] = set()
        self._threads = [
            threading.Thread(target=self._fire_loop, name="chaos-fire"),
            threading.Thread(target=self._thaw_loop, name="chaos-thaw"),
        ]

    def __enter__(self) -> Chaos:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish(timeout=0.0)

    def finish(self, timeout: float = STOP_MAX_S + 30.0) -> None:
        """Wait for the planned faults (up to ``timeout``), then stop; everything is thawed."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping.set()
        try:
            for thread in self._threads:
                thread.join(30)
        finally:
            self.thaw_all()

    def pending(self) -> bool:
        with self._lock:
            return bool(self.faults or self._frozen)

    @property
    def fired(self) -> int:
        return len(self.done)

    def thaw_all(self) -> None:
        with self._lock:
            frozen, self._frozen, self._thaws = set(self._frozen), set(), []
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _fire_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                with self._lock:
                    due = bool(self.faults) and self.faults[0].at_input <= self.submitted()
                    fault = self.faults.pop(0) if due else None
                if fault is None:
                    time.sleep(POLL_S)
                    continue
                self._fire(fault)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def _target(self, fault: Fault) -> psutil.Process | None:
        """The live process the fault is for; None while the stage is being deployed again."""
        session = _ours(session_pids(self.pipe).get(fault.stage))
        if session is None or not fault.kind.endswith("worker"):
            return session
        worker = _ours(session.ppid())
        local = {p.pid for p in forks.children()}  # started here, or by the fork server
        return worker if worker is not None and worker.pid in local else None

    def _fire(self, fault: Fault) -> None:
        deadline = time.monotonic() + RETARGET_S
        target = None
        while target is None and not self._stopping.is_set():
            try:
                target = self._target(fault)
            except TvmpipeError as exc:
                self.done.append(f"{fault.kind} {fault.stage}: skipped ({type(exc).__name__})")
                return
            if target is None and time.monotonic() > deadline:
                self.done.append(f"{fault.kind} {fault.stage}: skipped (no live process)")
                return
            if target is None:
                time.sleep(0.05)
        if target is None:
            return
        at = self.submitted()
        if fault.kind.startswith("kill"):
            with contextlib.suppress(psutil.Error):
                target.send_signal(signal.SIGKILL)
            self.done.append(f"{fault.kind} {fault.stage} at input {at}")
            return
        with self._lock:
            self._frozen.add(target.pid)
            heapq.heappush(self._thaws, (time.monotonic() + fault.seconds, target.pid))
            with contextlib.suppress(psutil.Error):
                target.send_signal(signal.SIGSTOP)
        self.done.append(f"{fault.kind} {fault.stage} for {fault.seconds} s at input {at}")

    def _thaw_loop(self) -> None:
        while True:
            with self._lock:
                due = bool(self._thaws) and self._thaws[0][0] <= time.monotonic()
                pid = heapq.heappop(self._thaws)[1] if due else None
                if pid is not None:
                    self._frozen.discard(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                idle = not self._thaws
            if idle and self._stopping.is_set():
                return
            if pid is None:
                time.sleep(POLL_S)


@dataclass
class Tally:
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    misordered: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.lost += other.lost
        self.duplicated += other.duplicated
        self.wrong += other.wrong
        self.misordered += other.misordered
        self.notes += other.notes

    def text(self) -> str:
        return (
            f"lost {self.lost}, duplicated {self.duplicated}, wrong {self.wrong}, "
            f"misordered {self.misordered}"
        )


def tally(first: int, results: list[list[np.ndarray] | BaseException | None]) -> Tally:
    """Results in submit order for inputs ``first, first + 1, ...``: None never arrived."""
    counts = Tally()
    seen: dict[int, int] = {}
    for position, result in enumerate(results):
        g = first + position
        if result is None or isinstance(result, BaseException):
            counts.lost += 1
            if len(counts.notes) < 5:
                what = "no result" if result is None else f"{type(result).__name__}: {result}"
                counts.notes.append(f"input {g}: {what}"[:300])
            continue
        got = identify(result)
        if got is None:
            counts.wrong += 1
            if len(counts.notes) < 5:
                counts.notes.append(f"input {g}: wrong result {result}")
            continue
        seen[got] = seen.get(got, 0) + 1
        if got != g:
            counts.misordered += 1
            if len(counts.notes) < 5:
                counts.notes.append(f"input {g}: got the result of input {got}")
    counts.duplicated = sum(n - 1 for n in seen.values() if n > 1)
    return counts


# ----- the chaos test


def _round(
    pipe: PipelineModule, r: int, rng: random.Random
) -> tuple[Tally, list[str], bool, float]:
    """One round of INPUTS inputs under 1-3 faults; returns the tally, the faults done, whether
    the pipeline is still usable, and the round's duration."""
    faults = plan_faults(rng)
    submitted = 0
    futures: list[Future[list[np.ndarray]] | BaseException] = []
    usable = True
    started = time.monotonic()
    with Chaos(pipe, faults, lambda: submitted) as chaos:
        for i in range(INPUTS):
            if not usable:
                futures.append(PipelineError("not submitted: the pipeline was lost earlier"))
                continue
            try:
                futures.append(pipe.submit(inputs_for(r, i)))
            except TvmpipeError as exc:
                futures.append(exc)
                usable = not isinstance(exc, StageLostError)
            submitted = i + 1
        chaos.finish()
        assert not chaos.errors, chaos.errors
        done = list(chaos.done)
    results: list[list[np.ndarray] | BaseException | None] = []
    deadline = time.monotonic() + COLLECT_S
    for future in futures:
        if isinstance(future, BaseException):
            results.append(future)
            continue
        try:
            results.append(future.result(max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            results.append(None)
        except Exception as exc:
            results.append(exc)
            usable = usable and not isinstance(exc, StageLostError)
    return tally(r * INPUTS, results), done, usable, time.monotonic() - started


@pytest.mark.timeout(600)
def test_chaos_rounds_lose_duplicate_and_reorder_nothing(rfc_lib: PipelineLibrary) -> None:
    """ROUNDS x INPUTS inputs; 1-3 mixed faults per round; every result exactly once, right,
    and in order."""
    rng = random.Random(SEED)
    print(f"\nchaos seed {SEED} (TVMPIPE_CHAOS_SEED={SEED} to replay)")
    total = Tally()
    faults = 0
    rebuilt = 0
    started = time.monotonic()
    options = {"restart": True, "max_restarts": MAX_RESTARTS, "window": WINDOW}
    pipe = make_pipe(rfc_lib, **options)
    try:
        for r in range(ROUNDS):
            counts, done, usable, seconds = _round(pipe, r, rng)
            faults += sum(" at input " in d for d in done)
            total.add(counts)
            client = pipe.stats()["client"]
            print(
                f"round {r:2}: {seconds:5.1f} s, {counts.text()}; restarts so far "
                f"{client.get('restarts', 0)}; faults: {'; '.join(done)}"
            )
            for note in counts.notes:
                print(f"    {note}")
            if not usable:  # a lost pipeline fails the test anyway; go on counting
                rebuilt += 1
                pipe.close()
                pipe = make_pipe(rfc_lib, **options)
        client = pipe.stats()["client"]
    finally:
        pipe.close()
    elapsed = time.monotonic() - started
    summary = (
        f"chaos: {ROUNDS} rounds x {INPUTS} inputs, faults {faults}, {total.text()} "
        f"({elapsed:.1f} s, seed {SEED}, pipeline rebuilt {rebuilt} times)"
    )
    print(summary)
    # the last pipeline's own counters: a result delivered twice shows up here
    extra = client.get("completed", 0) - client.get("launched", 0)
    assert (total.lost, total.duplicated, total.wrong, total.misordered) == (0, 0, 0, 0), (
        summary + "\n" + "\n".join(total.notes[:20])
    )
    assert rebuilt == 0, summary
    assert extra <= 0 and client.get("waiting_results", 0) == 0, client


# ----- a frozen stage that thaws after it was replaced


def _produce_until(
    pipe: PipelineModule,
    stop: threading.Event,
    futures: list[Future[list[np.ndarray]]],
    errors: list[BaseException],
    limit: int,
) -> None:
    """Submit inputs 0, 1, ... of round 0 until told to stop (or ``limit``)."""
    try:
        for i in range(limit):
            if stop.is_set():
                return
            futures.append(pipe.submit(inputs_for(0, i)))
    except BaseException as exc:  # reported by the test
        errors.append(exc)


@pytest.mark.timeout(180)
def test_frozen_stage_that_thaws_after_being_replaced_does_no_harm(
    rfc_lib: PipelineLibrary,
) -> None:
    """SIGSTOP mod2's session for longer than the loss deadline while streaming; once the
    client has replaced it (its stats pid changed), SIGCONT it. Every input yields exactly one
    right result; the old session process ends."""
    futures: list[Future[list[np.ndarray]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    frozen: psutil.Process | None = None
    with make_pipe(rfc_lib, restart=True, window=64) as pipe:
        producer = threading.Thread(
            target=_produce_until, args=(pipe, stop, futures, errors, INPUTS), name="producer"
        )
        try:
            old_pid = session_pids(pipe)["mod2"]
            frozen = _ours(old_pid)
            assert frozen is not None, f"mod2's session {old_pid} is no child of this test"
            producer.start()
            wait_until(lambda: len(futures) >= 100 or bool(errors), 30, "100 inputs submitted")
            frozen.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            before = len(futures)
            seen: dict[str, Any] = {}

            def replaced() -> bool:
                stats = pipe.stats()
                seen.update(mod2=stats["stages"]["mod2"], client=stats["client"])
                return stats["stages"]["mod2"].get("pid", old_pid) != old_pid

            wait_until(
                replaced, REPLACED_S, lambda: f"the frozen mod2 replaced (last stats: {seen})"
            )
            replaced_after = time.monotonic() - stopped_at
            frozen.send_signal(signal.SIGCONT)
            thawed = frozen
            frozen = None
            at_thaw = len(futures)
            # the stream goes on through the thaw: the old stage may still send what it held
            wait_until(
                lambda: len(futures) >= min(INPUTS, at_thaw + 200) or bool(errors),
                30,
                "200 more inputs after the thaw",
            )
            stop.set()
            producer.join(30)
            assert not errors, errors
            results: list[list[np.ndarray] | BaseException | None] = []
            deadline = time.monotonic() + COLLECT_S
            for future in futures:
                try:
                    results.append(future.result(max(0.0, deadline - time.monotonic())))
                except TimeoutError:
                    results.append(None)
                except Exception as exc:
                    results.append(exc)
            counts = tally(0, results)
            with contextlib.suppress(psutil.Error):
                thawed.wait(EXIT_S)
            old_alive = _ours(thawed.pid) is not None
            client = pipe.stats()["client"]
        finally:
            if frozen is not None:
                frozen.send_signal(signal.SIGCONT)
            stop.set()
            if producer.is_alive():
                producer.join(30)
    print(
        f"\nfrozen mod2 (pid {old_pid}) at input {before}, replaced after "
        f"{replaced_after:.1f} s, thawed at input {at_thaw}; {len(futures)} inputs: "
        f"{counts.text()}; old session alive after thaw: {old_alive}; client {client}"
    )
    assert (counts.lost, counts.duplicated, counts.wrong, counts.misordered) == (0, 0, 0, 0), (
        counts.text() + "\n" + "\n".join(counts.notes)
    )
    assert client.get("restarts", 0) >= 1, client
    assert client.get("completed", 0) == client.get("launched", 0) == len(futures), client
    assert not old_alive, f"the replaced mod2 session {old_pid} still runs {EXIT_S} s after SIGCONT"


# ----- the RFC API under a session kill


def _next_output(pipe: PipelineModule, errors: list[BaseException]) -> list[np.ndarray]:
    """get_output returns [] at once while nothing is launched: the producer may lag behind."""
    deadline = time.monotonic() + COLLECT_S
    while not errors and time.monotonic() < deadline:
        out = pipe.get_output(timeout=0.2)
        if out:
            return out
    return []


@pytest.mark.timeout(180)
def test_get_output_in_order_through_a_session_kill(rfc_lib: PipelineLibrary) -> None:
    """set_input/run from a producer thread, get_output here; mod2's session SIGKILLed after
    200 results: all 600 results come back once each, right and in launch order."""
    count = 600
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(count):
                for name, value in inputs_for(1, i).items():
                    pipe.set_input(name, value)
                pipe.run()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    results: list[list[np.ndarray] | BaseException | None] = []
    killed: int | None = None
    with make_pipe(rfc_lib, restart=True, window=32) as pipe:
        producer = threading.Thread(target=produce, name="producer")
        producer.start()
        try:
            for i in range(count):
                if i == 200:
                    victim = _ours(session_pids(pipe).get("mod2"))
                    assert victim is not None, "mod2's session is no child of this test"
                    killed = victim.pid
                    victim.send_signal(signal.SIGKILL)
                try:
                    out = _next_output(pipe, errors)
                except TvmpipeError as exc:
                    results.append(exc)
                    continue
                results.append(out or None)
                if not out:
                    break  # nothing came within COLLECT_S: the rest is lost too
            extra = pipe.get_output()
            client = pipe.stats()["client"]
        finally:
            pipe.close()  # a producer waiting for room gets PipelineClosedError
            producer.join(30)
    results += [None] * (count - len(results))
    counts = tally(1 * INPUTS, results)
    print(f"\nget_output through a kill of mod2's session {killed}: {counts.text()}; {client}")
    assert not errors, errors
    assert (counts.lost, counts.duplicated, counts.wrong, counts.misordered) == (0, 0, 0, 0), (
        counts.text() + "\n" + "\n".join(counts.notes)
    )
    assert extra == [], f"an output beyond the {count} launched: {extra}"
    assert client.get("restarts", 0) == 1, client


def test_identify_tells_inputs_apart() -> None:
    """The encoding used above: each input's result names it, and nothing else does."""
    g = 3 * INPUTS + 17
    assert identify([expected_for(g)]) == g
    wrong = expected_for(g).copy()
    wrong[0, 0] -= 1  # mod3 joined the parts of two different inputs
    assert identify([wrong]) is None
    assert identify([]) is None


def test_a_sender_frozen_while_its_next_stage_is_replaced_is_replaced_too(
    rfc_lib: PipelineLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill mod2's session while mod1's is frozen: replacing mod2 cannot rewire mod1 (the call
    would wait as long as the freeze), so mod1's session is cut after REWIRE_WAIT_S and mod1 is
    deployed again too. Every input yields its one right result; both stages have new
    sessions."""
    monkeypatch.setattr(fleet_module, "REWIRE_WAIT_S", 2.0)
    frozen: psutil.Process | None = None
    with make_pipe(rfc_lib, restart=True, window=64) as pipe:
        try:
            before = [pipe.submit(inputs_for(0, i)) for i in range(10)]
            assert [identify(f.result(COLLECT_S)) for f in before] == list(range(10))
            pids = session_pids(pipe)
            frozen, killed = _ours(pids["mod1"]), _ours(pids["mod2"])
            assert frozen is not None and killed is not None, pids
            frozen.send_signal(signal.SIGSTOP)
            killed.kill()
            during = [pipe.submit(inputs_for(0, i)) for i in range(10, 50)]
            got = [identify(f.result(COLLECT_S)) for f in during]
            assert got == list(range(10, 50))
            now = session_pids(pipe)
            assert now["mod1"] != pids["mod1"] and now["mod2"] != pids["mod2"], (pids, now)
        finally:
            if frozen is not None:
                with contextlib.suppress(psutil.Error):
                    frozen.send_signal(signal.SIGCONT)
                    frozen.wait(EXIT_S)
