"""Tiny Relax modules for the tests, with numpy references.

Every function returns fresh ``tvm.IRModule`` objects: the config tracks modules by identity, so
two calls give two distinct stages. The Python stages at the bottom live at module level on
purpose: a worker imports a stage by module and name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tvm
from tvm import relax

Shape = tuple[int | str, ...]  # a str is a symbolic dimension


def _var(name: str, shape: Shape, dtype: str) -> relax.Var:
    dims = [tvm.tirx.Var(d, "int64") if isinstance(d, str) else d for d in shape]
    return relax.Var(name, relax.TensorType(dims, dtype))


def _op(name: str) -> Callable[..., relax.Expr]:
    """``relax.op.<name>`` or ``relax.op.nn.<name>``."""
    op = getattr(relax.op, name, None) or getattr(relax.op.nn, name, None)
    if op is None:
        raise ValueError(f"no relax op {name!r}")
    return op  # type: ignore[no-any-return]


def _module(params: Sequence[relax.Var], body: Callable[..., relax.Expr | list]) -> tvm.IRModule:
    """``main(*params)`` whose dataflow block emits ``body(*params)`` (a list makes a tuple)."""
    bb = relax.BlockBuilder()
    with bb.function("main", list(params)):
        with bb.dataflow():
            result = body(bb, *params)
            if isinstance(result, list):
                fields = [bb.emit(expr) for expr in result]
                out = bb.emit_output(relax.Tuple(fields))
            else:
                out = bb.emit_output(result)
        bb.emit_func_output(out)
    return bb.get()


def const(value: float, dtype: str = "float32") -> relax.Constant:
    return relax.const(value, dtype)


def binary_module(
    op: str = "add",
    shape: Shape = (1, 4),
    dtype: str = "float32",
    names: tuple[str, str] = ("data_0", "data_1"),
) -> tvm.IRModule:
    """``main(names[0], names[1]) -> op(names[0], names[1])``."""
    a, b = _var(names[0], shape, dtype), _var(names[1], shape, dtype)
    return _module([a, b], lambda bb, x, y: _op(op)(x, y))


def unary_module(
    op: str = "negative", shape: Shape = (1, 4), dtype: str = "float32", name: str = "data_0"
) -> tvm.IRModule:
    """``main(name) -> op(name)``."""
    return _module([_var(name, shape, dtype)], lambda bb, x: _op(op)(x))


def multi_output_module(
    n_outputs: int, shape: Shape = (1, 4), dtype: str = "float32", name: str = "data_0"
) -> tvm.IRModule:
    """``main(name) -> (name + 0, name + 1, ..., name + n_outputs - 1)``."""
    return _module(
        [_var(name, shape, dtype)],
        lambda bb, x: [relax.op.add(x, const(i, dtype)) for i in range(n_outputs)],
    )


def weighted_module(shape: Shape = (1, 4), dtype: str = "float32") -> tvm.IRModule:
    """``main(data_0, w) -> data_0 * w + 1``: ``w`` is a weight left as a parameter of main."""
    return _module(
        [_var("data_0", shape, dtype), _var("w", shape, dtype)],
        lambda bb, x, w: relax.op.add(bb.emit(relax.op.multiply(x, w)), const(1.0, dtype)),
    )


def weighted_reference(data_0: np.ndarray, w: np.ndarray) -> np.ndarray:
    return data_0 * w + 1


# ----- DESIGN.md's example: mod1(data_0, data_1), mod2(data_0), mod3(data_0, data_1)


def rfc_example_modules(shape: Shape = (1, 4)) -> tuple[tvm.IRModule, tvm.IRModule, tvm.IRModule]:
    """mod1 = data_0 + data_1, mod2 = data_0 * data_0, mod3 = data_0 - data_1."""
    mod1 = binary_module("add", shape)
    mod2 = _module([_var("data_0", shape, "float32")], lambda bb, x: relax.op.multiply(x, x))
    mod3 = binary_module("subtract", shape)
    return mod1, mod2, mod3


def rfc_example_reference(data_0: np.ndarray, data_1: np.ndarray, data_2: np.ndarray) -> np.ndarray:
    """The pipeline of DESIGN.md: mod3(data_2, mod2(mod1(data_0, data_1)))."""
    return data_2 - (data_0 + data_1) ** 2


def wire_rfc_example(cfg, mod1, mod2, mod3) -> None:  # type: ignore[no-untyped-def]
    """The wiring of DESIGN.md's example, line for line."""
    cfg.inputs["data_0"] = (mod1, "data_0")
    cfg.inputs["data_1"] = (mod1, "data_1")
    cfg.inputs["data_2"] = (mod3, "data_0")
    cfg.outputs.append((mod3, 0))
    cfg.connect(mod1, 0, mod2, "data_0")
    cfg.connect(mod2, 0, mod3, "data_1")


RFC_EXAMPLE_TEXT = """\
Inputs:
  |- data_0: mod1.data_0
  |- data_1: mod1.data_1
  |- data_2: mod3.data_0
Outputs:
  |- mod3.output(0)
Connections:
  |- mod1.output(0) -> mod2.data_0
  |- mod2.output(0) -> mod3.data_1"""


# ----- TVM's old pipeline-executor test network (tests/python/relay/test_pipeline_executor.py)

OLD_TVM_SHAPE = (3, 3)


