"""The outer frame of every uplink payload: one format byte, then the body.

    0x01  plain v1: body = msgpack Batch (wire/schema.py)
    0x02  sealed v2: the end-to-end sealed envelope (encrypted + authenticated), wire/seal.py

A collector reads the first byte before anything else, so a sealed format can be introduced per gateway
without a flag day, and a collector that requires sealing can refuse 0x01 outright.
"""

from __future__ import annotations

import enum

import msgspec

from wire.schema import Batch, decode_batch, encode_batch


class Format(enum.IntEnum):
    PLAIN_V1 = 0x01
    SEALED_V2 = 0x02


class Rejection(enum.StrEnum):
    """Why a payload was not accepted. Stable codes: they are counter names and log fields."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    UNKNOWN_FORMAT = "unknown_format"
    UNSUPPORTED_FORMAT = "unsupported_format"
    MALFORMED = "malformed"
    SCHEMA = "schema"
    TOPIC_MISMATCH = "topic_mismatch"
    BAD_TOPIC = "bad_topic"
    UNSEALED = "unsealed"  # a plain payload where the collector requires sealing


class WireError(Exception):
    """`reason` is a Rejection or a wire.seal.SealReason: stable codes either way."""

    def __init__(self, reason: enum.StrEnum, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def seal_plain(batch: Batch) -> bytes:
    return frame_plain(encode_batch(batch))


def frame_plain(body: bytes) -> bytes:
    """A plain v1 payload around an already encoded Batch."""
    return bytes((Format.PLAIN_V1,)) + body


def open_plain(payload: bytes | memoryview) -> Batch:
    if not payload:
        raise WireError(Rejection.EMPTY, "empty payload")
    fmt = payload[0]
    if fmt == Format.SEALED_V2:
        raise WireError(Rejection.UNSUPPORTED_FORMAT, "sealed v2 payloads are not supported by this collector")
    if fmt != Format.PLAIN_V1:
        raise WireError(Rejection.UNKNOWN_FORMAT, f"unknown format byte 0x{fmt:02x} at byte offset 0")
    return decode_body(payload[1:])


def decode_body(body: bytes | memoryview) -> Batch:
    """The msgpack Batch inside a plain or sealed envelope, or a WireError (malformed / schema)."""
    try:
        return decode_batch(body)
    except msgspec.ValidationError as exc:
        raise WireError(Rejection.SCHEMA, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise WireError(Rejection.MALFORMED, str(exc)) from None
    except UnicodeDecodeError as exc:  # msgspec raises it as such for invalid UTF-8 in a msgpack string
        raise WireError(Rejection.MALFORMED, f"invalid UTF-8 in a string ({exc.reason}, "
                                             f"{exc.object[exc.start:exc.start + 4]!r})") from None
    except RecursionError:
        raise WireError(Rejection.MALFORMED, "nested too deeply") from None
