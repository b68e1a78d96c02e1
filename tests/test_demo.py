"""``make demo`` end to end, and the LocalCluster it runs on (tracker + workers, no leftovers)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tvmpipe.orchestrator import forks
from tvmpipe.orchestrator.localcluster import LocalCluster, LocalClusterError


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Pids still running after ``timeout`` (a zombie waiting for its reaper counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_runs_and_every_result_matches() -> None:
    pytest.importorskip("onnx")  # the demo's network comes from the onnx package
    # untuned: building from a tuning database takes twice as long, and is tested in
    # tests/orchestrator/test_tune.py (on another CPU the demo builds untuned anyway)
    result = subprocess.run(
        # 8 candidate pieces, not 16: on a machine with no measurement cache yet (CI),
        # measuring them is most of the demo's time (from 4 the plan may pick two stages)
        [
            sys.executable,
            "-m",
            "tvmpipe.orchestrator.demo",
            "--inputs",
            "8",
            "--database",
            "none",
            "--segments",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "8/8 results match the unsplit model" in result.stdout, output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["stage", "device"])
    assert "mean ms" in header and "p99 ms" in header
    table = lines[lines.index(header) + 1 :]
    table = table[: table.index("")] if "" in table else table
    rows = [line.split() for line in table if line.split()[:1] in (["mod1"], ["mod2"], ["mod3"])]
    assert [r[0] for r in rows] == ["mod1", "mod2", "mod3"], output
    # the worker column may hold spaces ("host:port (key@tracker)"); the last four columns
    # are inputs, mean ms, p99 ms and planned ms
    assert header.split()[-7:] == ["inputs", "mean", "ms", "p99", "ms", "planned", "ms"]
    assert all(r[1] == "cpu" for r in rows), output
    assert all(r[-4] == "8" for r in rows), output
    assert "inputs/s" in result.stdout and "speedup" in result.stdout
    assert "the plan" in result.stdout and "planned ms" in header  # measured and planned
    assert "bottleneck: " in result.stdout  # pipe.report()


@pytest.mark.timeout(120)
def test_local_cluster_registers_workers_and_leaves_nothing() -> None:
    with LocalCluster(2, key="t") as cluster:
        summary = cluster.summary()
        assert summary["queue_info"]["t"]["free"] == 2, summary
        servers = [s for s in summary["server_info"] if s["key"] == "server:t"]
        assert sorted(tuple(s["addr"]) for s in servers) == sorted(cluster.workers)
        pids = cluster.pids()
        assert len(pids) >= 4, pids  # the tracker, its popen_worker, two workers
        assert cluster.tracker[0] == "127.0.0.1"
        assert {cluster.worker_of(pid) for pid in pids} - {None} == set(cluster.workers)
        assert cluster.worker_of(os.getpid()) is None
        workers = [c.process.pid for c in cluster._workers]
        if forks.enabled():  # forked, not a second import of TVM: the start takes ~3 s less
            assert {psutil.Process(p).ppid() for p in workers} == {forks.server_pid()}
        # each in a session of its own: a terminal's Ctrl-C reaches the controller only
        assert [os.getsid(p) for p in workers] == workers
    assert _wait_gone(pids) == []
    with pytest.raises(LocalClusterError, match="closed"):
        cluster.summary()
    cluster.close()  # closing twice is harmless


@pytest.mark.timeout(120)
def test_local_cluster_failing_worker_stops_the_tracker(tmp_path: Path) -> None:
    """A worker that cannot start: the error carries its stderr, and the tracker is stopped."""
    started = tmp_path / "pids"
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'echo $$ >> "{started}"\n'
        'if [ "$2" = "tvmpipe.worker" ]; then echo "worker exploded on purpose" >&2; exit 3; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(LocalClusterError, match="worker exploded on purpose"):
        LocalCluster(1, key="broken", python=str(python), timeout=60)
    pids = [int(line) for line in started.read_text().split()]
    assert len(pids) == 2  # the tracker, then the worker
    # The tracker ran in its own process group (with its popen_worker): all of it is gone.
    group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) in pids]
    assert _wait_gone(pids + group) == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
