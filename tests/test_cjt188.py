"""CJ/T 188-2004 water, gas and heat meters: frames, the 901F metering data, vendor variants, and a session over
a real pty.

Golden frames are the worked examples of public write-ups of real meters (a cold water meter, SC; a heat meter,
JY, with the unit byte before its value). The water meter's published answer carries CS 08 while its bytes sum to
13H: the example's checksum is wrong (as the DSMR 5.0.2 specification's example CRC is); the test uses the bytes
with the checksum recomputed, and checks that the published one is refused.
"""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.cjt188 import frames
from edge_agent.cjt188.session import Cjt188Session
from edge_agent.serial.base import Rejected
from edge_agent.serial.dialogue import Done, Expect, Send, run_session
from labkit.cjt188_sim import Cjt188Line, MeterLine, SimMeter

WATER_REQ = bytes.fromhex("FE FE FE FE 68 10 44 33 22 11 00 33 78 01 03 1F 90 00 80 16")
WATER_ANS_BODY = bytes.fromhex("68 10 44 33 22 11 00 33 78 81 16 1F 90 00 00 77 66 55 2C 00 77 66 55 2C 31 01 22 11 "
                               "05 15 20 21 84")
WATER_ANS = WATER_ANS_BODY + bytes([frames.checksum(WATER_ANS_BODY), 0x16])
HEAT_REQ = bytes.fromhex("FE FE FE FE 68 20 32 41 31 40 00 00 00 01 03 90 1F 01 20 16")
HEAT_ANS_BODY = bytes.fromhex("68 20 32 41 31 40 00 00 00 81 2E 90 1F 01 08 02 00 00 00 08 02 00 00 00 17 00 00 00 "
                              "00 35 00 00 00 00 2C 34 10 00 00 35 25 00 66 25 00 00 00 00 53 00 12 10 07 15 20 00 00")
HEAT_ANS = HEAT_ANS_BODY + bytes([frames.checksum(HEAT_ANS_BODY), 0x16])


def test_golden_requests() -> None:
    assert frames.read_request(0x10, "78330011223344") == WATER_REQ
    # the JY heat meter: DI sent high byte first, sequence number 1
    assert frames.read_request(0x20, "00000040314132", order="high_first", ser=1) == HEAT_REQ


def test_the_published_water_answer_checksum_is_refused_and_the_bytes_decode() -> None:
    with pytest.raises(frames.FrameError, match="checksum: CS 08 at offset 33, computed 13"):
        frames.parse(WATER_ANS_BODY + b"\x08\x16")
    m = frames.metering(frames.parse(WATER_ANS))
    assert m.measurement == "water"
    assert m.fields == {"volume": 556677.0, "volume_settlement": 556677.0, "meter_time": "2015-05-11T22:01:31",
                        "status": 0x8421, "valve_state": 1, "battery_low": False}
    assert m.units == {"volume": "m³", "volume_settlement": "m³"}


def test_heat_meter_with_the_unit_first_converts_into_the_vocabulary() -> None:
    m = frames.metering(frames.parse(HEAT_ANS), unit_first=True)
    assert m.measurement == "heat"
    assert m.fields["energy"] == 20.0  # 0.02 MWh
    assert m.fields["volume"] == 10.34 and m.fields["temperature_supply"] == 25.35
    assert m.fields["temperature_return"] == 25.66 and m.fields["meter_time"] == "2015-07-10T12:00:53"
    # read as the standard's order (value, then unit), the same bytes name a unit of the wrong kind: refused
    with pytest.raises(frames.FrameError, match=r"unit: heat at the settlement day: unit byte 00 at data byte 7"):
        frames.metering(frames.parse(HEAT_ANS))


def test_units_convert_into_the_vocabulary() -> None:
    meter = SimMeter(0x20, "1")
    for unit, value, expect in [(0x11, 1.0, 277.777778), (0x0E, 3.6, 1.0), (0x08, 1.5, 1500.0)]:
        body = bytearray(meter.metering(meter.start))
        raw = frames.di_bytes(frames.DI_METERING) + b"\x00"
        digits = str(round(value * 100)).zfill(8)
        raw += bytes(int(digits[i:i + 2], 16) for i in range(6, -2, -2)) + bytes([unit])
        body[:len(raw)] = raw
        frame = frames.parse(frames.build(0x20, "1", 0x81, bytes(body)))
        assert frames.metering(frame).fields["energy_settlement"] == pytest.approx(expect)


