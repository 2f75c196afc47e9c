"""What each DL/T 645 data identifier holds, from the tables shipped as data (firmware_profiles/dlt645/*.toml),
and the value codec: BCD low byte first, an optional sign bit, an implied decimal point. Pure.

Formats (the standard's notation, DL/T 645-2007 Appendix A):
- "XXXXXX.XX": BCD digits, "." the implied decimal point; bytes = digits / 2 rounded up (1997's "XXX" volts
  are two bytes), sent low byte first.
- signed: the highest bit of the most significant byte is the sign (1 = negative); the remaining bits are BCD.
- "NNNNNNNNNNNN": 12 BCD digits kept as text (addresses, meter numbers; leading zeros matter).
- "date": YYMMDDWW (WW the weekday, 0 = Sunday), "time": hhmmss - returned as ISO text ("2026-12-05", "10:43:11").
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Annotated, Literal

import msgspec

from wire.config import ConfigError, convert, invalid, read_toml
from wire.schema import ConfigName

_FORMAT = re.compile(r"^(X+)(?:\.(X+))?\Z")
_SPECIAL = {"NNNNNNNNNNNN": 6, "date": 4, "time": 3}


class Identifier(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    di: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Fa-f]{4}([0-9A-Fa-f]{4})?\Z",
                                    extra={"expect": "4 (1997) or 8 (2007) hex digits, e.g. 00010000"})]
    name: ConfigName
    format: str
    unit: str
    description: str = ""
    signed: bool = False
    meter_unit: str = ""  # the meter's own unit when it is not the vocabulary's (kW, kvar, kVA)
    scale: float = 1.0  # meter unit -> vocabulary unit

    def __post_init__(self) -> None:
        if self.format not in _SPECIAL:
            m = _FORMAT.match(self.format)
            if m is None:
                raise invalid("format", f"expected X digits with an optional '.', or one of "
                                        f"{', '.join(_SPECIAL)}; got {self.format!r}")
        if self.signed and self.format in _SPECIAL:
            raise invalid("signed", f"format {self.format!r} has no sign")

    @property
    def code(self) -> int:
        return int(self.di, 16)

    @property
    def size(self) -> int:
        """Bytes of the value after the identifier in a read answer."""
        if self.format in _SPECIAL:
            return _SPECIAL[self.format]
        return (len(self.format.replace(".", "")) + 1) // 2  # "XXX" is two bytes, the top digit 0

    @property
    def numeric(self) -> bool:
        """A number (a quantity to read every poll), not a text such as the address, a serial number or the
        meter's date and time."""
        return self.format not in _SPECIAL

    @property
    def decimals(self) -> int:
        return len(self.format.partition(".")[2]) if self.format not in _SPECIAL else 0


class Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    edition: Literal["2007", "1997"]
    measurement: ConfigName
    identifiers: list[Identifier]

    def __post_init__(self) -> None:
        width = 8 if self.edition == "2007" else 4
        seen: dict[int, int] = {}
        names: dict[str, int] = {}
        for i, ident in enumerate(self.identifiers):
            if len(ident.di) != width:
                raise invalid(f"identifiers[{i}].di", f"DL/T 645-{self.edition} identifiers have {width} hex "
                                                      f"digits, got {ident.di!r}")
            if ident.code in seen:
                raise invalid(f"identifiers[{i}].di", f"{ident.di} is also identifiers[{seen[ident.code]}]")
            if ident.name in names:
                raise invalid(f"identifiers[{i}].name", f"{ident.name!r} is also identifiers[{names[ident.name]}]")
            seen[ident.code] = i
            names[ident.name] = i

    def by_code(self) -> dict[int, Identifier]:
        return {i.code: i for i in self.identifiers}

    def by_name(self) -> dict[str, Identifier]:
        return {i.name: i for i in self.identifiers}


@cache
def table(edition: str) -> Table:
    """The shipped identifier table of an edition ("2007" or "1997"). ConfigError names file and key."""
    if edition not in ("2007", "1997"):
        raise ConfigError(edition, "", "DL/T 645 editions are 2007 and 1997")
    resource = resources.files("firmware_profiles") / "dlt645" / f"{edition}.toml"
    with resources.as_file(resource) as path:
        loaded = convert(read_toml(path), Table, f"firmware_profiles/dlt645/{edition}.toml")
    if loaded.edition != edition:
        raise ConfigError(f"firmware_profiles/dlt645/{edition}.toml", "edition", f"says {loaded.edition}")
    return loaded