def old_tvm_test_modules() -> tuple[tvm.IRModule, tvm.IRModule, tvm.IRModule]:
    """mod1(data_0) -> (data_0 + 1, data_0 - 2, data_0 * 3);
    mod2(data_0, data_1) -> data_0 + 2 + data_1 + 3;
    mod3(data_0, data_1) -> data_0 * 3 + data_1."""
    shape, f32 = OLD_TVM_SHAPE, "float32"
    mod1 = _module(
        [_var("data_0", shape, f32)],
        lambda bb, x: [
            relax.op.add(x, const(1.0)),
            relax.op.subtract(x, const(2.0)),
            relax.op.multiply(x, const(3.0)),
        ],
    )
    mod2 = _module(
        [_var("data_0", shape, f32), _var("data_1", shape, f32)],
        lambda bb, x, y: relax.op.add(
            bb.emit(relax.op.add(bb.emit(relax.op.add(x, const(2.0))), y)), const(3.0)
        ),
    )
    mod3 = _module(
        [_var("data_0", shape, f32), _var("data_1", shape, f32)],
        lambda bb, x, y: relax.op.add(bb.emit(relax.op.multiply(x, const(3.0))), y),
    )
    return mod1, mod2, mod3


def wire_old_tvm_test(cfg, mod1, mod2, mod3) -> None:  # type: ignore[no-untyped-def]
    """Two pipeline inputs; mod1.output(0) feeds mod2 and, skipping mod2, mod3; mod2.output(0)
    feeds mod3 and is also a pipeline output; mod1.output(1) goes nowhere."""
    cfg.inputs["data_0"] = (mod1, "data_0")
    cfg.inputs["data_1"] = (mod2, "data_1")
    cfg.connect(mod1, 0, mod2, "data_0")
    cfg.connect(mod1, 0, mod3, "data_1")
    cfg.connect(mod2, 0, mod3, "data_0")
    cfg.outputs.append((mod1, 2))
    cfg.outputs.append((mod3, 0))
    cfg.outputs.append((mod2, 0))


OLD_TVM_TEST_TEXT = """\
Inputs:
  |- data_0: mod1.data_0
  |- data_1: mod2.data_1
Outputs:
  |- mod1.output(2)
  |- mod3.output(0)
  |- mod2.output(0)
Connections:
  |- mod1.output(0) -> mod2.data_0
  |- mod1.output(0) -> mod3.data_1
  |- mod2.output(0) -> mod3.data_0"""


def old_tvm_test_reference(data_0: np.ndarray, data_1: np.ndarray) -> list[np.ndarray]:
    """The outputs of ``wire_old_tvm_test`` in cfg.outputs order."""
    first = data_0 + 1
    second = first + 2 + data_1 + 3
    third = second * 3 + first
    return [data_0 * 3, third, second]


# ----- Python stages (module level, so that a worker can import them by name)


def postprocess(logits):  # type: ignore[no-untyped-def]
    """The index of the largest logit per row."""
    return np.argmax(logits, axis=-1)


def min_max(data):  # type: ignore[no-untyped-def]
    """Two outputs: the smallest and the largest value per row."""
    return data.min(axis=-1), data.max(axis=-1)


def as_list(data):  # type: ignore[no-untyped-def]
    """One output that happens to be a Python list."""
    return data.ravel().tolist()


def takes_varargs(*tensors):  # type: ignore[no-untyped-def]
    return tensors


# ----- Python stages for the integration tests (tests/integration)

FAIL_MARKER = -7.0  # fail_on_marker raises on an input whose first element is this value


def argmax_softmax(logits):  # type: ignore[no-untyped-def]
    """Two outputs: the index of the largest logit per row, and the softmax per row."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.argmax(logits, axis=-1), (shifted / shifted.sum(axis=-1, keepdims=True))


def fail_on_marker(data):  # type: ignore[no-untyped-def]
    """``data * 2``, but raises ValueError when the first element is FAIL_MARKER."""
    if float(data.flat[0]) == FAIL_MARKER:
        raise ValueError(f"marker value {FAIL_MARKER} seen in the input")
    return data * 2


def sleep_then_copy(data):  # type: ignore[no-untyped-def]
    """Sleeps ``data.flat[0]`` seconds (a slow stage on demand), then returns ``data``."""
    import time

    time.sleep(float(data.flat[0]))
    return data.copy()


_HOARD: list = []  # type: ignore[type-arg]


def hoard_then_copy(data):  # type: ignore[no-untyped-def]
    """Keeps every input it is given (as a careless user function might), returns a copy."""
    _HOARD.append(data)
    return data.copy()


def none_on_marker(data):  # type: ignore[no-untyped-def]
    """``data * 2``, but returns None (a missing return) when the first element is FAIL_MARKER."""
    if float(data.flat[0]) == FAIL_MARKER:
        return None
    return data * 2


# ----- Python stages for the memory test (tests/integration/test_memory.py)


def pause_then_increment(data):  # type: ignore[no-untyped-def]
    """Sleeps 1 ms (a stage slower than its producer), then returns ``data + 1``."""
    import time

    time.sleep(0.001)
    return data + 1


def pause_then_double(data):  # type: ignore[no-untyped-def]
    """Sleeps 1 ms, then returns ``data * 2``."""
    import time

    time.sleep(0.001)
    return data * 2
