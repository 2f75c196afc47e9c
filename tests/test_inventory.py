"""The fleet inventory without a broker: the agent's side of the status (edge_agent/inventory.py, Agent.status),
the collector's pure core and its SQLite file (collector/inventory.py), the InfluxDB points
(collector/health.py info_lines) and `edge-collector gateways list | show` (collector/fleet.py)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import msgspec
import pytest

from collector import cli as collector_cli
from collector.fleet import NEVER_SEEN, REVOKED, fleet_rows, format_detail, format_table, gateway_detail
from collector.health import (
    DEVICE_INFO_MEASUREMENT,
    GATEWAY_INFO_MEASUREMENT,
    health_lines,
    info_lines,
)
from collector.ingest import TimePolicy
from collector.inventory import Inventory, InventoryStore, read_inventory
from collector.registry import GatewayRegistry, format_identity_key
from edge_agent import config as agent_config
from edge_agent import inventory as agent_inventory
from edge_agent.modbus.identify import Identified, NotOffered
from edge_agent.serial.source import Fix
from wire.status import MAX_STATUS_BYTES, decode_status, encode_status

NOW = 1_800_000_000_000_000_000
SEC = 1_000_000_000


def status(state: str = "online", **fields) -> object:
    return decode_status(encode_status(state, **fields))


def modbus_info(serial: str = "", **ident) -> dict:
    info = {"kind": "modbus-tcp", "bus": "tcp://10.0.0.5:502", "unit": 1, "profile": "eastron_sdm630",
            "model": "SDM630", "modbus_id": {"state": "read", "conformity": 0x83, "vendor_name": "ACME", **ident}}
    if serial:
        info["serial"] = serial
    return info


def heartbeat(**extra) -> object:
    fields = dict(gateway="gw-1", time_ns=NOW, version="0.2.0", config_version=3, config_sha256="ab" * 32,
                  location={"lat": 52.37, "lon": 4.89, "alt": 2.0}, location_source="config",
                  backlog_messages=12, devices={"m1": {"polls": 10, "errors": 0, "failing": False},
                                                "m2": {"polls": 3, "errors": 7, "failing": True,
                                                       "last_error": "no answer"}},
                  inventory={"m1": modbus_info(), "m2": modbus_info(product_code="X")})
    fields.update(extra)
    return status(**fields)


# --- the collector's core ------------------------------------------------------------------------------------


def test_a_heartbeat_makes_a_record_with_devices_identification_and_health() -> None:
    inv = Inventory()
    change = inv.status("gw-1", heartbeat(), NOW + 5)
    assert change.significant and change.write_info
    record = inv.gateways["gw-1"]
    assert (record.state, record.version, record.config_version, record.backlog_messages) == ("online", "0.2.0", 3, 12)
    assert (record.location.lat, record.location.lon, record.location_source) == (52.37, 4.89, "config")
    assert record.devices["m1"].info.modbus_id.vendor_name == "ACME"
    assert record.devices["m2"].health.failing and record.failing_devices() == 1
    assert inv.urgent and inv.dirty == {"gw-1"}

    # The same again, with other health and backlog: worth a write on the slow timer only, no info points.
    inv.take_dirty()
    change = inv.status("gw-1", heartbeat(backlog_messages=0, location={"lat": 52.3701, "lon": 4.89}), NOW + 60 * SEC)
    assert not change.significant and not change.write_info and not inv.urgent and inv.dirty == {"gw-1"}
    assert inv.gateways["gw-1"].backlog_messages == 0

    # A new configuration, a device's new identity, a move: significant, and info points.
    for different in ({"config_version": 4}, {"inventory": {"m1": modbus_info(serial="S1"), "m2": modbus_info()}},
                      {"location": {"lat": 52.5, "lon": 4.89}}, {"version": "0.3.0"}):
        inv.take_dirty()
        change = inv.status("gw-1", heartbeat(**different), NOW + 120 * SEC)
        assert change.significant and change.write_info and inv.urgent, different


def test_the_last_will_keeps_what_the_gateway_said_and_uplinks_only_update_last_seen() -> None:
    inv = Inventory()
    inv.status("gw-1", heartbeat(), NOW)
    inv.take_dirty()
    assert inv.status("gw-1", status("offline", gateway="gw-1"), NOW + 90 * SEC).significant
    record = inv.gateways["gw-1"]
    assert record.state == "offline" and record.state_since_ns == NOW + 90 * SEC
    assert record.last_seen_ns is None  # a status is not "seen" by itself: the collector's rule says when
    assert set(record.devices) == {"m1", "m2"} and record.version == "0.2.0"
    inv.seen("gw-1", NOW + 100 * SEC, uplink=True)  # a message the broker kept: not a sign of life
    assert record.state == "offline" and record.last_seen_ns == record.last_uplink_ns == NOW + 100 * SEC
    inv.seen("gw-new", NOW, uplink=True)
    assert inv.gateways["gw-new"].state == "unknown"


def test_a_record_holds_only_its_gateways_data_and_stays_bounded() -> None:
    inv = Inventory(max_gateways=2)
    inv.status("gw-1", heartbeat(), NOW)
    # gw-evil's status (whatever ids it lists) lands in gw-evil's record; gw-1's is untouched.
    evil = heartbeat(gateway="gw-evil", inventory={"m1": modbus_info(serial="FAKE"), "extra": modbus_info()})
    inv.status("gw-evil", evil, NOW + 1)
    assert inv.gateways["gw-1"].devices["m1"].info.serial is None
    assert set(inv.gateways["gw-evil"].devices) == {"m1", "m2", "extra"}
    # A status replaces the device set: a gateway cannot pile up devices over time.
    inv.status("gw-evil", heartbeat(devices={}, inventory={"only": modbus_info()}), NOW + 2)
    assert set(inv.gateways["gw-evil"].devices) == {"only"}
    # Devices over the gateway's budget are left out; gateways over max_gateways are not recorded.
    inv.status("gw-1", heartbeat(), NOW + 3, devices_allowed={"m1"})
    assert set(inv.gateways["gw-1"].devices) == {"m1"}
    assert not inv.status("gw-3", heartbeat(), NOW).recorded and inv.full == 1 and "gw-3" not in inv.gateways


def test_info_points_are_refreshed_every_info_interval() -> None:
    inv = Inventory(info_interval_ns=3600 * SEC)
    assert inv.status("gw-1", heartbeat(), NOW).write_info
    assert not inv.status("gw-1", heartbeat(), NOW + 3599 * SEC).write_info
    assert inv.status("gw-1", heartbeat(), NOW + 3600 * SEC).write_info


# --- the file ----------------------------------------------------------------------------------------------------


def test_the_store_round_trip_is_private_and_shared_by_two_collectors(tmp_path: Path) -> None:
    path = tmp_path / "state" / "inventory.db"
    a, b = Inventory(), Inventory()
    a.status("gw-1", heartbeat(), NOW + 10 * SEC)
    b.status("gw-1", heartbeat(version="0.1.9"), NOW + 5 * SEC)  # an older status, seen by another collector
    b.seen("gw-1", NOW + 20 * SEC, uplink=True)  # ... which has seen a later uplink
    store_a, store_b = InventoryStore(path), InventoryStore(path)
    assert store_a.save(a.take_dirty()) == 1
    assert store_b.save(b.take_dirty()) == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (record,) = InventoryStore(path, readonly=True).load()
    assert record.version == "0.2.0"  # the newer status's record
    assert record.last_seen_ns == NOW + 20 * SEC  # the latest sign of life of all
    assert record.devices["m2"].info.modbus_id.product_code == "X"
    # Loaded into a new core (a collector restart), it is known and not dirty.
    c = Inventory()
    c.load(store_a.load())
    assert c.gateways["gw-1"].config_version == 3 and not c.dirty
    # A row this program cannot read (a newer collector's, damaged) is left out, never fatal.
    store_a._db.execute("INSERT INTO gateways VALUES ('gw-x', 1, 1, '{not json')")
    assert [r.gateway for r in store_a.load()] == ["gw-1"]
    store_a.close()
    store_b.close()
    assert read_inventory(tmp_path / "missing.db") == {}


# --- InfluxDB points ---------------------------------------------------------------------------------------------


def test_info_lines_have_bounded_tags_and_fixed_field_types() -> None:
    doc = heartbeat(inventory={"m1": modbus_info(serial="S\n1", product_code='P"1'), "m2": modbus_info()})
    lines = info_lines(doc, "gw-1", NOW, devices_allowed={"m1"})
    assert len(lines) == 2
    gateway, device = (line.decode() for line in lines)
    assert gateway.startswith(f"{GATEWAY_INFO_MEASUREMENT},gateway=gw-1 ")
    for field in ('version="0.2.0"', "config_version=3i", f'config_sha256="{"ab" * 32}"', "latitude=52.37",
                  "longitude=4.89", "altitude=2", 'location_source="config"', "devices=2i"):
        assert field in gateway, field
    assert device.startswith(f"{DEVICE_INFO_MEASUREMENT},device=m1,gateway=gw-1 ")
    for field in ('kind="modbus-tcp"', "unit=1i", 'profile="eastron_sdm630"', 'serial="S 1"', 'modbus_id="read"',
                  "modbus_conformity=131i", 'modbus_vendor_name="ACME"', 'modbus_product_code="P\\"1"'):
        assert field in device, field
    assert info_lines(status("offline", gateway="gw-1"), "gw-1", NOW) == []
    assert info_lines(status("online", gateway="gw-1", time_ns=NOW), "gw-1", NOW) == []  # an older agent's
    health = health_lines(doc, "gw-1", NOW, TimePolicy(300 * SEC, 0, 0)).lines
    assert b"devices_failing=1i" in health[0] and any(b"failing=1i" in line for line in health[1:])


# --- gateways list / show ------------------------------------------------------------------------------------------


def _registry(path: Path) -> GatewayRegistry:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    reg = GatewayRegistry(path, create=True)
    for gateway in ("gw-1", "gw-2", "gw-3"):
        reg.add(gateway, format_identity_key(ed25519.Ed25519PrivateKey.generate().public_key()))
    reg.revoke("gw-3")
    return reg


def test_rows_merge_the_registry_and_the_inventory(tmp_path: Path) -> None:
    reg = _registry(tmp_path / "gateways.db")
    inv = Inventory()
    for gateway in ("gw-1", "gw-3"):  # as the collector does for a heartbeat (collector/app.py _status)
        inv.seen(gateway, NOW - 30 * SEC)
        inv.status(gateway, heartbeat(), NOW - 30 * SEC)
    inv.seen("gw-plain", NOW - 3 * 3600 * SEC, uplink=True)
    rows = fleet_rows({e.gateway_id: e for e in reg.list()}, inv.gateways, NOW)
    assert [(r["gateway"], r["state"]) for r in rows] == [
        ("gw-1", "online"), ("gw-2", NEVER_SEEN), ("gw-3", REVOKED), ("gw-plain", "unknown")]
    first = rows[0]
    assert (first["devices_ok"], first["devices_failing"], first["backlog_messages"], first["last_seen_age_s"]) == (
        1, 1, 12, 30.0)
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["GATEWAY", "STATE", "LAST"]
    assert table[1].split() == ["gw-1", "online", "30s", "ago", "12", "1", "ok,", "1", "failing", "0.2.0", "v3",
                                "abababab", "52.37000,4.89000", "(config)"]
    assert "never seen" in table[2] and "revoked" in table[3] and "3h ago" in table[4]
    detail = gateway_detail("gw-1", reg.list()[0], inv.gateways["gw-1"], NOW)
    text = format_detail(detail)
    assert "m2: FAILING; modbus-tcp tcp://10.0.0.5:502 unit 1" in text
    assert "Modbus identification (FC 43/14): read conformity 0x83: vendor_name 'ACME', product_code 'X'" in text
    assert json.loads(json.dumps(detail))["devices"]["m1"]["info"]["modbus_id"]["vendor_name"] == "ACME"
    reg.close()


def test_the_cli_reads_both_files_from_collector_toml(tmp_path: Path, capsys) -> None:
    _registry(tmp_path / "gateways.db").close()
    (tmp_path / "keys").mkdir()
    inv = Inventory()
    inv.status("gw-1", heartbeat(), time.time_ns())
    store = InventoryStore(tmp_path / "inventory.db")
    store.save(inv.take_dirty())
    store.close()
    config = tmp_path / "collector.toml"
    config.write_text(f'[security]\nkeys_dir = "{tmp_path / "keys"}"\nregistry = "{tmp_path / "gateways.db"}"\n'
                      f'[inventory]\npath = "{tmp_path / "inventory.db"}"\n')
    assert collector_cli.main(["gateways", "list", "-c", str(config), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["gateway"]: r["state"] for r in rows} == {"gw-1": "online", "gw-2": NEVER_SEEN, "gw-3": REVOKED}
    assert collector_cli.main(["gateways", "show", "gw-1", "--config", str(config), "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert detail["registry"]["status"] == "active" and detail["config_version"] == 3
    assert collector_cli.main(["gateways", "show", "gw-9", "-c", str(config)]) == 2
    assert "neither registered nor in the fleet inventory" in capsys.readouterr().err
    assert collector_cli.main(["gateways", "list", "-c", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.toml" in err and err.count("\n") == 1
    # --registry alone, no collector.toml: the registry listing as before
    assert collector_cli.main(["gateways", "list", "--registry", str(tmp_path / "gateways.db"), "--json"]) == 0
    assert [r["registry"] for r in json.loads(capsys.readouterr().out)] == ["active", "active", "revoked"]


# --- the agent's side ----------------------------------------------------------------------------------------------


def _agent_config(tmp_path: Path, extra: str = "") -> agent_config.AgentConfig:
    (tmp_path / "agent.toml").write_text(f"""
