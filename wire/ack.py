"""End-to-end acknowledgements: which sequence numbers of a gateway are stored in InfluxDB. Pure.

A collector publishes an acknowledgement on <prefix>/<gateway>/down/ack only after InfluxDB confirmed the write
of every line of those messages. The agent deletes a message from its outbox only when it is acknowledged; a
PUBACK from the broker proves nothing about storage (docs/operations.md).

Body: a msgpack array of [first, last] pairs (inclusive), ascending and disjoint. Ranges keep an acknowledgement
small when a backlog drains (thousands of consecutive numbers are one pair). The body travels inside the
authenticated downlink envelope (wire.seal, format 0x03) when the gateway seals its uplink, and after the
format byte 0x01 (PLAIN_ACK) when it does not.

Acknowledging a number twice, or one the gateway no longer holds, is harmless: the agent deletes what it has.
That is what makes a replayed acknowledgement useless to an attacker and duplicates from several collector
instances free.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from wire.schema import Seq

KIND = "ack"  # the leaf under down/: <prefix>/<gateway>/down/ack
PLAIN_ACK = 0x01  # format byte of an unauthenticated acknowledgement (gateways that do not seal)
MAX_RANGES = 4096  # per message; a collector sends the rest in the next one

Range = tuple[Seq, Seq]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[tuple[Seq, Seq]])


class AckError(ValueError):
    pass


def to_ranges(seqs: Iterable[int]) -> list[Range]:
    """Sorted, disjoint, inclusive ranges covering exactly the given numbers."""
    ranges: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return [(first, last) for first, last in ranges]


def encode_ack(ranges: list[Range]) -> bytes:
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"{len(ranges)} ranges in one acknowledgement (limit {MAX_RANGES})")
    return _encoder.encode(ranges)


def decode_ack(body: bytes) -> list[Range]:
    """The ranges of an acknowledgement body; AckError names what is wrong."""
    try:
        ranges = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise AckError(f"not an acknowledgement body: {exc}") from None
    if len(ranges) > MAX_RANGES:
        raise AckError(f"{len(ranges)} ranges (limit {MAX_RANGES})")
    previous = -2
    for index, (first, last) in enumerate(ranges):
        if first > last:
            raise AckError(f"range {index}: first {first} > last {last}")
        if first <= previous + 1:
            raise AckError(f"range {index} [{first}, {last}] overlaps or touches the one before (ends {previous})")
        previous = last
    return ranges


class PendingAcks:
    """The collector's per-gateway set of stored sequence numbers not yet acknowledged, taken as ranges."""

    def __init__(self) -> None:
        self._seqs: dict[str, set[int]] = {}

    def add(self, gateway: str, seq: int) -> None:
        self._seqs.setdefault(gateway, set()).add(seq)

    def __bool__(self) -> bool:
        return bool(self._seqs)

    def take(self) -> dict[str, list[list[Range]]]:
        """Everything pending, per gateway, split into messages of at most MAX_RANGES ranges; then empty."""
        taken = {
            gateway: [ranges[i:i + MAX_RANGES] for i in range(0, len(ranges), MAX_RANGES)]
            for gateway, ranges in ((g, to_ranges(s)) for g, s in self._seqs.items())
        }
        self._seqs.clear()
        return taken
