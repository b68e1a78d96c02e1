"""Shared fixtures. The tiny Relax modules the tests build live in tests/modules.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def tmp_package_dir(tmp_path: Path) -> Path:
    """Where a test exports a pipeline package (not created yet)."""
    return tmp_path / "pipe_dir"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
