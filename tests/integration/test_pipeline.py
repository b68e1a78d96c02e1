"""PipelineModule end to end: real tvmpipe workers (local, by address, by tracker key), real
ZeroMQ sockets, real RPC sessions. Each test checks its results against numpy references and
``lib.run_local``; the autouse fixture of conftest.py checks that nothing is left running."""

from __future__ import annotations

import json
import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import tvm
from leaks import gone, wait_gone
from modules import (
    FAIL_MARKER,
    argmax_softmax,
    binary_module,
    fail_on_marker,
    none_on_marker,
    old_tvm_test_modules,
    old_tvm_test_reference,
    rfc_example_modules,
    rfc_example_reference,
    sleep_then_copy,
    unary_module,
    weighted_module,
    weighted_reference,
    wire_old_tvm_test,
    wire_rfc_example,
)

from tvmpipe.orchestrator import (
    ConfigError,
    InputError,
    PipelineLibrary,
    PipelineModule,
    PipelineModuleConfig,
    StageError,
    forks,
    load_library,
)
from tvmpipe.proto.errors import (
    BackpressureTimeout,
    DeployError,
    NothingToRunError,
    PipelineClosedError,
)

from .conftest import Worker, WorkerFactory, build, wait_for_free_servers

pytestmark = pytest.mark.timeout(120)

WAIT_S = 10.0  # get_output(timeout=...) where a result must arrive
RFC_NAMES = ("data_0", "data_1", "data_2")
TESTS_DIR = Path(__file__).resolve().parent.parent


# ----- helpers


def rfc_sets(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal((1, 4)).astype("float32") for name in RFC_NAMES}
        for _ in range(count)
    ]


def set_all(pipe: PipelineModule, inputs: dict[str, np.ndarray]) -> None:
    for name, value in inputs.items():
        pipe.set_input(name, value)


