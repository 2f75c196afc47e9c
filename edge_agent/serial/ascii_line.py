"""Generic ASCII line sensors: one reading per line, parsed with a regular expression. Pure decoding.

Weather stations, data loggers and many lab instruments print a line per measurement, such as

    T=21.4C H=45% P=1013.2hPa
    0R2,Ta=23.6C,Ua=14.2P,Pa=1026.6H

`AsciiLineSettings` (the `[devices.ascii]` table of a `protocol = "ascii"` device) says how to read it: a
regular expression whose named groups are the values; per group (`[[devices.ascii.fields]]`, optional) its
type, scale, offset, unit and field name; optionally which group carries the device's own time stamp.
Everything is checked when the file is loaded, with the key path of the mistake.

`AsciiLineDecoder` splits the byte stream into lines and reports per line:
- a Sample: every named group that converts is a field; one that matched but does not convert (a Vaisala
  "#.#" for an invalid value, "--", "ERR") is left out with quality "malformed"; a group that did not take
  part in the match (an optional group) is simply absent;
- Rejected "no_match" (with the line's offset) for a line the regex does not match;
- Rejected "too_long" for a line longer than `max_line` bytes, reported once when it crosses the limit; the
  rest of it is skipped up to the next terminator;
- Rejected "incomplete" at flush() for a last line without a terminator.
Empty and blank lines are skipped silently. Bytes that are not valid in `encoding` are decoded as U+FFFD, so an
odd byte outside the groups costs nothing, and inside a numeric group makes that field "malformed".
"""

from __future__ import annotations

import codecs
import math
import re
import zoneinfo
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Annotated, Final, Literal

import msgspec

from edge_agent.serial.base import Event, Rejected, Sample
from wire.config import invalid
from wire.schema import ConfigName, ConfigTagValue, FieldValue

