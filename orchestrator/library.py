"""PipelineLibrary: the built pipeline, its package on disk, and ``run_local``.

A package is a directory: ``pipeline.json`` (the graph, every stage's target, device and
signature, artifact names with their sha256, versions) beside one artifact per stage. It is
self-contained: a machine with tvmpipe and TVM can load it and deploy it without the models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tvmpipe.proto.errors import InputError, PackageError
from tvmpipe.proto.version import PACKAGE_SCHEMA_VERSION, PACKAGE_VERSION
from tvmpipe.worker.runner import StageRunner

from .signature import TensorSpec

MANIFEST = "pipeline.json"


def tvm_version() -> str:
    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        import tvm

        return str(tvm.__version__)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StageInfo:
    """Everything a worker needs to run one stage, and the controller to wire it."""

    name: str
    kind: str  # "relax" or "python"
    artifact: str
    sha256: str
    inputs: list[TensorSpec]  # the stage's inputs in call order (group params included)
    outputs: list[TensorSpec] | None  # None: a Python stage, count known when it runs
    target: dict[str, Any] | None = None  # tvm.target.Target(...).export()
    device: str = "cpu"
    rpc_key: str = ""
    cpu_affinity: str | None = None
    num_threads: int | None = None
    python: dict[str, str] | None = None  # {"module": ..., "function": ...}
    param_group: str | None = None
    params_file: str | None = None
    params_sha256: str | None = None
    # How a custom compile was asked for (e.g. "mymodule.tune_and_build"); None: tvm.compile's
    # default. Packages written before these fields existed load with None.
    build_func: str | None = None
    relax_pipeline: str | None = None
    # The tuning database the stage was built with: {"path", "sha256"} (build_pipeline's
    # database=); None: untuned.
    tuning_database: dict[str, str] | None = None

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["inputs"] = [spec.to_json() for spec in self.inputs]
        data["outputs"] = None if self.outputs is None else [s.to_json() for s in self.outputs]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageInfo:
        data = dict(data)
        data["inputs"] = [TensorSpec.from_json(s) for s in data["inputs"]]
        if data.get("outputs") is not None:
            data["outputs"] = [TensorSpec.from_json(s) for s in data["outputs"]]
        return cls(**data)


@dataclass(frozen=True)
class InputBinding:
    """Pipeline input ``name`` feeds ``stage.param``; ``spec`` is what it accepts."""

    name: str
    stage: str
    param: str
    spec: TensorSpec


@dataclass(frozen=True)
class OutputBinding:
    stage: str
    index: int


@dataclass(frozen=True)
class Edge:
    """``src.output(index) -> dst.param``, by stage name."""

    src: str
    index: int
    dst: str
    param: str


@dataclass
class PipelineLibrary:
    """A built pipeline: stages in topological order and the graph between them."""

    stages: list[StageInfo]
    inputs: list[InputBinding]
    outputs: list[OutputBinding]
    connections: list[Edge]
    param_groups: dict[str, str]  # group -> stage name
    directory: Path  # where the artifacts live
    _cleanup: Any = field(default=None, repr=False)  # removes a build's temporary directory
    _runners: dict[str, StageRunner] = field(default_factory=dict, repr=False)

    # ----- lookups
    def stage(self, name: str) -> StageInfo:
        for info in self.stages:
            if info.name == name:
                return info
        raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in self.stages)}")

    def artifact_path(self, stage: StageInfo) -> Path:
        return self.directory / stage.artifact

    def input_names(self) -> list[str]:
        return [b.name for b in self.inputs]

    def initial_params(self, stage: StageInfo) -> dict[str, np.ndarray]:
        if stage.params_file is None:
            return {}
        with np.load(self.directory / stage.params_file, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    def check_input(self, name: str, value: Any, copy: bool = True) -> np.ndarray:
        """The value as an array this input accepts; raises InputError naming what it expects.

        ``copy=False`` borrows a C-contiguous array as it is: the caller promises not to write
        to it until its result has arrived (it saves a copy and fresh pages per input).
        """
        binding = next((b for b in self.inputs if b.name == name), None)
        if binding is None:
            valid = ", ".join(self.input_names())
            raise InputError(f"no pipeline input {name!r}; valid inputs: {valid}")
        if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
            value = value.numpy()
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise InputError(
                f"input {name!r}: cannot make an array of {type(value).__name__}"
            ) from exc
        spec = binding.spec
        given = TensorSpec.of(name, array)
        if spec.dtype is not None and given.dtype != spec.dtype:
            raise InputError(
                f"input {name!r} expects dtype {spec.dtype} ({spec.describe()}), got {array.dtype}"
            )
        if array.dtype.kind not in "biufc":
            raise InputError(
                f"input {name!r}: dtype {array.dtype} cannot travel; use a numeric one"
            )
        if not spec.compatible(given):
            raise InputError(
                f"input {name!r} expects shape {spec.describe()}, got {list(array.shape)}"
            )
        # A copy by default: the caller may reuse its buffer, and the send borrows this one.
        return np.array(array, order="C", copy=True if copy else None)

    # ----- local execution
    def runner(self, stage: StageInfo) -> StageRunner:
        if stage.name not in self._runners:
            if stage.artifact.endswith(".tar"):
                raise PackageError(
                    f"stage {stage.name!r} is cross-compiled for {stage.target}; it runs on its "
                    f"board, not in run_local"
                )
            python = stage.python
            self._runners[stage.name] = StageRunner(
                stage.kind,
                self.artifact_path(stage),
                stage.device,
                stage.input_names,
                (python["module"], python["function"]) if python else None,
                self.initial_params(stage),
            )
        return self._runners[stage.name]

    def run_local(self, inputs: Mapping[str, Any]) -> list[np.ndarray]:
        """Run the stages one after another in this process: the reference for the pipeline."""
        missing = [n for n in self.input_names() if n not in inputs]
        unknown = [n for n in inputs if n not in self.input_names()]
        if missing or unknown:
            raise InputError(
                f"run_local needs exactly the pipeline inputs {self.input_names()}; "
                f"missing {missing}, unknown {unknown}"
            )
        values: dict[tuple[str, str], Any] = {}
        for binding in self.inputs:
            values[(binding.stage, binding.param)] = self.check_input(
                binding.name, inputs[binding.name]
            )
        results: dict[str, list[np.ndarray]] = {}
        for stage in self.stages:
            runner = self.runner(stage)
            feed = {
                n: values[(stage.name, n)] for n in stage.input_names if n not in runner.param_names
            }
            results[stage.name] = outs = runner(feed)
            for edge in self.connections:
                if edge.src == stage.name:
                    values[(edge.dst, edge.param)] = outs[edge.index]
        return [results[o.stage][o.index] for o in self.outputs]

    def set_local_params(self, group: str, params: Mapping[str, Any]) -> None:
        """Replace a parameter group's weights for later ``run_local`` calls."""
        if group not in self.param_groups:
            raise KeyError(f"no parameter group {group!r}; groups: {list(self.param_groups)}")
        stage = self.stage(self.param_groups[group])
        unknown = sorted(set(params) - set(self.initial_params(stage)))
        if unknown:
            raise KeyError(f"parameter group {group!r} has no weights {unknown}")
        self.runner(stage).set_params({k: np.asarray(v) for k, v in params.items()})

    # ----- package
    def manifest(self) -> dict[str, Any]:
        return {
            "schema": PACKAGE_SCHEMA_VERSION,
            "tvmpipe": PACKAGE_VERSION,
            "tvm": tvm_version(),
            "stages": [s.to_json() for s in self.stages],
            "inputs": [
                {"name": b.name, "stage": b.stage, "param": b.param, **_spec_fields(b.spec)}
                for b in self.inputs
            ],
            "outputs": [{"stage": o.stage, "index": o.index} for o in self.outputs],
            "connections": [e.__dict__ for e in self.connections],
            "param_groups": dict(self.param_groups),
        }

    def export_library(self, directory: str | Path) -> Path:
        """Write the package: pipeline.json and one artifact (plus params) per stage."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        if target.resolve() != self.directory.resolve():
            for stage in self.stages:
                for name in (stage.artifact, stage.params_file):
                    if name:
                        shutil.copyfile(self.directory / name, target / name)
        (target / MANIFEST).write_text(json.dumps(self.manifest(), indent=2) + "\n")
        return target

    def close(self) -> None:
        """Forget the loaded stages and remove a build's temporary directory."""
        self._runners.clear()
        if self._cleanup is not None:
            self._cleanup()


