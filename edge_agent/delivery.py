"""Which outbox messages to send next, and when to send one again. Pure: events and times in, decisions out.

`Sender` (below) is the whole send loop as a state machine, in the style of h11 and of the IEC 62056-21
session: the agent's shell feeds it events (link up or down, a cycle committed, a PUBACK, an acknowledgement,
the result of an outbox read) and performs the one action `next_action(now)` returns (publish this message,
scan the outbox's backlog, read these bodies back, or wait until a deadline). `Delivery` holds the rules it
applies.

The rules, in order of priority:
1. Live messages (committed by this cycle) are sent at once, whatever else is pending: a backlog never delays
   the newest readings.
2. Then, oldest first, messages sent before but not acknowledged within the timeout, and messages never sent by
   this process (the backlog after a restart or an outage), as long as fewer than `window` messages are
   outstanding (sent, not acknowledged, not timed out). The window bounds what waits in the broker's queues per
   gateway, and a drain proceeds at `window` messages per acknowledgement round trip.
3. A message not acknowledged within the timeout is due again. Then, once per round, the timeout doubles (up to
   its maximum) and the window collapses to one message: each round sends only the oldest unacknowledged
   message as a probe, and live messages wait in the outbox with the rest; each acknowledgement doubles the
   window back towards its size (1, 2, 4 ... within a few round trips), and live messages go first again as
   soon as anything is acknowledged. So an outage (collector or InfluxDB down: nothing acknowledged) neither
   fills the broker's queues (a window, then one message per round) nor costs many re-sends, and a collector
   that is up but behind (acknowledgements later than the timeout) gets one probe per gateway instead of every message again:
   the gateways' sending is clocked by the acknowledgements, as TCP's is after a retransmission timeout
   (RFC 5681 §3.1), so the broker's queue stops growing and what the collector cannot take yet waits in the
   gateways' outboxes. (issue 14: with every expired message sent again, 10,000 gateways re-sent 20,000-36,000
   messages in 2-3 minutes, work the collector then did twice.)
4. The timeout follows the acknowledgement latency the gateway observes, as TCP's retransmission timer follows
   the round trip (RFC 6298): each acknowledgement of a message sent only once is a sample; the timeout is
   srtt + 4 x rttvar, never below `ack_timeout` (the configured floor) nor above `ack_timeout_max`. A sample
   from a message sent twice is ambiguous and never taken, and a backed-off timeout is kept until a fresh sample
   comes (Karn's algorithm, RFC 6298 §5): after an outage that is the first live message acknowledged.
5. A message is due again at once, before its timeout, when a message sent more than `reorder` seconds after it
   (REORDER_MIN, or twice the latency's variation when that is more) is acknowledged and it is not: the
   collector takes a gateway's messages in order, so it was lost on the way (a broker restart, a message the
   collector declined) or its acknowledgement was (they go at QoS 0) - RFC 5681 §3.2's fast retransmit, once
   per message; if that copy is lost too, the timeout applies. Without it such a message waited for a timeout
   that had grown with the latency (minutes, past saturation) while the collector stood idle.

Acknowledgements may name numbers this process never sent (sent before a restart, or by the previous process):
they are remembered as ranges and deleted from the outbox at the next commit.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Rule 5's least reorder allowance (s): two collectors on a shared subscription take one gateway's messages from
# two queues, which may be seconds apart; a message re-sent too early costs a duplicate, written onto the same points.
REORDER_MIN = 2.0


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
        self._taken: set[int] = set()  # chosen from the backlog, not yet sent (or given back with unsent)
        self.cursor = -1  # every seq <= cursor still in the outbox has been sent by this process at least once
        self.acked_ranges: list[tuple[int, int]] = []  # acknowledged, not yet deleted from the outbox (sorted)
        self.last_ack: float | None = None
        self.resent = 0
        self._once: set[int] = set()  # outstanding seqs sent exactly once by this process: their ack is a sample
        self.srtt: float | None = None  # smoothed acknowledgement latency (s), RFC 6298 §2
        self.rttvar = 0.0
        self._fast: set[int] = set()  # seqs already re-sent by rule 5 (once per message)
        self.fast_resends = 0

    # -- events -------------------------------------------------------------------------------------------------

    def committed(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self.live.append(seq)
            self._live_set.add(seq)

    def sent(self, seqs: Iterable[int], now: float) -> None:
        for seq in seqs:
            self._taken.discard(seq)
            if seq in self._retry_set:
                self._retry_set.discard(seq)
                self.resent += 1
                self._once.discard(seq)
            elif seq not in self.outstanding:
                self._once.add(seq)
            else:
                self._once.discard(seq)  # handed over again while outstanding (a reconnect): ambiguous
            self.outstanding.pop(seq, None)
            self.outstanding[seq] = now

    def acked(self, ranges: list[tuple[int, int]], now: float) -> int:
        """Record an acknowledgement; returns how many outstanding messages it covered."""
        covered = 0
        newest_once: float | None = None  # when the most recently sent of the covered once-sent messages went
        newest: float | None = None  # when the most recently sent of all the covered messages went
        for first, last in ranges:
            for seq in [s for s in self.outstanding if first <= s <= last]:
                sent_at = self.outstanding.pop(seq)
                self._fast.discard(seq)
                if newest is None or sent_at > newest:
                    newest = sent_at
                if seq in self._once:
                    self._once.discard(seq)
                    if newest_once is None or sent_at > newest_once:
                        newest_once = sent_at
                covered += 1
            for seq in [s for s in self._retry_set if first <= s <= last]:
                self._retry_set.discard(seq)
            if any(first <= s <= last for s in self._live_set):
                self._live_set = {s for s in self._live_set if not first <= s <= last}
                self.live = deque(s for s in self.live if s in self._live_set)
            self._add_acked(first, last)
        self.last_ack = now
        if newest_once is not None:
            self.sample(now - newest_once)  # the timeout is the estimate again; without a sample a backed-off
            # timeout stays (Karn): an acknowledgement of a copy sent twice says nothing about the latency
        self.cwnd = min(self.window, self.cwnd * 2)
        if newest is not None:
            self._fast_resend(newest - max(REORDER_MIN, 2 * self.rttvar))
        return covered

    def _fast_resend(self, before: float) -> None:
        """Rule 5: outstanding messages sent before `before` are due again now, each once."""
        for seq, sent_at in list(self.outstanding.items()):
            if sent_at >= before:
                break  # send order: the rest were sent later
            if seq in self._fast:
                continue
            self._fast.add(seq)
            if self._due_again(seq):
                self.fast_resends += 1

    def _due_again(self, seq: int) -> bool:
        """An outstanding message goes back to the retry queue (rules 3 and 5); False when it was acknowledged
        meanwhile or is queued already."""
        del self.outstanding[seq]
        self._once.discard(seq)
        if seq in self._retry_set or self.is_acked(seq):
            return False
        heapq.heappush(self._retry, seq)
        self._retry_set.add(seq)
        return True

    def sample(self, latency: float) -> None:
        """One acknowledgement latency (s) of a message sent once: RFC 6298 §2.2/2.3 with alpha 1/8, beta 1/4."""
        latency = max(0.0, latency)
        if self.srtt is None:
            self.srtt, self.rttvar = latency, latency / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - latency)
            self.srtt = 0.875 * self.srtt + 0.125 * latency
        self.timeout = self.estimate()

    def estimate(self) -> float:
        """srtt + 4 x rttvar within [ack_timeout, ack_timeout_max]; ack_timeout before any sample."""
        if self.srtt is None:
            return min(self.base_timeout, self.timeout_max)
        return min(max(self.base_timeout, self.srtt + 4 * self.rttvar), self.timeout_max)

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
        new_round = False
        for seq, sent_at in list(self.outstanding.items()):
            if now - sent_at < self.timeout:
                break  # send order: the rest were sent later
            self._due_again(seq)
            expired += 1
            # once per round: what was sent before the last back-off does not count again
            new_round = new_round or sent_at >= self._backed_off_at
        if new_round:  # rule 3: back off, probe with one message
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
        then they are backlog like the rest. What it returns is taken: sent() or unsent() it."""
        seqs = list(self.live)
        self.live.clear()
        self._live_set.clear()
        if self.probing:
            self.unsent(seqs)
            return []
        self._taken.update(seqs)
        return seqs

    @property
    def probing(self) -> bool:
        return self.cwnd == 1 and self.window > 1

    def unsent(self, seqs: Iterable[int]) -> None:
        """Taken (live or chosen) but not handed to the broker (the link went down): due again, oldest first."""
        for seq in seqs:
            self._taken.discard(seq)
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
        return len(self.outstanding) + len(self._retry_set) + len(self._live_set) + len(self._taken) + sum(
            b - a + 1 for a, b in self.acked_ranges)

    def skip(self, seq: int) -> bool:
        """A message the backlog scan must pass over: live, already taken or outstanding, queued for retry, or
        acked."""
        return (seq in self._live_set or seq in self.outstanding or seq in self._retry_set or seq in self._taken
                or self.is_acked(seq))

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
                self._taken.add(nxt)
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
            self._once.discard(seq)
            self._fast.discard(seq)
            self._retry_set.discard(seq)
            self._taken.discard(seq)


