"""Comparison 3: tvmpipe against driving the same stages by hand through tvm.rpc.

Three compiled stages whose compute is tiny next to moving their 1 MiB tensor (``data + k``)
run on the same three local ``tvmpipe-worker``\\ s (stock TVM RPC servers underneath) both
ways. By hand, as a TVM user does without tvmpipe: one RPC session per server, the stage's
``.so`` uploaded and loaded into a remote ``relax.VirtualMachine``, and for every input: copy
it to stage k's server, run, copy the result back, go on to stage k+1. A TVM RPC server
serves one session at a time, so each repetition opens its side's sessions and closes them
after its stream. The three modules run in this process (``run_local``) are shown beside.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax, rpc

from .bench_common import SETTLE_S, Row, Settings, alternate, in_fresh_thread, stream_rate
from .bench_dataplane import RawChain
from .bench_latency import latency_rows
from .build import build_pipeline
from .client import PipelineModule
from .config import PipelineModuleConfig
from .deploy import LocalWorker, start_local_workers
from .library import PipelineLibrary

NAME = "3 vs tvm.rpc by hand"
SHAPE = (256, 1024)  # float32: 1 MiB
STAGES = 3
TARGET = 20.0
WINDOW = 2 * STAGES
PIPELINE_INPUTS = (400, 40)  # per repetition: full, quick
BY_HAND_INPUTS = (20, 3)
LOCAL_INPUTS = (400, 40)
LATENCY_REQUESTS = (50, 5)


def const_add_module(shape: Sequence[int], value: float) -> Any:
    """``main(data) -> data + value`` over a float32 tensor: a stage whose compute is tiny."""
    bb = relax.BlockBuilder()
    data = relax.Var("data", relax.TensorType(list(shape), "float32"))
    with bb.function("main", [data]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(data, relax.const(value, "float32")))
        bb.emit_func_output(out)
    return bb.get()


def tiny_library() -> PipelineLibrary:
    """``data + 1``, ``+ 2``, ``+ 3`` on a 1 MiB float32 tensor, chained."""
    mods = [const_add_module(SHAPE, float(k + 1)) for k in range(STAGES)]
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (mods[0], "data")
    for src, dst in itertools.pairwise(mods):
        cfg.connect(src, 0, dst, "data")
    cfg.outputs.append((mods[-1], 0))
    with tvm.transform.PassContext(opt_level=3):
        return build_pipeline(cfg)


class ByHand:
    """The stages driven from this process through tvm.rpc, one session per server."""

    def __init__(self, lib: PipelineLibrary, workers: Sequence[LocalWorker]):
        self.stages: list[tuple[Any, Any]] = []
        self._remotes: list[Any] = []  # keep the sessions open as long as this object
        for stage, worker in zip(lib.stages, workers, strict=True):
            assert worker.port is not None
            remote = rpc.connect(worker.host, worker.port)
            self._remotes.append(remote)
            remote.upload(str(lib.artifact_path(stage)))
            dev = remote.cpu()
            vm = relax.VirtualMachine(remote.load_module(stage.artifact), dev)
            self.stages.append((dev, vm["main"]))

    def __call__(self, data: np.ndarray) -> np.ndarray:
        for dev, main in self.stages:
            data = main(tvm.runtime.tensor(data, dev)).numpy()
        return data

    def close(self) -> None:
        """Dropping the last references ends the sessions."""
        self.stages.clear()
        self._remotes.clear()


def by_hand_rate(lib: PipelineLibrary, workers: Sequence[LocalWorker], inputs: list[Any]) -> float:
    driver = ByHand(lib, workers)
    try:
        driver(inputs[0])  # warm-up
        start = time.perf_counter()
        for data in inputs:
            driver(data)
        return len(inputs) / (time.perf_counter() - start)
    finally:
        driver.close()


def pipeline_rate(
    lib: PipelineLibrary, workers: Sequence[LocalWorker], inputs: list[dict[str, Any]]
) -> float:
    servers = [f"{w.host}:{w.port}" for w in workers]
    with PipelineModule(lib, servers=servers, window=WINDOW) as pipe:
        time.sleep(SETTLE_S)
        stream_rate(pipe, inputs[:WINDOW], WINDOW, 0)  # warm-up
        return stream_rate(pipe, inputs, WINDOW, WINDOW)


def local_rate(lib: PipelineLibrary, inputs: list[dict[str, Any]]) -> float:
    def work() -> float:
        lib.run_local(inputs[0])
        start = time.perf_counter()
        for item in inputs:
            lib.run_local(item)
        return len(inputs) / (time.perf_counter() - start)

    return in_fresh_thread(work, threads=1)


def run(settings: Settings) -> list[Row]:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(8)]
    items = [{"data": arrays[i % len(arrays)]} for i in range(settings.count(*PIPELINE_INPUTS))]
    by_hand = [arrays[i % len(arrays)] for i in range(settings.count(*BY_HAND_INPUTS))]
    local = items[: settings.count(*LOCAL_INPUTS)]
    lib = tiny_library()
    workers = start_local_workers(STAGES)
    raw: RawChain | None = None
    try:
        medians, samples = alternate(
            settings.reps,
            {
                "tvmpipe": lambda: pipeline_rate(lib, workers, items),
                "baseline": lambda: by_hand_rate(lib, workers, by_hand),
                "local": lambda: local_rate(lib, local),
            },
        )
        servers = [f"{w.host}:{w.port}" for w in workers]
        with PipelineModule(lib, servers=servers, window=WINDOW) as pipe:
            raw = RawChain(STAGES, adds=tuple(float(k + 1) for k in range(STAGES)))
            settings.settle()
            latency = latency_rows(
                f"{STAGES} tiny stages, 1 MiB",
                pipe,
                lib,
                items,
                settings,
                LATENCY_REQUESTS,
                raw=raw.request,
            )
    finally:
        if raw is not None:
            raw.close()
        for worker in workers:
            worker.stop()
        lib.close()
    what = f"{STAGES} stages of data + k, 1 MiB float32"
    return [
        Row(
            NAME,
            f"{what}: throughput",
            "inputs/s",
            medians["tvmpipe"],
            medians["baseline"],
            "tvm.rpc by hand",
            target=TARGET,
            samples={k: samples[k] for k in ("tvmpipe", "baseline")},
        ),
        Row(
            NAME,
            f"{what}: throughput",
            "inputs/s",
            medians["tvmpipe"],
            medians["local"],
            "one process, 1 thread",
            samples={k: samples[k] for k in ("tvmpipe", "local")},
            note="the three modules run in this process: no data moves",
        ),
        *latency,
    ]
