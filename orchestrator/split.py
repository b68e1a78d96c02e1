"""split_module: cut a Relax module's ``main`` into pipeline stages at binding positions.

``cuts`` are positions in the bindings of ``main`` (all of its binding blocks, in order),
Python-slice style: ``[k1, k2]`` makes the stages ``[0:k1]``, ``[k1:k2]`` and ``[k2:]``, and a
negative position counts from the end. A cut may fall between a tuple-valued binding (such as
``batch_norm``) and its uses. Wiring rules:

- A tensor computed in one stage and used by a later one is an output of the stage that computes
  it and an input of every later stage that uses it, straight from the producer (a skip
  connection goes from stage 0 to stage 2 without passing through stage 1).
- A tuple (``batch_norm``'s result, nested ones too) crosses a cut as its tensor fields: the
  producer returns each field as its own output, and the consumer takes each as a parameter
  named ``<value>_<i>`` (``<value>_<i>_<j>`` when nested) and rebuilds the tuple. A consumer
  that only reads fields (``t[0]``) receives only those fields. Values that are neither tensors
  nor tuples of tensors (shapes, PrimValues, objects) cannot cross a cut.
- Every parameter of ``main`` is one pipeline input, with the same name, fed to the first stage
  that uses it; that stage passes it on as an extra output to later stages that need it too.
  A parameter nothing uses goes to the first stage; one only returned goes to the last.
- Bindings that depend on no parameter (weights, ``broadcast_to`` of constants) never cross a
  cut: each stage that needs one computes it itself, so weights are not streamed between stages.
- Bindings that nothing in ``main``'s result depends on are dropped.
- The pipeline outputs are ``main``'s outputs in order: the tensors of a returned tuple,
  flattened depth first.

Each stage is a standalone IRModule whose ``main`` is a pure Relax function with one dataflow
block; its parameters are named after the values they receive (sanitised to identifiers and
made unique) and keep their ``relax.TensorType`` so the config can check every connection.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import tvm
from tvm import relax

from tvmpipe.proto.errors import ConfigError

from .config import PipelineModuleConfig

__all__ = ["split_module"]

_NOT_IDENT = re.compile(r"[^0-9A-Za-z_]")

Path = tuple[int, ...]  # indices into nested tuples; () is the value itself
Port = tuple[int, Path]  # one tensor that crosses a cut: a value's key and the field's path


@dataclass
class _Stage:
    lo: int
    hi: int
    own: set[int] = field(default_factory=set)  # binding indices this stage computes
    consts: set[int] = field(default_factory=set)  # parameter-free bindings it recomputes
    inputs: dict[int, list[Path]] = field(default_factory=dict)  # value key -> fields received
    picked: set[int] = field(default_factory=set)  # tuples read only as t[i]: fields, no tuple
    outputs: set[Port] = field(default_factory=set)  # the tensors it sends


def _key(v: relax.Var) -> int:
    """Variables are keyed by node address: ``==`` on a primitive-typed Var builds an expression."""
    return int(v.__chandle__())


def split_module(mod: tvm.IRModule, cuts: Sequence[int]) -> PipelineModuleConfig:
    """Cut ``mod["main"]`` at ``cuts`` and return the wired config of the stages."""
    func = _main_of(mod)
    bindings = _bindings_of(func)
    positions = _normalize_cuts(cuts, len(bindings))
    results = _results_of(func, bindings)
    result_keys = {v for v, _ in results}

    params = [_key(p) for p in func.params]
    var_of = {_key(p): p for p in func.params}
    var_of.update({_key(b.var): b.var for b in bindings})
    index = {_key(b.var): i for i, b in enumerate(bindings)}
    # Definition order: parameters first, then bindings; orders every stage's ports.
    order = {p: i for i, p in enumerate(params)}
    order.update({k: len(params) + i for k, i in index.items()})
    # free_vars also lists symbolic shape variables (n in R.Tensor(("n", 4))): keep values only.
    uses = [
        [k for v in relax.analysis.free_vars(b.value) if (k := _key(v)) in var_of] for b in bindings
    ]
    const = _parameter_free(uses, index)
    live = _live(result_keys, uses, index)

    bounds = [0, *positions, len(bindings)]
    stages = [_Stage(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    stage_of = {i: s for s, st in enumerate(stages) for i in range(st.lo, st.hi)}
    for i in sorted(live):
        if not const[i] or _key(bindings[i].var) in result_keys:
            stages[stage_of[i]].own.add(i)

    # Who uses each value; a parameter is owned by its first user.
    users: dict[int, set[int]] = {}
    for s, st in enumerate(stages):
        pending = [v for i in st.own for v in uses[i]]
        while pending:
            v = pending.pop()
            j = index.get(v)
            if j is not None and const[j]:
                if j not in st.consts and j not in st.own:
                    st.consts.add(j)
                    pending.extend(uses[j])
            elif j is None or stage_of[j] != s:
                users.setdefault(v, set()).add(s)
    producer: dict[int, int] = {}
    receives: list[set[int]] = [set() for _ in stages]
    for p in params:
        if p in users:
            producer[p] = min(users[p])
        else:
            producer[p] = len(stages) - 1 if p in result_keys else 0
        receives[producer[p]].add(p)
    producer.update({k: stage_of[i] for k, i in index.items()})
    for v, stage_ids in users.items():
        for s in stage_ids - {producer[v]}:
            receives[s].add(v)
    for s, st in enumerate(stages):
        for v in sorted(receives[s], key=order.__getitem__):
            paths = _fields_received(v, s, stages, bindings, uses, var_of, index, producer)
            st.inputs[v] = paths
            if producer[v] != s:
                stages[producer[v]].outputs.update((v, path) for path in paths)
    for v, path in results:
        stages[producer[v]].outputs.add((v, path))

    for s, st in enumerate(stages):
        _check_stage(s, st, positions)

    modules: list[tvm.IRModule] = []
    port_names: list[dict[Port, str]] = []
    out_lists: list[list[Port]] = []
    for s, st in enumerate(stages):
        outputs = sorted(st.outputs, key=lambda port: (order[port[0]], port[1]))
        stage, names = _stage_module(mod, func, st, bindings, var_of, outputs)
        undefined = relax.analysis.free_symbolic_vars(stage["main"])
        if undefined:
            raise ConfigError(
                f"stage {s} (bindings [{st.lo}:{st.hi}] of main, cuts {positions}) uses the "
                f"symbolic shape {', '.join(str(v) for v in undefined)} but none of its inputs has "
                f"it in its shape; move the cut"
            )
        modules.append(stage)
        port_names.append(names)
        out_lists.append(outputs)

    cfg = PipelineModuleConfig()
    for m in modules:
        cfg[m]  # register in stage order, so that stage k is named mod{k+1}
    for p in params:
        cfg.inputs[var_of[p].name] = (modules[producer[p]], port_names[producer[p]][(p, ())])
    for s, ports in enumerate(port_names):
        for port, name in ports.items():
            src = producer[port[0]]
            if src != s:
                cfg.connect(modules[src], out_lists[src].index(port), modules[s], name)
    for v, path in results:
        cfg.outputs.append((modules[producer[v]], out_lists[producer[v]].index((v, path))))
    return cfg


def _main_of(mod: object) -> relax.Function:
    if not isinstance(mod, tvm.IRModule):
        raise ConfigError(f"split_module needs a tvm.IRModule, not {type(mod).__name__}")
    names = sorted(gv.name_hint for gv in mod.get_global_vars())
    if "main" not in names or not isinstance(mod["main"], relax.Function):
        raise ConfigError(
            f"split_module: the module has no Relax function 'main' (it has: {names})"
        )
    func = mod["main"]
    if not isinstance(func.body, relax.SeqExpr):
        raise ConfigError("split_module: main's body is not a sequence of binding blocks")
    names = [p.name for p in func.params]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                f"split_module: main has two parameters named {name!r}; pipeline inputs are "
                f"named after main's parameters, so the names must be unique"
            )
    for p in func.params:
        if not isinstance(p.ty, relax.TensorType):
            raise ConfigError(
                f"split_module: main's parameter {p.name} is {p.ty}, not a tensor; pipeline "
                f"inputs are tensors"
            )
    return func


def _bindings_of(func: relax.Function) -> list[relax.Binding]:
    """All bindings of main, in order; each must be pure and flat to move into a dataflow block."""
    bindings: list[relax.Binding] = []
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.If | relax.Function):
                raise ConfigError(
                    f"split_module: binding {len(bindings)} ({b.var.name}) holds control flow or a "
                    f"local function; only flat, pure bindings can be split"
                )
            if not isinstance(block, relax.DataflowBlock) and relax.analysis.contains_impure_call(
                b.value
            ):
                raise ConfigError(
                    f"split_module: binding {len(bindings)} ({b.var.name}) has side effects; "
                    f"stages must be pure dataflow"
                )
            bindings.append(b)
    return bindings


def _normalize_cuts(cuts: Sequence[int], n: int) -> list[int]:
    valid = (
        f"main has {n} bindings, so a cut is an int in 1..{n - 1} or -{n - 1}..-1, and cuts are "
        f"strictly increasing"
        if n > 1
        else f"main has {n} binding{'s' if n != 1 else ''}, so it cannot be cut (use cuts=[])"
    )
    if isinstance(cuts, str | bytes) or not isinstance(cuts, Sequence):
        raise ConfigError(f"cuts must be a sequence of ints, got {cuts!r}; {valid}")
    positions: list[int] = []
    for cut in cuts:
        if isinstance(cut, bool):
            raise ConfigError(f"cut {cut!r} is not an int; {valid}")
        try:
            k = operator.index(cut)
        except TypeError:
            raise ConfigError(f"cut {cut!r} is not an int; {valid}") from None
        pos = k + n if k < 0 else k
        if not 0 < pos < n:
            raise ConfigError(f"cut {k} is out of range or makes an empty stage; {valid}")
        if positions and pos <= positions[-1]:
            raise ConfigError(
                f"cuts {list(cuts)!r} are not strictly increasing (as positions: "
                f"{[*positions, pos]}); an equal or earlier cut makes an empty stage; {valid}"
            )
        positions.append(pos)
    return positions


def _results_of(func: relax.Function, bindings: list[relax.Binding]) -> list[Port]:
    """main's outputs as tensor ports: a returned tuple (a literal or a value) flattened."""
    values = {_key(b.var): b.value for b in bindings if isinstance(b, relax.VarBinding)}
    ports: list[Port] = []

    def flatten(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Var) and isinstance(values.get(_key(expr)), relax.Tuple):
            expr = values[_key(expr)]  # a tuple literal is not computed: its fields are returned
        if isinstance(expr, relax.Tuple):
            for f in expr.fields:
                flatten(f)
            return
        leaves = _leaves(expr.ty) if isinstance(expr, relax.Var) else [((), None)]
        for path, ty in leaves:
            if not isinstance(ty, relax.TensorType):
                what = expr if not path else f"field {list(path)} of {expr.name}: {ty}"
                raise ConfigError(
                    f"split_module: main's output {len(ports)} ({what}) is not a tensor "
                    f"variable; main must return tensors, or tuples of them"
                )
            ports.append((_key(expr), path))

    flatten(func.body.body)
    return ports


