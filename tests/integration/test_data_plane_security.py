"""The data plane admits only the pipeline's own parties (README, Security).

The attacker is on loopback and knows every address and public key (they are not secret):
- parts forged for inputs not yet sent, pushed at a stage's socket under the name of its real
  sender: with ``security="off"`` they replace the real parts (the attack is real), with the
  defaults and with encryption none is delivered and every refusal is counted;
- results forged on the client's socket, with the same outcome;
- PLAIN with a guessed token and CURVE with an unknown key, under the real sender's name;
- 100 MB frames from 40 connections at once: refused at the handshake, the stage's memory flat;
- an admitted party that claims another's name is known by the key it authenticated with.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from modules import rfc_example_reference

from tvmpipe.orchestrator import PipelineLibrary, PipelineModule
from tvmpipe.proto.messages import Message, encode
from tvmpipe.proto.security import Guard, Keyring

from .test_floods import PeakRss

pytestmark = pytest.mark.timeout(120)
FORGED = 40  # sequence numbers forged ahead of the real inputs
WAIT_S = 30.0
MIB = 1 << 20


def _sets(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    names = ("data_0", "data_1", "data_2")
    return [{n: rng.standard_normal((1, 4)).astype("float32") for n in names} for _ in range(count)]


def _wrong_results(pipe: PipelineModule, sets: list[dict[str, np.ndarray]]) -> int:
    futures = [pipe.submit(s) for s in sets]
    wrong = 0
    for inputs, future in zip(sets, futures, strict=True):
        got = future.result(WAIT_S)[0]
        wrong += not np.allclose(got, rfc_example_reference(**inputs), rtol=1e-5, atol=1e-5)
    return wrong


def _wait_for(what: str, check: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.02)


class Attacker:
    """Sockets that push at a pipeline from outside it, each with a different disguise."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket[Any]] = []

    def socket(self, address: str, disguise: str = "null", server_key: str = "") -> Any:
        push = self.context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        if disguise == "plain":
            push.plain_username = b"mod1"
            push.plain_password = b"a guess"
        elif disguise == "curve":
            public, secret = zmq.curve_keypair()
            push.curve_serverkey = server_key.encode()
            push.curve_publickey, push.curve_secretkey = public, secret
        push.connect(address)
        self.sockets.append(push)
        return push

    @staticmethod
    def spray(push: Any, frames: list[Any]) -> bool:
        """Queue one message without waiting: once a peer refuses the handshake, libzmq drops
        the connection's pipe and a blocking send would wait for ever."""
        try:
            push.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        for push in self.sockets:
            push.close(linger=0)
        self.context.term()


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    attacker = Attacker()
    try:
        yield attacker
    finally:
        attacker.close()


@pytest.mark.parametrize("security", ["off", "auto", "encrypt"])
def test_forged_parts_and_results(
    rfc_lib: PipelineLibrary, attacker: Attacker, security: str
) -> None:
    with PipelineModule(rfc_lib, security=security) as pipe:
        assert _wrong_results(pipe, _sets(2, 0)) == 0  # every connection made
        stage_address = pipe._fleet.addresses["mod2"]["mod1"]
        server_key = pipe.wiring.keyring.parties["mod2"].public if security != "off" else ""
        disguises = ["null"] if security == "off" else ["null", "plain", "curve"]
        first = pipe.stats()["client"]["launched"]
        fake = np.full((1, 4), 1000.0, "float32")
        for disguise in disguises:
            part = attacker.socket(stage_address, disguise, server_key)
            result = attacker.socket(pipe.address, disguise, server_key)
            for seq in range(first, first + FORGED):
                queued = attacker.spray(part, encode(Message.data(seq, "mod1", {"data_0": fake})))
                queued &= attacker.spray(result, encode(Message.data(seq, "mod3", {"0": fake})))
                assert queued or security != "off", "nothing refuses an unguarded pipeline"
        if security == "off":
            taken = 2 + FORGED
            _wait_for("forged parts", lambda: pipe.stats()["stages"]["mod2"]["received"] >= taken)
            assert _wrong_results(pipe, _sets(10, 1)) > 0, "the attack did not work unguarded"
            return
        stats = pipe.stats()
        _wait_for(
            "refusals",
            lambda: (
                (s := pipe.stats())["stages"]["mod2"]["refused"] >= len(disguises)
                and s["client"]["refused"] >= len(disguises)
            ),
        )
        assert _wrong_results(pipe, _sets(10, 1)) == 0
        stats = pipe.stats()
        assert stats["stages"]["mod2"]["security"] == security
        assert stats["stages"]["mod2"]["received"] == 12
        assert stats["client"].get("dropped", 0) == 0  # nothing forged got as far as decoding


def test_flood_of_large_frames_from_40_connections(
    rfc_lib: PipelineLibrary, attacker: Attacker
) -> None:
    huge = np.zeros(100 * MIB, dtype="uint8")  # zero pages: one buffer for every socket
    with PipelineModule(rfc_lib) as pipe:
        assert _wrong_results(pipe, _sets(2, 2)) == 0
        stage = pipe.stats()["stages"]["mod2"]
        peak = PeakRss(stage["pid"])
        address = pipe._fleet.addresses["mod2"]["mod1"]
        frames = encode(Message.data(10**6, "mod1", {"data_0": huge}))
        for _ in range(40):
            attacker.socket(address).send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        _wait_for("40 refusals", lambda: pipe.stats()["stages"]["mod2"]["refused"] >= 40)
        growth = peak.growth()
        assert _wrong_results(pipe, _sets(5, 3)) == 0
    print(f"\n40 x 100 MB at mod2: RSS growth {growth / MIB:.1f} MiB ({peak.how()})")
    assert growth < 16 * MIB


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["auth", "encrypt"])
def test_an_admitted_party_is_known_by_its_credentials(mode: str) -> None:
    """Two senders on one socket: each message carries the name ZeroMQ authenticated; a sender
    that presents its own token under the other's name is refused."""
    ring = Keyring.generate(mode, [("a", "r"), ("b", "r")])
    context = zmq.Context()
    guards = {n: Guard(context, ring.share(n, ["a", "b"] if n == "r" else [], [])) for n in "r"}
    guards.update({n: Guard(context, ring.share(n, [], ["r"])) for n in "ab"})
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
    pushes = []
    try:
        guards["r"].serve(pull, ["a", "b"], "tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
        for name in "ab":
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            guards[name].present(push, "r", address)
            push.connect(address)
            push.send(name.encode())
            pushes.append(push)
        seen = {}
        for _ in range(2):
            frame = pull.recv(copy=False)
            seen[bytes(frame.buffer).decode()] = frame.get("User-Id")
        assert seen == {"a": "a", "b": "b"}
        if mode == "auth":  # a's token under b's name
            liar = context.socket(zmq.PUSH)
            liar.setsockopt(zmq.LINGER, 0)
            liar.plain_username = b"b"
            liar.plain_password = ring.tokens[("a", "r")].encode()
            liar.connect(address)
            liar.send(b"lie")
            pushes.append(liar)
            _wait_for("a refusal", lambda: guards["r"].refused() >= 1)
            assert pull.poll(200) == 0
    finally:
        for sock in [*pushes, pull]:
            sock.close(linger=0)
        for guard in guards.values():
            guard.close()
        context.term()
