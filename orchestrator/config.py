"""PipelineModuleConfig: which module feeds which, where each one runs, checked as it is written.

Every mistake is refused at the line that makes it, with a ConfigError naming the module and the
port, so a user never learns about a typo from a worker's traceback. Modules are tracked by
identity (two equal IRModules are still two stages) and named ``mod1``, ``mod2``, ... by their
1-based position in topological order, ties broken by first appearance.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm.relax.pipeline import PIPELINE_MAP

from tvmpipe.proto.errors import ConfigError

from .signature import Signature, TensorSpec, is_relax_module, signature_of

DEVICES = ("cpu", "cuda", "opencl", "vulkan", "metal", "rocm")
_AFFINITY = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_DEFAULT_NAME = re.compile(r"^mod\d+$")


@dataclass(frozen=True)
class Connection:
    """``src.output(src_index) -> dst.dst_param``."""

    src: Any
    src_index: int
    dst: Any
    dst_param: str

    def __iter__(self) -> Iterator[Any]:
        return iter((self.src, self.src_index, self.dst, self.dst_param))


class ModuleSettings:
    """Per-module settings: ``cfg[module].target = ...``; each setter validates its value."""

    def __init__(self, config: PipelineModuleConfig, module: Any, signature: Signature):
        self._config = config
        self._module = module
        self.signature = signature
        self._name: str | None = None
        self._target: Any = "llvm"
        self._device = "cpu"
        self.rpc_key = ""
        self._cpu_affinity: str | None = None
        self._num_threads: int | None = None
        self._params: dict[str, np.ndarray] = {}
        self._build_func: Callable[[tvm.IRModule, tvm.target.Target], Any] | None = None
        self._relax_pipeline: Any = "default"

    def _label(self) -> str:
        return self._config.name_of(self._module)

    @property
    def name(self) -> str:
        return self._config.name_of(self._module)

    @name.setter
    def name(self, value: str) -> None:
        if not isinstance(value, str) or not _NAME.match(value):
            raise ConfigError(
                f"{self._label()}: a module name must start with a letter or '_' and hold only "
                f"letters, digits, '_', '.', '-'; got {value!r}"
            )
        if _DEFAULT_NAME.match(value):
            raise ConfigError(
                f"{self._label()}: names like {value!r} are kept for default names (modN by "
                f"topological position); choose another name"
            )
        taken = [m for m in self._config.modules if m is not self._module]
        if any(self._config.name_of(m) == value for m in taken):
            raise ConfigError(
                f"{self._label()}: the name {value!r} is already used by another module"
            )
        self._name = value

    @property
    def target(self) -> Any:
        return self._target

    @target.setter
    def target(self, value: Any) -> None:
        try:
            tvm.target.Target(value)
        except Exception as exc:
            raise ConfigError(f"{self._label()}: invalid target {value!r}: {exc}") from exc
        self._target = value

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        if value not in DEVICES:
            raise ConfigError(
                f"{self._label()}: unknown device {value!r}; valid devices: {', '.join(DEVICES)}"
            )
        self._device = value

    @property
    def cpu_affinity(self) -> str | None:
        return self._cpu_affinity

    @cpu_affinity.setter
    def cpu_affinity(self, value: str | None) -> None:
        if value is not None and (not isinstance(value, str) or not _valid_cores(value)):
            raise ConfigError(
                f"{self._label()}: cpu_affinity must list cores like '0', '0-3' or '0,2'; "
                f"got {value!r}"
            )
        self._cpu_affinity = value

    @property
    def num_threads(self) -> int | None:
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value: int | None) -> None:
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ConfigError(f"{self._label()}: num_threads must be a positive int; got {value!r}")
        self._num_threads = value

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self._params

    @params.setter
    def params(self, values: dict[str, Any]) -> None:
        if not is_relax_module(self._module):
            raise ConfigError(f"{self._label()}: only a Relax module takes params")
        checked: dict[str, np.ndarray] = {}
        for pname, value in values.items():
            self._config._check_param(self._module, pname)
            self._config._check_unfed(self._module, pname, "a bound param", include_params=False)
            spec = self.signature.input(pname)
            assert spec is not None
            array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
            given = TensorSpec(pname, str(array.dtype), tuple(array.shape))
            if not spec.compatible(given):
                raise ConfigError(
                    f"{self._label()}.{pname}: param value is {given.describe()} but the module "
                    f"expects {spec.describe()}"
                )
            checked[pname] = array
        self._params = checked

    @property
    def build_func(self) -> Callable[[tvm.IRModule, tvm.target.Target], Any] | None:
        """``f(mod, target)`` returning what ``tvm.compile`` returns; None: ``tvm.compile``."""
        return self._build_func

    @build_func.setter
    def build_func(self, value: Callable[[tvm.IRModule, tvm.target.Target], Any] | None) -> None:
        if value is not None:
            self._check_compiled("build_func")
            if not callable(value):
                raise ConfigError(
                    f"{self._label()}: build_func must be callable as f(mod, target); got {value!r}"
                )
            if not _is_default_pipeline(self._relax_pipeline):
                raise ConfigError(
                    f"{self._label()}: build_func replaces the default compile, so the "
                    f"relax_pipeline already set would be ignored; set one or the other"
                )
        self._build_func = value

    @property
    def relax_pipeline(self) -> Any:
        """``tvm.compile(..., relax_pipeline=...)``; a parallel build runs it in a forked child."""
        return self._relax_pipeline

    @relax_pipeline.setter
    def relax_pipeline(self, value: Any) -> None:
        if not _is_default_pipeline(value):
            self._check_compiled("relax_pipeline")
            named = isinstance(value, str) and value in PIPELINE_MAP
            if not (value is None or callable(value) or named):
                raise ConfigError(
                    f"{self._label()}: relax_pipeline must be a tvm.transform.Pass, a callable "
                    f"mod -> mod, None (no Relax passes) or a pipeline name "
                    f"({', '.join(sorted(PIPELINE_MAP))}); got {value!r}"
                )
            if self._build_func is not None:
                raise ConfigError(
                    f"{self._label()}: build_func replaces the default compile, so a "
                    f"relax_pipeline would be ignored; set one or the other"
                )
        self._relax_pipeline = value

    def _check_compiled(self, what: str) -> None:
        if not is_relax_module(self._module):
            raise ConfigError(f"{self._label()}: only a Relax module is compiled; {what} is unused")


class _Inputs(MutableMapping[str, tuple[Any, str]]):
    """``cfg.inputs[name] = (module, param)``, checked on assignment."""

    def __init__(self, config: PipelineModuleConfig):
        self._config = config
        self._items: dict[str, tuple[Any, str]] = {}

    def __setitem__(self, name: str, binding: tuple[Any, str]) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a pipeline input name must be a non-empty str; got {name!r}")
        module, param = _pair(binding, f"cfg.inputs[{name!r}]", "(module, parameter name)")
        with self._config._registering(module):
            self._config._check_param(module, param)
            self._config._check_unfed(module, param, f"pipeline input {name!r}", ignore_input=name)
        self._items[name] = (module, param)

    def __getitem__(self, name: str) -> tuple[Any, str]:
        return self._items[name]

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class _Outputs(list[tuple[Any, int]]):
    """``cfg.outputs.append((module, index))``, checked on every way in."""

    def __init__(self, config: PipelineModuleConfig):
        super().__init__()
        self._config = config

    def _checked(self, item: Any) -> tuple[Any, int]:
        module, index = _pair(item, "cfg.outputs entry", "(module, output index)")
        with self._config._registering(module):
            self._config._check_output(module, index)
        return (module, index)

    def append(self, item: Any) -> None:
        super().append(self._checked(item))

    def extend(self, items: Any) -> None:
        super().extend([self._checked(item) for item in items])

    def insert(self, index: Any, item: Any) -> None:
        super().insert(index, self._checked(item))

    def __setitem__(self, index: Any, item: Any) -> None:
        if isinstance(index, slice):
            super().__setitem__(index, [self._checked(i) for i in item])
        else:
            super().__setitem__(index, self._checked(item))

    def __iadd__(self, items: Any) -> _Outputs:  # type: ignore[misc,override]
        self.extend(items)
        return self


class _ParamGroups(MutableMapping[str, Any]):
    """``cfg.param_groups[name] = module``: weights a running pipeline may replace."""

    def __init__(self, config: PipelineModuleConfig):
        self._config = config
        self._items: dict[str, Any] = {}

    def __setitem__(self, name: str, module: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a parameter group name must be a non-empty str; got {name!r}")
        if not is_relax_module(module):
            raise ConfigError(f"param group {name!r}: only a Relax module can hold parameters")
        with self._config._registering(module):
            if any(m is module for g, m in self._items.items() if g != name):
                raise ConfigError(
                    f"param group {name!r}: {self._config.name_of(module)} already belongs to a "
                    f"group"
                )
        self._items[name] = module

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _is_default_pipeline(value: Any) -> bool:
    return isinstance(value, str) and value == "default"


def _valid_cores(spec: str) -> bool:
    if not _AFFINITY.match(spec):
        return False
    ranges = [part.partition("-") for part in spec.split(",")]
    return all(not last or int(first) <= int(last) for first, _, last in ranges)


def _pair(item: Any, what: str, shape: str) -> tuple[Any, Any]:
    if not isinstance(item, tuple) or len(item) != 2:
        raise ConfigError(f"{what} must be a pair {shape}; got {item!r}")
    return item[0], item[1]


class PipelineModuleConfig:
    """The pipeline's graph and per-module settings (the pipeline-executor RFC's config)."""

    def __init__(self) -> None:
        self.modules: list[Any] = []  # in order of first appearance
        self._settings: dict[int, ModuleSettings] = {}
        self._inputs = _Inputs(self)
        self._outputs = _Outputs(self)
        self.connections: list[Connection] = []
        self._param_groups = _ParamGroups(self)

    # Assigning a whole collection goes through the same checks as adding to it.
    @property
    def inputs(self) -> _Inputs:
        return self._inputs

    @inputs.setter
    def inputs(self, items: Any) -> None:
        self._replace("_inputs", _Inputs(self), items)

    @property
    def outputs(self) -> _Outputs:
        return self._outputs

    @outputs.setter
    def outputs(self, items: Any) -> None:
        fresh = _Outputs(self)
        fresh.extend(items)
        self._outputs = fresh

    @property
    def param_groups(self) -> _ParamGroups:
        return self._param_groups

    @param_groups.setter
    def param_groups(self, items: Any) -> None:
        self._replace("_param_groups", _ParamGroups(self), items)

    def _replace(self, attribute: str, fresh: MutableMapping[str, Any], items: Any) -> None:
        """Fill a fresh mapping through its checks; a refused item keeps the old one."""
        old = getattr(self, attribute)
        setattr(self, attribute, fresh)
        try:
            fresh.update(dict(items))
        except BaseException:
            setattr(self, attribute, old)
            raise

    # ----- modules and names
    def __getitem__(self, module: Any) -> ModuleSettings:
        self._register(module)
        return self._settings[id(module)]

    def __contains__(self, module: Any) -> bool:
        return id(module) in self._settings

    def _register(self, module: Any) -> None:
        if id(module) in self._settings:
            return
        self._settings[id(module)] = ModuleSettings(self, module, signature_of(module))
        self.modules.append(module)

    @contextlib.contextmanager
    def _registering(self, *modules: Any) -> Iterator[None]:
        """Register modules for a change; a refused change leaves no new module behind."""
        new = [m for m in modules if id(m) not in self._settings]
        try:
            for module in modules:
                self._register(module)
            yield
        except BaseException:
            for module in new:
                self._settings.pop(id(module), None)
                self.modules = [m for m in self.modules if m is not module]
            raise

    def signature(self, module: Any) -> Signature:
        return self[module].signature

    def topological_order(self) -> list[Any]:
        """Kahn's order; among ready modules the one that appeared first goes first."""
        indegree = {id(m): 0 for m in self.modules}
        for conn in self.connections:
            indegree[id(conn.dst)] += 1
        order: list[Any] = []
        ready = [m for m in self.modules if indegree[id(m)] == 0]
        while ready:
            module = ready.pop(0)
            order.append(module)
            for conn in self.connections:
                if conn.src is module:
                    indegree[id(conn.dst)] -= 1
                    if indegree[id(conn.dst)] == 0:
                        ready.append(conn.dst)
            ready.sort(key=lambda m: self._position(m))
        return order

    def _position(self, module: Any) -> int:
        return next(i for i, m in enumerate(self.modules) if m is module)

    def name_of(self, module: Any) -> str:
        settings = self._settings.get(id(module))
        if settings is not None and settings._name is not None:
            return settings._name
        order = self.topological_order()
        position = next((i for i, m in enumerate(order) if m is module), None)
        return f"mod{position + 1}" if position is not None else repr(module)

    # ----- wiring
    def connect(self, src: Any, src_index: int, dst: Any, dst_param: str) -> None:
        """``src.output(src_index) -> dst.dst_param``."""
        with self._registering(src, dst):
            self._check_connection(src, src_index, dst, dst_param)
        self.connections.append(Connection(src, src_index, dst, dst_param))

    def _check_connection(self, src: Any, src_index: int, dst: Any, dst_param: str) -> None:
        self._check_output(src, src_index)
        self._check_param(dst, dst_param)
        if src is dst:
            name = self.name_of(src)
            raise ConfigError(
                f"{name}.output({src_index}) -> {name}.{dst_param}: a module cannot feed itself"
            )
        path = self._path(dst, src)
        if path is not None:
            cycle = " -> ".join(self.name_of(m) for m in [*path, dst])
            raise ConfigError(
                f"{self.name_of(src)}.output({src_index}) -> {self.name_of(dst)}.{dst_param} "
                f"closes a cycle: {cycle}"
            )
        self._check_unfed(dst, dst_param, f"{self.name_of(src)}.output({src_index})")
        produced = self._output_spec(src, src_index)
        consumed = self.signature(dst).input(dst_param)
        if produced is not None and consumed is not None and not produced.compatible(consumed):
            raise ConfigError(
                f"{self.name_of(src)}.output({src_index}) -> {self.name_of(dst)}.{dst_param}: "
                f"the producer gives {produced.describe()} but the consumer expects "
                f"{consumed.describe()}"
            )

    def _path(self, start: Any, goal: Any) -> list[Any] | None:
        """A path of connections from start to goal, if one exists (depth-first)."""
        stack: list[tuple[Any, list[Any]]] = [(start, [start])]
        seen: set[int] = set()
        while stack:
            node, path = stack.pop()
            if node is goal:
                return path
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend((c.dst, [*path, c.dst]) for c in self.connections if c.src is node)
        return None

    # ----- checks shared by the setters
    def _check_param(self, module: Any, param: Any) -> None:
        sig = self.signature(module)
        if not isinstance(param, str) or sig.input(param) is None:
            valid = ", ".join(sig.input_names) or "none"
            raise ConfigError(
                f"{self.name_of(module)} has no input {param!r}; valid inputs: {valid}"
            )

    def _check_output(self, module: Any, index: Any) -> None:
        outputs = self.signature(module).outputs
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ConfigError(
                f"{self.name_of(module)}: an output index must be a non-negative int; got {index!r}"
            )
        if outputs is not None and index >= len(outputs):
            raise ConfigError(
                f"{self.name_of(module)} has no output({index}): it has {len(outputs)} "
                f"output{'s' if len(outputs) != 1 else ''} (indices 0..{len(outputs) - 1})"
            )

    def _output_spec(self, module: Any, index: int) -> TensorSpec | None:
        outputs = self.signature(module).outputs
        return None if outputs is None else outputs[index]

    def feeder(
        self,
        module: Any,
        param: str,
        ignore_input: str | None = None,
        include_params: bool = True,
    ) -> str | None:
        """Describe what already feeds ``module.param``, or None."""
        for name, (m, p) in self.inputs.items():
            if m is module and p == param and name != ignore_input:
                return f"pipeline input {name!r}"
        for conn in self.connections:
            if conn.dst is module and conn.dst_param == param:
                return f"{self.name_of(conn.src)}.output({conn.src_index})"
        settings = self._settings.get(id(module))
        if include_params and settings is not None and param in settings.params:
            return "a bound param"
        return None

    def _check_unfed(
        self,
        module: Any,
        param: str,
        new_feeder: str,
        ignore_input: str | None = None,
        include_params: bool = True,
    ) -> None:
        existing = self.feeder(module, param, ignore_input, include_params)
        if existing is not None:
            raise ConfigError(
                f"{self.name_of(module)}.{param} is already fed by {existing}; it cannot also be "
                f"fed by {new_feeder}"
            )

    def validate(self) -> None:
        """What can only be judged on the whole graph: nothing unfed, something produced."""
        if not self.outputs:
            raise ConfigError("the pipeline has no output: add one with cfg.outputs.append(...)")
        if not self.inputs:
            raise ConfigError("the pipeline has no input: add one with cfg.inputs[name] = ...")
        for module in self.modules:
            settings = self[module]
            for spec in settings.signature.inputs:
                if self.feeder(module, spec.name) is None:
                    raise ConfigError(
                        f"{self.name_of(module)}.{spec.name} is not fed: connect a producer, "
                        f"bind a pipeline input, or set cfg[module].params"
                    )
            used = any(c.src is module for c in self.connections) or any(
                m is module for m, _ in self.outputs
            )
            if not used:
                raise ConfigError(
                    f"{self.name_of(module)}'s outputs go nowhere: connect them or add a "
                    f"pipeline output"
                )
        for group, module in self.param_groups.items():
            if not self[module].params:
                raise ConfigError(
                    f"param group {group!r}: {self.name_of(module)} has no initial params; set "
                    f"cfg[module].params to the weights that stay inputs of its main"
                )

    def group_of(self, module: Any) -> str | None:
        return next((g for g, m in self.param_groups.items() if m is module), None)

    # ----- printing
    def __str__(self) -> str:
        lines = ["Inputs:"]
        lines += [f"  |- {n}: {self.name_of(m)}.{p}" for n, (m, p) in self.inputs.items()]
        lines.append("Outputs:")
        lines += [f"  |- {self.name_of(m)}.output({i})" for m, i in self.outputs]
        lines.append("Connections:")
        for c in self.connections:
            src, dst = self.name_of(c.src), self.name_of(c.dst)
            lines.append(f"  |- {src}.output({c.src_index}) -> {dst}.{c.dst_param}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<PipelineModuleConfig {len(self.modules)} modules>"
