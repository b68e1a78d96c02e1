"""Who may talk on a pipeline's data plane: keys handed out by the controller, checked by ZAP.

Every data socket that receives is a ZeroMQ security server that admits only the parties the
controller named for it; every socket that sends presents its own credentials. The controller
makes all credentials when it deploys (``Keyring``) and gives each stage its own share through
``tvmpipe.stage.start``, over TVM's RPC (whose own trust model README's Security section states).

Mechanisms, chosen per receiving socket from the address its senders connect to, so that both
ends agree without telling each other (``mechanism``):

    curve   ZeroMQ CURVE: every party has a key pair; peers are authenticated and traffic is
            encrypted and protected against change and replay. Costs about 10x at 1 MiB on
            loopback, roughly the speed of a 1 GbE link.
    plain   ZeroMQ PLAIN with a random token per edge (sender, receiver), checked once when the
            connection is made: no cost per message, but the token and the traffic travel in
            clear, so it is used only where nobody else can see the traffic (loopback).
    null    no check (``security="off"``): anyone who reaches a socket may send on it.

Modes (``PipelineModule(security=...)``): "auto" (default) is plain on loopback addresses and
curve on any other; "encrypt" is curve everywhere; "auth" is plain everywhere (on a network,
only where the network itself is private); "off" is null everywhere.

The ZAP handler is pyzmq's ``ThreadAuthenticator``, one per ZeroMQ context, with one domain per
receiving socket holding only that socket's senders. A connection it refuses, or one whose
handshake fails, never delivers a message; each is counted from the socket's monitor events.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth.thread
from zmq.utils.monitor import recv_monitor_message

MODES = ("auto", "encrypt", "auth", "off")
CURVE, PLAIN, NULL = "curve", "plain", "null"
# What CURVE adds to each frame on the wire (command name, nonce, MAC, flags: 33 bytes), which
# libzmq counts against a socket's MAXMSGSIZE
CURVE_FRAME_OVERHEAD = 64
REFUSED_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"security must be one of {', '.join(MODES)}; got {mode!r}")
    if mode != "off" and not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; use security='off' or pyzmq's wheel")
    return mode


def is_loopback(address: str) -> bool:
    """Whether an address is on this machine only: ``ipc://``, or ``tcp://`` on loopback."""
    if address.startswith("ipc://"):
        return True
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mechanism(mode: str, address: str) -> str:
    """The mechanism of the socket bound at ``address`` (both ends compute the same)."""
    if mode == "off":
        return NULL
    if mode == "auth" or (mode == "auto" and is_loopback(address)):
        return PLAIN
    return CURVE


@dataclass(frozen=True)
class Party:
    """One party's CURVE key pair (z85 text)."""

    public: str
    secret: str

    @classmethod
    def generate(cls) -> Party:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))


@dataclass
class Keyring:
    """Every credential of one pipeline, made by the controller: keys per party, tokens per edge."""

    mode: str
    parties: dict[str, Party] = field(default_factory=dict)
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)  # (sender, receiver)

    @classmethod
    def generate(cls, mode: str, edges: Iterable[tuple[str, str]]) -> Keyring:
        ring = cls(check_mode(mode))
        if mode == "off":
            return ring
        for sender, receiver in edges:
            for name in (sender, receiver):
                if name not in ring.parties:
                    ring.parties[name] = Party.generate()
            ring.tokens[(sender, receiver)] = secrets.token_urlsafe(32)
        return ring

    def share(self, name: str, senders: Iterable[str], receivers: Iterable[str]) -> dict[str, Any]:
        """What party ``name`` needs: its key pair, what to admit from each sender, and what
        to present to each receiver. JSON-ready; travels in ``tvmpipe.stage.start``."""
        if self.mode == "off":
            return {"mode": "off"}
        return {
            "mode": self.mode,
            "name": name,
            "me": {"public": self.parties[name].public, "secret": self.parties[name].secret},
            "senders": {
                s: {"public": self.parties[s].public, "token": self.tokens[(s, name)]}
                for s in senders
            },
            "receivers": {
                r: {"public": self.parties[r].public, "token": self.tokens[(name, r)]}
                for r in receivers
            },
        }


