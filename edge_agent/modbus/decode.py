"""Registers in, values out: pure decoding of Modbus register words and bits, no I/O.

A decoder is built once per point at start-up (`make_decoder`) and then called for every poll with exactly
`width_of(type, length)` items: 16-bit unsigned register words in the order the device sent them, or for the
bit tables (coils, discrete inputs) one 0/1 int per bit.

What a decoder returns (`Decoded`):

- a value (`Value`: float, int, bool or str) with scale and offset applied; a float is the shortest decimal that
  is exactly what the device sent (`shortest`): a float32 register holding 230.12 gives 230.12, not the
  230.1199951171875 its bits are as a float64, and a uint16 of 2301 with scale 0.1 gives 230.1, not
  230.10000000000002. No information is lost (the shortest decimal parses back to the same float32, IEEE 754-2008
  §5.12.2; raw x scale has no more decimals than scale and offset together), and every byte of every reading
  costs the store: 1.24x readings per influxd CPU-second at the fleet's shape (docs/benchmarks.md "Store");
- `Missing(reason)` when the device says "no value": a not-available sentinel, a NaN/infinite float, an empty
  string (`NOT_AVAILABLE`), or a finite raw value that scale/offset pushed beyond a float (`OUT_OF_RANGE`).
  A missing value is never replaced by a made-up number;
- for a bitfield point, a `dict[str, bool]`: each named bit as its own field.

Types and widths: bool (1 bit), int16/uint16/float16 (1 register), int32/uint32/float32 (2), int64/uint64/
float64 (4), string (`length` registers), and the 8-bit integers int8h/uint8h (the high byte of one register)
and int8l/uint8l (its low byte): Telegraf's INT8H, UINT8H, INT8L, UINT8L. "High" and "low" are the most and
least significant byte of the register's value after its byte order is applied: with "AB" the high byte is
the first on the wire, with "BA" the second (as Telegraf reads them with ABCD and DCBA). The other byte is not
looked at. They are integers like the others: sentinels, scale and offset, enumerations and bitfields (bits
0..7) work the same way.

Byte orders are written with letters for the bytes of the big-endian value, most significant first:

- "ABCD": big-endian words, big-endian bytes in each word (Modbus default; Eastron, most meters);
- "CDAB": word-swapped (low word first), bytes big-endian in each word (many PLCs, Carlo Gavazzi);
- "BADC": words in big-endian order, bytes swapped inside each word;
- "DCBA": fully little-endian.

For 64-bit types the same four letters name the same two properties (word order, byte order inside a word),
so "CDAB" means the four words arrive least significant first, each word big-endian. The explicit 8-letter
names are accepted for 64-bit types and mean exactly the same: "ABCDEFGH" = "ABCD", "GHEFCDAB" = "CDAB",
"BADCFEHG" = "BADC", "HGFEDCBA" = "DCBA". For 16-bit types (and strings) only the byte order inside a word can
differ: "AB" (normal) or "BA" (swapped); the four-letter orders are accepted too and mean their byte order
inside a word ("ABCD"/"CDAB" -> "AB", "BADC"/"DCBA" -> "BA"), so a profile-wide order works for every point.
Bits have no byte order; every order is accepted and ignored.

Sentinels are compared with the raw bit pattern before any scaling: 0x8000 for an int16 matches the register
0x8000 whatever the byte order on the wire. A negative number for a signed type means the same pattern
(-32768 == 0x8000 for int16). A float sentinel (1.5e38) is compared with the decoded float value.
"""

from __future__ import annotations

import decimal
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

PointType = Literal[
    "bool",
    "int8h",
    "int8l",
    "uint8h",
    "uint8l",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "string",
]
Order = Literal[
    "ABCD", "CDAB", "BADC", "DCBA", "AB", "BA", "ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"
]
Encoding = Literal["ascii", "utf-8"]
Value = float | int | bool | str


@dataclass(frozen=True, slots=True)
class Missing:
    """No value, and why: "not_available" (the device says so), "out_of_range", "no_scale_factor", ..."""

    reason: str

    def __repr__(self) -> str:
        return f"Missing({self.reason!r})"


NOT_AVAILABLE = Missing("not_available")
OUT_OF_RANGE = Missing("out_of_range")
NO_SCALE_FACTOR = Missing("no_scale_factor")

