"""The live reconfiguration's plan (edge_agent/reconfig.py): what a new configuration stops, starts and keeps.
Pure: configurations in, a plan out; no clock, no sockets, no processes."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import load_text
from edge_agent.reconfig import FIXED_KEYS, Plan, fixed_change, plan, shape
from wire.config import ConfigError

BASE = """
[gateway]
id = "gw-1"
state_dir = "/var/lib/citynerve"
[mqtt]
host = "10.0.0.1"
tls = false
password = "secret-1"
[[buses]]
id = "rs485-1"
target = "/dev/ttyUSB0"
baud = 9600
[[devices]]
kind = "modbus"
id = "meter-a"
bus = "rs485-1"
unit = 1
profile = "eastron_sdm120"
[[devices]]
kind = "modbus"
id = "meter-b"
bus = "rs485-1"
unit = 2
profile = "eastron_sdm120"
[[devices]]
kind = "modbus-tcp"
id = "hall"
host = "10.0.0.5"
profile = "eastron_sdm630"
[[devices]]
kind = "serial"
id = "p1"
port = "/dev/ttyUSB1"
protocol = "dsmr"
"""


def cfg(text: str = BASE, **replace: str):
    for old, new in replace.items():
        text = text.replace(old.replace("__", " "), new)
    return load_text(textwrap.dedent(text), "test.toml", Path("."))


def profiles(content: dict[str, Any] | None = None):
    """Profiles by name as the shell would load them; here any comparable value."""
    content = content or {}
    return lambda name: content.get(name, f"content of {name}")


def diff(old, new, old_profiles=None, new_profiles=None) -> Plan:
    return plan(shape(old, old_profiles or profiles()), shape(new, new_profiles or profiles()))


def test_the_same_configuration_changes_nothing() -> None:
    p = diff(cfg(), cfg())
    assert p.changes_nothing
    assert p.keep_buses == ("rs485-1", "tcp://10.0.0.5:502") and p.keep_serial == ("p1",)
    assert p.describe() == "buses: kept rs485-1, tcp://10.0.0.5:502; serial sources: kept p1"


def test_a_device_added_to_one_bus_rebuilds_that_bus_only() -> None:
    new = cfg(BASE + '[[devices]]\nkind = "modbus"\nid = "meter-c"\nbus = "rs485-1"\nunit = 3\n'
                     'profile = "eastron_sdm120"\n')
    p = diff(cfg(), new)
    assert p.stop_buses == p.start_buses == ("rs485-1",)
    assert p.keep_buses == ("tcp://10.0.0.5:502",) and p.keep_serial == ("p1",)
    assert not (p.restart_link or p.uplink or p.outbox_bounds or p.log)
    assert p.describe() == "buses: kept tcp://10.0.0.5:502; rebuilt rs485-1; serial sources: kept p1"


def test_a_new_tcp_endpoint_starts_a_bus_and_a_removed_one_stops() -> None:
    p = diff(cfg(), cfg(**{'host = "10.0.0.5"': 'host = "10.0.0.6"'}))
    assert p.stop_buses == ("tcp://10.0.0.5:502",) and p.start_buses == ("tcp://10.0.0.6:502",)
    assert p.keep_buses == ("rs485-1",)
    assert "stopped tcp://10.0.0.5:502" in p.describe() and "started tcp://10.0.0.6:502" in p.describe()


def test_bus_settings_a_device_interval_and_a_serial_device_each_rebuild_what_they_belong_to() -> None:
    assert diff(cfg(), cfg(**{"baud = 9600": "baud = 19200"})).start_buses == ("rs485-1",)
    assert diff(cfg(), cfg(**{"unit = 2": 'unit = 2\ninterval = "5s"'})).start_buses == ("rs485-1",)
    p = diff(cfg(), cfg(**{'protocol = "dsmr"': 'protocol = "dsmr"\nbaud = 9600'}))
    assert p.stop_serial == p.start_serial == ("p1",) and not p.stop_buses


def test_a_bus_of_meters_is_kept_started_and_rebuilt_like_any_bus() -> None:
    meters = BASE + textwrap.dedent("""
        [[buses]]
        id = "rs485-2"
        target = "/dev/ttyUSB2"
        [[devices]]
        kind = "dlt645"
        id = "flat-1"
        bus = "rs485-2"
        address = "000102030425"
        [[devices]]
        kind = "mbus"
        id = "heat-1"
        bus = "rs485-2"
        address = 5
        """)
    started = diff(cfg(), cfg(meters))
    assert started.start_buses == ("rs485-2",) and started.keep_buses == ("rs485-1", "tcp://10.0.0.5:502")
    assert diff(cfg(meters), cfg(meters)).changes_nothing
    edited = diff(cfg(meters), cfg(meters, **{'address = "000102030425"': 'address = "000102030426"'}))
    assert edited.stop_buses == edited.start_buses == ("rs485-2",) and "rs485-1" in edited.keep_buses
    assert diff(cfg(meters), cfg()).stop_buses == ("rs485-2",)


def test_a_profile_whose_content_changed_on_disk_rebuilds_the_buses_using_it() -> None:
    p = diff(cfg(), cfg(), new_profiles=profiles({"eastron_sdm630": "edited"}))
    assert p.start_buses == ("tcp://10.0.0.5:502",) and p.keep_buses == ("rs485-1",)


def test_mqtt_settings_restart_the_link_and_secrets_compare_by_value() -> None:
    assert not diff(cfg(), cfg()).restart_link  # two Secret objects with the same value: unchanged
    assert diff(cfg(), cfg(**{'"secret-1"': '"secret-2"'})).restart_link
    p = diff(cfg(), cfg(**{"tls = false": "tls = false\nport = 9999"}))
    assert p.restart_link and p.describe().endswith("MQTT link restarted")
    assert not p.start_buses and not p.start_serial


def test_bounds_and_log_settings_are_applied_without_touching_buses() -> None:
    text = BASE + '[uplink]\nmax_unacked_messages = 10\n[outbox]\nmax_size = "2MB"\n[log]\nlevel = "debug"\n'
    p = diff(cfg(), cfg(text))
    assert p.uplink and p.outbox_bounds and p.log and not p.restart_link
    assert not (p.stop_buses or p.start_buses or p.stop_serial or p.start_serial)
    assert p.describe().endswith("uplink, outbox bounds, log applied")


def test_stops_are_named_before_starts_so_a_port_can_pass_from_a_source_to_a_bus() -> None:
    text = BASE.replace('port = "/dev/ttyUSB1"\nprotocol = "dsmr"', 'port = "/dev/ttyUSB2"\nprotocol = "dsmr"')
    text = text.replace('target = "/dev/ttyUSB0"', 'target = "/dev/ttyUSB1"')
    p = diff(cfg(), cfg(text))
    assert p.stop_buses == ("rs485-1",) and p.stop_serial == ("p1",)
    assert p.start_buses == ("rs485-1",) and p.start_serial == ("p1",)


@pytest.mark.parametrize(("replace", "key"), [
    ({'id = "gw-1"': 'id = "gw-2"'}, "gateway.id"),
    ({'state_dir = "/var/lib/citynerve"': 'state_dir = "/srv/x"'}, "gateway.state_dir"),
    ({"[mqtt]": '[outbox]\npath = "/srv/outbox.sqlite3"\n[mqtt]'}, "outbox.path"),
    ({"[mqtt]": '[metrics]\nlisten = 9108\n[mqtt]'}, "metrics"),  # a push must not open a listening socket
])
def test_keys_a_live_reconfiguration_cannot_change(replace: dict[str, str], key: str) -> None:
    assert fixed_change(cfg(), cfg(**replace)) == key
    assert key.split(".")[0] in {k.split(".")[0] for k in FIXED_KEYS}


def test_the_security_section_is_fixed_and_named_to_the_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from wire.keys import collector_public_to_pem, identity_to_pem
    from wire.seal import CollectorKey

    for name in ("id1.key", "id2.key"):
        (tmp_path / name).write_bytes(identity_to_pem(Ed25519PrivateKey.generate()))
    (tmp_path / "collector.pub").write_bytes(collector_public_to_pem(CollectorKey.generate()))
    section = f'[security]\nidentity_key = "{tmp_path}/id1.key"\ncollector_key = "{tmp_path}/collector.pub"\n'
    secured = cfg(BASE + section)
    assert fixed_change(cfg(), secured) == "security"
    assert fixed_change(secured, cfg()) == "security"
    assert fixed_change(secured, cfg(BASE + section.replace("id1.key", "id2.key"))) == "security.identity_key"
    assert fixed_change(secured, cfg(BASE + section + "rotate_after = 60\n")) == "security.rotate_after"
    assert fixed_change(secured, cfg(BASE + section)) is None
    listening = cfg(BASE + "[metrics]\nlisten = 9108\n")
    assert fixed_change(listening, cfg(BASE + "[metrics]\nlisten = 9109\n")) == "metrics.listen"


def test_a_configuration_given_as_text_is_checked_like_a_file() -> None:
    with pytest.raises(ConfigError) as err:
        cfg(**{'id = "meter-b"': 'id = "meter-b"\nunti = 3'})
    assert str(err.value) == 'test.toml: devices[1].unti: unknown key (did you mean "unit"?)'
    with pytest.raises(ConfigError, match=r"^test.toml: not valid TOML: "):
        cfg("[gateway\n")
