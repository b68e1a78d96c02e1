"""``submit`` copies its inputs by default: the caller may reuse its buffer once submit returns,
whether the input travels in a shared-memory slot, on a Unix socket or over TCP. Without
``restart`` nothing keeps the input after it is sent, so the send itself takes the copy."""

from __future__ import annotations

import numpy as np
import pytest
from modules import sleep_then_copy

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig

from .conftest import build

pytestmark = pytest.mark.timeout(120)

INPUTS = 12
STAGE_S = 0.02  # the stage's sleep per input: the later inputs wait in the client's socket


@pytest.mark.parametrize(
    ("transport", "shape", "restart"),
    [
        ("ipc", (256, 1024), False),  # 1 MiB: a shared-memory slot
        ("ipc", (1024,), False),  # 4 KiB: on the Unix socket
        ("tcp", (256, 1024), False),  # 1 MiB over TCP
        ("ipc", (256, 1024), True),  # restart keeps a copy to send again
    ],
)
def test_a_buffer_reused_after_submit_changes_nothing_sent(
    monkeypatch: pytest.MonkeyPatch, transport: str, shape: tuple[int, ...], restart: bool
) -> None:
    monkeypatch.setenv("TVMPIPE_LOOPBACK_TRANSPORT", transport)
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (sleep_then_copy, "data")
    cfg.outputs.append((sleep_then_copy, 0))
    lib = build(cfg)
    try:
        with PipelineModule(lib, window=INPUTS, restart=restart) as pipe:
            buffer = np.empty(shape, dtype="float32")
            futures = []
            for k in range(INPUTS):
                buffer[...] = k
                buffer.flat[0] = STAGE_S
                futures.append(pipe.submit({"data": buffer}))
            buffer[...] = -1.0  # what a borrowed buffer would send from now on
            for k, future in enumerate(futures):
                expected = np.full(shape, k, dtype="float32")
                expected.flat[0] = STAGE_S
                np.testing.assert_array_equal(future.result(30)[0], expected, f"input {k}")
    finally:
        lib.close()
