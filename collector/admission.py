"""Which message the collector works on next, and which it declines at the door. Pure: no clock, no I/O.

Every message arriving from the broker is offered here first, before anything is decrypted or decoded: its
gateway comes from the topic, which the broker's ACL lets each gateway write only for itself, so the check
costs a dictionary lookup and cannot be spoofed by another gateway. The rules, cheapest first:

1. A global bound on messages and bytes held (`max_messages`, `max_bytes`). mosquitto 2.0.11 was seen to
   exceed a client's Receive Maximum by thousands, so the broker's flow control is no bound; this is.
2. Per gateway, a token bucket on messages and one on bytes (`rate`, `burst`, `byte_rate`, `byte_burst`):
   a gateway sending faster than that is declined (Reason.RATE_LIMITED).
3. Per gateway, a bounded queue (`gateway_messages`, `gateway_bytes`): what a gateway may have waiting.
   Its share of the global bound is never more than this, so one gateway cannot fill the collector.

A declined message is acknowledged to the broker at once (it leaves the broker's queue, so it cannot delay
anyone's messages behind it) and not end to end: the gateway keeps it in its outbox and sends it again.

Taking work (`take`) is round robin over gateways with something waiting, skipping gateways that are busy (a
message of theirs is being processed, or they already have `gateway_pending_lines` lines or
`gateway_pending_bytes` bytes waiting for the InfluxDB writer), and taking nothing while all gateways together
have `max_pending_bytes` waiting there. So n active gateways each get 1/n of the collector and of the store,
however much one of them sends, and a gateway's message waits behind at most one message of each other gateway.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from collector.reasons import Reason


@dataclass(frozen=True)
class Limits:
    max_messages: int = 4096
    max_bytes: int = 64 * 1024 * 1024
    gateway_messages: int = 256
    gateway_bytes: int = 16 * 1024 * 1024
    rate: float = 200.0  # messages per second per gateway, sustained
    burst: float = 2000.0
    byte_rate: float = 4 * 1024 * 1024  # bytes per second per gateway, sustained
    byte_burst: float = 64 * 1024 * 1024
    gateway_pending_lines: int = 5000  # lines of one gateway waiting for (or in) the InfluxDB writer
    gateway_pending_bytes: int = 8 * 1024 * 1024  # and their bytes (lines and kept payload)
    max_pending_bytes: int = 32 * 1024 * 1024  # all gateways' bytes waiting for the writer


class _Bucket:
    """A token bucket: `rate` tokens per second up to `burst`. Time is passed in."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


@dataclass
class _Gateway:
    messages: _Bucket
    bytes: _Bucket
    queue: deque[tuple[Any, int]] = field(default_factory=deque)
    queued_bytes: int = 0
    working: bool = False  # one of its messages is being processed
    pending_lines: int = 0  # its lines in the InfluxDB writer, not yet written or refused
    pending_bytes: int = 0
    declined: int = 0