class Guard:
    """Secures the sockets of one ZeroMQ context according to a party's share of the keyring.

    ``serve`` before binding a receiving socket, ``present`` before connecting a sending one.
    ``refused()`` counts connections turned away since the start (call it from one thread).
    """

    def __init__(self, context: zmq.Context[Any], share: Mapping[str, Any] | None):
        self.mode = check_mode(str((share or {}).get("mode", "off")))
        self._share = dict(share or {})
        self._context = context
        self._auth: _Authenticator | None = None
        self._monitors: list[zmq.Socket[Any]] = []
        self._refused = 0
        self._lock = threading.Lock()

    def serve(self, sock: zmq.Socket[Any], senders: Iterable[str], address_of_bind: str) -> str:
        """Admit only ``senders`` on ``sock``, which will be reached at ``address_of_bind``.

        Call it after setting the socket's RCVHWM and MAXMSGSIZE for the tensors it takes: it
        makes room for what the mechanism adds. libzmq queues an authenticated connection's
        credentials as a first message that holds one place of the high-water mark for good
        (a mark of 1 would deadlock), and CURVE frames are larger than their tensors.
        """
        mech = mechanism(self.mode, address_of_bind)
        if mech == NULL:
            return mech
        sock.setsockopt(zmq.RCVHWM, int(sock.getsockopt(zmq.RCVHWM)) + 1)
        limit = int(sock.getsockopt(zmq.MAXMSGSIZE))
        if mech == CURVE and limit >= 0:
            sock.setsockopt(zmq.MAXMSGSIZE, limit + CURVE_FRAME_OVERHEAD)
        names = list(senders)
        domain = "tvmpipe:" + ",".join(sorted(names))
        auth = self._authenticator()
        if mech == CURVE:
            keys = {self._share["senders"][n]["public"]: n for n in names}
            auth.allow_keys(domain, keys)
            sock.curve_server = True
            sock.curve_secretkey = self._share["me"]["secret"].encode("ascii")
        else:
            auth.configure_plain(domain, {n: self._share["senders"][n]["token"] for n in names})
            sock.plain_server = True
        sock.zap_domain = domain.encode()
        monitor = sock.get_monitor_socket(REFUSED_EVENTS)
        with self._lock:
            self._monitors.append(monitor)
        return mech

    def present(self, sock: zmq.Socket[Any], receiver: str, address: str) -> str:
        """Give ``sock`` the credentials this party shows to ``receiver`` at ``address``."""
        mech = mechanism(self.mode, address)
        if mech == NULL:
            return mech
        theirs = self._share["receivers"][receiver]
        if mech == CURVE:
            sock.curve_serverkey = theirs["public"].encode("ascii")
            sock.curve_publickey = self._share["me"]["public"].encode("ascii")
            sock.curve_secretkey = self._share["me"]["secret"].encode("ascii")
        else:
            sock.plain_username = self._share["name"].encode()
            sock.plain_password = theirs["token"].encode()
        return mech

    def refused(self) -> int:
        """Connections refused so far: failed authentication or a mismatched handshake."""
        with self._lock:
            for monitor in self._monitors:
                while monitor.poll(0):
                    event = recv_monitor_message(monitor)
                    if event["event"] & REFUSED_EVENTS:
                        self._refused += 1
            return self._refused

    def close(self) -> None:
        with self._lock:
            for monitor in self._monitors:
                monitor.close(linger=0)
            self._monitors.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _authenticator(self) -> _Authenticator:
        if self._auth is None:
            self._auth = _Authenticator(self._context)
            self._auth.start()
        return self._auth


# pyzmq's authenticator logs PLAIN passwords at DEBUG: its own logger, never below INFO
_LOG = logging.getLogger("tvmpipe.zap")
_LOG.setLevel(logging.INFO)


class _Authenticator(zmq.auth.thread.ThreadAuthenticator):
    """pyzmq's ZAP handler; a CURVE peer's user id is the party name its key belongs to."""

    def __init__(self, context: zmq.Context[Any]):
        super().__init__(context, log=_LOG)
        self._names: dict[bytes, str] = {}  # z85 public key -> party

    def allow_keys(self, domain: str, keys: Mapping[str, str]) -> None:
        """Admit these z85 public keys (-> party names) on ``domain``."""
        self._names.update({k.encode("ascii"): n for k, n in keys.items()})
        allowed = {k.encode("ascii") for k in keys}
        self.configure_curve_callback(domain, _KeySet(allowed))

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names.get(zmq.utils.z85.encode(client_public_key), "")


class _KeySet:
    """A CURVE credentials provider: the keys one socket admits."""

    def __init__(self, allowed: set[bytes]):
        self._allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._allowed
