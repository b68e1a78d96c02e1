"""tvmpipe's controller side: configure, split, build and package a pipeline, then run it.

The public names here follow the pipeline-executor RFC (see docs/api.md); code outside this
repository is written against them. They are imported on first use (PEP 562), so that light
entry points such as ``tvmpipe --help`` (``tvmpipe.orchestrator.cli``) do not import TVM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tvmpipe.proto.errors import (
        BackpressureTimeout,
        BuildError,
        ConfigError,
        DeployError,
        InputError,
        PackageError,
        ResultTimeoutError,
        StageError,
        StageLostError,
        TvmpipeError,
    )

    from .build import build_pipeline
    from .client import PipelineModule
    from .config import PipelineModuleConfig
    from .library import PipelineLibrary, load_library
    from .plan import Plan, plan_pipeline
    from .split import split_module
    from .tune import tune_pipeline

# Each public name and the module that defines it.
_ERRORS = "tvmpipe.proto.errors"
_WHERE = {
    "BackpressureTimeout": _ERRORS,
    "BuildError": _ERRORS,
    "ConfigError": _ERRORS,
    "DeployError": _ERRORS,
    "InputError": _ERRORS,
    "PackageError": _ERRORS,
    "ResultTimeoutError": _ERRORS,
    "StageError": _ERRORS,
    "StageLostError": _ERRORS,
    "TvmpipeError": _ERRORS,
    "build_pipeline": f"{__name__}.build",
    "PipelineModule": f"{__name__}.client",
    "PipelineModuleConfig": f"{__name__}.config",
    "PipelineLibrary": f"{__name__}.library",
    "load_library": f"{__name__}.library",
    "Plan": f"{__name__}.plan",
    "plan_pipeline": f"{__name__}.plan",
    "split_module": f"{__name__}.split",
    "tune_pipeline": f"{__name__}.tune",
}

__all__ = [
    "BackpressureTimeout",
    "BuildError",
    "ConfigError",
    "DeployError",
    "InputError",
    "PackageError",
    "PipelineLibrary",
    "Plan",
    "PipelineModule",
    "PipelineModuleConfig",
    "ResultTimeoutError",
    "StageError",
    "StageLostError",
    "TvmpipeError",
    "build_pipeline",
    "load_library",
    "plan_pipeline",
    "split_module",
    "tune_pipeline",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use, then keep it here (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
