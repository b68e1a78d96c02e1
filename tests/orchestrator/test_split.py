"""split_module: the wiring of the returned config, numerical equality with the unsplit module
(stages run one after another with TVM directly, or built with build_pipeline and run with
run_local where tuples cross a cut), and every refused cut."""

# mypy: disable-error-code="valid-type, misc"
# (TVMScript's R.Tensor(...) annotations and indexing a decorated class are not Python typing.)

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvmpipe.orchestrator.build import build_pipeline
from tvmpipe.orchestrator.config import PipelineModuleConfig
from tvmpipe.orchestrator.split import split_module
from tvmpipe.proto.errors import ConfigError

# ----- helpers: run a module, or a config stage by stage, with TVM directly


def _outputs(result: object) -> list[np.ndarray]:
    """The tensors of a result, nested tuples flattened depth first as the pipeline outputs."""
    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    return [t for field in result for t in _outputs(field)]  # type: ignore[attr-defined]


def compile_module(mod: tvm.IRModule) -> relax.VirtualMachine:
    return relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())


def run_module(
    mod: tvm.IRModule, inputs: Mapping[str, np.ndarray], vm: relax.VirtualMachine | None = None
) -> list[np.ndarray]:
    """main's outputs (the fields of a returned tuple) for inputs keyed by parameter name."""
    vm = vm or compile_module(mod)
    args = [tvm.runtime.tensor(inputs[p.name]) for p in mod["main"].params]
    return _outputs(vm["main"](*args))


def compile_stages(cfg: PipelineModuleConfig) -> dict[int, relax.VirtualMachine]:
    return {id(m): compile_module(m) for m in cfg.modules}


def run_stages(
    cfg: PipelineModuleConfig,
    inputs: Mapping[str, np.ndarray],
    vms: dict[int, relax.VirtualMachine] | None = None,
) -> list[np.ndarray]:
    """Run every stage once, in topological order, fed by cfg.inputs and cfg.connections."""
    vms = vms or compile_stages(cfg)
    fed: dict[tuple[int, str], np.ndarray] = {
        (id(m), param): inputs[name] for name, (m, param) in cfg.inputs.items()
    }
    produced: dict[int, list[np.ndarray]] = {}
    for m in cfg.topological_order():
        args = {p.name: fed[(id(m), p.name)] for p in m["main"].params}
        produced[id(m)] = run_module(m, args, vms[id(m)])
        for src, index, dst, param in cfg.connections:
            if src is m:
                fed[(id(dst), param)] = produced[id(m)][index]
    return [produced[id(m)][index] for m, index in cfg.outputs]


def random_inputs(mod: tvm.IRModule, seed: int = 0, **shapes: tuple[int, ...]) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {}
    for p in mod["main"].params:
        shape = shapes.get(p.name) or tuple(int(d) for d in p.ty.shape.values)
        inputs[p.name] = rng.standard_normal(shape).astype(str(p.ty.dtype))
    return inputs


def assert_same_as_unsplit(mod: tvm.IRModule, cfg: PipelineModuleConfig, **shapes) -> None:
    vms = compile_stages(cfg)
    for seed in range(2):
        inputs = random_inputs(mod, seed, **shapes)
        expected = run_module(mod, inputs)
        got = run_stages(cfg, inputs, vms)
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)


def assert_pipeline_same_as_unsplit(
    mod: tvm.IRModule, cfgs: list[PipelineModuleConfig], inputs: Mapping[str, np.ndarray]
) -> None:
    """Each config built by build_pipeline and run by run_local gives main's outputs."""
    expected = run_module(mod, inputs)
    for cfg in cfgs:
        with tvm.transform.PassContext(opt_level=3):
            lib = build_pipeline(cfg)
        try:
            got = lib.run_local(inputs)
        finally:
            lib.close()
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def wiring(cfg: PipelineModuleConfig) -> tuple[dict, list, list]:
    """cfg.inputs, cfg.outputs and cfg.connections with modules replaced by their names."""
    name = cfg.name_of
    return (
        {n: (name(m), p) for n, (m, p) in cfg.inputs.items()},
        [(name(m), i) for m, i in cfg.outputs],
        [(name(s), i, name(d), p) for s, i, d, p in cfg.connections],
    )


def input_names(mod: tvm.IRModule) -> list[str]:
    return [p.name for p in mod["main"].params]


# ----- test modules; the comments number the bindings of main


