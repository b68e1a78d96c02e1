"""Comparison 8: what the data plane's security costs, against the same pipeline with it off.

The same chains of identity Python stages as comparison 1 (client -> A -> B -> client on
loopback), deployed three times: ``security="off"``, the default (``"auto"``: every party
authenticated when it connects, PLAIN on loopback) and ``"encrypt"`` (CURVE on every socket,
the default on a network). Throughput streams 64 KiB and 1 MiB tensors with 8 in flight; the
latency of one hop A>B is the round trip through A and B less the one through A alone, as in
comparison 1. All sides alternate within each repetition. Shared memory is off
(``TVMPIPE_SHM=0``, for the workers this comparison starts too): between machines every byte
crosses the socket, and that is what the security modes cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np

from .bench_common import Row, Settings, alternate, median
from .bench_dataplane import WINDOW, identity_library, pipe_round_trip, pipe_stream
from .client import PipelineModule

NAME = "8 security"
SIZES = (("64 KiB", 64 << 10), ("1 MiB", 1 << 20))
STREAM = {"64 KiB": (1000, 100), "1 MiB": (300, 40)}  # full, quick
ROUND_TRIPS = (200, 40)
MODES = {"auto": "authenticated (default on loopback)", "encrypt": "encrypted (CURVE)"}
AUTH_TARGET = 0.98  # authenticating costs at most 2 % of throughput at 1 MiB


def _throughput(
    pipes: dict[str, PipelineModule], label: str, size: int, settings: Settings
) -> list[Row]:
    array = np.arange(size // 4, dtype=np.float32)
    count = settings.count(*STREAM[label])
    for pipe in pipes.values():
        pipe_stream(pipe, array, 2 * WINDOW)  # warm-up

    def rate(pipe: PipelineModule) -> Callable[[], float]:
        return lambda: size * count / pipe_stream(pipe, array, count) / 1e6

    sides = {mode: rate(pipe) for mode, pipe in pipes.items()}
    medians, samples = alternate(settings.reps, sides)
    return [
        Row(
            NAME,
            f"throughput {label}, {MODES[mode]}",
            "MB/s",
            medians[mode],
            medians["off"],
            "security off",
            target=AUTH_TARGET if mode == "auto" and size >= 1 << 20 else None,
            samples={"tvmpipe": samples[mode], "baseline": samples["off"]},
        )
        for mode in MODES
    ]


def _hop_latency(
    pairs: dict[str, tuple[PipelineModule, PipelineModule]], settings: Settings
) -> list[Row]:
    """One 4 KiB hop A>B: each mode's two round trips take turns with every other mode's."""
    small = np.arange(1024, dtype=np.float32)
    hops: dict[str, list[float]] = {mode: [] for mode in pairs}
    for rep in range(settings.reps + 1):  # the first is a warm-up
        times: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in pairs}
        for _ in range(settings.count(*ROUND_TRIPS) if rep else 20):
            for mode, (two, one) in pairs.items():
                times[mode][0].append(pipe_round_trip(two, small))
                times[mode][1].append(pipe_round_trip(one, small))
        if rep:
            for mode, (both, first) in times.items():
                hops[mode].append((median(both) - median(first)) * 1e6)
    return [
        Row(
            NAME,
            f"latency 4 KiB, one hop A>B, {MODES[mode]}",
            "us",
            median(hops[mode]),
            median(hops["off"]),
            "security off",
            higher_is_better=False,
            samples={"tvmpipe": hops[mode], "baseline": hops["off"]},
        )
        for mode in MODES
    ]


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run(settings: Settings) -> list[Row]:
    libs = (identity_library(2), identity_library(1))
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_environment("TVMPIPE_SHM", "0"))
            pairs = {
                mode: (
                    stack.enter_context(PipelineModule(libs[0], window=WINDOW, security=mode)),
                    stack.enter_context(PipelineModule(libs[1], security=mode)),
                )
                for mode in ("off", *MODES)
            }
            settings.settle()
            rows: list[Row] = []
            for label, size in SIZES:
                rows.extend(_throughput({m: p[0] for m, p in pairs.items()}, label, size, settings))
            rows.extend(_hop_latency(pairs, settings))
            return rows
    finally:
        for lib in libs:
            lib.close()
