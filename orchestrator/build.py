"""build_pipeline: compile every stage for its own target and gather them into a library.

Stages compile in forked child processes, as many at once as there are cores. Threads cannot
share the work: TVM's compiler keeps global op-tag state (two threads compiling at once fail
with "nested op_tag is not allowed"). A spawned process would have to import TVM again (about
1.7 s) and receive the module as JSON, which works with the pinned apache-tvm-ffi but costs more
than a stage's compile; fork shares the imported TVM and the module for free. With 2 free cores
SqueezeNet's three stages build in about 1.9 s forked against 2.5-3.0 s one after another (on
cores busy with other work the two are even). A stage with its own ``build_func`` compiles in
this process, beside the children: the function may keep state or resources that a child's copy
would lose. A stage whose target is another architecture is exported as a ``.tar`` of objects for
its board to link.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pickle
import shutil
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable
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
from .progress import stage_progress
from .signature import is_relax_module, signature_of
from .tune import apply_database, database_digest, find_database, untuned_workloads

UNTUNED_SHOWN = 5  # workload names a warning lists


class UntunedWorkloadWarning(UserWarning):
    """A stage built from a tuning database has workloads the database has no schedule for."""


@dataclass(eq=False)
class _CompileJob:
    stage: str
    module: tvm.IRModule
    target: tvm.target.Target
    path: Path
    build_func: Callable[[tvm.IRModule, tvm.target.Target], Any] | None = None
    relax_pipeline: Any = "default"
    database: Path | None = None  # a kind's MetaSchedule database to apply first


def build_pipeline(
    cfg: PipelineModuleConfig,
    *,
    jobs: int | None = None,
    progress: bool | None = None,
    database: str | os.PathLike[str] | None = None,
) -> PipelineLibrary:
    """Compile each stage under the active PassContext; ``jobs`` caps parallel compiles.
    ``progress``: a bar on stderr (default: when it is a terminal). ``database``: a directory
    written by ``tune_pipeline``; each Relax stage gets the tuned schedules of its kind."""
    cfg.validate()
    directory = new_build_directory()
    try:
        lib = _build_into(cfg, directory, jobs, progress, database)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    lib._cleanup = remove_with(lib, directory)
    return lib


def _build_into(
    cfg: PipelineModuleConfig,
    directory: Path,
    jobs: int | None,
    progress: bool | None,
    database: str | os.PathLike[str] | None = None,
) -> PipelineLibrary:
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
            pipeline = settings.relax_pipeline
            tuned = None
            if database is not None:
                tuned = find_database(database, settings.target, settings.device, settings.rpc_key)
            compile_jobs.append(
                _CompileJob(name, prepared, target, path, settings.build_func, pipeline, tuned)
            )
            sig = signature_of(prepared)
            custom_pipeline = not (isinstance(pipeline, str) and pipeline == "default")
            info = StageInfo(
                kind="relax",
                artifact=path.name,
                sha256="",
                inputs=list(sig.inputs),
                outputs=list(sig.outputs or ()),
                target=json.loads(str(target)),
                param_group=group,
                build_func=_describe(settings.build_func),
                relax_pipeline=(_describe(pipeline) or "none") if custom_pipeline else None,
                tuning_database=_database_record(tuned),
                **common,
            )
            if group:
                info.params_file = f"{name}.params.npz"
                np.savez(directory / info.params_file, **settings.params)  # type: ignore[arg-type]
                info.params_sha256 = sha256_of(directory / info.params_file)
        else:
            info = _python_stage(module, directory, common)
        stages.append(info)

    with stage_progress("compiling", len(compile_jobs), progress) as bar:
        _compile_all(compile_jobs, jobs or os.cpu_count() or 1, bar)
    _warn_untuned(compile_jobs)
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


def _database_record(directory: Path | None) -> dict[str, str] | None:
    """Which tuning a stage was built with, as the package records it."""
    if directory is None:
        return None
    return {"path": str(directory.resolve()), "sha256": database_digest(directory)}


def _describe(value: Any) -> str | None:
    """A build option as the package records it: a name, never the object itself."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, tvm.transform.Pass):
        return f"pass {value.info.name}"
    name = getattr(value, "__qualname__", type(value).__qualname__)
    return f"{getattr(value, '__module__', '')}.{name}".lstrip(".")


def _untuned_file(job: _CompileJob) -> Path:
    """Where a compile (maybe in a forked child) leaves the workloads it found untuned."""
    return job.path.with_name(f"{job.stage}.untuned.json")


