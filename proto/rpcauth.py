"""The control plane's shared secret: the controller proves it holds it, and so does the worker.

Controller to worker: a worker started with ``--secret-file`` serves a tvm.rpc session only when
the client's key string carries ``-tvmpipe-auth=v1.TIME.NONCE.MAC``, MAC being HMAC-SHA256 of
the secret over the time and a random nonce. TVM's server reads that key string before it forks
the session, so a client without a valid proof never uploads or calls anything. A proof is good
within ``WINDOW_S`` of the worker's clock, and once: the worker remembers the nonces it took.

Worker to controller: ``tvmpipe.handshake`` carries a random challenge, which the worker answers
with an HMAC of it, so a server that does not hold the secret (an impostor registered at the
unauthenticated tracker under a stage's key) is found out before anything is uploaded to it.

Neither encrypts: TVM's RPC travels in clear, so whoever is on the path can read a session and
take it over (README, Security).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import stat
import time
from pathlib import Path

from .errors import ConfigError

PROOF_OPTION = "-tvmpipe-auth="
WINDOW_S = 300.0  # a proof's time may differ from the worker's clock by this much
MIN_SECRET_BYTES = 16
ENV_SECRET_FILE = "TVMPIPE_SECRET_FILE"  # the controller's secret file when none is given
REFUSED = "tvmpipe-worker refused the session: "  # starts every refusal a client receives
NO_PROOF = "it requires a secret and the session offered no proof"
_SESSION = b"tvmpipe-rpc-session\0"
_WORKER = b"tvmpipe-worker-answer\0"


class SecretFileError(ConfigError):
    """A secret file that cannot be used: missing, empty, too short or readable by others."""


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path``, refused (like an ssh key) if group or others may read it."""
    how = f"write one with: (umask 077; head -c 32 /dev/urandom | base64 > {path})"
    try:
        mode = os.stat(path).st_mode
        data = Path(path).read_bytes().strip()
    except FileNotFoundError as exc:
        raise SecretFileError(f"secret file {path}: no such file; {how}") from exc
    except OSError as exc:
        raise SecretFileError(f"secret file {path}: cannot be read ({exc.strerror})") from exc
    if mode & 0o077:
        raise SecretFileError(
            f"secret file {path}: permissions {stat.S_IMODE(mode):04o} are too open; it must "
            f"be readable by its owner only: chmod 600 {path}"
        )
    if not data:
        raise SecretFileError(f"secret file {path} is empty; {how}")
    if len(data) < MIN_SECRET_BYTES:
        raise SecretFileError(
            f"secret file {path}: the secret is {len(data)} bytes, fewer than "
            f"{MIN_SECRET_BYTES} (a short one can be guessed from a captured proof); {how}"
        )
    return data


def secret_file_from_env() -> str | None:
    """``$TVMPIPE_SECRET_FILE``, the controller's secret file when none is passed."""
    return os.environ.get(ENV_SECRET_FILE) or None


def session_proof(secret: bytes, now: float | None = None) -> str:
    """A fresh proof, as the option to append to the key string of ``rpc.connect``."""
    stamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    return f"{PROOF_OPTION}v1.{stamp}.{nonce}.{_mac(secret, _SESSION, stamp, nonce)}"


class ProofChecker:
    """The worker's side: checks proofs, refusing a reused nonce for as long as it is valid."""

    def __init__(self, secret: bytes, window: float = WINDOW_S):
        self._secret = secret
        self._window = window
        self._seen: dict[str, float] = {}  # nonce -> when its proof expires (this clock)

    def refusal(self, proof: str | None, now: float | None = None) -> str | None:
        """Why the session must be refused, or None if the proof is good (and now used).
        Never raises: it runs in the worker's listening thread."""
        now = time.time() if now is None else now
        if proof is None:
            return NO_PROOF
        version, _, rest = proof.partition(".")
        parts = rest.rsplit(".", 2)
        if not proof.isascii() or version != "v1" or len(parts) != 3:
            return "its secret proof is malformed"
        stamp, nonce, mac = parts
        try:
            when = float(stamp)
        except ValueError:
            return "its secret proof is malformed"
        if not hmac.compare_digest(mac, _mac(self._secret, _SESSION, stamp, nonce)):
            return "wrong secret: the proof does not match this worker's --secret-file"
        if not math.isfinite(when):
            return "its secret proof is malformed"
        skew = when - now
        if abs(skew) > self._window:
            return (
                f"the proof's time is {skew:+.0f} s from this worker's clock (at most "
                f"{self._window:.0f} s allowed): set both clocks right (NTP)"
            )
        self._seen = {n: t for n, t in self._seen.items() if t >= now}
        if nonce in self._seen:
            return "the proof was used before (a replay)"
        self._seen[nonce] = when + self._window
        return None


def new_challenge() -> str:
    return secrets.token_hex(16)


def worker_answer(secret: bytes, challenge: str) -> str:
    """What a worker holding ``secret`` answers to the controller's ``challenge``."""
    return _mac(secret, _WORKER, challenge)


def answer_is_right(secret: bytes, challenge: str, answer: object) -> bool:
    return (
        isinstance(answer, str)
        and answer.isascii()
        and hmac.compare_digest(answer, worker_answer(secret, challenge))
    )


def _mac(secret: bytes, purpose: bytes, *fields: str) -> str:
    message = purpose + "\0".join(fields).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()