def _leaves(ty: tvm.ir.Type, path: Path = ()) -> list[tuple[Path, tvm.ir.Type]]:
    """Each non-tuple field of a (nested) tuple type with its path; any other type is its own."""
    if not isinstance(ty, tvm.ir.TupleType):
        return [(path, ty)]
    return [leaf for i, f in enumerate(ty.fields) for leaf in _leaves(f, (*path, i))]


def _type_at(ty: tvm.ir.Type, path: Path) -> tvm.ir.Type:
    for i in path:
        ty = ty.fields[i]
    return ty


def _parameter_free(uses: list[list[int]], index: dict[int, int]) -> list[bool]:
    """Bindings that depend on no parameter: weights and what is computed from them alone."""
    const: list[bool] = []
    for used in uses:
        const.append(all(v in index and const[index[v]] for v in used))
    return const


def _live(results: set[int], uses: list[list[int]], index: dict[int, int]) -> set[int]:
    """Bindings that main's result depends on."""
    live: set[int] = set()
    pending = list(results)
    while pending:
        i = index.get(pending.pop())
        if i is not None and i not in live:
            live.add(i)
            pending.extend(uses[i])
    return live


def _picked_fields(
    v: int, st: _Stage, bindings: list[relax.Binding], uses: list[list[int]]
) -> set[int] | None:
    """The fields i of tuple v that stage st reads, when it reads v only as ``x = v[i]``."""
    picked: set[int] = set()
    for i in st.own:
        if v in uses[i]:
            value = bindings[i].value
            if not (
                isinstance(bindings[i], relax.VarBinding)
                and isinstance(value, relax.TupleGetItem)
                and isinstance(value.tuple_value, relax.Var)
                and _key(value.tuple_value) == v
            ):
                return None
            picked.add(int(value.index))
    return picked


