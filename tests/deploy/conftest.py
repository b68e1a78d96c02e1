"""Shared by the deployment tests: the RFC's three-module example, built once per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tvm
from modules import rfc_example_modules, wire_rfc_example

from tvmpipe.orchestrator import PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.library import PipelineLibrary


@pytest.fixture(scope="module")
def rfc_lib() -> Iterator[PipelineLibrary]:
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, *rfc_example_modules())
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg)
    yield lib
    lib.close()
