"""Shared by the deployment tests: the RFC's three-module example, built once per module, and
after every test a check that no process, thread or socket was left behind."""

from __future__ import annotations

from collections.abc import Iterator

import leaks
import pytest
import tvm
from modules import rfc_example_modules, unary_module, wire_rfc_example

from tvmpipe.orchestrator import PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.library import PipelineLibrary

from .stages import slow_double


@pytest.fixture(scope="module")
def rfc_lib() -> Iterator[PipelineLibrary]:
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, *rfc_example_modules())
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg)
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def slow_lib() -> Iterator[PipelineLibrary]:
    """mod1 (Relax, negates: fast) -> mod2 (Python, doubles in 0.2 s per input: slow)."""
    first = unary_module("negative")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, slow_double, "data")
    cfg.outputs.append((slow_double, 0))
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg)
    yield lib
    lib.close()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After each test: no process, thread or file descriptor (socket) left (tests/leaks.py).
    Module-scoped fixtures are set up before this snapshot, so what they hold is not counted."""
    with leaks.checked():
        yield
