"""tvmpipe's one exception tree, shared by the controller and the workers.

    TvmpipeError
    ├── ConfigError (ValueError)         a pipeline configuration mistake, raised where it is made
    ├── PackageError (ValueError)        a damaged or incompatible pipeline package
    ├── BuildError                       a stage failed to compile
    ├── ProtocolError (ValueError)       a data-plane message that fails validation
    │   └── VersionMismatchError         controller and worker speak different versions
    ├── DeployError                      a stage could not be placed, uploaded or wired
    │   ├── TrackerUnreachableError      the RPC tracker did not answer
    │   └── NoWorkerError                no worker is registered (or free) under a key
    ├── StageError                       a stage raised while processing one input
    └── PipelineError                    misuse of a running pipeline
        ├── PipelineClosedError          the pipeline was closed
        ├── InputError (ValueError)      a wrong input name, dtype or shape
        ├── NothingToRunError            run() with no complete input set queued
        ├── StageLostError               a stage's worker died or became unreachable
        │   └── ResultTimeoutError       an input's result did not arrive in time
        └── BackpressureTimeout (TimeoutError)  the in-flight window stayed full too long

Lower-level errors (ZeroMQ, OS, TVM's RPCError) are mapped to these where they are caught,
always with ``raise ... from exc`` so the original stays in the traceback.
"""

from __future__ import annotations


class TvmpipeError(Exception):
    """Base of every error tvmpipe raises on purpose."""


class ConfigError(TvmpipeError, ValueError):
    """A pipeline configuration mistake; the message names the module and the port."""


class PackageError(TvmpipeError, ValueError):
    """A pipeline package that is damaged, incomplete or built by an incompatible version."""


class BuildError(TvmpipeError):
    """A stage failed to compile; the message names the stage and carries TVM's error."""


class ProtocolError(TvmpipeError, ValueError):
    """A data-plane message that does not follow the wire protocol."""


class VersionMismatchError(ProtocolError):
    """The controller and a worker run versions that cannot talk to each other."""


class DeployError(TvmpipeError):
    """A stage could not be placed on a worker, uploaded, loaded or wired."""


class TrackerUnreachableError(DeployError):
    """The RPC tracker could not be reached (nothing listens there, or it does not answer)."""


class NoWorkerError(DeployError):
    """The tracker has no worker under a key, or none of them became free in time."""


class StageError(TvmpipeError):
    """A stage failed on one input; carries the remote error's type, message and traceback."""

    def __init__(self, stage: str, seq: int, error_type: str, message: str, traceback_text: str):
        self.stage = stage
        self.seq = seq
        self.error_type = error_type
        self.remote_message = message
        self.traceback_text = traceback_text
        super().__init__(
            f"stage {stage!r} failed on input #{seq}: {error_type}: {message}\n"
            f"--- remote traceback ---\n{traceback_text.rstrip()}"
        )


class PipelineError(TvmpipeError):
    """Misuse of a running pipeline."""


class PipelineClosedError(PipelineError):
    """The pipeline was closed; a closed pipeline cannot be reused."""


class InputError(PipelineError, ValueError):
    """A pipeline input with a wrong name, dtype or shape."""


class NothingToRunError(PipelineError):
    """run() was called while no complete input set is queued."""


class StageLostError(PipelineError):
    """A stage's worker died or became unreachable; inputs in flight cannot complete."""

    def __init__(self, stage: str, message: str):
        self.stage = stage
        super().__init__(message)


class BackpressureTimeout(PipelineError, TimeoutError):
    """The window of inputs in flight stayed full for longer than the timeout."""


class ResultTimeoutError(StageLostError):
    """An input's result did not arrive within ``result_timeout``; names where it stopped."""
