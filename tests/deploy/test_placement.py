"""A stage's cpu_affinity and num_threads take effect in the thread that computes it."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest
import tvm
from modules import unary_module

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.deploy import DeployError

from .stages import halve

IDLE_CPU_S = 0.1  # an idle stage's threads poll; spinning pool threads take 0.3 s or more


@pytest.mark.timeout(120)
def test_cpu_affinity_and_threads_are_honoured() -> None:
    first, second = unary_module("exp"), unary_module("negative")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, second, "data_0")
    cfg.outputs.append((second, 0))
    cfg[first].cpu_affinity = "0"
    cfg[second].num_threads = 1
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg)
    try:
        with PipelineModule(lib) as pipe:
            x = np.arange(4, dtype="float32").reshape(1, 4)
            np.testing.assert_allclose(pipe.submit({"x": x}).result(10)[0], -np.exp(x), rtol=1e-6)
            stages = pipe.stats()["stages"]
        assert stages["mod1"]["cores"] == [0]
        assert stages["mod1"]["threads"] == 1
        assert stages["mod2"]["threads"] == 1
    finally:
        lib.close()


@pytest.mark.timeout(120)
def test_cores_the_worker_lacks_are_refused_at_deploy() -> None:
    only = unary_module("exp")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (only, "data_0")
    cfg.outputs.append((only, 0))
    cfg[only].cpu_affinity = "4095"
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg)
    try:
        with pytest.raises(DeployError, match=r"stage 'mod1'.*cpu_affinity '4095' names cores"):
            PipelineModule(lib)
    finally:
        lib.close()


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@pytest.mark.timeout(120)
def test_idle_stages_leave_the_cpu_alone() -> None:
    """TVM's pool threads spin for about a third of a second of a core when made (and after
    every parallel kernel): stages that share cores must not, and a Python stage makes none."""
    first = unary_module("exp")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, halve, "data")
    cfg.outputs.append((halve, 0))
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg)
    try:
        with PipelineModule(lib) as pipe:
            x = np.arange(4, dtype="float32").reshape(1, 4)
            np.testing.assert_allclose(pipe.submit({"x": x}).result(10)[0], np.exp(x) / 2)
            stages = pipe.stats()["stages"]
            pids = {name: s["pid"] for name, s in stages.items()}
            before = {name: _cpu_s(pid) for name, pid in pids.items()}
            time.sleep(1.0)  # the window the CPU time is read over, not a wait for a condition
            spent = {name: _cpu_s(pid) - before[name] for name, pid in pids.items()}
        assert stages["mod1"]["threads"] == 1
        assert stages["mod2"]["threads"] == 0  # no TVM pool
        assert all(s < IDLE_CPU_S for s in spent.values()), spent
    finally:
        lib.close()
