"""Read Device Identification (FC 43 / MEI 14, Modbus Application Protocol 1.1b §6.21): the frames
(edge_agent/modbus/frames.py), the reader (edge_agent/modbus/identify.py, pure) and the bus engine asking a
real pymodbus server (labkit/meter_sim.py) once per device."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.modbus import frames
from edge_agent.modbus.bus import IDENTIFY_ATTEMPTS, IDENTIFY_POSTPONE, BusEngine
from edge_agent.modbus.devices import polled_device
from edge_agent.modbus.frames import (
    NEED_MORE,
    AsciiDecoder,
    Expect,
    FrameRejected,
    ModbusExceptionResponse,
    RtuDecoder,
    TcpDecoder,
)
from edge_agent.modbus.identify import DeviceIdReader, Identified, NotOffered, object_text
from edge_agent.profiles import load_profile
from labkit.meter_sim import SIMULATOR_IDENTITY, MeterSimulator
from wire.config import convert


def page(code: int, conformity: int, more: int, next_id: int, objects: list[tuple[int, bytes]],
         count: int | None = None) -> bytes:
    """A response PDU built here, independently of the parser."""
    body = b"".join(bytes((i, len(v))) + v for i, v in objects)
    return bytes((0x2B, 0x0E, code, conformity, more, next_id, len(objects) if count is None else count)) + body


# §6.21's example: the basic objects of a device at conformity level 01, in one answer.
SPEC_REQUEST = bytes.fromhex("2B 0E 01 00")
SPEC_RESPONSE = page(0x01, 0x01, 0x00, 0x00,
                     [(0x00, b"Company identification"), (0x01, b"Product code XX"), (0x02, b"V2.11")])
# A real meter's RTU frames, CRC included (KBR multicomp F144 manual, 25359_EDEBDA0279-2320-1_EN, p. 63):
# unit 1 asked for its basic identification.
KBR_REQUEST = bytes.fromhex("01 2B 0E 01 00 70 77")
KBR_RESPONSE = bytes.fromhex(
    "01 2B 0E 01 01 00 00 03 00 08 4B 42 52 20 47 6D 62 48 01 12 6D 75 6C 74 69 63 6F 6D 70 20 46 31 34 34 2D 33"
    " 20 20 02 09 20 32 2E 30 30 72 30 31 36 CD DB")


def test_the_specs_example() -> None:
    assert frames.device_id_request(frames.BASIC_STREAM, 0) == SPEC_REQUEST
    got = frames.parse_device_id_response(frames.BASIC_STREAM, SPEC_RESPONSE)
    assert got == frames.DeviceIdPage(1, 0x01, False, 0, (
        (0, b"Company identification"), (1, b"Product code XX"), (2, b"V2.11")))
    reader = DeviceIdReader(code=frames.BASIC_STREAM)
    assert reader.next_request() == SPEC_REQUEST
    reader.answered(SPEC_RESPONSE)
    assert reader.outcome == Identified(1, {0: "Company identification", 1: "Product code XX", 2: "V2.11"})
    assert reader.outcome.named() == {"vendor_name": "Company identification", "product_code": "Product code XX",
                                      "revision": "V2.11"}
    assert reader.next_request() is None


def test_a_real_meters_rtu_frames() -> None:
    assert frames.rtu_encode(1, frames.device_id_request(frames.BASIC_STREAM)) == KBR_REQUEST
    for cut in range(1, len(KBR_RESPONSE)):  # the frame's end is found from its object list, however it arrives
        decoder = RtuDecoder(1, Expect.device_id())
        assert decoder.feed(KBR_RESPONSE[:cut]) is NEED_MORE
        pdu = decoder.feed(KBR_RESPONSE[cut:] + b"\x01\x02")
        assert pdu == KBR_RESPONSE[1:-2] and decoder.surplus == b"\x01\x02"
    reader = DeviceIdReader(code=frames.BASIC_STREAM)
    reader.answered(KBR_RESPONSE[1:-2])
    assert reader.outcome == Identified(1, {0: "KBR GmbH", 1: "multicomp F144-3", 2: "2.00r016"})


def test_the_same_answer_over_tcp_and_ascii() -> None:
    pdu = KBR_RESPONSE[1:-2]
    assert TcpDecoder(9, 1, Expect.device_id()).feed(frames.tcp_encode(9, 1, pdu)) == pdu
    assert AsciiDecoder(1, Expect.device_id()).feed(frames.ascii_encode(1, pdu)) == pdu


def test_more_follows_is_read_in_further_transactions() -> None:
    """The regular objects over three answers (each "more follows" with NextObjectId), as a device with little
    room per answer sends them."""
    reader = DeviceIdReader()
    assert reader.next_request() == bytes.fromhex("2B 0E 02 00")
    reader.answered(page(2, 0x82, 0xFF, 0x02, [(0, b"ACME"), (1, b"M-100")]))
    assert reader.outcome is None and reader.next_request() == bytes.fromhex("2B 0E 02 02")
    reader.answered(page(2, 0x82, 0xFF, 0x05, [(2, b"3.1"), (3, b"https://acme.example"), (4, b"Meter")]))
    assert reader.next_request() == bytes.fromhex("2B 0E 02 05")
    reader.answered(page(2, 0x82, 0x00, 0x00, [(5, b"M-100-EU"), (6, b"hall \x00 A\n"), (0x80, b"private")]))
    assert reader.outcome == Identified(0x82, {0: "ACME", 1: "M-100", 2: "3.1", 3: "https://acme.example",
                                               4: "Meter", 5: "M-100-EU", 6: "hall   A"})
    assert reader.transactions == 3


def test_a_device_that_loops_or_never_ends_is_cut_off() -> None:
    looping = DeviceIdReader()
    looping.answered(page(2, 0x82, 0xFF, 0x01, [(0, b"A"), (1, b"B")]))
    looping.answered(page(2, 0x82, 0xFF, 0x01, [(1, b"B")]))  # NextObjectId not forward: stop, keep what we have
    assert looping.outcome == Identified(0x82, {0: "A", 1: "B"})


@pytest.mark.parametrize(("refusals", "outcome", "requests"), [
    ([1], "not_offered", ["2B0E0200"]),  # illegal function: not offered, not asked again
    ([3, 1], "not_offered", ["2B0E0200", "2B0E0100"]),  # regular not supported, then basic refused
    ([2, 2], "not_offered", ["2B0E0200", "2B0E0100"]),
    ([3], None, ["2B0E0200", "2B0E0100"]),  # regular not supported: the basic stream is asked next
])
def test_refusals(refusals: list[int], outcome: str | None, requests: list[str]) -> None:
    reader = DeviceIdReader()
    asked = []
    for code in refusals:
        asked.append(reader.next_request().hex().upper())
        assert reader.refused(code)
    if outcome is None:
        asked.append(reader.next_request().hex().upper())
        reader.answered(SPEC_RESPONSE)
        assert isinstance(reader.outcome, Identified)
    else:
        assert isinstance(reader.outcome, NotOffered) and reader.next_request() is None
    assert asked == [r.upper() for r in requests]


def test_a_busy_or_failing_device_is_not_an_answer() -> None:
    reader = DeviceIdReader()
    assert not reader.refused(6) and not reader.refused(4)
    assert reader.outcome is None and reader.next_request() == bytes.fromhex("2B 0E 02 00")


def test_an_answer_without_objects_is_not_offered() -> None:
    reader = DeviceIdReader()
    reader.answered(page(2, 0x83, 0, 0, []))  # what pymodbus answers with an empty identity
    assert isinstance(reader.outcome, NotOffered)


@pytest.mark.parametrize(("pdu", "reason"), [
    (page(2, 1, 0, 0, [(0, b"A")], count=2), "length"),  # fewer objects than counted
    (page(2, 1, 0, 0, [(0, b"A")]) + b"x", "length"),  # bytes after the objects
    (page(2, 1, 0, 0, [(0, b"A")])[:-1], "length"),  # an object runs past the end
    (page(2, 1, 0x01, 0, [(0, b"A")]), "length"),  # More Follows must be 00 or FF
    (bytes.fromhex("2B 0E 02 01 00"), "length"),  # a header cut short
    (page(1, 1, 0, 0, [(0, b"A")]), "function"),  # answers another Read Device ID code
    (bytes.fromhex("2B 0D 02 01 00 00 00"), "function"),  # another MEI type
    (bytes.fromhex("03 02 00 01"), "function"),
    (bytes.fromhex("AB 01 00"), "length"),
])
def test_answers_that_do_not_fit_the_request_are_rejected(pdu: bytes, reason: str) -> None:
    reader = DeviceIdReader()
    with pytest.raises(FrameRejected) as caught:
        reader.answered(pdu)
    assert caught.value.reason == reason
    assert reader.transactions == 0 and reader.outcome is None  # unchanged: the shell tries again later


def test_exception_answer_and_one_object_rules() -> None:
    with pytest.raises(ModbusExceptionResponse) as caught:
        frames.parse_device_id_response(2, bytes.fromhex("AB 01"))
    assert caught.value.code == 1 and caught.value.function == 0x2B
    with pytest.raises(FrameRejected):  # individual access never says "more follows"
        frames.parse_device_id_response(4, page(4, 0x81, 0xFF, 0x01, [(0, b"A")]))
    with pytest.raises(ValueError):
        frames.device_id_request(5)
    with pytest.raises(ValueError):
        frames.device_id_request(1, 256)


def test_rtu_framing_rejects_what_cannot_be_an_answer() -> None:
    too_long = bytes((1, 0x2B, 0x0E, 2, 1, 0, 0, 3, 0, 250))
    with pytest.raises(FrameRejected, match="length"):
        RtuDecoder(1, Expect.device_id()).feed(too_long + bytes(10))
    with pytest.raises(FrameRejected, match="function"):
        RtuDecoder(1, Expect.device_id()).feed(bytes((1, 0x2B, 0x0D, 2)))
    with pytest.raises(FrameRejected, match="garbage"):
        RtuDecoder(1, Expect.device_id()).feed(bytes((9, 0x2B, 0x0D, 2)))


def test_object_text_is_bounded_and_printable() -> None:
    assert object_text(b"\xff\xfeabc\x1b[2J") == "\ufffd\ufffdabc [2J"
    assert len(object_text(b"x" * 250)) == 128


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([1, 2, 3, 4]))
def test_any_bytes_end_in_a_page_or_a_reason(pdu: bytes, code: int) -> None:
    try:
        got = frames.parse_device_id_response(code, pdu)
    except (FrameRejected, ModbusExceptionResponse):
        return
    assert got.code == code and sum(2 + len(v) for _, v in got.objects) == len(pdu) - 7


# --- the bus engine asks a real pymodbus server ----------------------------------------------------------------


def _engine(port: int) -> tuple[BusEngine, object]:
    from edge_agent.config import AgentConfig

    cfg = convert({"gateway": {"id": "gw-1"}, "devices": [
        {"kind": "modbus-tcp", "id": "m", "profile": "eastron_sdm630", "host": "127.0.0.1", "port": port}]},
        AgentConfig, "test")
    device = polled_device(cfg.devices[0], load_profile("eastron_sdm630"))
    return BusEngine(cfg.bus_of(cfg.devices[0]), [device]), device


async def _identify(identity) -> tuple[object, BusEngine]:
    sim = MeterSimulator(seed=1, identity=identity)
    await sim.start()
    engine, device = _engine(sim.port)
    try:
        assert await engine.open_once()
        await engine.identify(device)
    finally:
        await engine.transport.close()
        await sim.stop()
    return device, engine


def test_the_simulator_identifies_itself() -> None:
    device, engine = asyncio.run(_identify(SIMULATOR_IDENTITY))
    assert device.identify_state == "read"
    assert device.identification.named() == {"vendor_name": "citynerve lab", "product_code": "SDM630-SIM",
                                             "revision": "1.4", "product_name": "SDM630 simulator",
                                             "model_name": "SDM630-Modbus"}
    assert device.identification.conformity == 0x83  # pymodbus: extended stream and individual access
    assert engine.transport.stats["transactions"] == 1


def test_more_follows_from_a_real_server() -> None:
    """pymodbus splits objects that do not fit one answer ("more follows"); all of them are read."""
    long = {0: "V" * 100, 1: "P" * 100, 2: "9.9", 3: "u" * 100, 4: "N" * 60, 5: "M", 6: "A"}
    device, engine = asyncio.run(_identify(long))
    assert device.identification.objects == {i: text[:128] for i, text in long.items()}
    assert engine.transport.stats["transactions"] == 2


def test_a_meter_that_does_not_offer_it_is_not_failing() -> None:
    device, engine = asyncio.run(_identify(None))
    assert device.identify_state == "not_offered" and device.failures == 0
    assert engine.transport.stats["transactions"] == 1  # exception 01: never asked again


def test_a_silent_answer_is_tried_again_later_then_given_up(silent_server: int) -> None:
    """A device that ignores FC 43 (some do) costs one timeout per attempt, IDENTIFY_ATTEMPTS attempts at most."""

    async def scenario() -> None:
        engine, device = _engine(silent_server)
        engine.bus = type(engine.bus)(id=engine.bus.id, target=engine.bus.target, timeout=0.05)
        try:
            assert await engine.open_once()
            for attempt in range(1, IDENTIFY_ATTEMPTS + 1):
                assert device.identify_state == "pending"
                await engine.identify(device)
                assert device.identify_attempts == attempt and "no answer" in device.identify_error
            assert device.identify_state == "failed" and device.stats["no_answer"] == 0  # not a failed poll
        finally:
            await engine.transport.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("timeout", "postponed"), [(0.05, 0), (5.0, IDENTIFY_POSTPONE + 1)])
def test_the_running_bus_identifies_between_polls(timeout: float, postponed: int) -> None:
    """After a poll the device answered: at once when the next deadline leaves room for a timeout; on a bus
    that never has that room (here: a 5 s timeout, polls every 0.2 s), after IDENTIFY_POSTPONE polls."""

    async def scenario() -> None:
        sim = MeterSimulator(seed=1)
        await sim.start()
        engine, device = _engine(sim.port)
        engine.bus = type(engine.bus)(id=engine.bus.id, target=engine.bus.target, timeout=timeout)
        device.interval = 0.2
        task = asyncio.create_task(engine.run(lambda readings: None))
        try:
            for _ in range(200):
                if device.identify_state != "pending":
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sim.stop()
        assert device.identify_state == "read" and device.identify_postponed == postponed
        assert device.stats["polls"] == max(postponed, 1)  # identified right after that poll

    asyncio.run(scenario())
