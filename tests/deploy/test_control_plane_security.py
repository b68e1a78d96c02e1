"""Attacks on the control plane (tvm.rpc), each refused: no secret, a wrong one, a replayed proof,
an impostor worker, paths out of a session's directory, a rogue plain server at the tracker.

One set of real processes for the whole file, on ephemeral loopback ports: TVM's tracker with a
worker under key "board", two workers by address, all three with the secret; a worker without
one; and TVM's own RPC server registered at the tracker under key "rogue".
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from modules import rfc_example_reference
from tvm import rpc

from tvmpipe.orchestrator import PipelineModule
from tvmpipe.orchestrator.cli import main as cli_main
from tvmpipe.orchestrator.deploy import (
    LocalWorker,
    SecretError,
    connect_server,
    request_from_tracker,
)
from tvmpipe.orchestrator.library import PipelineLibrary, StageInfo
from tvmpipe.orchestrator.localcluster import (
    WITH_PARENT_BOOT,
    LocalCluster,
    free_port,
    free_workers,
    tracker_summary,
)
from tvmpipe.proto.errors import DeployError
from tvmpipe.proto.rpcauth import ENV_SECRET_FILE, PROOF_OPTION, ProofChecker, session_proof
from tvmpipe.worker.__main__ import main as worker_main

pytestmark = pytest.mark.timeout(60)
STAGE = StageInfo(name="mod1", kind="relax", artifact="", sha256="", inputs=[], outputs=None)


def _write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@dataclass
class Net:
    secret: Path
    secret_bytes: bytes
    tracker: tuple[str, int]
    servers: list[str]  # two workers with the secret
    open_worker: LocalWorker  # no secret
    rogue: str  # the plain TVM server, host:port


def _rogue_server(tracker_port: int, log: object) -> tuple[subprocess.Popen[bytes], int]:
    start = free_port()
    command = [sys.executable, "-c", WITH_PARENT_BOOT, "tvm.exec.rpc_server", "--host"]
    command += ["127.0.0.1", "--port", str(start), "--port-end", str(start + 100)]
    command += ["--tracker", f"127.0.0.1:{tracker_port}", "--key", "rogue"]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True
    )
    return proc, start


def _wait_free(tracker: tuple[str, int], key: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while free_workers(tracker_summary(*tracker), key) < 1:
        assert time.monotonic() < deadline, f"no free server under {key!r} in {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    folder = tmp_path_factory.mktemp("secret")
    text = base64.b64encode(os.urandom(32)).decode()
    secret = _write_secret(folder / "secret", text + "\n")
    # Started together: each process takes a second or two to import TVM.
    workers = [LocalWorker(secret_file=str(secret)) for _ in range(2)]
    open_worker = LocalWorker()
    cluster = rogue = None
    with tempfile.TemporaryFile() as log:
        try:
            cluster = LocalCluster(1, key="board", secret_file=str(secret))
            rogue, _ = _rogue_server(cluster.tracker[1], log)
            servers = [f"{h}:{p}" for h, p in (w.wait_ready() for w in workers)]
            open_worker.wait_ready()
            _wait_free(cluster.tracker, "rogue")
            log.seek(0)
            found = re.search(rb"bind to 127\.0\.0\.1:(\d+)", log.read())
            assert found, "the rogue server did not report its port"
            rogue_address = f"127.0.0.1:{int(found.group(1))}"
            yield Net(secret, text.encode(), cluster.tracker, servers, open_worker, rogue_address)
        finally:
            for worker in [*workers, open_worker]:
                worker.stop()
            if rogue is not None:
                assert rogue.stdin is not None
                rogue.stdin.close()  # its process group ends when its stdin closes
                rogue.wait(10)
            if cluster is not None:
                cluster.close()


@pytest.fixture(autouse=True)
def no_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_SECRET_FILE, raising=False)


def _cluster_file(tmp_path: Path, net: Net, mod2: str, relay: bool = False) -> Path:
    """mod1 and mod3 on the workers by address, mod2 as given; the secret by a relative path."""
    (tmp_path / "secret").symlink_to(net.secret)
    path = tmp_path / "cluster.toml"
    path.write_text(
        f'[tracker]\nhost = "127.0.0.1"\nport = {net.tracker[1]}\n\n'
        f'[controller]\nsecret_file = "secret"\n\n'
        f'[stages.mod1]\nserver = "{net.servers[0]}"\n\n'
        f"[stages.mod2]\n{mod2}\nallow_relay = {'true' if relay else 'false'}\n\n"
        f'[stages.mod3]\nserver = "{net.servers[1]}"\n'
    )
    return path


def _run_three(pipe: PipelineModule) -> None:
    rng = np.random.default_rng(5)
    sets = [[rng.standard_normal((1, 4)).astype("float32") for _ in range(3)] for _ in range(3)]
    outputs = list(pipe.map({"data_0": a, "data_1": b, "data_2": c} for a, b, c in sets))
    for (a, b, c), out in zip(sets, outputs, strict=True):
        np.testing.assert_allclose(out[0], rfc_example_reference(a, b, c), rtol=1e-6)


# ----- the worker's secret file


@pytest.mark.parametrize(
    ("text", "mode", "says"),
    [
        (None, 0o600, "no such file"),
        ("\n", 0o600, "is empty"),
        ("x" * 40, 0o644, "permissions 0644 are too open"),
        ("short", 0o600, "fewer than 16"),
    ],
)
def test_a_worker_refuses_to_start_with_an_unusable_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, mode: int, says: str
) -> None:
    path = tmp_path / "secret"
    if text is not None:
        _write_secret(path, text, mode)
    assert worker_main(["--secret-file", str(path), "--port", "0"]) == 1
    assert says in capsys.readouterr().err


def test_tvmpipe_plan_checks_its_secret_file_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["plan", "light_squeezenet", "--secret-file", str(tmp_path / "none")])
    assert exited.value.code == 2 and "no such file" in capsys.readouterr().err


def test_a_worker_without_a_secret_warns_once_that_anyone_can_run_code(net: Net) -> None:
    warning = net.open_worker.stderr_tail()
    assert warning.count("anyone who can reach") == 1 and "--secret-file" in warning


# ----- controllers without the secret


def test_a_session_without_a_proof_is_refused_before_anything_runs(net: Net) -> None:
    host, _, port = net.servers[0].rpartition(":")
    with pytest.raises(Exception, match="requires a secret and the session offered no proof"):
        rpc.connect(host, int(port), session_timeout=0)  # no session: nothing to upload with
    with pytest.raises(SecretError, match=rf"the worker at {net.servers[0]} requires a secret: "):
        connect_server(STAGE, net.servers[0], timeout=20)


def test_a_wrong_secret_is_refused_also_through_the_tracker(net: Net) -> None:
    with pytest.raises(SecretError, match="refused this controller's secret: wrong secret"):
        connect_server(STAGE, net.servers[0], timeout=20, secret=b"w" * 32)
    with pytest.raises(SecretError, match="requires a secret"):
        request_from_tracker(STAGE, net.tracker, "board", timeout=20)
    _wait_free(net.tracker, "board")  # the refused worker registers again


def test_a_replayed_or_stale_proof_is_refused(net: Net) -> None:
    host, _, port = net.servers[0].rpartition(":")
    proof = session_proof(net.secret_bytes)
    session = rpc.connect(host, int(port), f" {proof}", session_timeout=0)  # the real one
    assert session.get_function("tvmpipe.clock")() > 0
    del session
    with pytest.raises(Exception, match=r"the proof was used before \(a replay\)"):
        rpc.connect(host, int(port), f" {proof}", session_timeout=0)
    stale = session_proof(net.secret_bytes, now=time.time() - 3600)
    with pytest.raises(Exception, match=r"-3600 s from this worker's clock"):
        rpc.connect(host, int(port), f" {stale}", session_timeout=0)


def test_a_malformed_proof_is_refused_without_raising() -> None:
    """The check runs in the worker's listening thread: an exception there would end it."""
    checker = ProofChecker(b"s" * 32)
    for proof in ("", "v1", "v2.1.n.m", "v1.x.n.m", "v1.nan.n.m", "v1.1.n.\u00e9"):
        assert checker.refusal(proof) is not None, proof
    good = session_proof(b"s" * 32).removeprefix(PROOF_OPTION)
    assert checker.refusal(good) is None
    assert checker.refusal(good) == "the proof was used before (a replay)"


