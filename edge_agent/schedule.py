"""Wall-clock aligned deadlines: a 10 s interval samples at :00, :10, :20 ... on every gateway alike.

Polls stay aligned on every gateway (readings of a fleet line up in time). What a gateway publishes - its cycle's
message and its status heartbeat - can be offset by a fixed fraction of the interval, its `phase`: with every
gateway of a city ending its cycle at :00, :10, :20 ..., the broker and the collectors take the whole fleet's
messages in one burst every interval and the last of the burst waits for all the others (at 3,000 gateways here
the acknowledgement p99 was 4-5 s for 0.3 s of work per message). Spread over the interval, the same load arrives
evenly. The phase comes from the gateway's id (a hash), so it is the same after every restart - one message per
interval, never two close together - and the fleet spreads evenly without any coordination; Telegraf's
`flush_jitter` spreads a random delay for the same reason.
"""

from __future__ import annotations

import hashlib
import math


def phase(gateway_id: str) -> float:
    """The fixed fraction of every interval, in [0, 1), by which this gateway's publishing is offset."""
    return int.from_bytes(hashlib.sha256(gateway_id.encode()).digest()[:8], "big") / 2**64


def next_aligned(now: float, interval: float, offset: float = 0.0) -> float:
    """The first deadline strictly after `now`: a multiple of `interval` (seconds since the epoch) plus
    `offset` x interval (offset in [0, 1): a phase)."""
    shift = offset * interval
    return (math.floor((now - shift) / interval) + 1) * interval + shift


def skipped_deadlines(deadline: float, finished: float, interval: float) -> int:
    """How many later aligned deadlines a poll that started at `deadline` and ended at `finished` ran past."""
    if finished <= deadline:
        return 0
    return int((finished - deadline) // interval)
