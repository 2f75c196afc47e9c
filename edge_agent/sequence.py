"""The per-gateway message sequence number: strictly increasing, across restarts and power cuts.

Writing the counter on every message would wear an SD card, so the file holds a reservation: the first number
the next start may use. A block of numbers is reserved at once (one fsync per block); after a crash the
unused rest of the block is skipped, which keeps the sequence monotonic at the cost of a gap.
"""

from __future__ import annotations

import os
from pathlib import Path


class SequenceCorrupt(Exception):
    pass


class PersistentSequence:
    def __init__(self, path: Path, block: int = 1000) -> None:
        self.path = path
        self.block = block
        self._next = self._read()
        self._reserved_until = self._next  # nothing reserved by this run yet

    def _read(self) -> int:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        if not text.isdigit():
            raise SequenceCorrupt(f"{self.path}: expected a non-negative integer, found {text[:40]!r}")
        return int(text)

    def _reserve(self, until: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(f"{until}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._reserved_until = until

    def next(self) -> int:
        if self._next >= self._reserved_until:
            self._reserve(self._next + self.block)
        value = self._next
        self._next += 1
        return value

    def at_least(self, value: int) -> None:
        """Never hand out a number below `value` (e.g. the outbox already holds higher ones)."""
        self._next = max(self._next, value)

    @property
    def peek(self) -> int:
        return self._next
