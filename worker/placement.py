"""Pin the thread that runs a stage, and TVM's thread pool under it, to the stage's cores.

TVM's thread pool is per thread (ThreadPool::ThreadLocal), so this runs in the compute thread
itself, before its first kernel.

A pool's worker threads busy-wait (300,000 ``sched_yield`` calls) when made and after every
parallel kernel before they sleep: about 0.36 s of a core each time on an idle 2-core VM, and
longer the busier the machine is. Stages that share cores would take that time from each
other, so a stage without cores of its own does not spin (``TVM_THREAD_POOL_SPIN_COUNT=0``,
unless the user set it); a Python stage makes no pool at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import tvm

_SHARE_ALL_CORES = -3  # ThreadGroup::kSpecifyThreadShareAllCore
SPIN_VARIABLE = "TVM_THREAD_POOL_SPIN_COUNT"
_PR_SET_NAME = 15  # linux/prctl.h


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


def pin_current_thread(
    cpu_affinity: str | None, num_threads: int | None, tvm_pool: bool = True
) -> dict[str, object]:
    """Size TVM's pool for this thread and let it float over the stage's cores.

    Left alone, TVM's one-thread pool pins its calling thread to core 0, so every stage of a
    pipeline on one machine would share core 0. By default a stage may use every core this
    worker may use, with TVM's own default thread count (half the cores on x86, at least one).
    ``tvm_pool=False`` (a Python stage): only the cores are set.
    """
    available = sorted(os.sched_getaffinity(0))
    cores = parse_cores(cpu_affinity) if cpu_affinity else available
    threads = num_threads or (len(cores) if cpu_affinity else max(1, len(available) // 2))
    os.sched_setaffinity(0, cores)
    if not tvm_pool:
        return {"cores": sorted(os.sched_getaffinity(0)), "threads": 0}
    os.environ["TVM_NUM_THREADS"] = str(threads)
    if not cpu_affinity:  # read once, when the process's first pool thread starts
        os.environ.setdefault(SPIN_VARIABLE, "0")
    config = tvm.get_global_func("runtime.config_threadpool")
    config(_SHARE_ALL_CORES, threads, [str(c) for c in cores])
    return {"cores": sorted(os.sched_getaffinity(0)), "threads": threads}


def name_os_thread(label: str) -> None:
    """Name the calling thread as the OS sees it (``top -H``, ``perf``, ``/proc``), where
    CPython 3.11 leaves every thread "python"; threads it starts inherit the name."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, f"tvmpipe-{label}"[:15].encode(), 0, 0, 0)
