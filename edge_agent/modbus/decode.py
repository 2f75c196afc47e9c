"""Registers in, values out: pure decoding of Modbus register words, no I/O.

A decoder is built once per point at start-up (`make_decoder`) and then called for every poll with exactly
`WIDTHS[type]` registers (16-bit unsigned ints, in the order the device sent them).

Byte orders are written with letters for the bytes of the big-endian value, most significant first:

- "ABCD": big-endian words, big-endian bytes in each word (Modbus default; Eastron, most meters);
- "CDAB": word-swapped (low word first), bytes big-endian in each word (many PLCs: "little-endian words");
- "BADC": words in big-endian order, bytes swapped inside each word;
- "DCBA": fully little-endian.

For 64-bit types the letters name the same two properties (word order, byte order inside a word):
"CDAB" means the four words arrive least significant first, each word big-endian. For 16-bit types only the
byte order inside the word can differ: "AB" (normal) or "BA" (swapped); the four-letter orders are accepted
too and mean their byte order inside a word ("ABCD"/"CDAB" -> "AB", "BADC"/"DCBA" -> "BA"), so a
profile-wide order works for every point.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Literal

PointType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
Order = Literal["ABCD", "CDAB", "BADC", "DCBA", "AB", "BA"]
Value = float | int
Decoder = Callable[[Sequence[int]], Value | None]

#: Registers (16-bit words) each type occupies.
WIDTHS: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
_STRUCT_CODES = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "int64": "q",
    "uint64": "Q",
    "float64": "d",
}
#: order -> (words least significant first, bytes swapped inside each word)
_ORDER_FLAGS = {
    "ABCD": (False, False),
    "CDAB": (True, False),
    "BADC": (False, True),
    "DCBA": (True, True),
    "AB": (False, False),
    "BA": (False, True),
}
ORDERS_16 = ("AB", "BA", "ABCD", "CDAB", "BADC", "DCBA")
ORDERS_WIDE = ("ABCD", "CDAB", "BADC", "DCBA")


def orders_for(type_: str) -> tuple[str, ...]:
    """The byte orders a point of this type may declare."""
    return ORDERS_16 if WIDTHS[type_] == 1 else ORDERS_WIDE


def make_decoder(type_: str, order: str = "ABCD", scale: float = 1, offset: float = 0) -> Decoder:
    """A function turning `WIDTHS[type_]` registers into `raw * scale + offset`.

    Integers stay integers while scale and offset are integers; any float scale or offset gives a float.
    A non-finite float result (NaN, +-inf: a meter's "no value") decodes to None.
    Raises struct.error if given the wrong number of registers or a register outside 0..65535.
    """
    if type_ not in WIDTHS:
        raise ValueError(f"unknown type {type_!r}; expected one of {', '.join(WIDTHS)}")
    if order not in orders_for(type_):
        raise ValueError(
            f"byte order {order!r} does not fit {type_}; expected one of {', '.join(orders_for(type_))}"
        )
    for name, number in (("scale", scale), ("offset", offset)):
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {number!r}")

    width = WIDTHS[type_]
    words_reversed, bytes_swapped = _ORDER_FLAGS[order]
    # Packing each word with "<H" writes its two bytes swapped: that undoes a device's in-word byte swap.
    pack = struct.Struct(("<" if bytes_swapped else ">") + "H" * width).pack
    unpack = struct.Struct(">" + _STRUCT_CODES[type_]).unpack
    is_float = type_.startswith("float")
    identity = scale == 1 and offset == 0 and type(scale) is int and type(offset) is int

    if width > 1 and words_reversed:

        def raw_of(registers: Sequence[int]) -> Value:
            return unpack(pack(*reversed(registers)))[0]
    else:

        def raw_of(registers: Sequence[int]) -> Value:
            return unpack(pack(*registers))[0]

    if identity and not is_float:
        return raw_of

    def decode(registers: Sequence[int]) -> Value | None:
        value = raw_of(registers) * scale + offset
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return decode


def encode(type_: str, order: str, value: Value) -> list[int]:
    """The registers a device would send for a raw (unscaled) value: the inverse of an unscaled decoder.

    Used by the simulator and the tests; the agent itself never encodes.
    """
    words_reversed, bytes_swapped = _ORDER_FLAGS[order]
    width = WIDTHS[type_]
    data = struct.pack(">" + _STRUCT_CODES[type_], value)
    words = list(struct.unpack(("<" if bytes_swapped else ">") + "H" * width, data))
    return words[::-1] if words_reversed and width > 1 else words
