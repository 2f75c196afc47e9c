"""Wall-clock aligned deadlines: a 10 s interval samples at :00, :10, :20 ... on every gateway alike."""

from __future__ import annotations

import math


def next_aligned(now: float, interval: float) -> float:
    """The first multiple of `interval` (seconds since the epoch) strictly after `now`."""
    return (math.floor(now / interval) + 1) * interval


def skipped_deadlines(deadline: float, finished: float, interval: float) -> int:
    """How many later aligned deadlines a poll that started at `deadline` and ended at `finished` ran past."""
    if finished <= deadline:
        return 0
    return int((finished - deadline) // interval)
