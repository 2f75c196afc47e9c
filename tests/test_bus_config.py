"""[[buses]] and kind = "modbus" devices: validation with key paths."""

from __future__ import annotations

import pytest

from edge_agent import config
from wire.config import ConfigError

BASE = """
[gateway]
id = "gw-bus"
state_dir = "{state}"

[[buses]]
id = "rs485-1"
target = "/dev/ttyUSB0"
baud = 9600
parity = "E"

[[buses]]
id = "gateway-a"
target = "rtu-over-tcp://192.0.2.9:4001"

[[devices]]
kind = "modbus"
id = "m1"
bus = "rs485-1"
unit = 1
profile = "eastron_sdm630"

[[devices]]
kind = "modbus"
id = "m2"
bus = "gateway-a"
unit = 2
profile = "eastron_sdm630"

[[devices]]
kind = "modbus-tcp"
id = "m3"
host = "192.0.2.5"
profile = "eastron_sdm630"
"""


def load(tmp_path, text: str):
    path = tmp_path / "agent.toml"
    path.write_text(text.format(state=tmp_path))
    return config.load(path)


def test_buses_and_implicit_tcp_bus(tmp_path) -> None:
    cfg = load(tmp_path, BASE)
    assert [cfg.bus_of(d).id for d in cfg.devices] == ["rs485-1", "gateway-a", "tcp://192.0.2.5:502"]
    assert cfg.bus_of(cfg.devices[0]).where.kind == "serial"
    assert cfg.bus_of(cfg.devices[1]).where.kind == "rtu-over-tcp"
    assert cfg.bus_of(cfg.devices[2]).where.port == 502


@pytest.mark.parametrize(
    "edit, expected",
    [
        (('bus = "gateway-a"', 'bus = "gateway-b"'), 'devices[1].bus: no bus "gateway-b" in [[buses]] (known: "rs485-1", "gateway-a")'),
        (("unit = 1\n", "unit = 248\n"), "devices[0].unit: expected a unit id 1..247 on serial bus rs485-1, got 248"),
        (("unit = 2\n", "unit = 1\n", 'bus = "gateway-a"', 'bus = "rs485-1"'), "devices[1].unit: unit 1 on bus rs485-1 is already devices[0]"),
        (('target = "/dev/ttyUSB0"', 'target = "ttyUSB0"'), 'buses[0].target: expected "tcp://HOST:PORT"'),
        (('target = "/dev/ttyUSB0"', 'target = "tcp://host:99999"'), "buses[0].target: TCP port 99999 is outside 1..65535"),
        (("baud = 9600", "baud = 9601"), "buses[0].baud: expected one of 300, 600"),
        (('parity = "E"', 'parity = "X"'), 'buses[0].parity: expected one of "E", "N", "O", got "X"'),
        (('target = "rtu-over-tcp://192.0.2.9:4001"', 'target = "rtu-over-tcp://192.0.2.9:4001"\nframing = "ascii"'),
         "buses[1].framing: ASCII framing needs a serial port"),
        (('id = "gateway-a"', 'id = "rs485-1"'), 'buses[1].id: "rs485-1" is already used by buses[0]'),
        (('unit = 2\nprofile', 'unit = 2\nworkarounds = ["one_reqest_per_point"]\nprofile'),
         'devices[1].workarounds[0]: expected one of "no_gap_reads", "one_request_per_point", got "one_reqest_per_point"'),
    ],
)
def test_bus_errors(tmp_path, edit: tuple[str, ...], expected: str) -> None:
    text = BASE
    for old, new in zip(edit[::2], edit[1::2], strict=True):
        text = text.replace(old, new, 1)
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert expected in str(exc.value)


def test_a_device_id_follows_the_one_name_rule(tmp_path) -> None:
    """U+0085 passed the agent's config while the schema refuses it: every batch holding the device was then
    refused whole at the collector and sent again forever. The agent now refuses it in `check`."""
    import subprocess
    import sys

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[gateway]\nid = "gw-1"\n[mqtt]\ntls = false\n[[devices]]\nkind = "modbus-tcp"\n'
                   'id = "meter\u0085"\nhost = "127.0.0.1"\nport = 502\nprofile = "eastron_sdm630"\n')
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check", str(cfg)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "devices[0].id" in result.stderr, result.stderr
