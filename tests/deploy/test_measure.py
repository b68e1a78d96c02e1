"""Measuring for the planner (orchestrator/measure.py): bytes read from main, stage times taken
on real local workers through tvm.rpc, ZeroMQ links, memory, and the on-disk cache."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tvm
import zmq
from modules import _module, _var, old_tvm_test_modules, postprocess, unary_module
from tvm import relax, rpc

from tvmpipe.orchestrator import PipelineModuleConfig, build_pipeline, split_module
from tvmpipe.orchestrator.deploy import start_local_workers
from tvmpipe.orchestrator.measure import (
    MeasureCache,
    candidate_cuts,
    measure_compute,
    measure_link,
    measure_links,
    measure_memory,
    memory_need,
    profile_compute,
    static_profile,
)
from tvmpipe.proto.errors import ConfigError
from tvmpipe.proto.security import REFUSED_EVENTS, Keyring
from tvmpipe.worker import probe

SHAPE = (32, 128)


def light_then_heavy() -> tvm.IRModule:
    """One matmul by a constant weight, then six: cut at 1, the second segment is heavier."""
    rng = np.random.default_rng(0)

    def body(bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        for _ in range(6):
            w = relax.const(rng.standard_normal((SHAPE[1], SHAPE[1])).astype("float32") * 0.1)
            x = bb.emit(relax.op.matmul(x, w))
        w = relax.const(rng.standard_normal((SHAPE[1], SHAPE[1])).astype("float32") * 0.1)
        return relax.op.matmul(x, w)

    return _module([_var("data_0", SHAPE, "float32")], body)


@pytest.fixture(scope="module")
def sessions() -> Iterator[list[Any]]:
    """Two loopback tvmpipe-workers and an RPC session to each, for the whole file."""
    workers = start_local_workers(2)
    try:
        opened = [rpc.connect("127.0.0.1", w.port, session_timeout=0) for w in workers]
        yield opened
        opened.clear()
        gc.collect()
    finally:
        for worker in workers:
            worker.stop()


class Untouchable:
    """A session that fails the test if anything is asked of it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the cache should have answered, but session.{name} was used")


@pytest.mark.timeout(30)
def test_static_profile_counts_bytes() -> None:
    # main(data_0: f32[3, 3]) -> (data_0 + 1.0, data_0 - 2.0, data_0 * 3.0); 36 bytes a tensor.
    mod = old_tvm_test_modules()[0]
    assert static_profile(mod, [1]) == {
        "cut_bytes": [36, 36, 108],  # data_0 in; data_0 crosses to the 2nd segment; 3 outputs
        "weights": [4, 8],  # scalar constants: 1.0 | 2.0, 3.0
        "activations": [36, 36],
    }
    assert static_profile(mod, []) == {"cut_bytes": [36, 108], "weights": [12], "activations": [36]}
    heavy = light_then_heavy()
    profile = static_profile(heavy, [1])
    tensor, weight = 32 * 128 * 4, 128 * 128 * 4
    assert profile == {
        "cut_bytes": [tensor, tensor, tensor],
        "weights": [weight, 6 * weight],
        "activations": [tensor, tensor],
    }
    assert memory_need(profile, 0, 2) == 7 * weight + 2 * tensor