[gateway]
id = "gw-1"
state_dir = "{tmp_path / 'state'}"
location = {{ lat = 52.37, lon = 4.89, alt = 2 }}

[[devices]]
kind = "modbus-tcp"
id = "m1"
profile = "eastron_sdm630"
host = "127.0.0.1"

[[devices]]
kind = "serial"
id = "gps"
port = "/dev/ttyGPS"
protocol = "nmea"
{extra}""")
    return agent_config.load(tmp_path / "agent.toml")


def test_the_agents_status_carries_a_valid_bounded_inventory(tmp_path: Path) -> None:
    from edge_agent.app import Agent

    agent = Agent(_agent_config(tmp_path))
    doc = decode_status(agent.status())  # what a collector accepts
    assert doc.location.lat == 52.37 and doc.location_source == "config" and doc.config_version == 0
    assert msgspec.to_builtins(doc.inventory) == {
        "m1": {"kind": "modbus-tcp", "bus": "tcp://127.0.0.1:502", "unit": 1, "profile": "eastron_sdm630",
               "model": "SDM630", "modbus_id": {"state": "pending"}},
        "gps": {"kind": "serial", "bus": "/dev/ttyGPS", "protocol": "nmea"}}
    assert doc.devices["gps"].failing is False  # not silent for long yet

    polled = agent.buses[0].devices[0]
    polled.identification = Identified(0x81, {0: "ACME \x1b", 1: "x" * 200})
    gps = agent.serial_sources[0]
    gps.fix = Fix(48.1, 11.5, 99999.0, NOW)  # an altitude out of range is left out, not the whole status
    gps.identity = {"model": "u-blox\n7"}
    agent.running_config_version, agent.running_config_sha256 = 7, "cd" * 32
    doc = decode_status(agent.status())
    assert (doc.location.lat, doc.location.alt, doc.location.time_ns, doc.location_source) == (48.1, None, NOW, "gps")
    assert doc.config_version == 7 and doc.config_sha256 == "cd" * 32
    ident = doc.inventory["m1"].modbus_id
    assert (ident.state, ident.vendor_name, len(ident.product_code)) == ("read", "ACME", 128)
    assert doc.inventory["gps"].model == "u-blox 7"
    polled.identification = NotOffered("exception 1")
    assert decode_status(agent.status()).inventory["m1"].modbus_id.state == "not_offered"

    # Too many devices for one status: the inventory goes, the heartbeat stays under the collector's limit.
    polled.tags["model"] = "m" * 100
    agent.buses[0].devices *= 900  # (and the GPS: within MAX_DEVICES)
    for i, device in enumerate(agent.buses[0].devices):
        agent.buses[0].devices[i] = type(device)(f"dev-{i:04d}-{'x' * 100}", 1, 1.0, [], dict(device.tags))
    payload = agent.status()
    assert len(payload) <= MAX_STATUS_BYTES and decode_status(payload).inventory is None


def test_profile_names_and_texts() -> None:
    assert agent_inventory.profile_name("/etc/citynerve/profiles/my_meter.toml") == "my_meter"
    assert agent_inventory.profile_name("eastron_sdm630") == "eastron_sdm630"
    assert agent_inventory.text("a\tb\x85c", 4) == "a b"


@pytest.mark.parametrize(("location", "error"), [
    ("{ lat = 91, lon = 0 }", "gateway.location.lat: expected degrees north, -90..90, got 91"),
    ("{ lat = 0, lon = -181 }", "gateway.location.lon: expected degrees east, -180..180, got -181"),
    ("{ lat = 0, lon = 0, alt = 30000 }", "gateway.location.alt: expected metres above mean sea level"),
    ("{ lat = 0 }", "gateway.location.lon: required key is missing"),
    ("{ lat = 0, lon = 0, elevation = 1 }", "gateway.location.elevation: unknown key (known keys: lat, lon, alt)"),
])
def test_a_bad_location_is_one_line_naming_the_key(tmp_path: Path, location: str, error: str) -> None:
    from wire.config import ConfigError

    (tmp_path / "agent.toml").write_text(f'[gateway]\nid = "gw-1"\nlocation = {location}\n')
    with pytest.raises(ConfigError) as caught:
        agent_config.load(tmp_path / "agent.toml")
    assert error in str(caught.value)


def test_serial_sources_learn_identity_and_position_from_their_frames() -> None:
    """Real captures through the real decoders: a DSMR meter's equipment id (not its gas meter's), a GPS fix."""
    from edge_agent.serial.config import SerialDevice
    from edge_agent.serial.source import SerialSource

    golden = Path(__file__).parent / "golden"
    p1 = SerialSource(SerialDevice(id="p1", port="/dev/ttyP1", protocol="dsmr"))
    p1.readings(p1.info.make_decoder(p1.device).feed((golden / "dsmr" / "dsmr42_kaifa.txt").read_bytes()), NOW)
    assert p1.identity == {"serial": "3960221976967177082151037881335713"} and p1.fix is None
    gps = SerialSource(SerialDevice(id="gps", port="/dev/ttyGPS", protocol="nmea"))
    sentences = b"$GPGGA,184353.07,1929.045,S,02410.506,E,1,04,2.6,100.00,M,-33.9,M,,0000*6D\r\n"  # golden/nmea
    gps.readings(gps.info.make_decoder(gps.device).feed(sentences), NOW)
    assert gps.fix == Fix(-(19 + 29.045 / 60), 24 + 10.506 / 60, 100.0, NOW)


def test_meters_on_a_bus_are_inventoried_by_address_and_not_asked_for_modbus_identification(tmp_path: Path) -> None:
    from edge_agent.app import Agent

    agent = Agent(_agent_config(tmp_path, """
[[buses]]
id = "rs485-1"
target = "/dev/ttyRS485"

[[devices]]
kind = "dlt645"
id = "flat-12"
bus = "rs485-1"
address = "000102030425"

[[devices]]
kind = "mbus"
id = "heat-1"
bus = "rs485-1"
secondary = "26718590FFFFFFFF"
"""))
    inventory = msgspec.to_builtins(decode_status(agent.status()).inventory)
    assert inventory["flat-12"] == {"kind": "dlt645", "bus": "rs485-1", "address": "000102030425", "protocol": "dlt645"}
    assert inventory["heat-1"] == {"kind": "mbus", "bus": "rs485-1", "address": "26718590FFFFFFFF", "protocol": "mbus"}
    meters = {d.id: d for engine in agent.buses for d in engine.devices if d.meter is not None}
    meters["heat-1"].discovered["vendor"] = "LUG"  # what _poll_meter learns from an M-Bus telegram's header
    assert decode_status(agent.status()).inventory["heat-1"].vendor == "LUG"
