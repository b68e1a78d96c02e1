"""Comparison 6: the planned split on unequal simulated boards against the choices it replaces.

Three boards in network namespaces (deploy/netns/boards.py), each its own tracker key, of
unequal CPU quota, the slowest behind a slow link. For each model (from the ``onnx`` package,
seeded random weights) ``plan_pipeline`` measures the pieces, links and memory on the boards
and plans up to 3 stages; the planned pipeline is measured against:

- the best of an exhaustive sweep over a coarse grid: every 1..3 stage split at the cuts of
  ``candidate_cuts(mod, model.grid)`` on every ordered choice of distinct boards, each deployed and
  streamed once (one build per split; placements by cluster file). The best few are measured
  again beside the plan, alternating, so that its figure is not a lucky single run;
- cuts balanced by multiply-adds (macs.py), stage k on board k: what tvmpipe did before it
  measured;
- its own prediction: each stage's service time on its board against the planned compute time.

Measurements go to a fresh cache directory, so the plan is measured in this run, not read back.
ResNet50 runs only without --quick: its ~100 MB of weights cross the slow link at every deploy
onto the slow board, so its sweep takes far longer than SqueezeNet's. ``$TVMPIPE_BENCH_PLAN_MODELS``
(e.g. ``light_squeezenet``) runs only the models named.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import tvm

from .bench_common import SETTLE_S, Row, Settings, alternate, median, steady_rate
from .build import build_pipeline
from .client import PipelineModule
from .config import PipelineModuleConfig
from .library import PipelineLibrary
from .macs import balanced_cuts, binding_costs
from .measure import candidate_cuts
from .models import example_input, load_onnx_model
from .plan import Plan, plan_pipeline
from .split import split_module

NAME = "6 planned split"
BOARDS_PY = Path(__file__).resolve().parents[1] / "deploy" / "netns" / "boards.py"
KEYS = ("fast", "mid", "slow")
CPUS = (0.9, 0.5, 0.3)  # cores; under 2 in all, so that the boards do not contend here
RATES = ("200mbit", "200mbit", "20mbit")
STAGES = 3
TARGET_SWEEP = 0.95
TARGET_MACS = 1.3
TARGET_PREDICTION = 0.15
RECHECK = 2  # the best swept choices measured again beside the plan
TIMEOUT_S = 600.0
MODELS_ENV = "TVMPIPE_BENCH_PLAN_MODELS"  # e.g. light_squeezenet: run only these


@dataclass(frozen=True)
class Model:
    name: str
    segments: int  # the planner's candidate pieces
    grid: int  # the sweep's pieces: grid - 1 cut positions
    inputs: tuple[int, int]  # measured per stream after the fill: full, quick
    sweep_inputs: tuple[int, int]
    quick: bool = True  # also in a --quick run


MODELS = (
    Model("light_squeezenet", segments=16, grid=4, inputs=(12, 4), sweep_inputs=(6, 3)),
    Model("light_resnet50", segments=8, grid=3, inputs=(4, 2), sweep_inputs=(2, 2), quick=False),
)


def load_boards_module() -> ModuleType:
    """deploy/netns/boards.py is a plain file (deploy/ is no package): load it by path."""
    name = "tvmpipe_netns_boards"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BOARDS_PY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while executing it
        spec.loader.exec_module(module)
    return sys.modules[name]


def say(text: str) -> None:
    print(f"\n  {text}", end="", flush=True)


def build(cfg: PipelineModuleConfig) -> PipelineLibrary:
    with tvm.transform.PassContext(opt_level=3):
        return build_pipeline(cfg)


def cluster_file(directory: Path, boards: Any, keys: Sequence[str]) -> Path:
    """Stage k on the board of ``keys[k]``: placement without a rebuild."""
    host, port = boards.tracker
    lines = ["[tracker]", f'host = "{host}"', f"port = {port}", ""]
    lines += ["[controller]", f'client_host = "{boards.controller_address}"', ""]
    for index, key in enumerate(keys, start=1):
        lines += [f"[stages.mod{index}]", f'key = "{key}"', ""]
    path = directory / f"cluster-{'-'.join(keys)}.toml"
    path.write_text("\n".join(lines))
    return path


def stream(
    lib: PipelineLibrary,
    cluster: Path,
    inputs: Sequence[dict[str, np.ndarray]],
    window: int,
    boards: Any,
    budget_s: float | None = None,
) -> tuple[float, list[float]]:
    """Steady inputs/s of the pipeline placed by ``cluster``, and each stage's mean service
    seconds over the measured inputs (the fill left out).

    ``budget_s``: stop once the measured inputs took that long (a sweep choice far slower than
    the best so far); its rate is then over the inputs done so far.
    """
    done_at: list[float] = []
    try:
        with PipelineModule(lib, cluster=cluster, window=window, timeout=TIMEOUT_S) as pipe:
            time.sleep(SETTLE_S)
            for index, _ in enumerate(pipe.map(inputs, window=window)):
                if index == window - 1:  # the fill is done: measure from here
                    before = pipe.stats()["stages"]
                if index >= window - 1:
                    done_at.append(time.perf_counter())
                    if budget_s is not None and done_at[-1] - done_at[0] > budget_s:
                        break
            after = pipe.stats()["stages"]
    finally:
        boards.wait_free(timeout=30)
    service = []
    for name, s in after.items():
        n0, n1 = before[name]["processed"], s["processed"]
        total = s["service_mean_s"] * n1 - before[name]["service_mean_s"] * n0
        service.append(total / max(n1 - n0, 1))
    return steady_rate(done_at, 0), service


def sweep_choices(cuts: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every split at a subset of ``cuts`` into 1..3 stages, on every ordered choice of boards."""
    choices = []
    for n in range(1, STAGES + 1):
        for chosen in itertools.combinations(cuts, n - 1):
            for keys in itertools.permutations(KEYS, n):
                choices.append((chosen, keys))
    return choices


