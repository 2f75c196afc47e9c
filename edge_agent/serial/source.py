"""A serial source: one port, one protocol, one device. The async shell around a pure decoder.

Streaming protocols (DSMR P1, NMEA, particulate sensors, ASCII lines) are read as the bytes come; query
protocols (MH-Z19B) are asked every interval; IEC 62056-21 runs its sign-on dialogue every interval. A port
that disappears (USB unplugged) is reopened with backoff when it returns; a rejected frame is counted by
reason and logged (rate-limited) with its byte offset; a decoder bug costs the frame, never the source.

For the fleet inventory (wire/status.py) a source remembers what its frames say about the device itself
(`identity`: a DSMR meter's equipment id, an IEC 62056-21 meter's manufacturer and identification, a sensor's
id or version, taken from the tags the decoders already set) and, for NMEA, the latest position fix (`fix`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.schedule import next_aligned
from edge_agent.serial.base import Event, Rejected, Sample
from edge_agent.serial.config import SerialDevice
from edge_agent.serial.port import PortError, PortLost, SerialStream
from edge_agent.serial.protocols import ProtocolInfo, protocol_info
from wire.logs import RateLimitedLog
from wire.schema import Reading

log = logging.getLogger("citynerve.serial")

# Sample tags that say what the device is, by the inventory's names (wire/status.py DeviceInfo). Only the
# device's own samples count: a DSMR M-Bus sub-meter's (tag "channel") names another device.
IDENTITY_TAGS = {
    "equipment_id": "serial",  # DSMR 0-0:96.1.1 (edge_agent/serial/dsmr.py)
    "manufacturer": "vendor",  # IEC 62056-21 identification message: the manufacturer's three letters
    "identification": "model",  # ... and the rest of it, the meter's type
    "sensor_id": "serial",  # SDS011
    "version": "revision",  # PMS x003
}
MAX_IDENTITY_CHARS = 128


@dataclass(frozen=True)
class Fix:
    """A GPS receiver's latest position (NMEA GGA/RMC with a fix; edge_agent/serial/nmea.py)."""

    lat: float
    lon: float
    alt: float | None  # metres above mean sea level (GGA only)
    time_ns: int  # the sample's time: the receiver's own UTC with a fix


