"""Each stage buffers a bounded number of bytes however fast the producer is (queue_bytes)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from modules import sleep_then_copy, unary_module

from tvmpipe.orchestrator import PipelineLibrary, PipelineModule, PipelineModuleConfig

from .conftest import build

pytestmark = pytest.mark.timeout(120)

SHAPE = (256, 1024)  # 1 MiB of float32
MIB = 1 << 20


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    """A fast Relax stage feeding a slow Python one: the fast one's queues fill up."""
    fast = unary_module("negative", SHAPE)
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (fast, "data_0")
    cfg.connect(fast, 0, sleep_then_copy, "data")
    cfg.outputs.append((sleep_then_copy, 0))
    built = build(cfg)
    yield built
    built.close()


@pytest.mark.parametrize(
    ("queue_bytes", "security"), [(2 * MIB, "auto"), (2 * MIB, "encrypt"), (64 * MIB, "auto")]
)
def test_queued_bytes_stay_within_queue_bytes(
    lib: PipelineLibrary, queue_bytes: int, security: str
) -> None:
    """With security on, libzmq keeps each connection's credentials in the receive queue, and
    CURVE makes every frame larger than its tensor: a socket sized for one 1 MiB message must
    still take one (it did neither once, and the pipeline stalled)."""
    x = np.ones(SHAPE, dtype="float32")
    x[0, 0] = -0.02  # negated by the fast stage: the slow one sleeps 20 ms per input
    count = 40
    with PipelineModule(lib, window=count, queue_bytes=queue_bytes, security=security) as pipe:
        futures = [pipe.submit({"x": x}) for _ in range(count)]
        peak = 0
        while not futures[-1].done():
            fast = pipe.stats()["stages"]["mod1"]
            peak = max(peak, fast["queued_bytes"])
            time.sleep(0.01)
        for future in futures:
            np.testing.assert_allclose(future.result(10)[0], -x)
    print(f"queue_bytes {queue_bytes // MIB} MiB: the fast stage held at most {peak / MIB} MiB")
    # the send queue gets half; one 1 MiB item always passes alone
    assert MIB <= peak <= max(queue_bytes // 2, MIB)
