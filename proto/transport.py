"""Which transport a data socket uses: Unix sockets on loopback, TCP elsewhere.

A socket reached at a loopback address has only senders on this machine, and the kernel moves a
MiB over a Unix socket (ZeroMQ's ``ipc://``) for about half the CPU of loopback TCP (in both the
sending and the receiving process). The socket files live in a directory only their owner can
enter. ``TVMPIPE_LOOPBACK_TRANSPORT=tcp`` keeps TCP on loopback too.
"""

from __future__ import annotations

import os

import zmq

from .security import is_loopback

LOOPBACK_TRANSPORT: str | None = None  # None: $TVMPIPE_LOOPBACK_TRANSPORT, else "ipc"


def loopback_transport() -> str:
    """Read when a socket is made: a worker forked from a fork server (worker/forkserver.py)
    gets its environment after this module was imported."""
    return LOOPBACK_TRANSPORT or os.environ.get("TVMPIPE_LOOPBACK_TRANSPORT", "ipc")


def local_endpoint(advertise_host: str) -> bool:
    """Whether a socket that senders reach at ``advertise_host`` should be a Unix socket."""
    return (
        loopback_transport() == "ipc" and zmq.has("ipc") and is_loopback(f"tcp://{advertise_host}")
    )