def test_a_malformed_session_timeout_does_not_stop_the_worker(net: Net) -> None:
    port = int(net.open_worker.port or 0)
    rpc.connect("127.0.0.1", port, " -timeout=soon", session_timeout=0)  # TVM's parse raises
    session = rpc.connect("127.0.0.1", port, session_timeout=0)  # still serving
    assert session.get_function("tvmpipe.clock")() > 0
    del session


def test_a_worker_that_cannot_prove_the_secret_gets_nothing(net: Net) -> None:
    """A server that took the session without checking (here one without a secret) cannot
    answer the handshake's challenge: the controller stops before uploading."""
    session = connect_server(STAGE, f"127.0.0.1:{net.open_worker.port}", 20, net.secret_bytes)
    try:
        with pytest.raises(SecretError, match="did not prove that it holds"):
            session.handshake()
    finally:
        session.close(stop=False)


# ----- paths


def test_a_session_cannot_reach_outside_its_directory(net: Net, tmp_path: Path) -> None:
    session = rpc.connect("127.0.0.1", int(net.open_worker.port or 0), session_timeout=0)
    escaped = f"escaped-{uuid.uuid4().hex}"
    try:
        outside = "outside this session's directory"
        for target in (str(tmp_path / escaped), f"../{escaped}", f"a/../../{escaped}"):
            with pytest.raises(Exception, match=outside):
                session.upload(bytearray(b"x"), target=target)
        for path in ("/etc/hostname", "../../../../../etc/hostname"):
            with pytest.raises(Exception, match=outside):
                session.download(path)
        with pytest.raises(Exception, match=outside):
            session.remove(f"../{escaped}")
        with pytest.raises(Exception, match=outside):
            session.load_module("/etc/hostname")
        session.upload(bytearray(b"inside"), target="inside.txt")
        assert bytes(session.download("inside.txt")) == b"inside"
    finally:
        del session
    assert not (tmp_path / escaped).exists()
    assert not (Path(tempfile.gettempdir()) / escaped).exists()


