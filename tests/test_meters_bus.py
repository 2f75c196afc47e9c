"""DL/T 645, CJ/T 188 and M-Bus meters on the bus owner (edge_agent/modbus/bus.py), on simulated lines (ptys):
sharing one line with a Modbus unit under one schedule, and framing torture on the bus path - a meter answering
garbage, a late answer landing in another meter's dialogue, a silent meter backing off while another keeps its
schedule."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.dlt645 import frames as dlt
from edge_agent.meters.config import Dlt645Device, MbusDevice
from edge_agent.meters.readers import reader_for
from edge_agent.modbus.bus import BusEngine, PolledDevice
from edge_agent.modbus.config import ModbusBus
from edge_agent.modbus.devices import bus_engines
from labkit.cjt188_sim import MeterLine
from labkit.cjt188_sim import SimMeter as WaterMeter
from labkit.dlt645_sim import Dlt645Line, MeterBank, SimMeter
from labkit.mbus_sim import MbusLine
from labkit.mbus_sim import SimMeter as MbusMeter
from labkit.shared_line import RtuUnits, SharedLine
from tests.test_mbus import ABB_F95, _split
from tests.test_modbus_bus_serial import PROFILE, expected, registers, run_for
from wire.schema import Reading

pytestmark = pytest.mark.integration


async def run_until(engine: BusEngine, done: Callable[[list[Reading]], bool], timeout: float) -> list[Reading]:
    """Run the engine until `done(readings so far)`, at most `timeout` seconds."""
    out: list[Reading] = []
    enough = asyncio.Event()

    def emit(readings: list[Reading]) -> None:
        out.extend(readings)
        if done(out):
            enough.set()

    task = asyncio.create_task(engine.run(emit))
    try:
        await asyncio.wait_for(enough.wait(), timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return out


def meter(device_id: str, address: str, identifiers: list[str], *, edition: str = "2007",
          interval: float = 1.0) -> PolledDevice:
    device = Dlt645Device(id=device_id, bus="rs485", address=address, edition=edition,  # type: ignore[arg-type]
                          identifiers=identifiers, interval=interval)  # type: ignore[arg-type]
    return PolledDevice(device_id, 0, interval, [], {}, meter=reader_for(device, 2400))


def bus(path: str) -> ModbusBus:
    return ModbusBus(id="rs485", target=path, baud=2400, parity="E")


def test_meters_and_a_modbus_unit_share_one_line_under_one_schedule(tmp_path: Path) -> None:
    """One RS-485 line at 2400 8E1: a DL/T 645-2007 and a -1997 meter, a CJ/T 188 water and heat meter and a
    Modbus unit, from agent.toml to readings; each polled every interval, one transaction at a time."""
    dlt645 = MeterBank([SimMeter("000102030425"), SimMeter("000000000012", edition="1997")])
    cjt188 = MeterLine([WaterMeter(0x10, "11111111111111"), WaterMeter(0x20, "33", unit_first=True)])
    modbus = RtuUnits({7: registers(7)})
    line = SharedLine([dlt645.answer, cjt188.answer, modbus.answer])
    profile = tmp_path / "th1.toml"
    profile.write_text(PROFILE)
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[gateway]
id = "gw"
state_dir = "{tmp_path}"
[[buses]]
id = "rs485"
target = "{line.device}"
baud = 2400
parity = "E"
[[devices]]
kind = "dlt645"
id = "e-2007"
bus = "rs485"
address = "000102030425"
identifiers = ["energy_import", "voltage_l1", "power", "reactive_power"]
interval = "2s"
[[devices]]
kind = "modbus"
id = "th-7"
bus = "rs485"
unit = 7
profile = "{profile}"
interval = "2s"
[[devices]]
kind = "dlt645"
id = "e-1997"
bus = "rs485"
address = "000000000012"
edition = "1997"
identifiers = ["energy_import", "voltage_l1"]
interval = "2s"
[[devices]]
kind = "cjt188"
id = "water"
bus = "rs485"
meter_type = "cold_water"
address = "11111111111111"
interval = "2s"
[[devices]]
kind = "cjt188"
id = "heat"
bus = "rs485"
meter_type = "heat"
address = "00000000000033"
unit_first = true
interval = "2s"
""")
    (engine,) = bus_engines(config.load(path))
    names = {"e-2007", "e-1997", "water", "heat", "th-7"}
    try:
        readings = asyncio.run(run_until(engine, lambda got: all(sum(r.device == n for r in got) >= 2 for n in names),
                                         10))
    finally:
        line.close()
    by_device: dict[str, list] = {}
    for r in readings:
        by_device.setdefault(r.device, []).append(r)
    assert set(by_device) == names, by_device.keys()
    for device, got in by_device.items():
        seconds = [r.time_ns / 1e9 for r in got]
        assert all(b - a > 1.5 for a, b in itertools.pairwise(seconds)), (device, seconds)
    assert all(r.fields == pytest.approx(expected(7)) for r in by_device["th-7"])
    e07 = by_device["e-2007"][0]
    assert e07.measurement == "electricity" and e07.tags == {"protocol": "dlt645-2007"} and not e07.quality
    assert e07.fields["power"] == 3456.7 and e07.fields["reactive_power"] == -120.0  # kW and kvar on the wire
    assert 1206.42 <= e07.fields["energy_import"] < 1207
    assert set(by_device["e-1997"][0].fields) == {"energy_import", "voltage_l1"}
    water, heat = by_device["water"][0], by_device["heat"][0]
    assert water.measurement == "water" and water.fields["volume_settlement"] == 100.0
    assert heat.measurement == "heat" and heat.fields["power"] == 12500.0 and heat.fields["flow"] == 0.85  # kW -> W
    assert heat.fields["temperature_supply"] == 65.12 and heat.fields["operating_time"] == 8760 * 3600
    assert engine.stats["overruns"] == 0
    for device in engine.devices:
        assert device.failures == 0 and not device.stats["no_answer"], (device.id, device.stats)
    assert {u for u, *_ in modbus.requests} == {7}