class ValueError645(ValueError):
    """A value that is not in its identifier's format; names the byte."""


def _bcd_digits(raw: bytes, ident: Identifier, *, sign_bit: bool) -> tuple[str, bool]:
    """The digits, most significant first, and whether the sign bit was set."""
    msb_first = bytes(reversed(raw))
    negative = False
    digits = []
    for k, byte in enumerate(msb_first):
        if k == 0 and sign_bit:
            negative = bool(byte & 0x80)
            byte &= 0x7F
        hi, lo = byte >> 4, byte & 0x0F
        if hi > 9 or lo > 9:
            offset = len(raw) - 1 - k  # position in the answer's value bytes (sent low byte first)
            raise ValueError645(f"{ident.di} ({ident.name}): byte {offset} of the value is {msb_first[k]:02X}, "
                                f"not BCD")
        digits.append(f"{hi}{lo}")
    return "".join(digits), negative


def decode_value(ident: Identifier, raw: bytes) -> float | int | str:
    """The value in the vocabulary's unit. ValueError645 for a wrong length or a byte that is not BCD."""
    if len(raw) != ident.size:
        raise ValueError645(f"{ident.di} ({ident.name}): {len(raw)} value bytes, format {ident.format} has "
                            f"{ident.size}")
    digits, negative = _bcd_digits(raw, ident, sign_bit=ident.signed)
    if ident.format == "NNNNNNNNNNNN":
        return digits
    if ident.format == "date":  # YYMMDDWW, sent WW DD MM YY
        yy, mm, dd, ww = digits[0:2], digits[2:4], digits[4:6], digits[6:8]
        if not (1 <= int(mm) <= 12 and 1 <= int(dd) <= 31 and int(ww) <= 6):
            raise ValueError645(f"{ident.di} ({ident.name}): {digits} is not a date YYMMDDWW")
        return f"20{yy}-{mm}-{dd}"
    if ident.format == "time":
        hh, mi, ss = digits[0:2], digits[2:4], digits[4:6]
        if not (int(hh) <= 23 and int(mi) <= 59 and int(ss) <= 59):
            raise ValueError645(f"{ident.di} ({ident.name}): {digits} is not a time hhmmss")
        return f"{hh}:{mi}:{ss}"
    # Always a float, whatever the decimals: a field's type is fixed in the store (the 1997 edition's volts are
    # whole numbers, the 2007 edition's have a decimal: both are floats, or they would conflict).
    number = int(digits)
    value = number / 10 ** ident.decimals * ident.scale
    value = round(value, max(0, ident.decimals - _log10(ident.scale)))
    return -value if negative else value


def _log10(scale: float) -> int:
    n = 0
    while scale >= 10 and scale % 10 == 0:
        scale /= 10
        n += 1
    return n


def encode_value(ident: Identifier, value: float | int | str) -> bytes:
    """The inverse of decode_value (for the simulator and tests): value bytes, low byte first."""
    if ident.format == "NNNNNNNNNNNN":
        digits = str(value).zfill(12)
    elif ident.format == "date":
        yyyy, mm, dd = str(value).split("-")
        import datetime as dt
        weekday = (dt.date(int(yyyy), int(mm), int(dd)).weekday() + 1) % 7  # 0 = Sunday
        digits = f"{yyyy[2:]}{mm}{dd}{weekday:02d}"
    elif ident.format == "time":
        digits = str(value).replace(":", "")
    else:
        number = round(abs(float(value)) / ident.scale * 10 ** ident.decimals)
        digits = str(number).zfill(ident.size * 2)
        if len(digits) > ident.size * 2 or (ident.signed and int(digits[0]) > 7):
            raise ValueError645(f"{ident.name} = {value} does not fit format {ident.format}")
    raw = bytearray(int(digits[i:i + 2], 16) for i in range(0, len(digits), 2))  # most significant first
    if ident.signed and float(value) < 0:
        raw[0] |= 0x80
    return bytes(reversed(raw))
