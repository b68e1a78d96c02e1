"""restart=True: a lost stage is deployed again and every accepted input still yields exactly one
result, in order. Workers and session processes are killed with SIGKILL at random moments."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest
from modules import binary_module, sleep_then_copy, unary_module, weighted_module

from tvmpipe.orchestrator import PipelineLibrary, PipelineModule, PipelineModuleConfig
from tvmpipe.proto.errors import StageLostError

from .conftest import WorkerFactory, build

pytestmark = pytest.mark.timeout(240)

PACE_S = 0.002  # the Python stage sleeps this long per input, so the stream lasts seconds
RESTART_LIMIT_S = 30.0  # a stage deployed again, and its inputs sent again, within this


def paced_pipeline(
    rpc_key: str = "", shape: tuple[int, int] = (1, 4), first: Any = sleep_then_copy
) -> PipelineLibrary:
    """x -> ``first`` (Python; by default a sleep) -> negative (Relax) -> add y (Relax, joined
    with y from the client).

    The result is y - x, and the first element of x is the Python stage's sleep in seconds."""
    negative = unary_module("negative", shape)
    add = binary_module("add", shape)
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data")
    cfg.inputs["y"] = (add, "data_1")
    cfg.connect(first, 0, negative, "data_0")
    cfg.connect(negative, 0, add, "data_0")
    cfg.outputs.append((add, 0))
    for module in (first, negative, add):
        cfg[module].rpc_key = rpc_key
    return build(cfg)


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    built = paced_pipeline()
    yield built
    built.close()


@pytest.fixture(scope="module")
def keyed_lib() -> Iterator[PipelineLibrary]:
    """The same, each stage asking the tracker for a worker registered under "cpu"."""
    built = paced_pipeline("cpu")
    yield built
    built.close()


