"""The retained gateway status message on <prefix>/<gateway_id>/status: small JSON for humans and dashboards.

The birth message says "online" with details; the last will says "offline". Both are retained so that a
subscriber arriving later learns the current state at once.

While online, the agent republishes the status (retained) as a heartbeat every `uplink.heartbeat_interval`,
with its health; a collector writes it to InfluxDB (citynerve_gateway_health, citynerve_device_health):

    state               "online" | "offline"
    gateway             gateway id
    time_ns             when this heartbeat was made (gateway clock); absent in the last will
    version, since_ns   agent version, process start
    mqtt                protocol in use ("MQTTv5" | "MQTTv311")
    backlog_messages    messages in the outbox not yet acknowledged end to end
    backlog_readings    readings in them
    backlog_bytes       their encoded size
    backlog_oldest_ns   creation time of the oldest unacknowledged message, or null
    oldest_unacked_seq  its sequence number, or null
    next_seq            the sequence number the next message gets
    last_publish_ns     last time a message was handed to the broker, or null
    last_ack_ns         last time an end-to-end acknowledgement arrived, or null
    dropped_readings    readings dropped by the outbox bounds since the outbox was created
    resent_messages     messages sent again for want of an acknowledgement (this process)
    outbox_resets       damaged outbox databases moved aside (this process)
    devices             {device id: {"polls": n, "errors": n, "last_error": "..."}} (this process)
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from wire.schema import GatewayId, Name, Seq, TimeNs

ONLINE = "online"
OFFLINE = "offline"

# A status is small (a few hundred bytes plus ~60 per device); anything larger is refused before it is parsed,
# which also bounds the nesting a parser could be made to descend.
MAX_STATUS_BYTES = 256 * 1024
MAX_DEVICES = 1000
MAX_ERROR_CHARS = 1024

Count = Seq  # a non-negative int64, as the wire schema's seq
Short = Annotated[str, msgspec.Meta(max_length=64)]


class DeviceHealth(msgspec.Struct, frozen=True):
    polls: Count | None = None
    errors: Count | None = None
    last_error: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CHARS)] | None = None


class StatusDoc(msgspec.Struct, frozen=True):
    """The status document as the collector accepts it: every field typed and bounded. Unknown fields (a
    newer agent's) are skipped, never stored; a known field of the wrong type refuses the document."""

    state: Literal["online", "offline"]
    gateway: GatewayId | None = None
    time_ns: TimeNs | None = None
    version: Short | None = None
    since_ns: TimeNs | None = None
    mqtt: Short | None = None
    backlog_messages: Count | None = None
    backlog_readings: Count | None = None
    backlog_bytes: Count | None = None
    backlog_oldest_ns: TimeNs | None = None
    oldest_unacked_seq: Count | None = None
    next_seq: Count | None = None
    last_publish_ns: TimeNs | None = None
    last_ack_ns: TimeNs | None = None
    dropped_readings: Count | None = None
    resent_messages: Count | None = None
    outbox_resets: Count | None = None
    devices: Annotated[dict[Name, DeviceHealth], msgspec.Meta(max_length=MAX_DEVICES)] | None = None


_status_decoder = msgspec.json.Decoder(StatusDoc)


class StatusError(ValueError):
    pass


def encode_status(state: str, **details: Any) -> bytes:
    return json.dumps({"state": state, **details}, separators=(",", ":"), sort_keys=True).encode()


def decode_status(payload: bytes | memoryview) -> StatusDoc:
    """The typed status, or StatusError naming what is wrong (size, JSON position, key path)."""
    if len(payload) > MAX_STATUS_BYTES:
        raise StatusError(f"{len(payload)} bytes > limit {MAX_STATUS_BYTES}")
    try:
        return _status_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise StatusError(str(exc)) from None
    except UnicodeDecodeError as exc:  # msgspec raises it as such for invalid UTF-8 in a string
        raise StatusError(f"invalid UTF-8 at byte offset {exc.start}: {exc.reason}") from None
    except RecursionError:  # unknown fields nested deeper than the parser's stack, within the size bound
        raise StatusError("nested too deeply") from None