def rfc_expected(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return rfc_example_reference(inputs["data_0"], inputs["data_1"], inputs["data_2"])


def check_rfc(out: list[np.ndarray], inputs: dict[str, np.ndarray]) -> None:
    assert isinstance(out, list)
    assert len(out) == 1
    assert isinstance(out[0], np.ndarray)
    np.testing.assert_allclose(out[0], rfc_expected(inputs), rtol=1e-6, atol=1e-6)


def wait_no_children(worker: Worker, timeout: float = 10.0) -> list[psutil.Process]:
    """Poll until a hand-started worker has no session process left."""
    proc = psutil.Process(worker.pid)
    deadline = time.monotonic() + timeout
    left = [c for c in proc.children(recursive=True) if not gone(c.pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [c for c in proc.children(recursive=True) if not gone(c.pid)]
    return left


# ----- libraries, built once per module


def _rfc_config(shape: tuple[int, int] = (1, 4)) -> PipelineModuleConfig:
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, *rfc_example_modules(shape))
    return cfg


@pytest.fixture(scope="module")
def old_lib() -> Iterator[PipelineLibrary]:
    """TVM's old test network: a skip edge, two pipeline inputs, three outputs."""
    cfg = PipelineModuleConfig()
    wire_old_tvm_test(cfg, *old_tvm_test_modules())
    lib = build(cfg)
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def post_lib() -> Iterator[PipelineLibrary]:
    """A Relax module (logits = a + b) followed by a Python post-processing stage."""
    mod = binary_module("add", (2, 5))
    cfg = PipelineModuleConfig()
    cfg.inputs["a"] = (mod, "data_0")
    cfg.inputs["b"] = (mod, "data_1")
    cfg.connect(mod, 0, argmax_softmax, "logits")
    cfg.outputs.append((argmax_softmax, 1))
    cfg.outputs.append((mod, 0))
    cfg.outputs.append((argmax_softmax, 0))
    lib = build(cfg)
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def failing_lib() -> Iterator[PipelineLibrary]:
    """negative -> checker (fail_on_marker: x * 2, raises on FAIL_MARKER) -> negative."""
    first, last = unary_module("negative"), unary_module("negative")
    cfg = PipelineModuleConfig()
    cfg.inputs["data_0"] = (first, "data_0")
    cfg.connect(first, 0, fail_on_marker, "data")
    cfg.connect(fail_on_marker, 0, last, "data_0")
    cfg.outputs.append((last, 0))
    cfg[fail_on_marker].name = "checker"
    lib = build(cfg)
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def slow_lib() -> Iterator[PipelineLibrary]:
    """One Python stage that sleeps as many seconds as its input says."""
    cfg = PipelineModuleConfig()
    cfg.inputs["seconds"] = (sleep_then_copy, "data")
    cfg.outputs.append((sleep_then_copy, 0))
    lib = build(cfg)
    yield lib
    lib.close()


W0 = np.array([[1.0, 2.0, 3.0, 4.0]], dtype="float32")
W1 = np.array([[-1.0, 0.5, 10.0, 0.0]], dtype="float32")


@pytest.fixture(scope="module")
def weighted_lib() -> Iterator[PipelineLibrary]:
    """data_0 * w + 1 with w a parameter group's weight, initially W0."""
    mod = weighted_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["data_0"] = (mod, "data_0")
    cfg.outputs.append((mod, 0))
    cfg[mod].params = {"w": W0}
    cfg.param_groups["g"] = mod
    lib = build(cfg)
    yield lib
    lib.close()


# ----- the RFC's example and TVM's old test network


def test_rfc_example_100_input_sets_in_order(rfc_lib: PipelineLibrary) -> None:
    sets = rfc_sets(1, 100)
    with PipelineModule(rfc_lib) as pipe:
        for inputs in sets:
            set_all(pipe, inputs)
            pipe.run()
        outs = [pipe.get_output(timeout=WAIT_S) for _ in sets]
        assert pipe.get_output() == []  # one result per run(): nothing duplicated
    for inputs, out in zip(sets, outs, strict=True):
        check_rfc(out, inputs)
        np.testing.assert_array_equal(out[0], rfc_lib.run_local(inputs)[0])


def test_old_tvm_network_skip_edge_and_fan_out(old_lib: PipelineLibrary) -> None:
    rng = np.random.default_rng(2)
    sets = [
        {n: rng.standard_normal((3, 3)).astype("float32") for n in ("data_0", "data_1")}
        for _ in range(50)
    ]
    with PipelineModule(old_lib) as pipe:
        for inputs in sets:
            set_all(pipe, inputs)
            pipe.run()
        outs = [pipe.get_output(timeout=WAIT_S) for _ in sets]
        assert pipe.get_output() == []
    for inputs, out in zip(sets, outs, strict=True):
        expected = old_tvm_test_reference(inputs["data_0"], inputs["data_1"])
        local = old_lib.run_local(inputs)
        assert len(out) == len(expected) == 3
        for got, want, ref in zip(out, expected, local, strict=True):
            assert got.shape == (3, 3)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
            np.testing.assert_array_equal(got, ref)


def test_python_post_processing_stage(post_lib: PipelineLibrary) -> None:
    rng = np.random.default_rng(3)
    sets = [
        {n: rng.standard_normal((2, 5)).astype("float32") for n in ("a", "b")} for _ in range(10)
    ]
    with PipelineModule(post_lib) as pipe:
        for inputs in sets:
            set_all(pipe, inputs)
            pipe.run()
        outs = [pipe.get_output(timeout=WAIT_S) for _ in sets]
    for inputs, out in zip(sets, outs, strict=True):
        logits = inputs["a"] + inputs["b"]
        exp = np.exp(logits.astype("float64"))
        softmax, index = exp / exp.sum(axis=-1, keepdims=True), logits.argmax(axis=-1)
        assert len(out) == 3
        np.testing.assert_allclose(out[0], softmax, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out[1], logits, rtol=1e-6)
        np.testing.assert_array_equal(out[2], index)
        assert out[2].dtype == np.int64
        for got, ref in zip(out, post_lib.run_local(inputs), strict=True):
            np.testing.assert_array_equal(got, ref)
    # the stage ran the function defined in tests/modules.py, not something else
    assert post_lib.stage("mod2").python == {"module": "modules", "function": "argmax_softmax"}
    assert argmax_softmax.__module__ == "modules"


# ----- the RFC's queue semantics


def test_nine_rfc_steps(rfc_lib: PipelineLibrary) -> None:
    a, b, c, d = rfc_sets(4, 4)
    with PipelineModule(rfc_lib) as pipe:
        with pytest.raises(NothingToRunError):
            pipe.run()  # nothing queued yet
        set_all(pipe, a)  # 1. set_input
        pipe.run()  # 2. run: launches A
        set_all(pipe, b)  # 3. set_input
        set_all(pipe, c)  # 4. set_input
        pipe.run()  # 5. run: launches B, the oldest complete set; C stays queued
        check_rfc(pipe.get_output(timeout=WAIT_S), a)  # 6. get_output: A
        pipe.run()  # 7. run: launches C
        check_rfc(pipe.get_output(timeout=WAIT_S), b)  # 8. get_output: B
        check_rfc(pipe.get_output(timeout=WAIT_S), c)  # 9. get_output: C
        assert pipe.get_output() == []  # never duplicated
        assert pipe.get_output(timeout=0.1) == []
        with pytest.raises(NothingToRunError):
            pipe.run()  # every queued set was launched
        # an incomplete set does not run, and the failed run() discards nothing
        pipe.set_input("data_0", d["data_0"])
        pipe.set_input("data_1", d["data_1"])
        with pytest.raises(NothingToRunError, match="data_2"):
            pipe.run()
        pipe.set_input("data_2", d["data_2"])
        pipe.run()
        check_rfc(pipe.get_output(timeout=WAIT_S), d)
        assert pipe.stats()["client"]["launched"] == 4


def set_and_run(pipe: PipelineModule, seconds: float) -> None:
    pipe.set_input("seconds", np.array([seconds], dtype="float32"))
    pipe.run()


def test_get_output_when_nothing_is_ready(slow_lib: PipelineLibrary) -> None:
    with PipelineModule(slow_lib) as pipe:
        started = time.monotonic()
        assert pipe.get_output() == []  # nothing launched
        assert time.monotonic() - started < 0.1
        started = time.monotonic()
        assert pipe.get_output(timeout=0.2) == []  # nothing launched: waits all the same
        assert 0.18 <= time.monotonic() - started < 0.6
        # Another thread launches while this one waits: its result, not [] at once.
        producer = threading.Timer(0.1, lambda: set_and_run(pipe, 0.05))
        producer.start()
        try:
            np.testing.assert_array_equal(pipe.get_output(timeout=WAIT_S)[0], np.float32([0.05]))
        finally:
            producer.join()
        pipe.set_input("seconds", np.array([1.0], dtype="float32"))
        pipe.run()
        started = time.monotonic()
        assert pipe.get_output() == []  # launched, not ready: returns at once
        assert time.monotonic() - started < 0.1
        started = time.monotonic()
        assert pipe.get_output(timeout=0.2) == []  # waits about that long
        assert 0.18 <= time.monotonic() - started < 0.6
        out = pipe.get_output(timeout=WAIT_S)  # then it comes, once
        np.testing.assert_array_equal(out[0], [1.0])
        assert pipe.get_output() == []


def test_bad_inputs_raise_at_once_and_queue_nothing(rfc_lib: PipelineLibrary) -> None:
    (good,) = rfc_sets(5, 1)
    with PipelineModule(rfc_lib) as pipe:
        with pytest.raises(InputError, match=r"'data_9'.*data_0, data_1, data_2"):
            pipe.set_input("data_9", good["data_0"])
        with pytest.raises(ValueError, match=r"'data_0'.*float32.*float64"):
            pipe.set_input("data_0", good["data_0"].astype("float64"))
        with pytest.raises(InputError, match=r"'data_1'.*float32\[1, 4\].*\[1, 5\]"):
            pipe.set_input("data_1", np.zeros((1, 5), dtype="float32"))
        with pytest.raises(InputError, match=r"'data_2'.*float32\[1, 4\].*\[4\]"):
            pipe.set_input("data_2", np.zeros(4, dtype="float32"))
        assert pipe.stats()["client"]["queued_inputs"] == dict.fromkeys(RFC_NAMES, 0)
        with pytest.raises(NothingToRunError):
            pipe.run()
        pipe.set_input("data_0", good["data_0"])
        pipe.set_input("data_1", tvm.runtime.tensor(good["data_1"]))  # a TVM tensor works too
        pipe.set_input("data_2", memoryview(good["data_2"]))  # anything numpy.asarray takes
        pipe.run()
        check_rfc(pipe.get_output(timeout=WAIT_S), good)
        assert pipe.get_output() == []


def test_exported_and_reloaded_package(rfc_lib: PipelineLibrary, tmp_path: Path) -> None:
    package = rfc_lib.export_library(tmp_path / "pkg")
    sets = rfc_sets(6, 5)
    with PipelineModule(str(package)) as pipe:
        for inputs in sets:
            set_all(pipe, inputs)
            pipe.run()
        outs = [pipe.get_output(timeout=WAIT_S) for _ in sets]
        assert pipe.lib.directory == package
    reloaded = load_library(package)
    try:
        for inputs, out in zip(sets, outs, strict=True):
            check_rfc(out, inputs)
            np.testing.assert_array_equal(out[0], reloaded.run_local(inputs)[0])
            np.testing.assert_array_equal(out[0], rfc_lib.run_local(inputs)[0])
    finally:
        reloaded.close()


# ----- where the stages run


def test_explicit_servers_serve_one_pipeline_after_another(
    rfc_lib: PipelineLibrary, worker_factory: WorkerFactory
) -> None:
    workers = worker_factory(3)
    servers = [w.address for w in workers]
    worker_pids = [w.pid for w in workers]
    for round_, sets in enumerate((rfc_sets(7, 5), rfc_sets(8, 5))):
        with PipelineModule(rfc_lib, servers=servers) as pipe:
            # no local worker: only the three hand-started ones run (started by this process
            # or by its fork server)
            assert sorted(p.pid for p in forks.children()) == sorted(worker_pids)
            # stage k runs in a session process of worker k
            for session, pid in zip(pipe._fleet.stage_sessions(), worker_pids, strict=True):
                assert session.remote_pid is not None
                assert psutil.Process(session.remote_pid).ppid() == pid, round_
            for inputs in sets:
                set_all(pipe, inputs)
                pipe.run()
            for inputs in sets:
                check_rfc(pipe.get_output(timeout=WAIT_S), inputs)
        # the workers outlive the pipeline, and its session processes are gone
        for worker in workers:
            assert worker.process.poll() is None
            assert wait_no_children(worker) == [], worker.address


def test_failed_deploy_leaves_user_workers_free(
    rfc_lib: PipelineLibrary, worker_factory: WorkerFactory
) -> None:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, mod1, mod2, mod3)
    cfg[mod3].device = "cuda"  # none of these workers has one
    cuda_lib = build(cfg)
    workers = worker_factory(3)
    servers = [w.address for w in workers]
    try:
        with pytest.raises(DeployError, match=rf"'mod3'.*'cuda'.*{servers[2]}"):
            PipelineModule(cuda_lib, servers=servers)
    finally:
        cuda_lib.close()
    for worker in workers:  # the sessions of mod1 and mod2 were ended, not left open
        assert worker.process.poll() is None
        assert wait_no_children(worker) == [], worker.address
    (inputs,) = rfc_sets(15, 1)
    with PipelineModule(rfc_lib, servers=servers) as pipe:
        check_rfc(pipe.submit(inputs).result(WAIT_S), inputs)


KEY_A, KEY_B = "itest-a", "itest-b"


def test_tracker_keys(
    rfc_lib: PipelineLibrary, worker_factory: WorkerFactory, tracker: tuple[str, int]
) -> None:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, mod1, mod2, mod3)
    cfg[mod1].rpc_key = KEY_A
    cfg[mod2].rpc_key = KEY_B
    cfg[mod3].rpc_key = KEY_A
    lib = build(cfg)
    try:
        with pytest.raises(DeployError, match=r"'mod1' has no rpc_key"):
            PipelineModule(rfc_lib, tracker=tracker)  # its stages have no key
        on_a = {w.pid for w in worker_factory(2, tracker=tracker, key=KEY_A)}
        on_b = {w.pid for w in worker_factory(1, tracker=tracker, key=KEY_B)}
        sets = rfc_sets(9, 10)
        with PipelineModule(lib, tracker=tracker) as pipe:
            parents = [
                psutil.Process(s.remote_pid or 0).ppid() for s in pipe._fleet.stage_sessions()
            ]
            assert parents[0] in on_a
            assert parents[1] in on_b
            assert parents[2] in on_a
            assert parents[0] != parents[2]  # two sessions, two workers
            for inputs in sets:
                set_all(pipe, inputs)
                pipe.run()
            for inputs in sets:
                check_rfc(pipe.get_output(timeout=WAIT_S), inputs)
            worker = pipe.stats()["stages"]["mod2"]["worker"]
            assert KEY_B in worker
        # the sessions ended: the workers are free again at the tracker
        wait_for_free_servers(tracker, KEY_A, 2, timeout=20)
        wait_for_free_servers(tracker, KEY_B, 1, timeout=20)
    finally:
        lib.close()


