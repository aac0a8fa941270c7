"""How far the staging copy into a slot has got: the writer may write any byte below it.

The trainer copies tensors into a slot one after another; with
``WriterOptions(write_during_copy=True)`` a thread writer starts on the slot's first pages
while the last tensors are still being copied, so a checkpoint is durable after max(copy,
write) instead of copy + write.  ``Copied`` turns "these tensors are in"
into "every byte of the slot below this offset is final" (the slot's headers and padding are
always in place: ``file_layout``), and lets the writer wait for an offset.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .blob import TensorSlot

__all__ = ["Copied"]


class Copied:
    """The final prefix of one slot, advanced as tensors land, failed if the copy fails."""

    def __init__(self, entries: Sequence[TensorSlot], total: int) -> None:
        self._order = sorted(entries, key=lambda e: e.offset)
        self._ends = {e.fqn: e.offset + e.nbytes for e in entries}
        self._done: set[str] = set()
        self._next = 0  # entries before this index (by offset) are all in
        self._total = total
        self._upto = 0 if self._order else total
        self._error: BaseException | None = None
        self._cv = threading.Condition()

    @property
    def upto(self) -> int:
        with self._cv:
            return self._upto

    def landed(self, fqns: Sequence[str]) -> None:
        """Tensors ``fqns`` are in the slot."""
        with self._cv:
            self._done.update(fqns)
            order, i = self._order, self._next
            while i < len(order) and order[i].fqn in self._done:
                i += 1
            self._next = i
            # up to the next missing tensor's data (its header before it is already in place)
            self._upto = self._total if i == len(order) else order[i].offset
            self._cv.notify_all()

    def complete(self) -> None:
        """Every tensor is in."""
        with self._cv:
            self._next, self._upto = len(self._order), self._total
            self._cv.notify_all()

    def fail(self, error: BaseException) -> None:
        """The copy failed: every waiter gets ``error``."""
        with self._cv:
            self._error = error
            self._cv.notify_all()

    def wait(self, upto: int) -> None:
        """Block until bytes ``[0, upto)`` of the slot are final; raises the copy's error."""
        with self._cv:
            self._cv.wait_for(lambda: self._error is not None or self._upto >= min(upto, self._total))
            if self._error is not None:
                raise self._error
