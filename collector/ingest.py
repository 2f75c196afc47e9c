"""The collector's pure pipeline: (topic, payload, receive time) -> line-protocol lines, or a typed rejection.

No I/O: the async shell feeds it MQTT messages and sends its lines to InfluxDB.
"""

from __future__ import annotations

from dataclasses import dataclass

from collector.influx.lineproto import LineProtocolError, encode_line
from wire import topics
from wire.envelope import Rejection, WireError, decode_body, open_plain
from wire.seal import FORMAT_SEALED, Opener, SealError

INGEST_MEASUREMENT = "citynerve_ingest"


@dataclass(frozen=True)
class TimePolicy:
    max_future_ns: int
    min_time_ns: int


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


class Ingest:
    """Checks, in this order: size -> topic -> (sealed: header, gateway and key, session signature, AEAD,
    replay window -> see wire.seal.Opener) -> schema -> topic/gateway agreement -> time plausibility."""

    def __init__(self, prefix: str, max_payload_bytes: int, time_policy: TimePolicy, suspect_measurement: str,
                 opener: Opener | None = None, accept_plain: bool = True):
        self.prefix = prefix
        self.max_payload_bytes = max_payload_bytes
        self.time_policy = time_policy
        self.suspect_measurement = suspect_measurement
        self.opener = opener
        self.accept_plain = accept_plain

    def uplink(self, topic: str, payload: bytes, receive_ns: int) -> Accepted:
        """Raises WireError with a Rejection or SealReason for anything that must not be stored."""
        if len(payload) > self.max_payload_bytes:
            raise WireError(Rejection.TOO_LARGE, f"{len(payload)} bytes > limit {self.max_payload_bytes}")
        parsed = topics.parse(self.prefix, topic)
        if parsed is None or parsed[1] != topics.UP:
            raise WireError(Rejection.BAD_TOPIC, f"not an uplink topic under {self.prefix}/: {topic!r}")
        topic_gateway = parsed[0]
        sealed = duplicate = False
        session_id: bytes | None = None
        if payload[:1] == bytes((FORMAT_SEALED,)) and self.opener is not None:
            try:
                opened = self.opener.open(topic_gateway, topic, payload)
            except SealError as exc:
                raise WireError(exc.reason, exc.detail) from None
            batch = decode_body(opened.plaintext)
            sealed, duplicate, session_id = True, opened.duplicate, opened.session_id
        elif not self.accept_plain:
            fmt = f"0x{payload[0]:02x}" if payload else "empty"
            raise WireError(Rejection.UNSEALED, f"format {fmt}: this collector accepts sealed payloads only")
        else:
            batch = open_plain(payload)
        if batch.gateway != topic_gateway:
            raise WireError(
                Rejection.TOPIC_MISMATCH,
                f"message says gateway {batch.gateway!r} but arrived on the topic of {topic_gateway!r}",
            )
        policy = self.time_policy
        latest_ok = receive_ns + policy.max_future_ns
        lines: list[bytes] = []
        suspect = skipped = 0
        for index, reading in enumerate(batch.readings):
            tags = {**reading.tags, "gateway": batch.gateway, "device": reading.device}
            fields = reading.fields
            if reading.quality:  # the reason a value is missing, stored next to where the value would be
                fields = {**fields, **{f"{name}_quality": flag for name, flag in reading.quality.items()}}
            try:
                if policy.min_time_ns <= reading.time_ns <= latest_ok:
                    lines.append(encode_line(reading.measurement, tags, fields, reading.time_ns))
                    continue
                # Never store a reading at a time we believe is wrong: keep it aside, at its receive time
                # (offset by its index so readings of one message do not overwrite each other), with the
                # gateway's own time as a field for the clock correction to come.
                suspect += 1
                tags["measurement"] = reading.measurement
                lines.append(encode_line(self.suspect_measurement, tags, {**fields, "sample_time_ns": reading.time_ns},
                                         receive_ns + index))
            except LineProtocolError:
                skipped += 1
        lines.append(
            encode_line(
                INGEST_MEASUREMENT,
                {"gateway": batch.gateway},
                {
                    "seq": batch.seq,
                    "readings": len(batch.readings),
                    "suspect": suspect,
                    "received_ns": receive_ns,
                    "latency_ms": (receive_ns - batch.sent_ns) / 1e6,
                },
                batch.sent_ns,
            )
        )
        return Accepted(batch.gateway, batch.seq, len(batch.readings), lines, suspect, skipped, sealed, duplicate,
                        session_id)
