"""The sequence file older agents kept (<state_dir>/sequence), and its one-time migration into the outbox.

The per-gateway message sequence number (strictly increasing, across restarts and power cuts) now has one
source of truth: the outbox's `counter` row `next_seq`, written in the transaction that inserts a cycle's
messages (edge_agent/outbox.py). Agents before that reserved blocks of numbers in a file of their own, which
could be ahead of the outbox (the unused rest of a block) or behind it (a file restored from an old image).

On the first start with such a file, `migrate_legacy` commits max(file, outbox newest + 1) as the outbox's
`next_seq` and then deletes the file: it is read once and never written. A crash in between leaves the file,
and the next start takes the same maximum again. A file that does not hold a number stops the start-up
(SequenceCorrupt): guessing could give out numbers twice.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

LEGACY_NAME = "sequence"


class SequenceCorrupt(Exception):
    pass


class _Counter(Protocol):
    next_seq: int

    def raise_next_seq(self, value: int) -> None: ...


def read_legacy(path: Path) -> int | None:
    """The first number an older agent's sequence file reserved for the next start; None without a file."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise SequenceCorrupt(f"{path}: expected a non-negative integer, found {text[:40]!r}")
    return int(text)


def migrate_legacy(state_dir: Path, outbox: _Counter) -> int | None:
    """Fold <state_dir>/sequence into the outbox's counter once, then delete it. Blocking (a commit and an
    fsync): run it where the outbox runs, off the event loop. Returns the file's number, or None."""
    path = Path(state_dir) / LEGACY_NAME
    value = read_legacy(path)
    if value is None:
        return None
    outbox.raise_next_seq(value)  # committed before the file goes
    for leftover in (path, path.with_name(path.name + ".tmp")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return value
