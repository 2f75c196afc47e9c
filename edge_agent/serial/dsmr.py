"""DSMR P1 smart meter telegrams (DSMR 2.2, 3.0, 4.x, 5.0, Fluvius e-MUCS) to samples. Pure: bytes in, samples
and rejections out.

Line settings: DSMR 2.2 and 3.0 send at 9600 baud 7E1, every 10 s; DSMR 4.x, 5.0 and e-MUCS at 115200 8N1
(DSMR 4: every 10 s, 5.0 and e-MUCS every second). The decoder does not care: it sees bytes.

Telegram (the meter sends CR LF line ends; LF alone is accepted too):

    /XXX5Identification          header: '/' + the meter's identification
                                 (blank line)
    1-0:1.8.1(001581.123*kWh)    data lines: OBIS code A-B:C.D.E[*F] and one or more (value[*unit]) groups;
    0-1:24.3.0(...)(m3)          a line starting with '(' continues the previous one (DSMR 2.2/3.0 gas)
    (00001.001)
    !6796                        '!' at the start of a line, then (DSMR 4+) the CRC: 4 hex digits, CR LF

CRC (DSMR 4+): CRC-16/ARC (polynomial 0x8005 reflected, initial value 0, no final XOR; `crc16_arc`) over every
byte from '/' to '!' inclusive, sent as hex, most significant digit first. Upper- and lower-case hex digits are
accepted; fewer than 4 digits are accepted when their value matches (some heat-meter gateways, e.g. the NWA
Warmtelink, print the CRC unpadded: `!B9F` for 0x0B9F). A telegram without a CRC is accepted as DSMR 2.2/3.0
unless it shows it is DSMR 4 or later, which always sends one: a version line 1-3:0.2.8, an e-MUCS version
0-0:96.1.4, or a timestamp 0-0:1.0.0 (introduced by DSMR 4.0). `DsmrDecoder(require_crc=True)` rejects every
telegram without a CRC (the safe choice when the meter is known to be DSMR 4+).

Framing: a '/' always starts a telegram (the characters '/' and '!' are reserved for the start and end and
never occur in values). Everything outside telegrams is garbage, except CR and LF. After the '!' come at most 4
hex digits, a CR and an LF; the first byte that does not fit ends the telegram and is looked at again (as the
start of garbage or of the next telegram), so a telegram without its line end still decodes, and the result
never depends on how the bytes were split into reads. The buffer holds one telegram, at most `max_buffer` bytes
(default 8192; a telegram is at most about 2 KB).

Rejections (`Rejected.reason`, stable; offset = the stream offset of the '/' or of the first garbage byte):
- "crc": the CRC does not match; or no CRC on a telegram that must have one (see above);
- "garbage": bytes outside telegrams, one rejection per run (at most `max_buffer` bytes each; trailing CR/LF of
  a run are not counted in its length), reported when the next telegram starts or at `flush`;
- "truncated": a new '/' before the '!' (bytes were lost: the partial telegram is dropped, the new one read);
- "too_long": no '!' within `max_buffer` - 5 bytes (5: room for the CRC and its CR); what follows, up to the
  next '/', is garbage;
- "malformed": the CRC is fine (or absent in a DSMR 2.2/3.0 telegram) but the telegram is not: the '!' is not at
  the start of a line, the identification line is empty or not printable ASCII, or there is no data line;
- "incomplete": at `flush`, a telegram without its '!'.

Samples, per telegram, in this order:
- the electricity meter's, `measurement` None (the device's, "electricity" by default): the fields of
  `obis.ELECTRICITY` with their units (see there and docs/serial.md); tags dsmr_version, emucs_version,
  equipment_id (values as sent; for each tag the first line that gives it wins); `time_ns` from the telegram's
  timestamp 0-0:1.0.0. It is left out when it would have no field and no quality (a heat-meter gateway's
  telegram carries only identification);
- one per M-Bus sub-meter channel n (0-n:...), measurement by the M-Bus device type 0-n:24.1.0 as the M-Bus
  decoder names them (3 gas, 6/7/21/22 water, 4/12/13 heat, 10/11 cooling, anything else or none "meter"); tags
  channel, device_type (the type as sent) and equipment_id (0-n:96.1.0, e-MUCS 0-n:96.1.1); `time_ns` = the
  reading's capture time; the field named by what the reading is (the shared vocabulary): `volume` in m³, `energy`
  in kWh (heat meters' GJ converted: 1 GJ = 277.78 kWh) (0-n:24.2.1, and DSMR 2.2/3.0 0-n:24.3.0 with the value on
  the next line), `volume_uncorrected` (e-MUCS 0-n:24.2.3, gas not temperature corrected); valve_position
  (0-n:24.4.0). A reading whose capture time is empty or before 2001 is the meter's "no device /
  never read" placeholder (the Iskra AM550 sends `(700101010000W)(00000000)`): no sample, counted in
  `stats["mbus_no_reading"]`. Readings of one channel with different capture times become separate samples.

Values: numbers become floats in the vocabulary's unit of the field (wire/vocabulary.toml: kWh, W, kvarh, var, V,
A, Hz, m³; converted from Wh, kW, varh, kvar, GJ, MJ, dm3 in decimal); counts and states (tariff, failures, sags,
swells, breaker and valve state) become ints; an empty value `()` is left out with quality "not_available"; a
value that does not parse, has no unit or the unit of another quantity, or an int with a unit, is left out with
quality "malformed" under the field's name: never a made-up number. A timestamp that does not parse leaves
`time_ns` None (the gateway's clock) with quality {"timestamp": "malformed"}; a timestamp before 2001 gives
{"timestamp": "not_available"}.

Times: DSMR timestamps YYMMDDhhmmssX are Dutch/Belgian local time (CET/CEST), X = S (summer, UTC+2) or W
(winter, UTC+1); they become UTC by subtracting 2 or 1 hours, so the repeated hour in October is unambiguous.
Two-digit years 00-69 are 2000-2069, 70-99 are 1970-1999. Without X (DSMR 2.2/3.0 capture times) the EU rule
decides (summer time from 01:00 UTC on the last Sunday of March to 01:00 UTC on the last Sunday of October);
the repeated October hour is taken as summer time (its first occurrence), a time in the skipped March hour as
winter time.

Not errors, not fields: OBIS codes not in the map (counted by code in `DsmrDecoder.unknown`, at most 64 codes,
then "other"; the total in `stats["unknown_lines"]`), lines that are not `code(value)...` at all
(`stats["malformed_lines"]`), and the codes the map lists as known but not reported (power failure log,
monthly histories, text messages). `stats["telegrams"]` counts decoded telegrams.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from edge_agent.serial import obis
from edge_agent.serial.base import Event, Rejected, Sample
from wire.schema import FieldValue

MAX_BUFFER = 8192
MIN_BUFFER = 64
_TAIL_RESERVE = 5  # after the '!': up to 4 CRC digits and a CR
_MAX_UNKNOWN_CODES = 64
_NOT_BEFORE_S = 978_307_200  # 2001-01-01T00:00:00Z: earlier device times are placeholders

_HUNT, _BODY, _TAIL = 0, 1, 2
_SLASH, _CR, _LF = 0x2F, 0x0D, 0x0A
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_DECLARES_DSMR4 = ("1-3:0.2.8(", "0-0:96.1.4(", "0-0:1.0.0(")

_CODE = re.compile(r"(\d{1,3})-(\d{1,3}):(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:\*(\d{1,3}))?")
_GROUPS = re.compile(r"(?:\([^()]*\))+")
_GROUP = re.compile(r"\(([^()]*)\)")
_NUMBER = re.compile(r"-?\d{1,20}(?:\.\d{1,20})?")
_INT = re.compile(r"\d{1,18}")
_PRINTABLE = re.compile(r"[\x20-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})([SW]?)")


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_arc(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-16/ARC (the DSMR P1 CRC): polynomial 0x8005 reflected (0xA001), initial 0, no final XOR.
    `crc` continues a previous call's result. crc16_arc(b"123456789") == 0xBB3D."""
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


