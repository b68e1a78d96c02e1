"""What every ``tvmpipe bench`` comparison shares: its settings, its result rows, medians.

A comparison measures tvmpipe and its baseline in the same run, alternating the two sides
repetition by repetition so that a neighbour's noise falls on both, and reports medians.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tvmpipe.worker.placement import pin_current_thread

from .client import PipelineModule

T = TypeVar("T")

# Pause after deploying a pipeline, before measuring it: each stage's compute thread sizes TVM's
# thread pool as it starts, and a pool worker then spins (sched_yield) for about 0.15 s of CPU.
SETTLE_S = 1.0


@dataclass(frozen=True)
class Settings:
    """``reps`` repetitions per figure; ``quick`` shrinks streams to a smoke test's size."""

    reps: int = 5
    quick: bool = False

    def count(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def settle(self) -> None:
        """Let a pipeline that just started settle before it is timed (not in a smoke test)."""
        if not self.quick:
            time.sleep(SETTLE_S)


@dataclass
class Row:
    """One line of the table: tvmpipe's figure, its baseline's, and the target on their ratio.

    ``ratio`` is tvmpipe / baseline; ``higher_is_better`` says which way the target points.
    """

    comparison: str
    metric: str
    unit: str
    tvmpipe: float
    baseline: float
    baseline_label: str
    higher_is_better: bool = True
    target: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.tvmpipe / self.baseline if self.baseline else float("nan")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "comparison": self.comparison,
            "metric": self.metric,
            "unit": self.unit,
            "tvmpipe": self.tvmpipe,
            "baseline": self.baseline,
            "baseline_label": self.baseline_label,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "met": self.met,
            "samples": self.samples,
            "note": self.note,
        }


def alternate(
    reps: int, sides: dict[str, Callable[[], float]]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Run each side once per repetition, in turn; the median of each side, and the samples."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, measure in sides.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}, samples


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def steady_rate(done_at: Sequence[float], skip: int) -> float:
    """Items per second between the completion of item ``skip`` and the last one.

    Leaves out the pipeline's fill (the first items wait for every stage once), which a
    short stream would otherwise charge to throughput.
    """
    if len(done_at) <= skip + 1:
        raise ValueError(f"need more than {skip + 1} completions, got {len(done_at)}")
    return (len(done_at) - 1 - skip) / (done_at[-1] - done_at[skip])


def stream_rate(
    pipe: PipelineModule, inputs: Sequence[Mapping[str, Any]], window: int, skip: int
) -> float:
    """Steady results per second of ``pipe.map`` over ``inputs`` with ``window`` in flight."""
    done_at = []
    for _ in pipe.map(inputs, window=window):
        done_at.append(time.perf_counter())
    return steady_rate(done_at, skip)


def in_fresh_thread(func: Callable[[], T], threads: int, cores: str | None = None) -> T:
    """``func()`` in a new thread whose TVM pool has ``threads`` threads over ``cores``.

    TVM's thread pool belongs to the thread that first uses it, and a one-thread pool pins
    that thread to core 0 unless configured first; a fresh, configured thread leaves this
    process's own threads alone. ``cores`` defaults to every core this process may use.
    """
    result: dict[str, Any] = {}
    saved = os.environ.get("TVM_NUM_THREADS")

    def work() -> None:
        try:
            pin_current_thread(
                cores or ",".join(map(str, sorted(os.sched_getaffinity(0)))), threads
            )
            result["value"] = func()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=work, name="tvmpipe-bench-local")
    try:
        thread.start()
        thread.join()
    finally:  # pin_current_thread sets it for the thread pools this process creates later
        if saved is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = saved
    if "error" in result:
        raise result["error"]
    value: T = result["value"]
    return value
