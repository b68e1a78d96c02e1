"""Relax rewrites that tuned CPU builds make before legalizing: what MetaSchedule's search
cannot schedule well as TVM writes it."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax
from tvm.script import tirx as T

from tvmpipe.proto.errors import ConfigError

KERNEL_LAYOUTS = {"NHWC": "OHWI", "NCHW": "OIHW"}


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


def without_dropout(mod: tvm.IRModule) -> tvm.IRModule:
    """``dropout(x)[0]`` is ``x`` at inference; the dropout goes when its mask is unused."""
    from tvm.relax.dpl import is_op, is_tuple_get_item, rewrite_call, wildcard

    data = wildcard()
    pattern = is_tuple_get_item(is_op("relax.nn.dropout")(data), 0)
    result = mod.clone()
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewritten = rewrite_call(pattern, lambda _, matched: matched[data], func)
            result[gv] = relax.analysis.remove_all_unused(rewritten)
    return result


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
