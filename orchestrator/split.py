"""split_module: cut a Relax module's ``main`` into pipeline stages at binding positions.

``cuts`` are positions in the bindings of ``main`` (all of its binding blocks, in order),
Python-slice style: ``[k1, k2]`` makes the stages ``[0:k1]``, ``[k1:k2]`` and ``[k2:]``, and a
negative position counts from the end. Wiring rules:

- A tensor computed in one stage and used by a later one is an output of the stage that computes
  it and an input of every later stage that uses it, straight from the producer (a skip
  connection goes from stage 0 to stage 2 without passing through stage 1).
- Every parameter of ``main`` is one pipeline input, with the same name, fed to the first stage
  that uses it; that stage passes it on as an extra output to later stages that need it too.
  A parameter nothing uses goes to the first stage; one only returned goes to the last.
- Bindings that depend on no parameter (weights, ``broadcast_to`` of constants) never cross a
  cut: each stage that needs one computes it itself, so weights are not streamed between stages.
- Bindings that nothing in ``main``'s result depends on are dropped.
- The pipeline outputs are ``main``'s outputs in order (the fields of a returned tuple).

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


@dataclass
class _Stage:
    lo: int
    hi: int
    own: set[int] = field(default_factory=set)  # binding indices this stage computes
    consts: set[int] = field(default_factory=set)  # parameter-free bindings it recomputes
    inputs: set[int] = field(default_factory=set)  # keys of the values it receives
    outputs: set[int] = field(default_factory=set)  # keys of the values it sends


def _key(v: relax.Var) -> int:
    """Variables are keyed by node address: ``==`` on a primitive-typed Var builds an expression."""
    return int(v.__chandle__())


def split_module(mod: tvm.IRModule, cuts: Sequence[int]) -> PipelineModuleConfig:
    """Cut ``mod["main"]`` at ``cuts`` and return the wired config of the stages."""
    func = _main_of(mod)
    bindings = _bindings_of(func)
    positions = _normalize_cuts(cuts, len(bindings))
    results = [_key(v) for v in _results_of(func, bindings)]

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
    live = _live(results, uses, index)

    bounds = [0, *positions, len(bindings)]
    stages = [_Stage(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    stage_of = {i: s for s, st in enumerate(stages) for i in range(st.lo, st.hi)}
    for i in sorted(live):
        if not const[i] or _key(bindings[i].var) in results:
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
    for p in params:
        if p in users:
            producer[p] = min(users[p])
        else:
            producer[p] = len(stages) - 1 if p in results else 0
        stages[producer[p]].inputs.add(p)
    producer.update({k: stage_of[i] for k, i in index.items()})
    for v, stage_ids in users.items():
        for s in stage_ids - {producer[v]}:
            stages[producer[v]].outputs.add(v)
            stages[s].inputs.add(v)
    for v in results:
        stages[producer[v]].outputs.add(v)

    for s, st in enumerate(stages):
        _check_stage(s, st, var_of, index, positions)

    modules: list[tvm.IRModule] = []
    port_names: list[dict[int, str]] = []
    out_lists: list[list[int]] = []
    for s, st in enumerate(stages):
        inputs = sorted(st.inputs, key=order.__getitem__)
        outputs = sorted(st.outputs, key=order.__getitem__)
        names = _unique_names([var_of[v] for v in inputs])
        body = [bindings[i] for i in sorted(st.own | st.consts)]
        stage = _stage_module(
            mod, func, [var_of[v] for v in inputs], names, body, [var_of[v] for v in outputs]
        )
        undefined = relax.analysis.free_symbolic_vars(stage["main"])
        if undefined:
            raise ConfigError(
                f"stage {s} (bindings [{st.lo}:{st.hi}] of main, cuts {positions}) uses the "
                f"symbolic shape {', '.join(str(v) for v in undefined)} but none of its inputs has "
                f"it in its shape; move the cut"
            )
        modules.append(stage)
        port_names.append(dict(zip(inputs, names, strict=True)))
        out_lists.append(outputs)

    cfg = PipelineModuleConfig()
    for m in modules:
        cfg[m]  # register in stage order, so that stage k is named mod{k+1}
    for p in params:
        cfg.inputs[var_of[p].name] = (modules[producer[p]], port_names[producer[p]][p])
    for s, ports in enumerate(port_names):
        for v, name in ports.items():
            src = producer[v]
            if src != s:
                cfg.connect(modules[src], out_lists[src].index(v), modules[s], name)
    for v in results:
        cfg.outputs.append((modules[producer[v]], out_lists[producer[v]].index(v)))
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


def _results_of(func: relax.Function, bindings: list[relax.Binding]) -> list[relax.Var]:
    """main's outputs as variables: the fields of a returned tuple, or the returned tensor."""
    ret = func.body.body
    if isinstance(ret, relax.Var):
        values = {_key(b.var): b.value for b in bindings if isinstance(b, relax.VarBinding)}
        if isinstance(values.get(_key(ret)), relax.Tuple):
            ret = values[_key(ret)]
    fields = list(ret.fields) if isinstance(ret, relax.Tuple) else [ret]
    for i, v in enumerate(fields):
        if not isinstance(v, relax.Var) or not isinstance(v.ty, relax.TensorType):
            raise ConfigError(
                f"split_module: main's output {i} ({v}) is not a tensor variable; "
                f"main must return a tensor or a tuple of tensors"
            )
    return fields


