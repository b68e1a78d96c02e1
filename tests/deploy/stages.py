"""Python stages for the deploy tests; only numpy here, so a worker can load the file alone."""

import time

import numpy as np


def slow_double(data):  # type: ignore[no-untyped-def]
    """Stands for a busy accelerator: 0.2 s per input."""
    time.sleep(0.2)
    return np.asarray(data) * 2


def stuck_on_negative(data):  # type: ignore[no-untyped-def]
    """Doubles; an input whose sum is below -100 takes 6 s (a result that is late)."""
    if float(np.sum(data)) < -100:
        time.sleep(6)
    return np.asarray(data) * 2


def halve(data):  # type: ignore[no-untyped-def]
    return np.asarray(data) / 2
