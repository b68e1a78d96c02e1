"""A pipeline across simulated boards: placement by tracker key, the data plane, shaped links.

Tracker + three boards in network namespaces (deploy/netns): b1 and b2 register as "big", b3 as
"little". The pipeline is a chain of three stages (keys big, big, little) that moves a 256 KiB
float32 tensor per input, so that bytes on each link are easy to see.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest

from tvmpipe.orchestrator import PipelineModule

SHAPE = (256, 256)  # float32: 256 KiB per tensor
TENSOR_BYTES = 256 * 256 * 4
KEYS = ("big", "big", "little")
SHAPED_RATE = "8mbit"
SHAPED_BYTES_PER_S = 8e6 / 8


def _inputs(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype("float32") for _ in range(count)]


def _placement(pipe: PipelineModule, boards: Any) -> list[Any]:
    """The board each stage runs on, from the data-plane address its worker advertised."""
    by_address = {board.address: board for board in boards.boards}
    hosts = [urlparse(session.address).hostname for session in pipe._fleet.stage_sessions()]
    assert all(host in by_address for host in hosts), f"stages not on the boards: {hosts}"
    return [by_address[host] for host in hosts]


def _stream(pipe: PipelineModule, inputs: list[np.ndarray]) -> tuple[list[Any], list[float]]:
    """Submit every input at once; the outputs and the time each one arrived."""
    arrived: list[float] = [0.0] * len(inputs)
    lock = threading.Lock()

    def stamp(index: int) -> Any:
        def done(_: Any) -> None:
            with lock:
                arrived[index] = time.perf_counter()

        return done

    futures = []
    for index, array in enumerate(inputs):
        future = pipe.submit({"data": array})
        future.add_done_callback(stamp(index))
        futures.append(future)
    outputs = [future.result(timeout=60) for future in futures]
    return outputs, arrived


@pytest.mark.timeout(180)
def test_stages_placed_by_key_and_tensors_go_board_to_board(
    three_boards: Any, chain_lib: Any
) -> None:
    boards, lib = three_boards, chain_lib
    count = 8
    inputs = _inputs(count, seed=1)
    with PipelineModule(lib, tracker=boards.tracker, client_host=boards.controller_address) as pipe:
        placed = _placement(pipe, boards)
        assert len({board.name for board in placed}) == 3, "two stages share a board"
        assert [board.key for board in placed] == list(KEYS)

        controller_before = boards.controller_bytes()
        links_before = [boards.link_bytes(board) for board in placed]
        for array in inputs:
            pipe.set_input("data", array)
            pipe.run()
        outputs = [pipe.get_output(timeout=30) for _ in inputs]
        controller = {k: v - controller_before[k] for k, v in boards.controller_bytes().items()}
        links = [
            {k: v - before[k] for k, v in boards.link_bytes(board).items()}
            for board, before in zip(placed, links_before, strict=True)
        ]
        stats = pipe.stats()

    for array, output in zip(inputs, outputs, strict=True):
        assert len(output) == 1
        np.testing.assert_array_equal(output[0], lib.run_local({"data": array})[0])
        np.testing.assert_array_equal(output[0], -np.abs(array))

    s1, s2, s3 = (stats["stages"][stage.name] for stage in lib.stages)
    figures = (
        f"stage bytes in/out: {s1['bytes_in']}/{s1['bytes_out']}, "
        f"{s2['bytes_in']}/{s2['bytes_out']}, {s3['bytes_in']}/{s3['bytes_out']}; "
        f"controller sent/received {controller['sent']}/{controller['received']}; "
        f"links (to/from board) "
        + ", ".join(
            f"{board.name}: {link['to_board']}/{link['from_board']}"
            for board, link in zip(placed, links, strict=True)
        )
        + f"; client {stats['client']}"
    )
    print(f"\n[placement] {[b.name for b in placed]} keys {[b.key for b in placed]}; {figures}")

    for stage in (s1, s2, s3):
        assert stage["received"] == stage["processed"] == stage["sent"] == count, figures
    assert stats["client"]["completed"] == count, figures
    # Each intermediate tensor left one stage and reached the next, whole: a message per input.
    assert s1["bytes_in"] >= count * TENSOR_BYTES, figures
    assert s2["bytes_in"] == s1["bytes_out"] >= count * TENSOR_BYTES, figures
    assert s3["bytes_in"] == s2["bytes_out"] >= count * TENSOR_BYTES, figures

    # The links carried them board to board: mod1's board sent mod1's output, mod2's board
    # received it and sent mod2's output, mod3's board received that.
    first, middle, last = links
    for link_bytes, payload in (
        (first["from_board"], s1["bytes_out"]),
        (middle["to_board"], s1["bytes_out"]),
        (middle["from_board"], s2["bytes_out"]),
        (last["to_board"], s2["bytes_out"]),
    ):
        assert payload <= link_bytes <= 1.1 * payload + 64 * 1024, figures

    # The controller's own address sent the inputs and received the outputs, and nothing
    # else of size. Had mod1 -> mod2 and mod2 -> mod3 gone through it, it would have received
    # and sent each intermediate tensor once more: 2 MiB more each way.
    inputs_bytes, outputs_bytes = s1["bytes_in"], s3["bytes_out"]
    assert inputs_bytes <= controller["sent"] <= 1.05 * inputs_bytes + 64 * 1024, figures
    assert outputs_bytes <= controller["received"] <= 1.05 * outputs_bytes + 64 * 1024, figures


@pytest.mark.timeout(180)
def test_shaped_link_limits_the_pipeline_throughput(three_boards: Any, chain_lib: Any) -> None:
    boards, lib = three_boards, chain_lib
    count = 16
    inputs = _inputs(count, seed=2)
    expected = [-np.abs(array) for array in inputs]
    figures: dict[str, dict[str, float]] = {}
    with PipelineModule(
        lib, tracker=boards.tracker, client_host=boards.controller_address, window=count
    ) as pipe:
        middle = _placement(pipe, boards)[1]  # mod2's board: both of its links carry tensors
        for label in ("unshaped", "shaped"):
            if label == "shaped":
                boards.shape(middle, SHAPED_RATE)  # tbf both ways, defaults
            link_before = boards.link_bytes(middle)
            bytes_before = pipe.stats()["stages"][lib.stages[1].name]["bytes_in"]
            started = time.perf_counter()
            outputs, arrived = _stream(pipe, inputs)
            elapsed = max(arrived) - started
            link = boards.link_bytes(middle)["to_board"] - link_before["to_board"]
            payload = pipe.stats()["stages"][lib.stages[1].name]["bytes_in"] - bytes_before
            for output, want in zip(outputs, expected, strict=True):
                np.testing.assert_array_equal(output[0], want)
            # Steady state: results leave at the pace of the slowest link, one per message.
            steady = (count - 1) * (payload / count) / (max(arrived) - min(arrived))
            figures[label] = {
                "seconds": elapsed,
                "payload_bytes_per_s": payload / elapsed,
                "steady_bytes_per_s": steady,
                "link_bytes_per_s": link / elapsed,
            }
        boards.unshape(middle)

    text = "; ".join(
        f"{label}: {f['seconds']:.2f} s for {count} x 256 KiB into {middle.name}, payload "
        f"{f['payload_bytes_per_s'] / 1e6:.2f} MB/s (steady {f['steady_bytes_per_s'] / 1e6:.2f}), "
        f"link {f['link_bytes_per_s'] / 1e6:.2f} MB/s"
        for label, f in figures.items()
    )
    text += f"; configured {SHAPED_RATE} = {SHAPED_BYTES_PER_S / 1e6:.2f} MB/s"
    print(f"\n[shaping] {text}")
    shaped, unshaped = figures["shaped"], figures["unshaped"]
    for measure in ("payload_bytes_per_s", "steady_bytes_per_s", "link_bytes_per_s"):
        assert 0.5 * SHAPED_BYTES_PER_S <= shaped[measure] <= 1.2 * SHAPED_BYTES_PER_S, text
    assert unshaped["payload_bytes_per_s"] > 3 * shaped["payload_bytes_per_s"], text


def _answers(address: str, timeout: float) -> bool:
    """Whether the board's stack answers at all: a refused connection (closed port) counts."""
    try:
        with socket.create_connection((address, 9), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


@pytest.mark.timeout(180)
def test_cut_link_isolates_a_board_until_restored(three_boards: Any) -> None:
    boards = three_boards
    board = boards.board("b3")
    assert _answers(board.address, timeout=2), f"{board.name} does not answer before the cut"
    boards.cut_link(board)
    assert not _answers(board.address, timeout=0.5), f"{board.name} still answers after the cut"
    boards.restore_link(board)
    deadline = time.monotonic() + 10
    while not _answers(board.address, timeout=0.5):
        assert time.monotonic() < deadline, f"{board.name} does not answer after the restore"
        time.sleep(0.05)
    boards.wait_free()  # its worker is still registered with the tracker
