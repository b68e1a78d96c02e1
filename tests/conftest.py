"""Shared fixtures. The tiny Relax modules the tests build live in tests/modules.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from tvmpipe.orchestrator import forks

# The slowest files, started first: make test runs two pytest-xdist processes that each take a
# whole file at a time, and a long file started last would run alone at the end.
SLOW_FIRST = (
    "test_bench.py",
    "test_demo.py",
    "test_real_networks.py",
    "test_chaos.py",
    "test_recovery.py",
    "test_unequal_boards.py",
    "test_real_network.py",
    "test_memory.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable


@pytest.fixture
def tmp_package_dir(tmp_path: Path) -> Path:
    """Where a test exports a pipeline package (not created yet)."""
    return tmp_path / "pipe_dir"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_at_exit() -> Iterator[None]:
    """The whole suite must leave no child process (workers, trackers, RPC sessions) behind."""
    yield
    forks.shutdown()  # the fork server for local workers lives until then
    me = psutil.Process()
    deadline = time.monotonic() + 10
    left = me.children(recursive=True)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = me.children(recursive=True)
    for child in left:
        child.kill()
    assert not left, "the suite left processes running: " + "; ".join(
        " ".join(p.cmdline()) for p in left if p.is_running()
    )
