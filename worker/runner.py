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
_CPU = 1  # DLPack's kDLCPU
ALIGNMENT = 64  # bytes: what TVM's kernels assume of their inputs
# A result this large makes the next call use a fresh VM (see StageRunner.__call__). Below it,
# the VM keeps its last result until the next call: making a VM costs 30-100 us, a tenth of a
# 1 MiB hop's CPU, and 16 MiB more held is a price only large tensors must not pay.
LARGE_BYTES = 16 << 20


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

    def prepare(self, inputs: dict[str, Any]) -> None: ...

    def __call__(self, inputs: Mapping[str, Any], owned: bool = False) -> list[np.ndarray]: ...


class StageRunner:
    """Runs one stage: ``runner(named_inputs) -> list of numpy outputs``.

    ``input_names`` is the order the stage takes its inputs in; ``params`` are parameter-group
    weights that the stage feeds itself and that ``set_params`` may replace between inputs.
    A Relax stage on the CPU holds at most two copies of a large tensor (``LARGE_BYTES`` or
    more): the input until it is on the device (``owned=True`` frees the received frame then),
    and the VM's output, which is returned as a view, not copied.
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
            self.device = dev = tvm_device(device)
            self._library = load_relax_library(artifact)
            # On the CPU the naive allocator frees a tensor's memory when the tensor dies; the
            # pooled one would keep a large output resident, a third copy, between inputs.
            self._memory = "naive" if dev.dlpack_device_type() == _CPU else None
            self._main: Any = None  # made by _vm_main, dropped after a large result
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

    def prepare(self, inputs: dict[str, Any]) -> None:
        """Put received inputs on the device now, in place, so that the call that computes them
        does not: a stage converts the next input set while the current one computes. Each
        received frame is freed as soon as it is copied."""
        if self.kind != "relax":
            return
        for name in self.input_names:
            if name in inputs:
                inputs[name] = _to_device(inputs[name], self.device)

    def __call__(self, inputs: Mapping[str, Any], owned: bool = False) -> list[np.ndarray]:
        """The stage's outputs for ``inputs`` (by name), as numpy arrays.

        ``owned=True``: the runner takes ownership of ``inputs``, a dict that the caller keeps no
        other reference to and does not use afterwards. Each input is popped as it goes to the
        device, so that a received frame is freed as soon as it is copied. Otherwise ``inputs``
        is left as it is. On the CPU the outputs are views of the VM's tensors, not copies.
        """
        if self.kind == "python":
            return _as_outputs(self._function(**inputs))
        take = inputs.pop if owned and isinstance(inputs, dict) else inputs.__getitem__
        with self._params_lock:
            params = self._params
        args = [
            params[name] if name in params else _to_device(take(name), self.device)
            for name in self.input_names
        ]
        main = self._vm_main()
        result = main(*args)
        del args  # the inputs' device copies
        outputs = [_to_host(item) for item in _items(result)]
        if sum(out.nbytes for out in outputs) >= LARGE_BYTES:
            # The VM keeps its last result alive until its next call; a fresh VM next time lets
            # this one go as soon as the caller is done with it (about 40 us per VM).
            self._main = None
        return outputs

    def _vm_main(self) -> Any:
        if self._main is None:
            vm = relax.VirtualMachine(self._library, self.device, memory_cfg=self._memory)
            self._main = vm["main"]
        return self._main


def _to_device(value: Any, device: Any) -> Any:
    """``value`` as a tensor on ``device``: in place where TVM can use it there, else copied.

    TVM's kernels assume 64-byte aligned inputs (a misaligned one crashes them), and ZeroMQ's
    frames are only 8-byte aligned, so received tensors are copied; TVM's own outputs (one
    stage feeding the next in ``run_local``) are used in place.
    """
    if isinstance(value, tvm.runtime.Tensor) and value.device == device:
        return value
    array = np.asarray(value)
    if (
        device.dlpack_device_type() == _CPU
        and array.dtype.kind in "iuf"
        and array.flags.c_contiguous
        and array.ctypes.data % ALIGNMENT == 0
    ):
        try:  # max_version: numpy exports a read-only array only through DLPack 1.0
            return tvm_ffi.from_dlpack(
                array.__dlpack__(max_version=(1, 0)),
                require_alignment=ALIGNMENT,
                require_contiguous=True,
            )
        except (BufferError, TypeError, ValueError, RuntimeError):
            pass  # an older numpy, or a dtype DLPack lacks: copy
    return tvm.runtime.tensor(np.ascontiguousarray(array), device)


def _items(result: Any) -> list[Any]:
    """A stage's result as a list, one item per output: tuples flattened once."""
    return list(result) if isinstance(result, (tuple, tvm_ffi.Array)) else [result]


def _as_outputs(result: Any) -> list[np.ndarray]:
    """A Python stage's result as a list of numpy arrays."""
    return [_to_numpy(item) for item in _items(result)]


def _to_host(value: Any) -> np.ndarray:
    """A CPU tensor is viewed where it is (the view keeps it alive); others are copied to host."""
    if isinstance(value, tvm.runtime.Tensor) and value.device.dlpack_device_type() == _CPU:
        try:
            return np.from_dlpack(value)
        except (BufferError, TypeError, ValueError, RuntimeError):
            pass  # a dtype numpy cannot take through DLPack (bfloat16): .numpy() converts it
    return _to_numpy(value)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "numpy"):
        return value.numpy()
    return np.asarray(value)