def _spec_fields(spec: TensorSpec) -> dict[str, Any]:
    data = spec.to_json()
    data.pop("name")
    return data


def new_build_directory() -> Path:
    return Path(tempfile.mkdtemp(prefix="tvmpipe-build-"))


def remove_with(owner: object, directory: Path) -> Any:
    """Remove directory when owner is closed or collected, whichever comes first."""
    return weakref.finalize(owner, shutil.rmtree, directory, True)


def load_library(directory: str | Path) -> PipelineLibrary:
    """Read a package written by ``export_library``; check its versions and every hash."""
    root = Path(directory)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(f"{root} is not a pipeline package: it has no {MANIFEST}")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{manifest_path} is not valid JSON: {exc}") from exc
    _check_versions(data, manifest_path)
    try:
        stages = [StageInfo.from_json(s) for s in data["stages"]]
        inputs = [
            InputBinding(i["name"], i["stage"], i["param"], TensorSpec.from_json(i))
            for i in data["inputs"]
        ]
        outputs = [OutputBinding(o["stage"], int(o["index"])) for o in data["outputs"]]
        connections = [
            Edge(e["src"], int(e["index"]), e["dst"], e["param"]) for e in data["connections"]
        ]
        groups = {str(k): str(v) for k, v in data["param_groups"].items()}
        _check_references(stages, inputs, outputs, connections, groups)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PackageError(f"{manifest_path} is missing or has a malformed field: {exc!r}") from exc
    for stage in stages:
        _check_file(root, stage.artifact, stage.sha256, stage.name)
        if stage.params_file:
            _check_file(root, stage.params_file, stage.params_sha256 or "", stage.name)
    return PipelineLibrary(stages, inputs, outputs, connections, groups, root)


