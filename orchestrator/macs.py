"""Cuts that balance multiply-adds: a static estimate that needs no compile and no timing.

It knows nothing of which board is fast, which link is slow or where a tensor is large, so it is
no longer how tvmpipe splits a model (plan.py measures and plans); the benchmark keeps it as the
baseline a planned split is compared with.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax


def binding_costs(mod: tvm.IRModule) -> list[float]:
    """Multiply-adds of each binding of ``main`` (convolutions, matmuls); else its output size.

    The split is balanced by this static estimate: it needs no compile and no timing. On
    SqueezeNet it cuts at [40, 99], whose stages take 65, 79 and 88 ms (one thread each, run
    alone), where the cuts [42, 82] give 65, 51 and 116 ms.
    """
    costs: list[float] = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            costs.append(_cost(binding.value, binding.var.ty))
    return costs


def _dims(ty: Any) -> list[int] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    values = [d.value if isinstance(d, tvm.tirx.IntImm) else None for d in ty.shape.values]
    return None if None in values else [int(v) for v in values if v is not None]


def _cost(value: relax.Expr, ty: Any) -> float:
    out = _dims(ty)
    if out is None:
        return 0.0
    size = float(np.prod(out))
    op = value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else ""
    if op in ("relax.nn.conv2d", "relax.nn.conv1d", "relax.nn.conv3d"):
        weight = _dims(value.args[1].ty)
        if weight is not None:
            return size * float(np.prod(weight[1:]))  # (in / groups) * kernel per output
    if op == "relax.matmul":
        lhs = _dims(value.args[0].ty)
        if lhs:
            return size * lhs[-1]
    return size


def balanced_cuts(costs: Sequence[float], n_stages: int) -> list[int]:
    """Cut positions that give each stage about ``1/n_stages`` of the total cost."""
    cumulative = np.cumsum(costs)
    total = float(cumulative[-1])
    cuts: list[int] = []
    for k in range(1, n_stages):
        cut = int(np.searchsorted(cumulative, total * k / n_stages)) + 1
        cut = max(cut, (cuts[-1] + 1) if cuts else 1)
        cuts.append(min(cut, len(costs) - (n_stages - k)))
    return cuts


def shares(costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    bounds = [0, *cuts, len(costs)]
    total = float(sum(costs))
    return [sum(costs[a:b]) / total for a, b in itertools.pairwise(bounds)]