class SerialSource:
    def __init__(self, device: SerialDevice) -> None:
        self.device = device
        self.info: ProtocolInfo = protocol_info(device.protocol)
        settings = self.info.line_settings(device)
        self.stream = SerialStream(device.port, *settings, on_overrun=self._overrun)
        self.measurement = device.measurement or self.info.measurement
        self.stats: Counter[str] = Counter()
        self.last_error = ""
        self._warn = RateLimitedLog(log, interval=300)
        self._stream_offset = 0
        self.identity: dict[str, str] = {}  # see IDENTITY_TAGS
        self.fix: Fix | None = None
        self.last_sample = 0.0  # time.monotonic() of the latest sample, 0 before the first

    def _overrun(self, dropped: int) -> None:
        """The port's receive buffer was full (nobody read it for a long while): the oldest bytes were dropped."""
        self.stats["rejected.overrun"] += 1
        self.stats["overrun_bytes"] += dropped
        self._warn.warning(("overrun", self.device.id), "device %s: %d received byte(s) dropped on %s: the receive "
                           "buffer (%d bytes) was full", self.device.id, dropped, self.device.port,
                           self.stream.max_buffered, device=self.device.id, reason="overrun")

    # -- turning decoder events into readings ------------------------------------------------------------------

    def readings(self, events: list[Event], received_ns: int) -> list[Reading]:
        out = []
        for event in events:
            if isinstance(event, Rejected):
                self.stats[f"rejected.{event.reason}"] += 1
                self._warn.warning(("reject", self.device.id, event.reason),
                                   "device %s: rejected %s at byte offset %d on %s: %s", self.device.id,
                                   event.reason, event.offset, self.device.port, event.detail or "-",
                                   device=self.device.id, reason=event.reason)
                continue
            if not event.fields and not event.quality:
                continue
            self.stats["samples"] += 1
            reading = self._reading(event, received_ns)
            self._learn(event, reading)
            out.append(reading)
        if out:
            self.last_sample = time.monotonic()
        return out

    def _learn(self, sample: Sample, reading: Reading) -> None:
        """What a sample says about the device itself (identity) and, from a GPS receiver, where it is."""
        if "channel" not in sample.tags:
            for tag, name in IDENTITY_TAGS.items():
                value = sample.tags.get(tag)
                if value and name not in self.identity:
                    self.identity[name] = value.strip()[:MAX_IDENTITY_CHARS]
        if self.device.protocol == "nmea":
            lat, lon = sample.fields.get("latitude"), sample.fields.get("longitude")
            if isinstance(lat, float) and isinstance(lon, float):
                alt = sample.fields.get("altitude")  # metres (wire/vocabulary.toml)
                self.fix = Fix(lat, lon, alt if isinstance(alt, float) else None, reading.time_ns)

    def _reading(self, sample: Sample, received_ns: int) -> Reading:
        return Reading(self.device.id, sample.measurement or self.measurement, sample.time_ns or received_ns,
                       dict(sample.fields), {**sample.tags, **self.device.tags}, dict(sample.quality))

    # -- the loop ----------------------------------------------------------------------------------------------

    async def run(self, emit: Callable[[list[Reading]], None]) -> None:
        backoff = 1.0
        while True:
            try:
                await self.stream.open()
            except PortError as exc:
                self.last_error = str(exc)
                self.stats["open_failures"] += 1
                self._warn.warning(("open", self.device.id), "device %s: %s; retrying", self.device.id, exc,
                                   device=self.device.id)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            if self.stats["open_failures"] or self.stats["lost"]:
                log.info("device %s: serial port %s is open again", self.device.id, self.device.port,
                         extra={"device": self.device.id})
            backoff = 1.0
            decoder = self.info.make_decoder(self.device)  # a fresh decoder resynchronises from scratch
            try:
                await self._serve(decoder, emit)
            except PortLost as exc:
                self.last_error = str(exc)
                self.stats["lost"] += 1
                self._warn.warning(("lost", self.device.id), "device %s: %s", self.device.id, exc,
                                   device=self.device.id)
            finally:
                self.stream.close()
            await asyncio.sleep(backoff)

    async def _serve(self, decoder, emit: Callable[[list[Reading]], None]) -> None:
        if self.info.dialogue is not None:
            await self.info.dialogue(self, decoder, emit)
            return
        if self.info.query is not None:
            await self._query_loop(decoder, emit)
            return
        while True:
            data = await self.stream.read()
            self._emit(decoder, data, emit)

    def _emit(self, decoder, data: bytes, emit: Callable[[list[Reading]], None]) -> list[Reading]:
        now = time.time_ns()
        try:
            readings = self.readings(decoder.feed(data), now)
        except Exception:  # a decoder bug costs these bytes, never the source
            log.exception("device %s: decoder error", self.device.id, extra={"device": self.device.id})
            self.stats["decode_errors"] += 1
            return []
        if readings:
            emit(readings)
        return readings

    async def _query_loop(self, decoder, emit: Callable[[list[Reading]], None]) -> None:
        interval = float(self.device.interval)
        while True:
            await asyncio.sleep(max(0.0, next_aligned(time.time(), interval) - time.time()))
            self.stream.write(self.info.query)  # type: ignore[arg-type]
            deadline = time.monotonic() + min(2.0, interval)
            while time.monotonic() < deadline:
                data = await self.stream.read(deadline - time.monotonic())
                if data and self._emit(decoder, data, emit):
                    break
            else:
                self.stats["no_answer"] += 1
                self._warn.warning(("silent", self.device.id), "device %s: no answer to the query on %s",
                                   self.device.id, self.device.port, device=self.device.id)

    async def once(self, timeout: float) -> list[Reading]:
        """Open, take the first complete sample(s) (asking first for query protocols), close: `poll-once`."""
        got: list[Reading] = []
        await self.stream.open()
        try:
            decoder = self.info.make_decoder(self.device)
            task = asyncio.ensure_future(self._serve(decoder, got.extend))
            deadline = time.monotonic() + timeout
            while not got and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, PortLost):
                await task
        finally:
            await self.stream.aclose()
        return got
