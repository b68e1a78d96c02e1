"""Python stages for ``tvmpipe bench``; module level, so that a worker imports them by name.

The configuration tracks stages by identity, so a chain of n stages needs n distinct
functions: ``BUSY[k]`` is the k-th "accelerator" stage, ``IDENTITY[k]`` the k-th forwarder.
"""

from __future__ import annotations

import time

import numpy as np


def _busy(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stands for an accelerator: the device is busy ``busy_ms`` ms, the CPU is free."""
    time.sleep(float(busy_ms.flat[0]) / 1e3)
    return data, busy_ms


def busy_1(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _busy(data, busy_ms)


def busy_2(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _busy(data, busy_ms)


def busy_3(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _busy(data, busy_ms)


def busy_4(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _busy(data, busy_ms)


def busy_5(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _busy(data, busy_ms)


def busy_6(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _busy(data, busy_ms)


def busy_7(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _busy(data, busy_ms)


def busy_8(data: np.ndarray, busy_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _busy(data, busy_ms)


def identity_1(data: np.ndarray) -> np.ndarray:
    """Passes its input on untouched: the stage costs only the data plane."""
    return data


def identity_2(data: np.ndarray) -> np.ndarray:
    return data


BUSY = (busy_1, busy_2, busy_3, busy_4, busy_5, busy_6, busy_7, busy_8)
IDENTITY = (identity_1, identity_2)