def test_a_silent_meter_backs_off_while_another_keeps_its_schedule() -> None:
    line = Dlt645Line([SimMeter("000000000001")])
    good = meter("good", "000000000001", ["energy_import"])  # 0.1 s, and the absent meter's timeout 0.7 s: < 1 s
    silent = meter("absent", "000000000099", ["energy_import", "voltage_l1"])
    engine = BusEngine(bus(line.device), [good, silent])
    started = time.time()
    try:
        readings = asyncio.run(run_for(engine, 6.3))
    finally:
        line.close()
    got = [r for r in readings if r.device == "good"]
    assert all(r.device == "good" for r in readings)
    assert len(got) >= 5
    seconds = sorted(r.time_ns // 10**9 for r in got)
    assert seconds == list(range(seconds[0], seconds[0] + len(seconds)))  # no deadline missed
    assert seconds[0] <= int(started) + 2
    # the absent meter costs one timeout per try (not one per identifier), and skips 1, then 3 deadlines
    assert 2 <= silent.stats["no_answer"] <= 3, silent.stats
    asked = [dlt.parse(r).address for r in line.query.requests]
    # (a try cut short by the end of the run is asked but not counted)
    assert asked.count("000000000099") - silent.stats["no_answer"] in (0, 1)
    assert silent.last_error.startswith(f"DL/T 645-2007 meter 000000000099 on {line.device}: 00010000 "
                                        f"(energy_import): no answer")
    assert engine.stats["overruns"] == 0


def test_late_answers_and_garbage_never_reach_another_meters_reading() -> None:
    """A meter that answers after its timeout: its answer arrives in the next meter's dialogue, which refuses it
    by its address and takes its own. A meter that answers noise and a frame with a bad checksum: rejected,
    counted, nothing decoded; it is backed off as silent."""
    late = SimMeter("000000000002", start_kwh=5555.55, fault="late", late_s=0.9)
    noisy = SimMeter("000000000003", start_kwh=7777.77, fault="garbage")
    line = Dlt645Line([SimMeter("000000000001"), late, noisy])
    devices = [meter("late", "000000000002", ["energy_import"]), meter("good", "000000000001", ["energy_import"]),
               meter("noisy", "000000000003", ["energy_import"]), meter("good-2", "000000000001", ["voltage_l1"])]
    engine = BusEngine(bus(line.device), devices)

    async def rounds() -> list:
        assert await engine.open_once()
        try:
            return [await engine.poll(d) for _ in range(2) for d in devices]
        finally:
            await engine.transport.close()

    try:
        outcomes = asyncio.run(rounds())
    finally:
        line.close()
    by_device: dict[str, list] = {}
    for outcome in outcomes:
        by_device.setdefault(outcome.device.id, []).append(outcome)
    for outcome in by_device["good"]:
        assert not outcome.error
        assert 1206.42 <= outcome.readings[0].fields["energy_import"] < 1207  # never the late meter's 5555.55
    assert all(o.readings[0].fields == {"voltage_l1": pytest.approx(230, abs=1)} for o in by_device["good-2"])
    for name in ("late", "noisy"):
        assert all(not o.readings and "no answer" in o.error for o in by_device[name]), by_device[name]
    late_dev, good_dev, noisy_dev, _ = devices
    assert good_dev.stats["rejected.wrong_address"] >= 1, good_dev.stats  # the late answer, refused
    assert noisy_dev.stats["rejected.checksum"] == 2 and noisy_dev.stats["rejected.garbage"] >= 2, noisy_dev.stats
    assert late_dev.failures == 2 and noisy_dev.failures == 2 and good_dev.failures == 0
    from edge_agent.app import _health  # what the heartbeat reports of each device

    noisy_health = _health(noisy_dev.stats, noisy_dev.stats["polls"], noisy_dev.last_error)
    assert noisy_health["polls"] == 0 and noisy_health["errors"] >= 6 and "000000000003" in noisy_health["last_error"]
    assert _health(good_dev.stats, good_dev.stats["polls"], "")["polls"] == 2
    # the metrics' view: one answered transaction per good poll, none for the late and the noisy meter
    assert good_dev.answer_seconds.cumulative()[-1][1] == 2 and 0 < good_dev.answer_seconds.sum < 1
    assert late_dev.answer_seconds.cumulative()[-1][1] == noisy_dev.answer_seconds.cumulative()[-1][1] == 0
    assert engine.transport.stats["timeouts"] == 4 and engine.transport.stats["rejected.checksum"] == 2


def test_an_mbus_meter_with_a_multi_telegram_answer_on_its_own_bus() -> None:
    first, second = _split(ABB_F95)
    sim = MbusMeter(5, [first, second])
    line = MbusLine([sim])
    device = MbusDevice(id="heat", bus="mbus", address=5)
    polled = PolledDevice("heat", 0, 1.0, [], {"protocol": "mbus"}, meter=reader_for(device, 2400))
    engine = BusEngine(bus(line.device), [polled])
    try:
        outcome = asyncio.run(engine.poll_alone(polled))
    finally:
        line.close()
    assert not outcome.error
    (reading,) = outcome.readings
    assert reading.tags == {"manufacturer": "HYD", "protocol": "mbus"}  # the telegram's manufacturer code
    assert reading.fields["volume"] == 0.0742 and "operating_time_p2" in reading.fields
    assert sim.requests == [0x7B, 0x5B]  # FCB toggled for the second telegram