def describe(cuts: Sequence[int], keys: Sequence[str]) -> str:
    return f"cuts {list(cuts)} on {'/'.join(keys)}"


def run_model(model: Model, boards: Any, settings: Settings, work: Path) -> list[Row]:
    mod = load_onnx_model(model.name, seed=0)
    count, sweep_count = settings.count(*model.inputs), settings.count(*model.sweep_inputs)
    inputs = [example_input(mod, seed=i) for i in range(2 * STAGES + count)]
    began = time.perf_counter()
    say(f"{model.name}: planning on the boards ({model.segments} pieces)...")
    plan: Plan = plan_pipeline(
        mod, tracker=boards.tracker, max_stages=STAGES, segments=model.segments, cache=work
    )
    boards.wait_free(timeout=30)
    planned_keys = [plan.where[d.name]["key"] for d in plan.devices]
    predicted = plan.stage_times_s()
    say(
        f"planned {describe(plan.cuts, planned_keys)} in {time.perf_counter() - began:.0f} s, "
        f"predicted {plan.predicted_rate():.2f}/s"
    )
    libs: dict[tuple[int, ...], PipelineLibrary] = {}

    def lib_for(cuts: Sequence[int]) -> PipelineLibrary:
        if tuple(cuts) not in libs:
            libs[tuple(cuts)] = build(split_module(mod, list(cuts)))
        return libs[tuple(cuts)]

    def measure(cuts: Sequence[int], keys: Sequence[str], n: int, budget: float | None = None):
        window = 2 * len(keys)
        return stream(
            lib_for(cuts),
            cluster_file(work, boards, keys),
            inputs[: window + n],
            window,
            boards,
            budget,
        )

    try:
        planned_lib = build(plan.config)
        grid = candidate_cuts(mod, model.grid)
        choices = sweep_choices(grid)
        swept: list[tuple[float, tuple[int, ...], tuple[str, ...]]] = []
        best = 0.0
        for index, (cuts, keys) in enumerate(choices, start=1):
            budget = 3 * sweep_count / best if best else None
            rate, _ = measure(cuts, keys, sweep_count, budget)
            best = max(best, rate)
            swept.append((rate, cuts, keys))
            say(f"sweep {index}/{len(choices)}: {describe(cuts, keys)}: {rate:.2f}/s")
        swept.sort(reverse=True)
        macs_cuts = balanced_cuts(binding_costs(mod), STAGES)
        errors: list[list[float]] = []

        def planned() -> float:
            window = 2 * len(planned_keys)
            rate, service = stream(
                planned_lib,
                cluster_file(work, boards, planned_keys),
                inputs[: window + count],
                window,
                boards,
            )
            errors.append([m / p - 1 for m, p in zip(service, predicted, strict=True)])
            return rate

        sides: dict[str, Callable[[], float]] = {"planned": planned}
        for rank, (_, cuts, keys) in enumerate(swept[:RECHECK], start=1):
            sides[f"swept {rank}"] = functools.partial(_first, measure, cuts, keys, count)
        sides["macs"] = lambda: measure(macs_cuts, KEYS, count)[0]
        say(f"measuring the plan, the best {RECHECK} swept and the multiply-add split...")
        medians, samples = alternate(settings.reps, sides)
    finally:
        for lib in libs.values():
            lib.close()
        if "planned_lib" in locals():
            planned_lib.close()
    best_side = max((k for k in sides if k.startswith("swept")), key=lambda k: medians[k])
    rank = int(best_side.split()[1]) - 1
    best_cuts, best_keys = swept[rank][1], swept[rank][2]
    boards_text = ", ".join(
        f"{k}: {c:g} core, {r}" for k, c, r in zip(KEYS, CPUS, RATES, strict=True)
    )
    worst = [max(e, key=abs) for e in errors]
    stage_err = np.median(np.array(errors), axis=0)
    per_stage = ", ".join(
        f"{key} {p * 1e3:.0f} ms planned, {(1 + e) * p * 1e3:.0f} measured"
        for key, p, e in zip(planned_keys, predicted, stage_err, strict=True)
    )
    what = f"{model.name}, 3 boards"
    plan_text = f"planned {describe(plan.cuts, planned_keys)} ({model.segments} pieces)"
    return [
        Row(
            NAME,
            f"{what}: plan vs best of a coarse sweep",
            "inputs/s",
            medians["planned"],
            medians[best_side],
            describe(best_cuts, best_keys),
            target=TARGET_SWEEP,
            samples={"planned": samples["planned"], "swept": samples[best_side]},
            note=f"boards {boards_text}; {plan_text}; grid: cuts {grid}, {len(choices)} "
            f"choices, each {sweep_count} inputs after the fill (window 2 x stages), the best "
            f"{RECHECK} again {count} inputs x {settings.reps}; sweep: "
            + "; ".join(f"{describe(c, k)} {r:.2f}/s" for r, c, k in swept),
        ),
        Row(
            NAME,
            f"{what}: plan vs multiply-add cuts in stage order",
            "inputs/s",
            medians["planned"],
            medians["macs"],
            describe(macs_cuts, KEYS),
            target=TARGET_MACS,
            samples={"planned": samples["planned"], "macs": samples["macs"]},
            note=f"boards {boards_text}; {plan_text}; {count} inputs x {settings.reps}",
        ),
        Row(
            NAME,
            f"{what}: worst stage time, |measured - predicted| / predicted",
            "fraction",
            median([abs(w) for w in worst]),
            1.0,
            "of predicted",
            higher_is_better=False,
            target=TARGET_PREDICTION,
            samples={"worst": worst},
            note=f"service time on the board (mean over {count} inputs) against the plan's "
            f"stage time (full speed where the stage stays within its board's CPU share, the "
            f"share's pace where it does not), medians: {per_stage}",
        ),
        Row(
            NAME,
            f"{what}: plan's throughput, measured vs predicted",
            "inputs/s",
            medians["planned"],
            plan.predicted_rate(),
            f"predicted ({plan.solution.bottleneck()})",
            samples={"planned": samples["planned"]},
        ),
    ]


def run(settings: Settings) -> list[Row]:
    boards_module = load_boards_module()
    reason = boards_module.netns_unavailable() or boards_module.cpu_cgroups_unavailable()
    if reason:
        print(f"skipped: {reason}", end=" ", flush=True)
        return []
    wanted = os.environ.get(MODELS_ENV, ",".join(m.name for m in MODELS)).split(",")
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="tvmpipe-bench-plan-") as work,
        boards_module.SimulatedBoards(list(KEYS), rates=list(RATES), cpus=list(CPUS)) as boards,
    ):
        for model in MODELS:
            if (settings.quick and not model.quick) or model.name not in wanted:
                continue
            rows.extend(run_model(model, boards, settings, Path(work)))
    print()
    return rows


def _first(measure: Callable[..., tuple[float, Any]], *args: Any) -> float:
    """The rate of one measured choice (the first of what ``measure`` returns)."""
    return measure(*args)[0]
