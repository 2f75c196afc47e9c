"""DL/T 645-2007 / -1997: frames, identifier values, the poll session, and a session over a real pty.

Golden frames: the read of 00010000 (forward active total energy) from meter 000102030425 and its answer
1206.42 kWh, and the 1997 read of B611 (phase A voltage) from meter 000000000003 answering 100 V, are the worked
examples published with the standard's explanations (see edge_agent/dlt645/frames.py); both check against the
checksum rule of DL/T 645-2007 §4.2.6 computed here independently.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from edge_agent.dlt645 import frames
from edge_agent.dlt645.identifiers import ValueError645, decode_value, encode_value, table
from edge_agent.dlt645.session import Dlt645Session, Done, Expect, Send, run_session
from edge_agent.serial.base import Rejected
from labkit.dlt645_sim import Dlt645Line, MeterBank, SimMeter

REQ_2007 = bytes.fromhex("68 25 04 03 02 01 00 68 11 04 33 33 34 33 E1 16")
ANS_2007 = bytes.fromhex("68 25 04 03 02 01 00 68 91 08 33 33 34 33 75 39 45 33 8B 16")
REQ_1997 = bytes.fromhex("68 03 00 00 00 00 00 68 01 02 44 E9 03 16")
ANS_1997 = bytes.fromhex("68 03 00 00 00 00 00 68 81 04 44 E9 33 34 EC 16")
READ_ADDRESS = bytes.fromhex("FE FE FE FE 68 AA AA AA AA AA AA 68 13 00 DF 16")


# -- frames -------------------------------------------------------------------------------------------------------


def test_golden_requests_are_built_byte_for_byte() -> None:
    assert frames.read_request("000102030425", 0x00010000, "2007", wake=0) == REQ_2007
    assert frames.read_request("3", 0xB611, "1997", wake=0) == REQ_1997
    assert frames.read_request("000102030425", 0x00010000, "2007") == b"\xfe" * 4 + REQ_2007
    assert frames.read_address_request() == READ_ADDRESS


def test_golden_answers_decode_to_the_published_values() -> None:
    ident = table("2007").by_code()[0x00010000]
    answer = frames.read_answer(frames.parse(ANS_2007), "000102030425", ident.code, "2007")
    assert isinstance(answer, frames.ReadAnswer)
    assert decode_value(ident, answer.value) == 1206.42
    ident97 = table("1997").by_code()[0xB611]
    answer97 = frames.read_answer(frames.parse(ANS_1997), "3", ident97.code, "1997")
    assert isinstance(answer97, frames.ReadAnswer)
    assert decode_value(ident97, answer97.value) == 100.0


def test_address_is_bcd_low_byte_first() -> None:
    assert frames.encode_address("102030405060") == bytes.fromhex("60 50 40 30 20 10")
    assert frames.decode_address(bytes.fromhex("60 50 40 30 20 10")) == "102030405060"
    assert frames.encode_address("12") == bytes.fromhex("12 00 00 00 00 00")
    for bad in ("", "12a", "1234567890123", "-1"):
        with pytest.raises(ValueError, match="12 decimal digits"):
            frames.encode_address(bad)


def test_parse_names_what_is_wrong_and_where() -> None:
    bad_cs = bytearray(REQ_2007)
    bad_cs[-2] ^= 0xFF
    with pytest.raises(frames.FrameError, match=r"checksum: CS 1E at offset 14, computed E1"):
        frames.parse(bytes(bad_cs))
    with pytest.raises(frames.FrameError, match="length"):
        frames.parse(REQ_2007[:-1])
    wrong_start = bytearray(REQ_2007)
    wrong_start[7] = 0x69
    with pytest.raises(frames.FrameError, match="expected 68 at offset 7"):
        frames.parse(bytes(wrong_start))
    bad_end = bytearray(REQ_2007)
    bad_end[-1] = 0x17
    with pytest.raises(frames.FrameError, match="expected 16 at offset 15"):
        frames.parse(bytes(bad_end))


def test_abnormal_answers_name_their_error_bits() -> None:
    ab = frames.parse(frames.build("000102030425", 0xD1, bytes([0x02])))
    answer = frames.read_answer(ab, "000102030425", 0x00010000, "2007")
    assert isinstance(answer, frames.Abnormal) and answer.names == ("no_such_data",)
    ab97 = frames.parse(frames.build("3", 0xC1, bytes([0x05])))
    answer97 = frames.read_answer(ab97, "3", 0xB611, "1997")
    assert isinstance(answer97, frames.Abnormal) and answer97.names == ("illegal_data", "wrong_password")


def test_answers_to_something_else_are_refused() -> None:
    with pytest.raises(frames.FrameError, match="wrong_address"):
        frames.read_answer(frames.parse(ANS_2007), "000102030426", 0x00010000, "2007")
    with pytest.raises(frames.FrameError, match="wrong_identifier"):
        frames.read_answer(frames.parse(ANS_2007), "000102030425", 0x00020000, "2007")
    with pytest.raises(frames.FrameError, match="unexpected"):
        frames.read_answer(frames.parse(REQ_2007), "000102030425", 0x00010000, "2007")  # a request, not an answer
    assert frames.address_answer(frames.parse(frames.build("000102030425", 0x93, frames.encode_address(
        "000102030425")))) == "000102030425"


# -- the stream deframer: splits, garbage, bit flips -----------------------------------------------------------


def _all(deframer: frames.Deframer, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        events += deframer.feed(chunk)
    return events + deframer.flush()


def test_deframer_same_result_for_every_split() -> None:
    stream = b"\xfe\xfe" + ANS_2007 + b"noise" + b"\xfe" * 4 + ANS_1997
    whole = _all(frames.Deframer(), [stream])
    assert [type(e).__name__ for e in whole] == ["Frame", "Rejected", "Frame"]
    assert whole[0].offset == 2 and whole[2].offset == 2 + len(ANS_2007) + 5 + 4
    assert whole[1] == Rejected(2 + len(ANS_2007), "garbage", "bytes outside a DL/T 645 frame", 5)
    for cut in range(1, len(stream)):
        assert _all(frames.Deframer(), [stream[:cut], stream[cut:]]) == whole, cut
    assert _all(frames.Deframer(), [bytes([b]) for b in stream]) == whole


def test_deframer_every_single_bit_flip_is_caught_or_harmless() -> None:
    """A flipped bit never yields a frame that differs from the original: the checksum (or the structure)
    catches it - except flips that leave a valid different frame, which the arithmetic sum cannot see
    (two compensating flips); a single flip always changes the sum."""
    original = frames.parse(ANS_2007)
    for i in range(len(ANS_2007)):
        for bit in range(8):
            damaged = bytearray(ANS_2007)
            damaged[i] ^= 1 << bit
            got = [e for e in _all(frames.Deframer(), [bytes(damaged)]) if isinstance(e, frames.Frame)]
            assert all(f == original for f in got), (i, bit, got)


def test_deframer_finds_a_frame_after_a_false_start_and_bounds_its_buffer() -> None:
    # a 68 in the noise that looks like a header start must not swallow the real frame behind it
    stream = bytes.fromhex("68 01 02 03 04 05 06 68 91 40") + ANS_2007
    events = _all(frames.Deframer(), [stream])
    assert any(isinstance(e, frames.Frame) and e.data == frames.parse(ANS_2007).data for e in events)
    d = frames.Deframer()
    rng = random.Random(7)
    for _ in range(200):
        d.feed(bytes(rng.randrange(256) for _ in range(97)))
        assert len(d._buf) <= d.max_buffer


# -- identifier tables and values -------------------------------------------------------------------------------


@pytest.mark.parametrize("edition", ["2007", "1997"])
def test_every_identifier_round_trips_through_its_format(edition: str) -> None:
    sim = SimMeter("1", edition=edition)  # type: ignore[arg-type]
    for ident in table(edition).identifiers:
        value = sim.value(ident, sim.clock + 1000.0)
        raw = encode_value(ident, value)
        assert len(raw) == ident.size, ident.name
        assert decode_value(ident, raw) == value, ident.name
        if isinstance(value, (int, float)):
            assert isinstance(decode_value(ident, raw), float), ident.name  # one type per field in the store


def test_sign_bit_and_unit_conversion() -> None:
    power = table("2007").by_code()[0x02030000]  # XX.XXXX kW, signed -> W
    assert decode_value(power, bytes.fromhex("56 34 92")) == -12345.6  # 12.3456 kW, sign bit set
    assert decode_value(power, bytes.fromhex("56 34 12")) == 12345.6
    current = table("2007").by_code()[0x02020100]
    assert decode_value(current, bytes.fromhex("00 50 80")) == -5.0


def test_bad_values_name_the_identifier_and_byte() -> None:
    energy = table("2007").by_code()[0x00010000]
    with pytest.raises(ValueError645, match=r"00010000 \(energy_import\): byte 2 of the value is FA, not BCD"):
        decode_value(energy, bytes.fromhex("42 06 FA 00"))
    with pytest.raises(ValueError645, match=r"3 value bytes, format XXXXXX\.XX has 4"):
        decode_value(energy, bytes.fromhex("42 06 12"))
    date = table("2007").by_code()[0x04000101]
    with pytest.raises(ValueError645, match="not a date"):
        decode_value(date, bytes.fromhex("00 13 13 26"))


def test_tables_use_unique_identifiers_and_names() -> None:
    for edition in ("2007", "1997"):
        t = table(edition)
        assert len(t.by_code()) == len(t.identifiers) == len(t.by_name())


# -- the session (pure) ---------------------------------------------------------------------------------------


def _drive(session: Dlt645Session, bank: MeterBank, split: int = 0) -> list:
    steps = []
    pending = None
    while True:
        step = session.next_step()
        steps.append(step)
        if isinstance(step, Send):
            pending = bank.answer(step.data)
        elif isinstance(step, Expect):
            if pending:
                chunks = [pending[:split], pending[split:]] if split else [pending]
                for c in chunks:
                    session.feed(c)
                pending = None
            else:
                session.timeout()
        else:
            return steps


def test_session_reads_every_identifier_and_marks_missing_ones() -> None:
    bank = MeterBank([SimMeter("000102030425", omit={"frequency"}), SimMeter("000000000012", edition="1997")],
                     now=lambda: 1_790_000_000.0)
    idents = [table("2007").by_name()[n] for n in ("energy_import", "frequency", "power", "voltage_l1")]
    s = Dlt645Session("000102030425", "2007", idents)
    _drive(s, bank, split=3)
    assert s.result.fields["energy_import"] > 1206
    assert s.result.fields["power"] == 3456.7
    assert s.result.quality == {"frequency": "not_available"}
    assert "abnormal answer 02 (no_such_data)" in s.result.errors[0]
    assert s.result.transactions == 4 and not s.result.silent
    sample = s.sample("electricity", {"meter": "000102030425"})
    assert sample is not None and sample.units["power"] == "W"


def test_a_silent_meter_costs_one_timeout() -> None:
    bank = MeterBank([SimMeter("000102030425")])
    s = Dlt645Session("000000000099", "2007", table("2007").identifiers)
    steps = _drive(s, bank)
    assert sum(isinstance(x, Expect) for x in steps) == 1 and isinstance(steps[-1], Done)
    assert s.result.silent and s.sample("electricity", {}) is None


def test_a_late_answer_to_an_earlier_request_is_not_taken_for_the_current_one() -> None:
    idents = [table("2007").by_name()[n] for n in ("energy_import", "voltage_l1")]
    s = Dlt645Session("000102030425", "2007", idents)
    assert isinstance(s.next_step(), Send)
    assert isinstance(s.next_step(), Expect)
    s.feed(b"")
    s.result.fields["x"] = 1  # pretend an earlier field came through, so the timeout is not "silent"
    s.timeout()
    assert isinstance(s.next_step(), Send)  # voltage_l1 asked
    s.feed(ANS_2007)  # the late energy answer arrives now
    assert not s.finished and "voltage_l1" not in s.result.fields
    assert s.rejected[-1].reason == "wrong_identifier"


# -- over a real pty ----------------------------------------------------------------------------------------------


def test_session_over_a_pty_with_two_meters_of_both_editions() -> None:
    from edge_agent.serial.port import SerialStream

    line = Dlt645Line([SimMeter("000102030425"), SimMeter("000000000012", edition="1997")])

    async def main() -> tuple:
        port = SerialStream(line.device, 2400, 8, "E", 1)
        await port.open()
        try:
            r07 = await run_session(Dlt645Session("000102030425", "2007", table("2007").identifiers[:6]), port)
            r97 = await run_session(Dlt645Session("12", "1997", table("1997").identifiers[:4]), port)
            return r07, r97
        finally:
            await port.aclose()

    try:
        r07, r97 = asyncio.run(main())
    finally:
        line.close()
    assert not r07.errors and len(r07.fields) == 6 and r07.fields["energy_import"] >= 1206.42
    assert not r97.errors and len(r97.fields) == 4