FieldType = Literal["int", "float", "bool", "str"]
EPOCH_FORMATS: Final = {"epoch": 10**9, "epoch_ms": 10**6, "epoch_us": 10**3, "epoch_ns": 1}
TRUE_WORDS: Final = frozenset({"1", "true", "t", "on", "yes", "y"})
FALSE_WORDS: Final = frozenset({"0", "false", "f", "off", "no", "n"})

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OFFSET_ZONE = re.compile(r"([+-])([0-9]{2}):?([0-9]{2})")
_INT64: Final = (-(2**63), 2**63 - 1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ASCII_PROBE: Final = "\r\n\t ,.:;=+-#%0123456789AZaz"
_LF, _CRLF, _CR = "lf", "crlf", "cr"
_MODES: Final = {"lf": _LF, "\n": _LF, "crlf": _CRLF, "\r\n": _CRLF, "cr": _CR, "\r": _CR}
_TERMINATOR: Final = {_LF: b"\n", _CRLF: b"\r\n", _CR: b"\r"}


GroupName = Annotated[str, msgspec.Meta(min_length=1, max_length=128,
                                        extra={"expect": "the name of a group (?P<name>...) of the regex"})]


class AsciiField(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How to turn one named group into a field: `value * scale + offset`, computed in decimal."""

    group: GroupName
    type: FieldType = "float"
    scale: float | None = None
    offset: float | None = None
    unit: ConfigTagValue = ""
    name: ConfigName | None = None  # the field's name; default: the group's name
    decimal: Literal[".", ","] = "."  # float: the device's decimal separator ("21,4")

    def __post_init__(self) -> None:
        for key in ("scale", "offset"):
            value = getattr(self, key)
            if value is None:
                continue
            if self.type in ("bool", "str"):
                raise invalid(key, f'only for int and float fields, not type = "{self.type}"')
            if not math.isfinite(value):
                raise invalid(key, f"expected a finite number, got {value}")
            if self.type == "int" and not float(value).is_integer():
                raise invalid(key, f'must be a whole number for an int field, got {value} (or use type = "float")')
        if self.decimal != "." and self.type != "float":
            raise invalid("decimal", f'only for float fields, not type = "{self.type}"')


class AsciiTime(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The group holding the device's time stamp, which then becomes the reading's time."""

    group: GroupName
    # a strptime format ("%Y-%m-%d %H:%M:%S"), or epoch / epoch_ms / epoch_us / epoch_ns (a number since 1970 UTC)
    format: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    # for a format without %z: "UTC", an offset such as "+01:00", or a zone name such as "Europe/Berlin"
    timezone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "UTC"

    def __post_init__(self) -> None:
        if self.format not in EPOCH_FORMATS:
            problem = _check_time_format(self.format)
            if problem:
                raise invalid("format", problem)
        try:
            zone_of(self.timezone)
        except ValueError as exc:
            raise invalid("timezone", str(exc)) from None


class AsciiLineSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """[devices.ascii]: the regex (searched in each line; anchor it with ^...$ to match whole lines), per-group
    settings under `fields` (every named group is a float field unless told otherwise), the optional `time`."""

    regex: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    fields: list[AsciiField] = []
    time: AsciiTime | None = None
    # "lf" (or "\n") also takes CR LF, dropping the CR; "cr" (or "\r") also takes CR LF; "crlf" (or "\r\n")
    terminator: Annotated[str, msgspec.Meta(max_length=4)] = "lf"
    encoding: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] = "utf-8"
    max_line: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 512  # bytes, terminator not counted

    def __post_init__(self) -> None:
        try:
            pattern = re.compile(self.regex)
        except re.error as exc:
            raise invalid("regex", _regex_error(self.regex, exc)) from None
        groups = list(pattern.groupindex)
        listed = ", ".join(groups) if groups else "none"
        time_group = self.time.group if self.time is not None else None
        if self.terminator not in _MODES:
            raise invalid("terminator",
                          f'expected "lf", "crlf" or "cr" (or "\\n", "\\r\\n", "\\r"), got {self.terminator!r}')
        seen: set[str] = set()
        for i, spec in enumerate(self.fields):
            key = spec.group
            if key not in pattern.groupindex:
                raise invalid(f"fields[{i}].group",
                              f"no group (?P<{key}>...) in the regex (its named groups: {listed})")
            if key == time_group:
                raise invalid(f"fields[{i}].group", f"{key} is the time group (time.group), not a field")
            if key in seen:
                raise invalid(f"fields[{i}].group", f"group {key} is listed twice")
            seen.add(key)
        specs = {spec.group: (i, spec) for i, spec in enumerate(self.fields)}
        if time_group is not None and time_group not in pattern.groupindex:
            raise invalid("time.group", f"no group (?P<{time_group}>...) in the regex (its named groups: {listed})")
        values = [g for g in groups if g != time_group]
        if not values:
            raise invalid("regex", "has no named group (?P<name>...) for a value: nothing to report")
        # field names: a group's own name, unless renamed; a renamed one must not take a name already in use
        taken: dict[str, str] = {time_group: "the time group"} if time_group else {}
        renamed = []
        for group in values:
            if len(group) > 128:
                raise invalid("regex", f"group name {group[:20]}... is longer than 128 characters")
            i, spec = specs.get(group, (0, None))
            if spec is not None and spec.name:
                renamed.append((i, group, spec.name))
            else:
                taken[group] = f"group {group}"
        for i, group, name in renamed:
            if name in taken:
                raise invalid(f"fields[{i}].name", f'field name "{name}" is already used by {taken[name]}')
            taken[name] = f"group {group}"
        try:
            info = codecs.lookup(self.encoding)
        except LookupError:
            raise invalid("encoding", f'unknown encoding "{self.encoding}" (e.g. "utf-8", "latin-1", "ascii")') from None
        try:
            compatible = _ASCII_PROBE.encode(info.name) == _ASCII_PROBE.encode("ascii")
        except (LookupError, UnicodeError, TypeError):  # not a text encoding at all (base64, rot13 ...)
            compatible = False
        if not compatible:
            raise invalid("encoding", f'"{self.encoding}" is not an ASCII-compatible text encoding; lines are split '
                          'on ASCII terminators (use e.g. "utf-8", "latin-1", "cp1252", "ascii")')


def _regex_error(regex: str, exc: re.error) -> str:
    if exc.pos is None:
        return f"not a valid regular expression: {exc.msg}"
    near = regex[max(0, exc.pos - 10):exc.pos + 10]
    return f'not a valid regular expression: {exc.msg} at position {exc.pos} (near "{near}")'


def _check_time_format(fmt: str) -> str:
    """Why `fmt` cannot stamp a reading, or ""."""
    hint = ' (a strptime format such as "%Y-%m-%d %H:%M:%S", or epoch, epoch_ms, epoch_us, epoch_ns)'
    if "%" not in fmt:
        return f'"{fmt}" has no % directive{hint}'
    probe = datetime(2021, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
    try:
        back = datetime.strptime(probe.strftime(fmt), fmt)
    except ValueError as exc:
        text = str(exc)
        if "directive" in text or "stray %" in text:
            return f"not a strptime format: {text}{hint}"
        return f"a time written with this format does not read back: {text}"
    if back.date() != probe.date():
        return "the format must give the full date (e.g. %Y-%m-%d): a time of day alone cannot stamp a reading"
    return ""


def zone_of(name: str) -> tzinfo:
    """"UTC", "+01:00"/"-0530", or an IANA zone name."""
    if name.upper() in ("UTC", "Z"):
        return UTC
    match = _OFFSET_ZONE.fullmatch(name)
    if match:
        sign, hours, minutes = match.groups()
        delta = timedelta(hours=int(hours), minutes=int(minutes))
        if delta >= timedelta(hours=24):
            raise ValueError(f'time zone offset "{name}" is out of range')
        return timezone(-delta if sign == "-" else delta)
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f'unknown time zone "{name}": expected "UTC", an offset such as "+01:00" or a zone '
                         'name such as "Europe/Berlin"') from None


# --- converting a group's text ---------------------------------------------------------------------------------

Converter = Callable[[str], FieldValue | None]  # None: does not convert


def converter(spec: AsciiField) -> Converter:
    if spec.type == "str":
        return lambda text: text
    if spec.type == "bool":
        def to_bool(text: str) -> bool | None:
            word = text.strip().lower()
            return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
        return to_bool
    if spec.type == "int":
        scale, offset = int(spec.scale if spec.scale is not None else 1), int(spec.offset or 0)

        def to_int(text: str) -> int | None:
            text = text.strip()
            if not _INT.fullmatch(text):
                return None
            value = int(text) * scale + offset
            return value if _INT64[0] <= value <= _INT64[1] else None
        return to_int

    comma = spec.decimal == ","
    if spec.scale is None and spec.offset is None:
        def to_float(text: str) -> float | None:
            text = text.strip()
            if comma:
                text = text.replace(",", ".") if "." not in text else "?"
            if not _FLOAT.fullmatch(text):
                return None
            value = float(text)
            return value if math.isfinite(value) else None
        return to_float

    # decimal arithmetic: "214" * 0.1 is 21.4, not 21.400000000000002
    d_scale = Decimal(repr(spec.scale if spec.scale is not None else 1.0))
    d_offset = Decimal(repr(spec.offset if spec.offset is not None else 0.0))

    def to_scaled(text: str) -> float | None:
        text = text.strip()
        if comma:
            text = text.replace(",", ".") if "." not in text else "?"
        if not _FLOAT.fullmatch(text):
            return None
        try:
            value = float(Decimal(text) * d_scale + d_offset)
        except (InvalidOperation, OverflowError):
            return None
        return value if math.isfinite(value) else None
    return to_scaled


def time_parser(spec: AsciiTime) -> Callable[[str], int | None]:
    """Text -> ns since 1970 UTC, or None."""
    if spec.format in EPOCH_FORMATS:
        per_unit = EPOCH_FORMATS[spec.format]

        def from_epoch(text: str) -> int | None:
            text = text.strip()
            if not _FLOAT.fullmatch(text):
                return None
            try:
                ns = int((Decimal(text) * per_unit).to_integral_value(ROUND_HALF_EVEN))
            except (InvalidOperation, OverflowError):
                return None
            return ns if 0 <= ns <= _INT64[1] else None
        return from_epoch

    fmt, zone = spec.format, zone_of(spec.timezone)

    def from_text(text: str) -> int | None:
        try:
            when = datetime.strptime(text.strip(), fmt)
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=zone)
        delta = when - _EPOCH
        ns = (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
        return ns if 0 <= ns <= _INT64[1] else None
    return from_text


# --- the decoder -------------------------------------------------------------------------------------------------

def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class AsciiLineDecoder:
    """A StreamDecoder for `AsciiLineSettings`. Events depend only on the bytes, not on how they were split."""

    def __init__(self, settings: AsciiLineSettings) -> None:
        self.settings = settings
        self._pattern = re.compile(settings.regex)
        self._mode = _MODES[settings.terminator]
        self._term = _TERMINATOR[self._mode]
        self._max_line = settings.max_line
        self.max_buffer = settings.max_line + 2  # a line, a CR that may be dropped, a terminator's first byte
        time_group = settings.time.group if settings.time is not None else None
        specs = {spec.group: spec for spec in settings.fields}
        self._fields: list[tuple[str, str, Converter, str]] = []
        for group in self._pattern.groupindex:
            if group == time_group:
                continue
            spec = specs.get(group) or AsciiField(group)
            self._fields.append((group, spec.name or group, converter(spec), spec.unit))
        self._time = (time_group, time_parser(settings.time)) if settings.time is not None else None
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._scan = 0  # where in _buf the terminator search resumes
        self._skipping = False  # inside a line already reported as too long

    def field_units(self) -> dict[str, str]:
        """{field: unit} of the fields a line can give (what `edge-agent check` holds against the vocabulary)."""
        return {name: unit for _, name, _, unit in self._fields}

    def feed(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        buf = self._buf
        buf += data
        term = self._term
        start = 0
        while True:
            end = buf.find(term, max(start, self._scan))
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._line(bytes(buf[start:end]), self._base + start, out)
            start = end + len(term)
        del buf[:start]
        self._base += start
        if not self._skipping:
            lead, size = self._content(buf)
            if size > self._max_line:
                out.append(self._too_long(self._base + lead))
                self._skipping = True
        if self._skipping:  # keep only what may be the first byte of a CR LF
            keep = 1 if self._mode == _CRLF and buf.endswith(b"\r") else 0
            drop = len(buf) - keep
            del buf[:drop]
            self._base += drop
        self._scan = max(0, len(buf) - len(term) + 1)
        return out

    def flush(self) -> list[Event]:
        out: list[Event] = []
        buf = self._buf
        if buf and not self._skipping:
            lead, _ = self._content(buf)
            content = bytes(buf[lead:])
            if content.strip():
                text = content.decode(self.settings.encoding, "replace")
                out.append(Rejected(self._base + lead, "incomplete",
                                    f"stream ended inside a line (no terminator): {_show(text)}", len(content)))
        self._base += len(buf)
        buf.clear()
        self._scan = 0
        self._skipping = False
        return out

    # -- one line ----------------------------------------------------------------------------------------------

    def _content(self, raw: bytes | bytearray) -> tuple[int, int]:
        """(bytes dropped in front, length of the line's content) of a line without its terminator, or the least
        the content of an unfinished line will be: "lf" drops a CR at the end, "cr" an LF at the start."""
        lead = 1 if self._mode == _CR and raw.startswith(b"\n") else 0
        tail = 1 if self._mode != _CR and raw.endswith(b"\r") else 0
        return lead, max(0, len(raw) - lead - tail)

    def _too_long(self, offset: int) -> Rejected:
        return Rejected(offset, "too_long", f"no line terminator within max_line = {self._max_line} bytes; "
                        "skipped to the next terminator", self._max_line + 1)

    def _line(self, raw: bytes, offset: int, out: list[Event]) -> None:
        lead, size = self._content(raw)
        if self._mode == _CRLF:  # a CR before the CR LF is content there
            size = len(raw) - lead
        content = raw[lead:lead + size]
        offset += lead
        if size > self._max_line:
            out.append(self._too_long(offset))
            return
        if not content.strip():
            return
        text = content.decode(self.settings.encoding, "replace")
        match = self._pattern.search(text)
        if match is None:
            out.append(Rejected(offset, "no_match", f"line {_show(text)} does not match the regex", size))
            return
        fields: dict[str, FieldValue] = {}
        quality: dict[str, str] = {}
        units: dict[str, str] = {}
        for group, name, convert, unit in self._fields:
            raw_value = match.group(group)
            if raw_value is None:  # an optional group that did not take part
                continue
            value = convert(raw_value)
            if value is None:
                quality[name] = "malformed"
                continue
            fields[name] = value
            if unit:
                units[name] = unit
        time_ns = None
        if self._time is not None:
            group, parse = self._time
            raw_time = match.group(group)
            if raw_time is not None:
                time_ns = parse(raw_time)
                if time_ns is None:
                    quality[group] = "malformed"
        out.append(Sample(fields=fields, time_ns=time_ns, quality=quality, units=units))
