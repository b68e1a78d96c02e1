"""Comparison 2: orchestration efficiency, with stages that stand for accelerators.

Each stage is a Python function that sleeps ``busy_ms`` (the device is busy, the CPU is free)
and passes a 1 MiB tensor on. A chain of n such stages can at best finish one input every
``busy_ms``, whatever n is: the ideal throughput is 1 / busy_ms, and what falls short of it is
the orchestration's cost (data movement, hand-offs, waiting) on the stages' critical path.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import psutil

from .bench_common import Row, Settings, median, stream_rate
from .bench_stages import BUSY
from .build import build_pipeline
from .client import PipelineModule
from .config import PipelineModuleConfig
from .library import PipelineLibrary

NAME = "2 orchestration"
CHAINS = (2, 4, 8)
TENSOR_BYTES = 1 << 20
TARGET = 0.95
INPUTS = (100, 20)  # per repetition, after the window that fills the chain: full, quick
SLEEPS = 20
TRACED_CHAIN = 4
TRACE_TARGET = 0.97  # tracing may cost at most 3 % of throughput
CPU_TARGET_MS = 0.3  # a stage's CPU per 1 MiB input: receiving, decoding, encoding, sending


def busy_library(stages: int) -> PipelineLibrary:
    """``stages`` busy stages in a chain; every one passes ``data`` and ``busy_ms`` on."""
    chain = BUSY[:stages]
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (chain[0], "data")
    cfg.inputs["busy_ms"] = (chain[0], "busy_ms")
    for src, dst in itertools.pairwise(chain):
        cfg.connect(src, 0, dst, "data")
        cfg.connect(src, 1, dst, "busy_ms")
    cfg.outputs.append((chain[-1], 0))
    return build_pipeline(cfg)


def chain_rates(
    stages: int, item: dict[str, np.ndarray], settings: Settings, trace: bool = False
) -> tuple[list[float], list[float]]:
    """Steady inputs per second of a chain of ``stages``, once per repetition; and the CPU
    time (user and system, every thread) that its stage processes spent per input, in ms."""
    window = 2 * stages  # one input computing and one queued at every stage
    inputs = [item] * (window + settings.count(*INPUTS))
    lib = busy_library(stages)
    try:
        with PipelineModule(lib, window=window, trace=trace) as pipe:
            settings.settle()
            stream_rate(pipe, inputs[: 2 * window], window, 0)  # warm-up
            procs = [psutil.Process(s["pid"]) for s in pipe.stats()["stages"].values()]
            rates, cpu = [], []
            for _ in range(settings.reps):
                before = [_cpu_s(p) for p in procs]
                rates.append(stream_rate(pipe, inputs, window, window))
                spent = sum(_cpu_s(p) - b for p, b in zip(procs, before, strict=True))
                cpu.append(spent / len(procs) / len(inputs) * 1e3)
            return rates, cpu
    finally:
        lib.close()


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _sleep_ms(ms: float) -> float:
    start = time.perf_counter()
    time.sleep(ms / 1e3)
    return (time.perf_counter() - start) * 1e3


def run(settings: Settings, busy_ms: float) -> list[Row]:
    data = np.zeros(TENSOR_BYTES // 4, dtype=np.float32)
    item = {"data": data, "busy_ms": np.array([busy_ms], dtype=np.float32)}
    slept = median([_sleep_ms(busy_ms) for _ in range(SLEEPS)])
    ideal = 1e3 / slept  # a stage can go no faster than its sleep does on this machine
    rows = []
    cpu_rows = []
    for stages in CHAINS[:2] if settings.quick else CHAINS:
        rates, cpu = chain_rates(stages, item, settings)
        rows.append(
            Row(
                NAME,
                f"{stages} stages of {busy_ms:g} ms, 1 MiB between them",
                "inputs/s",
                median(rates),
                ideal,
                f"ideal 1/T = {ideal:.1f}/s",
                target=TARGET,
                samples={"tvmpipe": rates},
                note=f"window {2 * stages}; T is time.sleep({busy_ms:g} ms): {slept:.2f} ms here",
            )
        )
        cpu_rows.append(
            Row(
                NAME,
                f"{stages} stages: CPU per stage per 1 MiB input (user + system)",
                "ms",
                median(cpu),
                CPU_TARGET_MS,
                f"target {CPU_TARGET_MS:g} ms",
                higher_is_better=False,
                target=1.0,
                samples={"tvmpipe": cpu},
                note="every thread of each stage process (psutil), over the stream",
            )
        )
    rows.extend(cpu_rows)
    if settings.quick:  # the smoke test: each chain once is enough
        return rows
    traced, _ = chain_rates(TRACED_CHAIN, item, settings, trace=True)
    plain, _ = chain_rates(TRACED_CHAIN, item, settings)
    rows.append(
        Row(
            NAME,
            f"{TRACED_CHAIN} stages of {busy_ms:g} ms, tracing on vs off",
            "inputs/s",
            median(traced),
            median(plain),
            "tracing off",
            target=TRACE_TARGET,
            samples={"tvmpipe": traced, "baseline": plain},
            note="PipelineModule(trace=True): every stage and the client keep each input's times",
        )
    )
    return rows
