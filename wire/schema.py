"""Wire schema v1: what a gateway says about its meters. Pure data, no I/O.

A Batch is one uplink message: every reading a gateway produced in one publish interval.
Structs are encoded as msgpack arrays (array_like) so field names are not repeated per reading;
new optional fields may only be appended at the end with a default, which keeps old payloads decodable.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from wire.names import NAME_PATTERN, TAG_VALUE_PATTERN, bad_character, describe

# A gateway id ends up in MQTT topics, TLS certificate CNs, InfluxDB tags and file names:
# letters, digits and . _ - only, so none of those places needs escaping or can be confused.
GATEWAY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"  # \Z: "$" would accept a trailing newline
GatewayId = Annotated[str, msgspec.Meta(pattern=GATEWAY_ID_PATTERN)]

# Device ids, measurement, tag and field names: bounded, and made of the characters wire/names.py allows (no
# C0 or C1 controls, DEL or lone surrogates), the one rule the line-protocol encoder applies too, so what the
# schema accepts can be stored. The character rule is checked in decode_batch() once per distinct name (names
# repeat in every message) instead of by a per-string regex, which made decoding 6x slower.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TagValue = Annotated[str, msgspec.Meta(max_length=256)]

# The same rules for configuration and profile files, where a per-string pattern costs nothing and gives the
# error its key path.
ConfigName = Annotated[str, msgspec.Meta(
    min_length=1, max_length=128, pattern=NAME_PATTERN,
    extra={"expect": "a name: 1..128 characters, no control characters (U+0000-U+001F, U+007F-U+009F)"})]
ConfigTagValue = Annotated[str, msgspec.Meta(
    max_length=256, pattern=TAG_VALUE_PATTERN,
    extra={"expect": "up to 256 characters, no control characters (U+0000-U+001F, U+007F-U+009F)"})]
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
    # Why an expected field is missing: "not_available" (the device's sentinel), "error" (its request
    # failed), "no_scale_factor". A missing value is never replaced by a made-up number.
    quality: dict[Name, TagValue] = {}


# The quality flag of a reading's sample time (quality[TIME_QUALITY], stored as the field `time_quality`), set by
# a gateway without a real-time clock (edge_agent/clock.py, docs/operations.md "Time on gateways without an RTC"):
# stamped while its clock was not synchronised and converted with the offset learned from NTP or from an
# acknowledgement's collector time; or not convertible (an earlier boot's), which the collector sets aside.
TIME_QUALITY = "time"
TIME_CORRECTED_NTP = "corrected_ntp"
TIME_CORRECTED_ACK = "corrected_ack"
TIME_UNCORRECTABLE = "uncorrectable"


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


_clean_names: set[str] = set()
_CLEAN_NAMES_LIMIT = 100_000


def _check_name(name: str, where: str) -> None:
    if name in _clean_names:
        return
    bad = bad_character(name)
    if bad is not None:
        raise msgspec.ValidationError(f"{describe(bad)} in the name {name!r} - at `$.{where}`")
    if len(_clean_names) >= _CLEAN_NAMES_LIMIT:
        _clean_names.clear()
    _clean_names.add(name)


def decode_batch(data: bytes | memoryview) -> Batch:
    """Raises msgspec.ValidationError / msgspec.DecodeError on anything that is not a valid v1 batch."""
    batch = _batch_decoder.decode(data)
    clean = _clean_names
    for i, r in enumerate(batch.readings):
        if (r.device in clean and r.measurement in clean and clean.issuperset(r.fields)
                and clean.issuperset(r.tags) and clean.issuperset(r.tags.values()) and not r.quality):
            continue  # the common case, checked at C speed
        _check_name(r.device, f"readings[{i}].device")
        _check_name(r.measurement, f"readings[{i}].measurement")
        for key in r.fields:
            _check_name(key, f"readings[{i}].fields")
        for key, value in r.tags.items():
            _check_name(key, f"readings[{i}].tags")
            _check_name(value, f"readings[{i}].tags.{key}")
        for key, value in r.quality.items():
            _check_name(key, f"readings[{i}].quality")
            _check_name(value, f"readings[{i}].quality.{key}")
    return batch