def test_large_tensors_from_several_threads() -> None:
    """1 MiB tensors (ZeroMQ's zero-copy path) submitted from four threads at once."""
    lib = build(_rfc_config((256, 1024)))
    rng = np.random.default_rng(16)
    sets = [
        {name: rng.standard_normal((256, 1024)).astype("float32") for name in RFC_NAMES}
        for _ in range(40)
    ]
    try:
        with PipelineModule(lib) as pipe:

            def submit_every_fourth(first: int) -> list[Future[list[np.ndarray]]]:
                return [pipe.submit(inputs) for inputs in sets[first::4]]

            with ThreadPoolExecutor(4) as pool:
                batches = list(pool.map(submit_every_fourth, range(4)))
            for first, futures in enumerate(batches):
                for inputs, future in zip(sets[first::4], futures, strict=True):
                    check_rfc(future.result(WAIT_S), inputs)
            stats = pipe.stats()
        assert stats["client"]["launched"] == len(sets)
        assert stats["stages"]["mod1"]["bytes_in"] >= len(sets) * 2 * 256 * 1024 * 4
    finally:
        lib.close()


# ----- failures on one input


def test_stage_failure_on_one_input(failing_lib: PipelineLibrary) -> None:
    values = [np.full((1, 4), i, dtype="float32") for i in range(1, 10)]
    bad = 6
    values[bad][0, 0] = -FAIL_MARKER  # negated by the first stage: the checker sees the marker
    with PipelineModule(failing_lib) as pipe:
        for value in values:
            pipe.set_input("data_0", value)
            pipe.run()
        for i, value in enumerate(values):
            if i != bad:
                out = pipe.get_output(timeout=WAIT_S)
                np.testing.assert_allclose(out[0], value * 2)
                continue
            with pytest.raises(StageError) as info:
                pipe.get_output(timeout=WAIT_S)
            err = info.value
            assert err.stage == "checker"
            assert err.seq == bad
            assert err.error_type == "ValueError"
            assert f"marker value {FAIL_MARKER}" in err.remote_message
            assert "fail_on_marker" in err.traceback_text
            assert "raise ValueError" in err.traceback_text
            text = str(err)
            assert "'checker'" in text and "ValueError" in text and "marker value" in text
            assert "fail_on_marker" in text
        assert pipe.get_output() == []
        # futures carry the error too, and the inputs around it go on
        futures = [pipe.submit({"data_0": v}) for v in (values[0], values[bad], values[2])]
        np.testing.assert_allclose(futures[0].result(WAIT_S)[0], values[0] * 2)
        error = futures[1].exception(WAIT_S)
        assert isinstance(error, StageError)
        assert error.stage == "checker" and error.error_type == "ValueError"
        np.testing.assert_allclose(futures[2].result(WAIT_S)[0], values[2] * 2)
        stats = pipe.stats()["stages"]
        assert stats["checker"]["failed"] == 2
        assert stats["checker"]["processed"] == len(values) + 3 - 2


