"""The contract every serial protocol keeps. Pure: bytes in, samples and rejections out; no I/O.

A streaming protocol (DSMR P1, NMEA, particulate sensors, ASCII lines) is a `StreamDecoder`: the source feeds it
whatever bytes arrived, in any split, and gets back what completed. It must

- resynchronise after garbage (skip to the next possible frame start) and report what it skipped;
- keep a bounded buffer: a stream of junk cannot grow memory (`max_buffer`);
- report every rejected frame with its byte offset in the stream (cumulative over all feeds) and a stable
  reason code, so `edge-agent decode` can print it and tests can check it.

A query protocol (IEC 62056-21 mode C, MH-Z19B) additionally says what to send and when (see each module);
its answers are decoded by the same kind of pure code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from wire.schema import FieldValue


@dataclass(frozen=True)
class Sample:
    """What one frame says. `measurement` None: the source's measurement. `time_ns` None: the time the frame
    completed at the gateway (the source stamps it); set it when the device states its own measurement time
    (a DSMR telegram's timestamp, an M-Bus capture time, an NMEA fix's UTC time)."""

    fields: dict[str, FieldValue]
    measurement: str | None = None
    time_ns: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    quality: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)  # for `decode` output and docs; not sent on the wire


@dataclass(frozen=True)
class Rejected:
    """A frame (or run of bytes) that was not decoded: where in the stream, and why."""

    offset: int  # byte offset in the stream of the first byte of the rejected frame/garbage
    reason: str  # stable code: "crc", "checksum", "bcc", "garbage", "too_long", "malformed", "unsupported", ...
    detail: str = ""
    length: int = 0  # bytes covered


Event = Sample | Rejected


class StreamDecoder(Protocol):
    max_buffer: int

    def feed(self, data: bytes) -> list[Event]:
        """Bytes as they arrived; returns what completed, in stream order."""
        ...

    def flush(self) -> list[Event]:
        """End of stream (a capture file's end): whatever is left is rejected as incomplete."""
        ...
