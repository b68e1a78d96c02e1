"""A board whose link goes down mid-stream: waiting calls fail within 3 s, naming the stage."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from tvmpipe.orchestrator import PipelineModule
from tvmpipe.proto.errors import StageLostError

SHAPE = (256, 256)  # float32: 256 KiB per tensor
DETECTION_LIMIT_S = 3.0


@pytest.mark.timeout(180)
def test_cut_link_fails_inputs_in_flight_within_three_seconds(
    three_boards: Any, chain_lib: Any
) -> None:
    boards = three_boards
    rng = np.random.default_rng(0)
    with PipelineModule(
        chain_lib, tracker=boards.tracker, client_host=boards.controller_address
    ) as pipe:
        host = pipe._fleet.stage_sessions()[1].address.split("//")[1].rsplit(":", 1)[0]
        board = next(b for b in boards.boards if b.address == host)
        boards.shape(board, "2mbit")  # keep inputs in flight: 256 KiB take about 1 s
        futures = [
            pipe.submit({"data": rng.standard_normal(SHAPE).astype("float32")}) for _ in range(8)
        ]
        time.sleep(0.5)  # let the stream reach the board before its link goes
        boards.cut_link(board)
        cut = time.monotonic()
        with pytest.raises(StageLostError, match="stage 'mod2' is lost"):
            futures[-1].result(DETECTION_LIMIT_S + 5)
        detected = time.monotonic() - cut
        print(f"link cut detected after {detected:.2f} s")
        assert detected < DETECTION_LIMIT_S, f"detected after {detected:.2f} s"
        with pytest.raises(StageLostError):
            pipe.submit({"data": np.zeros(SHAPE, "float32")})
        closing = time.monotonic()
    closed_in = time.monotonic() - closing
    assert closed_in < 15, f"close() took {closed_in:.1f} s with a board unreachable"