# ----- beyond the RFC


def test_submit_map_and_stats(rfc_lib: PipelineLibrary) -> None:
    (single,) = rfc_sets(10, 1)
    sets = rfc_sets(11, 50)
    consumed = 0

    def feed() -> Iterator[dict[str, np.ndarray]]:
        nonlocal consumed
        for inputs in sets:
            consumed += 1
            yield inputs

    with PipelineModule(rfc_lib) as pipe:
        future = pipe.submit(single)
        assert isinstance(future, Future)
        check_rfc(future.result(WAIT_S), single)
        results = pipe.map(feed(), window=4)
        first = next(results)
        assert consumed <= 5  # at most window + 1 taken before the first result is handed out
        outs = [first, *results]
        assert consumed == len(sets)
        for inputs, out in zip(sets, outs, strict=True):
            check_rfc(out, inputs)
        total = len(sets) + 1
        deadline = time.monotonic() + WAIT_S
        stats = pipe.stats()
        while any(s["sent"] < total for s in stats["stages"].values()):
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
            stats = pipe.stats()
    assert set(stats["stages"]) == {"mod1", "mod2", "mod3"}
    for name, stage in stats["stages"].items():
        assert stage["received"] == stage["processed"] == stage["sent"] == total, name
        assert stage["failed"] == 0
        for depth in ("send_queue", "queued_bytes", "pending_joins"):
            assert stage[depth] == 0, (name, depth)
        assert stage["service_mean_s"] > 0
        assert stage["service_p99_s"] > 0
        assert stage["bytes_in"] > 0 and stage["bytes_out"] > 0
        assert stage["device"] == "cpu"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", stage["worker"])
    # mod1 received two float32[1, 4] tensors per input, mod3 one from the client, one from mod2
    assert stats["stages"]["mod1"]["bytes_in"] >= total * 2 * 16
    assert stats["stages"]["mod3"]["bytes_in"] >= total * 2 * 16
    assert stats["client"]["launched"] == total
    assert stats["client"]["in_flight"] == 0


