"""Comparison 1: tvmpipe's data plane against raw pyzmq, in the same process layout.

Both sides stream the same tensors client -> process A -> process B -> client over loopback
TCP: tvmpipe through two identity Python stages on two ``tvmpipe-worker``\\ s, driven by a
PipelineModule; the baseline through two plain pyzmq forwarder processes (bench_forward.py),
driven by bare PUSH/PULL sockets in this process. Throughput is a stream of tensors with the
same number in flight on both sides; at 1 MiB the CPU time (user and system, every thread) that
the two forwarding processes spend per tensor is compared as well: raw pyzmq's is the floor that
this machine's kernel and ZeroMQ set for a hop. Latency is one tensor at a time: the full round trip
(three hops) on both sides, and one stage-to-stage hop alone, which is the round trip through
A and B less the round trip through A alone (the client's part cancels out on both sides).
The tvmpipe side lends its tensors (``copy=False``) as the raw side does: by default the client
copies every input, which costs more than a hop at 1 MiB (see ``PipelineModule.submit``).
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import zmq

from tvmpipe.proto.transport import local_endpoint

from .bench_common import Row, Settings, alternate, median
from .bench_stages import IDENTITY
from .build import build_pipeline
from .client import PipelineModule
from .config import PipelineModuleConfig
from .library import PipelineLibrary

FORWARDER = Path(__file__).with_name("bench_forward.py")
READY_TIMEOUT_S = 30.0
WINDOW = 8  # tensors in flight, both sides
SIZES = (("4 KiB", 4 << 10), ("1 MiB", 1 << 20), ("16 MiB", 16 << 20))
STREAM = {"4 KiB": (2000, 200), "1 MiB": (300, 40), "16 MiB": (30, 8)}  # full, quick
ROUND_TRIPS = (200, 40)
CPU_SIZE = 1 << 20  # the size whose CPU per hop is compared
THROUGHPUT_TARGET = 0.8
LATENCY_TARGET = 1.5  # the round trip, client included
HOP_TARGET = 1.3  # one stage-to-stage hop
NAME = "1 data plane"
RAW = "raw pyzmq"


class RawChain:
    """This process's PUSH -> ``forwarders`` processes in a chain -> this process's PULL."""

    def __init__(self, forwarders: int, adds: tuple[float, ...] = ()) -> None:
        """``adds``: each forwarder, last first, adds its K to the tensor (``--add``)."""
        self._context = zmq.Context()
        self._procs: list[subprocess.Popen[bytes]] = []
        self.pull = self._context.socket(zmq.PULL)
        self.push = self._context.socket(zmq.PUSH)
        # the transport tvmpipe uses on loopback (proto/transport.py), so that both sides pay
        # the same kernel
        self._dir = tempfile.mkdtemp(prefix="tvmpipe-raw-") if local_endpoint("127.0.0.1") else ""
        try:
            if self._dir:
                address = f"ipc://{self._dir}/client.sock"
                self.pull.bind(address)
            else:
                address = f"tcp://127.0.0.1:{self.pull.bind_to_random_port('tcp://127.0.0.1')}"
            for index in range(forwarders):
                address = self._spawn(address, adds[index] if adds else None)
            self.push.connect(address)
        except BaseException:
            self.close()
            raise

    def _spawn(self, downstream: str, add: float | None) -> str:
        bind = [f"ipc://{self._dir}/{len(self._procs)}.sock"] if self._dir else []
        extra = ["--add", str(add)] if add is not None else []
        proc = subprocess.Popen(
            [sys.executable, str(FORWARDER), downstream, *bind, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._procs.append(proc)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout=READY_TIMEOUT_S)
        line = proc.stdout.readline().decode() if ready else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"the raw forwarder did not start (exit code {proc.poll()})")
        return line.split()[1]

    def stream(self, array: np.ndarray, count: int) -> float:
        """Seconds to pass ``count`` tensors through, ``WINDOW`` in flight."""
        sent = received = 0
        start = time.perf_counter()
        while received < count:
            if sent < count and sent - received < WINDOW:
                self.push.send_multipart([struct.pack("<Q", sent), array.data], copy=False)
                sent += 1
            else:
                frames = self.pull.recv_multipart(copy=False)
                np.frombuffer(frames[1].buffer, dtype=array.dtype)
                received += 1
        return time.perf_counter() - start

    def round_trip(self, array: np.ndarray) -> float:
        start = time.perf_counter()
        self.push.send_multipart([struct.pack("<Q", 0), array.data], copy=False)
        frames = self.pull.recv_multipart(copy=False)
        np.frombuffer(frames[1].buffer, dtype=array.dtype)
        return time.perf_counter() - start

    def request(self, array: np.ndarray) -> np.ndarray:
        """One tensor through the chain and back, copied on the way out as ``set_input``
        copies: the caller may reuse its buffer at once."""
        self.push.send_multipart([struct.pack("<Q", 0), array.data], copy=True)
        frames = self.pull.recv_multipart(copy=False)
        return np.frombuffer(frames[1].buffer, dtype=array.dtype).reshape(array.shape)

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def close(self) -> None:
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self._context.term()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        for proc in self._procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs = []


def identity_library(stages: int) -> PipelineLibrary:
    """Identity Python stages in a chain: the pipeline costs only its data plane."""
    chain = IDENTITY[:stages]
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (chain[0], "data")
    for src, dst in itertools.pairwise(chain):
        cfg.connect(src, 0, dst, "data")
    cfg.outputs.append((chain[-1], 0))
    return build_pipeline(cfg)


def pipe_stream(pipe: PipelineModule, array: np.ndarray, count: int) -> float:
    start = time.perf_counter()
    for _ in pipe.map(({"data": array} for _ in range(count)), window=WINDOW, copy=False):
        pass
    return time.perf_counter() - start


def pipe_round_trip(pipe: PipelineModule, array: np.ndarray) -> float:
    start = time.perf_counter()
    pipe.submit({"data": array}, copy=False).result(pipe.timeout)
    return time.perf_counter() - start


def throughput_row(
    label: str, size: int, pipe: PipelineModule, raw: RawChain, settings: Settings
) -> list[Row]:
    """Throughput at one size; at 1 MiB also each side's CPU per forwarding process and tensor."""
    array = np.arange(size // 4, dtype=np.float32)
    count = settings.count(*STREAM[label])
    pipe_stream(pipe, array, 2 * WINDOW)  # warm-up
    raw.stream(array, 2 * WINDOW)
    stages = [s["pid"] for s in pipe.stats()["stages"].values()]
    cpu: dict[str, list[float]] = {"tvmpipe": [], "baseline": []}

    def timed(side: str, pids: list[int], stream: Callable[[], float]) -> float:
        before = cpu_s(pids)
        seconds = stream()
        cpu[side].append((cpu_s(pids) - before) / len(pids) / count * 1e3)
        return size * count / seconds / 1e6

    medians, samples = alternate(
        settings.reps,
        {
            "tvmpipe": lambda: timed("tvmpipe", stages, lambda: pipe_stream(pipe, array, count)),
            "baseline": lambda: timed("baseline", raw.pids(), lambda: raw.stream(array, count)),
        },
    )
    per_s = {k: v * 1e6 / size for k, v in medians.items()}
    rows = [
        Row(
            NAME,
            f"throughput {label}, {WINDOW} in flight",
            "MB/s",
            medians["tvmpipe"],
            medians["baseline"],
            RAW,
            target=THROUGHPUT_TARGET if size >= (1 << 20) else None,
            samples=samples,
            note=f"{per_s['tvmpipe']:.0f} vs {per_s['baseline']:.0f} tensors/s",
        )
    ]
    if size == CPU_SIZE:
        rows.append(
            Row(
                NAME,
                f"CPU per forwarding process per {label} tensor (user + system)",
                "ms",
                median(cpu["tvmpipe"]),
                median(cpu["baseline"]),
                f"{RAW} forwarder",
                higher_is_better=False,
                samples=cpu,
                note="every thread of each of the two processes (psutil), over the stream: "
                "raw pyzmq's is this machine's floor for a hop",
            )
        )
    return rows


def cpu_s(pids: list[int]) -> float:
    """User and system CPU seconds of these processes, every thread."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def latency_rows(
    pipes: tuple[PipelineModule, PipelineModule],
    raws: tuple[RawChain, RawChain],
    settings: Settings,
) -> list[Row]:
    """``pipes`` and ``raws``: through A and B, and through A alone.

    The four round trips take turns one by one, so that a neighbour's burst of work falls on
    all four alike; each repetition keeps the median of each.
    """
    small = np.arange(SIZES[0][1] // 4, dtype=np.float32)
    trips: dict[str, Callable[[], float]] = {
        "tvmpipe": lambda: pipe_round_trip(pipes[0], small),
        "tvmpipe first": lambda: pipe_round_trip(pipes[1], small),
        "baseline": lambda: raws[0].round_trip(small),
        "baseline first": lambda: raws[1].round_trip(small),
    }
    full: dict[str, list[float]] = {"tvmpipe": [], "baseline": []}
    hop: dict[str, list[float]] = {"tvmpipe": [], "baseline": []}
    for rep in range(settings.reps + 1):  # the first is a warm-up
        times: dict[str, list[float]] = {name: [] for name in trips}
        for _ in range(settings.count(*ROUND_TRIPS) if rep else 20):
            for name, trip in trips.items():
                times[name].append(trip())
        if rep:
            for side in full:
                both = median(times[side]) * 1e6
                full[side].append(both)
                hop[side].append(both - median(times[f"{side} first"]) * 1e6)
    # A hop is a difference of two round trips: on a busy machine the noise can exceed it, and
    # a repetition where either side's difference is not positive measured nothing.
    kept = [i for i in range(len(hop["tvmpipe"])) if min(hop[s][i] for s in hop) > 0]
    hop = {side: [values[i] for i in kept] for side, values in hop.items()}
    rows = [
        (
            "round trip client>A>B>client",
            full,
            "3 hops end to end; per hop: divide by 3",
            LATENCY_TARGET,
        )
    ]
    if kept:
        rows.append(
            ("one hop A>B", hop, "round trip through A and B less the one through A", HOP_TARGET)
        )
    else:
        print("(one hop A>B not resolved: the noise exceeded a hop)", end=" ", flush=True)
    return [
        Row(
            NAME,
            f"latency {SIZES[0][0]}, {what}",
            "us",
            median(values["tvmpipe"]),
            median(values["baseline"]),
            RAW,
            higher_is_better=False,
            target=target,
            samples=values,
            note=note,
        )
        for what, values, note, target in rows
    ]


def run(settings: Settings) -> list[Row]:
    rows: list[Row] = []
    libs = (identity_library(2), identity_library(1))
    raws: list[RawChain] = []
    try:
        raws.append(RawChain(2))
        raws.append(RawChain(1))
        with PipelineModule(libs[0], window=WINDOW) as two, PipelineModule(libs[1]) as one:
            settings.settle()
            for label, size in SIZES:
                rows.extend(throughput_row(label, size, two, raws[0], settings))
            rows.extend(latency_rows((two, one), (raws[0], raws[1]), settings))
    finally:
        for raw in raws:
            raw.close()
        for lib in libs:
            lib.close()
    return rows
