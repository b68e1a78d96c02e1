"""The CPU quota a worker reports to the planner, read from its cgroup path (v1 and v2): the
tightest along the path, None when no level sets one. Real cgroups: tests/netns."""

from __future__ import annotations

from pathlib import Path

from tvmpipe.worker.probe import cpu_quota


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def test_cgroup_v1_takes_the_tightest_quota_along_the_path(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _write(root / "cpu,cpuacct", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    _write(root / "cpu,cpuacct" / "boards", cpu_cfs_quota_us="90000", cpu_cfs_period_us="100000")
    _write(
        root / "cpu,cpuacct" / "boards" / "b1",
        cpu_cfs_quota_us="30000",
        cpu_cfs_period_us="100000",
    )
    (tmp_path / "cgroup").write_text("12:memory:/boards/b1\n4:cpu,cpuacct:/boards/b1\n0::/x\n")
    assert cpu_quota(tmp_path / "cgroup", root) == (0.3, 0.1)
    (tmp_path / "cgroup").write_text("4:cpu,cpuacct:/boards\n")
    assert cpu_quota(tmp_path / "cgroup", root) == (0.9, 0.1)


def test_cgroup_v2_reads_cpu_max(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _write(root / "slice", cpu_max="max 100000")
    _write(root / "slice" / "board", cpu_max="40000 50000")
    (tmp_path / "cgroup").write_text("0::/slice/board\n")
    assert cpu_quota(tmp_path / "cgroup", root) == (0.8, 0.05)


def test_no_quota_anywhere_is_none(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _write(root / "cpu", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    (tmp_path / "cgroup").write_text("3:cpu:/\n")
    assert cpu_quota(tmp_path / "cgroup", root) is None
    assert cpu_quota(tmp_path / "missing", root) is None
