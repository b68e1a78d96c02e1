"""Fixtures for tests on simulated boards: network namespaces built by deploy/netns.

They need root, iproute2 (``ip``, ``tc``), working ``ip netns add`` and ``tornado`` (TVM's
tracker imports it); without any of these every test here is skipped, saying which is missing.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BOARDS_PY = Path(__file__).resolve().parents[2] / "deploy" / "netns" / "boards.py"


def _load_boards_module() -> ModuleType:
    """deploy/netns/boards.py is a plain file (deploy/ is no package): load it by path."""
    name = "tvmpipe_netns_boards"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BOARDS_PY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while executing it
        spec.loader.exec_module(module)
    return sys.modules[name]


netns = _load_boards_module()


@pytest.fixture(scope="session")
def netns_available() -> None:
    reason = netns.netns_unavailable()
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
    """``make_boards(keys, rate=None)``: a set of its own, torn down after the test."""
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