def test_set_params_of_a_parameter_group(weighted_lib: PipelineLibrary) -> None:
    rng = np.random.default_rng(12)
    xs = [rng.standard_normal((1, 4)).astype("float32") for _ in range(6)]
    with PipelineModule(weighted_lib) as pipe:
        for x in xs[:3]:
            pipe.set_input("data_0", x)
            pipe.run()
        for x in xs[:3]:
            np.testing.assert_allclose(
                pipe.get_output(timeout=WAIT_S)[0], weighted_reference(x, W0), rtol=1e-6
            )
        pipe.set_params("g", {"w": W1})
        for x in xs[3:]:
            pipe.set_input("data_0", x)
            pipe.run()
        for x in xs[3:]:
            np.testing.assert_allclose(
                pipe.get_output(timeout=WAIT_S)[0], weighted_reference(x, W1), rtol=1e-6
            )
        with pytest.raises(InputError, match=r"'v'.*\['w'\]"):
            pipe.set_params("g", {"v": W0})
        with pytest.raises(InputError, match=r"w expects float32\[1, 4\].*\[1, 5\]"):
            pipe.set_params("g", {"w": np.zeros((1, 5), dtype="float32")})
        with pytest.raises(InputError, match=r"w expects float32"):
            pipe.set_params("g", {"w": W0.astype("float64")})
        with pytest.raises(KeyError, match="nope"):
            pipe.set_params("nope", {"w": W0})
        # the refused calls changed nothing: still W1
        out = pipe.submit({"data_0": xs[0]}).result(WAIT_S)
        np.testing.assert_allclose(out[0], weighted_reference(xs[0], W1), rtol=1e-6)


