"""A stage's join table: the parts of each input set, kept until every sender delivered its own.

A pure state machine (no sockets, no threads): messages in, complete input sets out, so that
its rules can be tested on their own.

- **Epochs.** Every message carries the epoch it was sent in. The client opens a new epoch each
  time it sends its inputs in flight again (after a stage was deployed again), so a message of an
  older epoch than the newest one seen is stale: it is dropped, and when a newer epoch shows up
  the partial sets of older ones are discarded. Their inputs are on their way again.
- **Bounded in bytes, nothing evicted.** The parts held for partial sets may take up to
  ``max_bytes`` (and ``max_sets`` sets). Past that, ``readable()`` names only the senders that
  some partial set still waits for: the stage reads from those and holds the others back (TCP
  pushes back on them), so a branch that runs ahead of its sibling waits instead of being
  dropped. At most one message per sender past the bound is ever held.
- **Exactly one part per sender per set.** A second part from the same sender for a pending set
  is a duplicate and is dropped; the first one wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tvmpipe.proto.messages import Message

MAX_SETS = 1024


@dataclass
class JoinCounters:
    stale: int = 0  # messages of an older epoch
    duplicates: int = 0  # a second part from the same sender for a pending set
    discarded_sets: int = 0  # partial sets of an older epoch, dropped when a newer one came


@dataclass
class _Partial:
    parts: dict[str, Message] = field(default_factory=dict)
    nbytes: int = 0


class JoinTable:
    def __init__(
        self, senders: frozenset[str], max_bytes: int, epoch: int = 0, max_sets: int = MAX_SETS
    ):
        if not senders:
            raise ValueError("a join table needs at least one sender")
        self.senders = senders
        self.max_bytes = max_bytes
        self.max_sets = max_sets
        self.epoch = epoch
        self.held_bytes = 0
        self.counters = JoinCounters()
        self._pending: dict[int, _Partial] = {}

    def offer(self, msg: Message, nbytes: int) -> dict[str, Message] | None:
        """Add one sender's part; the complete set of parts once every sender delivered."""
        if msg.epoch < self.epoch:
            self.counters.stale += 1
            return None
        if msg.epoch > self.epoch:
            self._open_epoch(msg.epoch)
        if len(self.senders) == 1:  # nothing to wait for: the common chain of stages
            return {msg.sender: msg}
        partial = self._pending.get(msg.seq)
        if partial is None:
            partial = self._pending[msg.seq] = _Partial()
        elif msg.sender in partial.parts:
            self.counters.duplicates += 1
            return None
        partial.parts[msg.sender] = msg
        if len(partial.parts) < len(self.senders):
            partial.nbytes += nbytes
            self.held_bytes += nbytes
            return None
        del self._pending[msg.seq]
        self.held_bytes -= partial.nbytes
        return partial.parts

    def readable(self) -> frozenset[str]:
        """The senders to read from now: all of them, or past the bound only those awaited."""
        if self.held_bytes < self.max_bytes and len(self._pending) < self.max_sets:
            return self.senders
        awaited: set[str] = set()
        for partial in self._pending.values():
            awaited.update(self.senders.difference(partial.parts))
            if len(awaited) == len(self.senders):
                break
        return frozenset(awaited)

    def waiting_for(self, seq: int) -> list[str] | None:
        """The senders whose part of ``seq`` has not come, or None if ``seq`` is not pending."""
        partial = self._pending.get(seq)
        return None if partial is None else sorted(self.senders.difference(partial.parts))

    def __len__(self) -> int:
        return len(self._pending)

    def _open_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.counters.discarded_sets += len(self._pending)
        self._pending.clear()
        self.held_bytes = 0