def _fields_received(
    v: int,
    s: int,
    stages: list[_Stage],
    bindings: list[relax.Binding],
    uses: list[list[int]],
    var_of: dict[int, relax.Var],
    index: dict[int, int],
    producer: dict[int, int],
) -> list[Path]:
    """The tensors of v that stage s receives: v itself, or the fields of a tuple it needs."""
    var, st = var_of[v], stages[s]
    picked = None
    if isinstance(var.ty, tvm.ir.TupleType):
        picked = _picked_fields(v, st, bindings, uses)
        if picked is not None:
            st.picked.add(v)
    leaves = [(p, ty) for p, ty in _leaves(var.ty) if picked is None or p[0] in picked]
    for path, ty in leaves:
        if not isinstance(ty, relax.TensorType):
            src = stages[producer[v]]
            what = "it is" if not path else f"its field {list(path)} is {ty},"
            raise ConfigError(
                f"split_module: {var.name} (binding {index[v]}, {var.ty}) is computed in stage "
                f"{producer[v]} (bindings [{src.lo}:{src.hi}]) and used in stage {s} (bindings "
                f"[{st.lo}:{st.hi}]), so it would cross the cut at {src.hi}; {what} not a "
                f"tensor, and only tensors and tuples of tensors can cross a cut: cut before it "
                f"or after its last use"
            )
    return [path for path, _ in leaves]


