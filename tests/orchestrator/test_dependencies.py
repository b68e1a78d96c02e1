"""The installed TVM and tvm-ffi work together: IR survives save_json/load_json.

apache-tvm-ffi 0.1.15.post1 and .post2 segfault in ``tvm.ir.save_json`` with apache-tvm
0.27.0.post1 (MetaSchedule tuning serialises workloads the same way); pyproject.toml pins
``apache-tvm-ffi<0.1.15``. The round trip runs in a child process so that a crash is a failed
test with a message rather than a dead pytest.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from importlib import metadata

import pytest

pytestmark = pytest.mark.timeout(300)

# A Relax main with a constant tensor and weights bound by BindParams (what build_pipeline does
# with cfg[m].params), and a PrimFunc; each is saved, loaded, compared and compiled.
ROUND_TRIP = """
import numpy as np
import tvm
from tvm import relax, te

rng = np.random.default_rng(0)
x = relax.Var("x", relax.TensorType((2, 3), "float32"))
w = relax.Var("w", relax.TensorType((2, 3), "float32"))
bb = relax.BlockBuilder()
with bb.function("main", [x, w]):
    with bb.dataflow():
        y = bb.emit(relax.op.add(x, relax.const(rng.standard_normal((2, 3)).astype("float32"))))
        out = bb.emit_output(relax.op.multiply(y, w))
    bb.emit_func_output(out)
weights = {"w": tvm.runtime.tensor(rng.standard_normal((2, 3)).astype("float32"))}
mod = relax.transform.BindParams("main", weights)(bb.get())

loaded = tvm.ir.load_json(tvm.ir.save_json(mod))
tvm.ir.assert_structural_equal(mod, loaded)
data = tvm.runtime.tensor(rng.standard_normal((2, 3)).astype("float32"))
results = [
    relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](data).numpy()
    for m in (mod, loaded)
]
np.testing.assert_array_equal(results[0], results[1])

a = te.placeholder((4,), "float32", name="a")
prim = te.create_prim_func([a, te.compute((4,), lambda i: a[i] + 1.0, name="b")])
tvm.ir.assert_structural_equal(prim, tvm.ir.load_json(tvm.ir.save_json(prim)))
print("round trip ok")
"""


def test_ir_survives_a_json_round_trip() -> None:
    done = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP], capture_output=True, text=True, timeout=240
    )
    versions = (
        f"apache-tvm {metadata.version('apache-tvm')}, "
        f"apache-tvm-ffi {metadata.version('apache-tvm-ffi')}"
    )
    if done.returncode < 0:
        pytest.fail(
            f"the save_json/load_json round trip died of {signal.Signals(-done.returncode).name} "
            f"with {versions}; pyproject.toml pins apache-tvm-ffi<0.1.15 for this\n{done.stderr}"
        )
    assert done.returncode == 0, f"round trip failed with {versions}:\n{done.stderr}"
    assert done.stdout.strip() == "round trip ok"


def test_ml_dtypes_is_one_that_imports_quickly() -> None:
    """ml_dtypes 0.7.0's extension takes about 0.5 s to import against 0.06 to 0.09 s for 0.5.x
    and 0.6.0 (python -X importtime, this machine); TVM imports it in every worker, session
    process and build child, so it set the suite's pace. pyproject.toml keeps it below 0.7."""
    major, minor = (int(part) for part in metadata.version("ml_dtypes").split(".")[:2])
    assert (major, minor) < (0, 7), "ml_dtypes >= 0.7 imports slowly: see pyproject.toml"
