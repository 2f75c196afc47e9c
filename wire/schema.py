"""Wire schema v1: what a gateway says about its meters. Pure data, no I/O.

A Batch is one uplink message: every reading a gateway produced in one publish interval.
Structs are encoded as msgpack arrays (array_like) so field names are not repeated per reading;
new optional fields may only be appended at the end with a default, which keeps old payloads decodable.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# A gateway id ends up in MQTT topics, TLS certificate CNs, InfluxDB tags and file names:
# letters, digits and . _ - only, so none of those places needs escaping or can be confused.
GATEWAY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
GatewayId = Annotated[str, msgspec.Meta(pattern=GATEWAY_ID_PATTERN)]

# Device ids, measurement, tag and field names: printable, bounded; no control characters,
# which would corrupt line protocol and log lines.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
TagValue = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")]
FieldValue = float | int | bool | str
TimeNs = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Reading(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """One sample of one device: the values a single poll produced, stamped when the answer arrived."""

    device: Name
    measurement: Name
    time_ns: TimeNs
    fields: dict[Name, FieldValue]
    tags: dict[Name, TagValue] = {}


class Batch(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """One uplink message. `seq` is per gateway, strictly increasing, and survives restarts."""

    gateway: GatewayId
    seq: Seq
    sent_ns: TimeNs
    readings: list[Reading]


_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(Batch)


def encode_batch(batch: Batch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(data: bytes) -> Batch:
    """Raises msgspec.ValidationError / msgspec.DecodeError on anything that is not a valid v1 batch."""
    return _batch_decoder.decode(data)
