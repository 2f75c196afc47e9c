"""kind = "dlt645", "cjt188", "mbus" devices in agent.toml: validation with file, key path and device; the bus's line
settings by what it carries; `edge-agent check` output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.modbus.devices import bus_engines
from wire.config import ConfigError

BASE = """
[gateway]
id = "gw-meters"
state_dir = "{state}"

[[buses]]
id = "rs485-1"
target = "/dev/ttyUSB0"

[[buses]]
id = "mbus-1"
target = "/dev/ttyUSB1"
baud = 9600

[[buses]]
id = "mixed"
target = "/dev/ttyUSB2"
baud = 2400
parity = "E"

[[buses]]
id = "modbus-only"
target = "/dev/ttyUSB3"

[[buses]]
id = "gateway-a"
target = "rtu-over-tcp://192.0.2.9:4001"

[[devices]]
kind = "dlt645"
id = "flat-1"
bus = "rs485-1"
address = "000102030425"

[[devices]]
kind = "dlt645"
id = "flat-2"
bus = "rs485-1"
address = "000000000012"
edition = "1997"
identifiers = ["energy_import", "voltage_l1"]
interval = "30s"
tags = {{ flat = "2" }}

[[devices]]
kind = "cjt188"
id = "water-1"
bus = "rs485-1"
meter_type = "cold_water"
address = "11111111111111"

[[devices]]
kind = "cjt188"
id = "heat-1"
bus = "mixed"
meter_type = 0x20
address = "00000000000033"
unit_first = true
di_order = "high_first"

[[devices]]
kind = "modbus"
id = "th-1"
bus = "mixed"
unit = 1
profile = "eastron_sdm120"

[[devices]]
kind = "modbus"
id = "th-2"
bus = "modbus-only"
unit = 1
profile = "eastron_sdm120"

[[devices]]
kind = "mbus"
id = "heat-2"
bus = "mbus-1"
address = 5

