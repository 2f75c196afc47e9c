"""ModbusTcpPoller against real pymodbus servers on loopback: what is stored is exactly what was served."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge_agent.modbus.config import ModbusTcpDevice
from edge_agent.modbus.poller import ModbusTcpPoller, PollError
from edge_agent.profiles import Profile, load_profile
from labkit.meter_sim import MeterSimulator, decode_served, load_serve_log, meter_in_thread, sdm630_values
from labkit.process import free_port
from wire.schema import Batch, Reading, decode_batch, encode_batch

pytestmark = pytest.mark.integration


def device(port: int, unit: int = 1, **kwargs: object) -> ModbusTcpDevice:
    defaults: dict[str, object] = {"id": "sdm630-test", "profile": "eastron_sdm630", "host": "127.0.0.1"}
    return ModbusTcpDevice(port=port, unit=unit, **{**defaults, **kwargs})  # type: ignore[arg-type]


def poll_error(poller: ModbusTcpPoller) -> PollError:
    async def run() -> None:
        try:
            await poller.poll()
        finally:
            await poller.close()

    with pytest.raises(PollError) as info:
        asyncio.run(run())
    err = info.value
    # a technician's message, not a traceback: nothing chained, the device named first
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert str(err) == f"{err.device_id}: {err.message}"
    return err


def assert_stored_equals_served(readings: list[Reading], served: list, profile: Profile) -> None:
    stored = {r.measurement: r.fields for r in readings}
    assert stored == decode_served(served, profile)
    # and, independently of the agent's decoders, the simulator's own reading of the same registers
    own = {name: value for entry in served for name, value in sdm630_values(entry).items()}
    for name, value in stored["electricity"].items():
        assert own[name] == value, name


def test_polled_values_equal_served_values(meter_sim: MeterSimulator, sdm630_profile: Profile) -> None:
    poller = ModbusTcpPoller(device(meter_sim.port, tags={"site": "lab"}), sdm630_profile)
    assert [r.describe() for r in poller.plan] == ["input 0x0000+18", "input 0x0034+2", "input 0x003E+2",
                                                   "input 0x0046+6"]  # fmt: skip

    async def run() -> list[tuple[list[Reading], list]]:
        polls = []
        try:
            for _ in range(3):
                before = len(meter_sim.served)
                readings = await poller.poll()
                polls.append((readings, meter_sim.served[before:]))
                await asyncio.sleep(0.07)  # the simulator re-measures every 50 ms
        finally:
            await poller.close()
        return polls

    polls = asyncio.run(run())
    energies = []
    for readings, served in polls:
        assert [(s.table, s.address, s.count) for s in served] == [
            (r.table, r.address, r.count) for r in poller.plan
        ]
        assert all(s.unit == 1 for s in served)
        (reading,) = readings
        assert reading.device == "sdm630-test"
        assert reading.measurement == "electricity"
        assert reading.tags == {"model": "SDM630", "site": "lab"}
        assert len(reading.fields) == len(sdm630_profile.points)
        assert_stored_equals_served(readings, served, sdm630_profile)
        # stamped when the last answer arrived: after the last answer was built, and promptly
        assert served[-1].time_ns <= reading.time_ns < served[-1].time_ns + 1_000_000_000
        assert 220 < reading.fields["voltage_l1"] < 240
        assert 49.5 < reading.fields["frequency"] < 50.5
        energies.append(reading.fields["energy_import"])
        # readings survive the wire format unchanged
        assert decode_batch(encode_batch(_batch(readings))).readings == readings
    assert energies == sorted(energies)
    assert len({r[0][0].fields["voltage_l1"] for r in polls}) > 1  # values move over time


def test_separate_process_with_jsonl_serve_log(meter_sim_process, sdm630_profile: Profile) -> None:
    poller = ModbusTcpPoller(device(meter_sim_process.port, unit=meter_sim_process.unit), sdm630_profile)

    async def run() -> list[list[Reading]]:
        try:
            return [await poller.poll(), await poller.poll()]
        finally:
            await poller.close()

    polls = asyncio.run(run())
    served = load_serve_log(meter_sim_process.serve_log)
    assert len(served) == 2 * len(poller.plan)
    for i, readings in enumerate(polls):
        part = served[i * len(poller.plan) : (i + 1) * len(poller.plan)]
        assert {s.unit for s in part} == {3}
        assert_stored_equals_served(readings, part, sdm630_profile)
        assert part[-1].time_ns <= readings[0].time_ns


def test_holding_registers_and_per_point_measurements(meter_sim: MeterSimulator, tmp_path: Path) -> None:
    path = tmp_path / "sdm630_setup.toml"
    path.write_text(
        """
