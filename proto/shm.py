"""Tensors between processes on one machine through shared memory, the header over ZeroMQ.

Over a Unix socket a MiB costs both processes about 0.2 ms of CPU each (the kernel copies it in
and out, in socket-buffer chunks, with a wake-up of ZeroMQ's I/O threads per chunk). Here the
sender copies it once into a slot of a ring that it owns (a memfd), and sends only the header
and a small reference frame; the receiver maps the ring once and hands out views of the slot,
64-byte aligned, so that TVM computes on it in place. A slot goes back to the sender when the
last view of it dies (a byte in the ring's header, written by the view's finalizer).

Nothing depends on it working: the sender offers a ring on messages that still carry their
data, and fills slots only once the receiver has mapped the ring (a flag it sets in the ring).
A receiver that cannot map it (another pid or user namespace) never sets the flag, and a full
ring (slots held, or a receiver stopped or gone) sends on the socket. The ring is reached at
``/proc/PID/fd/FD`` of the sender, which only processes of the same user may open; the
reference travels on the data socket, so it is as trusted as the data would have been.
``TVMPIPE_SHM=0`` turns it off.

Frames: a message with a ring reference starts with a frame ``MAGIC + msgpack(reference)``;
0xc1 never begins msgpack, so it cannot be taken for a header. An offer is followed by the
message's own frames; a slot message by its header alone, the tensors being in the slot.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError

MAGIC = b"\xc1tvmpipe-shm1"
MIN_BYTES = 64 << 10  # smaller messages: the socket is as cheap
MAX_SLOTS = 8
ALIGN = 64  # TVM's kernels want 64-byte aligned inputs
PAGE = mmap.PAGESIZE
HEADER_BYTES = PAGE  # id (16), accepted flag (1, at 16), then one state byte per slot (at 32)
_ACCEPTED = 16
_STATES = 32
MEMFD_NAME = "tvmpipe-ring"
RINGS_KEPT = 16  # mappings a receiver keeps: senders' current rings, and a few retired ones


def enabled() -> bool:
    return hasattr(os, "memfd_create") and os.environ.get("TVMPIPE_SHM", "1") != "0"


def frames_bytes(frames: Sequence[Any]) -> int:
    """What a message's frames hold: zmq.Frames, bytes or memoryviews alike."""
    return sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)


def _round(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class _Ring:
    """A sender's memfd: ``slots`` slots of ``slot_bytes``, and the header they share."""

    def __init__(self, slot_bytes: int, slots: int):
        self.slot_bytes, self.slots = slot_bytes, slots
        self.id = secrets.token_bytes(16)
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, HEADER_BYTES + slots * slot_bytes)
            self.map = mmap.mmap(self.fd, HEADER_BYTES + slots * slot_bytes)
        except OSError:
            os.close(self.fd)
            raise
        self.map[: len(self.id)] = self.id
        self.state = np.frombuffer(self.map, np.uint8, slots, _STATES)
        self.reference = {
            "pid": os.getpid(),
            "fd": self.fd,
            "id": self.id,
            "slots": slots,
            "slot_bytes": slot_bytes,
        }

    def accepted(self) -> bool:
        return self.map[_ACCEPTED] == 1

    def take(self) -> int | None:
        free = np.flatnonzero(self.state == 0)
        if not len(free):
            return None
        slot = int(free[0])
        self.state[slot] = 1
        return slot

    def close(self) -> None:
        """The sender's side only: a receiver's mapping keeps the memory while it needs it."""
        del self.state
        self.map.close()
        os.close(self.fd)


