"""``tvmpipe bench --quick``: every comparison runs and reports positive figures, nothing is left.

A smoke test of the benchmark's plumbing, not of speed: the figures of a quick run on a busy
machine mean little, so no target is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

TOKEN_ENV = "TVMPIPE_BENCH_TEST_TOKEN"
COMPARISONS = ("1 ", "2 ", "3 ", "4 ", "5 ")


def _marked(token: str) -> list[psutil.Process]:
    """Live processes that inherited this test's token: workers, forwarders, orphans."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TOKEN_ENV) == token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_bench_reports_every_comparison(tmp_path: Path) -> None:
    pytest.importorskip("onnx")  # comparison 4's network comes from the onnx package
    out = tmp_path / "out" / "bench.json"
    token = uuid.uuid4().hex
    result = subprocess.run(
        [sys.executable, "-m", "tvmpipe.orchestrator.cli", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, TOKEN_ENV: token},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    for prefix in COMPARISONS:
        assert any(r["comparison"].startswith(prefix) for r in rows), (prefix, result.stdout)
    for row in rows:
        assert row["tvmpipe"] > 0 and row["baseline"] > 0 and row["ratio"] > 0, row
        assert row["met"] in (True, False, None)
    assert sum(r["target"] is not None for r in rows) >= 7  # quick: two of the three chains
    assert report["machine"]["cpu_count"] >= 1
    assert not report["errors"]
    for row in rows:  # the table prints every row
        assert row["metric"] in result.stdout
    deadline = time.monotonic() + 10
    left = _marked(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _marked(token)
    assert not left, [" ".join(p.cmdline()) for p in left]
