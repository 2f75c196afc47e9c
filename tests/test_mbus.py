"""Wired M-Bus (EN 13757-2/-3): link frames, the variable data records against libmbus's suite of 76 real
telegrams (tests/fixtures/mbus/libmbus, NOTICE.md), the dialogue with multi-telegram reads and secondary
addressing, and a session over a real pty."""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.mbus import frames, records
from edge_agent.mbus.session import MbusSession
from edge_agent.serial.base import Rejected
from edge_agent.serial.dialogue import Done, Expect, Send, run_session
from labkit import mbus_suite
from labkit.mbus_sim import MbusLine, MbusMeters, SimMeter

ABB_F95 = bytes.fromhex((mbus_suite.SUITE / "abb_f95.hex").read_text())


# -- link layer ---------------------------------------------------------------------------------------------------


def test_short_and_long_frames_are_built_by_the_standard() -> None:
    assert frames.snd_nke(1) == bytes.fromhex("10 40 01 41 16")
    assert frames.req_ud2(1, fcb=True) == bytes.fromhex("10 7B 01 7C 16")
    assert frames.req_ud2(254, fcb=False) == bytes.fromhex("10 5B FE 59 16")
    # select 12345678, any manufacturer / version / medium: 68 0B 0B 68 53 FD 52 78 56 34 12 FF FF FF FF CS 16
    sel = frames.select_secondary("12345678FFFFFFFF")
    assert sel == bytes.fromhex("68 0B 0B 68 53 FD 52 78 56 34 12 FF FF FF FF") + bytes(
        [frames.checksum(sel[4:-2]), 0x16])
    with pytest.raises(ValueError, match="16 hex digits"):
        frames.select_secondary("1234")


def test_parse_names_what_is_wrong_and_where() -> None:
    bad = bytearray(ABB_F95)
    bad[-2] ^= 0x01
    with pytest.raises(frames.FrameError, match=r"checksum: CS .. at offset 98, computed"):
        frames.parse(bytes(bad))
    with pytest.raises(frames.FrameError, match="length"):
        frames.parse(ABB_F95[:-1])
    with pytest.raises(frames.FrameError, match="checksum"):
        frames.parse(bytes.fromhex("10 40 01 40 16"))


def _all(chunks: list[bytes]) -> list:
    d = frames.Deframer()
    events = []
    for c in chunks:
        events += d.feed(c)
    return events + d.flush()


def test_deframer_every_split_garbage_and_bit_flips() -> None:
    stream = b"\xe5" + b"zz" + ABB_F95 + frames.snd_nke(3)
    whole = _all([stream])
    assert [e.kind if isinstance(e, frames.Frame) else e.reason for e in whole] == ["ack", "garbage", "long", "short"]
    assert whole[1] == Rejected(1, "garbage", "bytes outside an M-Bus frame", 2)
    for cut in range(1, len(stream)):
        assert _all([stream[:cut], stream[cut:]]) == whole, cut
    original = frames.parse(ABB_F95)
    for i in range(len(ABB_F95)):
        for bit in range(8):
            damaged = bytearray(ABB_F95)
            damaged[i] ^= 1 << bit
            longs = [e for e in _all([bytes(damaged)]) if isinstance(e, frames.Frame) and e.kind == "long"]
            assert all(f == original for f in longs), (i, bit)


# -- application layer: the libmbus suite -----------------------------------------------------------------------


def test_the_libmbus_suite_decodes_and_agrees() -> None:
    """Every value libmbus decodes, we decode to the same number in our unit; where the meter sent "no valid
    value" (BCD digits A-F) we give none, where libmbus makes one up; only the two telegrams of the legacy fixed
    data structure (CI 73H) are not decoded (bench/mbus_parsers.py compares pyMeterBus on the same suite)."""
    cases = mbus_suite.load()
    assert len(cases) == 76
    s = mbus_suite.score(cases, mbus_suite.citynerve_values)
    assert s.disagree == 0 and s.invented == 0, s.problems[:10]
    assert s.agree >= 628 and s.refused == 4
    assert s.failed_telegrams == 2 and all("CI 73H" in p for p in s.problems), s.problems


