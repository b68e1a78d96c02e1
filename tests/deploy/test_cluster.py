"""Cluster files: placements per stage, and errors that say where the file is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from modules import rfc_example_reference

from tvmpipe.orchestrator import PipelineModule
from tvmpipe.orchestrator.cluster import ClusterFileError, Placement, load_cluster
from tvmpipe.orchestrator.deploy import LocalWorker
from tvmpipe.orchestrator.library import PipelineLibrary

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "cluster.example.toml"


@pytest.fixture(scope="module")
def lib(rfc_lib: PipelineLibrary) -> PipelineLibrary:
    return rfc_lib


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_the_example_file_loads(lib: PipelineLibrary) -> None:
    plan = load_cluster(EXAMPLE, lib)
    assert plan.tracker == ("192.168.1.10", 9190)
    assert plan.client_host == "192.168.1.10" and plan.bind_host == "192.168.1.10"
    assert plan.secret_file == "/etc/tvmpipe/secret"
    assert plan.placements["mod1"] == Placement(
        key="rk3399", options={"cpu_affinity": "4-5", "num_threads": 2}
    )
    assert plan.placements["mod2"] == Placement(server="192.168.1.21:9091")
    assert plan.placements["mod3"].options == {"cpu_affinity": "0-3"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[tracker\nhost = 1", r"cluster\.toml: not valid TOML: .*line 1"),
        ("[stages.mod9]\nserver = 'h:1'", r"\[stages\.mod9\]: the pipeline has no stage 'mod9'"),
        ("[stages.mod1]\nkeyy = 'x'", r"\[stages\.mod1\]: unknown setting 'keyy'; valid: "),
        (
            "[stages.mod1]\nserver = 'nohost'",
            r"\[stages\.mod1\]: server = 'nohost' is not HOST:PORT",
        ),
        ("[stages.mod1]\nkey = 'a'\nserver = 'h:1'", r"\[stages\.mod1\]: give key or server"),
        ("[stages.mod1]\nkey = 'a'", r"\[stages\.mod1\]: key 'a' needs a \[tracker\]"),
        ("[tracker]\nhost = 'h'", r"\[tracker\] needs both host and port"),
        ("[tracker]\nhost = 'h'\nport = 'x'", r"\[tracker\]: port must be a int"),
        ("[stages.mod1]\nnum_threads = '2'", r"\[stages\.mod1\]: num_threads must be a int"),
        ("[stages.mod1]\nnum_threads = true", r"\[stages\.mod1\]: num_threads must be a int"),
        ("[stages.mod1]\nallow_relay = 1", r"\[stages\.mod1\]: allow_relay must be a bool"),
        ("[workers]\nx = 1", r"unknown section\(s\) \['workers'\]"),
        ("[stages]\nmod1 = 3", r"\[stages\.mod1\] must be a table"),
        ("", r"\[stages\.mod1\]: no key or server for this stage"),
    ],
)
def test_malformed_cluster_files_say_where(
    lib: PipelineLibrary, tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ClusterFileError, match=expected):
        load_cluster(write(tmp_path, text), lib)


def test_missing_cluster_file(lib: PipelineLibrary, tmp_path: Path) -> None:
    with pytest.raises(ClusterFileError, match="no such cluster file"):
        PipelineModule(lib, cluster=tmp_path / "nope.toml")


@pytest.mark.timeout(120)
def test_pipeline_deployed_from_a_cluster_file(lib: PipelineLibrary, tmp_path: Path) -> None:
    workers = [LocalWorker() for _ in range(3)]
    try:
        addresses = [f"{h}:{p}" for h, p in (w.wait_ready() for w in workers)]
        text = "\n".join(
            f'[stages.mod{i + 1}]\nserver = "{addr}"\nnum_threads = 1'
            for i, addr in enumerate(addresses)
        )
        rng = np.random.default_rng(5)
        sets = [
            [rng.standard_normal((1, 4)).astype("float32") for _ in range(3)] for _ in range(10)
        ]
        with PipelineModule(lib, cluster=write(tmp_path, text)) as pipe:
            outs = list(pipe.map({"data_0": a, "data_1": b, "data_2": c} for a, b, c in sets))
            stages = pipe.stats()["stages"]
        for (a, b, c), out in zip(sets, outs, strict=True):
            np.testing.assert_allclose(out[0], rfc_example_reference(a, b, c), rtol=1e-6)
        assert [stages[f"mod{i}"]["worker"] for i in (1, 2, 3)] == addresses
        assert all(stages[f"mod{i}"]["threads"] == 1 for i in (1, 2, 3))
    finally:
        for worker in workers:
            worker.stop()
