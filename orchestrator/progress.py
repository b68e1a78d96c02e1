"""Progress of building and deploying a pipeline, on a terminal only (tqdm).

``enabled=None`` shows it when stderr is a terminal; ``False`` keeps quiet; ``True`` shows it
anyway. The bar counts stages; its text says what the last one did.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

tqdm.monitor_interval = 0  # no monitor thread: bars here are short and closed by their owners


def stage_progress(what: str, stages: int, enabled: bool | None = None) -> Any:
    """A bar over ``stages`` steps; ``.update(1)`` and ``.set_postfix_str(text)``; close it."""
    return tqdm(
        total=stages,
        desc=what,
        unit="stage",
        file=sys.stderr,
        disable=(not sys.stderr.isatty()) if enabled is None else not enabled,
        leave=True,
        mininterval=0,  # a few updates, each worth showing
        dynamic_ncols=True,
    )
