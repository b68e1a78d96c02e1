"""Fixtures for tests on simulated boards: network namespaces built by deploy/netns.

They need root, iproute2 (``ip``, ``tc``), working ``ip netns add`` and ``tornado`` (TVM's
tracker imports it); without any of these every test here is skipped, saying which is missing.
Boards with CPU quotas (``cpus=``) also need the cgroup v1 cpu controller: the tests that use
the ``cpu_cgroups_available`` fixture are skipped, with the reason, where it is missing.
After every test, nothing may be left running or open (tests/leaks.py) beyond the module's boards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import leaks
import pytest

from tvmpipe.orchestrator.bench_plan import load_boards_module

netns = load_boards_module()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After each test: no process, thread or file descriptor (socket) left (tests/leaks.py).
    Module-scoped fixtures are set up before this snapshot, so what they hold is not counted."""
    with leaks.checked():
        yield


@pytest.fixture(scope="session")
def netns_available() -> None:
    reason = netns.netns_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def cpu_cgroups_available(netns_available: None) -> None:
    reason = netns.cpu_cgroups_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def three_boards_module(netns_available: None) -> Iterator[Any]:
    """Tracker + boards b1, b2 (key "big") and b3 (key "little"), shared by a test module."""
    with netns.SimulatedBoards(["big", "big", "little"]) as boards:
        yield boards


@pytest.fixture
def three_boards(three_boards_module: Any) -> Iterator[Any]:
    """The module's boards, given back to the next test unshaped, linked and all free."""
    boards = three_boards_module
    try:
        yield boards
    finally:
        for board in boards.boards:
            boards.unshape(board)
            boards.restore_link(board)
        boards.wait_free(timeout=20)  # a pipeline left open holds its boards


@pytest.fixture
def make_boards(netns_available: None) -> Iterator[Callable[..., Any]]:
    """``make_boards(keys, **options)``: a set of its own, torn down after the test.

    Options are SimulatedBoards's: ``rate``/``rates`` (links), ``cpu``/``cpus`` (CPU quotas in
    cores; ask for ``cpu_cgroups_available`` too, so that the test skips without cgroups)."""
    made: list[Any] = []

    def make(keys: Sequence[str], **options: Any) -> Any:
        boards = netns.SimulatedBoards(keys, **options)
        made.append(boards)
        return boards.start()

    try:
        yield make
    finally:
        for boards in reversed(made):
            boards.close()


@pytest.fixture(scope="module")
def chain_lib() -> Iterator[Any]:
    """data -> negative (big) -> abs (big) -> negative (little), 256 KiB float32 tensors."""
    import tvm
    from modules import unary_module

    from tvmpipe.orchestrator import PipelineModuleConfig, build_pipeline

    mods = [unary_module(op, (256, 256)) for op in ("negative", "abs", "negative")]
    cfg = PipelineModuleConfig()
    cfg.inputs["data"] = (mods[0], "data_0")
    cfg.connect(mods[0], 0, mods[1], "data_0")
    cfg.connect(mods[1], 0, mods[2], "data_0")
    cfg.outputs.append((mods[2], 0))
    for mod, key in zip(mods, ("big", "big", "little"), strict=True):
        cfg[mod].rpc_key = key
    with tvm.transform.PassContext(opt_level=3):
        lib = build_pipeline(cfg)
    yield lib
    lib.close()