# ----- whole pipelines


def test_with_the_secret_a_pipeline_deploys_by_address_and_tracker_and_runs(
    net: Net, rfc_lib: PipelineLibrary, tmp_path: Path
) -> None:
    cluster = _cluster_file(tmp_path, net, 'key = "board"')
    with PipelineModule(rfc_lib, cluster=cluster) as pipe:
        _run_three(pipe)
    _wait_free(net.tracker, "board")


def test_a_rogue_plain_server_at_the_tracker_gets_no_stage_unless_relay_is_allowed(
    net: Net, rfc_lib: PipelineLibrary, tmp_path: Path
) -> None:
    cluster = _cluster_file(tmp_path, net, 'key = "rogue"')
    with pytest.raises(DeployError) as refused:
        PipelineModule(rfc_lib, cluster=cluster)
    message = str(refused.value)
    assert f"{net.rogue} (rogue@" in message and "is a plain TVM RPC server" in message
    assert "allow_relay=True" in message and "allow_relay = true in [stages.mod2]" in message
    _wait_free(net.tracker, "rogue")
    (tmp_path / "allowed").mkdir()
    allowed = _cluster_file(tmp_path / "allowed", net, 'key = "rogue"', relay=True)
    with PipelineModule(rfc_lib, cluster=allowed) as pipe:
        _run_three(pipe)
        assert pipe.stats()["stages"]["mod2"]["mode"] == "relay"
    _wait_free(net.tracker, "rogue")


def test_tuning_through_the_tracker_proves_the_secret(
    net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MetaSchedule's own tracker request offers no proof, so every trial would be refused:
    tvmpipe tune asks the tracker as deploying does, and says at once when it has no secret."""
    from modules import weighted_module

    from tvmpipe.orchestrator.tune import kind_id, read_kind, tune_pipeline

    target = {"kind": "llvm"}

    def tune() -> list[Any]:
        return tune_pipeline(
            weighted_module(),
            tmp_path / "db",
            trials=1,
            target=target,
            key="board",
            tracker=net.tracker,
            progress=False,
        )

    with pytest.raises(SecretError, match="requires a secret"):
        tune()
    monkeypatch.setenv(ENV_SECRET_FILE, str(net.secret))
    results = tune()
    assert results and all(r.trials_run >= 1 and r.best_s is not None for r in results)
    kind = read_kind(tmp_path / "db" / kind_id(target, "cpu", "board"))
    assert kind["key"] == "board"
    assert kind["measured_on"] == {"tracker": f"127.0.0.1:{net.tracker[1]}", "key": "board"}
    _wait_free(net.tracker, "board")  # every trial's session ended