# -- time ---------------------------------------------------------------------------------------------------------


def _last_sunday_1h_utc(year: int, month: int) -> datetime:
    """01:00 UTC on the last Sunday of March or October (both have 31 days)."""
    last = datetime(year, month, 31, 1, tzinfo=UTC)
    return last - timedelta(days=(last.weekday() + 1) % 7)


def eu_summer_time(utc: datetime) -> bool:
    """Whether EU summer time (CEST) is in force at this UTC instant (the rule since 1996)."""
    return _last_sunday_1h_utc(utc.year, 3) <= utc < _last_sunday_1h_utc(utc.year, 10)


def timestamp_ns(text: str) -> int:
    """A DSMR timestamp YYMMDDhhmmss[S|W] (Dutch/Belgian local time) -> nanoseconds since the epoch, UTC.
    Raises ValueError when it does not parse or names an impossible date or time."""
    m = _TIMESTAMP.fullmatch(text)
    if not m:
        raise ValueError(f"timestamp {text[:20]!r} is not YYMMDDhhmmss[S|W]")
    yy, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    local = datetime(2000 + yy if yy < 70 else 1900 + yy, mo, d, h, mi, s, tzinfo=UTC)  # "local", as if UTC
    flag = m[7]
    if flag == "S":
        utc = local - timedelta(hours=2)
    elif flag == "W":
        utc = local - timedelta(hours=1)
    else:
        summer = local - timedelta(hours=2)
        utc = summer if eu_summer_time(summer) else local - timedelta(hours=1)
    return int(utc.timestamp()) * 1_000_000_000


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- values -------------------------------------------------------------------------------------------------------


