"""edge_agent/modbus/frames.py: checksums, request PDUs, read responses and the three framings (pure)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.modbus import frames
from edge_agent.modbus.frames import (
    NEED_MORE,
    AsciiDecoder,
    Expect,
    FrameRejected,
    ModbusExceptionResponse,
    RtuDecoder,
    TcpDecoder,
)

GOLDEN = Path(__file__).parent / "golden" / "modbus_frames" / "frames.psv"


def golden_rows() -> list[tuple[str, str, str, bytes]]:
    rows = []
    for line in GOLDEN.read_text(encoding="ascii").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        origin, direction, description, adu = line.split("|")
        rows.append((origin, direction, description, bytes.fromhex(adu)))
    return rows


ROWS = golden_rows()


def rtu(unit: int, pdu: bytes) -> bytes:
    """An RTU ADU built here independently of frames.rtu_encode (bitwise CRC)."""
    body = bytes((unit,)) + pdu
    crc = 0xFFFF
    for byte in body:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return body + struct.pack("<H", crc)


def feed_all(decoder, data: bytes, cuts: list[int] | tuple[int, ...] = ()):
    """Feed `data` in pieces cut at `cuts`; returns what the last feed returned (or raises)."""
    result = NEED_MORE
    start = 0
    for cut in [*cuts, len(data)]:
        result = decoder.feed(data[start:cut])
        start = cut
    return result


# --- the fixture frames -------------------------------------------------------------------------------------------


def test_golden_file_is_byte_exact_copy_with_notice() -> None:
    assert len(ROWS) == 20
    assert (GOLDEN.parent / "NOTICE").read_text().count("Copyright (c) 2017 Diogo Resende") == 1


@pytest.mark.parametrize("row", ROWS, ids=[r[2][:40] for r in ROWS])
def test_golden_crc_and_encoding(row: tuple[str, str, str, bytes]) -> None:
    _, _, _, adu = row
    assert frames.crc16_modbus(adu[:-2]) == int.from_bytes(adu[-2:], "little")
    assert frames.rtu_encode(adu[0], adu[1:-2]) == adu


@pytest.mark.parametrize(
    ("table", "hexadu"),
    [
        ("coil", "11 01 00 13 00 25 0E 84"),
        ("discrete", "11 02 00 C4 00 16 BA A9"),
        ("holding", "11 03 00 6B 00 03 76 87"),
        ("input", "11 04 00 08 00 01 B2 98"),
    ],
)
def test_spec_read_requests(table: str, hexadu: str) -> None:
    adu = bytes.fromhex(hexadu)
    address, count = struct.unpack(">HH", adu[2:6])
    assert frames.read_request(table, address, count) == adu[1:-2]
    assert frames.rtu_encode(0x11, frames.read_request(table, address, count)) == adu
    assert adu in {row[3] for row in ROWS}


def f32(registers: list[int]) -> float:
    return struct.unpack(">f", struct.pack(">HH", *registers))[0]


@pytest.mark.parametrize(
    ("hexadu", "check"),
    [
        ("01 04 04 43 66 00 00 0E 1F", lambda r: f32(r) == 230.0),
        ("01 04 04 44 9A 50 00 F3 5B", lambda r: f32(r) == 1234.5),
        ("01 04 04 01 31 02 22 2A CE", lambda r: r == [0x0131, 0x0222]),
        ("01 04 04 FF 33 02 22 BA E6", lambda r: struct.unpack(">h", struct.pack(">H", r[0]))[0] == -205),
    ],
)
def test_golden_responses_decode(hexadu: str, check) -> None:
    adu = bytes.fromhex(hexadu)
    decoder = RtuDecoder(1, Expect.read("input", 2))
    pdu = decoder.feed(adu)
    assert pdu == adu[1:-2]
    assert check(frames.parse_read_response("input", 2, pdu))


def test_golden_exception_response() -> None:
    adu = bytes.fromhex("01 84 02 C2 C1")
    decoder = RtuDecoder(1, Expect.read("input", 2))
    pdu = decoder.feed(adu)
    with pytest.raises(ModbusExceptionResponse) as caught:
        frames.parse_read_response("input", 2, pdu)
    assert (caught.value.function, caught.value.code, caught.value.name) == (4, 2, "illegal data address")
    with pytest.raises(ModbusExceptionResponse):
        frames.raise_for_exception(pdu)


# --- writes: the specification's examples (Modbus Application Protocol 1.1b §6.5, §6.6, §6.11, §6.12) ----------

# (function, address, values, request ADU for slave 0x11 from the golden file, response PDU from the specification)
SPEC_WRITES = [
    # §6.5: write coil 173 ON; the response is an echo of the request
    (5, 0x00AC, [1], "11 05 00 AC FF 00 4E 8B", "05 00 AC FF 00"),
    # §6.6: write register 2 to 0x0003; an echo
    (6, 0x0001, [0x0003], "11 06 00 01 00 03 9A 9B", "06 00 01 00 03"),
    # §6.11: 10 coils from coil 20: CD 01 = outputs 20..27 (first one in the least significant bit), then 28..29
    (15, 0x0013, [1, 0, 1, 1, 0, 0, 1, 1, 1, 0], "11 0F 00 13 00 0A 02 CD 01 BF 0B", "0F 00 13 00 0A"),
    # §6.12: registers 2 and 3 to 0x000A and 0x0102; the response names start and quantity
    (16, 0x0001, [0x000A, 0x0102], "11 10 00 01 00 02 04 00 0A 01 02 C6 F0", "10 00 01 00 02"),
]


@pytest.mark.parametrize(("function", "address", "values", "adu", "response"), SPEC_WRITES,
                         ids=[f"fc{w[0]}" for w in SPEC_WRITES])
def test_spec_write_requests_and_responses(function: int, address: int, values: list[int], adu: str,
                                           response: str) -> None:
    adu_bytes = bytes.fromhex(adu)
    request = frames.write_request(function, address, values)
    assert frames.rtu_encode(0x11, request) == adu_bytes
    assert adu_bytes in {row[3] for row in ROWS}  # the golden file's row, byte for byte
    answer = bytes.fromhex(response)
    decoder = RtuDecoder(0x11, Expect.write(request))
    assert decoder.feed(rtu(0x11, answer)) == answer  # the frame length follows from the function code
    frames.check_write_response(request, answer)  # accepted


def test_single_coil_off_is_0000() -> None:
    assert frames.write_request(5, 7, [0]) == bytes.fromhex("05 00 07 00 00")  # §6.5: 00 00 requests OFF


def test_multiple_coils_pad_the_last_byte_with_zeros() -> None:
    assert frames.write_request(15, 0, [1] * 9) == bytes.fromhex("0F 0000 0009 02 FF 01")


WRITE_REJECTS = [
    # (request, response PDU, reason)
    ("05 00 AC FF 00", "05 00 AC 00 00", "echo"),  # switched OFF, not ON
    ("05 00 AC FF 00", "05 00 AD FF 00", "echo"),  # another coil
    ("06 00 01 00 03", "06 00 01 00 04", "echo"),  # another value: the device did not write what was asked
    ("0F 00 13 00 0A 02 CD 01", "0F 00 13 00 09", "echo"),  # fewer coils
    ("10 00 01 00 02 04 00 0A 01 02", "10 00 02 00 02", "echo"),  # another start
    ("10 00 01 00 02 04 00 0A 01 02", "03 00 01 00 02", "function"),
    ("06 00 01 00 03", "06 00 01 00", "length"),
    ("06 00 01 00 03", "86 02 00", "length"),  # an exception response is 2 bytes
]


@pytest.mark.parametrize(("request_pdu", "response", "reason"), WRITE_REJECTS)
def test_write_responses_that_do_not_answer_the_request(request_pdu: str, response: str, reason: str) -> None:
    with pytest.raises(FrameRejected) as caught:
        frames.check_write_response(bytes.fromhex(request_pdu), bytes.fromhex(response))
    assert caught.value.reason == reason


def test_write_exception_response() -> None:
    with pytest.raises(ModbusExceptionResponse) as caught:
        frames.check_write_response(bytes.fromhex("10 00 01 00 02 04 00 0A 01 02"), bytes.fromhex("90 02"))
    assert (caught.value.function, caught.value.code) == (16, 2)


@pytest.mark.parametrize(("function", "address", "values", "message"), [
    (5, 0, [2], "0 or 1"),
    (5, 0, [1, 0], "writes one value"),
    (6, 0, [0x10000], "outside 0..65535"),
    (6, 0x10000, [1], "outside 0..65535"),
    (15, 0, [1] * 1969, "1..1968"),
    (15, 0xFFFF, [1, 1], "outside 0..65535"),
    (16, 0, [0] * 124, "1..123"),
    (16, 0, [], "1..123"),
    (3, 0, [1], "not a write"),
])
def test_write_request_limits(function: int, address: int, values: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        frames.write_request(function, address, values)


def test_write_limits_are_the_specifications() -> None:
    assert len(frames.write_request(15, 0, [1] * 1968)) == 6 + 246  # §6.11: 0x07B0 outputs, byte count 246
    assert len(frames.write_request(16, 0, [0] * 123)) == 6 + 246  # §6.12: 0x007B registers
    assert frames.write_request(16, 0xFFFF, [7]) == bytes.fromhex("10 FFFF 0001 02 0007")


# --- checksums ----------------------------------------------------------------------------------------------------


def test_crc16_modbus_vectors() -> None:
    assert frames.crc16_modbus(b"123456789") == 0x4B37  # the CRC-16/MODBUS check value
    assert frames.crc16_modbus(b"") == 0xFFFF
    for _, _, _, adu in ROWS:
        assert rtu(adu[0], adu[1:-2]) == adu  # the bitwise reference agrees with the fixtures


def test_lrc_vectors() -> None:
    assert frames.lrc(bytes.fromhex("11 03 00 6B 00 03")) == 0x7E  # the specification's example
    assert frames.lrc(b"") == 0
    assert frames.lrc(b"\x01\xff") == 0
    assert frames.ascii_encode(0x11, frames.read_request("holding", 0x6B, 3)) == b":1103006B00037E\r\n"


# --- requests and read responses ----------------------------------------------------------------------------------


def test_read_request_limits() -> None:
    assert frames.read_request("holding", 0, 125) == b"\x03\x00\x00\x00\x7d"
    assert frames.read_request("coil", 0xFFFF - 1999, 2000) == b"\x01\xf8\x30\x07\xd0"
    for table, count in (("holding", 126), ("input", 0), ("coil", 2001), ("discrete", 0)):
        with pytest.raises(ValueError):
            frames.read_request(table, 0, count)
    with pytest.raises(ValueError):
        frames.read_request("input", 0xFFFF, 2)
    with pytest.raises(ValueError):
        frames.read_request("input", -1, 1)
    with pytest.raises(ValueError):
        frames.read_request("register", 0, 1)


def test_parse_registers_and_bits() -> None:
    assert frames.parse_read_response("holding", 2, b"\x03\x04\xff\xff\x00\x01") == [65535, 1]
    # coils 0..9: 1 0 1 1 0 0 0 0 | 1 0, least significant bit first
    assert frames.parse_read_response("coil", 10, b"\x01\x02\x0d\x01") == [1, 0, 1, 1, 0, 0, 0, 0, 1, 0]
    assert frames.parse_read_response("discrete", 3, b"\x02\x01\xfe") == [0, 1, 1]


@pytest.mark.parametrize(
    ("pdu", "reason"),
    [
        (b"\x04\x04\x00\x01\x00\x02", "function"),
        (b"\x03\x02\x00\x01", "byte_count"),
        (b"\x03\x04\x00\x01\x00", "length"),
        (b"\x03", "length"),
        (b"", "length"),
        (b"\x83\x02\x00", "length"),
        (b"\x84\x02", "function"),
    ],
)
def test_parse_rejects(pdu: bytes, reason: str) -> None:
    with pytest.raises(FrameRejected) as caught:
        frames.parse_read_response("holding", 2, pdu)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (1, "illegal function"),
        (2, "illegal data address"),
        (3, "illegal data value"),
        (4, "server device failure"),
        (5, "acknowledge"),
        (6, "server device busy"),
        (8, "memory parity error"),
        (10, "gateway path unavailable"),
        (11, "gateway target device failed to respond"),
        (99, "unknown exception"),
    ],
)
def test_exception_names(code: int, name: str) -> None:
    with pytest.raises(ModbusExceptionResponse) as caught:
        frames.parse_read_response("input", 1, bytes((0x84, code)))
    assert caught.value.name == name
    assert caught.value.code == code
    assert name in str(caught.value)


def test_expect() -> None:
    assert Expect.read("holding", 3) == Expect(3, byte_count=6)
    assert Expect.read("coil", 9) == Expect(1, byte_count=2)
    assert Expect.read("input", 3).response_pdu_length == 8
    assert Expect(6).response_pdu_length == 5
    assert frames.rtu_response_length(Expect.read("input", 10)) == 25
    assert frames.ascii_response_length(Expect.read("input", 1)) == 1 + 2 * (1 + 4 + 1) + 2
    with pytest.raises(ValueError):
        Expect(0x18)  # Read FIFO Queue: length unknown without pdu_length
    assert Expect(0x2B).response_pdu_length is None  # FC 43: framed by its content (tests/test_modbus_device_id.py)
    assert Expect(0x2B).longest_response_pdu == frames.MAX_PDU
    assert Expect.read("input", 10).longest_response_pdu == 22 and Expect(0x18, pdu_length=9).longest_response_pdu == 9
    with pytest.raises(ValueError):
        Expect(6, byte_count=2)
    with pytest.raises(ValueError):
        Expect(0x80)


# --- RTU ------------------------------------------------------------------------------------------------------------

EXPECT = Expect.read("holding", 2)
GOOD_PDU = b"\x03\x04\x12\x34\x56\x78"
GOOD = rtu(7, GOOD_PDU)


def test_rtu_complete_without_waiting_for_silence() -> None:
    decoder = RtuDecoder(7, EXPECT)
    for byte in GOOD[:-1]:
        assert decoder.feed(bytes((byte,))) is NEED_MORE
    assert decoder.feed(GOOD[-1:]) == GOOD_PDU
    assert decoder.surplus == b""


@pytest.mark.parametrize("cut", range(len(GOOD) + 1))
def test_rtu_split_anywhere(cut: int) -> None:
    assert feed_all(RtuDecoder(7, EXPECT), GOOD, [cut]) == GOOD_PDU
    assert feed_all(RtuDecoder(7, EXPECT), GOOD, list(range(1, len(GOOD)))) == GOOD_PDU


def test_rtu_bytes_after_the_frame_are_surplus() -> None:
    decoder = RtuDecoder(7, EXPECT)
    assert decoder.feed(GOOD + b"\x00\xff") == GOOD_PDU
    assert decoder.surplus == b"\x00\xff"
    assert decoder.feed(b"\x55") == GOOD_PDU  # later bytes too
    assert decoder.surplus == b"\x00\xff\x55"


def test_rtu_exception_frame() -> None:
    decoder = RtuDecoder(7, EXPECT)
    assert decoder.feed(rtu(7, b"\x83\x06")) == b"\x83\x06"


BAD_CRC = GOOD[:-1] + bytes((GOOD[-1] ^ 1,))
RTU_REJECTS = [
    ("crc", BAD_CRC),
    ("crc", GOOD[:3] + b"\x00" + GOOD[4:]),
    ("unit", rtu(8, GOOD_PDU)),
    ("function", rtu(7, b"\x04\x04\x12\x34\x56\x78")),  # answer to another read, CRC right
    ("function", rtu(7, b"\x84\x02")),  # exception to another function
    ("function", rtu(7, b"\x41\x00\x00")),  # a function whose length nobody knows
    ("byte_count", rtu(7, b"\x03\x02\x12\x34")),  # one register short, CRC right
    ("byte_count", rtu(7, b"\x03\x06\x12\x34\x56\x78\x9a\xbc")),  # one register too many
    ("garbage", b"\x00\xff" + GOOD),  # line noise in front of the frame
    ("garbage", b"\x99\x41\x00"),  # noise that cannot even be framed
    ("garbage", rtu(8, b"\x03\x06\x12\x34\x56\x78\x9a\xbc")),  # too long, and not from our unit
]


@pytest.mark.parametrize(("reason", "data"), RTU_REJECTS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(RTU_REJECTS)])
def test_rtu_rejects(reason: str, data: bytes) -> None:
    for cut in range(len(data) + 1):
        decoder = RtuDecoder(7, EXPECT)
        with pytest.raises(FrameRejected) as caught:
            feed_all(decoder, data, [cut])
        assert caught.value.reason == reason, (cut, caught.value)
        with pytest.raises(FrameRejected):  # a spent decoder stays rejected
            decoder.feed(b"")


def test_rtu_impossible_length() -> None:
    """A byte count that makes the frame longer than 256 bytes is "length" (without waiting for 260 bytes)."""
    with pytest.raises(FrameRejected) as caught:
        RtuDecoder(7, Expect(0x17)).feed(b"\x07\x17\xfc")
    assert caught.value.reason == "length"
    with pytest.raises(FrameRejected) as caught:
        RtuDecoder(7, Expect(0x17)).feed(b"\x08\x17\xfc")
    assert caught.value.reason == "garbage"


def test_rtu_incomplete_is_need_more() -> None:
    decoder = RtuDecoder(7, EXPECT)
    assert decoder.feed(GOOD[:-3]) is NEED_MORE
    assert decoder.buffered == len(GOOD) - 3


# --- TCP ------------------------------------------------------------------------------------------------------------


def mbap(tid: int, unit: int, pdu: bytes, protocol: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", tid, protocol, len(pdu) + 1 if length is None else length, unit) + pdu


def test_tcp_encode() -> None:
    assert frames.tcp_encode(0x1234, 1, b"\x03\x00\x00\x00\x02") == bytes.fromhex("1234 0000 0006 01 0300000002")


@pytest.mark.parametrize("cut", range(len(mbap(5, 1, GOOD_PDU)) + 1))
def test_tcp_split_anywhere(cut: int) -> None:
    data = mbap(5, 1, GOOD_PDU)
    assert feed_all(TcpDecoder(5, 1, EXPECT), data, [cut]) == GOOD_PDU
    assert feed_all(TcpDecoder(5, 1, EXPECT), data, list(range(1, len(data)))) == GOOD_PDU


def test_tcp_stale_transaction_skipped_then_ours() -> None:
    decoder = TcpDecoder(5, 1, EXPECT)
    stream = mbap(4, 1, b"\x03\x04\x00\x00\x00\x00") + mbap(5, 1, GOOD_PDU) + b"\x00"
    with pytest.raises(FrameRejected) as caught:
        decoder.feed(stream)
    assert caught.value.reason == "transaction"
    assert decoder.in_sync
    assert decoder.feed() == GOOD_PDU
    assert decoder.surplus == b"\x00"


TCP_REJECTS = [
    ("transaction", mbap(6, 1, GOOD_PDU), True),
    ("unit", mbap(5, 2, GOOD_PDU), True),
    ("function", mbap(5, 1, b"\x04" + GOOD_PDU[1:]), True),
    ("byte_count", mbap(5, 1, b"\x03\x02\x12\x34"), True),
    ("length", mbap(5, 1, b"\x03\x04\x12\x34\x56"), True),  # byte count says 4, 3 data bytes
    ("length", mbap(5, 1, b"\x83\x02\x00"), True),
    ("length", mbap(5, 1, GOOD_PDU, length=1), False),
    ("length", mbap(5, 1, GOOD_PDU, length=300), False),
    ("protocol_id", mbap(5, 1, GOOD_PDU, protocol=1), False),
]


@pytest.mark.parametrize(("reason", "data", "in_sync"), TCP_REJECTS)
def test_tcp_rejects(reason: str, data: bytes, in_sync: bool) -> None:
    for cut in range(len(data) + 1):
        decoder = TcpDecoder(5, 1, EXPECT)
        with pytest.raises(FrameRejected) as caught:
            feed_all(decoder, data, [cut])
        assert caught.value.reason == reason
        assert decoder.in_sync is in_sync


# --- ASCII ----------------------------------------------------------------------------------------------------------

ASCII_GOOD = frames.ascii_encode(7, GOOD_PDU)


def test_ascii_roundtrip_split_anywhere() -> None:
    assert ASCII_GOOD == b":07030412345678DE\r\n"  # LRC: -(7+3+4+0x12+0x34+0x56+0x78) & 0xFF = 0xDE
    for cut in range(len(ASCII_GOOD) + 1):
        assert feed_all(AsciiDecoder(7, EXPECT), ASCII_GOOD, [cut]) == GOOD_PDU
    assert feed_all(AsciiDecoder(7, EXPECT), ASCII_GOOD.lower(), [3]) == GOOD_PDU  # lower-case hex accepted


def ascii_frame(body: bytes, lrc: int | None = None) -> bytes:
    check = frames.lrc(body) if lrc is None else lrc
    return b":" + (body + bytes((check,))).hex().upper().encode() + b"\r\n"


ASCII_REJECTS = [
    ("lrc", ascii_frame(bytes((7,)) + GOOD_PDU, lrc=0)),
    ("unit", ascii_frame(bytes((8,)) + GOOD_PDU)),
    ("function", ascii_frame(b"\x07\x04" + GOOD_PDU[1:])),
    ("byte_count", ascii_frame(b"\x07\x03\x02\x12\x34")),
    ("garbage", b"\r\n" + ASCII_GOOD),
    ("garbage", ASCII_GOOD.replace(b"\r\n", b"\n")),
    ("garbage", ASCII_GOOD.replace(b"12", b"1G")),
    ("length", b":0703\r\n"),
    ("length", b":070312345678041\r\n"),
    ("length", b":" + b"0" * 600),
]


@pytest.mark.parametrize(("reason", "data"), ASCII_REJECTS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(ASCII_REJECTS)])
def test_ascii_rejects(reason: str, data: bytes) -> None:
    for cut in (0, 1, len(data) // 2, len(data)):
        with pytest.raises(FrameRejected) as caught:
            feed_all(AsciiDecoder(7, EXPECT), data, [cut])
        assert caught.value.reason == reason


def test_every_reason_is_covered() -> None:
    rtu_reasons = {r for r, _ in RTU_REJECTS} | {"length"}  # "length": test_rtu_impossible_length
    covered = rtu_reasons | {r for r, _, _ in TCP_REJECTS} | {r for r, _ in ASCII_REJECTS}
    covered |= {r for _, _, r in WRITE_REJECTS}
    assert covered == set(frames.REASONS)


# --- garbage never raises anything else -------------------------------------------------------------------------------

expects = st.one_of(
    st.builds(Expect.read, st.sampled_from(["coil", "discrete", "holding", "input"]), st.integers(1, 125)),
    st.sampled_from([Expect(5), Expect(6), Expect(16), Expect(0x17), Expect(0x2B, pdu_length=12)]),
)


def decoders(unit: int, expect: Expect):
    return [RtuDecoder(unit, expect), TcpDecoder(1, unit, expect), AsciiDecoder(unit, expect)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    unit=st.integers(0, 255),
    expect=expects,
    chunks=st.lists(st.binary(max_size=40), max_size=12),
)
def test_garbage_only_ever_rejected(unit: int, expect: Expect, chunks: list[bytes]) -> None:
    for decoder in decoders(unit, expect):
        for chunk in chunks:
            try:
                result = decoder.feed(chunk)
            except FrameRejected as exc:
                assert exc.reason in frames.REASONS
                if not (isinstance(decoder, TcpDecoder) and exc.reason == "transaction"):
                    break
                continue
            if result is not NEED_MORE:
                # whatever got through really answers the request
                assert isinstance(result, bytes)
                assert result[0] in (expect.function, expect.function | 0x80)
                break


@settings(max_examples=200, deadline=None)
@given(
    unit=st.integers(1, 247),
    count=st.integers(1, 125),
    data=st.data(),
)
def test_valid_frames_split_at_random(unit: int, count: int, data) -> None:
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=count, max_size=count))
    pdu = bytes((3, 2 * count)) + struct.pack(f">{count}H", *registers)
    expect = Expect.read("holding", count)
    for decoder, wire in (
        (RtuDecoder(unit, expect), frames.rtu_encode(unit, pdu)),
        (TcpDecoder(9, unit, expect), frames.tcp_encode(9, unit, pdu)),
        (AsciiDecoder(unit, expect), frames.ascii_encode(unit, pdu)),
    ):
        cuts = sorted(data.draw(st.sets(st.integers(0, len(wire)), max_size=6)))
        assert feed_all(decoder, wire, cuts) == pdu
        assert frames.parse_read_response("holding", count, pdu) == registers


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 20), flip=st.integers(1, 255))
def test_rtu_one_corrupt_byte_never_accepted(position: int, flip: int) -> None:
    pdu = bytes((3, 6)) + bytes(range(6))
    wire = bytearray(frames.rtu_encode(7, pdu))
    position %= len(wire)
    wire[position] ^= flip
    decoder = RtuDecoder(7, Expect.read("holding", 3))
    try:
        result = decoder.feed(bytes(wire))
    except FrameRejected:
        return
    assert result is NEED_MORE  # a corrupted length byte can only make it wait (then time out)


# --- line timing ----------------------------------------------------------------------------------------------------


def test_char_time_and_silence() -> None:
    assert frames.char_time(9600) == pytest.approx(10 / 9600)
    assert frames.char_time(9600, 8, "E", 1) == pytest.approx(11 / 9600)
    assert frames.char_time(9600, 8, "N", 2) == pytest.approx(11 / 9600)
    assert frames.char_time(1200, 7, "O", 1) == pytest.approx(10 / 1200)
    assert frames.frame_silence(9600) == pytest.approx(3.5 * 10 / 9600)
    assert frames.frame_silence(19200, 8, "E") == pytest.approx(3.5 * 11 / 19200)
    assert frames.frame_silence(38400) == 0.00175
    assert frames.frame_silence(115200) == 0.00175
    assert frames.char_gap_limit(9600) == pytest.approx(1.5 * 10 / 9600)
    assert frames.char_gap_limit(115200) == 0.00075
    with pytest.raises(ValueError):
        frames.char_time(9600, parity="X")


def test_rtu_cycle_time() -> None:
    # 8-byte request, 25-byte answer (10 registers) at 9600 8N1: 33 characters + t3.5 before the answer + t3.5
    assert frames.rtu_cycle_time(8, 25, 9600) == pytest.approx(33 * 10 / 9600 + 2 * 3.5 * 10 / 9600)
    assert frames.rtu_cycle_time(8, 25, 115200, turnaround=0.005) == pytest.approx(33 * 10 / 115200 + 0.005 + 0.00175)
