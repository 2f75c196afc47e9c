"""The Modbus engine's "done when": an agent process polls a mixed RS-485 bus (several units, one dead) and a
TCP meter, correctly and on schedule, and the readings land in InfluxDB."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.profiles import load_profile
from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import MeterSimulator, decode_served
from labkit.serial_lab import PtyLink, serial_modbus_server
from tests.test_e2e import served_for, wait_until
from tests.test_modbus_bus_serial import PROFILE, expected, registers

pytestmark = pytest.mark.integration


def test_mixed_rs485_bus_and_tcp_meter_into_influxdb(tmp_path: Path, mosquitto, influxd: InfluxdServer,
                                                     influx_db: str, meter_sim: MeterSimulator) -> None:
    th1 = tmp_path / "th1.toml"
    th1.write_text(PROFILE)
    with PtyLink() as link, serial_modbus_server(link, {1: registers(1), 2: registers(2)}):
        collector = stack.collector_process(stack.write_collector_config(
            tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-mixed"),
            {"api": "v1", "url": influxd.url, "database": influx_db},
        )).start()
        serial = [{"kind": "modbus", "id": f"th-{u}", "bus": "rs485-1", "unit": u, "profile": str(th1),
                   "interval": "1s", "tags": {"floor": str(u)}} for u in (1, 3, 2)]
        agent = stack.agent_process(stack.write_agent_config(
            tmp_path / "agent.toml", "gw-mixed", stack.mqtt_section(mosquitto),
            [*serial, stack.modbus_tcp_device("meter", meter_sim.port, interval="1s")],
            buses=[{"id": "rs485-1", "target": link.client_path, "baud": 19200, "timeout": "250ms",
                    "pause_between_requests": "5ms"}],
        )).start()
        try:
            def rows() -> list[dict]:
                return influxd.query('SELECT * FROM "climate" GROUP BY *', influx_db)

            wait_until(lambda: sum(r["device"] == "th-2" for r in rows()) >= 4, 25, "4 readings of th-2")
            climate = rows()
            meter = influxd.query('SELECT * FROM "electricity" GROUP BY *', influx_db)
        finally:
            agent.stop()
            collector.stop()
    log = agent.log_path.read_text()
    by_device: dict[str, list[dict]] = {}
    for row in climate:
        by_device.setdefault(row["device"], []).append(row)
    assert set(by_device) == {"th-1", "th-2"}  # the dead unit produced nothing, not zeros
    for unit in (1, 2):
        got = by_device[f"th-{unit}"]
        assert len(got) >= 3
        for row in got:
            assert {k: row[k] for k in expected(unit)} == pytest.approx(expected(unit))
            assert row["floor"] == str(unit) and row["model"] == "TH-1" and row["gateway"] == "gw-mixed"
            assert row["time"] % 10**9 < 700_000_000  # sampled in the first part of its aligned second
        seconds = sorted(r["time"] // 10**9 for r in got)
        assert seconds == list(range(seconds[0], seconds[0] + len(seconds)))  # on schedule, none skipped
    assert len(meter) >= 3  # the TCP meter on its own bus is not held up by the serial bus
    profile = load_profile("eastron_sdm630")
    for row in meter:
        served = decode_served(served_for(row["time"], list(meter_sim.served)), profile)["electricity"]
        assert {k: row[k] for k in served} == served
    assert "no answer from unit 3 on" in log and "Traceback" not in log
