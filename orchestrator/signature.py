"""What a stage looks like from outside: its input names, and the dtype and shape of each port.

A stage is a Relax module (types read from ``main``) or a plain Python function (names from its
signature, types unknown until it runs). Shapes hold ``None`` for a symbolic dimension.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax

from tvmpipe.proto.errors import ConfigError

Shape = tuple[int | None, ...]
_DTYPE_NAMES: dict[Any, str] = {}  # numpy dtype -> its name: str(dtype) costs microseconds


@dataclass(frozen=True)
class TensorSpec:
    """One port: a name, a dtype and a shape; ``None`` means unknown (Python stages)."""

    name: str
    dtype: str | None = None
    shape: Shape | None = None

    @classmethod
    def of(cls, name: str, array: Any) -> TensorSpec:
        """What an array is, as a port spec (checked for every input and result: kept cheap)."""
        dtype = array.dtype
        text = _DTYPE_NAMES.get(dtype)
        if text is None:
            text = str(dtype)
            if len(_DTYPE_NAMES) < 256:  # a few in practice; never unbounded
                _DTYPE_NAMES[dtype] = text
        return cls(name, text, array.shape)

    def describe(self) -> str:
        if self.dtype is None:
            return "any tensor"
        dims = (
            "?"
            if self.shape is None
            else ", ".join("?" if d is None else str(d) for d in self.shape)
        )
        return f"{self.dtype}[{dims}]"

    def compatible(self, other: TensorSpec) -> bool:
        """False only when both sides are known and disagree."""
        if self.dtype is not None and other.dtype is not None and self.dtype != other.dtype:
            return False
        if self.shape is None or other.shape is None:
            return True
        if len(self.shape) != len(other.shape):
            return False
        return all(
            a is None or b is None or a == b for a, b in zip(self.shape, other.shape, strict=True)
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": _shape_json(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        shape = data.get("shape")
        return cls(str(data["name"]), data.get("dtype"), None if shape is None else tuple(shape))


def _shape_json(shape: Shape | None) -> list[int | None] | None:
    return None if shape is None else list(shape)


@dataclass(frozen=True)
class Signature:
    """Inputs (ordered as the stage takes them) and outputs; ``outputs`` is None when unknown."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] | None

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]


def is_relax_module(obj: object) -> bool:
    return isinstance(obj, tvm.IRModule)


def signature_of(module: object) -> Signature:
    """Read the signature of a Relax module or a Python function; refuse anything else."""
    if is_relax_module(module):
        assert isinstance(module, tvm.IRModule)
        return _relax_signature(module)
    if callable(module):
        return _python_signature(module)
    raise ConfigError(
        f"a pipeline module must be a tvm.IRModule with a Relax function 'main' or a plain "
        f"Python function, not {type(module).__name__}"
    )


def _relax_signature(mod: tvm.IRModule) -> Signature:
    names = [gv.name_hint for gv in mod.get_global_vars()]
    if "main" not in names or not isinstance(mod["main"], relax.Function):
        raise ConfigError(f"the module has no Relax function 'main' (it has: {sorted(names)})")
    func = mod["main"]
    inputs = tuple(_spec(param.name, param.ty) for param in func.params)
    return Signature(inputs, tuple(_output_specs(func)))


def _output_specs(func: relax.Function) -> list[TensorSpec]:
    # The body's own type keeps static shapes that the declared return type may have dropped.
    result_type = getattr(func.body.body, "ty", None) or func.ret_ty
    fields = getattr(result_type, "fields", None)
    if fields is None:
        return [_spec("output(0)", result_type)]
    return [_spec(f"output({i})", field) for i, field in enumerate(fields)]


def _spec(name: str, ty: Any) -> TensorSpec:
    if not isinstance(ty, relax.TensorType):
        return TensorSpec(name)
    dtype = str(ty.dtype) if str(ty.dtype) else None
    shape_expr = ty.shape
    if shape_expr is None or not hasattr(shape_expr, "values"):
        return TensorSpec(name, dtype, None)
    dims = tuple(
        int(v.value) if isinstance(v, tvm.tirx.IntImm) else None for v in shape_expr.values
    )
    return TensorSpec(name, dtype, dims)


def _python_signature(func: Callable[..., Any]) -> Signature:
    check_python_stage(func)
    params = inspect.signature(func).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    odd = [p.name for p in params if p.kind not in kinds]
    if odd:
        raise ConfigError(
            f"Python stage {func.__qualname__!r} takes *args/**kwargs or positional-only "
            f"parameters ({', '.join(odd)}): its inputs must be named parameters"
        )
    return Signature(tuple(TensorSpec(p.name) for p in params), None)


def check_python_stage(func: Callable[..., Any]) -> None:
    """A Python stage must be found again by module and name on the worker."""
    name = getattr(func, "__qualname__", repr(func))
    if not inspect.isfunction(func):
        raise ConfigError(
            f"Python stage {name!r} must be a plain function defined at module level, "
            f"not {type(func).__name__}"
        )
    if func.__name__ == "<lambda>":
        raise ConfigError(
            "a lambda cannot be a pipeline stage: the worker must import it by name; "
            "define it with 'def' at module level"
        )
    if "<locals>" in func.__qualname__ or func.__closure__:
        raise ConfigError(
            f"Python stage {name!r} is a closure or a nested function: the worker imports "
            f"stages by module and name, so define it at module level"
        )
