"""build_pipeline and run_local: results against numpy, stage signatures, params, parameter
groups, Python stages, cross-compiled stages, parallel compiles, compile failures and per-stage
build functions and Relax pipelines."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tvm
from modules import (
    as_list,
    min_max,
    old_tvm_test_modules,
    old_tvm_test_reference,
    postprocess,
    rfc_example_modules,
    rfc_example_reference,
    unary_module,
    weighted_module,
    weighted_reference,
    wire_old_tvm_test,
    wire_rfc_example,
)
from tvm import relax

from tvmpipe.orchestrator import (
    BuildError,
    ConfigError,
    InputError,
    PackageError,
    PipelineLibrary,
    PipelineModuleConfig,
    build_pipeline,
    load_library,
)
from tvmpipe.orchestrator import build as build_module
from tvmpipe.orchestrator.signature import TensorSpec

pytestmark = pytest.mark.timeout(120)

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
EM_AARCH64 = 183


def build(cfg: PipelineModuleConfig, **kwargs: object) -> PipelineLibrary:
    with tvm.transform.PassContext(opt_level=3):
        return build_pipeline(cfg, **kwargs)  # type: ignore[arg-type]


def rfc_config() -> PipelineModuleConfig:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, mod1, mod2, mod3)
    cfg[mod1].target = "llvm"
    cfg[mod1].device = "cpu"
    cfg[mod1].rpc_key = "rk3399"
    cfg[mod1].cpu_affinity = "0"
    cfg[mod1].num_threads = 1
    cfg[mod2].target = {"kind": "llvm"}
    cfg[mod3].target = tvm.target.Target("llvm")
    return cfg


def rfc_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {f"data_{i}": rng.standard_normal((1, 4)).astype("float32") for i in range(3)}


@pytest.fixture(scope="module")
def rfc_lib() -> Iterator[PipelineLibrary]:
    lib = build(rfc_config())
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def old_lib() -> Iterator[PipelineLibrary]:
    cfg = PipelineModuleConfig()
    wire_old_tvm_test(cfg, *old_tvm_test_modules())
    lib = build(cfg)
    yield lib
    lib.close()


# ----- results


def test_rfc_example_matches_numpy(rfc_lib: PipelineLibrary, rng: np.random.Generator) -> None:
    for _ in range(4):
        inputs = rfc_inputs(rng)
        outputs = rfc_lib.run_local(inputs)
        assert len(outputs) == 1
        assert outputs[0].dtype == np.float32
        np.testing.assert_allclose(outputs[0], rfc_example_reference(**inputs), rtol=1e-5)


def test_rfc_example_accepts_tvm_tensors(
    rfc_lib: PipelineLibrary, rng: np.random.Generator
) -> None:
    inputs = rfc_inputs(rng)
    tensors = {name: tvm.runtime.tensor(value) for name, value in inputs.items()}
    np.testing.assert_allclose(
        rfc_lib.run_local(tensors)[0], rfc_example_reference(**inputs), rtol=1e-5
    )


def test_old_tvm_network_matches_numpy_in_output_order(
    old_lib: PipelineLibrary, rng: np.random.Generator
) -> None:
    for _ in range(4):
        data_0 = rng.standard_normal((3, 3)).astype("float32")
        data_1 = rng.standard_normal((3, 3)).astype("float32")
        outputs = old_lib.run_local({"data_0": data_0, "data_1": data_1})
        expected = old_tvm_test_reference(data_0, data_1)
        assert len(outputs) == 3
        for got, want in zip(outputs, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5)


def test_run_local_refuses_wrong_inputs(rfc_lib: PipelineLibrary, rng: np.random.Generator) -> None:
    inputs = rfc_inputs(rng)
    with pytest.raises(InputError, match=r"missing \['data_2'\]"):
        rfc_lib.run_local({"data_0": inputs["data_0"], "data_1": inputs["data_1"]})
    with pytest.raises(InputError, match="input 'data_1' expects dtype float32"):
        rfc_lib.run_local({**inputs, "data_1": inputs["data_1"].astype("float64")})
    with pytest.raises(InputError, match=r"input 'data_2' expects shape float32\[1, 4\]"):
        rfc_lib.run_local({**inputs, "data_2": np.zeros((4, 1), "float32")})


# ----- what the library knows


def test_library_knows_every_stage(rfc_lib: PipelineLibrary) -> None:
    f32 = "float32"
    assert [s.name for s in rfc_lib.stages] == ["mod1", "mod2", "mod3"]
    for stage in rfc_lib.stages:
        assert stage.kind == "relax"
        assert stage.device == "cpu"
        assert stage.target is not None and stage.target["kind"] == "llvm"
        assert stage.artifact == f"{stage.name}.so"
        assert (rfc_lib.directory / stage.artifact).is_file()
        assert stage.outputs == [TensorSpec("output(0)", f32, (1, 4))]
    mod1, mod2, mod3 = rfc_lib.stages
    assert mod1.inputs == [TensorSpec("data_0", f32, (1, 4)), TensorSpec("data_1", f32, (1, 4))]
    assert mod2.inputs == [TensorSpec("data_0", f32, (1, 4))]
    assert mod3.input_names == ["data_0", "data_1"]
    assert (mod1.rpc_key, mod1.cpu_affinity, mod1.num_threads) == ("rk3399", "0", 1)
    assert (mod2.rpc_key, mod2.cpu_affinity, mod2.num_threads) == ("", None, None)
    assert rfc_lib.stage("mod2") is mod2
    with pytest.raises(KeyError, match="mod1, mod2, mod3"):
        rfc_lib.stage("mod4")


def test_library_knows_the_graph(rfc_lib: PipelineLibrary) -> None:
    assert [(b.name, b.stage, b.param) for b in rfc_lib.inputs] == [
        ("data_0", "mod1", "data_0"),
        ("data_1", "mod1", "data_1"),
        ("data_2", "mod3", "data_0"),
    ]
    assert all(b.spec.dtype == "float32" and b.spec.shape == (1, 4) for b in rfc_lib.inputs)
    assert [(o.stage, o.index) for o in rfc_lib.outputs] == [("mod3", 0)]
    assert [(e.src, e.index, e.dst, e.param) for e in rfc_lib.connections] == [
        ("mod1", 0, "mod2", "data_0"),
        ("mod2", 0, "mod3", "data_1"),
    ]
    assert rfc_lib.param_groups == {}


def test_stage_names_follow_renames(rng: np.random.Generator) -> None:
    cfg = rfc_config()
    middle = cfg.topological_order()[1]
    cfg[middle].name = "square"
    lib = build(cfg)
    try:
        assert [s.name for s in lib.stages] == ["mod1", "square", "mod3"]
        assert lib.stage("square").artifact == "square.so"
        inputs = rfc_inputs(rng)
        np.testing.assert_allclose(
            lib.run_local(inputs)[0], rfc_example_reference(**inputs), rtol=1e-5
        )
    finally:
        lib.close()


# ----- params


def weighted_config(mod: tvm.IRModule) -> PipelineModuleConfig:
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "data_0")
    cfg.outputs.append((mod, 0))
    return cfg


def test_params_are_bound_at_build_time(rng: np.random.Generator) -> None:
    mod = weighted_module()
    w0 = rng.standard_normal((1, 4)).astype("float32")
    cfg = weighted_config(mod)
    cfg[mod].params = {"w": w0}
    np.testing.assert_array_equal(cfg[mod].params["w"], w0)
    lib = build(cfg)
    try:
        stage = lib.stages[0]
        assert stage.input_names == ["data_0"]
        assert stage.params_file is None and stage.param_group is None
        for _ in range(3):
            x = rng.standard_normal((1, 4)).astype("float32")
            np.testing.assert_allclose(
                lib.run_local({"x": x})[0], weighted_reference(x, w0), rtol=1e-5
            )
    finally:
        lib.close()


def test_params_accept_a_tvm_tensor(rng: np.random.Generator) -> None:
    mod = weighted_module()
    w0 = rng.standard_normal((1, 4)).astype("float32")
    cfg = weighted_config(mod)
    cfg[mod].params = {"w": tvm.runtime.tensor(w0)}
    np.testing.assert_array_equal(cfg[mod].params["w"], w0)


@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        ({"v": np.ones((1, 4), "float32")}, ["mod1 has no input 'v'", "valid inputs: data_0, w"]),
        (
            {"w": np.ones((2, 4), "float32")},
            ["mod1.w: param value is float32[2, 4]", "expects float32[1, 4]"],
        ),
        (
            {"w": np.ones((1, 4), "float64")},
            ["mod1.w: param value is float64[1, 4]", "expects float32[1, 4]"],
        ),
        (
            {"data_0": np.ones((1, 4), "float32")},
            ["mod1.data_0 is already fed by pipeline input 'x'"],
        ),
    ],
    ids=["wrong-name", "wrong-shape", "wrong-dtype", "already-an-input"],
)
def test_wrong_params_are_refused(params: dict, fragments: list[str]) -> None:
    mod = weighted_module()
    cfg = weighted_config(mod)
    good = np.full((1, 4), 2.0, "float32")
    cfg[mod].params = {"w": good}
    with pytest.raises(ConfigError) as err:
        cfg[mod].params = params
    for fragment in fragments:
        assert fragment in str(err.value)
    assert list(cfg[mod].params) == ["w"]
    np.testing.assert_array_equal(cfg[mod].params["w"], good)


def test_params_refused_for_a_python_stage() -> None:
    cfg = PipelineModuleConfig()
    with pytest.raises(ConfigError, match="only a Relax module takes params"):
        cfg[postprocess].params = {"logits": np.zeros(3)}


def test_param_group_keeps_weights_replaceable(rng: np.random.Generator) -> None:
    mod = weighted_module()
    w0 = rng.standard_normal((1, 4)).astype("float32")
    w1 = rng.standard_normal((1, 4)).astype("float32")
    cfg = weighted_config(mod)
    cfg[mod].params = {"w": w0}
    cfg.param_groups["g"] = mod
    lib = build(cfg)
    try:
        stage = lib.stages[0]
        assert stage.input_names == ["data_0", "w"]  # w stays an input of the compiled main
        assert stage.param_group == "g"
        assert lib.param_groups == {"g": "mod1"}
        assert stage.params_file is not None
        with np.load(lib.directory / stage.params_file) as saved:
            assert saved.files == ["w"]
            np.testing.assert_array_equal(saved["w"], w0)
        assert [b.name for b in lib.inputs] == ["x"]

        x = rng.standard_normal((1, 4)).astype("float32")
        np.testing.assert_allclose(lib.run_local({"x": x})[0], weighted_reference(x, w0), rtol=1e-5)
        lib.set_local_params("g", {"w": w1})
        np.testing.assert_allclose(lib.run_local({"x": x})[0], weighted_reference(x, w1), rtol=1e-5)
        assert not np.allclose(weighted_reference(x, w0), weighted_reference(x, w1))
        with pytest.raises(KeyError, match="no parameter group 'h'"):
            lib.set_local_params("h", {"w": w1})
    finally:
        lib.close()


# ----- Python stages


def test_python_stage_after_a_relax_module(rng: np.random.Generator) -> None:
    mod = unary_module("negative", shape=(2, 5))
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "data_0")
    cfg.connect(mod, 0, postprocess, "logits")
    cfg.outputs.append((postprocess, 0))
    cfg.outputs.append((mod, 0))
    lib = build(cfg)
    try:
        relax_stage, python_stage = lib.stages
        assert python_stage.name == "mod2"
        assert python_stage.kind == "python"
        assert python_stage.python == {"module": "modules", "function": "postprocess"}
        assert python_stage.artifact == "mod2.py"
        assert (lib.directory / "mod2.py").read_text() == Path(__file__).parent.parent.joinpath(
            "modules.py"
        ).read_text()
        assert python_stage.input_names == ["logits"]
        assert python_stage.outputs is None
        assert relax_stage.artifact == "mod1.so"
        for _ in range(3):
            x = rng.standard_normal((2, 5)).astype("float32")
            indices, negated = lib.run_local({"x": x})
            np.testing.assert_array_equal(indices, np.argmax(-x, axis=-1))
            np.testing.assert_allclose(negated, -x)
    finally:
        lib.close()


def test_python_stage_returning_a_tuple_feeds_a_relax_module(rng: np.random.Generator) -> None:
    first = unary_module("negative", shape=(1, 4))
    after = unary_module("exp", shape=(1,))
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, min_max, "data")
    cfg.connect(min_max, 1, after, "data_0")
    cfg.outputs.append((min_max, 0))
    cfg.outputs.append((after, 0))
    lib = build(cfg)
    try:
        assert [s.kind for s in lib.stages] == ["relax", "python", "relax"]
        x = rng.standard_normal((1, 4)).astype("float32")
        smallest, exp_largest = lib.run_local({"x": x})
        np.testing.assert_allclose(smallest, (-x).min(axis=-1))
        np.testing.assert_allclose(exp_largest, np.exp((-x).max(axis=-1)), rtol=1e-5)
    finally:
        lib.close()


def test_python_stage_returning_a_list_has_one_output(rng: np.random.Generator) -> None:
    first = unary_module("negative", shape=(1, 4))
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, as_list, "data")
    cfg.outputs.append((as_list, 0))
    lib = build(cfg)
    try:
        x = rng.standard_normal((1, 4)).astype("float32")
        (values,) = lib.run_local({"x": x})
        np.testing.assert_allclose(values, (-x).ravel())
    finally:
        lib.close()


# ----- cross-compiled stages


def elf_machines(tar_path: Path) -> dict[str, int]:
    """e_machine of every member of a tar, read from its ELF header (must be an ELF object)."""
    machines = {}
    with tarfile.open(tar_path) as archive:
        for member in archive.getmembers():
            extracted = archive.extractfile(member)
            assert extracted is not None, member.name
            header = extracted.read(20)
            assert header[:4] == b"\x7fELF", f"{member.name} is not an ELF object"
            byteorder = "little" if header[5] == 1 else "big"
            machines[member.name] = int.from_bytes(header[18:20], byteorder)
    return machines


def test_cross_compiled_stage_is_a_tar_of_aarch64_objects(rng: np.random.Generator) -> None:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, mod1, mod2, mod3)
    cfg[mod2].target = AARCH64
    cfg[mod2].rpc_key = "rk3399"
    lib = build(cfg)
    try:
        stage = lib.stage("mod2")
        assert stage.artifact == "mod2.tar"
        assert stage.target is not None and stage.target["mtriple"] == "aarch64-linux-gnu"
        machines = elf_machines(lib.directory / stage.artifact)
        assert machines, "the tar is empty"
        assert set(machines.values()) == {EM_AARCH64}, machines
        assert [s.artifact for s in lib.stages] == ["mod1.so", "mod2.tar", "mod3.so"]
        with pytest.raises(PackageError) as err:
            lib.run_local(rfc_inputs(rng))
        assert "'mod2'" in str(err.value)
        assert "runs on its board" in str(err.value)
    finally:
        lib.close()


def test_native_triple_is_not_cross_compiled() -> None:
    host = str(tvm.target.codegen.llvm_get_system_triple())
    mod = unary_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "data_0")
    cfg.outputs.append((mod, 0))
    cfg[mod].target = {"kind": "llvm", "mtriple": host}
    lib = build(cfg)
    try:
        assert lib.stages[0].artifact == "mod1.so"
        x = np.arange(4, dtype="float32").reshape(1, 4)
        np.testing.assert_array_equal(lib.run_local({"x": x})[0], -x)
    finally:
        lib.close()


# ----- parallel compiles and failures


def test_parallel_build_behaves_like_serial_build(
    monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    forked: list[str] = []
    real_fork_compile = build_module._fork_compile

    def counting_fork_compile(job):  # type: ignore[no-untyped-def]
        forked.append(job.stage)
        return real_fork_compile(job)

    monkeypatch.setattr(build_module, "_fork_compile", counting_fork_compile)
    can_fork = threading.active_count() == 1
    parallel = build(rfc_config())
    serial = build(rfc_config(), jobs=1)
    try:
        if can_fork:
            assert sorted(forked) == ["mod1", "mod2", "mod3"]  # only the default build forked
        assert [s.name for s in parallel.stages] == [s.name for s in serial.stages]
        for stage in parallel.stages:
            assert (parallel.directory / stage.artifact).stat().st_size > 0
        for _ in range(3):
            inputs = rfc_inputs(rng)
            np.testing.assert_array_equal(
                parallel.run_local(inputs)[0], serial.run_local(inputs)[0]
            )
    finally:
        parallel.close()
        serial.close()


def failing_config() -> PipelineModuleConfig:
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, mod1, mod2, mod3)
    cfg[mod2].target = {"kind": "llvm", "mtriple": "foo-bar-baz"}  # parses, cannot compile
    return cfg


@pytest.mark.parametrize("jobs", [None, 1], ids=["default-jobs", "jobs-1"])
def test_stage_that_fails_to_compile_raises_build_error_naming_it(jobs: int | None) -> None:
    with pytest.raises(BuildError) as err:
        build(failing_config(), jobs=jobs)
    message = str(err.value)
    del err
    gc.collect()
    assert "stage 'mod2' failed to compile" in message
    assert "No available targets are compatible with triple" in message
    assert "'mod1'" not in message and "'mod3'" not in message


@pytest.mark.filterwarnings("ignore:Implicitly cleaning up:ResourceWarning")
@pytest.mark.parametrize("jobs", [None, 1], ids=["default-jobs", "jobs-1"])
def test_failed_build_removes_its_build_directory(
    jobs: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        with pytest.raises(BuildError) as err:
            build(failing_config(), jobs=jobs)
        leftovers = [p.name for p in tmp_path.iterdir()]
    finally:
        del err
        gc.collect()
    assert leftovers == []


CRASH_ON_MOD2 = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])  # tests/, for modules.py
import tvm
from modules import rfc_example_modules, wire_rfc_example
from tvmpipe.orchestrator import PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator import build as build_module
from tvmpipe.proto.errors import BuildError

real_compile_one = build_module._compile_one

def crash_on_mod2(job):
    if job.stage == "mod2":
        os.kill(os.getpid(), signal.SIGSEGV)
    real_compile_one(job)

build_module._compile_one = crash_on_mod2
cfg = PipelineModuleConfig()
wire_rfc_example(cfg, *rfc_example_modules())
try:
    with tvm.transform.PassContext(opt_level=3):
        build_pipeline(cfg)
except BuildError as exc:
    print(exc)
"""


