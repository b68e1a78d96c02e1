"""Comparison 5: what the pipeline adds to the latency of a single request.

One input at a time through a deployed pipeline (``submit(...).result()``) against
``lib.run_local`` (the same stages one after another in this process, one TVM thread, as each
stage has on its worker). Called by the comparisons that already have a pipeline deployed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
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


def latency_row(
    what: str,
    pipe: PipelineModule,
    lib: PipelineLibrary,
    inputs: Sequence[Mapping[str, Any]],
    settings: Settings,
    counts: tuple[int, int],
) -> Row:
    """``counts``: single requests per repetition and side, in a full run and a quick one."""
    requests = [inputs[i % len(inputs)] for i in range(settings.count(*counts))]
    pipe.submit(requests[0]).result(pipe.timeout)  # warm-up
    medians, samples = alternate(
        settings.reps,
        {
            "tvmpipe": lambda: pipeline_latency(pipe, requests),
            "baseline": lambda: local_latency(lib, requests),
        },
    )
    return Row(
        NAME,
        f"{what}, one request at a time",
        "ms",
        medians["tvmpipe"] * 1e3,
        medians["baseline"] * 1e3,
        "run_local, 1 thread",
        higher_is_better=False,
        samples={k: [x * 1e3 for x in v] for k, v in samples.items()},
        note=f"the pipeline adds {(medians['tvmpipe'] - medians['baseline']) * 1e3:.2f} ms",
    )
