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
    """Size TVM's pool for this thread and let it float over the stage's cores.

    Left alone, TVM's one-thread pool pins its calling thread to core 0, so every stage of a
    pipeline on one machine would share core 0. By default a stage may use every core this
    worker may use, with TVM's own default thread count (half the cores on x86, at least one).
    """
    available = sorted(os.sched_getaffinity(0))
    cores = parse_cores(cpu_affinity) if cpu_affinity else available
    threads = num_threads or (len(cores) if cpu_affinity else max(1, len(available) // 2))
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.sched_setaffinity(0, cores)
    config = tvm.get_global_func("runtime.config_threadpool")
    config(_SHARE_ALL_CORES, threads, [str(c) for c in cores])
    return {"cores": sorted(os.sched_getaffinity(0)), "threads": threads}
