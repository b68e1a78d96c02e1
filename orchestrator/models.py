"""Real networks for tests, the demo and benchmarks: the ONNX package's "light" models.

The ``onnx`` package ships real architectures under ``onnx/backend/test/data/light/`` whose
weights are ``ConstantOfShape(0.02)``: every channel is the same, so every class gets the same
score and a wrong split could go unnoticed. ``load_onnx_model`` swaps every floating-point weight
for seeded random values scaled so that activations neither vanish nor explode and the outputs
differ across classes and across inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

__all__ = ["example_input", "light_model_names", "load_onnx_model"]

# Gamma of a batch norm that feeds a residual sum; 1.0 would double the variance at each of
# ResNet-50's 16 additions (logits ~1e3, a one-hot softmax), 0.4 keeps the logits' std near 1.5.
_RESIDUAL_GAIN = 0.4
_SMALL = 0.05  # std of biases and batch-norm means


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(
            "the real-network models need the onnx package: pip install onnx "
            "(or install tvmpipe with its test extra: pip install 'tvmpipe[test]')"
        ) from exc
    return onnx


def _light_dir() -> Path:
    return Path(_onnx().__file__).parent / "backend" / "test" / "data" / "light"


def light_model_names() -> list[str]:
    """Names that ``load_onnx_model`` accepts (``light_squeezenet``, ``light_resnet50``, ...)."""
    return sorted(p.stem for p in _light_dir().glob("*.onnx"))


def load_onnx_model(name: str = "light_squeezenet", seed: int = 0) -> tvm.IRModule:
    """Import ``onnx/backend/test/data/light/{name}.onnx`` with seeded random weights."""
    onnx = _onnx()
    path = _light_dir() / f"{name}.onnx"
    if not path.is_file():
        raise ValueError(f"no ONNX model {name!r}; available: {', '.join(light_model_names())}")
    model = onnx.load(str(path))
    _randomize_weights(model, np.random.default_rng(seed))
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(model)


def load_onnx_file(path: str | Path) -> tvm.IRModule:
    """Import an ONNX model file as it is (its own weights)."""
    onnx = _onnx()
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(onnx.load(str(path)))


def example_input(mod: tvm.IRModule, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random value for each parameter of ``mod["main"]``, keyed by parameter name.

    Floating-point tensors get a random offset and scale per sample and channel on top of
    Gaussian noise: plain noise averages out in global pooling, and every input would then
    give nearly the same output.
    """
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for param in mod["main"].params:
        ty = param.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise ValueError(f"parameter {param.name!r} is not a tensor of known shape: {ty}")
        dims = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
        if None in dims:
            raise ValueError(f"parameter {param.name!r} has a symbolic shape {ty.shape}")
        shape = tuple(int(d) for d in dims if d is not None)
        dtype = np.dtype(str(ty.dtype))
        value: np.ndarray
        if dtype.kind == "f":
            per_channel = shape[:2] + (1,) * (len(shape) - 2)
            offset = rng.standard_normal(per_channel)
            scale = rng.uniform(0.5, 1.5, per_channel)
            value = offset + scale * rng.standard_normal(shape)
        elif dtype.kind == "b":
            value = rng.random(shape) < 0.5
        else:
            value = rng.integers(0, 10, shape)
        inputs[param.name] = np.asarray(value, dtype=dtype)
    return inputs


def _randomize_weights(model: Any, rng: np.random.Generator) -> None:
    """Replace every float initializer and ``ConstantOfShape`` weight with random values."""
    onnx = _onnx()
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, tuple[Any, int]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, (node, k))
    residual = {n for node in graph.node if node.op_type in ("Sum", "Add") for n in node.input}

    shapes: dict[str, tuple[int, ...]] = {}
    dropped_nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shapes[node.output[0]] = tuple(numpy_helper.to_array(inits[node.input[0]]).tolist())
            dropped_nodes.append(node)
    for t in graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and t.name in consumers:
            shapes[t.name] = tuple(t.dims)

    new = {}
    for name, shape in shapes.items():
        node, k = consumers.get(name, (None, -1))
        new[name] = numpy_helper.from_array(_weight(node, k, shape, residual, rng), name)

    shape_inputs = {node.input[0] for node in dropped_nodes}
    still_used = {n for node in graph.node if node not in dropped_nodes for n in node.input}
    dropped_inits = shape_inputs - still_used
    kept = [new.pop(t.name, t) for t in graph.initializer if t.name not in dropped_inits]
    for node in dropped_nodes:
        graph.node.remove(node)
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new.values()])
    # IR version 3 lists initializers among the graph inputs; the importer warns otherwise.
    old_inputs = [i for i in graph.input if i.name not in dropped_inits]
    del graph.input[:]
    graph.input.extend(old_inputs)
    graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims))
        for t in new.values()
    )


def _weight(
    node: Any, k: int, shape: tuple[int, ...], residual: set[str], rng: np.random.Generator
) -> np.ndarray:
    """A random tensor whose scale suits its role in ``node`` (input ``k``)."""
    op = node.op_type if node is not None else ""
    if op in ("Conv", "Gemm", "MatMul") and k == 1 and len(shape) >= 2:
        transposed = op == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)
        fan_in = shape[0] if transposed or op == "MatMul" else int(np.prod(shape[1:]))
        value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)  # He: keeps ReLU nets' scale
    elif op == "BatchNormalization" and k in (1, 4):
        value = rng.uniform(0.8, 1.2, shape)  # scale and variance: near 1, positive
        if k == 1 and node.output[0] in residual:
            value *= _RESIDUAL_GAIN
    else:
        value = rng.standard_normal(shape) * _SMALL
    return value.astype(np.float32)