class FairQueue:
    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._gateways: dict[str, _Gateway] = {}
        self._ready: deque[str] = deque()  # gateways with queued messages, in round-robin order
        self._in_ready: set[str] = set()
        self.messages = 0
        self.bytes = 0
        self.pending_bytes = 0  # every gateway's bytes waiting for the writer

    def set_limits(self, limits: Limits, now: float) -> None:
        """New limits (a configuration reload, SIGHUP). Gateways already known keep the tokens they have, up to the
        new burst, and refill at the new rates from now on; queued messages stay even above a lower bound."""
        self.limits = limits
        for g in self._gateways.values():
            for bucket, rate, burst in ((g.messages, limits.rate, limits.burst),
                                        (g.bytes, limits.byte_rate, limits.byte_burst)):
                bucket.refill(now)  # at the old rate up to now
                bucket.rate, bucket.burst = rate, burst
                bucket.tokens = min(bucket.tokens, burst)

    # -- the door ---------------------------------------------------------------------------------------------

    def offer(self, gateway: str, item: Any, size: int, now: float) -> Reason | None:
        """Queue `item` (of `size` bytes) from `gateway`, or return why it is declined."""
        lim = self.limits
        if self.messages >= lim.max_messages or self.bytes + size > lim.max_bytes:
            self._state(gateway, now).declined += 1
            return Reason.OVERLOAD
        g = self._state(gateway, now)
        g.messages.refill(now)
        g.bytes.refill(now)
        # A message larger than the byte burst could never pass; it is let through when the bucket is full,
        # and drives it negative, so the gateway waits as long as the message is over its rate.
        if g.messages.tokens < 1 or (g.bytes.tokens < size and g.bytes.tokens < g.bytes.burst):
            g.declined += 1
            return Reason.RATE_LIMITED
        if len(g.queue) >= lim.gateway_messages or (g.queue and g.queued_bytes + size > lim.gateway_bytes):
            g.declined += 1
            return Reason.QUEUE_FULL
        g.messages.tokens -= 1
        g.bytes.tokens -= size
        g.queue.append((item, size))
        g.queued_bytes += size
        self.messages += 1
        self.bytes += size
        if gateway not in self._in_ready:
            self._ready.append(gateway)
            self._in_ready.add(gateway)
        return None

    def _state(self, gateway: str, now: float) -> _Gateway:
        g = self._gateways.get(gateway)
        if g is None:
            lim = self.limits
            g = self._gateways[gateway] = _Gateway(_Bucket(lim.rate, lim.burst, now),
                                                   _Bucket(lim.byte_rate, lim.byte_burst, now))
        return g

    # -- the workers ----------------------------------------------------------------------------------------------

    def take(self) -> tuple[str, Any] | None:
        """The next (gateway, item) to work on, round robin over gateways that are not busy; None if none.

        The gateway is then working until `done(gateway)`."""
        lim = self.limits
        if self.pending_bytes >= lim.max_pending_bytes:
            return None  # the writer holds all it may: everyone waits for it, nobody's queue grows past its bound
        for _ in range(len(self._ready)):
            gateway = self._ready.popleft()
            g = self._gateways[gateway]
            if (g.working or g.pending_lines >= lim.gateway_pending_lines
                    or g.pending_bytes >= lim.gateway_pending_bytes):
                self._ready.append(gateway)  # keeps its turn for later
                continue
            item, size = g.queue.popleft()
            g.queued_bytes -= size
            self.messages -= 1
            self.bytes -= size
            g.working = True
            if g.queue:
                self._ready.append(gateway)  # to the back: everyone else goes first
            else:
                self._in_ready.discard(gateway)
            return gateway, item
        return None

    def done(self, gateway: str) -> None:
        g = self._gateways.get(gateway)
        if g is not None:
            g.working = False

    def lines_pending(self, gateway: str, lines: int, size: int = 0) -> None:
        """The writer took (+) or finished (-) lines of this gateway, of `size` bytes."""
        self.pending_bytes = max(0, self.pending_bytes + size)
        g = self._gateways.get(gateway)
        if g is not None:
            g.pending_lines = max(0, g.pending_lines + lines)
            g.pending_bytes = max(0, g.pending_bytes + size)

    def drain(self) -> list[tuple[str, Any]]:
        """Everything still queued (at shutdown: those messages are not acknowledged and come again)."""
        out = []
        for gateway, g in self._gateways.items():
            out += [(gateway, item) for item, _ in g.queue]
            g.queue.clear()
            g.queued_bytes = 0
        self._ready.clear()
        self._in_ready.clear()
        self.messages = self.bytes = 0
        return out

    def forget_idle(self, now: float, idle: float) -> int:
        """Drop the state of gateways with nothing queued or pending whose buckets have been full for `idle`
        seconds: the map of gateways stays as large as the set of active ones. Returns how many were dropped."""
        gone = [gw for gw, g in self._gateways.items()
                if not (g.queue or g.working or g.pending_lines or g.pending_bytes) and now - g.messages.stamp >= idle]
        for gw in gone:
            del self._gateways[gw]
        return len(gone)

    def queued(self, gateway: str) -> int:
        g = self._gateways.get(gateway)
        return len(g.queue) if g else 0

    def declined(self, gateway: str) -> int:
        g = self._gateways.get(gateway)
        return g.declined if g else 0

    @property
    def waiting(self) -> bool:
        return bool(self._ready)