def _number(value: str) -> tuple[str, str] | None:
    """'001581.123*kWh' -> ('001581.123', 'kWh'); None when the number does not parse."""
    number, _, unit = value.partition("*")
    return (number, unit) if _NUMBER.fullmatch(number) else None


def _scaled(number: str, factor: Decimal) -> float:
    """The number times the factor into the vocabulary's unit, computed in decimal (0.123 kW is exactly 123 W)."""
    return float(Decimal(number) * factor) if factor != 1 else float(number)


def _canonical(unit: str) -> tuple[str, Decimal] | None:
    return ("", Decimal(1)) if unit == "" else obis.UNITS.get(unit)


@dataclass
class _Channel:
    device_type: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    fields: dict[str, FieldValue] = field(default_factory=dict)
    quality: dict[str, str] = field(default_factory=dict)
    # (capture time, field name, value or None, unit, quality)
    readings: list[tuple[int, str, float | None, str, dict[str, str]]] = field(default_factory=list)


class _Malformed(Exception):
    pass


class DsmrDecoder:
    """A `StreamDecoder` for DSMR P1 (see the module docstring for what it accepts and why it rejects)."""

    def __init__(self, max_buffer: int = MAX_BUFFER, require_crc: bool = False) -> None:
        if max_buffer < MIN_BUFFER:
            raise ValueError(f"max_buffer must be at least {MIN_BUFFER}")
        self.max_buffer = max_buffer
        self.require_crc = require_crc
        self.unknown: Counter[str] = Counter()  # OBIS codes not in the map, by code
        self.stats: Counter[str] = Counter()  # telegrams, unknown_lines, malformed_lines, mbus_no_reading
        self._offset = 0  # stream offset of the next byte fed
        self._state = _HUNT
        self._buf = bytearray()  # the telegram from its '/', with the '!' and the CRC digits (not the CR)
        self._start = 0
        self._digits = 0
        self._cr = False
        self._junk_start = 0
        self._junk_span = 0  # bytes in the current garbage run
        self._junk_len = 0  # ... up to its last byte that is not CR/LF

    @property
    def buffered(self) -> int:
        """Bytes held (a telegram being received); never more than max_buffer."""
        return len(self._buf)

    # -- framing ---------------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        base = self._offset
        self._offset += len(data)
        pos, n = 0, len(data)
        buf = self._buf
        body_limit = self.max_buffer - _TAIL_RESERVE
        while pos < n:
            if self._state == _HUNT:
                start = data.find(b"/", pos)
                end = n if start < 0 else start
                if end > pos:
                    self._junk(data, pos, end, base, events)
                if start < 0:
                    break
                self._end_junk(events)
                self._start = base + start
                buf.append(_SLASH)
                self._state = _BODY
                pos = start + 1
            elif self._state == _BODY:
                room = body_limit - len(buf)
                if room <= 0:
                    events.append(Rejected(self._start, "too_long", f"no '!' within {body_limit} bytes", len(buf)))
                    buf.clear()
                    self._state = _HUNT
                    continue
                stop = min(n, pos + room)
                bang = data.find(b"!", pos, stop)
                slash = data.find(b"/", pos, stop if bang < 0 else bang)
                if slash >= 0:
                    buf += data[pos:slash]
                    events.append(Rejected(self._start, "truncated", "a new '/' before the '!'", len(buf)))
                    buf.clear()
                    self._state = _HUNT
                    pos = slash
                elif bang < 0:
                    buf += data[pos:stop]
                    pos = stop
                else:
                    buf += data[pos:bang + 1]
                    pos = bang + 1
                    self._state, self._digits, self._cr = _TAIL, 0, False
            else:
                byte = data[pos]
                if byte in _HEX and self._digits < 4 and not self._cr:
                    buf.append(byte)
                    self._digits += 1
                    pos += 1
                elif byte == _CR and not self._cr:
                    self._cr = True
                    pos += 1
                elif byte == _LF:
                    pos += 1
                    events += self._complete(1)
                else:  # does not belong to the tail: ends the telegram, looked at again while hunting
                    events += self._complete(0)
        return events

    def flush(self) -> list[Event]:
        events: list[Event] = []
        if self._state == _BODY:
            events.append(Rejected(self._start, "incomplete", "the stream ended inside a telegram", len(self._buf)))
            self._buf.clear()
        elif self._state == _TAIL:
            events += self._complete(0)
        self._state = _HUNT
        self._end_junk(events)
        return events

    def _junk(self, data: bytes, pos: int, end: int, base: int, events: list[Event]) -> None:
        """Bytes outside telegrams, gathered into runs of at most max_buffer (the same runs however split)."""
        while pos < end:
            if self._junk_span == 0:
                while pos < end and data[pos] in (_CR, _LF):  # line ends between telegrams are no garbage
                    pos += 1
                if pos == end:
                    return
                self._junk_start = base + pos
            take = min(end - pos, self.max_buffer - self._junk_span)
            kept = len(data[pos:pos + take].rstrip(b"\r\n"))
            if kept:
                self._junk_len = self._junk_span + kept
            self._junk_span += take
            pos += take
            if self._junk_span >= self.max_buffer:
                self._end_junk(events)

    def _end_junk(self, events: list[Event]) -> None:
        if self._junk_span:
            events.append(Rejected(self._junk_start, "garbage", "bytes outside telegrams", self._junk_len))
        self._junk_span = self._junk_len = 0

    def _complete(self, lf: int) -> list[Event]:
        frame = bytes(self._buf)
        self._buf.clear()
        self._state = _HUNT
        return self._telegram(frame, self._digits, self._start, len(frame) + self._cr + lf)

    # -- one telegram ----------------------------------------------------------------------------------------------

    def _telegram(self, frame: bytes, digits: int, offset: int, length: int) -> list[Event]:
        """`frame`: from '/' through '!' and the CRC digits."""
        bang = len(frame) - digits - 1
        if digits:
            given = frame[bang + 1:].decode("ascii").upper()
            computed = crc16_arc(memoryview(frame)[:bang + 1])
            if int(given, 16) != computed:
                return [Rejected(offset, "crc", f"says {given}, computed {computed:04X}", length)]
        text = frame[1:bang].decode("latin-1")
        if not digits:
            if self.require_crc:
                return [Rejected(offset, "crc", "no CRC (require_crc is set)", length)]
            declared = next((code for code in _DECLARES_DSMR4 if code in text), None)
            if declared:
                return [Rejected(offset, "crc", f"no CRC on a DSMR 4+ telegram (it has {declared[:-1]})", length)]
        try:
            samples = self._parse(text)
        except _Malformed as exc:
            return [Rejected(offset, "malformed", str(exc), length)]
        self.stats["telegrams"] += 1
        return samples

    def _parse(self, text: str) -> list[Event]:
        if not text.endswith("\n"):
            raise _Malformed("the '!' is not at the start of a line")
        header, _, rest = text.partition("\n")
        header = header.removesuffix("\r")
        if not _PRINTABLE.fullmatch(header):
            raise _Malformed("the identification line is empty or not printable ASCII")
        lines: list[str] = []
        for raw in rest.split("\n"):
            line = raw.removesuffix("\r")
            if not line:
                continue
            if line.startswith("(") and lines:
                lines[-1] += line  # a value continued on the next line (DSMR 2.2/3.0 gas)
            else:
                lines.append(line)
        if not lines:
            raise _Malformed("no data lines")

        out = _Electricity()
        channels: dict[int, _Channel] = {}
        for line in lines:
            m = _CODE.match(line)
            if not m:
                self.stats["malformed_lines"] += 1
                continue
            a, b, c, d, e = (int(g) for g in m.groups()[:5])
            f = None if m[6] is None or int(m[6]) == 255 else int(m[6])  # F = 255: "not used"
            code = f"{a}-{b}:{c}.{d}.{e}" + ("" if f is None else f"*{f}")
            tail = line[m.end():]
            values = _GROUP.findall(tail) if _GROUPS.fullmatch(tail) else None
            entry = obis.ELECTRICITY.get(code)
            if entry is not None:
                out.add(entry, values)
                continue
            if a == 0 and b >= 1 and f is None and self._mbus(channels, b, f"{c}.{d}.{e}", values):
                continue
            self.stats["unknown_lines"] += 1
            if code not in self.unknown and len(self.unknown) >= _MAX_UNKNOWN_CODES:
                code = "other"
            self.unknown[code] += 1
        events: list[Event] = []
        if out.fields or out.quality:
            events.append(Sample(out.fields, None, out.time_ns, out.tags, out.quality, out.units))
        for number in sorted(channels):
            events += _channel_samples(number, channels[number])
        return events

    def _mbus(self, channels: dict[int, _Channel], number: int, cde: str, values: list[str] | None) -> bool:
        """One line of M-Bus channel `number`; False when the code is not an M-Bus one we know."""
        known = cde in (obis.MBUS_DEVICE_TYPE, obis.MBUS_VALVE) or cde in obis.MBUS_EQUIPMENT_ID \
            or cde in obis.MBUS_READINGS
        if not known:
            return False
        ch = channels.setdefault(number, _Channel())
        if cde == obis.MBUS_DEVICE_TYPE:
            if values is not None and len(values) == 1 and _INT.fullmatch(values[0]):
                ch.device_type = int(values[0])
            else:
                ch.quality["device_type"] = "malformed"
        elif cde in obis.MBUS_EQUIPMENT_ID:
            if values is not None and len(values) == 1 and (not values[0] or _PRINTABLE.fullmatch(values[0])):
                if values[0]:
                    ch.tags.setdefault("equipment_id", values[0])
            else:
                ch.quality["equipment_id"] = "malformed"
        elif cde == obis.MBUS_VALVE:
            _set_int(values, "valve_position", ch.fields, ch.quality)
        else:
            self._reading(ch, cde, values)
        return True

    def _reading(self, ch: _Channel, cde: str, values: list[str] | None) -> None:
        infix = obis.MBUS_READINGS[cde]
        if cde == "24.3.0":  # (time)(status)(interval)(count)(obis)(unit) then (value) on the next line
            if values is None or len(values) != 7:
                ch.quality["value"] = "malformed"
                return
            when, value, unit = values[0], values[6], values[5]
            if "*" in value:
                value, _, unit = value.partition("*")
        else:
            if values is None or len(values) != 2:
                ch.quality["value"] = "malformed"
                return
            when, (value, _, unit) = values[0], values[1].partition("*")
        if not when:
            self.stats["mbus_no_reading"] += 1
            return
        try:
            time_ns = timestamp_ns(when)
        except ValueError:
            ch.quality["capture_time"] = "malformed"
            return
        if time_ns < _NOT_BEFORE_S * 1_000_000_000:
            self.stats["mbus_no_reading"] += 1
            return
        canonical = _canonical(unit)
        quantity = obis.MBUS_QUANTITY.get(canonical[0]) if canonical else None
        if canonical is None or quantity is None or not _NUMBER.fullmatch(value):
            ch.readings.append((time_ns, "", None, "", {"value": "malformed"}))
            return
        name = f"{quantity}{infix}"
        ch.readings.append((time_ns, name, _scaled(value, canonical[1]), canonical[0], {}))