@pytest.mark.timeout(120)
def test_compiler_process_that_dies_names_the_stage() -> None:
    """Run in a fresh process: build forks its compiles only where no other thread runs (a
    test process may hold some), and a SIGSEGV in this one would end the test run."""
    tests = str(Path(__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-c", CRASH_ON_MOD2, tests], capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage 'mod2': the compiler process died of SIGSEGV" in result.stdout, result.stdout


# ----- per-stage build functions and Relax pipelines


@pytest.mark.parametrize("jobs", [None, 1], ids=["default-jobs", "jobs-1"])
def test_build_func_replaces_the_default_compile(
    jobs: int | None, rfc_lib: PipelineLibrary, rng: np.random.Generator, tmp_path: Path
) -> None:
    cfg = rfc_config()
    calls: list[tuple[str, str]] = []

    def compile_and_record(mod: tvm.IRModule, target: tvm.target.Target) -> object:
        stage = next(cfg.name_of(m) for m in cfg.modules if m is mod)
        calls.append((stage, target.kind.name))
        return tvm.compile(mod, target)

    first, _, third = cfg.topological_order()
    cfg[first].build_func = compile_and_record  # a closure: it runs in this process
    cfg[third].build_func = lambda mod, target: compile_and_record(mod, target)
    lib = build(cfg, jobs=jobs)
    try:
        assert sorted(calls) == [("mod1", "llvm"), ("mod3", "llvm")]
        for _ in range(3):
            inputs = rfc_inputs(rng)
            np.testing.assert_array_equal(lib.run_local(inputs)[0], rfc_lib.run_local(inputs)[0])
        described = [s.build_func for s in lib.stages]
        assert described[0] is not None and described[0].endswith("compile_and_record")
        assert described[1] is None
        assert described[2] is not None and "<lambda>" in described[2]
        loaded = load_library(lib.export_library(tmp_path / "pkg"))
        assert [s.build_func for s in loaded.stages] == described
    finally:
        lib.close()


@pytest.mark.parametrize("jobs", [None, 1], ids=["default-jobs", "jobs-1"])
def test_build_func_that_raises_names_the_stage(jobs: int | None) -> None:
    cfg = rfc_config()
    middle = cfg.topological_order()[1]

    def broken(mod: tvm.IRModule, target: tvm.target.Target) -> object:
        raise RuntimeError("tuning database unreachable")

    cfg[middle].build_func = broken
    with pytest.raises(BuildError) as err:
        build(cfg, jobs=jobs)
    assert "stage 'mod2' failed to compile" in str(err.value)
    assert "tuning database unreachable" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)
    assert "'mod1'" not in str(err.value) and "'mod3'" not in str(err.value)


def test_build_func_must_return_an_exportable_module() -> None:
    cfg = rfc_config()
    cfg[cfg.topological_order()[2]].build_func = lambda mod, target: mod  # not compiled
    with pytest.raises(BuildError) as err:
        build(cfg)
    assert "stage 'mod3' failed to compile" in str(err.value)
    assert "build_func returned IRModule, not a compiled module" in str(err.value)
    assert isinstance(err.value.__cause__, TypeError)


def test_build_options_are_checked_where_they_are_set() -> None:
    cfg = rfc_config()
    mod = cfg.topological_order()[0]
    with pytest.raises(ConfigError, match=r"mod1: build_func must be callable as f\(mod, target\)"):
        cfg[mod].build_func = "tvm.compile"
    with pytest.raises(ConfigError, match=r"mod1: relax_pipeline must be .* got 'fastest'"):
        cfg[mod].relax_pipeline = "fastest"
    with pytest.raises(ConfigError, match="only a Relax module is compiled; build_func"):
        cfg[postprocess].build_func = tvm.compile
    with pytest.raises(ConfigError, match="only a Relax module is compiled; relax_pipeline"):
        cfg[postprocess].relax_pipeline = "zero"
    assert cfg[mod].build_func is None and cfg[mod].relax_pipeline == "default"

    cfg[mod].relax_pipeline = "default_build"
    with pytest.raises(ConfigError, match="mod1: build_func replaces the default compile"):
        cfg[mod].build_func = tvm.compile
    cfg[mod].relax_pipeline = "default"
    cfg[mod].build_func = tvm.compile
    with pytest.raises(ConfigError, match="mod1: build_func replaces the default compile"):
        cfg[mod].relax_pipeline = relax.get_pipeline("default")
    cfg[mod].build_func = None
    cfg[mod].relax_pipeline = relax.get_pipeline("default")


@pytest.mark.parametrize("jobs", [None, 1], ids=["default-jobs", "jobs-1"])
def test_custom_relax_pipeline_is_used(
    jobs: int | None, rfc_lib: PipelineLibrary, rng: np.random.Generator, tmp_path: Path
) -> None:
    log = tmp_path / "pipeline.log"  # a file: with jobs > 1 the pipeline runs in a child

    def logged_default(mod: tvm.IRModule) -> tvm.IRModule:
        lowered = relax.get_pipeline("default")(mod)
        with log.open("a") as f:
            f.write(",".join(sorted(gv.name_hint for gv in lowered.get_global_vars())) + "\n")
        return lowered

    cfg = rfc_config()
    first, second, _ = cfg.topological_order()
    cfg[first].relax_pipeline = logged_default
    cfg[second].relax_pipeline = "default_build"
    lib = build(cfg, jobs=jobs)
    try:
        (lowered_functions,) = log.read_text().splitlines()  # mod1's, once
        assert "main" in lowered_functions.split(",") and "add" in lowered_functions
        assert [s.relax_pipeline for s in lib.stages] == [
            f"{__name__}.test_custom_relax_pipeline_is_used.<locals>.logged_default",
            "default_build",
            None,
        ]
        inputs = rfc_inputs(rng)
        np.testing.assert_array_equal(lib.run_local(inputs)[0], rfc_lib.run_local(inputs)[0])
    finally:
        lib.close()


def test_package_without_build_options_still_loads(
    rfc_lib: PipelineLibrary, rng: np.random.Generator, tmp_path: Path
) -> None:
    """Packages written before build_func and relax_pipeline were recorded."""
    package = rfc_lib.export_library(tmp_path / "old")
    manifest = json.loads((package / "pipeline.json").read_text())
    for stage in manifest["stages"]:
        del stage["build_func"], stage["relax_pipeline"]
    (package / "pipeline.json").write_text(json.dumps(manifest))
    loaded = load_library(package)
    try:
        assert [(s.build_func, s.relax_pipeline) for s in loaded.stages] == [(None, None)] * 3
        inputs = rfc_inputs(rng)
        np.testing.assert_array_equal(loaded.run_local(inputs)[0], rfc_lib.run_local(inputs)[0])
    finally:
        loaded.close()