[[devices]]
kind = "mbus"
id = "heat-3"
bus = "mbus-1"
secondary = "26718590FFFFFFFF"
max_telegrams = 4
"""


def load(tmp_path: Path, text: str) -> config.AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text.format(state=tmp_path))
    return config.load(path)


def test_meters_on_their_buses_and_the_lines_they_get(tmp_path: Path) -> None:
    cfg = load(tmp_path, BASE)
    lines = {b.id: (b.baud, b.parity) for b in cfg.buses}
    # meters only: their standards' 2400 8E1; Modbus only: 9600 8N1; what a bus gives is kept
    assert lines == {"rs485-1": (2400, "E"), "mbus-1": (9600, "E"), "mixed": (2400, "E"),
                     "modbus-only": (9600, "N"), "gateway-a": (9600, "N")}
    flat1, flat2 = cfg.meter_devices[:2]
    assert len(flat1.reads()) == len([i for i in flat1.reads() if i.numeric]) > 20  # every numeric identifier
    assert "address" not in [i.name for i in flat1.reads()] and "meter_time" not in [i.name for i in flat1.reads()]
    assert [i.name for i in flat2.reads()] == ["energy_import", "voltage_l1"]
    engines = {e.bus.id: e for e in bus_engines(cfg)}
    assert [d.id for d in engines["mixed"].devices] == ["heat-1", "th-1"]  # Modbus and meters share one owner
    assert [d.id for d in engines["rs485-1"].devices] == ["flat-1", "flat-2", "water-1"]
    flat2_polled = engines["rs485-1"].devices[1]
    assert flat2_polled.tags == {"protocol": "dlt645-1997", "flat": "2"} and flat2_polled.interval == 30.0
    assert engines["rs485-1"].transport.parity == "E" and engines["rs485-1"].transport.baud == 2400
    assert engines["mbus-1"].devices[1].meter.session().max_telegrams == 4


@pytest.mark.parametrize(
    "edit, expected",
    [
        (('bus = "mbus-1"\naddress = 5', 'bus = "gateway-a"\naddress = 5'),
         'devices[6].bus: device "heat-2" (kind "mbus") needs a serial bus: bus "gateway-a" is rtu-over-tcp://'),
        (('address = "000102030425"', 'address = "12345"'),
         "devices[0].address: expected the meter's 12-digit address as on its nameplate"),
        (('identifiers = ["energy_import", "voltage_l1"]', 'identifiers = ["energy_import", "voltage_1"]'),
         'devices[1].identifiers[1]: device "flat-2": DL/T 645-1997 has no identifier "voltage_1" in '
         'firmware_profiles/dlt645/1997.toml (did you mean "voltage_l1"?)'),
        (('identifiers = ["energy_import", "voltage_l1"]', 'identifiers = ["energy_import", "energy_import"]'),
         'devices[1].identifiers[1]: device "flat-2": "energy_import" is listed already'),
        (('address = "000000000012"', 'address = "000102030425"'),
         'devices[1].address: device "flat-2": DL/T 645 address 000102030425 on bus rs485-1 is already devices[0]'),
        (('edition = "1997"', 'edition = "2001"'), 'devices[1].edition: expected one of "1997", "2007"'),
        (('meter_type = "cold_water"', 'meter_type = "water"'),
         'devices[2].meter_type: device "water-1": expected one of "cold_water" (10H)'),
        (('meter_type = 0x20', 'meter_type = 0x40'), "40H electricity meters speak DL/T 645"),
        (('di_order = "high_first"', 'di_order = "high"'), 'devices[3].di_order: expected one of "high_first"'),
        (('secondary = "26718590FFFFFFFF"', 'secondary = "26718590FFFFFFFF"\naddress = 7'),
         'devices[7].address: device "heat-3": give the primary address (address = 0..250) or the secondary'),
        (('secondary = "26718590FFFFFFFF"', 'secondary = "2671859"'), "devices[7].secondary: expected a secondary "
                                                                      "address: 16 hex digits"),
        (('bus = "mbus-1"\naddress = 5', 'bus = "mbus-1"\naddress = 251'), "devices[6].address: expected an integer 0..250, got 251"),
        (('baud = 2400\nparity = "E"', 'baud = 2400'),
         'buses[2].parity: bus "mixed" carries Modbus units and cjt188 meters: give its parity'),
        (('bus = "rs485-1"\naddress = "000102030425"', 'bus = "rs485-2"\naddress = "000102030425"'),
         'devices[0].bus: no bus "rs485-2" in [[buses]]'),
        (("max_telegrams = 4", "max_telegrams = 0"), "devices[7].max_telegrams: expected an integer 1..32, got 0"),
    ],
)
def test_meter_errors_name_file_key_and_device(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert old in BASE
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, BASE.replace(old, new, 1))
    assert str(tmp_path / "agent.toml") in str(exc.value)
    assert expected in str(exc.value), str(exc.value)


def test_check_describes_every_meter(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE.format(state=tmp_path))
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "device flat-1: dlt645 on /dev/ttyUSB0 2400 8E1, DL/T 645-2007 address 000102030425" in out
    assert "device flat-2: dlt645 on /dev/ttyUSB0 2400 8E1, DL/T 645-1997 address 000000000012, 2 identifier(s), " \
           "every 30s" in out
    assert "device heat-1: cjt188 on /dev/ttyUSB2 2400 8E1, CJ/T 188 20H address 00000000000033 (di_order " \
           "high_first, unit_first), every 300s" in out
    assert "device heat-3: mbus on /dev/ttyUSB1 9600 8E1, M-Bus secondary address 26718590FFFFFFFF, up to 4 " \
           "telegram(s)" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.format(state=tmp_path).replace('"voltage_l1"]', '"voltage_l9"]'))
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {bad}: devices[1].identifiers[1]: device \"flat-2\": DL/T 645-1997 "
                                    f"has no identifier \"voltage_l9\""), result.stderr
