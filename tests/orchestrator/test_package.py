"""The pipeline package: what export_library writes, load_library round trips, and clear
PackageErrors for damaged or incompatible packages."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tvm
from modules import (
    postprocess,
    rfc_example_modules,
    weighted_module,
)

from tvmpipe.orchestrator import (
    PackageError,
    PipelineLibrary,
    PipelineModuleConfig,
    build_pipeline,
    load_library,
)
from tvmpipe.proto.version import PACKAGE_SCHEMA_VERSION

pytestmark = pytest.mark.timeout(120)

W0 = np.array([[1.0, -2.0, 0.5, 3.0]], "float32")
W1 = np.array([[0.0, 1.0, 2.0, -1.0]], "float32")


def package_config() -> PipelineModuleConfig:
    """data_0, data_1 -> mod1 (add) -> mod2 (x * w + 1, w in group "g") -> mod3 (data_2 - x)
    -> mod4 (postprocess, a Python stage); outputs: mod3.output(0), mod4.output(0)."""
    add, _, subtract = rfc_example_modules()
    weighted = weighted_module()
    cfg = PipelineModuleConfig()
    cfg.inputs["data_0"] = (add, "data_0")
    cfg.inputs["data_1"] = (add, "data_1")
    cfg.inputs["data_2"] = (subtract, "data_0")
    cfg.connect(add, 0, weighted, "data_0")
    cfg.connect(weighted, 0, subtract, "data_1")
    cfg.connect(subtract, 0, postprocess, "logits")
    cfg.outputs.append((subtract, 0))
    cfg.outputs.append((postprocess, 0))
    cfg[weighted].params = {"w": W0}
    cfg.param_groups["g"] = weighted
    cfg[weighted].rpc_key = "rk3399"
    cfg[weighted].cpu_affinity = "0-1"
    cfg[weighted].num_threads = 2
    return cfg


def reference(data_0, data_1, data_2, w=W0) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    out = data_2 - ((data_0 + data_1) * w + 1)
    return [out, np.argmax(out, axis=-1)]


def random_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {f"data_{i}": rng.standard_normal((1, 4)).astype("float32") for i in range(3)}


def assert_outputs(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])


@pytest.fixture(scope="module")
def built() -> Iterator[PipelineLibrary]:
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(package_config())
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def package(built: PipelineLibrary, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported package; tests that damage it work on a copy."""
    return built.export_library(tmp_path_factory.mktemp("package") / "pipe_dir")


@pytest.fixture
def copy(package: Path, tmp_package_dir: Path) -> Path:
    return Path(shutil.copytree(package, tmp_package_dir))


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "pipeline.json").read_text())  # type: ignore[no-any-return]


def write_manifest(directory: Path, data: Any) -> None:
    (directory / "pipeline.json").write_text(json.dumps(data))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----- what export_library writes


def test_export_writes_manifest_and_one_artifact_per_stage(package: Path) -> None:
    assert sorted(p.name for p in package.iterdir()) == [
        "mod1.so",
        "mod2.params.npz",
        "mod2.so",
        "mod3.so",
        "mod4.py",
        "pipeline.json",
    ]


def test_manifest_versions(package: Path) -> None:
    data = read_manifest(package)
    assert data["schema"] == PACKAGE_SCHEMA_VERSION == 1
    assert data["tvmpipe"] == metadata.version("tvmpipe")
    assert data["tvm"] == metadata.version("apache-tvm")
    assert data["tvm"].startswith(".".join(tvm.__version__.split(".")[:2]))


def test_manifest_stages(package: Path) -> None:
    stages = read_manifest(package)["stages"]
    assert [s["name"] for s in stages] == ["mod1", "mod2", "mod3", "mod4"]
    assert [s["kind"] for s in stages] == ["relax", "relax", "relax", "python"]
    assert [s["artifact"] for s in stages] == ["mod1.so", "mod2.so", "mod3.so", "mod4.py"]
    for stage in stages:
        assert stage["sha256"] == sha256(package / stage["artifact"])
        assert stage["device"] == "cpu"
    for stage in stages[:3]:
        assert stage["target"]["kind"] == "llvm"
    f32x4 = {"dtype": "float32", "shape": [1, 4]}
    assert stages[0]["inputs"] == [{"name": "data_0", **f32x4}, {"name": "data_1", **f32x4}]
    assert stages[0]["outputs"] == [{"name": "output(0)", **f32x4}]
    assert stages[1]["inputs"] == [{"name": "data_0", **f32x4}, {"name": "w", **f32x4}]
    assert (stages[1]["rpc_key"], stages[1]["cpu_affinity"], stages[1]["num_threads"]) == (
        "rk3399",
        "0-1",
        2,
    )
    assert stages[1]["param_group"] == "g"
    assert stages[1]["params_file"] == "mod2.params.npz"
    assert stages[1]["params_sha256"] == sha256(package / "mod2.params.npz")
    assert stages[0]["param_group"] is None and stages[0]["params_file"] is None
    assert stages[3]["python"] == {"module": "modules", "function": "postprocess"}
    assert stages[3]["inputs"] == [{"name": "logits", "dtype": None, "shape": None}]
    assert stages[3]["outputs"] is None
    assert stages[3]["target"] is None