# ----- lifetime


def test_close_leaves_nothing_and_refuses_reuse(rfc_lib: PipelineLibrary) -> None:
    (inputs,) = rfc_sets(13, 1)
    with PipelineModule(rfc_lib) as pipe:
        workers = [w.process.pid for w in pipe._fleet.local_workers]
        sessions = [s.remote_pid for s in pipe._fleet.stage_sessions()]
        assert len(workers) == 3 and all(sessions)
        set_all(pipe, inputs)
        pipe.run()
        check_rfc(pipe.get_output(timeout=WAIT_S), inputs)
    # leaving the with block closed it: workers and their session processes are gone
    assert wait_gone(workers + [p for p in sessions if p]) == []
    for call in (
        lambda: pipe.set_input("data_0", inputs["data_0"]),
        pipe.run,
        pipe.get_output,
        lambda: pipe.get_output(timeout=1.0),
        lambda: pipe.submit(inputs),
        lambda: list(pipe.map([inputs])),
        lambda: pipe.set_params("g", {}),
        pipe.stats,
    ):
        with pytest.raises(PipelineClosedError):
            call()
    pipe.close()  # twice is fine
    pipe.close()


def test_close_with_work_in_flight(slow_lib: PipelineLibrary) -> None:
    pipe = PipelineModule(slow_lib)
    pids = [w.process.pid for w in pipe._fleet.local_workers]
    future = pipe.submit({"seconds": np.array([0.5], dtype="float32")})
    pipe.set_input("seconds", np.array([0.5], dtype="float32"))
    pipe.run()
    started = time.monotonic()
    pipe.close()
    assert time.monotonic() - started < 15
    assert isinstance(future.exception(WAIT_S), PipelineClosedError)
    with pytest.raises(PipelineClosedError):
        pipe.get_output()
    assert wait_gone(pids) == []


