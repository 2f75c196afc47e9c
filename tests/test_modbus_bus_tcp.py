"""The bus engine over Modbus TCP against real pymodbus servers: what is stored is exactly what was served."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path

import pytest

from edge_agent.modbus.bus import BusEngine, PollOutcome
from edge_agent.modbus.config import ModbusTcpDevice
from edge_agent.modbus.devices import polled_device
from edge_agent.profiles import Profile, load_profile
from labkit.meter_sim import MeterSimulator, decode_served, meter_in_thread, sdm630_values
from labkit.process import free_port
from wire.schema import Reading

pytestmark = pytest.mark.integration


def device(port: int, unit: int = 1, **kwargs: object) -> ModbusTcpDevice:
    defaults: dict[str, object] = {"id": "sdm630-test", "profile": "eastron_sdm630", "host": "127.0.0.1"}
    return ModbusTcpDevice(port=port, unit=unit, **{**defaults, **kwargs})  # type: ignore[arg-type]


def engine_for(cfg: ModbusTcpDevice, profile: Profile) -> BusEngine:
    from edge_agent.modbus.config import ModbusBus

    bus = ModbusBus(id="t", target=f"tcp://{cfg.host}:{cfg.port}", timeout=cfg.timeout)
    return BusEngine(bus, [polled_device(cfg, profile)])


async def poll_once(engine: BusEngine) -> PollOutcome:
    return await engine.poll_alone(engine.devices[0])


def assert_stored_equals_served(readings: list[Reading], served: list, profile: Profile) -> None:
    stored = {r.measurement: r.fields for r in readings}
    assert stored == decode_served(served, profile)
    own = {name: value for entry in served for name, value in sdm630_values(entry).items()}
    for name, value in stored["electricity"].items():
        # the same float32 the meter sent, as its shortest decimal (edge_agent.modbus.decode.shortest)
        assert struct.pack(">f", own[name]) == struct.pack(">f", value), name
        assert len(repr(value)) <= len(repr(own[name])), name


def test_polled_values_equal_served_values(meter_sim: MeterSimulator, sdm630_profile: Profile) -> None:
    engine = engine_for(device(meter_sim.port), sdm630_profile)
    before = len(meter_sim.served)
    started = time.time_ns()
    outcome = asyncio.run(poll_once(engine))
    served = meter_sim.served[before:]
    assert not outcome.error
    assert len(served) == len(engine.devices[0].plan)  # one transaction per planned request, no more
    assert_stored_equals_served(outcome.readings, served, sdm630_profile)
    (reading,) = outcome.readings
    assert served[-1].time_ns <= reading.time_ns and started <= reading.time_ns  # stamped on the last answer
    assert reading.tags == {"model": "SDM630"} and reading.device == "sdm630-test"


def test_holding_registers_and_per_point_measurements(meter_sim: MeterSimulator, tmp_path: Path) -> None:
    path = tmp_path / "sdm630_setup.toml"
    path.write_text(
        'vendor = "Eastron"\nmodel = "SDM630"\nmeasurement = "electricity"\n'
        '[[points]]\nname = "frequency"\naddress = 0x0046\ntype = "float32"\n'
        '[[points]]\nname = "demand_period"\naddress = 0x0002\ntype = "float32"\ntable = "holding"\nmeasurement = "meter_setup"\n'
        '[[points]]\nname = "system_type"\naddress = 0x000A\ntype = "float32"\ntable = "holding"\nmeasurement = "meter_setup"\n',
        encoding="utf-8",
    )
    profile = load_profile(path)
    engine = engine_for(device(meter_sim.port, measurement="hall_a"), profile)
    assert [r.describe() for r in engine.devices[0].plan] == ["holding 0x0002+2", "holding 0x000A+2", "input 0x0046+2"]
    before = len(meter_sim.served)
    readings = asyncio.run(poll_once(engine)).readings
    by_measurement = {r.measurement: r for r in readings}
    assert by_measurement["meter_setup"].fields == {"demand_period": 60.0, "system_type": 3.0}
    assert set(by_measurement["hall_a"].fields) == {"frequency"}
    assert len({r.time_ns for r in readings}) == 1
    assert {r.measurement: r.fields for r in readings} == decode_served(meter_sim.served[before:], profile, "hall_a")


def test_connection_refused(sdm630_profile: Profile) -> None:
    port = free_port()
    started = time.monotonic()
    outcome = asyncio.run(poll_once(engine_for(device(port), sdm630_profile)))
    assert time.monotonic() - started < 1.0
    assert outcome.readings == [] and outcome.error.startswith(f"connection refused by 127.0.0.1:{port}")


def test_unknown_host_name(sdm630_profile: Profile) -> None:
    outcome = asyncio.run(poll_once(engine_for(device(502, host="no-such-meter.invalid", timeout=0.5), sdm630_profile)))
    assert "cannot resolve host name" in outcome.error and "no-such-meter.invalid" in outcome.error


def test_no_answer_within_timeout(silent_server: int, sdm630_profile: Profile) -> None:
    engine = engine_for(device(silent_server, timeout=0.3), sdm630_profile)
    started = time.monotonic()
    outcome = asyncio.run(poll_once(engine))
    assert 0.25 < time.monotonic() - started < 1.5  # one timeout, not one per planned request
    first = engine.devices[0].plan[0].describe()
    assert outcome.error == f"no answer from unit 1 on tcp://127.0.0.1:{silent_server} within 0.3 s ({first})"


def test_register_the_device_does_not_have(meter_sim: MeterSimulator, tmp_path: Path) -> None:
    path = tmp_path / "wrong.toml"
    path.write_text(
        'vendor = "Eastron"\nmodel = "SDM630"\nmeasurement = "electricity"\n'
        '[[points]]\nname = "voltage_l1"\naddress = 0\ntype = "float32"\n'
        '[[points]]\nname = "total_kwh"\naddress = 0x0156\ntype = "float32"\n',
        encoding="utf-8",
    )
    outcome = asyncio.run(poll_once(engine_for(device(meter_sim.port), load_profile(path))))
    # the other register group is still read; the failed one is reported and flagged, never invented
    assert outcome.error == "exception 2 (illegal data address) reading input 0x0156+2"
    (reading,) = outcome.readings
    assert set(reading.fields) == {"voltage_l1"} and reading.quality == {"total_kwh": "error"}


def test_reconnects_after_the_meter_comes_back(sdm630_profile: Profile) -> None:
    port = free_port()
    engine = engine_for(device(port, timeout=0.5), sdm630_profile)

    async def poll() -> PollOutcome:
        if not engine.transport.is_open and not await engine.open_once():
            return PollOutcome(engine.devices[0], [], engine.last_open_error)
        return await engine.poll(engine.devices[0])

    loop = asyncio.new_event_loop()
    try:
        with meter_in_thread(port=port, seed=1):
            first = loop.run_until_complete(poll())
        gone = loop.run_until_complete(poll())
        if not gone.error:  # the closed socket may only show on the next transaction
            gone = loop.run_until_complete(poll())
        with meter_in_thread(port=port, seed=2) as sim:
            before = len(sim.served)
            again = loop.run_until_complete(poll())
            served = sim.served[before:]
        loop.run_until_complete(engine.transport.close())
    finally:
        loop.close()
    assert first.readings and not first.error
    assert gone.error and not gone.readings
    assert not again.error
    assert_stored_equals_served(again.readings, served, sdm630_profile)


@pytest.mark.parametrize("base", [40000, 0, 50000])
def test_sunspec_device_is_polled_by_discovery(base: int) -> None:
    import json

    from labkit.sunspec_sim import sunspec_in_thread

    golden = json.loads((Path(__file__).parent / "golden" / "sunspec" / "expected.json").read_text())
    expected = golden["fields"]
    with sunspec_in_thread(base=base) as sim:
        cfg = device(sim.port, profile="sunspec", id="pv-inverter")
        from edge_agent.modbus.config import ModbusBus
        from edge_agent.modbus.devices import SUNSPEC_DISCOVERY, polled_device

        assert cfg.profile == SUNSPEC_DISCOVERY
        engine = BusEngine(ModbusBus(id="t", target=f"tcp://127.0.0.1:{sim.port}"), [polled_device(cfg, None)])
        outcome = asyncio.run(poll_once(engine))
    assert not outcome.error
    fields = {r.measurement: r.fields for r in outcome.readings}
    assert fields["sunspec_inverter"] == pytest.approx(expected["sunspec_inverter"])
    assert fields["sunspec_common"]["model_name"] == "TestInverter-1"
    quality = {r.measurement: r.quality for r in outcome.readings if r.quality}
    assert quality == golden["quality"]  # 0xFFFF "not implemented" is missing, never a number
    assert engine.devices[0].tags["model"] == "TestInverter-1"
    assert len(engine.devices[0].plan) <= 2  # the whole chain in as few reads as 125 registers allow


def test_sunspec_discovery_failure_is_reported_not_raised(meter_sim: MeterSimulator) -> None:
    from edge_agent.modbus.devices import polled_device

    cfg = device(meter_sim.port, profile="sunspec")
    engine = engine_for(cfg, None)  # type: ignore[arg-type]
    engine.devices[:] = [polled_device(cfg, None)]
    outcome = asyncio.run(poll_once(engine))
    assert outcome.error.startswith(f"SunSpec discovery of unit 1 on tcp://127.0.0.1:{meter_sim.port} failed:")
    assert engine.devices[0].failures == 1


def test_a_gateway_that_refuses_connections_shows_in_its_devices_health(sdm630_profile: Profile) -> None:
    """A Modbus TCP gateway that is down: the failed opens count in the health of the device whose poll they
    stopped (open_failures), and every device on the bus says why - not only the bus's own counters."""
    from edge_agent.app import _health, poll_errors

    port = free_port()  # nothing listens there: connection refused
    engine = engine_for(device(port, timeout=0.5, interval=1), sdm630_profile)
    polled = engine.devices[0]

    async def until_refused() -> None:
        task = asyncio.create_task(engine.run(lambda readings: None))
        try:
            while not polled.stats["open_failures"]:  # the engine has no event for it: look every 50 ms
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(until_refused(), 10))
    assert engine.stats["connect_failures"] >= 1
    assert poll_errors(polled.stats) == {"open_failures": polled.stats["open_failures"]}
    health = _health(polled.stats, polled.stats["polls"], polled.last_error)
    assert health["errors"] >= 1 and health["polls"] == 0
    assert health["last_error"] == f"bus t: connection refused by 127.0.0.1:{port}", health
