"""Python stages for the deploy tests; only numpy here, so a worker can load the file alone."""

import time

import numpy as np


def slow_double(data):  # type: ignore[no-untyped-def]
    """Stands for a busy accelerator: 0.2 s per input."""
    time.sleep(0.2)
    return np.asarray(data) * 2