Decoded = Value | Missing | dict[str, bool]
Decoder = Callable[[Sequence[int]], Decoded]

#: Registers (16-bit words) each fixed-width type occupies; bool occupies one bit of a bit table.
WIDTHS: dict[str, int] = {
    "bool": 1,
    "int8h": 1,
    "int8l": 1,
    "uint8h": 1,
    "uint8l": 1,
    "int16": 1,
    "uint16": 1,
    "float16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
#: The 8-bit types -> which byte of the register's value they are, after the byte order: 0 high, 1 low.
BYTE_TYPES: dict[str, int] = {"int8h": 0, "int8l": 1, "uint8h": 0, "uint8l": 1}
_BYTE_PICK = (">Bx", ">xB")  # struct formats reading that byte (unsigned) and skipping the other
INTEGER_TYPES = frozenset({*BYTE_TYPES, "int16", "uint16", "int32", "uint32", "int64", "uint64"})
SIGNED_TYPES = frozenset({"int8h", "int8l", "int16", "int32", "int64"})
FLOAT_TYPES = frozenset({"float16", "float32", "float64"})
NUMERIC_TYPES = INTEGER_TYPES | FLOAT_TYPES
MAX_STRING_REGISTERS = 123  # the most one FC3/FC4 request can carry within the 125 limit, with room to spare

_CODES = {1: "H", 2: "I", 4: "Q"}  # unsigned bit patterns, by width in registers
_FLOAT_CODES = {"float16": "e", "float32": "f", "float64": "d"}
#: order -> (words least significant first, bytes swapped inside each word)
_ORDER_FLAGS = {
    "ABCD": (False, False),
    "CDAB": (True, False),
    "BADC": (False, True),
    "DCBA": (True, True),
    "AB": (False, False),
    "BA": (False, True),
    "ABCDEFGH": (False, False),
    "GHEFCDAB": (True, False),
    "BADCFEHG": (False, True),
    "HGFEDCBA": (True, True),
}
ORDERS_16 = ("AB", "BA", "ABCD", "CDAB", "BADC", "DCBA")
ORDERS_WIDE = ("ABCD", "CDAB", "BADC", "DCBA")
ORDERS_64 = ("ABCD", "CDAB", "BADC", "DCBA", "ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA")
ORDERS_ANY = tuple(_ORDER_FLAGS)

#: SunSpec-style "not implemented" patterns, chosen by `sentinel = "auto"`. Floats always treat NaN as missing.
AUTO_SENTINELS: dict[str, tuple[int, ...]] = {
    # SunSpec has no 8-bit types; its rule (the most negative signed value, all ones unsigned) carried over
    "int8h": (0x80,),
    "int8l": (0x80,),
    "uint8h": (0xFF,),
    "uint8l": (0xFF,),
    "int16": (0x8000,),
    "uint16": (0xFFFF,),
    "int32": (0x8000_0000,),
    "uint32": (0xFFFF_FFFF,),
    "int64": (0x8000_0000_0000_0000,),
    "uint64": (0xFFFF_FFFF_FFFF_FFFF,),
    "float16": (),
    "float32": (0x7FC0_0000,),
    "float64": (),
}


def width_of(type_: str, length: int | None = None) -> int:
    """Registers (or bits, for bool) a point of this type occupies; strings take `length` registers."""
    if type_ == "string":
        if length is None or not 1 <= length <= MAX_STRING_REGISTERS:
            raise ValueError(f"a string needs a length of 1..{MAX_STRING_REGISTERS} registers, got {length!r}")
        return length
    if type_ not in WIDTHS:
        raise ValueError(f"unknown type {type_!r}; expected one of {', '.join([*WIDTHS, 'string'])}")
    return WIDTHS[type_]


def value_bits(type_: str) -> int:
    """Bits of a numeric type's value: 8 for the 8-bit types, else 16 per register."""
    return 8 if type_ in BYTE_TYPES else 16 * width_of(type_)


def orders_for(type_: str) -> tuple[str, ...]:
    """The byte orders a point of this type may declare."""
    if type_ == "bool":
        return ORDERS_ANY
    if type_ == "string" or WIDTHS[type_] == 1:
        return ORDERS_16
    return ORDERS_64 if WIDTHS[type_] == 4 else ORDERS_WIDE


def normalize_sentinels(type_: str, sentinel: str | Iterable[int | float] | None) -> tuple[frozenset[int], frozenset[float]]:
    """(bit patterns, float values) a point treats as "not available". Raises ValueError for ones that cannot fit."""
    if sentinel is None:
        return frozenset(), frozenset()
    if type_ not in NUMERIC_TYPES:
        raise ValueError(f"a {type_} point has no sentinels")
    if isinstance(sentinel, str):
        if sentinel != "auto":
            raise ValueError(f'sentinel must be "auto" or a list of values, got {sentinel!r}')
        return frozenset(AUTO_SENTINELS[type_]), frozenset()
    bits = value_bits(type_)
    patterns: set[int] = set()
    floats: set[float] = set()
    for item in sentinel:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise ValueError(f"sentinel {item!r} is not a number")
        if isinstance(item, float):
            if type_ not in FLOAT_TYPES:
                raise ValueError(f"sentinel {item!r} is a float but the point is a {type_}; write the raw integer")
            if not math.isfinite(item):
                raise ValueError("NaN and infinity are always missing for floats; list finite values only")
            floats.add(item)
            continue
        low = -(1 << (bits - 1)) if type_ in SIGNED_TYPES else 0
        if not low <= item < (1 << bits):
            raise ValueError(f"sentinel {item} does not fit a {type_} ({bits} bits)")
        patterns.add(item & ((1 << bits) - 1))
    return frozenset(patterns), frozenset(floats)


def _words(width: int, order: str) -> Callable[[Sequence[int]], bytes]:
    """registers as sent -> the value's bytes, most significant first."""
    words_reversed, bytes_swapped = _ORDER_FLAGS[order]
    # Packing each word with "<H" writes its two bytes swapped: that undoes a device's in-word byte swap.
    pack = struct.Struct(("<" if bytes_swapped else ">") + "H" * width).pack
    if width > 1 and words_reversed:
        return lambda registers: pack(*reversed(registers))
    return lambda registers: pack(*registers)


def make_decoder(
    type_: str,
    order: str = "ABCD",
    scale: float = 1,
    offset: float = 0,
    *,
    sentinel: str | Iterable[int | float] | None = None,
    enum: Mapping[int, str] | None = None,
    bits: Mapping[int, str] | None = None,
    length: int | None = None,
    encoding: str = "ascii",
) -> Decoder:
    """A function turning one point's registers (or bits) into its value.

    Numbers: `raw * scale + offset`; integers stay integers while scale and offset are integers, any float
    scale or offset gives a float, float types always give floats. NaN/inf floats and sentinel patterns give
    `NOT_AVAILABLE`; a finite value that scaling pushes to infinity gives `OUT_OF_RANGE`.
    `enum` (integer types and bool): the label of the raw value, or the raw value as a decimal string if the
    table lacks it. `bits` (integer types): {bit index: field name} -> {field name: bool}.
    Strings: `length` registers, cut at the first NUL, spaces stripped, decoded as ASCII or UTF-8 (undecodable
    bytes become U+FFFD); an empty result is `NOT_AVAILABLE`.
    Raises ValueError for a bad combination of arguments, struct.error when called with the wrong number of
    registers or a register outside 0..65535.
    """
    width = width_of(type_, length)
    if order not in _ORDER_FLAGS or order not in orders_for(type_):
        raise ValueError(f"byte order {order!r} does not fit {type_}; expected one of {', '.join(orders_for(type_))}")
    for name, number in (("scale", scale), ("offset", offset)):
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {number!r}")
    if scale == 0:
        raise ValueError("scale must not be 0")
    scaled = not (scale == 1 and offset == 0 and type(scale) is int and type(offset) is int)
    if enum is not None and bits is not None:
        raise ValueError("a point is either an enumeration or a bitfield, not both")
    if (enum is not None or bits is not None) and scaled:
        raise ValueError("enumerations and bitfields take no scale or offset")
    if enum is not None and type_ not in INTEGER_TYPES and type_ != "bool":
        raise ValueError(f"an enumeration needs an integer or bool type, not {type_}")
    if bits is not None and type_ not in INTEGER_TYPES:
        raise ValueError(f"a bitfield needs an integer type, not {type_}")
    if type_ in ("bool", "string") and scaled:
        raise ValueError(f"a {type_} point takes no scale or offset")
    patterns, float_sentinels = normalize_sentinels(type_, sentinel)

    if type_ == "bool":
        return _bool_decoder(enum)
    if type_ == "string":
        if encoding not in ("ascii", "utf-8"):
            raise ValueError(f'encoding must be "ascii" or "utf-8", got {encoding!r}')
        return _string_decoder(width, order, encoding)

    to_bytes = _words(width, order)
    # the raw bit pattern; for an 8-bit type, its byte of the register (read unsigned: the sign comes below)
    unsigned = struct.Struct(_BYTE_PICK[BYTE_TYPES[type_]] if type_ in BYTE_TYPES else ">" + _CODES[width]).unpack
    if type_ in FLOAT_TYPES:
        return _float_decoder(to_bytes, unsigned, struct.Struct(">" + _FLOAT_CODES[type_]).unpack,
                              patterns, float_sentinels, scale, offset, scaled, _FLOAT_CODES[type_])
    bit_count = value_bits(type_)
    signed = type_ in SIGNED_TYPES
    if bits is not None:
        table = _checked_bits(bits, bit_count)
        return _bitfield_decoder(to_bytes, unsigned, patterns, table)
    if enum is not None:
        labels = dict(enum)
        return _enum_decoder(to_bytes, unsigned, patterns, labels, signed, bit_count)
    return _int_decoder(to_bytes, unsigned, patterns, signed, bit_count, scale, offset, scaled)


def _bool_decoder(enum: Mapping[int, str] | None) -> Decoder:
    if enum is None:
        def decode(bits: Sequence[int]) -> Decoded:
            (bit,) = bits
            return bool(bit)
        return decode
    labels = {int(k): v for k, v in enum.items()}

    def decode_label(bits: Sequence[int]) -> Decoded:
        (bit,) = bits
        raw = 1 if bit else 0
        return labels.get(raw, str(raw))
    return decode_label


def _string_decoder(width: int, order: str, encoding: str) -> Decoder:
    _, bytes_swapped = _ORDER_FLAGS[order]
    pack = struct.Struct(("<" if bytes_swapped else ">") + "H" * width).pack

    def decode(registers: Sequence[int]) -> Decoded:
        data = pack(*registers)
        end = data.find(b"\x00")
        text = (data if end < 0 else data[:end]).decode(encoding, "replace").strip(" ")
        return text if text else NOT_AVAILABLE
    return decode


# Significant digits that always identify a value of each float width (IEEE 754-2008 §5.12.2: 5, 9 and 17);
# shortest() tries from the fewest a value of that width can need.
_SHORTENED = {"e": (struct.Struct("<e"), (3, 4, 5)), "f": (struct.Struct("<f"), (6, 7, 8, 9))}


def shortest(value: float, code: str) -> float:
    """The float64 nearest to the shortest decimal that reads back as the same `code` ("e" float16, "f" float32)
    value; a float64 ("d") as it is (repr already is its shortest decimal)."""
    width = _SHORTENED.get(code)
    if width is None or value == 0.0:
        return value
    same, digits = width
    # never fewer digits than the integer part has: float16's 9128 is 9128, not the 9.13e3 that reads back as it
    # (beyond the width's digits the value is written with an exponent anyway: 3.4028235e+38)
    whole = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    least = whole if whole <= digits[-1] else 0
    for n in digits:
        if n >= least:
            short = float(f"{value:.{n}g}")
            if same.unpack(same.pack(short))[0] == value:
                return short
    return value


def _decimals(number: float) -> int:
    """Decimal places of a scale or offset as written (0.1 -> 1, 2.5e-05 -> 6, 10 -> 0)."""
    exponent = decimal.Decimal(repr(number)).as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _float_decoder(to_bytes, unsigned, unpack, patterns, float_sentinels, scale, offset, scaled,
                   code: str = "d") -> Decoder:
    isfinite = math.isfinite
    shorten = code in _SHORTENED  # float16/float32; a float64's repr is already its shortest decimal

    def decode(registers: Sequence[int]) -> Decoded:
        data = to_bytes(registers)
        if patterns and unsigned(data)[0] in patterns:
            return NOT_AVAILABLE
        value = unpack(data)[0]
        if not isfinite(value) or value in float_sentinels:
            return NOT_AVAILABLE
        if shorten:
            value = shortest(value, code)
        if scaled:
            value = value * scale + offset
            if not isfinite(value):
                return OUT_OF_RANGE
        return value
    return decode


def _int_decoder(to_bytes, unsigned, patterns, signed, bit_count, scale, offset, scaled) -> Decoder:
    half, modulus = 1 << (bit_count - 1), 1 << bit_count
    isfinite = math.isfinite
    float_result = scaled and (isinstance(scale, float) or isinstance(offset, float))
    # raw x scale + offset, exactly, has no more decimal places than scale and offset together: rounding there
    # takes away only float64's representation error of the product (230.10000000000002 -> 230.1)
    places = max(_decimals(scale), _decimals(offset)) if float_result else 0

    def decode(registers: Sequence[int]) -> Decoded:
        raw = unsigned(to_bytes(registers))[0]
        if raw in patterns:
            return NOT_AVAILABLE
        if signed and raw >= half:
            raw -= modulus
        if not scaled:
            return raw
        value = raw * scale + offset
        if float_result:
            if not isfinite(value):
                return OUT_OF_RANGE
            if places <= 15:
                value = round(value, places)
        return value
    return decode


def _checked_bits(bits: Mapping[int, str], bit_count: int) -> tuple[tuple[int, str], ...]:
    seen: set[str] = set()
    table = []
    for index, name in sorted(bits.items()):
        if not 0 <= index < bit_count:
            raise ValueError(f"bit {index} does not exist in a {bit_count}-bit value")
        if name in seen:
            raise ValueError(f"bit name {name!r} is used twice")
        seen.add(name)
        table.append((index, name))
    return tuple(table)


def _bitfield_decoder(to_bytes, unsigned, patterns, table) -> Decoder:
    def decode(registers: Sequence[int]) -> Decoded:
        raw = unsigned(to_bytes(registers))[0]
        if raw in patterns:
            return NOT_AVAILABLE
        return {name: bool(raw >> index & 1) for index, name in table}
    return decode


def _enum_decoder(to_bytes, unsigned, patterns, labels, signed, bit_count) -> Decoder:
    half, modulus = 1 << (bit_count - 1), 1 << bit_count

    def decode(registers: Sequence[int]) -> Decoded:
        raw = unsigned(to_bytes(registers))[0]
        if raw in patterns:
            return NOT_AVAILABLE
        if signed and raw >= half:
            raw -= modulus
        label = labels.get(raw)
        return label if label is not None else str(raw)
    return decode


class NotRepresentable(ValueError):
    """A value a point's registers cannot hold: outside its type's range, not a whole raw number, a float beyond
    float16/32, NaN or infinity, or its "not available" pattern."""


Encoder = Callable[[Value], list[int]]


def _to_registers(data: bytes, width: int, order: str) -> list[int]:
    """The value's bytes, most significant first -> registers as the device sends them: the inverse of `_words`."""
    words_reversed, bytes_swapped = _ORDER_FLAGS[order]
    words = list(struct.unpack(("<" if bytes_swapped else ">") + "H" * width, data))
    return words[::-1] if words_reversed and width > 1 else words


_INT_CODES = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "int64": "q", "uint64": "Q"}


