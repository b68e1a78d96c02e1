"""Relax rewrites that tuned CPU builds make before legalizing: what MetaSchedule's search
cannot schedule well as TVM writes it."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from tvmpipe.proto.errors import ConfigError

KERNEL_LAYOUTS = {"NHWC": "OHWI", "NCHW": "OIHW"}
# ONNX's variadic reductions, as the importer writes them (a stack, then this over axis 0), and
# the pairwise operator that does the same
_PAIRWISE = {
    "relax.sum": relax.op.add,
    "relax.max": relax.op.maximum,
    "relax.min": relax.op.minimum,
}
_STACK = tvm.ir.Op.get("relax.stack")
_BROADCAST = tvm.ir.Op.get("relax.broadcast_to")


def convert_layout(mod: tvm.IRModule, layout: str) -> tvm.IRModule:
    """Every conv2d in ``layout``; the module's inputs and outputs keep theirs.

    TVM cannot carry layouts through dropout's (output, mask) pair, so inference's dropout (the
    identity) goes first. A model TVM still cannot convert keeps its own layout: tuning and
    building both come here, so they agree on its workloads either way.
    """
    if layout not in KERNEL_LAYOUTS:
        raise ConfigError(f"conv2d_layout must be one of {sorted(KERNEL_LAYOUTS)}, got {layout!r}")
    mod = without_dropout(mod)
    convert = relax.transform.ConvertLayout({"relax.nn.conv2d": [layout, KERNEL_LAYOUTS[layout]]})
    try:
        converted: tvm.IRModule = convert(mod)
    except tvm.error.InternalError:
        return mod
    return converted


def for_inference(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with batch norms as per-channel arithmetic, and ONNX's variadic Sum, Max and Min
    as pairwise operators.

    TVM's batch norm is a fusion barrier: ResNet-50 built as TVM writes it runs every
    convolution, its batch norm and its relu as separate kernels. As a multiply and an add with
    its moving statistics folded in (inference: ONNX's ``training_mode`` 0), the norm, a
    residual add and the relu fuse into the convolution's kernel. A module with a norm in
    training mode keeps its norms.

    The ONNX importer writes ``Sum(a, b)`` as ``sum(stack([a, b]))``, which costs a copy of
    every input, and whose new axis stops TVM's ConvertLayout on the whole model (ResNet-50
    kept NCHW). Pairwise, it is one elementwise operator, which fuses too.
    """
    from tvm.relax.dpl import is_op, is_tuple_get_item, wildcard

    if not _any_call(mod, "relax.nn.batch_norm", lambda call: bool(call.attrs.training)):
        norm = is_tuple_get_item(is_op("relax.nn.batch_norm")(*(wildcard() for _ in range(5))), 0)
        mod = _rewrite(mod, norm, _scale_and_shift)
        mod = relax.transform.DecomposeOpsForInference()(mod)  # norms of weights not constant
        mod = relax.transform.CanonicalizeBindings()(mod)  # the norm's (out, mean, var)[0]
    ops = [is_op(name)(wildcard()) for name in _PAIRWISE]
    return _rewrite(mod, functools.reduce(lambda a, b: a | b, ops), _pairwise)


def _rewrite(mod: tvm.IRModule, pattern: Any, rewriter: Any) -> tvm.IRModule:
    """Every Relax function with each match of ``pattern`` replaced by ``rewriter(bound,
    expr, matches)``, where ``bound`` maps the function's variables to their values."""
    from tvm.relax.dpl import rewrite_call

    result = mod.clone()
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            bound = relax.analysis.get_var2val(func)
            rewritten = rewrite_call(pattern, functools.partial(rewriter, bound), func)
            result[gv] = relax.analysis.remove_all_unused(rewritten)
    return result


def _value(bound: Any, expr: relax.Expr) -> relax.Expr:
    """What a variable is bound to, through variables bound to variables."""
    while isinstance(expr, relax.Var) and expr in bound:
        expr = bound[expr]
    return expr


def _scale_and_shift(bound: Any, item: relax.TupleGetItem, _: Any) -> relax.Expr:
    """``batch_norm(x, gamma, beta, mean, var)[0]`` with constant weights as ``x * scale +
    shift``, both folded here: two operators in the convolution's kernel instead of four,
    a division among them."""
    call = _value(bound, item.tuple_value)
    weights = [_value(bound, arg) for arg in call.args[1:]] if isinstance(call, relax.Call) else []
    if not weights or not all(isinstance(w, tvm.ir.Constant) for w in weights):
        return item
    rank, dtype = int(getattr(call.args[0].ty, "ndim", -1)), str(call.args[0].ty.dtype)
    if rank < 1:
        return item  # a rank unknown here: TVM's decomposition takes it
    gamma, beta, mean, var = (w.value.numpy().astype("float64") for w in weights)
    attrs = call.attrs
    scale = 1.0 / np.sqrt(var + float(attrs.epsilon))
    if attrs.scale:
        scale = scale * gamma
    shift = -mean * scale + (beta if attrs.center else 0.0)
    shape = [1] * rank
    shape[int(attrs.axis) % rank] = -1
    scale_c = relax.const(scale.reshape(shape).astype(dtype))
    shift_c = relax.const(shift.reshape(shape).astype(dtype))
    return relax.op.add(relax.op.multiply(call.args[0], scale_c), shift_c)