def test_manifest_graph(package: Path) -> None:
    data = read_manifest(package)
    f32x4 = {"dtype": "float32", "shape": [1, 4]}
    assert data["inputs"] == [
        {"name": "data_0", "stage": "mod1", "param": "data_0", **f32x4},
        {"name": "data_1", "stage": "mod1", "param": "data_1", **f32x4},
        {"name": "data_2", "stage": "mod3", "param": "data_0", **f32x4},
    ]
    assert data["outputs"] == [{"stage": "mod3", "index": 0}, {"stage": "mod4", "index": 0}]
    assert data["connections"] == [
        {"src": "mod1", "index": 0, "dst": "mod2", "param": "data_0"},
        {"src": "mod2", "index": 0, "dst": "mod3", "param": "data_1"},
        {"src": "mod3", "index": 0, "dst": "mod4", "param": "logits"},
    ]
    assert data["param_groups"] == {"g": "mod2"}


def test_params_file_holds_the_initial_weights(package: Path) -> None:
    with np.load(package / "mod2.params.npz", allow_pickle=False) as saved:
        assert saved.files == ["w"]
        np.testing.assert_array_equal(saved["w"], W0)


# ----- load_library round trips


def test_load_library_round_trips(
    built: PipelineLibrary, package: Path, rng: np.random.Generator
) -> None:
    loaded = load_library(package)
    assert loaded.directory == package
    assert loaded.stages == built.stages
    assert [(b.name, b.stage, b.param, b.spec.dtype, b.spec.shape) for b in loaded.inputs] == [
        (b.name, b.stage, b.param, b.spec.dtype, b.spec.shape) for b in built.inputs
    ]
    assert loaded.outputs == built.outputs
    assert loaded.connections == built.connections
    assert loaded.param_groups == built.param_groups == {"g": "mod2"}
    for _ in range(3):
        inputs = random_inputs(rng)
        before, after = built.run_local(inputs), loaded.run_local(inputs)
        assert_outputs(after, before)
        assert_outputs(after, reference(**inputs))


def test_input_bindings_round_trip_exactly(built: PipelineLibrary, package: Path) -> None:
    assert load_library(package).inputs == built.inputs


def test_loaded_library_param_group_can_be_replaced(
    package: Path, rng: np.random.Generator
) -> None:
    loaded = load_library(package)
    inputs = random_inputs(rng)
    assert_outputs(loaded.run_local(inputs), reference(**inputs, w=W0))
    loaded.set_local_params("g", {"w": W1})
    assert_outputs(loaded.run_local(inputs), reference(**inputs, w=W1))
    assert_outputs(load_library(package).run_local(inputs), reference(**inputs, w=W0))


def test_loaded_package_can_be_exported_again(
    package: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    again = load_library(package).export_library(tmp_path / "again")
    assert read_manifest(again) == read_manifest(package)
    inputs = random_inputs(rng)
    assert_outputs(load_library(again).run_local(inputs), reference(**inputs))


def test_python_stage_loads_from_the_shipped_source(copy: Path, rng: np.random.Generator) -> None:
    data = read_manifest(copy)
    data["stages"][3]["python"]["module"] = "tvmpipe_test_module_that_is_not_installed"
    write_manifest(copy, data)
    inputs = random_inputs(rng)
    assert_outputs(load_library(copy).run_local(inputs), reference(**inputs))


def test_package_survives_a_move(copy: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    moved = Path(shutil.move(copy, tmp_path / "elsewhere"))
    inputs = random_inputs(rng)
    assert_outputs(load_library(moved).run_local(inputs), reference(**inputs))


def test_tvm_patch_version_difference_is_accepted(copy: Path) -> None:
    data = read_manifest(copy)
    major_minor = ".".join(data["tvm"].split(".")[:2])
    data["tvm"] = f"{major_minor}.99"
    write_manifest(copy, data)
    assert [s.name for s in load_library(copy).stages] == ["mod1", "mod2", "mod3", "mod4"]


# ----- damaged or incompatible packages


def test_missing_manifest(copy: Path) -> None:
    (copy / "pipeline.json").unlink()
    with pytest.raises(PackageError, match=r"is not a pipeline package: it has no pipeline\.json"):
        load_library(copy)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"has no pipeline\.json"):
        load_library(tmp_path / "nothing-here")


@pytest.mark.parametrize(
    "text", ["{not json", "", '{"schema": 1,}'], ids=["broken", "empty", "comma"]
)
def test_invalid_json(copy: Path, text: str) -> None:
    (copy / "pipeline.json").write_text(text)
    with pytest.raises(PackageError, match=r"pipeline\.json is not valid JSON"):
        load_library(copy)


def test_manifest_that_is_not_an_object(copy: Path) -> None:
    write_manifest(copy, [read_manifest(copy)])
    with pytest.raises(PackageError, match="must hold a JSON object"):
        load_library(copy)


@pytest.mark.parametrize(
    ("name", "stage"),
    [("mod1.so", "mod1"), ("mod4.py", "mod4"), ("mod2.params.npz", "mod2")],
)
def test_changed_bytes_are_reported_as_damaged(copy: Path, name: str, stage: str) -> None:
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError) as err:
        load_library(copy)
    message = str(err.value)
    assert f"stage {stage!r}" in message
    assert f"{name} is damaged" in message
    assert "export the package again" in message


