"""Relay mode: run a stage on a plain TVM RPC server that has no tvmpipe on it.

Boards often run TVM's own RPC server (the C++ ``tvm_rpc`` on Android, or
``python -m tvm.exec.rpc_server``). Such a stage is served by a local stage process on the
controller's host: it holds an RPC session to the board, uploads and loads the artifact there,
and for each input copies the tensors over, runs the Relax VM remotely and copies the outputs
back, so that the rest of the pipeline sees an ordinary stage on the data plane.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax, rpc


def open_remote(relay: Mapping[str, Any], timeout: float = 60.0) -> Any:
    """A session with the board: ``{"host", "port"}`` directly, or ``{"tracker", "key"}``."""
    if "tracker" in relay:
        host, port = relay["tracker"]
        tracker = rpc.connect_tracker(host, int(port))
        return tracker.request(relay["key"], session_timeout=0, max_retry=1)
    return rpc.connect(relay["host"], int(relay["port"]), session_timeout=0)


class RelayRunner:
    """Same interface as StageRunner; the computation happens on the remote server."""

    def __init__(
        self,
        relay: Mapping[str, Any],
        artifact: Path,
        device: str,
        input_names: Sequence[str],
    ):
        self.input_names = list(input_names)
        self._session = open_remote(relay)
        self.device = self._session.device(device, 0)
        if not self.device.exist:
            raise RuntimeError(f"the remote server {relay} has no device {device!r}")
        self._session.upload(bytearray(artifact.read_bytes()), target=artifact.name)
        module = self._session.load_module(artifact.name)
        self._main = relax.VirtualMachine(module, self.device)["main"]
        self._array_size = self._session.get_function("ffi.ArraySize")
        self._array_item = self._session.get_function("ffi.ArrayGetItem")
        self._params: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def param_names(self) -> frozenset[str]:
        return frozenset(self._params)

    def set_params(self, params: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(set(params) - set(self.input_names))
        if unknown:
            raise KeyError(f"the stage has no input {unknown}; its inputs: {self.input_names}")
        remote = {
            name: tvm.runtime.tensor(np.asarray(v), self.device) for name, v in params.items()
        }
        with self._lock:
            self._params = {**self._params, **remote}

    def prepare(self, inputs: dict[str, Any]) -> None:
        """Nothing to do ahead: the inputs travel to the board as they are."""

    def __call__(self, inputs: Mapping[str, Any], owned: bool = False) -> list[np.ndarray]:
        with self._lock:
            params = self._params
        args = [
            params[n]
            if n in params
            else tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), self.device)
            for n in self.input_names
        ]
        result = self._main(*args)
        if hasattr(result, "numpy"):
            return [result.numpy()]
        # A tuple comes back as a reference to a remote Array: read it item by item.
        return [self._array_item(result, i).numpy() for i in range(self._array_size(result))]