def _check_stage(s: int, st: _Stage, positions: list[int]) -> None:
    where = f"stage {s} (bindings [{st.lo}:{st.hi}] of main, cuts {positions})"
    if not st.own or not st.outputs:
        raise ConfigError(
            f"{where} would have no outputs: none of its bindings is needed by a later stage or "
            f"by main's result; move or drop a cut"
        )
    if not st.inputs:
        raise ConfigError(f"{where} would take no inputs: it computes only constants")


def _unique_names(bases: list[str]) -> list[str]:
    names: list[str] = []
    for raw in bases:
        base = _NOT_IDENT.sub("_", raw) or "v"
        if base[0].isdigit():
            base = "v_" + base
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _port_name(var: relax.Var, path: Path) -> str:
    return "_".join([var.name, *map(str, path)])


def _stage_module(
    mod: tvm.IRModule,
    main: relax.Function,
    st: _Stage,
    bindings: list[relax.Binding],
    var_of: dict[int, relax.Var],
    outputs: list[Port],
) -> tuple[tvm.IRModule, dict[Port, str]]:
    """One stage and its parameter names: fresh parameters bound to the original variables (a
    tuple rebuilt from its fields), so the stage's bindings stay as they are."""
    ports = [(v, path) for v, paths in st.inputs.items() for path in paths]
    names = _unique_names([_port_name(var_of[v], path) for v, path in ports])
    params: list[relax.Var] = []
    param_of: dict[Port, relax.Var] = {}
    kept: set[int] = set()
    for (v, path), name in zip(ports, names, strict=True):
        var = var_of[v]
        if not path and not isinstance(var, relax.DataflowVar) and var.name == name:
            params.append(var)  # a parameter of main keeps its variable
            kept.add(v)
        else:
            params.append(relax.Var(name, _type_at(var.ty, path)))
        param_of[(v, path)] = params[-1]

    def rebuild(v: int, path: Path) -> relax.Expr:
        if (v, path) in param_of:
            return param_of[(v, path)]
        fields = _type_at(var_of[v].ty, path).fields
        return relax.Tuple([rebuild(v, (*path, i)) for i in range(len(fields))])

    block: list[relax.Binding] = []
    for v in st.inputs:
        if v not in st.picked and v not in kept:
            block.append(relax.VarBinding(var_of[v], rebuild(v, ())))
    for i in sorted(st.own | st.consts):
        b = bindings[i]
        value = b.value
        if isinstance(value, relax.TupleGetItem) and isinstance(value.tuple_value, relax.Var):
            v = _key(value.tuple_value)
            if v in st.picked:  # x = t[i] with only t's fields at hand: x = the field itself
                b = relax.VarBinding(b.var, rebuild(v, (int(value.index),)))
        block.append(b)

    items: dict[Port, relax.Var] = {}

    def item(v: int, path: Path) -> relax.Var:
        """The (sub-)tuple of v at path, read out of v once."""
        if not path:
            return var_of[v]
        if (v, path) not in items:
            var = var_of[v]
            sub = relax.DataflowVar(_port_name(var, path), _type_at(var.ty, path))
            block.append(relax.VarBinding(sub, relax.TupleGetItem(item(v, path[:-1]), path[-1])))
            items[(v, path)] = sub
        return items[(v, path)]

    rets: list[relax.Var] = []
    for v, path in outputs:
        var = var_of[v]
        if path:  # a tuple's field: read straight into a returnable variable
            out = relax.Var(_port_name(var, path), _type_at(var.ty, path))
            block.append(relax.VarBinding(out, relax.TupleGetItem(item(v, path[:-1]), path[-1])))
        elif isinstance(var, relax.DataflowVar):  # a function may only return non-dataflow vars
            out = relax.Var(var.name, var.ty)
            block.append(relax.VarBinding(out, var))
        else:
            out = var
        rets.append(out)
    ret = rets[0] if len(rets) == 1 else relax.Tuple(rets)
    seq = relax.SeqExpr([relax.DataflowBlock(block)], ret)
    attrs = {k: v for k, v in main.attrs.items() if k != "num_input"} if main.attrs else {}
    attrs["global_symbol"] = "main"
    ret_ty = rets[0].ty if len(rets) == 1 else tvm.ir.TupleType([v.ty for v in rets])
    func = relax.Function(params, seq, ret_ty, is_pure=True, attrs=tvm.ir.DictAttrs(attrs))
    func = relax.BlockBuilder().normalize(func)
    functions = {mod.get_global_var("main"): func}
    pending = list(relax.analysis.all_global_vars(func))
    while pending:  # carry over the functions this stage calls, and only those
        gv = pending.pop()
        if gv.name_hint in {g.name_hint for g in functions}:
            continue
        callee = mod[gv]
        functions[gv] = callee
        if isinstance(callee, relax.Function):
            pending.extend(relax.analysis.all_global_vars(callee))
    module = tvm.IRModule(functions, dict(mod.attrs) if mod.attrs else None, mod.global_infos)
    return module, dict(zip(ports, names, strict=True))