class _Electricity:
    """The electricity meter's sample being built."""

    def __init__(self) -> None:
        self.fields: dict[str, FieldValue] = {}
        self.units: dict[str, str] = {}
        self.quality: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.time_ns: int | None = None

    def add(self, entry: obis.Obis, values: list[str] | None) -> None:
        kind = entry.kind
        if kind == "skip":
            return
        if kind == "max_demand":
            if values is None or len(values) != 2:
                self.quality[entry.name] = "malformed"
                return
            self._float(entry, values[1])
            time_name = entry.name + "_time"
            try:
                when = timestamp_ns(values[0])
            except ValueError:
                self.quality[time_name] = "malformed" if values[0] else "not_available"
                return
            if when < _NOT_BEFORE_S * 1_000_000_000:
                self.quality[time_name] = "not_available"
            else:
                self.fields[time_name] = _iso(when)
            return
        if values is None or len(values) != 1:
            self.quality[entry.name or "timestamp"] = "malformed"
            return
        value = values[0]
        if kind == "float":
            self._float(entry, value)
        elif kind == "int":
            _set_int(values, entry.name, self.fields, self.quality)
        elif kind == "tag":
            if _PRINTABLE.fullmatch(value):
                self.tags.setdefault(entry.name, value)
            elif value:
                self.quality[entry.name] = "malformed"
        elif kind == "timestamp":
            try:
                when = timestamp_ns(value)
            except ValueError:
                self.quality["timestamp"] = "malformed" if value else "not_available"
                return
            if when < _NOT_BEFORE_S * 1_000_000_000:
                self.quality["timestamp"] = "not_available"
            else:
                self.time_ns = when

    def _float(self, entry: obis.Obis, value: str) -> None:
        if not value:
            self.quality[entry.name] = "not_available"
            return
        parsed = _number(value)
        canonical = _canonical(parsed[1]) if parsed else None
        if parsed is None or canonical is None:
            self.quality[entry.name] = "malformed"
            return
        unit, factor = canonical
        if unit == entry.unit:
            name = entry.name
        elif entry.alternative and unit == entry.alternative[0]:
            name = entry.alternative[1]
        else:
            self.quality[entry.name] = "malformed"
            return
        self.fields[name] = _scaled(parsed[0], factor)
        if unit:
            self.units[name] = unit