def test_lambda_or_closure_refused_at_config_time() -> None:
    mod = unary_module()

    cfg = PipelineModuleConfig()
    with pytest.raises(ConfigError, match="lambda"):
        cfg.connect(mod, 0, lambda data: data, "data")

    def make_scaler(factor: float):  # type: ignore[no-untyped-def]
        def scale(data):  # type: ignore[no-untyped-def]
            return data * factor

        return scale

    with pytest.raises(ConfigError, match="closure"):
        cfg.connect(mod, 0, make_scaler(2.0), "data")
    with pytest.raises(ValueError, match="lambda"):
        cfg.inputs["x"] = (lambda data: data, "data")
    assert len(cfg.connections) == 0 and len(cfg.inputs) == 0


SCRIPT = """\
import json, sys, time
from tvmpipe.orchestrator import PipelineModule
pipe = PipelineModule(sys.argv[1])
print(json.dumps({
    "workers": [w.process.pid for w in pipe._fleet.local_workers],
    "sessions": [s.remote_pid for s in pipe._fleet.stage_sessions()],
}), flush=True)
time.sleep(600)
"""


def test_local_workers_exit_when_the_user_process_dies(tmp_path: Path) -> None:
    first, second = unary_module("negative"), unary_module("exp")
    cfg = PipelineModuleConfig()
    cfg.inputs["data_0"] = (first, "data_0")
    cfg.connect(first, 0, second, "data_0")
    cfg.outputs.append((second, 0))
    lib = build(cfg)
    try:
        package = lib.export_library(tmp_path / "pkg")
    finally:
        lib.close()
    script = tmp_path / "user.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(package)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + 60
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while not line and time.monotonic() < deadline and proc.poll() is None:
                if selector.select(timeout=0.1):
                    line = proc.stdout.readline()
        assert line, "the user script printed no pids"
        pids = json.loads(line)
        assert len(pids["workers"]) == 2 and len(pids["sessions"]) == 2
        every = pids["workers"] + pids["sessions"]
        assert all(not gone(p) for p in every), "the stages should be running"
        proc.kill()
        proc.wait(10)
        assert wait_gone(every, timeout=10) == [], "stage processes outlived the user process"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.skipif(tvm.cuda(0).exist, reason="this machine has a CUDA device")
