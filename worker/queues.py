"""A FIFO bounded in bytes as well as in items, for the queues between a stage's threads.

ZeroMQ's high-water marks count messages, so four queued 16 MiB tensors hold as much memory as
four thousand 16 KiB ones. A stage's queues are therefore bounded by the bytes they hold. One item
larger than the whole bound still passes when the queue is empty: a big tensor slows the stage
down to one at a time instead of wedging it.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class ByteQueue(Generic[T]):
    def __init__(self, max_items: int, max_bytes: int):
        if max_items < 1 or max_bytes < 1:
            raise ValueError("a ByteQueue needs room for at least one item and one byte")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: collections.deque[tuple[T, int]] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()

    def put(self, item: T, nbytes: int, timeout: float) -> bool:
        """Append ``item``; False if there was no room within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._has_room(nbytes):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> T | None:
        """The oldest item, or None if none arrived within ``timeout`` seconds."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            item, nbytes = self._items.popleft()
            self._bytes -= nbytes
            self._cond.notify_all()
            return item

    def wait(self, timeout: float) -> bool:
        """Whether an item is there, waiting up to ``timeout`` seconds for one."""
        with self._cond:
            return bool(self._items) or self._cond.wait_for(lambda: bool(self._items), timeout)

    def _has_room(self, nbytes: int) -> bool:
        if not self._items:
            return True
        return len(self._items) < self.max_items and self._bytes + nbytes <= self.max_bytes

    def qsize(self) -> int:
        with self._cond:
            return len(self._items)

    def nbytes(self) -> int:
        with self._cond:
            return self._bytes
