"""Which outbox messages to send next, and when to send one again. Pure: events and times in, decisions out.

The rules, in order of priority:
1. Live messages (committed by this cycle) are sent at once, whatever else is pending: a backlog never delays
   the newest readings.
2. Then, oldest first, messages sent before but not acknowledged within the timeout, and messages never sent by
   this process (the backlog after a restart or an outage), as long as fewer than `window` messages are
   outstanding (sent, not acknowledged, not timed out). The window bounds what waits in the broker's queues per
   gateway, and a drain proceeds at `window` messages per acknowledgement round trip.
3. A message not acknowledged within the timeout is due again. While nothing at all is acknowledged (collector
   or InfluxDB down), the timeout doubles per round up to its maximum, and the window collapses to one message:
   each round sends only the oldest unacknowledged message as a probe, and live messages wait in the outbox
   with the rest. So a long outage neither fills the broker's queues (a window, then one message per round)
   nor costs many re-sends. Each acknowledgement resets the timeout and doubles the window back to its size
   (1, 2, 4 ... within seconds); live messages go first again as soon as anything is acknowledged.

Acknowledgements may name numbers this process never sent (sent before a restart, or by the previous process):
they are remembered as ranges and deleted from the outbox at the next commit.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterable


class Delivery:
    def __init__(self, window: int, ack_timeout: float, ack_timeout_max: float) -> None:
        self.window = window
        self.base_timeout = ack_timeout
        self.timeout = ack_timeout
        self.cwnd = window  # the window in use: collapses to 1 while nothing is acknowledged, doubles per ack
        self._backed_off_at = float("-inf")
        self.timeout_max = ack_timeout_max
        self.outstanding: dict[int, float] = {}  # seq -> when sent; insertion order is send order
        self.live: deque[int] = deque()
        self._live_set: set[int] = set()
        self._retry: list[int] = []  # heap of timed-out seqs
        self._retry_set: set[int] = set()
        self.cursor = -1  # every seq <= cursor still in the outbox has been sent by this process at least once
        self.acked_ranges: list[tuple[int, int]] = []  # acknowledged, not yet deleted from the outbox (sorted)
        self.last_ack: float | None = None
        self.resent = 0

    # -- events -------------------------------------------------------------------------------------------------

    def committed(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self.live.append(seq)
            self._live_set.add(seq)

    def sent(self, seqs: Iterable[int], now: float) -> None:
        for seq in seqs:
            if seq in self._retry_set:
                self._retry_set.discard(seq)
                self.resent += 1
            self.outstanding.pop(seq, None)
            self.outstanding[seq] = now

    def acked(self, ranges: list[tuple[int, int]], now: float) -> int:
        """Record an acknowledgement; returns how many outstanding messages it covered."""
        covered = 0
        for first, last in ranges:
            for seq in [s for s in self.outstanding if first <= s <= last]:
                del self.outstanding[seq]
                covered += 1
            for seq in [s for s in self._retry_set if first <= s <= last]:
                self._retry_set.discard(seq)
            if any(first <= s <= last for s in self._live_set):
                self._live_set = {s for s in self._live_set if not first <= s <= last}
                self.live = deque(s for s in self.live if s in self._live_set)
            self._add_acked(first, last)
        self.last_ack = now
        self.timeout = self.base_timeout
        self.cwnd = min(self.window, self.cwnd * 2)
        return covered

    def _add_acked(self, first: int, last: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.acked_ranges, (first, last)]):
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        self.acked_ranges = merged

    def take_acked(self) -> list[tuple[int, int]]:
        """The ranges to delete in the next commit. Call acked_deleted() once that commit succeeded."""
        return list(self.acked_ranges)

    def acked_deleted(self, ranges: list[tuple[int, int]]) -> None:
        """These ranges are gone from the outbox; keep only what was acknowledged since they were taken."""
        gone = set(ranges)
        self.acked_ranges = [r for r in self.acked_ranges if r not in gone]

    def is_acked(self, seq: int) -> bool:
        i = bisect.bisect_right(self.acked_ranges, (seq, 2**63)) - 1
        return i >= 0 and self.acked_ranges[i][0] <= seq <= self.acked_ranges[i][1]

    def expire(self, now: float) -> int:
        """Move messages whose acknowledgement is overdue to the retry queue; returns how many."""
        expired = 0
        nothing_acked_since = None
        for seq, sent_at in list(self.outstanding.items()):
            if now - sent_at < self.timeout:
                break  # send order: the rest were sent later
            del self.outstanding[seq]
            if seq not in self._retry_set and not self.is_acked(seq):
                heapq.heappush(self._retry, seq)
                self._retry_set.add(seq)
            expired += 1
            if (self.last_ack is None or self.last_ack < sent_at) and sent_at >= self._backed_off_at:
                nothing_acked_since = sent_at
        if nothing_acked_since is not None:  # once per round: what was sent before the last back-off does not count
            self.timeout = min(self.timeout * 2, self.timeout_max)
            self.cwnd = 1
            self._backed_off_at = now
        return expired

    def next_expiry(self) -> float | None:
        """When the oldest outstanding message times out, or None."""
        for sent_at in self.outstanding.values():
            return sent_at + self.timeout
        return None

    # -- decisions ------------------------------------------------------------------------------------------------

    def take_live(self) -> list[int]:
        """The live messages to send now, ahead of everything; none while probing (nothing acknowledged):
        then they are backlog like the rest."""
        seqs = list(self.live)
        self.live.clear()
        self._live_set.clear()
        if self.probing:
            self.unsent(seqs)
            return []
        return seqs

    @property
    def probing(self) -> bool:
        return self.cwnd == 1 and self.window > 1

    def unsent(self, seqs: Iterable[int]) -> None:
        """Taken (live or chosen) but not handed to the broker (the link went down): due again, oldest first."""
        for seq in seqs:
            if seq in self._retry_set:
                heapq.heappush(self._retry, seq)
            elif seq not in self.outstanding:
                self.cursor = min(self.cursor, seq - 1)  # the backlog scan finds it again

    @property
    def budget(self) -> int:
        """How many backlog or retry messages may be sent now."""
        return max(0, self.cwnd - len(self.outstanding))

    @property
    def skippable(self) -> int:
        """An upper bound of how many held seqs after the cursor skip() passes over (acked ones: per range)."""
        return len(self.outstanding) + len(self._retry_set) + len(self._live_set) + sum(
            b - a + 1 for a, b in self.acked_ranges)

    def skip(self, seq: int) -> bool:
        """A message the backlog scan must pass over: live, already outstanding, queued for retry or acked."""
        return seq in self._live_set or seq in self.outstanding or seq in self._retry_set or self.is_acked(seq)

    def choose(self, backlog: list[int], budget: int) -> list[int]:
        """Up to `budget` seqs, oldest first, from the retry queue and `backlog` (the next seqs after the cursor
        in the outbox, ascending). Advances the cursor over what it takes from the backlog."""
        chosen: list[int] = []
        candidates = iter(s for s in backlog if not self.skip(s))
        nxt = next(candidates, None)
        while len(chosen) < budget:
            while self._retry and self._retry[0] not in self._retry_set:
                heapq.heappop(self._retry)  # acknowledged while waiting
            top = self._retry[0] if self._retry else None
            if top is None and nxt is None:
                break
            if nxt is None or (top is not None and top < nxt):
                chosen.append(heapq.heappop(self._retry))  # stays in _retry_set until sent() counts it
            else:
                chosen.append(nxt)
                nxt = next(candidates, None)
        if nxt is None and backlog:
            self.cursor = max(self.cursor, backlog[-1])  # every scanned seq was taken or skipped
        else:
            taken_backlog = [s for s in chosen if s not in self._retry_set]
            if taken_backlog:
                self.cursor = max(self.cursor, taken_backlog[-1])
        return chosen

    def forget_ranges(self, ranges: list[tuple[int, int]]) -> None:
        self.forget([s for s in [*self.outstanding, *self._retry_set] if any(a <= s <= b for a, b in ranges)])

    def forget(self, seqs: Iterable[int]) -> None:
        """Messages no longer in the outbox (dropped by the bounds): nothing more to send or wait for."""
        for seq in seqs:
            self.outstanding.pop(seq, None)
            self._retry_set.discard(seq)