def test_records_of_a_heat_meter() -> None:
    f = frames.parse(ABB_F95)
    t = records.decode(f.ci, f.data)
    assert t.header.identification == "26718590" and t.header.manufacturer == "HYD" and t.measurement == "heat"
    assert t.header.secondary_address == "2671859023242804"
    values, quality, units = t.fields()
    assert values["volume"] == 0.0742 and units["volume"] == "m³"
    assert values["temperature_supply"] == 20.4 and values["meter_time"] == "2012-01-13T16:34"
    assert values["operating_time"] == 86553 * 3600.0 and values["energy_s1"] == 0.0
    assert quality == {"power_error": "error", "flow_error": "error"}  # DD B4 EB DD: no valid value
    # one type per field in the store: numbers are floats, dates text
    assert {k for k, v in values.items() if not isinstance(v, float)} == {"meter_time", "meter_time_s1",
                                                                           "meter_time_x7e_s1", "meter_time_s2"}


def test_bad_records_name_their_byte() -> None:
    f = frames.parse(ABB_F95)
    with pytest.raises(records.TelegramError, match=r"short: record at byte 86: 3 data bytes from byte 88"):
        records.decode(f.ci, f.data[:-3])
    with pytest.raises(records.TelegramError, match="unsupported: CI 73H"):
        records.decode(0x73, f.data)
    with pytest.raises(records.TelegramError, match="DIFEs"):
        records.decode(0x78, bytes([0x84]))


# -- the dialogue -----------------------------------------------------------------------------------------------


def _split(telegram: bytes) -> tuple[bytes, bytes]:
    """The ABB telegram as two: its records up to the first date with DIF 1FH, then the rest."""
    f = frames.parse(telegram)
    header, body = f.data[:12], f.data[12:]
    first = frames.long_frame(0x08, f.address, f.ci, header + body[:35] + b"\x1f")
    second = frames.long_frame(0x08, f.address, f.ci, header + body[35:])
    return first, second


def _drive(session: MbusSession, meters: MbusMeters, drop_first_answer: bool = False) -> list:
    steps, pending, dropped = [], None, False
    while True:
        step = session.next_step()
        steps.append(step)
        if isinstance(step, Send):
            pending = meters.answer(step.data)
            if drop_first_answer and not dropped and step.data[0] == frames.SHORT_START and step.data[1] & 0xDF == 0x5B:
                pending, dropped = None, True
        elif isinstance(step, Expect):
            if pending:
                session.feed(pending)
                pending = None
            else:
                session.timeout()
        else:
            assert isinstance(step, Done)
            return steps


def test_multi_telegram_read_toggles_the_fcb() -> None:
    first, second = _split(ABB_F95)
    meter = SimMeter(5, [first, second])
    s = MbusSession(primary=5)
    _drive(s, MbusMeters([meter]))
    assert not s.result.error and len(s.result.telegrams) == 2
    assert meter.requests == [0x7B, 0x5B]  # FCB set, then clear
    sample = s.result.sample({"meter": "5"})
    assert sample is not None and sample.fields["volume"] == 0.0742 and "operating_time_p2" in sample.fields


def test_secondary_addressing_with_wildcards() -> None:
    a = SimMeter(7, [ABB_F95])
    other = SimMeter(8, [bytes.fromhex((mbus_suite.SUITE / "kamstrup_multical_601.hex").read_text())])
    meters = MbusMeters([a, other])
    s = MbusSession(secondary="26718590FFFFFFFF")
    _drive(s, meters)
    assert not s.result.error and s.result.telegrams[0].header.identification == "26718590"
    nobody = MbusSession(secondary="99999999FFFFFFFF")
    _drive(nobody, meters)
    assert nobody.result.silent and "selection" in nobody.result.error


def test_a_silent_meter_and_one_without_reset_answer() -> None:
    meters = MbusMeters([SimMeter(9, [ABB_F95], answers_reset=False)])
    s = MbusSession(primary=9)
    _drive(s, meters)
    assert not s.result.error and len(s.result.telegrams) == 1  # no E5 to SND_NKE: tolerated
    silent = MbusSession(primary=10)
    _drive(silent, meters)
    assert silent.result.silent and silent.result.sample({}) is None


def test_session_over_a_pty() -> None:
    from edge_agent.serial.port import SerialStream

    first, second = _split(ABB_F95)
    line = MbusLine([SimMeter(5, [first, second])])

    async def main():  # type: ignore[no-untyped-def]
        port = SerialStream(line.device, 2400, 8, "E", 1)
        await port.open()
        try:
            return await run_session(MbusSession(primary=5), port)
        finally:
            await port.aclose()

    try:
        result = asyncio.run(main())
    finally:
        line.close()
    assert not result.error and len(result.telegrams) == 2
