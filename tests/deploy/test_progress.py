"""Building and deploying show progress on stderr when asked (or on a terminal), else nothing."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from modules import rfc_example_modules, wire_rfc_example

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig, build_pipeline

pytestmark = pytest.mark.timeout(120)


def _build(progress: bool | None):  # type: ignore[no-untyped-def]
    mod1, mod2, mod3 = rfc_example_modules()
    cfg = PipelineModuleConfig()
    wire_rfc_example(cfg, mod1, mod2, mod3)
    with tvm.transform.PassContext(opt_level=3):
        return build_pipeline(cfg, progress=progress)


def test_progress_when_asked(capfd: pytest.CaptureFixture[str]) -> None:
    lib = _build(progress=True)
    try:
        err = capfd.readouterr().err
        assert "compiling" in err and "3/3" in err and "mod3 compiled" in err
        with PipelineModule(lib, progress=True) as pipe:
            err = capfd.readouterr().err
            assert "deploying" in err and "3/3" in err and "loaded" in err
            one = np.ones((1, 4), "float32")
            assert pipe.submit({"data_0": one, "data_1": one, "data_2": one}).result(30)
    finally:
        lib.close()


def test_quiet_when_not_on_a_terminal(capfd: pytest.CaptureFixture[str]) -> None:
    lib = _build(progress=None)  # pytest's captured stderr is no terminal
    try:
        with PipelineModule(lib):
            pass
        assert capfd.readouterr().err == ""
    finally:
        lib.close()
