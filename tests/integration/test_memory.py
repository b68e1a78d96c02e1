"""A producer much faster than the stages keeps the memory of every process flat.

Two Python stages sleep 1 ms each; a producer thread calls ``set_input`` + ``run`` as fast as
the window lets it, and the main thread takes the results and checks each one. The RSS of this
process and of every worker and session process is sampled as results arrive; after a warm-up,
no process may grow by more than GROWTH_LIMIT_MIB. ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
from modules import pause_then_double, pause_then_increment

from tvmpipe.orchestrator import PipelineLibrary, PipelineModule, PipelineModuleConfig, forks

from .conftest import build

INPUTS = 5000
WARMUP = 500  # results taken before the baseline: buffers, queues and the window have filled
ELEMENTS = 1 << 18  # float32: 1 MiB per input
WINDOW = 32  # inputs in flight: 32 MiB that the client may hold in any case
SAMPLE_EVERY = 25  # results
GROWTH_LIMIT_MIB = 64.0
WAIT_S = 30.0
MIB = 1 << 20


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    """data -> data + 1 -> (data + 1) * 2, each stage sleeping 1 ms."""
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (pause_then_increment, "data")
    cfg.connect(pause_then_increment, 0, pause_then_double, "data")
    cfg.outputs.append((pause_then_double, 0))
    built = build(cfg)
    yield built
    built.close()


def _processes() -> dict[psutil.Process, str]:
    """This process and all its descendants (workers and their session processes), by role."""
    roles = {psutil.Process(): "client"}
    for worker in forks.children():  # started by this process or by its fork server
        roles[worker] = "worker"
        with contextlib.suppress(psutil.Error):
            roles.update((session, "session") for session in worker.children(recursive=True))
    return roles


def _rss_mib(proc: psutil.Process) -> float:
    try:
        return float(proc.memory_info().rss) / MIB
    except psutil.Error:
        return float("nan")  # it exited: the leak check will name it


def _produce(pipe: PipelineModule, errors: list[BaseException]) -> None:
    """Input i is a 1 MiB tensor of the value i; only the window slows this loop down."""
    try:
        for i in range(INPUTS):
            pipe.set_input("data", np.full(ELEMENTS, i, dtype="float32"))
            pipe.run()
    except BaseException as exc:  # handed to the main thread
        errors.append(exc)


def _next_result(pipe: PipelineModule, errors: list[BaseException]) -> list[np.ndarray]:
    """get_output returns [] at once while nothing is launched: the producer may lag behind."""
    deadline = time.monotonic() + WAIT_S
    while not errors and time.monotonic() < deadline:
        out = pipe.get_output(timeout=0.1)
        if out:
            return out
        time.sleep(0.001)
    return []


@pytest.mark.timeout(180)
def test_fast_producer_keeps_memory_flat(lib: PipelineLibrary) -> None:
    errors: list[BaseException] = []
    samples: dict[psutil.Process, list[float]] = {}
    in_flight: list[int] = []
    with PipelineModule(lib, window=WINDOW) as pipe:
        roles = _processes()
        producer = threading.Thread(target=_produce, args=(pipe, errors), name="producer")
        producer.start()
        try:
            for i in range(INPUTS):
                out = _next_result(pipe, errors)
                assert out, f"result {i} did not come within {WAIT_S} s; producer: {errors}"
                (got,) = out
                expected = (i + 1) * 2  # in launch order: input i's result, not another's
                assert got.shape == (ELEMENTS,) and got.dtype == np.float32
                assert got[0] == expected and bool((got == expected).all()), f"result {i}"
                if (i >= WARMUP and (i - WARMUP) % SAMPLE_EVERY == 0) or i == INPUTS - 1:
                    for proc in roles:
                        samples.setdefault(proc, []).append(_rss_mib(proc))
                    in_flight.append(pipe.stats()["client"]["in_flight"])
            assert pipe.get_output() == []
            stages = pipe.stats()["stages"]
        finally:
            pipe.close()  # a producer still waiting for room gets PipelineClosedError
            producer.join(WAIT_S)
    assert not errors, f"the producer failed: {errors!r}"
    for name, data in stages.items():
        assert data["processed"] == data["sent"] == INPUTS, f"{name}: {data}"
        assert data["dropped"] == data["failed"] == 0, f"{name}: {data}"

    busy = f"median {statistics.median(in_flight):g}, max {max(in_flight)} (window {WINDOW})"
    print(f"\nRSS over {INPUTS} inputs of 1 MiB from input {WARMUP} on (in flight: {busy}), MiB:")
    growth = {}
    for proc, role in sorted(roles.items(), key=lambda item: (item[1], item[0].pid)):
        rss = samples[proc]
        start, peak, end = rss[0], max(rss), rss[-1]
        growth[f"{role} {proc.pid}"] = peak - start
        print(
            f"  {role:8} pid {proc.pid:>7}: start {start:7.1f}  peak {peak:7.1f}  "
            f"end {end:7.1f}  growth {peak - start:+6.1f}"
        )
    too_much = {who: round(g, 1) for who, g in growth.items() if not g < GROWTH_LIMIT_MIB}
    assert not too_much, f"RSS grew by more than {GROWTH_LIMIT_MIB} MiB: {too_much}"