def test_missing_artifact(copy: Path) -> None:
    (copy / "mod3.so").unlink()
    with pytest.raises(PackageError, match=r"stage 'mod3': the package is missing mod3\.so"):
        load_library(copy)


def test_wrong_schema_version(copy: Path) -> None:
    data = read_manifest(copy)
    data["schema"] = 99
    write_manifest(copy, data)
    with pytest.raises(PackageError) as err:
        load_library(copy)
    assert "package schema 99" in str(err.value)
    assert f"reads schema {PACKAGE_SCHEMA_VERSION}" in str(err.value)


@pytest.mark.parametrize("version", ["0.26.0", "1.27.0", None], ids=str)
def test_different_tvm_major_minor(copy: Path, version: str | None) -> None:
    data = read_manifest(copy)
    data["tvm"] = version
    write_manifest(copy, data)
    with pytest.raises(PackageError) as err:
        load_library(copy)
    assert f"built with apache-tvm {version}" in str(err.value)
    assert f"this machine has {metadata.version('apache-tvm')}" in str(err.value)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data[key] = value

    return edit


def _set_in_stage(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["stages"][0][key] = value

    return edit


def _drop_from_stage(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        del data["stages"][0][key]

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        del data[key]

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_set("stages", 5), id="stages-an-int"),
        pytest.param(_set("stages", "mod1"), id="stages-a-string"),
        pytest.param(_set("stages", {"mod1": {}}), id="stages-an-object"),
        pytest.param(_drop("stages"), id="stages-missing"),
        pytest.param(_drop_from_stage("sha256"), id="stage-without-sha256"),
        pytest.param(_set_in_stage("colour", "red"), id="stage-unknown-field"),
        pytest.param(_set_in_stage("inputs", None), id="stage-inputs-null"),
        pytest.param(_set("outputs", [{"stage": "mod3", "index": "first"}]), id="output-index-str"),
        pytest.param(_set("connections", [["mod1", 0, "mod2", "data_0"]]), id="connection-list"),
        pytest.param(_set("inputs", [{"name": "data_0"}]), id="input-without-stage"),
        pytest.param(
            _set("param_groups", ["g"]),
            id="param-groups-a-list",
        ),
        pytest.param(
            _set_in_stage("inputs", [5]),
            id="stage-input-an-int",
        ),
        pytest.param(
            _set_in_stage("artifact", None),
            id="artifact-null",
        ),
    ],
)
def test_malformed_field(copy: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = read_manifest(copy)
    edit(data)
    write_manifest(copy, data)
    with pytest.raises(PackageError, match=r"pipeline\.json is missing or has a malformed field"):
        load_library(copy)


def test_connection_to_a_stage_not_in_the_package(copy: Path) -> None:
    data = read_manifest(copy)
    data["connections"][0]["dst"] = "mod9"
    write_manifest(copy, data)
    with pytest.raises(PackageError, match="mod9"):
        load_library(copy)


@pytest.mark.parametrize("name", ["../mod1.so", "sub/mod1.so", "/tmp/mod1.so"])
def test_artifact_name_with_a_path_is_refused(copy: Path, name: str) -> None:
    (copy / "sub").mkdir()
    shutil.copyfile(copy / "mod1.so", copy / "sub" / "mod1.so")
    data = read_manifest(copy)
    data["stages"][0]["artifact"] = name
    write_manifest(copy, data)
    with pytest.raises(PackageError) as err:
        load_library(copy)
    assert f"stage 'mod1': artifact name {name!r} must be a plain file name" in str(err.value)


def test_params_file_name_with_a_path_is_refused(copy: Path) -> None:
    data = read_manifest(copy)
    data["stages"][1]["params_file"] = "../mod2.params.npz"
    write_manifest(copy, data)
    with pytest.raises(PackageError, match=r"stage 'mod2': artifact name '\.\./mod2\.params\.npz'"):
        load_library(copy)
