"""Register decoding: every type in every byte order against struct packing done independently here, plus
strings, enumerations, bitfields, not-available sentinels, scale and offset."""

from __future__ import annotations

import dataclasses
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.modbus.decode import (
    NO_SCALE_FACTOR,
    NOT_AVAILABLE,
    OUT_OF_RANGE,
    WIDTHS,
    Missing,
    NotRepresentable,
    encode,
    make_decoder,
    make_encoder,
    orders_for,
    shortest,
    width_of,
)

STRUCT = {
    "int16": "h",
    "uint16": "H",
    "float16": "e",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "int64": "q",
    "uint64": "Q",
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
# What each order name means as bytes on the wire, written out letter by letter (A = most significant byte).
AS_SENT = {
    1: {"AB": "AB", "BA": "BA", "ABCD": "AB", "CDAB": "AB", "BADC": "BA", "DCBA": "BA"},
    2: {"ABCD": "ABCD", "CDAB": "CDAB", "BADC": "BADC", "DCBA": "DCBA"},
    4: {
        "ABCD": "ABCDEFGH",
        "CDAB": "GHEFCDAB",
        "BADC": "BADCFEHG",
        "DCBA": "HGFEDCBA",
        "ABCDEFGH": "ABCDEFGH",
        "GHEFCDAB": "GHEFCDAB",
        "BADCFEHG": "BADCFEHG",
        "HGFEDCBA": "HGFEDCBA",
    },
}


def to_registers(type_: str, order: str, value: float | int) -> list[int]:
    """What a device sends: the value's big-endian bytes rearranged letter by letter, then cut into words."""
    data = struct.pack(">" + STRUCT[type_], value)
    sent = bytes(data[ord(letter) - ord("A")] for letter in AS_SENT[len(data) // 2][order])
    return [int.from_bytes(sent[i : i + 2], "big") for i in range(0, len(sent), 2)]


def values_for(type_: str) -> st.SearchStrategy:
    if type_ == "float16":
        return st.floats(width=16, allow_nan=False, allow_infinity=False)
    if type_ == "float32":
        return st.floats(width=32, allow_nan=False, allow_infinity=False)
    if type_ == "float64":
        return st.floats(allow_nan=False, allow_infinity=False)
    lo, hi = INT_RANGES[type_]
    return st.integers(lo, hi)


# --- every type, every order ---------------------------------------------------------------------------



def same_value(type_: str, decoded: object, value: object) -> bool:
    """A float point decodes to the shortest decimal of the device's value: the same bits in its own width, never
    a longer text than the value's own float64 repr (edge_agent.modbus.decode.shortest); other types exactly."""
    code = {"float16": "e", "float32": "f"}.get(type_)
    if code is None or not isinstance(decoded, float) or not isinstance(value, float):
        return decoded == value
    same = struct.pack("<" + code, decoded) == struct.pack("<" + code, value)
    return same and len(repr(decoded)) <= len(repr(value))


@pytest.mark.parametrize(("type_", "order"), CASES)
@given(data=st.data())
def test_decode_equals_packed_value(type_: str, order: str, data: st.DataObject) -> None:
    value = data.draw(values_for(type_))
    registers = to_registers(type_, order, value)
    assert len(registers) == WIDTHS[type_] == width_of(type_)
    decoded = make_decoder(type_, order)(registers)
    assert same_value(type_, decoded, value)
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


def test_64_bit_word_orders_and_their_eight_letter_names() -> None:
    value = 0x0102030405060708
    cases = {
        ("ABCD", "ABCDEFGH"): [0x0102, 0x0304, 0x0506, 0x0708],
        ("CDAB", "GHEFCDAB"): [0x0708, 0x0506, 0x0304, 0x0102],
        ("BADC", "BADCFEHG"): [0x0201, 0x0403, 0x0605, 0x0807],
        ("DCBA", "HGFEDCBA"): [0x0807, 0x0605, 0x0403, 0x0201],
    }
    for names, registers in cases.items():
        for name in names:
            assert make_decoder("uint64", name)(registers) == value, name


def test_16_bit_orders() -> None:
    for order in ("AB", "ABCD", "CDAB"):
        assert make_decoder("int16", order)([0xFFFE]) == -2
    for order in ("BA", "BADC", "DCBA"):
        assert make_decoder("int16", order)([0xFEFF]) == -2
    assert make_decoder("uint16", "BA")([0x3412]) == 0x1234
    assert make_decoder("float16", "AB")([0x3C00]) == 1.0
    assert make_decoder("float16", "BA")([0x003C]) == 1.0


def test_eight_letter_orders_are_only_for_64_bit_types() -> None:
    assert "GHEFCDAB" in orders_for("float64") and "GHEFCDAB" not in orders_for("uint32")
    with pytest.raises(ValueError, match="does not fit uint32"):
        make_decoder("uint32", "GHEFCDAB")
    with pytest.raises(ValueError, match="does not fit int16"):
        make_decoder("int16", "HGFEDCBA")


# --- 8-bit integers: one byte of one register --------------------------------------------------------------

BYTE_TYPES = ("int8h", "int8l", "uint8h", "uint8l")


def byte_of(register: int, type_: str, order: str) -> int:
    """Written out independently: the register's two bytes as they came on the wire, the byte order undone
    ("AB": as sent, "BA": swapped; the four-letter orders mean their in-word byte order), then the high byte
    (h) or the low byte (l), signed for int8."""
    sent = register.to_bytes(2, "big")
    value = sent if AS_SENT[1][order] == "AB" else sent[::-1]
    byte = value[0] if type_.endswith("h") else value[1]
    return byte - 256 if type_.startswith("int") and byte >= 128 else byte


@pytest.mark.parametrize("type_", BYTE_TYPES)
@given(register=st.integers(0, 0xFFFF))
def test_8_bit_types_read_their_byte_of_the_register_in_every_order(type_: str, register: int) -> None:
    assert width_of(type_) == WIDTHS[type_] == 1
    assert orders_for(type_) == orders_for("int16")
    for order in orders_for(type_):
        decoded = make_decoder(type_, order)([register])
        assert decoded == byte_of(register, type_, order) and type(decoded) is int


@pytest.mark.parametrize(
    ("type_", "order", "value"),
    [
        # wire bytes 0x12 0xF0: as Telegraf's modbus input reads them (INT8H/INT8L/UINT8H/UINT8L with byte
        # order ABCD = the high byte first on the wire, DCBA = the low byte first)
        ("int8h", "ABCD", 0x12), ("int8l", "ABCD", -16), ("uint8h", "ABCD", 0x12), ("uint8l", "ABCD", 0xF0),
        ("int8h", "DCBA", -16), ("int8l", "DCBA", 0x12), ("uint8h", "DCBA", 0xF0), ("uint8l", "DCBA", 0x12),
        ("int8h", "AB", 0x12), ("uint8l", "BA", 0x12), ("uint8h", "BA", 0xF0),
    ],
)
def test_8_bit_types_as_telegraf_reads_them(type_: str, order: str, value: int) -> None:
    assert make_decoder(type_, order)([0x12F0]) == value


@pytest.mark.parametrize("type_", BYTE_TYPES)
@given(data=st.data())
def test_8_bit_encode_round_trips_and_the_other_byte_is_ignored(type_: str, data: st.DataObject) -> None:
    value = data.draw(st.integers(-128, 127) if type_.startswith("int") else st.integers(0, 255))
    other = data.draw(st.integers(0, 255))
    for order in orders_for(type_):
        [register] = encode(type_, order, value)
        assert make_decoder(type_, order)([register]) == value
        # the byte the point does not name is 0 in what encode sends, and anything at all on a device
        mine = (0 if type_.endswith("h") else 1) ^ (0 if AS_SENT[1][order] == "AB" else 1)  # its place on the wire
        assert register >> (8 if mine else 0) & 0xFF == 0
        noisy = register | other << (0 if mine == 0 else 8)
        assert make_decoder(type_, order)([noisy]) == value


def test_8_bit_scale_offset_sentinels_enums_and_bits() -> None:
    assert make_decoder("uint8l", "AB", 10, 5)([0xFF02]) == 25  # integer scale: still an integer
    assert type(make_decoder("uint8l", "AB", 10, 5)([0xFF02])) is int
    assert make_decoder("int8h", "AB", 0.5)([0xFE00]) == -1.0  # a fractional scale makes it a float
    assert type(make_decoder("int8h", "AB", 0.5)([0xFE00])) is float
    assert make_decoder("int8h", sentinel="auto")([0x80FF]) is NOT_AVAILABLE
    assert make_decoder("uint8l", sentinel="auto")([0x00FF]) is NOT_AVAILABLE
    assert make_decoder("uint8h", sentinel="auto")([0x00FF]) == 0  # the sentinel is in the other byte
    assert make_decoder("int8l", sentinel=[-1])([0x12FF]) is NOT_AVAILABLE  # -1 is the pattern 0xFF
    assert make_decoder("uint8h", enum={1: "on", 2: "off"})([0x0299]) == "off"
    assert make_decoder("int8l", enum={-1: "fault"})([0x00FF]) == "fault"
    assert make_decoder("uint8l", bits={0: "a", 7: "b"})([0xFF80]) == {"a": False, "b": True}
    with pytest.raises(ValueError, match="bit 8 does not exist in a 8-bit value"):
        make_decoder("uint8h", bits={8: "x"})
    with pytest.raises(ValueError, match=r"sentinel 256 does not fit a uint8l \(8 bits\)"):
        make_decoder("uint8l", sentinel=[256])
    with pytest.raises(ValueError, match="sentinel -129 does not fit a int8h"):
        make_decoder("int8h", sentinel=[-129])
    with pytest.raises(ValueError, match="does not fit int8h"):
        make_decoder("int8h", "ABCDEFGH")
    with pytest.raises(struct.error):
        encode("uint8h", "AB", 256)


# --- bits ------------------------------------------------------------------------------------------------


def test_bool_points_read_one_bit() -> None:
    decode = make_decoder("bool")
    assert decode([1]) is True
    assert decode([0]) is False
    assert decode([True]) is True
    assert width_of("bool") == 1
    assert make_decoder("bool", "DCBA")([1]) is True  # bits have no byte order: any order is accepted
    labelled = make_decoder("bool", enum={0: "closed", 1: "open"})
    assert (labelled([0]), labelled([1])) == ("closed", "open")


# --- not available -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_missing(type_: str, bad: float) -> None:
    for order in orders_for(type_):
        assert make_decoder(type_, order)(to_registers(type_, order, bad)) is NOT_AVAILABLE
        assert make_decoder(type_, order, 2.0, 1.0)(to_registers(type_, order, bad)) is NOT_AVAILABLE


@given(mantissa=st.integers(1, 2**23 - 1), sign=st.integers(0, 1))
def test_every_float32_nan_payload_is_missing(mantissa: int, sign: int) -> None:
    pattern = sign << 31 | 0xFF << 23 | mantissa
    assert make_decoder("float32")([pattern >> 16, pattern & 0xFFFF]) is NOT_AVAILABLE


def test_scale_overflow_to_infinity_is_out_of_range() -> None:
    registers = to_registers("float32", "ABCD", 3.0e38)
    assert make_decoder("float32", "ABCD", scale=1e300)(registers) is OUT_OF_RANGE
    assert make_decoder("uint64", "ABCD", scale=1e300)([0xFFFF] * 4) is OUT_OF_RANGE


@pytest.mark.parametrize(
    ("type_", "registers"),
    [
        ("int16", [0x8000]),
        ("uint16", [0xFFFF]),
        ("int32", [0x8000, 0x0000]),
        ("uint32", [0xFFFF, 0xFFFF]),
        ("int64", [0x8000, 0, 0, 0]),
        ("uint64", [0xFFFF] * 4),
        ("float32", [0x7FC0, 0x0000]),
    ],
)
def test_auto_sentinels_are_sunspec_not_implemented_values(type_: str, registers: list[int]) -> None:
    assert make_decoder(type_, sentinel="auto")(registers) is NOT_AVAILABLE
    # without a sentinel the same registers are an ordinary (if odd) number, except NaN
    plain = make_decoder(type_)(registers)
    assert (plain is NOT_AVAILABLE) == type_.startswith("float")
    # the pattern is matched after undoing the byte order: the same value word-swapped is still missing
    if len(registers) > 1:
        assert make_decoder(type_, "CDAB", sentinel="auto")(registers[::-1]) is NOT_AVAILABLE


def test_explicit_sentinels_match_raw_patterns_before_scaling() -> None:
    decode = make_decoder("int32", "ABCD", 0.1, sentinel=[0x7FFFFFFF, -1])
    assert decode([0x7FFF, 0xFFFF]) is NOT_AVAILABLE  # ABB: "highest value possible" for signed quantities
    assert decode([0xFFFF, 0xFFFF]) is NOT_AVAILABLE  # -1 is the pattern 0xFFFFFFFF
    assert decode([0x0000, 0x0010]) == pytest.approx(1.6)
    assert make_decoder("int16", sentinel=[-32768])([0x8000]) is NOT_AVAILABLE
    assert make_decoder("float32", sentinel=[-1.0])(to_registers("float32", "ABCD", -1.0)) is NOT_AVAILABLE
    assert make_decoder("float32", sentinel=[0xFF7FFFFF])([0xFF7F, 0xFFFF]) is NOT_AVAILABLE
    assert make_decoder("float32", sentinel=[-1.0])(to_registers("float32", "ABCD", -2.0)) == -2.0


@given(raw=st.integers(0, 2**16 - 1), sentinels=st.sets(st.integers(0, 2**16 - 1), max_size=4))
def test_a_sentinel_is_missing_and_everything_else_is_a_number(raw: int, sentinels: set[int]) -> None:
    value = make_decoder("uint16", sentinel=sorted(sentinels))([raw])
    assert (value is NOT_AVAILABLE) == (raw in sentinels)
    if raw not in sentinels:
        assert value == raw


@pytest.mark.parametrize(
    ("type_", "sentinel", "message"),
    [
        ("int16", [0x10000], "does not fit a int16"),
        ("int16", [-32769], "does not fit a int16"),
        ("uint16", [-1], "does not fit a uint16"),
        ("int16", [1.5], "is a float but the point is a int16"),
        ("float32", [math.nan], "always missing"),
        ("float32", "always", 'sentinel must be "auto"'),
        ("string", "auto", "has no sentinels"),
        ("bool", [1], "has no sentinels"),
        ("uint16", [True], "is not a number"),
    ],
)
def test_bad_sentinels(type_: str, sentinel: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_decoder(type_, sentinel=sentinel, length=2 if type_ == "string" else None)  # type: ignore[arg-type]


def test_missing_is_a_small_frozen_value() -> None:
    assert Missing("not_available") == NOT_AVAILABLE
    assert NOT_AVAILABLE.reason == "not_available"
    assert (OUT_OF_RANGE.reason, NO_SCALE_FACTOR.reason) == ("out_of_range", "no_scale_factor")
    assert repr(NOT_AVAILABLE) == "Missing('not_available')"
    assert len({NOT_AVAILABLE, Missing("not_available"), OUT_OF_RANGE}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        NOT_AVAILABLE.reason = "x"  # type: ignore[misc]


# --- strings -----------------------------------------------------------------------------------------------


def test_strings_strip_nul_and_space_padding() -> None:
    decode = make_decoder("string", length=4)
    assert decode([0x5344, 0x4D36, 0x3330, 0x0000]) == "SDM630"  # "SDM630\0\0"
    assert decode([0x2041, 0x4243, 0x2020, 0x2020]) == "ABC"  # " ABC    "
    assert decode([0x4142, 0x0043, 0x4444, 0x4444]) == "AB"  # cut at the first NUL, garbage after it ignored
    assert decode([0, 0, 0, 0]) is NOT_AVAILABLE  # SunSpec: an unimplemented string is all NULs
    assert decode([0x2020, 0x2020, 0x2020, 0x2020]) is NOT_AVAILABLE


def test_string_byte_order_and_encodings() -> None:
    assert make_decoder("string", "BA", length=2)([0x4241, 0x0043]) == "ABC"
    assert make_decoder("string", "DCBA", length=2)([0x4241, 0x0043]) == "ABC"
    utf8 = "Zähler".encode()
    registers = list(struct.unpack(">4H", utf8.ljust(8, b"\0")))
    assert make_decoder("string", length=4, encoding="utf-8")(registers) == "Zähler"
    assert make_decoder("string", length=4)(registers) == "Z\ufffd\ufffdhler"  # not ASCII: replaced, not dropped
    with pytest.raises(ValueError, match="encoding"):
        make_decoder("string", length=4, encoding="latin-1")


@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\0 "), min_size=1, max_size=20))
def test_string_round_trip(text: str) -> None:
    length = (len(text.encode()) + 1) // 2
    for order in ("AB", "BA"):
        registers = encode("string", order, text, length=length, encoding="utf-8")
        assert make_decoder("string", order, length=length, encoding="utf-8")(registers) == text


def test_string_width() -> None:
    assert width_of("string", 16) == 16
    with pytest.raises(ValueError, match="needs a length"):
        width_of("string")
    with pytest.raises(ValueError, match="needs a length"):
        make_decoder("string", length=124)


# --- enumerations and bitfields ------------------------------------------------------------------------------


def test_enumerations_give_labels() -> None:
    states = {1: "OFF", 2: "SLEEPING", 4: "MPPT", 7: "FAULT"}
    decode = make_decoder("uint16", enum=states, sentinel="auto")
    assert [decode([n]) for n in (1, 2, 4, 7)] == ["OFF", "SLEEPING", "MPPT", "FAULT"]
    assert decode([5]) == "5"  # a value the table lacks stays visible as its number
    assert decode([0xFFFF]) is NOT_AVAILABLE  # the sentinel wins over the table
    sequence = make_decoder("int16", enum={-1: "L1-L3-L2", 0: "L1-L2-L3"})
    assert (sequence([0xFFFF]), sequence([0])) == ("L1-L3-L2", "L1-L2-L3")
    word_swapped = make_decoder("uint32", "CDAB", enum={0x10000: "high"})
    assert word_swapped([0x0000, 0x0001]) == "high"


@given(raw=st.integers(0, 2**32 - 1), indexes=st.sets(st.integers(0, 31), min_size=1, max_size=8))
def test_bitfields_give_one_bool_per_named_bit(raw: int, indexes: set[int]) -> None:
    bits = {i: f"bit{i}" for i in indexes}
    for order in orders_for("uint32"):
        registers = to_registers("uint32", order, raw)
        assert make_decoder("uint32", order, bits=bits)(registers) == {f"bit{i}": bool(raw >> i & 1) for i in indexes}


def test_bitfield_sentinel_and_errors() -> None:
    events = make_decoder("uint32", bits={0: "ground_fault", 7: "over_temp"}, sentinel="auto")
    assert events([0x0000, 0x0081]) == {"ground_fault": True, "over_temp": True}
    assert events([0xFFFF, 0xFFFF]) is NOT_AVAILABLE
    with pytest.raises(ValueError, match="bit 16 does not exist"):
        make_decoder("uint16", bits={16: "x"})
    with pytest.raises(ValueError, match="used twice"):
        make_decoder("uint16", bits={1: "x", 2: "x"})


# --- scale and offset --------------------------------------------------------------------------------------


@given(raw=st.integers(-(2**15), 2**15 - 1))
def test_scale_and_offset(raw: int) -> None:
    registers = to_registers("int16", "AB", raw)
    # the exact decimal (raw x 0.1 - 40 has one decimal place), not float64's 230.10000000000002 of it
    assert make_decoder("int16", "AB", scale=0.1, offset=-40)(registers) == round(raw * 0.1 - 40, 1)
    scaled = make_decoder("int16", "AB", scale=10, offset=3)(registers)
    assert scaled == raw * 10 + 3
    assert type(scaled) is int  # integer scale keeps an integer point integer (InfluxDB field types)
    assert type(make_decoder("int16", "AB", scale=1.0)(registers)) is float
    assert type(make_decoder("int16", "AB", offset=0.5)(registers)) is float


@given(value=st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-(2.0**100), max_value=2.0**100))
def test_float_scale_and_offset(value: float) -> None:
    registers = to_registers("float32", "CDAB", value)
    assert make_decoder("float32", "CDAB", 0.001, 5)(registers) == shortest(value, "f") * 0.001 + 5


@pytest.mark.parametrize(("type_", "value", "shown"), [
    ("float32", 230.12, "230.12"), ("float32", 0.1, "0.1"), ("float32", 49.99, "49.99"), ("float32", 1e-7, "1e-07"),
    ("float32", 16777216.0, "16777216.0"), ("float32", 123456789.0, "123456792.0"), ("float32", 3.4028235e38,
                                                                                      "3.4028235e+38"),
    ("float16", 12.34, "12.34"), ("float16", 9128.0, "9128.0"), ("float16", 0.0234375, "0.02344")])
def test_floats_are_their_shortest_decimal(type_: str, value: float, shown: str) -> None:
    decoded = make_decoder(type_, "ABCD")(to_registers(type_, "ABCD", value))
    assert repr(decoded) == shown


def test_scaled_integers_have_the_scales_decimals() -> None:
    assert make_decoder("uint16", "AB", scale=0.1)([2301]) == 230.1  # 2301 * 0.1 is 230.10000000000002
    assert repr(make_decoder("int32", "ABCD", scale=0.001, offset=-5.5)([1, 57920])) == "117.956"
    assert repr(make_decoder("uint16", "AB", scale=0.01)([4999])) == "49.99"


def test_float_points_are_always_floats() -> None:
    assert type(make_decoder("float32", "ABCD")([0x4366, 0x0000])) is float
    assert type(make_decoder("float32", "ABCD", scale=2)([0x4366, 0x0000])) is float


# --- misuse ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("float128", "ABCD"), {}, "unknown type"),
        (("float32", "AB"), {}, "does not fit float32"),
        (("int64", "BA"), {}, "does not fit int64"),
        (("int16", "XYZW"), {}, "does not fit int16"),
        (("int16", "AB", math.nan), {}, "scale must be a finite number"),
        (("int16", "AB", 1, math.inf), {}, "offset must be a finite number"),
        (("int16", "AB", True), {}, "scale must be a finite number"),
        (("int16", "AB", 0), {}, "scale must not be 0"),
        (("int16", "AB", 2), {"enum": {1: "a"}}, "take no scale or offset"),
        (("uint16",), {"enum": {1: "a"}, "bits": {1: "b"}}, "not both"),
        (("float32",), {"enum": {1: "a"}}, "needs an integer or bool type"),
        (("float32",), {"bits": {1: "a"}}, "bitfield needs an integer type"),
        (("bool", "AB", 2), {}, "takes no scale or offset"),
        (("string", "AB", 2), {"length": 2}, "takes no scale or offset"),
    ],
)
def test_bad_decoder_arguments(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_decoder(*args, **kwargs)


def test_wrong_register_count_or_range_is_an_error() -> None:
    decode = make_decoder("float32", "ABCD")
    with pytest.raises(struct.error):
        decode([0x4366])
    with pytest.raises(struct.error):
        decode([0x4366, 0x10000])
    with pytest.raises(struct.error):
        make_decoder("string", length=2)([0x4142])


# --- the encoder of writes: the exact inverse of the decoder ---------------------------------------------------


@pytest.mark.parametrize(("type_", "order"), CASES)
@given(data=st.data())
def test_encoder_is_the_decoders_inverse_in_every_order(type_: str, order: str, data: st.DataObject) -> None:
    value = data.draw(values_for(type_))
    registers = make_encoder(type_, order)(value)
    assert registers == to_registers(type_, order, value)  # what a device holds, packed independently here
    decoded = make_decoder(type_, order)(registers)
    assert same_value(type_, decoded, value) and type(decoded) is type(value)
    assert make_encoder(type_, order)(decoded) == registers  # the shortest decimal is the same register value


@pytest.mark.parametrize("type_", ["int16", "uint16", "int32", "uint32", "int64", "uint64"])
@pytest.mark.parametrize(("scale", "offset"), [(0.1, 0), (0.01, -40.0), (10, 0), (2, 5), (0.5, 0.25)])
@given(data=st.data())
def test_scaled_integers_round_trip(type_: str, scale: float, offset: float, data: st.DataObject) -> None:
    lo, hi = INT_RANGES[type_]
    raw = data.draw(st.integers(max(lo, -(2**40)), min(hi, 2**40)))  # where a float still tells every raw apart
    value = make_decoder(type_, "CDAB", scale, offset)(to_registers(type_, "CDAB", raw))
    registers = make_encoder(type_, "CDAB", scale, offset)(value)
    assert registers == to_registers(type_, "CDAB", raw)


def test_engineering_values_become_raw_registers() -> None:
    assert make_encoder("int16", "AB", 0.1)(21.5) == [215]  # 21.5 / 0.1 = 214.99999999999997 is register 215
    assert make_encoder("int16", "AB", 0.1)(-20.5) == [0xFF33]  # two's complement (XY-MD02's own example)
    assert make_encoder("int16", "BA", 0.1)(-20.5) == [0x33FF]
    assert make_encoder("uint32", "CDAB", 1, 1000)(1065) == [65, 0]  # offset, low word first
    assert make_encoder("float32", "ABCD", 1, -10)(220.0) == [0x4366, 0x0000]  # (220 + 10) as float32 ABCD
    assert make_encoder("bool")(True) == [1] and make_encoder("bool")(0) == [0]


@pytest.mark.parametrize(("type_", "kwargs", "value", "message"), [
    ("int16", {"scale": 0.1}, 21.55, "not a whole number of steps of 0.1"),
    ("int16", {}, 1.5, "not a whole number"),
    ("int16", {}, 40000, "outside a int16"),
    ("uint16", {}, -1, "outside a uint16"),
    ("uint16", {"scale": 0.1}, 6553.6, "outside a uint16"),
    ("float32", {}, 1e39, "beyond a float32"),
    ("float16", {}, 70000.0, "beyond a float16"),
    ("float32", {}, math.nan, "not a finite number"),
    ("int32", {}, math.inf, "not a finite number"),
    ("int16", {}, True, "not a number"),
    ("int16", {}, "12", "not a number"),
    ("int16", {"sentinel": [-32768]}, -32768, "not available"),
    ("uint16", {"sentinel": "auto"}, 65535, "not available"),
    ("float32", {"sentinel": [1.5]}, 1.5, "not available"),
    ("bool", {}, 2, "not true or false"),
    ("bool", {}, 1.0, "not true or false"),
])
def test_values_the_registers_cannot_hold(type_: str, kwargs: dict, value: object, message: str) -> None:
    with pytest.raises(NotRepresentable, match=message):
        make_encoder(type_, **kwargs)(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("type_", "message"), [
    ("int8h", "overwrite the other byte"),
    ("uint8l", "overwrite the other byte"),
    ("string", "cannot be written as one value"),
])
def test_types_that_cannot_be_written(type_: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_encoder(type_, "AB")