def test_bad_data_names_the_byte() -> None:
    bad = bytearray(WATER_ANS_BODY)
    bad[15] = 0x7A  # data byte 4: the second byte of the first value
    with pytest.raises(frames.FrameError, match="not_bcd: current accumulated flow: byte 4 of the data is 7A"):
        frames.metering(frames.parse(bytes(bad) + bytes([frames.checksum(bad), 0x16])))
    short = frames.build(0x10, "1", 0x81, frames.di_bytes(frames.DI_METERING) + b"\x00" + bytes(4) + b"\x2c")
    with pytest.raises(frames.FrameError, match="short: accumulated flow at the settlement day: needs data bytes"):
        frames.metering(frames.parse(short))
    with pytest.raises(frames.FrameError, match="wrong_identifier"):
        frames.metering(frames.parse(frames.build(0x10, "1", 0x81, b"\x1f\x91\x00")))


def _all(chunks: list[bytes]) -> list:
    d = frames.Deframer()
    events = []
    for c in chunks:
        events += d.feed(c)
    return events + d.flush()


def test_deframer_every_split_and_every_bit_flip() -> None:
    stream = b"\x00\x01" + WATER_ANS + b"\xfe\xfe" + HEAT_ANS
    whole = _all([stream])
    assert [type(e).__name__ for e in whole] == ["Rejected", "Frame", "Frame"]
    assert whole[0] == Rejected(0, "garbage", "bytes outside a CJ/T 188 frame", 2)
    for cut in range(1, len(stream)):
        assert _all([stream[:cut], stream[cut:]]) == whole, cut
    original = frames.parse(WATER_ANS)
    for i in range(len(WATER_ANS)):
        for bit in range(8):
            damaged = bytearray(WATER_ANS)
            damaged[i] ^= 1 << bit
            assert all(e == original for e in _all([bytes(damaged)]) if isinstance(e, frames.Frame)), (i, bit)


def _drive(session: Cjt188Session, line: MeterLine) -> None:
    pending = None
    while True:
        step = session.next_step()
        if isinstance(step, Send):
            pending = line.answer(step.data)
        elif isinstance(step, Expect):
            if pending:
                session.feed(pending[:7])
                session.feed(pending[7:])
                pending = None
            else:
                session.timeout()
        else:
            assert isinstance(step, Done)
            return


def test_sessions_for_water_gas_heat_and_a_silent_meter() -> None:
    line = MeterLine([SimMeter(0x10, "11111111111111"), SimMeter(0x30, "22"),
                      SimMeter(0x20, "33", unit_first=True, di_order="high_first")])
    water = Cjt188Session(0x10, "11111111111111")
    _drive(water, line)
    assert water.result.measurement == "water" and water.result.fields["volume"] > 0 and not water.result.error
    gas = Cjt188Session(0x30, "22")
    _drive(gas, line)
    assert gas.result.measurement == "gas" and gas.result.units["volume"] == "m³"
    heat = Cjt188Session(0x20, "33", unit_first=True, di_order="high_first")
    _drive(heat, line)
    assert heat.result.fields["power"] == 12500.0 and heat.result.fields["temperature_supply"] == 65.12
    silent = Cjt188Session(0x10, "99")
    _drive(silent, line)
    assert silent.result.silent and silent.sample({}) is None


def test_session_over_a_pty() -> None:
    from edge_agent.serial.port import SerialStream

    sim = Cjt188Line([SimMeter(0x10, "11111111111111"), SimMeter(0x20, "33")])

    async def main() -> tuple:
        port = SerialStream(sim.device, 2400, 8, "E", 1)
        await port.open()
        try:
            return (await run_session(Cjt188Session(0x10, "11111111111111"), port),
                    await run_session(Cjt188Session(0x20, "33"), port))
        finally:
            await port.aclose()

    try:
        water, heat = asyncio.run(main())
    finally:
        sim.close()
    assert not water.error and water.fields["volume"] >= 123.45
    assert not heat.error and heat.fields["energy"] >= 1234.56
