"""NMEA 0183 from a GPS receiver: GGA and RMC sentences to samples. Pure: bytes in, samples and rejections out.

Framing. A sentence starts with '$' (or '!', the encapsulation sentences such as AIS) and ends at the first CR or
LF (CR LF is the standard; LF alone and CR alone are accepted, the LF that follows a CR is just a blank). It
carries `*hh`, two hex digits: the XOR of every byte between the start character and the '*'. Hex digits in
lower case are accepted.

Rejections (`Rejected.reason`, stable):
- "checksum": the checksum does not match, or the checksum field is not exactly two hex digits (`*3B4`);
- "no_checksum": no `*hh` at all. NMEA 0183 since version 2.0 requires it on every sentence, and a position
  without one cannot be told from a corrupted one, so it is rejected unless the sentence type is listed in
  `NmeaDecoder(accept_without_checksum=...)` (empty by default: no receiver we support omits it);
- "too_long": no line end within `max_sentence` bytes. The standard's limit is 82 characters, but some receivers
  emit longer (proprietary, u-blox PUBX,03); those are accepted up to `max_sentence` (1024);
- "truncated": a new '$' or '!' before the line end (the receiver or the UART dropped bytes; both characters
  are reserved and never occur inside a sentence);
- "malformed": checksum fine, content not (non-ASCII, empty address, GGA/RMC with a bad number, a coordinate
  not in ddmm.mmm / dddmm.mmm form, a hemisphere other than N/S/E/W, an impossible time or date);
- "garbage": bytes outside sentences (other than CR and LF), one rejection per run (at most `max_sentence`
  bytes each), reported when the next sentence starts or at `flush`;
- "incomplete": at `flush`, a sentence without its line end and without a complete `*hh` (a capture file's
  last sentence that has its checksum but no line end is decoded).

Sentences. Only GGA and RMC (any talker: GP, GN, GL, GA, GB, BD, ...) produce samples (measurement "gps", tag
`talker`). Every other valid sentence (GSV, GSA, VTG, proprietary $P..., AIS !..) is ignored and counted in
`NmeaDecoder.ignored` by type, not rejected.

- GGA: fix_quality (0 = none, 1 = GPS, 2 = DGPS, 4 = RTK fixed, 5 = RTK float, 6 = estimated, ...),
  satellites (in use), hdop, latitude, longitude (signed decimal degrees, north/east positive), altitude (m above
  mean sea level), geoid_separation (m), dgps_age (s) and dgps_station when present.
- RMC: status ("A" valid, "V" warning), mode (NMEA 2.3+: A autonomous, D differential, E estimated, N not
  valid, ...), latitude, longitude, speed (m/s, from knots, 1 kn = 1852/3600 m/s), course (°, true),
  magnetic_variation (°, east positive) when present. RMC's status and mode are the fields fix_status and fix_mode.
  Names and units are the shared vocabulary's (wire/vocabulary.toml).

No fix (GGA quality 0; RMC status other than "A" or mode "N"): the position fields are left out, even when the
receiver repeats a stale position, and `quality` says "no_fix" for them; a coordinate is never 0.0 for "none".
With a fix, an expected field the receiver left empty is left out with quality "not_available".

Time. RMC carries date and time: with a fix, that is the sample's `time_ns` (UTC; two-digit years are 1980-2079).
GGA carries only the time of day: with a fix, it is dated from the last valid RMC when the two are within 10
minutes of each other (so a receiver emitting both stamps both with the same instant and they merge into one
point); otherwise `time_ns` is None and the gateway stamps the sample. Without a fix the receiver's clock is not
trusted (it may be a cold RTC) and `time_ns` is None.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection

from edge_agent.serial.base import Event, JunkRun, Rejected, Sample
from wire.schema import FieldValue

MEASUREMENT = "gps"
MAX_SENTENCE = 1024
KNOT_M_S = 1852.0 / 3600.0
#: {field: unit} of every field GGA and RMC give (the data catalogue, docs/catalog.md; tests/test_catalog.py checks
#: it against what the captures decode to)
FIELDS: dict[str, str] = {
    "fix_quality": "", "satellites": "", "hdop": "", "latitude": "°", "longitude": "°", "altitude": "m",
    "geoid_separation": "m", "dgps_age": "s", "dgps_station": "", "fix_status": "", "fix_mode": "", "speed": "m/s",
    "course": "°", "magnetic_variation": "°",
}
_MAX_IGNORED_KINDS = 64

_START = b"$!"
_BREAKS = frozenset(b"\r\n$!")
_BLANK = b"\r\n"
_HEX2 = re.compile(rb"[0-9A-Fa-f]{2}")
_LAT = re.compile(r"(\d{2})(\d{2}(?:\.\d*)?)")
_LON = re.compile(r"(\d{3})(\d{2}(?:\.\d*)?)")
_TIME = re.compile(r"(\d{2})(\d{2})(\d{2})(?:\.(\d{1,9}))?")
_DATE = re.compile(r"(\d{2})(\d{2})(\d{2})")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_INT = re.compile(r"\d+")
_ADDRESS = re.compile(r"[A-Z0-9]{1,15}")


class _Malformed(Exception):
    pass


def checksum(body: bytes) -> int:
    """XOR of the bytes between the start character and '*'."""
    value = 0
    for byte in body:
        value ^= byte
    return value


class NmeaDecoder:
    """A `StreamDecoder` for NMEA 0183 (see the module docstring for what it accepts and why it rejects)."""

    def __init__(self, max_sentence: int = MAX_SENTENCE, accept_without_checksum: Collection[str] = ()) -> None:
        if max_sentence < 82:
            raise ValueError("max_sentence must be at least 82 (the standard's sentence length)")
        self.max_sentence = max_sentence
        self.max_buffer = max_sentence
        self.accept_without_checksum = frozenset(accept_without_checksum)
        self.ignored: Counter[str] = Counter()  # valid sentences of other types, by type ("GSV", "PUBX", ...)
        self._offset = 0  # stream offset of the next byte fed
        self._buf = bytearray()  # the sentence being received, from its '$' / '!'; empty while hunting
        self._start = 0
        self._junk = JunkRun(self.max_sentence, "bytes outside NMEA sentences", _BLANK)
        self._rmc_instant_ns: int | None = None  # the last valid RMC's date and time

    # -- framing ---------------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        base = self._offset
        self._offset += len(data)
        pos, n = 0, len(data)
        buf = self._buf
        while pos < n:
            if not buf:
                start = _find_any(data, _START, pos)
                end = n if start < 0 else start
                if end > pos:
                    self._junk.add(data, pos, end, base, events)
                if start < 0:
                    break
                self._junk.end(events)
                self._start = base + start
                buf.append(data[start])
                pos = start + 1
                continue
            if len(buf) >= self.max_sentence:  # full: only a line end may follow
                if data[pos] in _BLANK:
                    events += self._sentence(bytes(buf), self._start)
                    pos += 1
                else:
                    events.append(Rejected(self._start, "too_long", f"no line end within {self.max_sentence} bytes",
                                           len(buf)))
                buf.clear()
                continue
            stop = min(n, pos + self.max_sentence - len(buf))
            brk = _find_any(data, b"\r\n$!", pos, stop)
            if brk < 0:
                buf += data[pos:stop]
                pos = stop
                continue
            buf += data[pos:brk]
            if data[brk] in _BLANK:
                events += self._sentence(bytes(buf), self._start)
                pos = brk + 1
            else:
                events.append(Rejected(self._start, "truncated", f"a new {chr(data[brk])!r} before the line end",
                                       len(buf)))
                pos = brk
            buf.clear()
        return events

    def flush(self) -> list[Event]:
        events: list[Event] = []
        if self._buf:
            line = bytes(self._buf)
            star = line.rfind(b"*")
            if star >= 0 and _HEX2.fullmatch(line, star + 1):
                events += self._sentence(line, self._start)  # a capture's last line without its line end
            else:
                events.append(Rejected(self._start, "incomplete", "the stream ended inside a sentence", len(line)))
            self._buf.clear()
        self._junk.end(events)
        return events


    # -- one sentence ----------------------------------------------------------------------------------------------

    def _sentence(self, line: bytes, offset: int) -> list[Event]:
        """`line`: from the start character, without the line end."""
        if not line.rstrip(b" \t")[1:]:
            return [Rejected(offset, "malformed", "empty sentence", len(line))]
        star = line.rfind(b"*")
        if star < 0:
            kind = _kind(line)
            if kind not in self.accept_without_checksum:
                return [Rejected(offset, "no_checksum", f"{_show(line[:12])} has no *hh checksum", len(line))]
            body = line[1:]
        else:
            given = line[star + 1:]
            if not _HEX2.fullmatch(given):
                return [Rejected(offset, "checksum", f"checksum field {_show(given)} is not two hex digits",
                                 len(line))]
            body = line[1:star]
            computed = checksum(body)
            if computed != int(given, 16):
                return [Rejected(offset, "checksum", f"says {given.decode().upper()}, computed {computed:02X}",
                                 len(line))]
        try:
            text = body.decode("ascii")
            if not text.isprintable():
                raise _Malformed("control characters in the sentence")
            fields = text.split(",")
            address = fields[0]
            if not _ADDRESS.fullmatch(address):
                raise _Malformed(f"bad address {address[:16]!r}")
            if line[0] == ord("$") and address[0] != "P" and len(address) == 5:
                talker, kind = address[:2], address[2:]
                if kind == "GGA":
                    return [self._gga(fields, talker)]
                if kind == "RMC":
                    return [self._rmc(fields, talker)]
            else:
                kind = address
        except _Malformed as exc:
            return [Rejected(offset, "malformed", str(exc), len(line))]
        if kind not in self.ignored and len(self.ignored) >= _MAX_IGNORED_KINDS:
            kind = "other"
        self.ignored[kind] += 1
        return []

    def _gga(self, f: list[str], talker: str) -> Sample:
        f = _pad(f, 15, 7, "GGA")
        quality = _int(f[6], "fix quality")
        if quality is None:
            raise _Malformed("GGA without a fix quality")
        fields: dict[str, FieldValue] = {"fix_quality": quality}
        flags: dict[str, str] = {}
        units: dict[str, str] = {}
        sats = _int(f[7], "satellites")
        if sats is not None:
            fields["satellites"] = sats
        tod_ns = _time_of_day(f[1])
        time_ns = None
        if quality == 0:
            for name in ("latitude", "longitude", "altitude"):
                flags[name] = "no_fix"
        else:
            _position(f[2], f[3], f[4], f[5], fields, flags, units)
            _number(f[8], "hdop", fields, flags, units, "")
            if f[10] not in ("M", ""):
                raise _Malformed(f"altitude unit {f[10]!r}, expected M")
            _number(f[9], "altitude", fields, flags, units, "m")
            if f[11]:
                _number(f[11], "geoid_separation", fields, flags, units, "m")
            if f[13]:
                _number(f[13], "dgps_age", fields, flags, units, "s")
            if f[14]:
                fields["dgps_station"] = f[14]
            if tod_ns is not None and self._rmc_instant_ns is not None:
                time_ns = _near_day(tod_ns, self._rmc_instant_ns)
        return Sample(fields, MEASUREMENT, time_ns, {"talker": talker}, flags, units)

    def _rmc(self, f: list[str], talker: str) -> Sample:
        f = _pad(f, 13, 3, "RMC")
        status, mode = f[2], f[12]
        if status not in ("A", "V", "") or len(mode) > 1:
            raise _Malformed(f"RMC status {status!r} / mode {mode!r}")
        fields: dict[str, FieldValue] = {}
        if status:
            fields["fix_status"] = status
        if mode:
            fields["fix_mode"] = mode
        flags: dict[str, str] = {}
        units: dict[str, str] = {}
        tod_ns = _time_of_day(f[1])
        day = _date(f[9])
        time_ns = None
        if status != "A" or mode == "N":
            for name in ("latitude", "longitude", "speed", "course"):
                flags[name] = "no_fix"
        else:
            _position(f[3], f[4], f[5], f[6], fields, flags, units)
            knots = _float(f[7], "speed")
            if knots is None:
                flags["speed"] = "not_available"
            else:
                fields["speed"] = knots * KNOT_M_S
                units["speed"] = "m/s"
            _number(f[8], "course", fields, flags, units, "°")
            variation = _float(f[10], "magnetic variation")
            if variation is not None and f[11] in ("E", "W"):
                fields["magnetic_variation"] = -variation if f[11] == "W" else variation
                units["magnetic_variation"] = "°"
            if tod_ns is not None and day is not None:
                time_ns = day * 86_400_000_000_000 + tod_ns
                self._rmc_instant_ns = time_ns
        return Sample(fields, MEASUREMENT, time_ns, {"talker": talker}, flags, units)


# -- field parsing -----------------------------------------------------------------------------------------------


def _find_any(data: bytes, chars: bytes, start: int, stop: int | None = None) -> int:
    """The index of the first byte of `chars` in data[start:stop], or -1."""
    best = -1
    for ch in chars:
        i = data.find(ch, start, stop if best < 0 else best)
        if i >= 0:
            best = i
    return best


def _show(raw: bytes) -> str:
    return repr(raw.decode("ascii", "replace"))


def _kind(line: bytes) -> str:
    address = line[1:].split(b",", 1)[0].decode("ascii", "replace")
    return address[2:] if len(address) == 5 and not address.startswith("P") else address


def _pad(f: list[str], size: int, required: int, kind: str) -> list[str]:
    if len(f) < required:
        raise _Malformed(f"{kind} with {len(f) - 1} fields")
    return f + [""] * (size - len(f)) if len(f) < size else f


def _int(text: str, what: str) -> int | None:
    if not text:
        return None
    if not _INT.fullmatch(text):
        raise _Malformed(f"{what} {text[:16]!r} is not a whole number")
    return int(text)


def _float(text: str, what: str) -> float | None:
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        raise _Malformed(f"{what} {text[:16]!r} is not a number")
    return float(text)


def _number(text: str, name: str, fields: dict, flags: dict, units: dict, unit: str) -> None:
    value = _float(text, name)
    if value is None:
        flags[name] = "not_available"
        return
    fields[name] = value
    if unit:
        units[name] = unit


def _position(lat: str, ns: str, lon: str, ew: str, fields: dict, flags: dict, units: dict) -> None:
    if not lat or not lon:
        flags["latitude"] = flags["longitude"] = "not_available"
        return
    fields["latitude"] = _coordinate(lat, ns, _LAT, 90, "NS")
    fields["longitude"] = _coordinate(lon, ew, _LON, 180, "EW")
    units["latitude"] = units["longitude"] = "°"


def _coordinate(text: str, hemisphere: str, pattern: re.Pattern[str], limit: int, sides: str) -> float:
    m = pattern.fullmatch(text)
    if not m:
        raise _Malformed(f"coordinate {text[:16]!r} is not in {'ddmm' if limit == 90 else 'dddmm'}.mmm form")
    if hemisphere not in sides or len(hemisphere) != 1:
        raise _Malformed(f"hemisphere {hemisphere[:4]!r}, expected {sides[0]} or {sides[1]}")
    degrees, minutes = int(m[1]), float(m[2])
    value = degrees + minutes / 60.0
    if minutes >= 60 or value > limit:
        raise _Malformed(f"coordinate {text!r} out of range")
    return -value if hemisphere == sides[1] else value


def _time_of_day(text: str) -> int | None:
    """hhmmss[.s...] -> nanoseconds since midnight; None when empty."""
    if not text:
        return None
    m = _TIME.fullmatch(text)
    if not m:
        raise _Malformed(f"time {text[:16]!r} is not hhmmss.ss")
    h, mi, s = int(m[1]), int(m[2]), int(m[3])
    if h > 23 or mi > 59 or s > 60:  # 60: a leap second
        raise _Malformed(f"time {text!r} out of range")
    frac = int((m[4] or "").ljust(9, "0"))
    return ((h * 60 + mi) * 60 + s) * 1_000_000_000 + frac


_DAYS_BEFORE_MONTH = (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)


def _date(text: str) -> int | None:
    """ddmmyy -> days since 1970-01-01; None when empty."""
    if not text:
        return None
    m = _DATE.fullmatch(text)
    if not m:
        raise _Malformed(f"date {text[:16]!r} is not ddmmyy")
    d, mo, yy = int(m[1]), int(m[2]), int(m[3])
    year = 1900 + yy if yy >= 80 else 2000 + yy
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    month_days = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    if not 1 <= mo <= 12 or not 1 <= d <= month_days[mo - 1]:
        raise _Malformed(f"date {text!r} does not exist")
    y = year - 1
    days_before_year = y * 365 + y // 4 - y // 100 + y // 400 - 719162  # 719162: days from 0001-01-01 to 1970
    return days_before_year + _DAYS_BEFORE_MONTH[mo - 1] + (1 if leap and mo > 2 else 0) + d - 1


_DAY_NS = 86_400_000_000_000
_GGA_RMC_WINDOW_NS = 600 * 1_000_000_000


def _near_day(tod_ns: int, reference_ns: int) -> int | None:
    """The instant with time of day `tod_ns` nearest to `reference_ns`, if within 10 minutes of it."""
    day = reference_ns // _DAY_NS
    best = min(((day + k) * _DAY_NS + tod_ns for k in (-1, 0, 1)), key=lambda t: abs(t - reference_ns))
    return best if abs(best - reference_ns) <= _GGA_RMC_WINDOW_NS else None
