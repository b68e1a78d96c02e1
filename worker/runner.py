"""Load one stage's artifact and run it on named inputs.

The same code runs a stage on a worker and in ``lib.run_local``, so the local debugging path is
the distributed one minus the network. A Relax stage runs in ``relax.VirtualMachine`` on its
device; a Python stage is imported by module and name, or from the source file shipped with it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

_LINK_LOCK = threading.Lock()


def tvm_device(kind: str) -> Any:
    """The device a stage runs on; refuses one this machine does not have."""
    dev = tvm.cpu(0) if kind == "cpu" else tvm.device(kind, 0)
    if not dev.exist:
        raise RuntimeError(f"device {kind!r} is not present on this machine")
    return dev


def load_relax_library(path: Path) -> Any:
    """A ``.so`` loads as is; a ``.tar`` of objects (cross-compiled) is linked here first."""
    if path.suffix == ".tar":
        from tvm.support import cc, tar  # only boards need the linker

        with _LINK_LOCK:
            shared = path.with_suffix(".so")
            if not shared.exists():
                objects = path.with_suffix(".objs")
                objects.mkdir(exist_ok=True)
                tar.untar(str(path), str(objects))
                cc.create_shared(str(shared), [str(p) for p in sorted(objects.iterdir())])
            path = shared
    return tvm.runtime.load_module(str(path))


def load_python_function(module: str, function: str, source: Path | None) -> Callable[..., Any]:
    """Import ``module.function``; fall back to the source file shipped in the package."""
    if module != "__main__":
        try:
            return getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError):
            if source is None:
                raise
    if source is None:
        raise ImportError(f"cannot import {module}.{function} and no source file was shipped")
    name = f"_tvmpipe_stage_{source.stem}_{abs(hash(str(source)))}"
    spec = importlib.util.spec_from_file_location(name, source)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the stage source {source}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return getattr(loaded, function)


class Runner(Protocol):
    """What a stage's loops need from whatever computes it (local, or relayed to a board)."""

    input_names: list[str]

    @property
    def param_names(self) -> frozenset[str]: ...

    def set_params(self, params: Mapping[str, np.ndarray]) -> None: ...

    def __call__(self, inputs: Mapping[str, Any]) -> list[np.ndarray]: ...


class StageRunner:
    """Runs one stage: ``runner(named_inputs) -> list of numpy outputs``.

    ``input_names`` is the order the stage takes its inputs in; ``params`` are parameter-group
    weights that the stage feeds itself and that ``set_params`` may replace between inputs.
    """

    def __init__(
        self,
        kind: str,
        artifact: Path,
        device: str,
        input_names: Sequence[str],
        python_entry: tuple[str, str] | None = None,
        params: Mapping[str, np.ndarray] | None = None,
    ):
        self.kind = kind
        self.input_names = list(input_names)
        self._params_lock = threading.Lock()
        self._params: dict[str, Any] = {}
        self.device = None
        if kind == "relax":
            self.device = tvm_device(device)
            self._vm = relax.VirtualMachine(load_relax_library(artifact), self.device)
            self._main = self._vm["main"]
            self.set_params(params or {})
        elif kind == "python":
            assert python_entry is not None
            module, function = python_entry
            source = artifact if artifact.suffix == ".py" else None
            self._function = load_python_function(module, function, source)
        else:
            raise ValueError(f"unknown stage kind {kind!r}")

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        """Replace some parameter-group weights; inputs that start later see the new values."""
        unknown = sorted(set(params) - set(self.input_names))
        if unknown:
            raise KeyError(f"the stage has no input {unknown}; its inputs: {self.input_names}")
        converted = {
            name: tvm.runtime.tensor(np.asarray(v), self.device) for name, v in params.items()
        }
        with self._params_lock:
            self._params = {**self._params, **converted}

    @property
    def param_names(self) -> frozenset[str]:
        return frozenset(self._params)

    def __call__(self, inputs: Mapping[str, Any]) -> list[np.ndarray]:
        if self.kind == "python":
            return _as_outputs(self._function(**inputs))
        with self._params_lock:
            params = self._params
        args = [
            params[name] if name in params else _to_device(inputs[name], self.device)
            for name in self.input_names
        ]
        return _as_outputs(self._main(*args))


def _to_device(value: Any, device: Any) -> Any:
    if isinstance(value, tvm.runtime.Tensor) and value.device == device:
        return value
    return tvm.runtime.tensor(np.ascontiguousarray(value), device)


def _as_outputs(result: Any) -> list[np.ndarray]:
    """A stage's result as a list of numpy arrays: one per output, tuples flattened once."""
    items = list(result) if isinstance(result, (tuple, tvm_ffi.Array)) else [result]
    return [_to_numpy(item) for item in items]


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "numpy"):
        return value.numpy()
    return np.asarray(value)
