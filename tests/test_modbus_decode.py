"""Register decoding: every type in every byte order, against struct packing done independently here."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.modbus.decode import WIDTHS, encode, make_decoder, orders_for

STRUCT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
INT_RANGES = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
CASES = [(t, o) for t in STRUCT for o in orders_for(t)]


def to_registers(type_: str, order: str, value: float | int) -> list[int]:
    """What a device sends: big-endian bytes of the value, split into words, then rearranged per `order`."""
    data = struct.pack(">" + STRUCT[type_], value)
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    byte_order = order[:2] if len(order) == 4 else order  # "BA" / "BADC" / "DCBA" swap bytes in a word
    if byte_order in ("BA", "DC"):
        words = [w[::-1] for w in words]
    if order in ("CDAB", "DCBA") and len(words) > 1:
        words.reverse()
    return [int.from_bytes(w, "big") for w in words]


def values_for(type_: str) -> st.SearchStrategy:
    if type_ == "float32":
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if type_ == "float64":
        return st.floats(allow_nan=False, allow_infinity=False)
    lo, hi = INT_RANGES[type_]
    return st.integers(lo, hi)


@pytest.mark.parametrize(("type_", "order"), CASES)
@given(data=st.data())
def test_decode_equals_packed_value(type_: str, order: str, data: st.DataObject) -> None:
    value = data.draw(values_for(type_))
    registers = to_registers(type_, order, value)
    assert len(registers) == WIDTHS[type_]
    decoded = make_decoder(type_, order)(registers)
    assert decoded == value
    assert type(decoded) is type(value)
    assert encode(type_, order, value) == registers


@pytest.mark.parametrize(
    ("order", "registers"),
    [
        ("ABCD", [0x4366, 0x0000]),
        ("CDAB", [0x0000, 0x4366]),
        ("BADC", [0x6643, 0x0000]),
        ("DCBA", [0x0000, 0x6643]),
    ],
)
def test_float32_230_volts_in_each_order(order: str, registers: list[int]) -> None:
    assert make_decoder("float32", order)(registers) == 230.0


def test_64_bit_word_orders() -> None:
    value = 0x0102030405060708
    assert make_decoder("uint64", "ABCD")([0x0102, 0x0304, 0x0506, 0x0708]) == value
    assert make_decoder("uint64", "CDAB")([0x0708, 0x0506, 0x0304, 0x0102]) == value
    assert make_decoder("uint64", "BADC")([0x0201, 0x0403, 0x0605, 0x0807]) == value
    assert make_decoder("uint64", "DCBA")([0x0807, 0x0605, 0x0403, 0x0201]) == value


def test_16_bit_orders() -> None:
    for order in ("AB", "ABCD", "CDAB"):
        assert make_decoder("int16", order)([0xFFFE]) == -2
    for order in ("BA", "BADC", "DCBA"):
        assert make_decoder("int16", order)([0xFEFF]) == -2
    assert make_decoder("uint16", "BA")([0x3412]) == 0x1234


@pytest.mark.parametrize("type_", ["float32", "float64"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_decode_to_none(type_: str, bad: float) -> None:
    for order in orders_for(type_):
        assert make_decoder(type_, order)(to_registers(type_, order, bad)) is None
        assert make_decoder(type_, order, 2.0, 1.0)(to_registers(type_, order, bad)) is None


def test_scale_overflow_to_infinity_decodes_to_none() -> None:
    registers = to_registers("float32", "ABCD", 3.0e38)
    assert make_decoder("float32", "ABCD", scale=1e300)(registers) is None


@given(raw=st.integers(-(2**15), 2**15 - 1))
def test_scale_and_offset(raw: int) -> None:
    registers = to_registers("int16", "AB", raw)
    assert make_decoder("int16", "AB", scale=0.1, offset=-40)(registers) == raw * 0.1 - 40
    scaled = make_decoder("int16", "AB", scale=10, offset=3)(registers)
    assert scaled == raw * 10 + 3
    assert type(scaled) is int  # integer scale keeps an integer point integer (InfluxDB field types)
    assert type(make_decoder("int16", "AB", scale=1.0)(registers)) is float


def test_float_points_are_always_floats() -> None:
    assert type(make_decoder("float32", "ABCD")([0x4366, 0x0000])) is float
    assert type(make_decoder("float32", "ABCD", scale=2)([0x4366, 0x0000])) is float


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("float16", "ABCD"), "unknown type"),
        (("float32", "AB"), "does not fit float32"),
        (("int64", "BA"), "does not fit int64"),
        (("int16", "XYZW"), "does not fit int16"),
        (("int16", "AB", math.nan), "scale must be a finite number"),
        (("int16", "AB", 1, math.inf), "offset must be a finite number"),
        (("int16", "AB", True), "scale must be a finite number"),
    ],
)
def test_bad_decoder_arguments(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_decoder(*args)


def test_wrong_register_count_or_range_is_an_error() -> None:
    decode = make_decoder("float32", "ABCD")
    with pytest.raises(struct.error):
        decode([0x4366])
    with pytest.raises(struct.error):
        decode([0x4366, 0x10000])