class Outbox:
    """The sending side of one edge (one destination socket): owns at most one ring."""

    def __init__(self, budget_bytes: int):
        self._budget = budget_bytes  # the most the ring may hold, all slots together
        self._ring: _Ring | None = None
        self._taken: int | None = None  # the slot of the last wrap, until it is sent
        self._closed = not enabled()

    def wrap(self, frames: list[Any]) -> list[Any]:
        """``frames`` (header, tensors) as they should go: through a slot when the receiver
        has the ring and a slot is free, else as they are (offering the ring when it is new)."""
        self._taken = None
        sizes = [memoryview(f).nbytes for f in frames[1:]]
        if self._closed or sum(sizes) < MIN_BYTES:
            return frames
        need = sum(_round(s, ALIGN) for s in sizes)
        ring = self._ring
        if ring is None or need > ring.slot_bytes:
            ring = self._new_ring(need)
            if ring is None:
                return frames
        if not ring.accepted():
            return [MAGIC + msgpack.packb(ring.reference), *frames]
        slot = ring.take()
        if slot is None:
            return frames
        base = HEADER_BYTES + slot * ring.slot_bytes
        offsets = []
        at = 0
        for frame, size in zip(frames[1:], sizes, strict=True):
            ring.map[base + at : base + at + size] = memoryview(frame).cast("B")
            offsets.append(at)
            at += _round(size, ALIGN)
        self._taken = slot
        reference = {**ring.reference, "slot": slot, "offsets": offsets, "sizes": sizes}
        return [MAGIC + msgpack.packb(reference), frames[0]]

    def unsent(self) -> None:
        """The last wrapped message did not go (no room downstream): its slot is free again."""
        if self._taken is not None and self._ring is not None:
            self._ring.state[self._taken] = 0
        self._taken = None

    def close(self) -> None:
        self._closed = True
        self._retire()

    def _retire(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def _new_ring(self, slot_bytes: int) -> _Ring | None:
        slot_bytes = _round(slot_bytes, PAGE)
        slots = min(MAX_SLOTS, self._budget // slot_bytes)
        if slots < 2:
            return None  # a tensor too large for the budget: the socket it is
        try:
            ring = _Ring(slot_bytes, slots)
        except OSError:
            return None
        self._retire()  # slots the receiver still holds stay mapped on its side
        self._ring = ring
        return ring


class _Mapped:
    """A receiver's mapping of one sender's ring."""

    def __init__(self, reference: dict[str, Any]):
        path = f"/proc/{reference['pid']}/fd/{reference['fd']}"
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_NAME}"):
            raise OSError(f"{path} is not a tvmpipe ring")
        self.slots, self.slot_bytes = reference["slots"], reference["slot_bytes"]
        size = HEADER_BYTES + self.slots * self.slot_bytes
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise OSError(f"{path} is not {size} bytes")
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if self.map[:16] != reference["id"]:
            raise OSError(f"{path} is another ring")
        self.state = np.frombuffer(self.map, np.uint8, self.slots, _STATES)
        self.map[_ACCEPTED] = 1

    def slot_view(self, slot: int) -> memoryview:
        """The slot's bytes, freed back to the sender when the last view of them dies."""
        owner = (ctypes.c_char * self.slot_bytes).from_buffer(
            self.map, HEADER_BYTES + slot * self.slot_bytes
        )
        weakref.finalize(owner, _release, self.state, slot)
        return memoryview(owner).cast("B")


def _release(state: np.ndarray, slot: int) -> None:
    state[slot] = 0


class Inbox:
    """The receiving side: every ring offered to one process's sockets, mapped once each."""

    def __init__(self) -> None:
        self._rings: OrderedDict[tuple[int, bytes], _Mapped | None] = OrderedDict()

    def close(self) -> None:
        """Let go of every mapping (each holds a file descriptor, Python's mmap keeps one); one
        still viewed lives until its last view dies."""
        self._rings.clear()

    def resolve(self, frames: Sequence[Any], copy: bool = False) -> list[Any]:
        """The message's frames with its tensors in place: from the slot it names (views,
        or copies with ``copy``, freeing the slot at once), or as they came. ProtocolError for
        a reference that does not hold."""
        first = frames[0]
        view = memoryview(getattr(first, "buffer", first))
        if not view.nbytes or view[0] != MAGIC[0]:  # a message header: the data came with it
            return list(frames)
        if view.nbytes < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
            return list(frames)
        try:
            reference = msgpack.unpackb(view[len(MAGIC) :])
            key = (int(reference["pid"]), bytes(reference["id"]))
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"a shared-memory reference that cannot be read: {exc}") from exc
        ring = self._ring(key, reference)
        if "slot" not in reference:
            return list(frames[1:])  # an offer: the data came with it
        if ring is None or len(frames) != 2:
            raise ProtocolError("a message in a shared-memory ring this process cannot map")
        return [frames[1], *self._tensors(ring, reference, copy)]

    def _ring(self, key: tuple[int, bytes], reference: dict[str, Any]) -> _Mapped | None:
        if key in self._rings:
            self._rings.move_to_end(key)
            return self._rings[key]
        try:
            ring: _Mapped | None = _Mapped(reference)
        except (OSError, ValueError, TypeError, KeyError):
            ring = None  # declined: the sender keeps sending on the socket
        self._rings[key] = ring
        if len(self._rings) > RINGS_KEPT:
            self._rings.popitem(last=False)  # views still alive keep their mapping
        return ring

    @staticmethod
    def _tensors(ring: _Mapped, reference: dict[str, Any], copy: bool) -> list[Any]:
        try:
            slot, offsets, sizes = reference["slot"], reference["offsets"], reference["sizes"]
            ok = (
                isinstance(slot, int)
                and 0 <= slot < ring.slots
                and len(offsets) == len(sizes)
                and all(isinstance(x, int) and x >= 0 for x in (*offsets, *sizes))
                and all(o + s <= ring.slot_bytes for o, s in zip(offsets, sizes, strict=True))
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"a shared-memory reference that does not hold: {exc}") from exc
        if not ok:
            raise ProtocolError("a shared-memory reference outside its ring")
        whole = ring.slot_view(slot)
        if copy:
            copied = [bytes(whole[o : o + s]) for o, s in zip(offsets, sizes, strict=True)]
            del whole  # the slot is free again now
            return copied
        return [whole[o : o + s] for o, s in zip(offsets, sizes, strict=True)]
