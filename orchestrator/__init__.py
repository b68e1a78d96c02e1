"""tvmpipe's controller side: configure, split, build and package a pipeline, then run it.

The public names here follow the pipeline-executor RFC (see DESIGN.md); code outside this
repository is written against them.
"""

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
from .split import split_module

__all__ = [
    "BackpressureTimeout",
    "BuildError",
    "ConfigError",
    "DeployError",
    "InputError",
    "PackageError",
    "PipelineLibrary",
    "PipelineModule",
    "PipelineModuleConfig",
    "ResultTimeoutError",
    "StageError",
    "StageLostError",
    "TvmpipeError",
    "build_pipeline",
    "load_library",
    "split_module",
]
