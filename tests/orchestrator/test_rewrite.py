"""The Relax rewrites of tuned CPU builds: results unchanged, and the shape they promise."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax
from tvm.relax.pipeline import zero_pipeline

from tvmpipe.orchestrator.rewrite import concat_as_copies, convert_layout, for_inference
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


def _run(mod: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(x) for x in inputs))
    return np.asarray(out.numpy())


def _prim_funcs(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _ops(mod: tvm.IRModule) -> set[str]:
    names: set[str] = set()

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.add(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def conv_norm_relu(training: bool = False, gamma_given: bool = False) -> tvm.IRModule:
    """``relu(batch_norm(conv2d(x, w)))`` with constant weights and statistics, as ONNX's
    importer writes a ResNet block (at inference: ``training`` False); ``gamma_given``: the
    norm's scale is the function's second parameter instead."""
    rng = np.random.default_rng(1)

    def const(*shape: int, low: float = -1.0) -> relax.Expr:
        return relax.const(rng.uniform(low, 1.0, shape).astype("float32"))

    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    gamma = relax.Var("gamma", relax.TensorType((4,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, gamma] if gamma_given else [x]):
        with bb.dataflow():
            conv = bb.emit(relax.op.nn.conv2d(x, const(4, 3, 3, 3), padding=1))
            norm = bb.emit(
                relax.op.nn.batch_norm(
                    conv,
                    *(gamma if gamma_given else const(4), const(4), const(4), const(4, low=0.5)),
                    axis=1,
                    training=training,
                )
            )
            out = bb.emit_output(relax.op.nn.relu(relax.TupleGetItem(norm, 0)))
        bb.emit_func_output(out)
    return bb.get()


def test_a_batch_norm_and_its_relu_fuse_into_the_convolution() -> None:
    mod = conv_norm_relu()
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype("float32")
    as_tvm_writes_it = zero_pipeline()(mod)
    assert len(_prim_funcs(as_tvm_writes_it)) > 1  # the norm stops fusion
    rewritten = for_inference(mod)
    assert "relax.nn.batch_norm" not in _ops(rewritten)
    assert {"relax.multiply", "relax.add"} <= _ops(rewritten)  # its statistics folded in
    assert not {"relax.divide", "relax.sqrt", "relax.subtract"} & _ops(rewritten)
    names = list(_prim_funcs(zero_pipeline()(convert_layout(rewritten, "NHWC"))))
    (conv,) = [name for name in names if "conv2d" in name]
    assert "relu" in conv and not [n for n in names if "relu" in n or "norm" in n][1:], names
    np.testing.assert_allclose(_run(rewritten, x), _run(mod, x), rtol=1e-5, atol=1e-5)
    # In training mode a norm uses the batch's own statistics: the module stays as it was
    training = conv_norm_relu(training=True)
    tvm.ir.assert_structural_equal(for_inference(training), training)


def test_a_norm_whose_weights_come_at_run_time_is_decomposed_as_tvm_does() -> None:
    mod = conv_norm_relu(gamma_given=True)
    rewritten = for_inference(mod)
    assert "relax.nn.batch_norm" not in _ops(rewritten)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, 8, 8)).astype("float32")
    for gamma in (np.ones(4, "float32"), rng.standard_normal(4).astype("float32")):
        got, expected = _run(rewritten, x, gamma), _run(mod, x, gamma)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def write_sum_and_max(path: Path) -> Path:
    """ONNX: ``relu(Max(Sum(conv(x), y, y), z))``, z broadcast along one axis."""
    helper = onnx.helper
    weight = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype("float32")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Sum", ["c", "y", "y"], ["s"]),
        helper.make_node("Max", ["s", "z"], ["m"]),
        helper.make_node("Relu", ["m"], ["out"]),
    ]
    float32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "sum_and_max",
        [
            helper.make_tensor_value_info("x", float32, [1, 3, 8, 8]),
            helper.make_tensor_value_info("y", float32, [1, 4, 8, 8]),
            helper.make_tensor_value_info("z", float32, [1, 4, 1, 8]),
        ],
        [helper.make_tensor_value_info("out", float32, [1, 4, 8, 8])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_onnx_sum_and_max_become_pairwise_and_the_layout_converts(tmp_path: Path) -> None:
    """The importer's ``sum(stack(...))`` stopped ConvertLayout on all of ResNet-50."""
    from tvmpipe.orchestrator.models import load_onnx_file

    mod = load_onnx_file(write_sum_and_max(tmp_path / "sum_and_max.onnx"))
    assert "relax.stack" in _ops(mod)
    rewritten = for_inference(mod)
    assert "relax.stack" not in _ops(rewritten)
    assert {"relax.add", "relax.maximum"} <= _ops(rewritten)
    assert "relax.broadcast_to" in _ops(rewritten)  # z's: it had another shape
    conv = re.compile(r'data_layout="NHWC"')
    assert not conv.search(convert_layout(mod, "NHWC")["main"].script())  # TVM gives up
    assert conv.search(convert_layout(rewritten, "NHWC")["main"].script())
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal(s).astype("float32") for s in ((1, 3, 8, 8), (1, 4, 8, 8))]
    inputs.append(rng.standard_normal((1, 4, 1, 8)).astype("float32"))
    np.testing.assert_allclose(_run(rewritten, *inputs), _run(mod, *inputs), rtol=1e-5, atol=1e-5)
