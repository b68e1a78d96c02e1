"""The Relax rewrites of tuned CPU builds: results unchanged, and the shape they promise."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.pipeline import zero_pipeline

from tvmpipe.orchestrator.rewrite import concat_as_copies, convert_layout
from tvmpipe.proto.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

LAST = [(1, 5, 7, 3), (1, 5, 7, 8), (1, 5, 7, 1)]  # joined on the last axis
MIDDLE = [(1, 2, 7, 9), (1, 3, 7, 9)]  # joined on axis 1


def concatenations(axis: int = 3) -> tvm.IRModule:
    """``main(a, b, c, d, e) = (relu(concat([a, b, c], axis)), concat([d, e], 1))``."""
    bb = relax.BlockBuilder()
    shapes = LAST + MIDDLE
    params = [relax.Var(f"p{k}", relax.TensorType(s, "float32")) for k, s in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            last = bb.emit(relax.op.nn.relu(relax.op.concat(params[:3], axis=axis)))
            middle = bb.emit(relax.op.concat(params[3:], axis=1))
            out = bb.emit_output(relax.Tuple([last, middle]))
        bb.emit_func_output(out)
    return bb.get()


def copy_blocks(func: tvm.tirx.PrimFunc) -> list[str]:
    return sorted(re.findall(r'T\.sblock\("(copy_\w+)"\)', func.script()))


@pytest.mark.parametrize("axis", [3, -1])
def test_a_concatenation_on_the_last_axis_becomes_one_copy_per_input(axis: int) -> None:
    rewritten = concat_as_copies(concatenations(axis))
    prim_funcs = {
        gv.name_hint: f for gv, f in rewritten.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    blocks = {name: copy_blocks(f) for name, f in prim_funcs.items()}
    # the relu, and the concatenation on axis 1 (TVM's own), have none
    assert sorted(blocks.values()) == [[], [], ["copy_x0", "copy_x1", "copy_x2"]]
    fused = zero_pipeline()(rewritten)  # as tuning and building fuse it: the relu stays out
    fused_blocks = [
        sorted(re.findall(r'T\.sblock\("(\w+)"\)', f.script()))
        for _, f in fused.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    ]
    assert ["copy_x0", "copy_x1", "copy_x2", "root"] in fused_blocks

    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s).astype("float32") for s in LAST + MIDDLE]
    executable = tvm.compile(rewritten, "llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    last, middle = vm["main"](*(tvm.runtime.tensor(x) for x in inputs))
    np.testing.assert_array_equal(last.numpy(), np.maximum(np.concatenate(inputs[:3], -1), 0))
    np.testing.assert_array_equal(middle.numpy(), np.concatenate(inputs[3:], axis=1))


def test_a_concatenation_of_unknown_shapes_is_left_to_tvm() -> None:
    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((n, 4), "float32"))
    b = relax.Var("b", relax.TensorType((n, 2), "float32"))
    with bb.function("main", [a, b]):
        out = bb.emit(relax.op.concat([a, b], axis=-1))
        bb.emit_func_output(out)
    rewritten = concat_as_copies(bb.get())
    funcs = [f for _, f in rewritten.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1 and not copy_blocks(funcs[0])
    vm = relax.VirtualMachine(tvm.compile(rewritten, "llvm"), tvm.cpu())
    x, y = np.ones((3, 4), "float32"), np.zeros((3, 2), "float32")
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    np.testing.assert_array_equal(got, np.concatenate([x, y], axis=1))


def test_an_unknown_convolution_layout_is_named() -> None:
    with pytest.raises(ConfigError, match="conv2d_layout must be one of"):
        convert_layout(concatenations(), "NCWH")