def _warn_untuned(jobs: list[_CompileJob]) -> None:
    """Say which stages built some workloads without a tuned schedule, and why that is."""
    for job in jobs:
        path = _untuned_file(job)
        if job.database is None or not path.is_file():
            continue
        untuned = json.loads(path.read_text())
        path.unlink()
        if untuned:
            shown = ", ".join(untuned[:UNTUNED_SHOWN]) + (
                ", ..." if len(untuned) > UNTUNED_SHOWN else ""
            )
            warnings.warn(
                f"stage {job.stage!r}: {len(untuned)} workload(s) are not in the tuning "
                f"database {job.database} and build with the default schedule ({shown}); "
                f"tune this split (tvmpipe tune --cuts ...), or cut where tuned pieces end",
                UntunedWorkloadWarning,
                stacklevel=4,  # the caller of build_pipeline
            )


def _compile_one(job: _CompileJob) -> None:
    """Compile and export one stage; any failure is a BuildError naming the stage."""
    try:
        module = job.module
        if job.database is not None:
            module = apply_database(module, job.target, job.database)
            _untuned_file(job).write_text(json.dumps(untuned_workloads(module)))
        if job.build_func is None:
            executable = tvm.compile(module, job.target, relax_pipeline=job.relax_pipeline)
        else:
            executable = job.build_func(module, job.target)
            if not callable(getattr(executable, "export_library", None)):
                raise TypeError(
                    f"build_func returned {type(executable).__name__}, not a compiled module "
                    f"with export_library (what tvm.compile returns)"
                )
        executable.export_library(str(job.path))
    except Exception as exc:
        raise BuildError(f"stage {job.stage!r} failed to compile for {job.target}: {exc}") from exc


def _compile_all(jobs: list[_CompileJob], parallel: int, bar: Any = None) -> None:
    """Default compiles go to forked children while this process compiles the build_func ones.

    After the first failure nothing new starts; running children are waited for, so none
    outlives the build directory.
    """
    # Forking a process that runs other threads can deadlock the child; compile here then.
    can_fork = (
        parallel > 1 and len(jobs) > 1 and hasattr(os, "fork") and threading.active_count() == 1
    )
    pending = [j for j in jobs if can_fork and j.build_func is None]
    here = [j for j in jobs if not (can_fork and j.build_func is None)]
    running: dict[int, _CompileJob] = {}
    failures: list[BuildError] = []

    def start(slots: int) -> None:
        while pending and not failures and len(running) < slots:
            job = pending.pop(0)
            running[_fork_compile(job)] = job

    start(parallel - 1 if here else parallel)  # this process takes a core for its own jobs

    def compiled(job: _CompileJob) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{job.stage} compiled", refresh=False)
            bar.update(1)

    for job in here:
        if failures:
            break
        try:
            _compile_one(job)
            compiled(job)
        except BuildError as exc:
            failures.append(exc)
    while running or (pending and not failures):
        start(parallel)
        pid, status = _wait_any(list(running))
        job = running.pop(pid)
        if status != 0:
            failures.append(_child_failure(job, status))
        else:
            compiled(job)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise BuildError("\n".join(str(f) for f in failures)) from failures[0].__cause__


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
    except BaseException as exc:
        _report_failure(job, exc)
    finally:
        os._exit(code)


def _report_failure(job: _CompileJob, exc: BaseException) -> None:
    """In the child: the message with the traceback, and the original error if it pickles."""
    cause = exc.__cause__ if isinstance(exc, BuildError) else exc
    message = str(exc) if isinstance(exc, BuildError) else f"stage {job.stage!r}: {exc!r}"
    if cause is not None:
        message += "\n" + "".join(traceback.format_exception(cause)).rstrip()
    try:
        pickled_cause = pickle.dumps(cause)
    except Exception:
        pickled_cause = None
    job.path.with_suffix(".error").write_bytes(pickle.dumps((message, pickled_cause)))


def _child_failure(job: _CompileJob, status: int) -> BuildError:
    """In the parent: the child's BuildError, carrying the original error where it pickled."""
    try:
        message, pickled_cause = pickle.loads(job.path.with_suffix(".error").read_bytes())
    except Exception:
        code = os.waitstatus_to_exitcode(status)
        how = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        return BuildError(f"stage {job.stage!r}: the compiler process {how}")
    error = BuildError(message)
    with contextlib.suppress(Exception):  # else the message alone tells the original error
        error.__cause__ = pickle.loads(pickled_cause) if pickled_cause else None
    return error
