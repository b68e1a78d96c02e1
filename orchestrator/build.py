"""build_pipeline: compile every stage for its own target and gather them into a library.

Stages compile in forked child processes, as many at once as there are cores: TVM's compiler is
not thread-safe (it keeps global op-tag state), and Relax modules with bound weights cannot be
serialised to JSON reliably, so fork is the way to share the module with a second core. A stage
whose target is another architecture is exported as a ``.tar`` of objects for its board to link.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax

from tvmpipe.proto.errors import BuildError

from .config import PipelineModuleConfig
from .library import (
    Edge,
    InputBinding,
    OutputBinding,
    PipelineLibrary,
    StageInfo,
    new_build_directory,
    remove_with,
    sha256_of,
)
from .signature import is_relax_module, signature_of


@dataclass
class _CompileJob:
    stage: str
    module: tvm.IRModule
    target: tvm.target.Target
    path: Path


def build_pipeline(cfg: PipelineModuleConfig, *, jobs: int | None = None) -> PipelineLibrary:
    """Compile each stage under the active PassContext; ``jobs`` caps parallel compiles."""
    cfg.validate()
    directory = new_build_directory()
    try:
        lib = _build_into(cfg, directory, jobs)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    lib._cleanup = remove_with(lib, directory)
    return lib


def _build_into(cfg: PipelineModuleConfig, directory: Path, jobs: int | None) -> PipelineLibrary:
    stages: list[StageInfo] = []
    compile_jobs: list[_CompileJob] = []
    for module in cfg.topological_order():
        settings = cfg[module]
        name = settings.name
        common: dict[str, Any] = {
            "name": name,
            "device": settings.device,
            "rpc_key": settings.rpc_key,
            "cpu_affinity": settings.cpu_affinity,
            "num_threads": settings.num_threads,
        }
        if is_relax_module(module):
            group = cfg.group_of(module)
            prepared = module if group else _bind_params(module, settings.params)
            target = tvm.target.Target(settings.target)
            path = directory / f"{name}{'.tar' if is_cross_compiled(target) else '.so'}"
            compile_jobs.append(_CompileJob(name, prepared, target, path))
            sig = signature_of(prepared)
            info = StageInfo(
                kind="relax",
                artifact=path.name,
                sha256="",
                inputs=list(sig.inputs),
                outputs=list(sig.outputs or ()),
                target=json.loads(str(target)),
                param_group=group,
                **common,
            )
            if group:
                info.params_file = f"{name}.params.npz"
                np.savez(directory / info.params_file, **settings.params)  # type: ignore[arg-type]
                info.params_sha256 = sha256_of(directory / info.params_file)
        else:
            info = _python_stage(module, directory, common)
        stages.append(info)

    _compile_all(compile_jobs, jobs or os.cpu_count() or 1)
    for info in stages:
        info.sha256 = sha256_of(directory / info.artifact)

    def stage_name(module: Any) -> str:
        return cfg.name_of(module)

    inputs = []
    for name, (module, param) in cfg.inputs.items():
        spec = cfg.signature(module).input(param)
        assert spec is not None
        inputs.append(InputBinding(name, stage_name(module), param, replace(spec, name=name)))
    outputs = [OutputBinding(stage_name(m), i) for m, i in cfg.outputs]
    edges = [
        Edge(stage_name(c.src), c.src_index, stage_name(c.dst), c.dst_param)
        for c in cfg.connections
    ]
    groups = {g: stage_name(m) for g, m in cfg.param_groups.items()}
    return PipelineLibrary(stages, inputs, outputs, edges, groups, directory)


def is_cross_compiled(target: tvm.target.Target) -> bool:
    """An LLVM target whose triple names another architecture than this machine's."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple:
        return False
    host = str(tvm.target.codegen.llvm_get_system_triple())
    return triple.split("-")[0] != host.split("-")[0]


def _bind_params(module: tvm.IRModule, params: dict[str, np.ndarray]) -> tvm.IRModule:
    if not params:
        return module
    bound = {name: tvm.runtime.tensor(value) for name, value in params.items()}
    return relax.transform.BindParams("main", bound)(module)


def _python_stage(func: Any, directory: Path, common: dict[str, Any]) -> StageInfo:
    """Ship the function's source file so a worker without the user's code can load it."""
    source = inspect.getsourcefile(func)
    artifact = f"{common['name']}.py"
    if source is None or not Path(source).is_file():
        raise BuildError(
            f"stage {common['name']!r}: cannot find the source file of {func.__qualname__}"
        )
    shutil.copyfile(source, directory / artifact)
    sig = signature_of(func)
    return StageInfo(
        kind="python",
        artifact=artifact,
        sha256="",
        inputs=list(sig.inputs),
        outputs=None,
        python={"module": func.__module__, "function": func.__qualname__},
        **common,
    )


def _compile_one(job: _CompileJob) -> None:
    executable = tvm.compile(job.module, job.target)
    executable.export_library(str(job.path))


def _compile_all(jobs: list[_CompileJob], parallel: int) -> None:
    # Forking a process that runs other threads can deadlock the child; compile serially then.
    if parallel < 2 or len(jobs) < 2 or not hasattr(os, "fork") or threading.active_count() > 1:
        for job in jobs:
            try:
                _compile_one(job)
            except Exception as exc:
                raise BuildError(
                    f"stage {job.stage!r} failed to compile for {job.target}: {exc}"
                ) from exc
        return
    pending = list(jobs)
    running: dict[int, _CompileJob] = {}
    failures: list[str] = []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            running[_fork_compile(job)] = job
        pid, status = _wait_any(list(running))
        job = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            error_file = job.path.with_suffix(".error")
            detail = error_file.read_text() if error_file.exists() else "the compiler process died"
            failures.append(f"stage {job.stage!r} failed to compile for {job.target}:\n{detail}")
    if failures:
        raise BuildError("\n".join(failures))


def _wait_any(pids: list[int]) -> tuple[int, int]:
    """Wait for one of our own compile processes (os.wait would reap anyone's child)."""
    while True:
        for pid in pids:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return done, status
        time.sleep(0.02)


def _fork_compile(job: _CompileJob) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _compile_one(job)
        code = 0
    except BaseException:
        job.path.with_suffix(".error").write_text(traceback.format_exc())
    finally:
        os._exit(code)