def _any_call(mod: tvm.IRModule, op: str, test: Any) -> bool:
    """Whether a Relax function of ``mod`` calls ``op`` where ``test(call)`` holds."""
    found: list[relax.Call] = []

    def visit(expr: relax.Expr) -> None:
        is_op = isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
        if is_op and expr.op.name == op and test(expr):
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def _pairwise(bound: Any, call: relax.Call, _: Any) -> relax.Expr:
    """``reduce(stack([x0, x1, ...], axis=0), axis=0)`` as ``op(op(x0, x1), ...)``; where an
    input was only broadcast to the shape it already had, the input itself. Any other call
    stays as it is."""
    axis = call.attrs.axis
    if axis is None or [int(a) for a in axis] != [0] or call.attrs.keepdims:
        return call
    stacked = _value(bound, call.args[0])
    if not isinstance(stacked, relax.Call) or not stacked.op.same_as(_STACK):
        return call
    fields = _value(bound, stacked.args[0])
    if (
        int(stacked.attrs.axis) != 0
        or not isinstance(fields, relax.Tuple)
        or len(fields.fields) < 2
    ):
        return call
    parts = []
    for field in fields.fields:
        source = _value(bound, field)
        same = (
            isinstance(source, relax.Call)
            and source.op.same_as(_BROADCAST)
            and _static_shape(source.args[0].ty) is not None
            and _static_shape(source.args[0].ty) == _static_shape(field.ty)
        )
        parts.append(source.args[0] if same else field)
    return functools.reduce(_PAIRWISE[call.op.name], parts)


def without_dropout(mod: tvm.IRModule) -> tvm.IRModule:
    """``dropout(x)[0]`` is ``x`` at inference; the dropout goes when its mask is unused."""
    from tvm.relax.dpl import is_op, is_tuple_get_item, wildcard

    data = wildcard()
    pattern = is_tuple_get_item(is_op("relax.nn.dropout")(data), 0)
    return _rewrite(mod, pattern, lambda _, __, matched: matched[data])


def concat_as_copies(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` legalized (every operator, as LegalizeOps does), with concatenations along the
    last axis as one plain copy per input.

    TVM's own is a select per output element among the inputs, which no schedule vectorises;
    in NHWC, where convolutions' channels are innermost, SqueezeNet's concatenations took
    about 1 ms of its 21. Copies into their slice of the output vectorise like any copy.
    Other concatenations legalize as TVM's.
    """
    legalize = relax.transform.LegalizeOps(customize_legalize_map={"relax.concat": _legalize})
    result: tvm.IRModule = legalize(mod)
    return result


def _legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Copies for two or more inputs of static shapes joined on the last axis; else TVM's."""
    out = call.ty
    shapes = [_static_shape(ty) for ty in call.args[0].ty.fields]
    known = [s for s in shapes if s is not None]
    rank = len(known[0]) if known else 0
    axis = call.attrs.axis
    last = axis is not None and rank > 0 and int(axis) in (rank - 1, -1)
    if not last or len(known) < 2 or len(known) < len(shapes) or str(out.dtype) == "void":
        return tvm.ir.Op.get("relax.concat").get_attr("FLegalize")(bb, call)
    gv = bb.add_func(_copies(known, str(out.dtype)), "concatenate")
    return relax.call_tir(gv, _fields(bb, call.args[0]), out)


def _fields(bb: relax.BlockBuilder, tup: relax.Expr) -> list[relax.Expr]:
    """The tuple's elements: those of the Tuple it is bound to, else one TupleGetItem each
    (as TVM's own legalization finds them)."""
    while isinstance(tup, relax.Var):
        binding = bb.lookup_binding(tup)
        if not isinstance(binding, relax.Tuple | relax.Var):
            break
        tup = binding
    if isinstance(tup, relax.Tuple):
        return list(tup.fields)
    return [bb.emit(relax.TupleGetItem(tup, i)) for i in range(len(tup.ty.fields))]


def _static_shape(ty: Any) -> tuple[int, ...] | None:
    """A tensor type's shape, if every dimension is a known integer."""
    shape = getattr(ty, "shape", None)
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return None
    if not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
        return None
    return tuple(int(d) for d in shape.values)


def _copies(shapes: list[tuple[int, ...]], dtype: str) -> tvm.tirx.PrimFunc:
    """A PrimFunc that copies each input into its slice of the output's last axis, one block
    per input. Marked opaque: fusion leaves it one workload, which tuning schedules whole."""
    rank = len(shapes[0])
    out_shape = (*shapes[0][:-1], sum(s[-1] for s in shapes))
    loops = ", ".join(f"i{a}" for a in range(rank))
    axes = ", ".join(f"v{a}" for a in range(rank))
    lead = "".join(f"v{a}, " for a in range(rank - 1))
    params = ", ".join(f"x{k}: T.Buffer({_int64(s)}, {dtype!r})" for k, s in enumerate(shapes))
    lines = [
        "@T.prim_func(private=True, s_tir=True)",
        f"def concatenate({params}, out: T.Buffer({_int64(out_shape)}, {dtype!r})):",
        "    T.func_attr({'tirx.noalias': True, 'op_pattern': 8})",
    ]
    offset = 0
    for k, shape in enumerate(shapes):
        lines += [
            f"    for {loops} in T.grid{_int64(shape)}:",
            f"        with T.sblock('copy_x{k}'):",
            f"            {axes} = T.axis.remap({'S' * rank!r}, [{loops}])",
            f"            out[{lead}v{rank - 1} + T.int64({offset})] = x{k}[{axes}]",
        ]
        offset += shape[-1]
    func: tvm.tirx.PrimFunc = tvm.script.from_source("\n".join(lines), extra_vars={"T": T})
    return func


def _int64(shape: tuple[int, ...]) -> str:
    """TVMScript for a shape of int64 dimensions, as Relax's are."""
    return "(" + "".join(f"T.int64({d}), " for d in shape) + ")"
