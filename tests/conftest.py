"""Shared fixtures. The tiny Relax modules the tests build live in tests/modules.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from tvmpipe.orchestrator import forks

# The slowest files, longest first: make test runs three pytest-xdist processes that each take a
# whole file at a time, and a long file started last would run alone at the end. The order is
# each file's total in a cold-cache run (--durations=0) on a 2-core VM, largest first.
SLOW_FIRST = (
    "test_tune.py",
    "test_unequal_boards.py",
    "test_demo.py",
    "test_bench.py",
    "test_real_networks.py",
    "test_control_plane_security.py",
    "test_split.py",
    "test_pipeline.py",
    "test_cli.py",
    "test_recovery.py",
    "test_tune_top.py",
    "test_shared_memory.py",
    "test_chaos.py",
    "test_real_network.py",
    "test_boards.py",
    "test_memory.py",
    "test_large_tensor.py",
    "test_link_failure.py",
    "test_floods.py",
    "test_measure.py",
    "test_rewrite.py",
    "test_fuzz.py",
    "test_forks.py",
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
