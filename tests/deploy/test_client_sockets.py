"""On loopback the client takes results on a Unix socket: on Linux in the abstract namespace
(no file, even if the client is killed), elsewhere in a private directory that exists while
the pipeline is open and is gone once it is closed, or once deploying it failed."""

from __future__ import annotations

import os
import stat
import tempfile

import numpy as np
import pytest
from modules import rfc_example_reference

import tvmpipe.orchestrator.client as client_module
from tvmpipe.orchestrator import PipelineModule
from tvmpipe.orchestrator.library import PipelineLibrary
from tvmpipe.proto.errors import DeployError

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("platform", ["linux", "other"])
def test_result_socket_leaves_nothing_behind(
    rfc_lib: PipelineLibrary, monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    if platform == "other":
        monkeypatch.setattr(client_module.sys, "platform", "darwin")
    x = [np.full((1, 4), v, dtype="float32") for v in (1.0, 2.0, 3.0)]
    with PipelineModule(rfc_lib) as pipe:
        assert pipe.address.startswith("ipc://")
        path = pipe.address[len("ipc://") :]
        if platform == "linux":
            assert path.startswith("@")  # abstract: no file
        else:
            folder = os.path.dirname(path)
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        out = pipe.submit({"data_0": x[0], "data_1": x[1], "data_2": x[2]}).result(30)
        np.testing.assert_allclose(out[0], rfc_example_reference(*x))
    if platform == "other":
        assert not os.path.exists(folder)


def test_a_failed_deploy_leaves_no_directory(
    rfc_lib: PipelineLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    original = tempfile.mkdtemp

    def mkdtemp(prefix: str) -> str:
        made.append(original(prefix=prefix))
        return made[-1]

    monkeypatch.setattr(client_module.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(client_module.sys, "platform", "darwin")  # the directory case
    with pytest.raises(DeployError):  # nothing listens on port 1
        PipelineModule(rfc_lib, servers=["127.0.0.1:1"] * 3, deploy_timeout=5)
    assert made and not any(os.path.exists(path) for path in made)