def input_sets(
    count: int, seed: int, shape: tuple[int, int] = (1, 4)
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(count):
        x = rng.standard_normal(shape).astype("float32")
        x[0, 0] = PACE_S
        sets.append({"x": x, "y": rng.standard_normal(shape).astype("float32")})
    return sets


def expected(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return inputs["y"] - inputs["x"]


def wait_for_restarts(pipe: PipelineModule, count: int) -> None:
    deadline = time.monotonic() + RESTART_LIMIT_S
    while pipe.stats()["client"].get("restarts", 0) < count:
        assert time.monotonic() < deadline, f"restart {count} did not happen in time"
        time.sleep(0.05)


def test_thousand_inputs_survive_random_kills(lib: PipelineLibrary) -> None:
    """Five kills, each of a random stage's worker or session process, at a random moment."""
    sets = input_sets(1000, seed=5)
    chooser = random.Random(7)
    kills: list[str] = []
    errors: list[BaseException] = []
    with PipelineModule(lib, restart=True, window=64) as pipe:

        def produce() -> None:
            try:
                for inputs in sets:
                    for name, value in inputs.items():
                        pipe.set_input(name, value)
                    pipe.run()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        def kill(victims: int) -> None:
            try:
                for done in range(victims):
                    time.sleep(chooser.uniform(0.1, 0.6))
                    session = chooser.choice(pipe._fleet.stage_sessions())
                    name = session.stage.name
                    if chooser.random() < 0.5:
                        pid, what = pipe._fleet.worker_of[name].process.pid, "worker"
                    else:
                        assert session.remote_pid is not None
                        pid, what = session.remote_pid, "session"
                    os.kill(pid, signal.SIGKILL)
                    kills.append(f"{name} {what} at result {pipe.stats()['client']['completed']}")
                    wait_for_restarts(pipe, done + 1)
            except BaseException as exc:
                errors.append(exc)

        producer = threading.Thread(target=produce)
        killer = threading.Thread(target=kill, args=(5,))
        producer.start()
        killer.start()
        started = time.monotonic()
        try:
            for i, inputs in enumerate(sets):
                out = pipe.get_output(timeout=RESTART_LIMIT_S)
                assert out, f"no result for input {i} within {RESTART_LIMIT_S} s"
                np.testing.assert_allclose(out[0], expected(inputs), rtol=1e-6)
            assert pipe.get_output() == []  # nothing extra, nothing duplicated
        finally:
            producer.join(RESTART_LIMIT_S)
            killer.join(RESTART_LIMIT_S)
        elapsed = time.monotonic() - started
        assert not errors, errors
        client = pipe.stats()["client"]
    print(f"1000 inputs, {len(kills)} kills ({'; '.join(kills)}): {elapsed:.1f} s, {client}")
    assert len(kills) == 5
    assert client["restarts"] == 5
    assert client["completed"] == 1000


def test_restart_on_the_same_server(lib: PipelineLibrary, worker_factory: WorkerFactory) -> None:
    """``servers=``: the session dies, the worker lives; the stage comes back on that worker."""
    workers = worker_factory(3)
    sets = input_sets(100, seed=6)
    with PipelineModule(lib, servers=[w.address for w in workers], restart=True) as pipe:
        futures = [pipe.submit(inputs) for inputs in sets[:50]]
        victim = pipe._fleet.stage_sessions()[1]
        assert victim.remote_pid is not None
        os.kill(victim.remote_pid, signal.SIGKILL)
        futures += [pipe.submit(inputs) for inputs in sets[50:]]
        for inputs, future in zip(sets, futures, strict=True):
            np.testing.assert_allclose(future.result(RESTART_LIMIT_S)[0], expected(inputs))
        assert pipe._fleet.stage_sessions()[1] is not victim
        assert pipe._fleet.stage_sessions()[1].peer == workers[1].address
        assert pipe.stats()["client"]["restarts"] == 1


def test_restart_from_the_tracker_by_key(
    keyed_lib: PipelineLibrary, tracker: tuple[str, int], worker_factory: WorkerFactory
) -> None:
    """A killed board: the tracker hands out another worker registered under the same key."""
    worker_factory(3, tracker=tracker, key="cpu")
    spare = worker_factory(1, tracker=tracker, key="cpu")[0]
    sets = input_sets(60, seed=8)
    with PipelineModule(keyed_lib, tracker=tracker, restart=True) as pipe:
        used = {s.remote_pid for s in pipe._fleet.stage_sessions()}
        futures = [pipe.submit(inputs) for inputs in sets[:30]]
        victim = pipe._fleet.stage_sessions()[2]
        assert victim.remote_pid is not None
        owner = psutil.Process(victim.remote_pid).ppid()  # the worker that forked the session
        os.kill(owner, signal.SIGKILL)
        futures += [pipe.submit(inputs) for inputs in sets[30:]]
        for inputs, future in zip(sets, futures, strict=True):
            np.testing.assert_allclose(future.result(RESTART_LIMIT_S)[0], expected(inputs))
        assert pipe._fleet.stage_sessions()[2].rpc_address == spare.address
        assert pipe._fleet.stage_sessions()[2].remote_pid not in used


def test_set_params_survive_a_restart() -> None:
    """Weights set with set_params are given to the stage again when it is deployed again."""
    mod = weighted_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["data_0"] = (mod, "data_0")
    cfg.outputs.append((mod, 0))
    w0 = np.array([[1.0, 2.0, 3.0, 4.0]], dtype="float32")
    w1 = np.array([[-1.0, 0.5, 10.0, 0.0]], dtype="float32")
    cfg[mod].params = {"w": w0}
    cfg.param_groups["g"] = mod
    weighted = build(cfg)
    x = np.arange(4, dtype="float32").reshape(1, 4)
    try:
        with PipelineModule(weighted, restart=True) as pipe:
            np.testing.assert_allclose(pipe.submit({"data_0": x}).result(10)[0], x * w0 + 1)
            pipe.set_params("g", {"w": w1})
            session = pipe._fleet.stage_sessions()[0]
            assert session.remote_pid is not None
            os.kill(session.remote_pid, signal.SIGKILL)
            wait_for_restarts(pipe, 1)
            np.testing.assert_allclose(pipe.submit({"data_0": x}).result(10)[0], x * w1 + 1)
    finally:
        weighted.close()


def test_restarts_run_out(lib: PipelineLibrary) -> None:
    """After max_restarts, a lost stage fails the inputs in flight as without restart."""
    sets = input_sets(4, seed=9)
    with PipelineModule(lib, restart=True, max_restarts=1) as pipe:
        np.testing.assert_allclose(pipe.submit(sets[0]).result(10)[0], expected(sets[0]))
        os.kill(pipe._fleet.worker_of["mod2"].process.pid, signal.SIGKILL)
        wait_for_restarts(pipe, 1)
        np.testing.assert_allclose(pipe.submit(sets[1]).result(10)[0], expected(sets[1]))
        os.kill(pipe._fleet.worker_of["mod2"].process.pid, signal.SIGKILL)
        deadline = time.monotonic() + RESTART_LIMIT_S
        with pytest.raises(StageLostError, match="max_restarts"):
            while time.monotonic() < deadline:  # the dying session may still answer a while
                pipe.submit(sets[2]).result(10)
                time.sleep(0.05)


def test_a_stage_lost_while_the_tracker_is_down_is_reported_within_five_seconds(
    keyed_lib: PipelineLibrary, tracker: tuple[str, int], worker_factory: WorkerFactory
) -> None:
    """restart=True cannot place the stage again without a tracker: it says so in 5 s."""
    worker_factory(4, tracker=tracker, key="cpu")
    sets = input_sets(10, seed=10)
    with PipelineModule(keyed_lib, tracker=tracker, restart=True) as pipe:
        np.testing.assert_allclose(pipe.submit(sets[0]).result(30)[0], expected(sets[0]))
        listening = [
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == tracker[1]
        ]
        assert listening and listening[0] is not None
        os.killpg(os.getpgid(listening[0]), signal.SIGKILL)  # the fixture's own session
        victim = pipe._fleet.stage_sessions()[1]
        assert victim.remote_pid is not None
        futures = [pipe.submit(inputs) for inputs in sets[1:]]
        os.kill(victim.remote_pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(StageLostError, match="tracker") as caught:
            futures[-1].result(30)
        elapsed = time.monotonic() - started
        print(f"lost stage with the tracker down reported after {elapsed:.2f} s: {caught.value}")
        assert caught.value.stage == "mod2"
        assert elapsed < 5.0
