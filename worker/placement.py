"""Pin the thread that runs a stage, and TVM's thread pool under it, to the stage's cores.

TVM's thread pool is per thread (ThreadPool::ThreadLocal), so this runs in the compute thread
itself, before its first kernel.
"""

from __future__ import annotations

import os

import tvm

_SHARE_ALL_CORES = -3  # ThreadGroup::kSpecifyThreadShareAllCore


def parse_cores(spec: str) -> list[int]:
    """'0', '0-3', '0,2' -> core ids."""
    cores: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cores.extend(range(int(first), int(last or first) + 1))
    return cores


def check_cores(cpu_affinity: str | None) -> None:
    """Refuse cores this machine (or this worker's own affinity) does not offer."""
    if not cpu_affinity:
        return
    available = os.sched_getaffinity(0)
    missing = [c for c in parse_cores(cpu_affinity) if c not in available]
    if missing:
        raise ValueError(
            f"cpu_affinity {cpu_affinity!r} names cores {missing} that this worker lacks "
            f"(it may use {sorted(available)})"
        )


def pin_current_thread(cpu_affinity: str | None, num_threads: int | None) -> dict[str, object]:
    """Restrict this thread to the stage's cores and size TVM's pool; report what took effect."""
    cores = parse_cores(cpu_affinity) if cpu_affinity else []
    threads = num_threads or len(cores)
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    if cores:
        os.sched_setaffinity(0, cores)
        config = tvm.get_global_func("runtime.config_threadpool")
        config(_SHARE_ALL_CORES, threads, [str(c) for c in cores])
    return {
        "cores": sorted(os.sched_getaffinity(0)),
        "threads": int(tvm.get_global_func("runtime.NumThreads")()),
    }