def test_missing_device_is_a_deploy_error() -> None:
    mod = unary_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["data_0"] = (mod, "data_0")
    cfg.outputs.append((mod, 0))
    cfg[mod].device = "cuda"
    lib = build(cfg)
    try:
        with pytest.raises(DeployError) as info:
            PipelineModule(lib)
    finally:
        lib.close()
    message = str(info.value)
    assert "'mod1'" in message
    assert "'cuda'" in message
    assert re.search(r"worker 127\.0\.0\.1:\d+", message), message
    assert "cpu" in message  # what the worker has
    # the failed deploy stopped the worker it had started
    assert wait_gone([p.pid for p in forks.children()]) == []


# ----- regressions: bugs these tests found


@pytest.fixture(scope="module")
def none_lib() -> Iterator[PipelineLibrary]:
    """One Python stage that returns None (not a tensor) on FAIL_MARKER."""
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (none_on_marker, "data")
    cfg.outputs.append((none_on_marker, 0))
    cfg[none_on_marker].name = "forgetful"
    lib = build(cfg)
    yield lib
    lib.close()


def test_stage_output_that_cannot_travel_fails_only_that_input(none_lib: PipelineLibrary) -> None:
    values = [np.full((1, 4), v, dtype="float32") for v in (1.0, FAIL_MARKER, 3.0)]
    with PipelineModule(none_lib) as pipe:
        for value in values:
            pipe.set_input("data", value)
            pipe.run()
        np.testing.assert_allclose(pipe.get_output(timeout=WAIT_S)[0], values[0] * 2)
        with pytest.raises(StageError) as info:
            pipe.get_output(timeout=3.0)
        assert info.value.stage == "forgetful"
        np.testing.assert_allclose(pipe.get_output(timeout=3.0)[0], values[2] * 2)


def test_set_input_queues_a_snapshot_of_the_value(rfc_lib: PipelineLibrary) -> None:
    (inputs,) = rfc_sets(14, 1)
    buffers = {name: value.copy() for name, value in inputs.items()}
    with PipelineModule(rfc_lib) as pipe:
        set_all(pipe, buffers)
        for buffer in buffers.values():
            buffer[:] = 100.0  # a caller reusing its buffer for the next frame
        pipe.run()
        check_rfc(pipe.get_output(timeout=WAIT_S), inputs)


def test_run_refused_by_a_full_window_keeps_the_input_set(slow_lib: PipelineLibrary) -> None:
    with PipelineModule(slow_lib, window=1, timeout=0.3) as pipe:
        pipe.set_input("seconds", np.array([0.5], dtype="float32"))
        pipe.run()
        pipe.set_input("seconds", np.array([0.0], dtype="float32"))
        with pytest.raises(BackpressureTimeout):
            pipe.run()  # the window (1) is full for longer than the timeout
        np.testing.assert_array_equal(pipe.get_output(timeout=WAIT_S)[0], [0.5])
        pipe.run()  # room now: the refused set is still the oldest complete one
        np.testing.assert_array_equal(pipe.get_output(timeout=WAIT_S)[0], [0.0])
