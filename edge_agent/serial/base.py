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


class JunkRun:
    """Bytes between frames, reported as `garbage` runs of at most `limit` bytes with the offset of their first
    byte - the same runs however the stream is split. Line ends (`blank`) between frames are not garbage."""

    def __init__(self, limit: int, detail: str, blank: bytes = b"\r\n") -> None:
        self.limit = limit
        self.detail = detail
        self.blank = blank
        self.start = 0
        self.pending = 0  # bytes of the current run not yet reported
        self.total = 0  # every garbage byte reported so far

    def add(self, data: bytes | bytearray, pos: int, end: int, base: int, events: list[Event]) -> None:
        """data[pos:end] is junk; `base` is the stream offset of data[0]."""
        while pos < end:
            if self.pending == 0:
                while pos < end and data[pos] in self.blank:
                    pos += 1
                if pos == end:
                    return
                self.start = base + pos
            take = min(end - pos, self.limit - self.pending)
            self.pending += take
            pos += take
            if self.pending >= self.limit:
                self.end(events)

    def end(self, events: list[Event]) -> None:
        """The run is over (a frame starts, or the stream ends): report it."""
        if self.pending:
            events.append(Rejected(self.start, "garbage", self.detail, self.pending))
            self.total += self.pending
        self.pending = 0
