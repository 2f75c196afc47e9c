"""The bus engine on a serial RS-485 bus simulated with ptys: several units on one port, a dead unit between
live ones, devices that misbehave, a server that restarts and a USB adapter that is unplugged."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path

import pytest

from edge_agent.modbus.bus import BusEngine, PolledDevice, PollOutcome
from edge_agent.modbus.config import ModbusBus, ModbusDevice
from edge_agent.modbus.devices import polled_device
from edge_agent.profiles import load_profile
from labkit.serial_lab import MisbehavingResponder, PtyLink, serial_modbus_server
from wire.schema import Reading

pytestmark = pytest.mark.integration

PROFILE = """
vendor = "Lab"
model = "TH-1"
measurement = "climate"
max_registers = 10

[[points]]
name = "temperature"
table = "input"
address = 1
type = "int16"
scale = 0.1
unit = "degC"

[[points]]
name = "humidity"
table = "input"
address = 2
type = "uint16"
scale = 0.1

[[points]]
name = "energy"
table = "holding"
address = 0
type = "float32"
"""


def registers(unit: int) -> dict[str, list[int]]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", 1000.5 + unit))
    return {"input": [0, 200 + unit, 450 + unit, 0], "holding": [hi, lo, 0, 0]}


def expected(unit: int) -> dict[str, float]:
    return {"temperature": round((200 + unit) * 0.1, 10), "humidity": round((450 + unit) * 0.1, 10),
            "energy": 1000.5 + unit}


@pytest.fixture
def profile_path(tmp_path: Path) -> Path:
    path = tmp_path / "th1.toml"
    path.write_text(PROFILE)
    return path


def bus_on(path: str, **settings: object) -> ModbusBus:
    values: dict[str, object] = {"id": "rs485-1", "target": path, "baud": 19200, "timeout": 0.25}
    values.update(settings)
    return ModbusBus(**values)  # type: ignore[arg-type]


def devices(profile_path: Path, units: list[int], interval: float = 1.0) -> list[PolledDevice]:
    profile = load_profile(profile_path)
    return [polled_device(ModbusDevice(id=f"th-{u}", bus="rs485-1", profile=str(profile_path), unit=u,
                                       interval=interval), profile) for u in units]  # type: ignore[arg-type]


def close_to(reading: Reading, unit: int) -> bool:
    return reading.fields == pytest.approx(expected(unit))


async def run_for(engine: BusEngine, seconds: float) -> list[Reading]:
    out: list[Reading] = []
    task = asyncio.create_task(engine.run(out.extend))
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return out


def test_dead_unit_between_live_ones_costs_only_itself(profile_path: Path) -> None:
    with PtyLink() as link, serial_modbus_server(link, {1: registers(1), 2: registers(2), 4: registers(4)}) as server:
        engine = BusEngine(bus_on(link.client_path), devices(profile_path, [1, 2, 3, 4]))
        started = time.time()
        readings = asyncio.run(run_for(engine, 6.3))
    by_unit: dict[int, list[Reading]] = {}
    for r in readings:
        by_unit.setdefault(int(r.device.split("-")[1]), []).append(r)
    assert 3 not in by_unit
    first_deadline = int(started) + 1
    for unit in (1, 2, 4):
        got = by_unit[unit]
        assert len(got) >= 5, (unit, len(got))  # one per second: the live units keep their schedule
        assert all(close_to(r, unit) for r in got)
        seconds = sorted(r.time_ns // 10**9 for r in got)
        assert seconds == list(range(seconds[0], seconds[0] + len(seconds)))  # no deadline missed
        assert seconds[0] <= first_deadline + 1
        assert all(r.time_ns % 10**9 < 600_000_000 for r in got)  # within the aligned second's first part
    dead = engine.devices[2]
    # the dead unit is tried at its first deadline, then skips 1, then 3 deadlines: 2 or 3 tries in 6 s
    assert 2 <= dead.stats["no_answer"] <= 3, dead.stats
    assert dead.last_error.startswith("no answer from unit 3 on")
    assert engine.stats["overruns"] == 0
    assert {u for u, *_ in server.served} == {1, 2, 4}


def test_malformed_answers_are_rejected_counted_and_never_decoded(profile_path: Path) -> None:
    responder = MisbehavingResponder({1: [0, 211, 461, 0]})
    profile = load_profile(profile_path)
    one_request = [p for p in profile.point_specs() if p.table == "input"]
    from edge_agent.modbus.plan import plan_reads

    device = PolledDevice("th-1", 1, 1.0, plan_reads(one_request), {})
    engine = BusEngine(bus_on(responder.device), [device])
    faults = ["bad_crc", "wrong_unit", "wrong_function", "wrong_byte_count", "garbage_before", "truncated", "ok"]
    responder.plan(*faults)

    async def scenario() -> list[PollOutcome]:
        assert await engine.open_once()
        try:
            return [await engine.poll(device) for _ in faults]
        finally:
            await engine.transport.close()

    try:
        outcomes = asyncio.run(scenario())
    finally:
        responder.close()
    for outcome in outcomes[:-1]:
        assert outcome.readings == [] and outcome.error  # nothing from a bad frame is ever decoded
    assert outcomes[-1].readings[0].fields == pytest.approx({"temperature": 21.1, "humidity": 46.1})
    stats = engine.transport.stats
    for reason in ("crc", "unit", "function", "byte_count", "garbage"):
        assert stats[f"rejected.{reason}"] >= 1, (reason, stats)
    assert device.stats["rejected"] == 5 and device.stats["no_answer"] == 1


def test_busy_is_retried_after_a_pause(profile_path: Path) -> None:
    responder = MisbehavingResponder({1: [0, 211, 461, 0]})
    device = devices(profile_path, [1])[0]
    engine = BusEngine(bus_on(responder.device, busy_pause=0.05), [device])
    responder.plan("exception:6", "exception:6")

    try:
        outcome = asyncio.run(engine.poll_alone(device))
    finally:
        responder.close()
    assert not outcome.error and device.stats["busy_retries"] == 2
    (reading,) = outcome.readings
    assert reading.fields["temperature"] == pytest.approx(21.1)


def test_other_exceptions_cost_only_their_register_group(profile_path: Path) -> None:
    responder = MisbehavingResponder({1: [0, 211, 461, 0]})
    device = devices(profile_path, [1])[0]
    assert [r.table for r in device.plan] == ["holding", "input"]
    engine = BusEngine(bus_on(responder.device), [device])
    responder.plan("exception:2")  # the holding read fails, the input read is answered

    try:
        outcome = asyncio.run(engine.poll_alone(device))
    finally:
        responder.close()
    assert outcome.error == "exception 2 (illegal data address) reading holding 0x0000+2"
    (reading,) = outcome.readings
    assert set(reading.fields) == {"temperature", "humidity"} and reading.quality == {"energy": "error"}


def test_server_restart_and_usb_unplug(profile_path: Path, tmp_path: Path) -> None:
    link_path = tmp_path / "ttyUSB-meter"
    responder = MisbehavingResponder({1: [0, 211, 461, 0]}, link=link_path)
    device = devices(profile_path, [1])[0]
    engine = BusEngine(bus_on(str(link_path)), [device])
    log: list[str] = []

    async def scenario() -> None:
        nonlocal responder
        assert await engine.open_once()
        log.append("ok" if (await engine.poll(device)).readings else "fail")
        responder.dead.add(1)  # the meter stops answering (power cycle)
        log.append("ok" if (await engine.poll(device)).readings else "fail")
        responder.dead.discard(1)
        log.append("ok" if (await engine.poll(device)).readings else "fail")
        responder.unplug()  # the USB adapter is pulled
        outcome = await engine.poll(device)
        log.append(outcome.error)
        assert not await engine.open_once()
        log.append(engine.last_open_error)
        responder.close()
        responder = MisbehavingResponder({1: [0, 211, 461, 0]}, link=link_path)  # plugged back in
        assert await engine.open_once()
        log.append("ok" if (await engine.poll(device)).readings else "fail")
        await engine.transport.close()

    try:
        asyncio.run(scenario())
    finally:
        responder.close()
    assert log[:3] == ["ok", "fail", "ok"]
    assert "disappeared" in log[3] or "does not exist" in log[3], log[3]
    assert str(link_path) in log[4]
    assert log[5] == "ok"


def test_ascii_framing(profile_path: Path) -> None:
    with PtyLink() as link, serial_modbus_server(link, {5: registers(5)}, framer="ascii", baud=9600):
        device = devices(profile_path, [5])[0]
        engine = BusEngine(bus_on(link.client_path, framing="ascii", baud=9600, timeout=1.0), [device])

        outcome = asyncio.run(engine.poll_alone(device))
    assert not outcome.error and close_to(outcome.readings[0], 5)


def test_a_bus_that_cannot_keep_up_says_so(profile_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Four units answering in 0.3 s each cannot be polled every 0.5 s: overruns are counted and one line
    per report period names the bus, its utilisation and the devices that overran."""
    import logging

    responder = MisbehavingResponder({u: [0, 211, 461, 0] for u in (1, 2, 3, 4)}, turnaround=0.15)
    profile = load_profile(profile_path)
    from edge_agent.modbus.plan import plan_reads

    one_request = plan_reads([p for p in profile.point_specs() if p.table == "input"])
    devs = [PolledDevice(f"th-{u}", u, 0.5, one_request, {}) for u in (1, 2, 3, 4)]
    engine = BusEngine(bus_on(responder.device, timeout=1.0), devs, report_interval=1.5)
    try:
        with caplog.at_level(logging.WARNING, logger="citynerve.modbus"):
            readings = asyncio.run(run_for(engine, 3.6))
    finally:
        responder.close()
    assert readings  # it still polls, as fast as the line allows
    assert engine.stats["overruns"] > 0
    assert sum(d.stats["overruns"] for d in devs) == engine.stats["overruns"]
    lines = [r.getMessage() for r in caplog.records if "cannot keep up" in r.getMessage()]
    assert 1 <= len(lines) <= 3
    assert "bus rs485-1 cannot keep up with its intervals: utilisation" in lines[0] and "th-" in lines[0]
    utilisation = max(int(line.split("utilisation ")[1].split("%")[0]) for line in lines)
    assert utilisation >= 80


def test_pauses_after_connect_and_between_requests(profile_path: Path) -> None:
    """Slow meters need quiet time: the engine keeps pause_between_requests between transactions and
    pause_after_connect after opening the port."""
    responder = MisbehavingResponder({1: [0, 211, 461, 0]})
    device = devices(profile_path, [1])[0]
    assert len(device.plan) == 2
    engine = BusEngine(bus_on(responder.device, pause_between_requests=0.3, pause_after_connect=0.4), [device])

    async def scenario() -> tuple[float, float, PollOutcome]:
        started = time.monotonic()
        assert await engine._ensure_open()
        opened = time.monotonic() - started
        started = time.monotonic()
        outcome = await engine.poll(device)
        return opened, time.monotonic() - started, outcome

    try:
        opened, polled, outcome = asyncio.run(scenario())
        asyncio.run(engine.transport.close())
    finally:
        responder.close()
    assert not outcome.error
    assert opened >= 0.4
    assert 0.3 <= polled < 1.0  # two requests, one pause between them
