"""DL/T 645, CJ/T 188 and M-Bus meters end to end: simulated lines on ptys, one real `edge-agent run` polling them on
its buses, mosquitto, the real collector, InfluxDB; what is stored is checked field by field, in the vocabulary's
units.

The lines, as a gateway would have them:
- one RS-485 line at 2400 8E1 shared by a DL/T 645-2007 and a DL/T 645-1997 electricity meter, a CJ/T 188 cold
  water meter, a CJ/T 188 heat meter (the vendor variant with the unit byte first) and a Modbus unit: the
  protocols can share a line, each device answers only its own frames (labkit/shared_line.py);
- an M-Bus line of its own (an M-Bus level converter: M-Bus is not RS-485 electrically) with a heat meter whose
  answer takes two telegrams (FCB toggled).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.mbus import frames as mbus_frames
from edge_agent.mbus import records
from edge_agent.mbus.session import MbusResult
from labkit import stack
from labkit.cjt188_sim import MeterLine
from labkit.cjt188_sim import SimMeter as CjtMeter
from labkit.dlt645_sim import MeterBank, SimMeter
from labkit.influxd import InfluxdServer
from labkit.mbus_sim import MbusLine
from labkit.mbus_sim import SimMeter as MbusMeter
from labkit.shared_line import RtuUnits, SharedLine
from tests.test_e2e import wait_until
from tests.test_e2e_serial import collector_for
from tests.test_mbus import ABB_F95, _split
from tests.test_modbus_bus_serial import PROFILE, expected, registers

pytestmark = pytest.mark.integration

DEVICES = {"e-2007": "electricity", "e-1997": "electricity", "water-3": "water", "heat-4": "heat",
           "th-7": "climate", "heat-mbus": "heat"}


def test_dlt645_cjt188_and_mbus_meters_on_the_agents_buses_into_influxdb(
        tmp_path: Path, mosquitto, influxd: InfluxdServer, influx_db: str) -> None:
    rs485 = SharedLine([MeterBank([SimMeter("000102030425"), SimMeter("000000000012", edition="1997")]).answer,
                        MeterLine([CjtMeter(0x10, "11111111111111"), CjtMeter(0x20, "44", unit_first=True)]).answer,
                        RtuUnits({7: registers(7)}).answer])
    first, second = _split(ABB_F95)
    heat_meter = MbusMeter(5, [first, second])
    mbus = MbusLine([heat_meter])
    profile = tmp_path / "th1.toml"
    profile.write_text(PROFILE)
    every = "2s"  # the RS-485 line's round takes ~1 s at 2400 baud
    devices = [
        {"kind": "dlt645", "id": "e-2007", "bus": "rs485", "address": "000102030425", "interval": every,
         "identifiers": ["energy_import", "voltage_l1", "power", "reactive_power"], "tags": {"flat": "12"}},
        {"kind": "dlt645", "id": "e-1997", "bus": "rs485", "address": "000000000012", "edition": "1997",
         "identifiers": ["energy_import", "voltage_l1"], "interval": every},
        {"kind": "cjt188", "id": "water-3", "bus": "rs485", "meter_type": "cold_water", "address": "11111111111111",
         "interval": every},
        {"kind": "cjt188", "id": "heat-4", "bus": "rs485", "meter_type": "heat", "address": "00000000000044",
         "unit_first": True, "interval": every},
        {"kind": "modbus", "id": "th-7", "bus": "rs485", "unit": 7, "profile": str(profile), "interval": every},
        {"kind": "mbus", "id": "heat-mbus", "bus": "mbus", "address": 5, "interval": every},
    ]
    buses = [{"id": "rs485", "target": rs485.device, "baud": 2400, "parity": "E"},  # shared with Modbus: say it
             {"id": "mbus", "target": mbus.device}]  # meters only: 2400 8E1 by default
    collector = collector_for(tmp_path, mosquitto, influxd, influx_db)
    agent = stack.agent_process(stack.write_agent_config(
        tmp_path / "agent.toml", "gw-meters", stack.mqtt_section(mosquitto), devices, buses=buses))

    def stored() -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for measurement in set(DEVICES.values()):
            for row in influxd.query(f'SELECT * FROM "{measurement}" GROUP BY *', influx_db):
                out.setdefault(row["device"], []).append(row)
        return out

    try:
        agent.start()
        rows = wait_until(lambda: (r := stored()) and all(len(r.get(d, [])) >= 2 for d in DEVICES) and r, 30,
                          "two readings of every meter")
    finally:
        agent.stop()
        collector.stop()
        rs485.close()
        mbus.close()

    e07 = rows["e-2007"][-1]
    assert e07["protocol"] == "dlt645-2007" and e07["flat"] == "12"
    assert 1206.42 <= e07["energy_import"] < 1207  # kWh
    assert e07["power"] == 3456.7 and e07["reactive_power"] == -120.0  # W and var (kW, kvar with a sign on the wire)
    assert 229 <= e07["voltage_l1"] <= 231
    e97 = rows["e-1997"][-1]
    assert e97["protocol"] == "dlt645-1997" and 1206.42 <= e97["energy_import"] < 1207
    assert e97["voltage_l1"] in (229.0, 230.0, 231.0) and e97["power"] is None  # not asked for
    water = rows["water-3"][-1]
    assert water["protocol"] == "cjt188" and 123.45 <= water["volume"] < 124 and water["volume_settlement"] == 100.0
    assert water["valve_state"] == 0 and water["battery_low"] is False and water["status"] == 0
    heat = rows["heat-4"][-1]
    assert heat["protocol"] == "cjt188" and heat["power"] == 12500.0 and heat["flow"] == 0.85  # 12.5 kW -> W
    assert heat["energy_settlement"] == 1000.0 and 1234.56 <= heat["energy"] < 1236  # kWh
    assert (heat["temperature_supply"], heat["temperature_return"]) == (65.12, 40.23)  # °C
    assert heat["operating_time"] == 8760 * 3600  # hours on the wire, seconds in the store
    assert all({k: r[k] for k in expected(7)} == pytest.approx(expected(7)) for r in rows["th-7"])

    decoded = MbusResult([records.decode(f.ci, f.data) for f in map(mbus_frames.parse, (first, second))]).sample({})
    assert decoded is not None
    mbus_row = rows["heat-mbus"][-1]
    assert mbus_row["protocol"] == "mbus" and mbus_row["manufacturer"] == "HYD"
    assert {k: mbus_row[k] for k in decoded.fields} == decoded.fields  # both telegrams, the second's with _p2
    assert any(k.endswith("_p2") for k in decoded.fields) and decoded.units["volume"] == "m³"
    assert heat_meter.requests[:2] == [0x7B, 0x5B]

    log = agent.log_path.read_text()
    assert "Traceback" not in log and "backing off" not in log, log[-2000:]
    seconds = sorted(r["time"] for r in rows["e-2007"])
    assert seconds[1] - seconds[0] >= 1.5e9  # polled on its own interval, not faster