@pytest.mark.timeout(30)
def test_candidate_cuts_are_legal_and_spread() -> None:
    from tvmpipe.orchestrator.models import load_onnx_model

    mod = load_onnx_model("light_squeezenet", seed=0)
    n = sum(len(block.bindings) for block in mod["main"].body.blocks)
    cuts = candidate_cuts(mod, 4)
    assert len(cuts) == 3 and cuts == sorted(set(cuts))
    assert all(n * s // 4 - n // 6 <= c <= n * s // 4 + n // 6 for s, c in enumerate(cuts, 1))
    split_module(mod, cuts)  # every subset is legal; the whole set is the hardest
    for cut in candidate_cuts(mod, 20):
        split_module(mod, [cut])
    assert candidate_cuts(mod, 1) == []
    assert len(static_profile(mod, cuts)["cut_bytes"]) == 5


@pytest.mark.timeout(60)
def test_compute_is_timed_on_the_workers(sessions: list[Any]) -> None:
    mod = light_then_heavy()
    with tvm.transform.PassContext(opt_level=3):
        split = build_pipeline(split_module(mod, [1]))
        whole = build_pipeline(split_module(mod, []))
    try:
        for _ in range(3):  # a busy machine can slow one stage's runs: the best of three tries
            light, heavy = measure_compute(split, sessions[0], "cpu", repeat=3)
            if 0 < light < heavy / 2:
                break
        (unsplit,) = measure_compute(whole, sessions[1], "cpu", repeat=3)
    finally:
        split.close()
        whole.close()
    assert 0 < light < heavy / 2  # one matmul against six
    assert unsplit / 3 < light + heavy < unsplit * 3


@pytest.mark.timeout(30)
def test_python_stages_cannot_be_timed() -> None:
    mod = unary_module("negative", shape=(2, 5))
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (mod, "data_0")
    cfg.connect(mod, 0, postprocess, "logits")
    cfg.outputs.append((postprocess, 0))
    lib = build_pipeline(cfg)
    try:
        with pytest.raises(ConfigError, match="Python function"):
            measure_compute(lib, Untouchable())
    finally:
        lib.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("security", ["auto", "encrypt"])
def test_an_outsider_can_neither_skew_nor_end_a_link_probe(
    sessions: list[Any], security: str
) -> None:
    """A probe's sink admits only the probe's own sender. Two outsiders, one without
    credentials and one posing as the sender with a made-up token (a key pair when encrypted),
    each send enough to end the probe before the sender starts: none of it may be counted."""
    _, b = sessions
    ring = Keyring.generate(security, [(probe.SENDER, probe.SINK)])
    count, size = 4, 1 << 16
    sink_request = {
        "count": count,
        "timeout": 30,
        "security": ring.share(probe.SINK, [probe.SENDER], []),
    }
    sink = json.loads(b.get_function("tvmpipe.probe.sink")(json.dumps(sink_request)))
    assert sink["encrypted"] == (security == "encrypt")
    context = zmq.Context()
    sockets = []
    try:
        for posing in (False, True):
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            monitor = sock.get_monitor_socket(REFUSED_EVENTS)
            sockets += [sock, monitor]
            if posing and security == "encrypt":
                sock.curve_serverkey = ring.parties[probe.SINK].public.encode()
                sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            elif posing:
                sock.plain_username, sock.plain_password = probe.SENDER.encode(), b"a guess"
            sock.connect(sink["address"])
            for _ in range(count):
                sock.send(probe.DATA + bytes(size - 1))
            assert monitor.poll(20_000), "the outsider's handshake neither failed nor ended"
        sent = json.loads(
            probe.send(
                json.dumps(
                    {
                        "address": sink["address"],
                        "count": count,
                        "size": size,
                        "pings": 3,
                        "timeout": 30,
                        "security": ring.share(probe.SENDER, [], [probe.SINK]),
                    }
                )
            )
        )
    finally:
        for sock in sockets:
            sock.close(0)
        context.term()
    received = json.loads(
        b.get_function("tvmpipe.probe.result")(json.dumps({"id": sink["id"], "timeout": 30}))
    )
    assert received["done"] and received["finished"], received
    assert received["messages"] == count and received["bytes"] == count * size == sent["bytes"]
    assert received["refused"] >= 2, received


@pytest.mark.timeout(30)
def test_links_and_memory(sessions: list[Any]) -> None:
    a, b = sessions
    link = measure_link(b, a, count=4, size=1 << 18)
    assert link["latency_s"] > 0 and link["bandwidth_Bps"] > 0 and link["bytes"] == 1 << 20
    links = measure_links({"a": a, "b": b}, count=2, size=1 << 16, pings=3)
    assert {(x["src"], x["dst"]) for x in links} == {
        ("controller", "a"),
        ("controller", "b"),
        ("a", "b"),
        ("b", "a"),
    }
    assert all(x["latency_s"] > 0 and x["bandwidth_Bps"] > 0 for x in links)
    # on loopback the data plane does not encrypt (security="auto"), so neither does the probe;
    # both ends count the CPU the bytes cost them
    assert not any(x["encrypted"] for x in links)
    assert link["send_cpu_s"] > 0 and link["receive_cpu_s"] > 0
    forced = measure_link(b, a, count=4, size=1 << 18, security="encrypt")
    assert forced["encrypted"] and forced["bytes"] == 1 << 20
    memory = measure_memory(a)
    assert 0 < memory["available"] <= memory["total"] and memory["cpus"] >= 1


@pytest.mark.timeout(60)
def test_second_measure_comes_from_the_cache(
    sessions: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = old_tvm_test_modules()[0]
    monkeypatch.setenv("TVMPIPE_CACHE", str(tmp_path / "env"))
    assert MeasureCache().directory == tmp_path / "env"
    cache = MeasureCache(tmp_path / "measure")
    first = profile_compute(mod, [1], "llvm", sessions[0], "loopback", repeat=2, cache=cache)
    assert not first["cached"] and len(first["times"]) == 2 and min(first["times"]) > 0
    assert [p.name for p in (tmp_path / "measure").iterdir()] == [f"{first['key']}.json"]
    again = profile_compute(
        mod, [1], "llvm", Untouchable(), "loopback", repeat=2, cache=MeasureCache(cache.directory)
    )
    assert again == {**first, "cached": True}
    # Only some segments (a plan's stage on its own kind): those alone, cached apart.
    only = profile_compute(
        mod, [1], "llvm", sessions[0], "loopback", repeat=2, cache=cache, stages=[1]
    )
    assert not only["cached"] and len(only["times"]) == 1 and only["key"] != first["key"]
    assert 0.3 < only["times"][0] / first["times"][1] < 3
    # Another worker kind, cut or module is measured anew.
    assert MeasureCache.key(mod, [1], "llvm", "board") != first["key"]
    assert MeasureCache.key(mod, [2], "llvm", "loopback") != first["key"]
    other = old_tvm_test_modules()[1]
    assert MeasureCache.key(other, [1], "llvm", "loopback") != first["key"]


def _netns_boards() -> Any:
    """deploy/netns/boards.py, loaded by path as tests/netns/conftest.py does."""
    import importlib.util
    import sys

    name = "tvmpipe_netns_boards"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "deploy" / "netns" / "boards.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


LINK_TRIES = 3  # a busy machine can starve the probe's encryption: the best of a few tries


@pytest.mark.timeout(90)
def test_links_across_simulated_boards() -> None:
    """A link shaped to 100 Mbit/s measures about that; the advertised addresses are used.

    Between boards the probe encrypts, as the data plane would, so a neighbour that takes the
    CPU (CI runs several tests at once) can hold a measurement under the link's rate: each link
    keeps its best of up to LINK_TRIES measurements, and none may exceed the shaped rate."""
    netns = _netns_boards()
    reason = netns.netns_unavailable()
    if reason:
        pytest.skip(reason)
    best: dict[tuple[str, str], float] = {}
    with netns.SimulatedBoards(["a", "b"], rates=["100mbit", None]) as boards:
        tracker = rpc.connect_tracker(*boards.tracker)
        try:
            sessions = {b.name: tracker.request(b.key, session_timeout=0) for b in boards.boards}
        finally:
            tracker.close()
        try:
            for _ in range(LINK_TRIES):
                links = {
                    (x["src"], x["dst"]): x
                    for x in measure_links(sessions, count=4, size=1 << 18, pings=5)
                }
                # between boards the data plane encrypts by default: so does the probe
                assert all(x["encrypted"] for x in links.values()), links
                assert all(x["send_cpu_s"] > 0 and x["receive_cpu_s"] > 0 for x in links.values())
                for link, x in links.items():
                    bits = x["bandwidth_Bps"] * 8
                    best[link] = max(best.get(link, 0.0), bits)
                    if link[1] == "b1":  # behind the 100 Mbit/s link
                        assert bits < 150e6, (link, bits)
                if min(best[("b2", "b1")], best[("controller", "b1")]) > 50e6 and (
                    best[("controller", "b2")] > 300e6
                ):
                    break
        finally:
            sessions.clear()
            gc.collect()
    assert best[("b2", "b1")] > 50e6, best
    assert best[("controller", "b1")] > 50e6, best
    assert best[("controller", "b2")] > 300e6, best