def _check_references(
    stages: list[StageInfo],
    inputs: list[InputBinding],
    outputs: list[OutputBinding],
    connections: list[Edge],
    groups: dict[str, str],
) -> None:
    """Every name the graph uses must be a stage of the package, every file name a string."""
    names = {s.name for s in stages}
    for stage in stages:
        for field_name in ("name", "artifact", "sha256"):
            if not isinstance(getattr(stage, field_name), str):
                raise TypeError(f"stage field {field_name!r} must be a string")
    used = [b.stage for b in inputs] + [o.stage for o in outputs] + list(groups.values())
    used += [e.src for e in connections] + [e.dst for e in connections]
    unknown = sorted(set(used) - names)
    if unknown:
        raise KeyError(f"the graph names stages {unknown} that the package does not hold")


def _check_versions(data: Any, path: Path) -> None:
    if not isinstance(data, dict):
        raise PackageError(f"{path} must hold a JSON object")
    schema = data.get("schema")
    if schema != PACKAGE_SCHEMA_VERSION:
        raise PackageError(
            f"{path} has package schema {schema!r}, written by tvmpipe {data.get('tvmpipe')}; "
            f"this tvmpipe {PACKAGE_VERSION} reads schema {PACKAGE_SCHEMA_VERSION}: rebuild the "
            f"pipeline with this version"
        )
    built_with = str(data.get("tvm"))
    here = tvm_version()
    if built_with.split(".")[:2] != here.split(".")[:2]:
        raise PackageError(
            f"{path} was built with apache-tvm {built_with} but this machine has {here}: "
            f"rebuild the pipeline or install apache-tvm=={built_with}"
        )


def _check_file(root: Path, name: str, expected: str, stage: str) -> None:
    path = root / name
    if Path(name).name != name:
        raise PackageError(f"stage {stage!r}: artifact name {name!r} must be a plain file name")
    if not path.is_file():
        raise PackageError(f"stage {stage!r}: the package is missing {name}")
    actual = sha256_of(path)
    if actual != expected:
        raise PackageError(
            f"stage {stage!r}: {name} is damaged (sha256 {actual[:12]}..., expected "
            f"{expected[:12]}...); export the package again"
        )