@I.ir_module
class Chain:
    @R.function
    def main(x: R.Tensor((2, 3), "float32"), y: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            a = R.add(x, y)  # 0
            b = R.multiply(a, x)  # 1
            c = R.nn.relu(b)  # 2
            d = R.add(c, a)  # 3
            gv = (d, c)  # 4
            R.output(gv)
        return gv


@I.ir_module
class ParamReuse:
    @R.function
    def main(x: R.Tensor((2, 3), "float32"), y: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            a = R.add(x, x)  # 0
            b = R.multiply(a, y)  # 1: y is first used here
            gv = R.subtract(b, x)  # 2: x again, two cuts after its first use
            R.output(gv)
        return gv


@I.ir_module
class NoDataflow:
    @R.function
    def main(x: R.Tensor((2, 3), "float32"), y: R.Tensor((2, 3), "float32")):
        a = R.add(x, y)
        b = R.multiply(a, x)
        c = R.nn.relu(b)
        return c


@I.ir_module
class Dynamic:
    @R.function
    def main(x: R.Tensor(("n", 4), "float32")):
        n = T.int64()
        with R.dataflow():
            a = R.add(x, x)  # 0
            b = R.reshape(a, R.shape([n * 4]))  # 1
            c = R.nn.relu(b)  # 2
            gv = R.reshape(c, R.shape([n, 4]))  # 3: needs n
            R.output(gv)
        return gv


@I.ir_module
class TupleValue:
    @R.function
    def main(x: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            t = R.split(x, 2, axis=1)  # 0: a tuple
            a = t[0]  # 1
            b = t[1]  # 2
            gv = R.add(a, b)  # 3
            R.output(gv)
        return gv


@I.ir_module
class DeadCode:
    @R.function
    def main(x: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            a = R.add(x, x)  # 0
            _unused = R.multiply(x, x)  # 1: nothing uses it
            gv = R.nn.relu(a)  # 2
            R.output(gv)
        return gv


@I.ir_module
class Single:
    @R.function
    def main(x: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            gv = R.nn.relu(x)
            R.output(gv)
        return gv


@I.ir_module
class Impure:
    @R.function(pure=False)
    def main(x: R.Tensor((2, 3), "float32")):
        a = R.add(x, x)
        R.print(a, format="{}")
        b = R.multiply(a, x)
        return b


@I.ir_module
class PassThrough:
    @R.function
    def main(
        x: R.Tensor((2, 3), "float32"),
        y: R.Tensor((2, 3), "float32"),
        z: R.Tensor((2, 3), "float32"),
    ):
        with R.dataflow():
            a = R.nn.relu(x)  # 0
            b = R.add(a, x)  # 1
            gv = (b, y)  # 2: y is only returned, z is not used at all
            R.output(gv)
        return gv


def weights_module() -> tvm.IRModule:
    """main(x) with a weight computed from constants alone and used on both sides of a cut."""
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    w0 = relax.const(np.arange(6, dtype="float32").reshape(2, 3))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit(relax.op.multiply(w0, relax.const(0.5, "float32")), "w")  # 0
            a = bb.emit(relax.op.add(x, w), "a")  # 1
            out = bb.emit_output(relax.op.multiply(a, w), "out")  # 2
        bb.emit_func_output(out)
    return bb.get()


def odd_names_module() -> tvm.IRModule:
    """A parameter name that is no identifier, and two values both called 't'."""
    ty = relax.TensorType((2, 3), "float32")
    x = relax.Var("gpu_0/data:0", ty)
    t1, t2 = relax.DataflowVar("t", ty), relax.DataflowVar("t", ty)
    out = relax.Var("out", ty)
    block = relax.DataflowBlock(
        [
            relax.VarBinding(t1, relax.op.add(x, x)),
            relax.VarBinding(t2, relax.op.multiply(x, x)),
            relax.VarBinding(out, relax.op.subtract(t1, t2)),
        ]
    )
    func = relax.Function([x], relax.SeqExpr([block], out), ty)
    func = relax.BlockBuilder().normalize(func.with_attr("global_symbol", "main"))
    return tvm.IRModule({"main": func})


def batch_norm_module() -> tvm.IRModule:
    """main(x) with batch_norm, whose result is a tuple (out, mean, var) read by later bindings."""
    x = relax.Var("x", relax.TensorType((1, 4, 3, 3), "float32"))
    rng = np.random.default_rng(1)
    gamma, beta, mean = (relax.const(rng.standard_normal(4).astype("float32")) for _ in range(3))
    var = relax.const(rng.uniform(0.5, 2.0, 4).astype("float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.relu(x), "a")  # 0
            norm = relax.op.nn.batch_norm(a, gamma, beta, mean, var, axis=1, training=False)
            bn = bb.emit(norm, "bn")  # 1: a tuple
            b = bb.emit(relax.TupleGetItem(bn, 0), "b")  # 2
            c = bb.emit(relax.op.add(b, a), "c")  # 3
            m = bb.emit(relax.TupleGetItem(bn, 1), "m")  # 4: bn read again
            e = bb.emit(relax.op.expand_dims(m, [1, 2]), "e")  # 5
            out = bb.emit_output(relax.op.multiply(c, e), "out")  # 6
        bb.emit_func_output(out)
    return bb.get()


Pair = R.Tuple(R.Tensor((2, 2), "float32"), R.Tensor((2, 2), "float32"))


@I.ir_module
class NestedTuple:
    @R.function(private=True)
    def combine(nt: R.Tuple(Pair, R.Tensor((2, 4), "float32"))) -> R.Tensor((2, 4), "float32"):
        u = nt[0]
        r = R.concat(u, axis=1)
        q = nt[1]
        out = R.subtract(r, q)
        return out

    @R.function
    def main(x: R.Tensor((2, 4), "float32")):
        cls = NestedTuple
        with R.dataflow():
            t = R.split(x, 2, axis=1)  # 0: a tuple
            a = R.nn.relu(x)  # 1
            nt = (t, a)  # 2: a nested tuple
            u = nt[0]  # 3: a tuple again
            p = u[1]  # 4
            r = R.concat(u, axis=1)  # 5: u used whole
            c = cls.combine(nt)  # 6: nt used whole
            w = R.multiply(p, p)  # 7
            ww = R.concat((w, w), axis=1)  # 8
            s = R.add(r, c)  # 9
            gv = R.add(s, ww)  # 10
            R.output(gv)
        return gv


@I.ir_module
class TupleResult:
    @R.function
    def main(x: R.Tensor((2, 4), "float32")):
        with R.dataflow():
            a = R.nn.relu(x)  # 0
            gv = R.split(a, 2, axis=1)  # 1: returned as it is, not as a tuple literal
            R.output(gv)
        return gv


@I.ir_module
class ShapeValue:
    @R.function
    def main(x: R.Tensor((2, 3), "float32")):
        with R.dataflow():
            a = R.add(x, x)  # 0
            s = R.shape_of(a)  # 1: a shape, not a tensor
            ts = (a, s)  # 2: a tuple with a shape field
            s2 = ts[1]  # 3
            b = R.reshape(a, s2)  # 4
            a2 = ts[0]  # 5
            gv = R.add(b, a2)  # 6
            R.output(gv)
        return gv


# ----- wiring and numbers


def test_two_stages() -> None:
    cfg = split_module(Chain, [2])
    assert len(cfg.modules) == 2
    assert wiring(cfg) == (
        {"x": ("mod1", "x"), "y": ("mod1", "y")},
        [("mod2", 1), ("mod2", 0)],
        [("mod1", 0, "mod2", "a"), ("mod1", 1, "mod2", "b")],
    )
    assert str(cfg) == (
        "Inputs:\n  |- x: mod1.x\n  |- y: mod1.y\n"
        "Outputs:\n  |- mod2.output(1)\n  |- mod2.output(0)\n"
        "Connections:\n  |- mod1.output(0) -> mod2.a\n  |- mod1.output(1) -> mod2.b"
    )
    assert_same_as_unsplit(Chain, cfg)


def test_three_stages_with_a_skip_connection_and_a_value_used_twice() -> None:
    cfg = split_module(Chain, [1, 3])
    _, mod2, mod3 = cfg.modules
    assert wiring(cfg) == (
        {"x": ("mod1", "x"), "y": ("mod1", "y")},
        [("mod3", 0), ("mod2", 0)],
        [
            ("mod1", 0, "mod2", "x"),  # x, used by stages 0 and 1, passed on by stage 0
            ("mod1", 1, "mod2", "a"),  # a feeds stage 1 ...
            ("mod1", 1, "mod3", "a"),  # ... and, straight past stage 1, stage 2
            ("mod2", 0, "mod3", "c"),
        ],
    )
    assert input_names(mod2) == ["x", "a"]
    assert input_names(mod3) == ["a", "c"]  # a does not go through stage 1
    assert_same_as_unsplit(Chain, cfg)


def test_main_parameter_used_by_several_stages_is_one_pipeline_input() -> None:
    cfg = split_module(ParamReuse, [1, 2])
    assert wiring(cfg) == (
        {"x": ("mod1", "x"), "y": ("mod2", "y")},
        [("mod3", 0)],
        [("mod1", 1, "mod2", "a"), ("mod1", 0, "mod3", "x"), ("mod2", 0, "mod3", "b")],
    )
    assert_same_as_unsplit(ParamReuse, cfg)


def test_stage_functions_are_pure_dataflow_and_keep_types() -> None:
    cfg = split_module(Chain, [1, 3])
    original = {b.var.name: b.var.ty for b in Chain["main"].body.blocks[0].bindings}
    original.update({p.name: p.ty for p in Chain["main"].params})
    for mod in cfg.modules:
        func = mod["main"]
        assert func.is_pure
        assert [type(b) for b in func.body.blocks] == [relax.DataflowBlock]
        assert func.attrs["global_symbol"] == "main"
        for p in func.params:
            assert isinstance(p.ty, relax.TensorType)
            tvm.ir.assert_structural_equal(p.ty, original[p.name])
    # one output: a tensor; several: a tuple
    assert isinstance(cfg.modules[2]["main"].ret_ty, relax.TensorType)
    assert isinstance(cfg.modules[0]["main"].ret_ty, tvm.ir.TupleType)


def test_single_tensor_result() -> None:
    cfg = split_module(ParamReuse, [2])
    assert [(cfg.name_of(m), i) for m, i in cfg.outputs] == [("mod2", 0)]
    assert isinstance(cfg.modules[-1]["main"].ret_ty, relax.TensorType)
    assert_same_as_unsplit(ParamReuse, cfg)


def test_negative_cuts_count_from_the_end() -> None:
    assert str(split_module(Chain, [-4, -2])) == str(split_module(Chain, [1, 3]))
    assert str(split_module(Chain, [1, -2])) == str(split_module(Chain, [1, 3]))
    assert_same_as_unsplit(Chain, split_module(Chain, [-3]))


def test_no_cut_is_one_stage() -> None:
    cfg = split_module(Chain, [])
    assert len(cfg.modules) == 1
    assert_same_as_unsplit(Chain, cfg)


def test_every_cut_position_matches_the_unsplit_module() -> None:
    for k in range(1, 4):
        assert_same_as_unsplit(Chain, split_module(Chain, [k]))
    for k1 in range(1, 3):
        for k2 in range(k1 + 1, 4):
            assert_same_as_unsplit(Chain, split_module(Chain, [k1, k2]))


def test_bindings_outside_a_dataflow_block() -> None:
    cfg = split_module(NoDataflow, [1, 2])
    for mod in cfg.modules:
        assert [type(b) for b in mod["main"].body.blocks] == [relax.DataflowBlock]
    assert_same_as_unsplit(NoDataflow, cfg)


def test_parameter_only_returned_or_unused() -> None:
    cfg = split_module(PassThrough, [1])
    inputs, outputs, connections = wiring(cfg)
    assert inputs == {"x": ("mod1", "x"), "y": ("mod2", "y"), "z": ("mod1", "z")}
    assert outputs == [("mod2", 1), ("mod2", 0)]  # (b, y); mod2 returns (y, b)
    assert connections == [("mod1", 0, "mod2", "x"), ("mod1", 1, "mod2", "a")]
    assert_same_as_unsplit(PassThrough, cfg)


def test_constant_values_are_recomputed_not_streamed() -> None:
    mod = weights_module()
    cfg = split_module(mod, [2])
    assert [c.dst_param for c in cfg.connections] == ["a"]
    assert input_names(cfg.modules[1]) == ["a"]
    assert_same_as_unsplit(mod, cfg)


def test_port_names_are_identifiers_and_unique() -> None:
    mod = odd_names_module()
    cfg = split_module(mod, [2])
    assert dict(cfg.inputs) == {"gpu_0/data:0": (cfg.modules[0], "gpu_0_data_0")}
    assert input_names(cfg.modules[1]) == ["t", "t_1"]
    assert_same_as_unsplit(mod, cfg)


def test_symbolic_shapes() -> None:
    cfg = split_module(Dynamic, [1])
    (a,) = cfg.signature(cfg.modules[1]).inputs
    assert (a.name, a.dtype, a.shape) == ("a", "float32", (None, 4))
    for n in (1, 5):
        assert_same_as_unsplit(Dynamic, cfg, x=(n, 4))
    with pytest.raises(ConfigError, match="symbolic shape n"):
        split_module(Dynamic, [2])  # stage 1 gets b: (n * 4,), which cannot define n


def test_called_functions_are_carried_over_and_unused_ones_dropped() -> None:
    mod = relax.transform.LegalizeOps()(Chain)  # main now calls one PrimFunc per operator
    cfg = split_module(mod, [2])
    names = [sorted(gv.name_hint for gv in m.get_global_vars()) for m in cfg.modules]
    assert names == [["add", "main", "multiply"], ["add", "main", "relu"]]
    assert_same_as_unsplit(mod, cfg)


def test_real_network_shape() -> None:
    """The ONNX importer's shape of main: one dataflow block, constants, tuple-valued ops."""
    pytest.importorskip("onnx")
    from tvmpipe.orchestrator.models import load_onnx_model

    mod = load_onnx_model("light_squeezenet")
    n = len(mod["main"].body.blocks[0].bindings)
    cfg = split_module(mod, [n // 3, 2 * n // 3])
    assert len(cfg.modules) == 3
    assert list(cfg.inputs) == [p.name for p in mod["main"].params]


# ----- tuples crossing a cut


def test_tuple_crosses_a_cut_as_its_fields() -> None:
    cfg = split_module(TupleValue, [1])  # t = split(x) in stage 0, t[0] and t[1] in stage 1
    assert wiring(cfg)[2] == [("mod1", 0, "mod2", "t_0"), ("mod1", 1, "mod2", "t_1")]
    assert input_names(cfg.modules[1]) == ["t_0", "t_1"]
    assert_same_as_unsplit(TupleValue, cfg)


def test_only_the_fields_read_cross_a_cut() -> None:
    mod = batch_norm_module()
    cfg = split_module(mod, [2])  # between batch_norm and bn[0]: bn[2] is read nowhere
    assert wiring(cfg)[2] == [
        ("mod1", 0, "mod2", "a"),
        ("mod1", 1, "mod2", "bn_0"),
        ("mod1", 2, "mod2", "bn_1"),
    ]
    assert [str(t.shape) for t in cfg.signature(cfg.modules[1]).inputs] == [
        str((1, 4, 3, 3)),
        str((1, 4, 3, 3)),
        str((4,)),
    ]
    assert_same_as_unsplit(mod, cfg)


def test_tuple_used_whole_is_rebuilt_from_its_fields() -> None:
    cfg = split_module(NestedTuple, [3])  # nt[0] and combine(nt) in stage 1
    assert input_names(cfg.modules[1]) == ["nt_0_0", "nt_0_1", "nt_1"]
    first = cfg.modules[1]["main"].body.blocks[0].bindings[0]
    assert first.var.name == "nt"
    assert isinstance(first.value, relax.Tuple)
    assert isinstance(first.value.fields[0], relax.Tuple)  # nested as in main
    assert_same_as_unsplit(NestedTuple, cfg)


def test_tuple_used_by_two_later_stages() -> None:
    mod = batch_norm_module()
    cfg = split_module(mod, [2, 4])  # bn[0] in stage 1, bn[1] in stage 2
    assert wiring(cfg)[2] == [
        ("mod1", 0, "mod2", "a"),
        ("mod1", 1, "mod2", "bn_0"),
        ("mod1", 2, "mod3", "bn_1"),  # straight past stage 1
        ("mod2", 0, "mod3", "c"),
    ]
    assert_same_as_unsplit(mod, cfg)
    cfg = split_module(NestedTuple, [3, 6])  # nt[0] in stage 1, combine(nt) in stage 2
    _, _, connections = wiring(cfg)
    assert sorted(c for c in connections if c[0] == "mod1") == [
        ("mod1", 0, "mod2", "nt_0_0"),
        ("mod1", 0, "mod3", "nt_0_0"),
        ("mod1", 1, "mod2", "nt_0_1"),
        ("mod1", 1, "mod3", "nt_0_1"),
        ("mod1", 2, "mod3", "nt_1"),
    ]
    assert_same_as_unsplit(NestedTuple, cfg)


def test_returned_tuple_value_is_one_output_per_field() -> None:
    cfg = split_module(TupleResult, [1])
    assert wiring(cfg)[1] == [("mod2", 0), ("mod2", 1)]
    assert_same_as_unsplit(TupleResult, cfg)


def test_tuple_with_a_shape_field_crosses_when_only_tensors_are_read() -> None:
    cfg = split_module(ShapeValue, [5])  # ts[1] is read before the cut, ts[0] after it
    assert input_names(cfg.modules[1]) == ["ts_0", "b"]
    # (no numbers: TVM cannot legalize a reshape to a shape held in a variable)


@pytest.mark.parametrize(
    ("module", "multi_cuts"),
    [
        (batch_norm_module, [[2, 4], [1, 2, 3, 4, 5, 6]]),
        (lambda: NestedTuple, [[3, 6], [2, 4, 9]]),
    ],
    ids=["batch_norm", "nested"],
)
def test_every_binding_position_is_a_cut(
    module: Callable[[], tvm.IRModule], multi_cuts: list[list[int]]
) -> None:
    """Built with build_pipeline and run with run_local, the module cut at every position at
    once, the first and last single cuts and a few multi-cuts give the unsplit module's outputs;
    every single cut splits."""
    mod = module()
    n = len(mod["main"].body.blocks[0].bindings)
    singles = [split_module(mod, [k]) for k in range(1, n)]  # each one is a legal cut
    cfgs = [split_module(mod, list(range(1, n))), singles[0], singles[-1]]
    cfgs += [split_module(mod, cuts) for cuts in multi_cuts]
    assert_pipeline_same_as_unsplit(mod, cfgs, random_inputs(mod))


# ----- refusals


@pytest.mark.parametrize(
    ("cuts", "message"),
    [
        ([0], "out of range"),
        ([5], "out of range"),
        ([9], "out of range"),
        ([-5], "out of range"),
        ([-6], "out of range"),
        ([3, 2], "not strictly increasing"),
        ([2, 2], "not strictly increasing"),
        ([1, -4], "not strictly increasing"),  # both are position 1
        ([1.5], "not an int"),
        (["2"], "not an int"),
        ([None], "not an int"),
        ([True], "not an int"),
        ("12", "sequence of ints"),
        (2, "sequence of ints"),
    ],
)
def test_bad_cuts_are_refused(cuts: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        split_module(Chain, cuts)
    assert isinstance(info.value, ValueError)
    assert "1..4" in str(info.value)  # says what is valid


def test_stage_without_outputs_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"stage 1 \(bindings \[1:2\].*no outputs"):
        split_module(DeadCode, [1, 2])
    assert_same_as_unsplit(DeadCode, split_module(DeadCode, [2]))  # the dead binding is dropped


def test_non_tensor_crossing_a_cut_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"s \(binding 1, R\.Shape.*stage 0 .*stage 1 .*cut at 2; it is not a"
    ):
        split_module(ShapeValue, [2])  # s itself
    with pytest.raises(ConfigError, match=r"ts \(binding 2.*cut at 3; its field \[1\] is R\.Shape"):
        split_module(ShapeValue, [3])  # ts[1] is read after the cut
    with pytest.raises(ConfigError, match=r"s2 \(binding 3.*cut at 4; it is not a tensor"):
        split_module(ShapeValue, [1, 4])


def test_tuple_parameter_is_refused() -> None:
    ty = relax.TensorType((2, 3), "float32")
    t = relax.Var("t", tvm.ir.TupleType([ty, ty]))
    body = relax.SeqExpr([], relax.TupleGetItem(t, 0))
    func = relax.Function([t], body, ty).with_attr("global_symbol", "main")
    with pytest.raises(ConfigError, match=r"parameter t is .*, not a tensor"):
        split_module(tvm.IRModule({"main": func}), [])


def test_module_without_main_is_refused() -> None:
    renamed = tvm.IRModule({"forward": Chain["main"].with_attr("global_symbol", "forward")})
    with pytest.raises(ConfigError, match="no Relax function 'main'"):
        split_module(renamed, [1])
    with pytest.raises(ConfigError, match=r"tvm\.IRModule"):
        split_module(Chain["main"], [1])


def test_side_effects_are_refused() -> None:
    with pytest.raises(ConfigError, match="side effects"):
        split_module(Impure, [1])


def test_single_binding_cannot_be_cut() -> None:
    with pytest.raises(ConfigError, match="cannot be cut"):
        split_module(Single, [1])
    assert_same_as_unsplit(Single, split_module(Single, []))


def test_duplicate_parameter_names_are_refused() -> None:
    ty = relax.TensorType((2, 3), "float32")
    x1, x2 = relax.Var("x", ty), relax.Var("x", ty)
    func = relax.Function([x1, x2], relax.SeqExpr([], x1), ty).with_attr("global_symbol", "main")
    with pytest.raises(ConfigError, match="two parameters named 'x'"):
        split_module(tvm.IRModule({"main": func}), [])
