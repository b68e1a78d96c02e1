"""tune_pipeline on a real loopback worker, resuming, a database per kind, builds from it.

One small matmul+relu model (an ONNX file) is tuned once for the whole file, a handful of
trials: half the budget through ``tvmpipe tune``, then the rest through ``tune_pipeline``, which
resumes, then once more, which has nothing left to do. The tests then build from that database.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import leaks  # tests/leaks.py (pytest puts tests/ on the path)
import numpy as np
import pytest
import tvm

from tvmpipe.orchestrator import build_pipeline, split_module
from tvmpipe.orchestrator.build import UntunedWorkloadWarning
from tvmpipe.orchestrator.cli import main as cli_main
from tvmpipe.orchestrator.library import load_library
from tvmpipe.orchestrator.models import load_onnx_file
from tvmpipe.orchestrator.tune import (
    KIND_FILE,
    apply_database,
    database_digest,
    database_for_host,
    find_database,
    kind_id,
    read_kind,
    tune_pipeline,
)
from tvmpipe.proto.errors import ConfigError

pytestmark = pytest.mark.timeout(180)

TARGET = {"kind": "llvm"}
TRIALS = 2


WEIGHT = np.random.default_rng(1).standard_normal((16, 16)).astype("float32")


def write_matmul_relu(path: Path) -> Path:
    """An ONNX file ``y = relu(x @ w)``, x of shape (8, 16): one fused workload."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"])],
        "matmul_relu",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 16])],
        [onnx.numpy_helper.from_array(WEIGHT, "w")],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ WEIGHT, 0)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tune to half the budget with the CLI, then resume to all of it, then once more."""
    work = tmp_path_factory.mktemp("tune")
    database, model = work / "db", write_matmul_relu(work / "matmul_relu.onnx")
    half = io.StringIO()
    with leaks.checked():  # the loopback worker, MetaSchedule's runner process, log files
        with contextlib.redirect_stdout(half):
            code = cli_main(
                ["tune", str(model), "--database", str(database), "--trials", str(TRIALS // 2)]
            )
        assert code == 0, half.getvalue()
        mod = load_onnx_file(model)
        full = tune_pipeline(mod, database, trials=TRIALS, target=TARGET, progress=False)
        again = tune_pipeline(mod, database, trials=TRIALS, target=TARGET, progress=False)
    return {
        "database": database,
        "model": model,
        "half": half.getvalue(),
        "full": full,
        "again": again,
    }


def matmul_relu(tuned: dict) -> tvm.IRModule:
    """A fresh module each time: a config tracks its stages by identity."""
    return load_onnx_file(tuned["model"])


def test_tuning_resumes_and_stops_at_the_budget(tuned: dict) -> None:
    half, full, again = tuned["half"], tuned["full"], tuned["again"]
    # The CLI's table: workload, trials in the database, trials run now, best time.
    row = next(line.split() for line in half.splitlines() if "matmul" in line)
    assert row[1:3] == [str(TRIALS // 2), str(TRIALS // 2)], half
    assert len(full) == len(again) == 1
    assert full[0].trials_before == TRIALS // 2
    assert full[0].trials_run == TRIALS - TRIALS // 2  # only what the budget still allowed
    assert again[0].trials_before == TRIALS and again[0].trials_run == 0
    assert again[0].best_s is not None and again[0].best_s > 0
    assert "matmul" in again[0].name


def test_one_database_per_kind(tuned: dict) -> None:
    database: Path = tuned["database"]
    kinds = [p for p in database.iterdir() if p.is_dir()]
    assert [p.name for p in kinds] == [kind_id(TARGET, "cpu", "")]
    kind = read_kind(kinds[0])
    assert kind["target"]["kind"] == "llvm" and kind["device"] == "cpu" and kind["key"] == ""
    assert kind["measured_on"]["local"] is True
    assert (kinds[0] / KIND_FILE).is_file()
    # Another kind (another CPU, or another tracker key) finds nothing here, and says so.
    assert kind_id(TARGET, "cpu", "rk3399") != kinds[0].name
    with pytest.raises(ConfigError, match="tune this kind first"):
        find_database(database, {"kind": "llvm", "mcpu": "cortex-a72"})


def test_build_from_the_database_matches_run_local(tuned: dict, tmp_path: Path) -> None:
    database: Path = tuned["database"]
    x = np.random.default_rng(2).standard_normal((8, 16)).astype("float32")
    cfg = split_module(matmul_relu(tuned), [])
    for module in cfg.modules:
        cfg[module].target = TARGET
    with tvm.transform.PassContext(opt_level=3), warnings.catch_warnings():
        warnings.simplefilter("error", UntunedWorkloadWarning)  # its one workload is tuned
        lib = build_pipeline(cfg, progress=False, database=database)
        plain = build_pipeline(cfg, progress=False)
    try:
        np.testing.assert_allclose(lib.run_local({"x": x})[0], reference(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lib.run_local({"x": x})[0], plain.run_local({"x": x})[0])
        recorded = lib.stages[0].tuning_database
        kind_dir = database / kind_id(TARGET)
        applied = apply_database(matmul_relu(tuned), TARGET, kind_dir)  # what the build compiled
        scheduled = [f for _, f in applied.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        assert [f.attrs.get("tirx.is_scheduled") for f in scheduled] == [True]
        assert recorded == {"path": str(kind_dir.resolve()), "sha256": database_digest(kind_dir)}
        assert plain.stages[0].tuning_database is None
        package = lib.export_library(tmp_path / "pipe")
        manifest = json.loads((package / "pipeline.json").read_text())
        assert manifest["stages"][0]["tuning_database"] == recorded
        assert load_library(package).stages[0].tuning_database == recorded
    finally:
        lib.close()
        plain.close()


def test_applying_keeps_metaschedules_choice_and_skips_failed_runs(
    tuned: dict, tmp_path: Path
) -> None:
    """apply_database opens only each workload's best record (MetaSchedule parses every
    record on open: 11 s for make tune's database); the schedule is the one MetaSchedule's
    own database picks from all of them, and a run that failed (1e10 s) is never it."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from tvmpipe.orchestrator.tune import _pack_weights, _prepare

    kind_dir = tuned["database"] / kind_id(TARGET)
    copy = tmp_path / "kind"
    copy.mkdir()
    for name in ("database_workload.json", "database_tuning_record.json", KIND_FILE):
        (copy / name).write_bytes((kind_dir / name).read_bytes())
    records = (copy / "database_tuning_record.json").read_text().splitlines()
    workload, (trace, _, *rest) = json.loads(records[0])
    failed = json.dumps([workload, [trace, [1e10], *rest]])
    (copy / "database_tuning_record.json").write_text("\n".join([failed, *records]) + "\n")
    mod, target = matmul_relu(tuned), tvm.target.Target(TARGET)
    with target, ms.database.JSONDatabase(work_dir=str(copy), allow_missing=False):
        chosen = relax.transform.MetaScheduleApplyDatabase()(_prepare(mod, target, read_kind(copy)))
    expected = _pack_weights(chosen, target)
    tvm.ir.assert_structural_equal(apply_database(mod, TARGET, copy), expected)
    tvm.ir.assert_structural_equal(apply_database(mod, TARGET, kind_dir), expected)
    (copy / "database_tuning_record.json").write_text(failed + "\n")  # only a failure left
    applied = apply_database(mod, TARGET, copy)
    scheduled = [f for _, f in applied.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert [f.attrs.get("tirx.is_scheduled") for f in scheduled] == [None]  # built untuned


def test_a_resumed_search_is_guided_by_the_records_already_measured(
    tuned: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cost model learns from the workload's records in the database before the search
    resumes; it scores candidates (not at random) once it has seen COST_MODEL_WARMUP."""
    pytest.importorskip("xgboost")
    from tvm.s_tir import meta_schedule as ms

    from tvmpipe.orchestrator import tune

    kind_dir = tmp_path / "kind"
    shutil.copytree(tuned["database"] / kind_id(TARGET), kind_dir)
    target = tvm.target.Target(TARGET)
    with tune._meta_schedule_logs(tmp_path):
        (context,), _ = tune._contexts([matmul_relu(tuned)], target, kind_dir, 0, TRIALS)
    records = ms.database.JSONDatabase(work_dir=str(kind_dir)).get_all_tuning_records()
    assert len(records) == TRIALS
    monkeypatch.setattr(tune, "COST_MODEL_WARMUP", TRIALS)
    model = tune._cost_model(context, records)
    assert model.data_size == TRIALS and model.booster is not None
    candidates, _ = tune._replayed(context, records)
    np.testing.assert_array_equal(
        model.predict(context, candidates), model.predict(context, candidates)
    )
    assert tune._cost_model(context, []).data_size == 0  # nothing measured: random scores


def test_a_stage_with_workloads_the_database_lacks_is_named(tuned: dict) -> None:
    """Relu cut from its matmul: two workloads nobody tuned, and the build says so."""
    mod = matmul_relu(tuned)
    cfg = split_module(mod, [1])  # after the matmul: relu is a stage of its own
    assert len(cfg.modules) == 2
    for module in cfg.modules:
        cfg[module].target = TARGET
    with pytest.warns(UntunedWorkloadWarning) as caught:
        lib = build_pipeline(cfg, progress=False, database=tuned["database"])
    try:
        messages = sorted(str(w.message) for w in caught)
        assert len(messages) == 2, messages  # the matmul alone and the relu alone: both new
        assert messages[0].startswith("stage 'mod1': 1 workload(s) are not in the tuning")
        assert "matmul" in messages[0] and "relu" in messages[1], messages
        assert "tvmpipe tune --cuts" in messages[0]
        x = np.random.default_rng(3).standard_normal((8, 16)).astype("float32")
        np.testing.assert_allclose(lib.run_local({"x": x})[0], reference(x), rtol=1e-5, atol=1e-5)
        assert not list(lib.directory.glob("*.untuned.json"))  # nothing left in the package
    finally:
        lib.close()


def test_bad_database_paths_are_refused(tuned: dict, tmp_path: Path) -> None:
    cfg = split_module(matmul_relu(tuned), [])
    with pytest.raises(ConfigError, match="no such directory"):
        build_pipeline(cfg, progress=False, database=tmp_path / "missing")
    a_file = tmp_path / "file"
    a_file.write_text("not a database")
    with pytest.raises(ConfigError, match="not a directory"):
        tune_pipeline(matmul_relu(tuned), a_file, trials=1, progress=False)
    with pytest.raises(ConfigError, match="positive int"):
        tune_pipeline(matmul_relu(tuned), tuned["database"], trials=0, progress=False)
    cfg[cfg.modules[0]].target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
    with pytest.raises(ConfigError, match="tune this kind first"):  # a kind never tuned
        build_pipeline(cfg, progress=False, database=tuned["database"])


def test_a_database_for_another_cpu_is_named_not_used(
    tuned: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fixture's kind is plain ``llvm``, never this machine's CPU (``host_target()`` names
    it): the demo and the bench say what the database is for and build untuned."""
    from tvmpipe.orchestrator.demo import _tuning

    found, why = database_for_host(tuned["database"])
    assert found is None
    assert "is for llvm " in why and "not this machine: llvm " in why and "-mcpu=" in why
    assert _tuning(str(tuned["database"])) == ("llvm", None, None)
    assert "building untuned" in capsys.readouterr().out
    found, why = database_for_host(tuned["database"] / "nothing-here")
    assert found is None and "is for nothing" in why


def test_a_key_without_its_own_database_takes_the_keyless_one(tuned: dict) -> None:
    """Tuned on a local worker (no key): good for any worker with the same target."""
    keyless = tuned["database"] / kind_id(TARGET)
    assert find_database(tuned["database"], TARGET, "cpu", "board") == keyless
    assert find_database(tuned["database"], TARGET, "cpu", "") == keyless


def test_cli_tune_refuses_a_model_it_cannot_load(
    tuned: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["tune", "no_such_model", "--database", str(tmp_path / "db")]) == 1
    assert "no_such_model" in capsys.readouterr().err


INTRINSICS_CHECK = """
import sys
import tvm
from tvm.s_tir import TensorIntrin
from tvmpipe.orchestrator.tune import _register_intrinsics
_register_intrinsics(tvm.target.Target({"kind": "llvm"}))
import tvm.s_tir.tensor_intrin  # what every TuneContext does: now free
assert "tvm.s_tir.tensor_intrin.cuda" not in sys.modules, "CUDA's intrinsics parsed for a CPU"
TensorIntrin.get("dot_16x4_vnni")  # x86
TensorIntrin.get("dot_4x4_i8i8s32_neon")  # arm boards
_register_intrinsics(tvm.target.Target({"kind": "rocm", "mcpu": "gfx900"}))
TensorIntrin.get("ROCM_mfma_fill_16x16_f32")
print("ok")
"""


@pytest.mark.timeout(60)
def test_a_target_gets_its_own_backends_intrinsics() -> None:
    """Only the CPU backends' tensor intrinsics are parsed for a CPU target (CUDA's take 6 s),
    and a GPU target in the same process still finds its own."""
    result = subprocess.run(
        [sys.executable, "-c", INTRINSICS_CHECK], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_workload_whose_search_ran_dry_is_not_searched_again(tmp_path: Path) -> None:
    """A lone relu has one possible schedule: MetaSchedule measures it and stops short of the
    budget. The database remembers that, so a second run with the same budget skips it (it
    used to search it again each time, a minute or two per such workload of a real model)."""
    from tvm import relax

    from tvmpipe.orchestrator.tune import DRY_FILE

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([8, 16], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(out)
    mod, budget = bb.get(), 4
    with leaks.checked():
        (first,) = tune_pipeline(mod, tmp_path, trials=budget, target=TARGET, progress=False)
        (second,) = tune_pipeline(mod, tmp_path, trials=budget, target=TARGET, progress=False)
    assert 0 < first.trials_run < budget, first
    (kind,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((kind / DRY_FILE).read_text()) == {first.workload: budget}
    assert second.trials_run == 0 and second.trials_before == first.trials_run, second
    assert second.best_s is not None and second.best_s > 0


def test_weights_are_repacked_once_at_build_and_an_older_kind_keeps_its_layout(
    tuned: dict, tmp_path: Path
) -> None:
    """A new CPU kind is tuned with constant weights free to take the layout each schedule
    wants: the build repacks them once, so no repacking is left to run per input. A kind made
    before that (kind.json without the field) stays as it was tuned, so its records still
    apply and nothing builds untuned."""
    from tvmpipe.orchestrator.tune import LAYOUT_FREE, PREPACK_FIELD, untuned_workloads

    new_kind = tuned["database"] / kind_id(TARGET)
    assert read_kind(new_kind)[PREPACK_FIELD] is True
    applied = apply_database(matmul_relu(tuned), TARGET, new_kind)
    functions = [f for _, f in applied.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # One function, scheduled, reading its weight packed: the repacking ran at build time, so
    # main holds the weight in another layout (the same values) and calls nothing else.
    assert len(functions) == 1 and not untuned_workloads(applied)
    (weight,) = _constants(applied)
    assert weight.shape != WEIGHT.shape or not np.array_equal(weight, WEIGHT), "not repacked"
    np.testing.assert_array_equal(np.sort(weight, axis=None), np.sort(WEIGHT, axis=None))

    old = tmp_path / "db"
    (old / kind_id(TARGET)).mkdir(parents=True)
    (old / kind_id(TARGET) / KIND_FILE).write_text(json.dumps({"trials_per_workload": 0}))
    with leaks.checked():
        tune_pipeline(matmul_relu(tuned), old, trials=1, target=TARGET, progress=False)
    assert read_kind(old / kind_id(TARGET))[PREPACK_FIELD] is False
    applied = apply_database(matmul_relu(tuned), TARGET, old / kind_id(TARGET))
    assert not untuned_workloads(applied)
    functions = [f for _, f in applied.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert [f.attrs.get(LAYOUT_FREE) for f in functions] == [None]
    assert any(np.array_equal(c, WEIGHT) for c in _constants(applied))


CONV_WEIGHT = np.random.default_rng(3).standard_normal((16, 8, 3, 3)).astype("float32")


def write_conv_dropout_relu(path: Path) -> Path:
    """An ONNX file ``r = relu(dropout(conv3x3(x)))``, ``y = concat(r, r)`` on channels, x of
    shape (1, 8, 10, 10), NCHW."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Dropout", ["c"], ["d"]),
            helper.make_node("Relu", ["d"], ["r"]),
            helper.make_node("Concat", ["r", "r"], ["y"], axis=1),
        ],
        "conv_dropout_relu",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32, 10, 10])],
        [onnx.numpy_helper.from_array(CONV_WEIGHT, "w")],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def conv_reference(x: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    relu = np.maximum(np.einsum("nchwij,ocij->nohw", windows, CONV_WEIGHT), 0)
    return np.concatenate([relu, relu], axis=1)


def test_a_new_cpu_kind_tunes_and_builds_convolutions_in_nhwc(tmp_path: Path) -> None:
    """A new CPU kind records NHWC as its convolutions' layout: tuned and built so, with the
    model's own NCHW at its input and output (a stage's tensors do not change), through the
    dropout that TVM cannot convert layouts across, and the concatenation on channels (the last
    axis in NHWC) made of plain copies. A kind without the field keeps NCHW."""
    from tvmpipe.orchestrator.tune import _prepare, conv2d_layout, untuned_workloads

    model = write_conv_dropout_relu(tmp_path / "conv.onnx")
    database = tmp_path / "db"
    with leaks.checked():
        tune_pipeline(load_onnx_file(model), database, trials=1, target=TARGET, progress=False)
    kind_dir = database / kind_id(TARGET)
    assert conv2d_layout(kind_dir) == "NHWC"
    applied = apply_database(load_onnx_file(model), TARGET, kind_dir)
    assert not untuned_workloads(applied)
    assert "R.Tensor((1, 10, 10, 16)" in applied.script()  # the convolution's output, NHWC
    assert 'T.sblock("copy_x1")' in applied.script()  # the concatenation, tuned
    cfg = split_module(load_onnx_file(model), [])
    for module in cfg.modules:
        cfg[module].target = TARGET
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedWorkloadWarning)
        lib = build_pipeline(cfg, progress=False, database=database)
    try:
        x = np.random.default_rng(4).standard_normal((1, 8, 10, 10)).astype("float32")
        (y,) = lib.run_local({"x": x})
        assert y.shape == (1, 32, 10, 10)
        np.testing.assert_allclose(y, conv_reference(x), rtol=1e-4, atol=1e-4)
    finally:
        lib.close()
    older = _prepare(load_onnx_file(model), tvm.target.Target(TARGET), {})
    assert "R.Tensor((1, 16, 10, 10)" in older.script()
    assert "R.Tensor((1, 10, 10, 16)" not in older.script()


def _constants(mod: tvm.IRModule) -> list[np.ndarray]:
    """The values of the tensor constants in ``mod``'s main."""
    from tvm import relax

    found: list[np.ndarray] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, tvm.ir.expr.GenericConst) and hasattr(expr.value, "numpy"):
            found.append(expr.value.numpy())

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_a_stage_whose_weights_come_at_run_time_computes_with_each_weight(tuned: dict) -> None:
    """A parameter group's weight is an argument, not a constant, so nothing can repack it at
    build time: a prepacked schedule repacks it on each call, and a weight set later is the
    one used (nothing of the tuning-time weight is baked in). The stage's workload is the
    file's matmul+relu, tuned with its weight a constant."""
    from tvm import relax

    from tvmpipe.orchestrator import PipelineModuleConfig

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([8, 16], "float32"))
    w = relax.Var("w", relax.TensorType([16, 16], "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    mod = bb.get()
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "x")
    cfg.outputs.append((mod, 0))
    cfg[mod].target = TARGET
    cfg[mod].params = {"w": WEIGHT}
    cfg.param_groups["g"] = mod
    x_value = np.random.default_rng(3).standard_normal((8, 16)).astype("float32")
    other = np.random.default_rng(4).standard_normal((16, 16)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedWorkloadWarning)  # the tuned schedule is used
        lib = build_pipeline(cfg, progress=False, database=tuned["database"])
    try:
        runner = lib.runner(lib.stages[0])
        np.testing.assert_allclose(lib.run_local({"x": x_value})[0], reference(x_value), 1e-5)
        runner.set_params({"w": other})
        expected = np.maximum(x_value @ other, 0)
        np.testing.assert_allclose(lib.run_local({"x": x_value})[0], expected, 1e-5, 1e-5)
    finally:
        lib.close()