def _raw_bytes(type_: str, raw: int | float) -> bytes:
    """A raw (unscaled) number as the value's bytes, most significant first; an 8-bit type fills its byte and
    leaves the other 0. Raises struct.error / OverflowError when it does not fit."""
    if type_ in BYTE_TYPES:
        byte = struct.pack(">b" if type_ in SIGNED_TYPES else ">B", raw)
        return byte + b"\x00" if BYTE_TYPES[type_] == 0 else b"\x00" + byte
    return struct.pack(">" + (_FLOAT_CODES.get(type_) or _INT_CODES[type_]), raw)


#: Raw values within this much of a whole number are that number: 21.5 / 0.1 is 214.99999999999997 in binary
#: floating point, and a register holds 215. Far below one step of any register (an LSB is 1); relative for
#: raw values so large that a float's own rounding of value * scale / scale exceeds it.
_WHOLE_TOLERANCE = 1e-6
_WHOLE_RELATIVE = 1e-13


def make_encoder(
    type_: str,
    order: str = "ABCD",
    scale: float = 1,
    offset: float = 0,
    *,
    sentinel: str | Iterable[int | float] | None = None,
) -> Encoder:
    """The exact inverse of `make_decoder` for a plain number or a bool, as a device is written: an engineering
    value (what the decoder returns, after scale and offset) -> the registers (or the one bit) that decode to it.

    Numbers: raw = (value - offset) / scale, in the type's range and signedness, then the same byte and word
    order the decoder undoes. An integer type needs a raw value within 1e-6 of a whole number (then rounded);
    a float type is packed as float16/32/64 (a value beyond it is refused, not made infinite). NaN, infinity, a
    bool where a number is expected and the point's "not available" pattern raise NotRepresentable.
    bool: true/false (or 1/0) -> [1] / [0].
    Raises ValueError at build time for what cannot be written as one value: strings, and the 8-bit types
    (their register holds another byte, which a write would overwrite).
    """
    if type_ == "string":
        raise ValueError("a string point cannot be written as one value")
    width = width_of(type_)
    if order not in _ORDER_FLAGS or order not in orders_for(type_):
        raise ValueError(f"byte order {order!r} does not fit {type_}; expected one of {', '.join(orders_for(type_))}")
    if type_ in BYTE_TYPES:
        raise ValueError(f"a {type_} is one byte of a register: writing it would overwrite the other byte")
    if type_ == "bool":
        def encode_bool(value: Value) -> list[int]:
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return [1 if value else 0]
            raise NotRepresentable(f"{value!r} is not true or false")
        return encode_bool
    for name, number in (("scale", scale), ("offset", offset)):
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {number!r}")
    if scale == 0:
        raise ValueError("scale must not be 0")
    scaled = not (scale == 1 and offset == 0 and type(scale) is int and type(offset) is int)
    patterns, float_sentinels = normalize_sentinels(type_, sentinel)
    bits = value_bits(type_)
    mask = (1 << bits) - 1
    is_float = type_ in FLOAT_TYPES
    low = -(1 << (bits - 1)) if type_ in SIGNED_TYPES else 0
    high = (1 << (bits - 1)) - 1 if type_ in SIGNED_TYPES else mask

    def encode_number(value: Value) -> list[int]:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NotRepresentable(f"{value!r} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise NotRepresentable(f"{value} is not a finite number")
        if is_float:
            raw: int | float = (value - offset) / scale if scaled else float(value)
            try:
                data = _raw_bytes(type_, raw)
            except (OverflowError, struct.error):
                raise NotRepresentable(f"{value} is beyond a {type_}") from None
            if float_sentinels and struct.unpack(">" + _FLOAT_CODES[type_], data)[0] in float_sentinels:
                raise NotRepresentable(f"{value} is this point's \"not available\" value")
        else:
            if scaled or isinstance(value, float):
                exact = (value - offset) / scale if scaled else value
                raw = round(exact)
                if abs(exact - raw) > max(_WHOLE_TOLERANCE, abs(exact) * _WHOLE_RELATIVE):
                    step = f"{scale:g}" if scaled else "1"
                    raise NotRepresentable(f"{value} is not a whole number of steps of {step} (a {type_} register "
                                           f"holds {exact:.6g})")
            else:
                raw = value
            if not low <= raw <= high:
                raise NotRepresentable(f"{value} needs the raw value {raw}, outside a {type_} ({low}..{high})")
            data = _raw_bytes(type_, raw)
        if patterns and int.from_bytes(data, "big") & mask in patterns:
            raise NotRepresentable(f"{value} is this point's \"not available\" pattern")
        return _to_registers(data, width, order)

    return encode_number


def encode(type_: str, order: str, value: Value, length: int | None = None, encoding: str = "ascii") -> list[int]:
    """The registers (or bits) a device would send for a raw (unscaled) value, any type: the simulators' and the
    tests' encoder. What the agent writes to a device is encoded by `make_encoder`, with scale and checks."""
    width = width_of(type_, length)
    if type_ == "bool":
        return [1 if value else 0]
    if type_ == "string":
        _, bytes_swapped = _ORDER_FLAGS[order]
        data = str(value).encode(encoding)
        if len(data) > 2 * width:
            raise ValueError(f"{value!r} needs more than {width} registers")
        data = data.ljust(2 * width, b"\x00")
        return list(struct.unpack(("<" if bytes_swapped else ">") + "H" * width, data))
    return _to_registers(_raw_bytes(type_, value), width, order)