def _parameter_free(uses: list[list[int]], index: dict[int, int]) -> list[bool]:
    """Bindings that depend on no parameter: weights and what is computed from them alone."""
    const: list[bool] = []
    for used in uses:
        const.append(all(v in index and const[index[v]] for v in used))
    return const


def _live(results: list[int], uses: list[list[int]], index: dict[int, int]) -> set[int]:
    """Bindings that main's result depends on."""
    live: set[int] = set()
    pending = list(results)
    while pending:
        i = index.get(pending.pop())
        if i is not None and i not in live:
            live.add(i)
            pending.extend(uses[i])
    return live


def _check_stage(
    s: int,
    st: _Stage,
    var_of: dict[int, relax.Var],
    index: dict[int, int],
    positions: list[int],
) -> None:
    where = f"stage {s} (bindings [{st.lo}:{st.hi}] of main, cuts {positions})"
    if not st.own or not st.outputs:
        raise ConfigError(
            f"{where} would have no outputs: none of its bindings is needed by a later stage or "
            f"by main's result; move or drop a cut"
        )
    if not st.inputs:
        raise ConfigError(f"{where} would take no inputs: it computes only constants")
    for v in sorted(st.inputs | st.outputs):
        var = var_of[v]
        if not isinstance(var.ty, relax.TensorType):
            what = f"binding {index[v]}" if v in index else "parameter"
            raise ConfigError(
                f"{where}: {var.name} ({what}, {var.ty}) would be a stage port but is not a "
                f"tensor; only tensors can cross a cut, so cut before it or after its last use"
            )


def _unique_names(inputs: list[relax.Var]) -> list[str]:
    names: list[str] = []
    for v in inputs:
        base = _NOT_IDENT.sub("_", v.name) or "v"
        if base[0].isdigit():
            base = "v_" + base
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _stage_module(
    mod: tvm.IRModule,
    main: relax.Function,
    inputs: list[relax.Var],
    names: list[str],
    body: list[relax.Binding],
    outputs: list[relax.Var],
) -> tvm.IRModule:
    """One stage: fresh parameters bound to the original variables, so bindings stay as they are."""
    params: list[relax.Var] = []
    block: list[relax.Binding] = []
    for v, name in zip(inputs, names, strict=True):
        if not isinstance(v, relax.DataflowVar) and v.name == name:
            params.append(v)  # a parameter of main keeps its variable
        else:
            params.append(relax.Var(name, v.ty))
            block.append(relax.VarBinding(v, params[-1]))
    block += body
    rets: list[relax.Expr] = []
    for v in outputs:
        if isinstance(v, relax.DataflowVar):  # a function may only return non-dataflow vars
            out = relax.Var(v.name, v.ty)
            block.append(relax.VarBinding(out, v))
            v = out
        rets.append(v)
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
    return tvm.IRModule(functions, dict(mod.attrs) if mod.attrs else None, mod.global_infos)
