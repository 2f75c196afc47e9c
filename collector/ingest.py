"""The collector's pure pipeline: (topic, payload, receive time) -> line-protocol lines, or a typed rejection.

No I/O: the async shell feeds it MQTT messages and sends its lines to InfluxDB.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from collector.guard import Guard, Verdict
from collector.influx.lineproto import LineProtocolError, encode_line
from collector.reasons import RETRY_LATER
from wire import topics
from wire.envelope import Rejection, WireError, decode_body, open_plain
from wire.schema import TIME_QUALITY, TIME_UNCORRECTABLE, Batch
from wire.seal import FORMAT_SEALED, Opener, SealError

INGEST_MEASUREMENT = "citynerve_ingest"
# Readings are encoded in slices of this many, so that the shell can let other work run between slices: a
# 4 MiB message of ~100,000 readings must not hold the event loop for the seconds it takes to encode.
SLICE = 1000
# [influx] precision: the resolution readings' sample times are stored at, in ns.
PRECISIONS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9}


@dataclass(frozen=True)
class TimePolicy:
    """Which times may become a point's time. Outside, a reading is set aside (suspect measurement, stored at
    its receive time): never stored at a time believed wrong, and never creating InfluxDB shards far in the
    past or future (each shard costs the store an index, a WAL and a cache for as long as it exists)."""

    max_future_ns: int
    min_time_ns: int
    max_past_ns: int = 0  # 0: no bound relative to the receive time

    def plausible(self, time_ns: int, receive_ns: int) -> bool:
        if not self.min_time_ns <= time_ns <= receive_ns + self.max_future_ns:
            return False
        return not self.max_past_ns or time_ns >= receive_ns - self.max_past_ns


@dataclass
class Opened:
    """An authentic, well-formed message whose readings are still to be checked and encoded."""

    batch: Batch
    sealed: bool = False
    duplicate: bool = False
    session_id: bytes | None = None


@dataclass
class Accepted:
    gateway: str
    seq: int
    readings: int
    lines: list[bytes]
    suspect: int = 0  # readings whose sample time is implausible (written to the suspect measurement)
    skipped: int = 0  # readings with no storable field (e.g. every value NaN)
    sealed: bool = False
    duplicate: bool = False  # a sealed message seen before (stored again: the write is idempotent)
    # The sealed session the message came in (wire.seal.Opened.session_id), None for a plain message: its
    # downlink key authenticates the acknowledgement of this seq.
    session_id: bytes | None = None
    # Readings (or fields of readings) the guard declined, by reason, with the first detail of each reason.
    declined: Counter[str] = field(default_factory=Counter)
    details: dict[str, str] = field(default_factory=dict)

    def verdict(self, verdict: Verdict) -> dict | None:
        """Count what the guard declined; the fields to write, or None."""
        for reason, detail in verdict.declined:
            self.declined[reason] += 1
            self.details.setdefault(reason, detail)
        return verdict.fields

    @property
    def held(self) -> bool:
        """Something was held back for a budget (RETRY_LATER): not acknowledged end to end, sent again."""
        return any(reason in RETRY_LATER for reason in self.declined)


class Ingest:
    """Checks, in this order: size -> topic -> (sealed: header, gateway and key, session signature, AEAD,
    replay window -> see wire.seal.Opener) -> schema -> topic/gateway agreement -> per reading: the guard
    (reserved names, field types, budgets: collector/guard.py) -> time plausibility."""

    def __init__(self, prefix: str, max_payload_bytes: int, time_policy: TimePolicy, suspect_measurement: str,
                 opener: Opener | None = None, accept_plain: bool = True, guard: Guard | None = None,
                 precision_ns: int = 1):
        self.prefix = prefix
        # Sample times are stored cut to this many ns ([influx] precision): the digits below carry the gateway
        # clock's reading jitter, not information, and cost the store a little (docs/benchmarks.md "Store").
        # Two readings of one device within one unit would become one point: keep it below the fastest poll.
        self.precision_ns = precision_ns
        self.max_payload_bytes = max_payload_bytes
        self.time_policy = time_policy
        self.suspect_measurement = suspect_measurement
        self.opener = opener
        self.accept_plain = accept_plain
        self.guard = guard

    def uplink(self, topic: str, payload: bytes, receive_ns: int, now: float = 0.0) -> Accepted:
        """open() and every slice of encode() at once. Raises WireError for a message that must not be stored."""
        opened = self.open(topic, payload)
        accepted = self.start(opened)
        for start in range(0, len(opened.batch.readings), SLICE):
            self.encode(opened, accepted, start, start + SLICE, receive_ns, now)
        self.finish(opened, accepted, receive_ns)
        return accepted

    def open(self, topic: str, payload: bytes) -> Opened:
        """Raises WireError with a Rejection or SealReason for anything that must not be stored."""
        if len(payload) > self.max_payload_bytes:
            raise WireError(Rejection.TOO_LARGE, f"{len(payload)} bytes > limit {self.max_payload_bytes}")
        parsed = topics.parse(self.prefix, topic)
        if parsed is None or parsed[1] != topics.UP:
            raise WireError(Rejection.BAD_TOPIC, f"not an uplink topic under {self.prefix}/: {topic!r}")
        topic_gateway = parsed[0]
        if payload[:1] == bytes((FORMAT_SEALED,)) and self.opener is not None:
            try:
                sealed = self.opener.open(topic_gateway, topic, payload)
            except SealError as exc:
                raise WireError(exc.reason, exc.detail) from None
            opened = Opened(decode_body(sealed.plaintext), True, sealed.duplicate, sealed.session_id)
        elif not self.accept_plain:
            fmt = f"0x{payload[0]:02x}" if payload else "empty"
            raise WireError(Rejection.UNSEALED, f"format {fmt}: this collector accepts sealed payloads only")
        else:
            opened = Opened(open_plain(payload))
        if opened.batch.gateway != topic_gateway:
            raise WireError(
                Rejection.TOPIC_MISMATCH,
                f"message says gateway {opened.batch.gateway!r} but arrived on the topic of {topic_gateway!r}",
            )
        return opened

    def start(self, opened: Opened) -> Accepted:
        b = opened.batch
        return Accepted(b.gateway, b.seq, len(b.readings), [], sealed=opened.sealed, duplicate=opened.duplicate,
                        session_id=opened.session_id)

    def encode(self, opened: Opened, acc: Accepted, start: int, stop: int, receive_ns: int, now: float) -> None:
        """Lines of readings[start:stop] into `acc`. `now` is the guard's clock (monotonic seconds)."""
        batch = opened.batch
        policy = self.time_policy
        guard = self.guard
        lines = acc.lines
        for index in range(start, min(stop, len(batch.readings))):
            reading = batch.readings[index]
            tags = {**reading.tags, "gateway": batch.gateway, "device": reading.device}
            if guard is not None:
                fields = acc.verdict(guard.check(batch.gateway, reading.measurement, tags, reading.fields,
                                                 reading.quality, now))
                if fields is None:
                    continue
            else:
                fields = reading.fields
                if reading.quality:  # the reason a value is missing, stored next to where the value would be
                    fields = {**fields, **{f"{name}_quality": flag for name, flag in reading.quality.items()}}
            try:
                # A gateway without RTC flags readings whose time it could not correct (edge_agent/clock.py):
                # set aside even when their time looks plausible (fake-hwclock's last shutdown, days ago).
                if policy.plausible(reading.time_ns, receive_ns) and not (
                        reading.quality and reading.quality.get(TIME_QUALITY) == TIME_UNCORRECTABLE):
                    time_ns = reading.time_ns
                    if self.precision_ns > 1:
                        time_ns -= time_ns % self.precision_ns
                    lines.append(encode_line(reading.measurement, tags, fields, time_ns))
                    continue
                # Never store a reading at a time we believe is wrong: keep it aside, at its receive time
                # (offset by its index so readings of one message do not overwrite each other), with the
                # gateway's own time as a field for the clock correction to come.
                acc.suspect += 1
                tags["measurement"] = reading.measurement
                fields = {**fields, "sample_time_ns": reading.time_ns}
                if guard is not None:  # one measurement for every gateway's set-aside readings: same rules
                    fields = acc.verdict(guard.check(batch.gateway, self.suspect_measurement, tags, fields, {}, now,
                                                     owned=True))
                    if fields is None:
                        continue
                lines.append(encode_line(self.suspect_measurement, tags, fields, receive_ns + index))
            except LineProtocolError:
                acc.skipped += 1

    def finish(self, opened: Opened, acc: Accepted, receive_ns: int) -> None:
        """The per-message ingest record. Stamped with the gateway's send time when that is plausible, else with
        the receive time: a gateway cannot place even its own records in a shard of its choosing."""
        batch = opened.batch
        plausible = self.time_policy.plausible(batch.sent_ns, receive_ns)
        fields: dict[str, int | float] = {
            "seq": batch.seq,
            "readings": len(batch.readings),
            "suspect": acc.suspect,
            "declined": sum(acc.declined.values()),
            "received_ns": receive_ns,
        }
        if plausible:  # from a send time believed wrong (a clock not set: 1970), a "latency" of decades means nothing
            fields["latency_ms"] = (receive_ns - batch.sent_ns) / 1e6
        acc.lines.append(encode_line(INGEST_MEASUREMENT, {"gateway": batch.gateway}, fields,
                                     batch.sent_ns if plausible else receive_ns))