vendor = "Eastron"
model = "SDM630"
measurement = "electricity"

[[points]]
name = "frequency"
address = 0x0046
type = "float32"

[[points]]
name = "demand_period"
address = 0x0002
type = "float32"
table = "holding"
measurement = "meter_setup"

[[points]]
name = "system_type"
address = 0x000A
type = "float32"
table = "holding"
measurement = "meter_setup"
""",
        encoding="utf-8",
    )
    profile = load_profile(path)
    poller = ModbusTcpPoller(device(meter_sim.port, measurement="hall_a"), profile)
    assert [r.describe() for r in poller.plan] == ["holding 0x0002+2", "holding 0x000A+2", "input 0x0046+2"]

    async def run() -> list[Reading]:
        try:
            return await poller.poll()
        finally:
            await poller.close()

    before = len(meter_sim.served)
    readings = asyncio.run(run())
    by_measurement = {r.measurement: r for r in readings}
    assert by_measurement["meter_setup"].fields == {"demand_period": 60.0, "system_type": 3.0}
    assert set(by_measurement["hall_a"].fields) == {"frequency"}  # the device's measurement override
    assert len({r.time_ns for r in readings}) == 1
    assert {r.measurement: r.fields for r in readings} == decode_served(
        meter_sim.served[before:], profile, "hall_a"
    )


def test_connection_refused(sdm630_profile: Profile) -> None:
    port = free_port()
    started = time.monotonic()
    err = poll_error(ModbusTcpPoller(device(port), sdm630_profile))
    assert time.monotonic() - started < 1.0
    assert err.device_id == "sdm630-test"
    assert err.message == f"connection refused by 127.0.0.1:{port} (nothing listens on port {port})"


def test_unknown_host_name(sdm630_profile: Profile) -> None:
    err = poll_error(ModbusTcpPoller(device(502, host="no-such-meter.invalid", timeout=0.5), sdm630_profile))
    assert err.message.startswith("cannot resolve host name 'no-such-meter.invalid'")


def test_no_answer_within_timeout(silent_server: int, sdm630_profile: Profile) -> None:
    started = time.monotonic()
    err = poll_error(ModbusTcpPoller(device(silent_server, timeout=0.3), sdm630_profile))
    assert 0.25 < time.monotonic() - started < 1.5
    assert (
        err.message == f"no answer from 127.0.0.1:{silent_server} unit 1 within 0.3 s reading input 0x0000+18"
    )


def test_register_the_device_does_not_have(meter_sim: MeterSimulator, tmp_path: Path) -> None:
    path = tmp_path / "wrong.toml"
    path.write_text(
        'vendor = "Eastron"\nmodel = "SDM630"\nmeasurement = "electricity"\n'
        '[[points]]\nname = "voltage_l1"\naddress = 0\ntype = "float32"\n'
        '[[points]]\nname = "total_kwh"\naddress = 0x0156\ntype = "float32"\n',
        encoding="utf-8",
    )
    err = poll_error(ModbusTcpPoller(device(meter_sim.port), load_profile(path)))
    where = f"127.0.0.1:{meter_sim.port} unit 1"
    assert err.message.startswith(
        f"exception code 2 (illegal data address) from {where} reading input 0x0156+2"
    )
    assert "check the profile's addresses" in err.message


def test_reconnects_after_the_meter_comes_back(sdm630_profile: Profile) -> None:
    port = free_port()

    async def scenario_part(poller: ModbusTcpPoller) -> list[Reading] | PollError:
        try:
            return await poller.poll()
        except PollError as exc:
            return exc

    loop = asyncio.new_event_loop()
    poller = ModbusTcpPoller(device(port, timeout=0.5), sdm630_profile)
    try:
        with meter_in_thread(port=port, seed=1):
            first = loop.run_until_complete(scenario_part(poller))
        gone = loop.run_until_complete(scenario_part(poller))
        with meter_in_thread(port=port, seed=2) as sim:
            before = len(sim.served)
            again = loop.run_until_complete(scenario_part(poller))
            served = sim.served[before:]
        loop.run_until_complete(poller.close())
    finally:
        loop.close()
    assert isinstance(first, list) and first[0].fields
    assert isinstance(gone, PollError)
    assert "127.0.0.1" in gone.message
    assert isinstance(again, list)
    assert_stored_equals_served(again, served, sdm630_profile)


def _batch(readings: list[Reading]) -> Batch:
    return Batch(gateway="gw-test", seq=1, sent_ns=time.time_ns(), readings=readings)
