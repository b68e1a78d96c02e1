"""Tuning where the time is: ``top`` gives a larger budget to the heaviest workloads only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import leaks  # tests/leaks.py (pytest puts tests/ on the path)
import numpy as np
import pytest
import tvm
from tvm import relax

from tvmpipe.orchestrator.tune import (
    TaskResult,
    _heaviest,
    _write_kind,
    budget_text,
    model_budget_text,
    read_kind,
    tune_pipeline,
)
from tvmpipe.proto.errors import ConfigError

pytestmark = pytest.mark.timeout(180)

TARGET = {"kind": "llvm"}


def two_matmuls() -> tvm.IRModule:
    """A light workload (8x16 @ 16x16) and, after it, a heavy one (256x256 @ 256x256)."""
    rng = np.random.default_rng(0)
    x = relax.Var("x", relax.TensorType((8, 16), "float32"))
    y = relax.Var("y", relax.TensorType((256, 256), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, y]):
        with bb.dataflow():
            small = bb.emit(relax.op.matmul(x, relax.const(rng.random((16, 16), "float32"))))
            big = bb.emit(relax.op.matmul(y, relax.const(rng.random((256, 256), "float32"))))
            out = bb.emit_output(relax.Tuple([small, big]))
        bb.emit_func_output(out)
    return bb.get()


OF_TWO = ((16, 8), (256, 256))  # two_matmuls' workloads: (size, rows)


def one_matmul(size: int, rows: int) -> tvm.IRModule:
    """``two_matmuls``'s light (16, 8) or heavy (256, 256) workload alone, or another: a
    workload is its shapes (a constant weight is an argument of the kernel)."""
    x = relax.Var("x", relax.TensorType((rows, size), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(np.ones((size, size), "float32"))))
        bb.emit_func_output(out)
    return bb.get()


def test_the_heaviest_are_chosen_by_time_times_calls_and_unmeasured_first() -> None:
    def result(best: float | None) -> TaskResult:
        return TaskResult("k", "w", "0", 1, 0, best)

    results = [result(1e-3), result(5e-3), result(None), result(2e-3)]
    weights = [4.0, 1.0, 1.0, 1.0]  # the first is called 4 times: 4 ms in all
    assert _heaviest(results, weights, None) == [0, 1, 2, 3]
    assert _heaviest(results, weights, 2) == [1, 2]  # unmeasured first, then 5 ms
    assert _heaviest(results, weights, 3) == [0, 1, 2]  # in their original order
    assert _heaviest(results, weights, 10) == [0, 1, 2, 3]


def test_a_second_pass_tunes_only_the_heaviest(tmp_path: Path) -> None:
    mod, database = two_matmuls(), tmp_path / "db"
    # MetaSchedule names its logger's handlers and failed on one without a name (pytest's
    # capture handlers land there after a test that tuned): set aside, then put back.
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = logging.NullHandler()
    logger.addHandler(unnamed)
    try:
        with leaks.checked():
            first = tune_pipeline(mod, database, trials=1, target=TARGET, progress=False)
            second = tune_pipeline(mod, database, trials=2, target=TARGET, progress=False, top=1)
        assert unnamed in logger.handlers
    finally:
        logger.removeHandler(unnamed)
    assert len(first) == len(second) == 2
    assert all(r.trials_run == 1 and r.best_s for r in first)
    heavy = max(range(2), key=lambda i: first[i].best_s or 0.0)
    assert [r.trials_run for r in second] == [1 if i == heavy else 0 for i in range(2)]
    kind = read_kind(next(p for p in database.iterdir() if p.is_dir()))
    assert kind["trials_per_workload"] == 1
    assert kind["heaviest"] == [{"workloads": 1, "trials": 2}]
    assert budget_text(kind) == "1 trials per workload, 2 for the heaviest"
    # What a model's own workloads had: either matmul alone (another model sharing the kind)
    # had only its own passes; a model with no workload in the database had none.
    directory = next(p for p in database.iterdir() if p.is_dir())
    assert model_budget_text(mod, TARGET, directory) == "1 trials per workload, 2 for 1 of 2"
    alone = {model_budget_text(one_matmul(*shape), TARGET, directory) for shape in OF_TWO}
    assert alone == {"1 trials per workload", "2 trials per workload"}
    assert model_budget_text(one_matmul(32, 4), TARGET, directory) == "0 trials per workload"


def test_each_top_keeps_its_own_budget_in_kind_json(tmp_path: Path) -> None:
    """make tune's passes (all, the 8 heaviest, the heaviest) are each stated; a later pass
    with the same top replaces its own; a kind.json of one dict still reads."""
    target = tvm.target.Target(TARGET)

    def finished(trials: int, top: int | None) -> dict:
        _write_kind(tmp_path, target, "cpu", "", {"local": True}, trials, top, finished=True)
        return read_kind(tmp_path)

    finished(32, None)
    finished(128, 8)
    kind = finished(384, 1)
    assert kind["heaviest"] == [{"workloads": 8, "trials": 128}, {"workloads": 1, "trials": 384}]
    assert budget_text(kind) == (
        "32 trials per workload, 128 for the 8 heaviest, 384 for the heaviest"
    )
    kind = finished(64, 8)
    assert kind["heaviest"] == [{"workloads": 8, "trials": 64}, {"workloads": 1, "trials": 384}]
    before = {**kind, "heaviest": {"workloads": 8, "trials": 128}}  # as written before
    (tmp_path / "kind.json").write_text(json.dumps(before))
    assert budget_text(read_kind(tmp_path)) == "32 trials per workload, 128 for the 8 heaviest"
    kind = finished(384, 1)  # a pass over a kind.json written before: the old entry kept
    assert kind["heaviest"] == [{"workloads": 8, "trials": 128}, {"workloads": 1, "trials": 384}]


def test_top_must_be_a_positive_count(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top must be a positive int"):
        tune_pipeline(two_matmuls(), tmp_path / "db", trials=1, target=TARGET, top=0)


def test_an_interrupted_pass_does_not_claim_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kind.json says what was tuned, not what was asked: a pass stopped by Ctrl-C (here at its
    first search) leaves the budgets of the passes that finished."""
    from tvm.s_tir import meta_schedule as ms

    mod, database = two_matmuls(), tmp_path / "db"
    with leaks.checked():
        tune_pipeline(mod, database, trials=1, target=TARGET, progress=False)

        def interrupted(**_: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(ms, "tune_tasks", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tune_pipeline(mod, database, trials=2, target=TARGET, progress=False, top=1)
    kind = read_kind(next(p for p in database.iterdir() if p.is_dir()))
    assert kind["trials_per_workload"] == 1 and "heaviest" not in kind
    assert budget_text(kind) == "1 trials per workload"
