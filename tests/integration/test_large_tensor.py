"""A large tensor costs a stage process at most two copies of itself.

Two Relax stages each add 1 to a 256 MiB float32 tensor (output as large as input); inputs go
through one at a time. For each stage session process the peak RSS (VmHWM, reset before the
first input where the kernel allows) minus its RSS before the first input must stay under
``COPIES_LIMIT`` tensors: the received frame and the tensor the VM computes, nothing more.
``pytest -s`` prints the figures.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmpipe.orchestrator import PipelineLibrary, PipelineModule, PipelineModuleConfig

from .conftest import build

ELEMENTS = 64 << 20  # float32: 256 MiB
TENSOR_BYTES = ELEMENTS * 4
INPUTS = 3
COPIES_LIMIT = 2.3  # two copies, and some slack for allocator and ZeroMQ buffers
WAIT_S = 120.0
MIB = 1 << 20


def _increment() -> tvm.IRModule:
    """``main(data) -> data + 1`` on ELEMENTS float32 values: output as large as input."""
    data = relax.Var("data", relax.TensorType([ELEMENTS], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [data]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(data, relax.const(1.0, "float32")))
        bb.emit_func_output(out)
    return bb.get()


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    """data -> data + 1 -> data + 2, in two stages."""
    first, second = _increment(), _increment()
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (first, "data")
    cfg.connect(first, 0, second, "data")
    cfg.outputs.append((second, 0))
    built = build(cfg)
    yield built
    built.close()


def _memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def _reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+), so that loading does not count."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")


def _input(i: int) -> np.ndarray:
    """Values that vary along the tensor and between inputs; made in place, one tensor's worth."""
    data = np.arange(ELEMENTS, dtype=np.float32)
    np.remainder(data, 4096, out=data)
    data += 1000 * i
    return data


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_large_tensor_costs_each_stage_at_most_two_copies(lib: PipelineLibrary) -> None:
    rng = np.random.default_rng(0)
    with PipelineModule(lib) as pipe:
        pids = {name: data["pid"] for name, data in pipe.stats()["stages"].items()}
        for pid in [*pids.values(), os.getpid()]:
            _reset_peak(pid)
        before = {pid: _memory_mib(pid) for pid in [*pids.values(), os.getpid()]}
        for i in range(INPUTS):
            data = _input(i)
            pipe.set_input("data", data, copy=False)  # the client borrows it
            pipe.run()
            out = pipe.get_output(timeout=WAIT_S)
            assert out, f"result {i} did not come within {WAIT_S} s"
            (got,) = out
            assert got.shape == (ELEMENTS,) and got.dtype == np.float32
            spots = np.concatenate([[0, ELEMENTS - 1], rng.integers(0, ELEMENTS, 4096)])
            np.testing.assert_array_equal(got[spots], data[spots] + 2, err_msg=f"result {i}")
            del data, got, out
        after = {pid: _memory_mib(pid) for pid in [*pids.values(), os.getpid()]}
        stats = pipe.stats()["stages"]
    for name, data in stats.items():
        assert data["processed"] == data["sent"] == INPUTS, f"{name}: {data}"

    tensor_mib = TENSOR_BYTES / MIB
    print(f"\npeak RSS over {INPUTS} inputs of {tensor_mib:.0f} MiB, in tensors:")
    copies = {}
    for role, pid in [*pids.items(), ("client", os.getpid())]:
        start, end = before[pid], after[pid]
        copies[role] = (end["VmHWM"] - start["VmRSS"]) / tensor_mib
        print(
            f"  {role:8} pid {pid:>7}: RSS before {start['VmRSS']:7.0f} MiB (peak "
            f"{start['VmHWM']:.0f}), peak {end['VmHWM']:7.0f}, now {end['VmRSS']:7.0f}: "
            f"{copies[role]:.2f} copies"
        )
    # The client is only shown: it holds the caller's input (borrowed) and the result.
    too_much = {name: round(copies[name], 2) for name in pids if copies[name] > COPIES_LIMIT}
    assert not too_much, f"stage processes over {COPIES_LIMIT} copies of the tensor: {too_much}"