# -- the send loop as a state machine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Seal `body` and hand it to the broker (QoS 1) now; then report `published(seq, mid, size, now)`."""

    seq: int
    body: bytes


@dataclass(frozen=True)
class ScanBacklog:
    """Read up to `limit` sequence numbers after `after` from the outbox, ascending; then report
    `scanned(seqs, limit)`."""

    after: int
    limit: int


@dataclass(frozen=True)
class ReadBodies:
    """Read the bodies of `seqs` from the outbox in this order, stopping once `max_bytes` have been read (at
    least one seq is examined); then report `bodies_read(examined, found)`."""

    seqs: tuple[int, ...]
    max_bytes: int


@dataclass(frozen=True)
class Wait:
    """Nothing to do until an event arrives, or until `deadline` (the clock `next_action` is given) passes."""

    deadline: float | None


Action = Publish | ScanBacklog | ReadBodies | Wait

NO_RECEIVE_MAXIMUM = 65535  # MQTT 5's default when the broker's CONNACK names none (and for MQTT 3.1.1)


class Sender:
    """The uplink's send loop as a sans-IO state machine. Events in, one action out per `next_action(now)`.

    The shell (edge_agent/app.py `Agent._send_loop`) performs each action and reports its result before it
    asks again: `Publish` -> `published()`, `ScanBacklog` -> `scanned()`, `ReadBodies` -> `bodies_read()`;
    on `Wait` it sleeps until the deadline or until any event method was called. Events may come at any
    time between (link_changed, committed, pubacked, acked, deleted): the shell calls them from the event loop.

    One window decides what may be sent: the Delivery rules' window (`uplink.max_unacked_messages` sent and
    not acknowledged end to end; one probe while nothing is acknowledged), which live messages bypass. Handing
    over to paho is paced by two bounds of what paho holds until the broker's PUBACK; on a healthy link they
    never limit the rate: the broker's receive maximum (from its MQTT 5 CONNACK), and `max_handover_bytes`
    of RAM (messages awaiting PUBACK, plus bodies read back and not yet handed over; at least one message).
    paho's own in-flight limit is switched off, so paho never queues a message in RAM.

    Bodies: live messages' bodies come with `committed` and are dropped once handed over or when the link
    goes down (the outbox has them); backlog bodies are read back in slices of at most `max_handover_bytes`.
    """

    def __init__(self, window: int, ack_timeout: float, ack_timeout_max: float,
                 max_handover_bytes: int = 2 * 1024 * 1024) -> None:
        self.rules = Delivery(window, ack_timeout, ack_timeout_max)
        self.max_handover_bytes = max_handover_bytes
        self.link_up = False
        self.receive_maximum = NO_RECEIVE_MAXIMUM
        self.published_count = 0
        self._live: deque[tuple[int, bytes]] = deque()  # taken live messages with their bodies, oldest first
        self._live_bytes = 0
        self._to_read: deque[int] = deque()  # chosen (backlog or retry), bodies not read yet
        self._ready: deque[tuple[int, bytes]] = deque()  # read back, not handed over yet
        self._ready_bytes = 0
        self._pending: dict[int, int] = {}  # paho mid -> bytes, handed over and awaiting the broker's PUBACK
        self._pending_bytes = 0
        self._io: ScanBacklog | ReadBodies | None = None  # the outbox read the shell is performing
        self._scan_needed = True  # the outbox may hold messages after the cursor that nobody took

    def set_limits(self, window: int, ack_timeout: float, ack_timeout_max: float) -> None:
        """New uplink settings (a live reconfiguration). What is outstanding stays outstanding; a smaller window
        only stops new sends until enough is acknowledged."""
        rules = self.rules
        rules.window = window
        rules.cwnd = min(rules.cwnd, window)
        rules.base_timeout = ack_timeout
        rules.timeout_max = ack_timeout_max
        rules.timeout = min(max(rules.timeout, ack_timeout), ack_timeout_max)

    # -- events -------------------------------------------------------------------------------------------------

    def link_changed(self, up: bool, receive_maximum: int | None = None) -> None:
        # paho keeps what it was given and sends it again at the next connection; a PUBACK for it may still
        # come, and is ignored then. Each connection's accounting starts afresh.
        self._pending.clear()
        self._pending_bytes = 0
        if up:
            self.link_up = True
            self.receive_maximum = max(1, receive_maximum or NO_RECEIVE_MAXIMUM)
            self._scan_needed = True
            return
        self.link_up = False
        seqs = [seq for seq, _ in self._live] + list(self._to_read) + [seq for seq, _ in self._ready]
        seqs += self.rules.take_live()  # committed, not yet taken (none while probing: already backlog)
        self._live.clear()
        self._live_bytes = 0
        self._to_read.clear()
        self._ready.clear()
        self._ready_bytes = 0
        self._give_back(seqs)

    def committed(self, messages: Sequence[tuple[int, bytes]]) -> None:
        """A cycle's messages (seq, body) are in the outbox: live, sent first, if the link is up and messages
        are being acknowledged; otherwise backlog like the rest, read back when their turn comes."""
        seqs = [seq for seq, _ in messages]
        if not self.link_up:
            self.rules.unsent(seqs)
            self._scan_needed = True
            return
        self.rules.committed(seqs)
        taken = set(self.rules.take_live())  # none while probing: then they went to the backlog
        if len(taken) < len(seqs):
            self._scan_needed = True
        for seq, body in messages:
            if seq in taken:
                self._live.append((seq, body))
                self._live_bytes += len(body)
        # A bound on live bodies held in RAM while nothing can be handed over (PUBACKs stopped coming and the
        # keepalive has not noticed yet): the oldest become backlog, the newest stay live.
        while self._live_bytes > self.max_handover_bytes and len(self._live) > 1:
            seq, body = self._live.popleft()
            self._live_bytes -= len(body)
            self._give_back([seq])

    def published(self, seq: int | None, mid: int | None, size: int, now: float) -> None:
        """The shell handed a message of `size` bytes to paho and got `mid` (None: paho could not send it on
        this connection, it keeps it for the next one). `seq` None: a message of the shell's own (the retained
        status), counted against the same hand-over bounds."""
        if seq is not None:
            self.rules.sent([seq], now)
            self.published_count += 1
        if mid is not None:
            self._pending_bytes += size - self._pending.get(mid, 0)
            self._pending[mid] = size

    def pubacked(self, mid: int) -> None:
        size = self._pending.pop(mid, None)
        if size is not None:
            self._pending_bytes -= size

    def acked(self, ranges: list[tuple[int, int]], now: float) -> int:
        """An end-to-end acknowledgement (verified by the shell); returns how many outstanding it covered."""
        return self.rules.acked(ranges, now)

    def take_acked(self) -> list[tuple[int, int]]:
        """The acknowledged ranges to delete in the next commit; call deleted() once it succeeded."""
        return self.rules.take_acked()

    def deleted(self, acked: list[tuple[int, int]], dropped: list[tuple[int, int]]) -> None:
        """A commit deleted `acked` (as taken) and the outbox bounds dropped `dropped`: forget them."""
        self.rules.acked_deleted(acked)
        if dropped:
            self.rules.forget_ranges(dropped)

    def scanned(self, seqs: Sequence[int], limit: int) -> None:
        """The result of ScanBacklog: the outbox's seqs after the cursor (at most `limit`, ascending)."""
        self._io = None
        if not self.link_up:
            return  # scanned again once the link is back
        room = self._room()
        if room <= 0:
            return  # nothing taken, the cursor stays: scanned again when the window has room
        self._to_read.extend(self.rules.choose(list(seqs), room))
        self._scan_needed = len(seqs) >= limit or (bool(seqs) and self.rules.cursor < seqs[-1])

    def bodies_read(self, examined: Sequence[int], found: Sequence[tuple[int, bytes]]) -> None:
        """The result of ReadBodies: the seqs the shell got to (a prefix of the action's), and the bodies of
        those still in the outbox (the others were dropped by its bounds or deleted as acknowledged)."""
        asked = self._io.seqs if isinstance(self._io, ReadBodies) else tuple(examined)
        self._io = None
        got = {seq for seq, _ in found}
        self.rules.forget([seq for seq in examined if seq not in got])
        looked_at = set(examined)
        rest = [seq for seq in asked if seq not in looked_at]
        if not self.link_up:  # went down during the read: all of it is due again
            self._give_back([seq for seq, _ in found] + rest)
            return
        self._to_read.extendleft(reversed(rest))
        for seq, body in found:
            self._ready.append((seq, body))
            self._ready_bytes += len(body)

    # -- decisions ----------------------------------------------------------------------------------------------

    def next_action(self, now: float) -> Action:
        rules = self.rules
        rules.expire(now)
        if not self.link_up:
            return Wait(rules.next_expiry())
        if self._can_hand_over():
            if self._live:  # live first, whatever else is pending
                seq, body = self._live.popleft()
                self._live_bytes -= len(body)
                return Publish(seq, body)
            while self._ready:
                seq, body = self._ready.popleft()
                self._ready_bytes -= len(body)
                if rules.is_acked(seq):  # acknowledged meanwhile (sent by an earlier process): nothing to do
                    rules.forget([seq])
                    continue
                return Publish(seq, body)
        if self._io is not None or self._live or self._ready:
            return Wait(rules.next_expiry())  # a PUBACK (or the read's result) comes first
        if not self._to_read:
            room = self._room()
            if room <= 0:
                return Wait(rules.next_expiry())
            if self._scan_needed:
                # The scan must reach past what the window skips (outstanding, retries, acked ranges).
                self._io = ScanBacklog(rules.cursor, room + min(rules.skippable, 50_000) + 16)
                return self._io
            self._to_read.extend(rules.choose([], room))  # retries only: the backlog after the cursor is empty
            if not self._to_read:
                return Wait(rules.next_expiry())
        budget = self.max_handover_bytes - self._pending_bytes - self._ready_bytes
        if budget <= 0 and self._pending:
            return Wait(rules.next_expiry())  # RAM bound: read more once PUBACKs have freed some
        self._io = ReadBodies(tuple(self._to_read), max(1, budget))
        self._to_read.clear()
        return self._io

    def _can_hand_over(self) -> bool:
        if not self._pending:
            return True
        return len(self._pending) < self.receive_maximum and self._pending_bytes < self.max_handover_bytes

    def _room(self) -> int:
        """How many more backlog or retry messages the window lets this sender take now."""
        reading = len(self._io.seqs) if isinstance(self._io, ReadBodies) else 0
        return self.rules.budget - len(self._to_read) - len(self._ready) - reading

    def _give_back(self, seqs: list[int]) -> None:
        """Taken and not handed over: due again (backlog or retry, oldest first). Their bodies are let go, the
        outbox has them."""
        self.rules.unsent(seqs)
        self._scan_needed = True

    # -- what the shell reports ---------------------------------------------------------------------------------

    @property
    def pending_handover(self) -> tuple[int, int]:
        """(messages, bytes) handed to paho and awaiting PUBACK on this connection."""
        return len(self._pending), self._pending_bytes

    @property
    def resent(self) -> int:
        return self.rules.resent

    def next_expiry(self) -> float | None:
        return self.rules.next_expiry()