def _set_int(values: list[str] | None, name: str, fields: dict[str, FieldValue], quality: dict[str, str]) -> None:
    if values is None or len(values) != 1:
        quality[name] = "malformed"
    elif not values[0]:
        quality[name] = "not_available"
    elif _INT.fullmatch(values[0]):
        fields[name] = int(values[0])
    else:
        quality[name] = "malformed"


def _channel_samples(number: int, ch: _Channel) -> list[Event]:
    measurement = obis.MBUS_MEASUREMENT.get(ch.device_type, obis.MBUS_OTHER) if ch.device_type is not None \
        else obis.MBUS_OTHER
    tags = {"channel": str(number), **ch.tags}
    if ch.device_type is not None:  # which of the types a measurement gathers (warm or cold water, heat inlet ...)
        tags["device_type"] = str(ch.device_type)
    samples: list[Event] = []
    by_time: dict[int, tuple[dict[str, FieldValue], dict[str, str], dict[str, str]]] = {}
    for time_ns, name, value, unit, quality in ch.readings:
        fields, units, flags = by_time.setdefault(time_ns, ({}, {}, {}))
        if value is not None:
            fields[name] = value
            units[name] = unit
        flags.update(quality)
    extra_given = False
    for time_ns, (fields, units, flags) in by_time.items():
        if not extra_given:
            fields.update(ch.fields)
            flags.update(ch.quality)
            extra_given = True
        samples.append(Sample(fields, measurement, time_ns, dict(tags), flags, units))
    if not extra_given and (ch.fields or ch.quality):
        samples.append(Sample(dict(ch.fields), measurement, None, dict(tags), dict(ch.quality), {}))
    return samples
