"""Comparison 5: what the pipeline adds to the latency of a single request.

One input at a time through a deployed pipeline (``submit(...).result()``) against
``lib.run_local`` (the same stages one after another in this process, one TVM thread, as each
stage has on its worker), and where the caller has one, against the same work done by plain
pyzmq processes (``raw``): what this machine's wake-ups and copies cost before tvmpipe adds
anything. Called by the comparisons that already have a pipeline deployed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .bench_common import Row, Settings, alternate, in_fresh_thread
from .client import PipelineModule
from .library import PipelineLibrary

NAME = "5 latency"


def pipeline_latency(pipe: PipelineModule, inputs: Sequence[Mapping[str, Any]]) -> float:
    """Median seconds from submit to result, one input in flight at a time."""
    times = []
    for item in inputs:
        start = time.perf_counter()
        pipe.submit(item).result(pipe.timeout)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def local_latency(lib: PipelineLibrary, inputs: Sequence[Mapping[str, Any]]) -> float:
    """Median seconds of ``run_local``, in a fresh one-thread TVM thread, after a warm-up."""

    def work() -> float:
        lib.run_local(inputs[0])
        times = []
        for item in inputs:
            start = time.perf_counter()
            lib.run_local(item)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    return in_fresh_thread(work, threads=1)


def raw_latency(
    request: Callable[[np.ndarray], np.ndarray], inputs: Sequence[Mapping[str, Any]]
) -> float:
    """Median seconds of ``request`` on each input's one tensor."""
    times = []
    for item in inputs:
        (array,) = item.values()
        start = time.perf_counter()
        request(array)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def latency_rows(
    what: str,
    pipe: PipelineModule,
    lib: PipelineLibrary,
    inputs: Sequence[Mapping[str, Any]],
    settings: Settings,
    counts: tuple[int, int],
    raw: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[Row]:
    """``counts``: single requests per repetition and side, in a full run and a quick one.
    ``raw``: one request through plain pyzmq processes doing the stages' work (one-tensor
    inputs only), a second row."""
    requests = [inputs[i % len(inputs)] for i in range(settings.count(*counts))]
    pipe.submit(requests[0]).result(pipe.timeout)  # warm-up
    sides: dict[str, Callable[[], float]] = {
        "tvmpipe": lambda: pipeline_latency(pipe, requests),
        "baseline": lambda: local_latency(lib, requests),
    }
    if raw is not None:
        raw(next(iter(requests[0].values())))  # warm-up
        sides["raw"] = lambda: raw_latency(raw, requests)
    medians, samples = alternate(settings.reps, sides)
    ms = {k: [x * 1e3 for x in v] for k, v in samples.items()}
    rows = [
        Row(
            NAME,
            f"{what}, one request at a time",
            "ms",
            medians["tvmpipe"] * 1e3,
            medians["baseline"] * 1e3,
            "run_local, 1 thread",
            higher_is_better=False,
            samples={k: ms[k] for k in ("tvmpipe", "baseline")},
            note=f"the pipeline adds {(medians['tvmpipe'] - medians['baseline']) * 1e3:.2f} ms",
        )
    ]
    if raw is not None:
        rows.append(
            Row(
                NAME,
                f"{what}, one request at a time",
                "ms",
                medians["tvmpipe"] * 1e3,
                medians["raw"] * 1e3,
                "raw pyzmq + numpy",
                higher_is_better=False,
                samples={"tvmpipe": ms["tvmpipe"], "baseline": ms["raw"]},
                note="the same hops and additions in plain pyzmq processes: this machine's floor",
            )
        )
    return rows
