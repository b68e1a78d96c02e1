"""Results are checked against the pipeline's output signature: a forged or malformed result
on the client's socket is dropped and counted, and the real one is still returned."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tvm
import zmq
from modules import unary_module

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.library import PipelineLibrary
from tvmpipe.proto.messages import Message, encode

from .stages import stuck_on_negative

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    """mod1 (Python: doubles, 6 s on some inputs) -> mod2 (Relax, negates): float32 (1, 4)."""
    second = unary_module("negative")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (stuck_on_negative, "data")
    cfg.connect(stuck_on_negative, 0, second, "data_0")
    cfg.outputs.append((second, 0))
    with tvm.transform.PassContext(opt_level=3):
        built = build_pipeline(cfg)
    yield built
    built.close()


def test_forged_results_are_dropped_and_counted(lib: PipelineLibrary) -> None:
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        # security off: with it on, the forger could not connect (test_data_plane_security.py);
        # results are checked against the signature either way
        with PipelineModule(lib, security="off") as pipe:
            push.connect(pipe.address)
            x = np.arange(4, dtype="float32").reshape(1, 4)
            np.testing.assert_allclose(pipe.submit({"x": x}).result(30)[0], -2 * x)
            slow = np.full((1, 4), -100.0, "float32")  # mod1 holds it for 6 s
            future = pipe.submit({"x": slow})
            forged: list[dict[str, Any]] = [
                {"0": np.zeros((3, 3), "float64")},  # wrong dtype and shape
                {"0": np.zeros((1, 5), "float32")},  # wrong shape
                {"wrong": np.zeros((1, 4), "float32")},  # not the output's name
            ]
            for tensors in forged:
                push.send_multipart(encode(Message.data(1, "mod2", tensors)))
            deadline = time.monotonic() + 5
            while pipe.stats()["client"].get("bad_results", 0) < len(forged):
                assert time.monotonic() < deadline, pipe.stats()["client"]
                time.sleep(0.02)
            assert not future.done()
            np.testing.assert_allclose(future.result(30)[0], -2 * slow)
    finally:
        push.close(0)
        context.term()
