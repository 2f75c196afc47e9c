"""The data catalogue (docs/catalog.md): rows made from the vocabulary, the three formats, `edge-agent catalog` of
the example and a lab configuration, the serial protocols' declared fields against what their captures decode to,
and `edge-collector catalog` against a real InfluxDB filled by a real agent and collector."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from wire import catalog

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)


# -- rows and formats ---------------------------------------------------------------------------------------------

def _row(measurement: str, field: str, **kw: object) -> catalog.Row:
    return catalog.row(gateway="gw-1", device="m1", source="test", measurement=measurement, field=field, **kw)


def test_a_standard_name_takes_the_tables_unit_type_and_description() -> None:
    r = _row("electricity", "energy_import_t2", unit="kWh", type="float")
    assert (r.unit, r.type, r.standard, r.note) == ("kWh", "float", True, "")
    assert r.description.startswith("active energy drawn from the grid") and r.description.endswith("(variant t2)")
    assert _row("heat", "energy_max_s1_t2").description.endswith("(maximum, storage 1, tariff 2)")
    # unit not known (the store, a bitfield's flag): the table's
    assert _row("electricity", "voltage_l1").unit == "V"


@pytest.mark.parametrize(("measurement", "field", "kw", "note"), [
    ("electricity", "total_kwh", {"unit": "kWh", "description": "the vendor's total"}, "not in the vocabulary"),
    ("electricity", "frequency", {"unit": "mHz"}, "in mHz, the table's Hz"),
    ("electricity", "speed", {}, "not a field of electricity"),
    ("electricity", "power", {"type": "int"}, "type int, the table's float"),
])
def test_a_name_outside_the_vocabulary_keeps_what_is_known(measurement: str, field: str, kw: dict, note: str) -> None:
    r = _row(measurement, field, **kw)
    assert not r.standard and r.note == note
    assert r.unit == kw.get("unit", "") and r.description == kw.get("description", "")


def test_csv_is_rfc_4180_and_json_has_stable_keys() -> None:
    rows = [_row("electricity", "power"),
            _row("hall", "odd", description='a "quoted", comma\nand a line', note="x")]
    text = catalog.to_csv(rows)
    assert text.startswith(",".join(catalog.COLUMNS) + "\r\n") and text.endswith("\r\n")
    assert '"a ""quoted"", comma\nand a line"' in text  # RFC 4180 §2.6, §2.7
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed[0] == list(catalog.COLUMNS) and len(parsed) == 3
    assert parsed[2][catalog.COLUMNS.index("description")] == 'a "quoted", comma\nand a line'
    assert parsed[1][catalog.COLUMNS.index("standard")] == "yes" and parsed[2][8] == "no"
    doc = json.loads(catalog.to_json(rows))
    assert [list(d) for d in doc] == [list(catalog.COLUMNS)] * 2
    assert doc[0]["standard"] is True and doc[0]["unit"] == "W"
    table = catalog.to_table(rows).splitlines()
    assert table[0].split() == ["gateway", "device", "source", "measurement", "field", "unit", "type", "standard",
                                "description", "note"]  # no location known: the column is left out
    assert "and a line" in table[2]  # one line per row


# -- the serial protocols' declared fields ------------------------------------------------------------------------

def _decoded(protocol: str) -> list:
    """Every sample the project's captures of `protocol` decode to."""
    from tests.test_vocabulary import _samples

    golden = ROOT / "tests" / "golden"
    if protocol == "dsmr":
        from edge_agent.serial.dsmr import DsmrDecoder

        return [s for p in sorted((golden / "dsmr").glob("*.txt")) for s in _samples(DsmrDecoder(), p.read_bytes())]
    if protocol == "iec62056-21":
        from edge_agent.serial.iec62056_21 import Iec62056ReadoutDecoder

        return _samples(Iec62056ReadoutDecoder(), (golden / "iec62056_21" / "capture_synthetic.bin").read_bytes())
    if protocol == "nmea":
        from edge_agent.serial.nmea import NmeaDecoder

        data = (golden / "nmea" / "pynmea2_valid_sentences.txt").read_bytes().replace(b"\n", b"\r\n")
        return _samples(NmeaDecoder(), data + (golden / "nmea" / "pynmea2_examples_data.log").read_bytes())
    from edge_agent.serial.sensors import DECODERS
    from tests.test_serial_sensors import stream

    return _samples(DECODERS[protocol](), stream(protocol))


@pytest.mark.parametrize("protocol", ["dsmr", "iec62056-21", "nmea", "sds011", "pmsx003", "mhz19b"])
def test_declared_fields_cover_what_the_captures_decode_to(protocol: str) -> None:
    """edge_agent/serial/protocols.py `fields` is what the catalogue lists without a device: every field a capture
    decodes to is declared, in its measurement and unit (IEC 62056-21's other codes are the obis_* row)."""
    from edge_agent.serial.protocols import protocol_info

    info = protocol_info(protocol)
    assert info.fields is not None
    declared = {(m or info.measurement, f): u for m, fields in info.fields().items() for f, u in fields.items()}
    seen = set()
    for sample in _decoded(protocol):
        for name in sample.fields:
            if protocol == "iec62056-21" and name.startswith("obis_"):
                continue
            key = (sample.measurement or info.measurement, name)
            assert key in declared, f"{protocol}: {key} decoded but not declared"
            assert sample.units.get(name, "") == declared[key], (protocol, key)
            seen.add(key)
    assert len(seen) >= 2


def test_cjt188_declared_fields_are_what_the_meters_answer() -> None:
    from edge_agent.cjt188.frames import METERING_FIELDS
    from edge_agent.cjt188.session import Cjt188Session
    from labkit.cjt188_sim import MeterLine, SimMeter
    from tests.test_cjt188 import _drive

    for meter_type in (0x10, 0x11, 0x20, 0x21, 0x30):
        session = Cjt188Session(meter_type, "1")
        _drive(session, MeterLine([SimMeter(meter_type, "1")]))
        result = session.result
        assert not result.error
        declared = METERING_FIELDS[result.measurement]
        assert set(result.fields) == set(declared), meter_type
        assert {f: result.units.get(f, "") for f in result.fields} == declared


# -- edge-agent catalog -------------------------------------------------------------------------------------------

def test_agent_catalog_of_the_example_configuration(tmp_path: Path) -> None:
    import tomllib

    from tests.test_examples import lab_copy

    config = lab_copy(tmp_path, "agent.toml")
    devices = [d["id"] for d in tomllib.loads(config.read_text())["devices"]]
    result = _run("edge_agent.cli", "catalog", "--json", str(config))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert list(dict.fromkeys(r["device"] for r in rows)) == devices  # every device, in the file's order
    assert {r["gateway"] for r in rows} == {"gw-0001"}
    by = {(r["device"], r["measurement"], r["field"]): r for r in rows}
    assert by["flat-3", "electricity", "voltage"]["unit"] == "V"
    assert by["flat-3", "electricity", "voltage"]["source"] == "modbus eastron_sdm120"
    assert by["main-meter", "electricity", "energy_import"] | {"description": ""} == {
        "gateway": "gw-0001", "location": "", "device": "main-meter", "source": "modbus-tcp eastron_sdm630",
        "measurement": "electricity", "field": "energy_import", "unit": "kWh", "type": "float", "standard": True,
        "description": "", "note": ""}
    assert by["p1", "gas", "volume"]["unit"] == "m³" and by["p1", "electricity", "power_import_l2"]["unit"] == "W"
    assert by["co2-hall", "air_quality", "co2"]["unit"] == "ppm"
    sunspec = [r for r in rows if r["device"] == "pv-inverter"]
    assert len(sunspec) == 1 and "after SunSpec discovery" in sunspec[0]["note"] and not sunspec[0]["field"]
    # the meters: DL/T 645's configured identifiers, CJ/T 188's metering data, M-Bus known when read
    assert [r["field"] for r in rows if r["device"] == "flat-12"] == [
        "energy_import", "energy_import_t1", "energy_import_t2", "voltage_l1", "current_l1", "power"]
    assert by["flat-12", "electricity", "power"]["source"] == "dlt645 2007"
    assert by["water-12", "water", "volume_settlement"]["unit"] == "m³"
    assert by["water-12", "water", "battery_low"]["type"] == "bool"
    mbus = [r for r in rows if r["device"] == "heat-substation"]
    assert len(mbus) == 1 and "data records" in mbus[0]["note"]
    assert all(r["standard"] for r in rows if r["field"])  # the example uses only the vocabulary
    # the other formats: the same rows
    csv_rows = list(csv.DictReader(io.StringIO(_run("edge_agent.cli", "catalog", "--csv", str(config)).stdout,
                                               newline="")))
    assert [(r["device"], r["field"]) for r in csv_rows] == [(r["device"], r["field"]) for r in rows]
    table = _run("edge_agent.cli", "catalog", str(config)).stdout.splitlines()
    assert table[0].startswith("gateway ") and len(table) == len(rows) + 1


def test_agent_catalog_of_a_lab_configuration(tmp_path: Path) -> None:
    """A custom profile's points keep their unit, type and description and are marked non-standard; an ASCII
    device's fields are its settings'; a bitfield's flags are booleans; the measurement override applies."""
    custom = tmp_path / "custom.toml"
    custom.write_text('vendor = "Acme"\nmodel = "M1"\nmeasurement = "electricity"\n\n'
                      '[[points]]\nname = "total_kwh"\naddress = 0\ntype = "float32"\nunit = "kWh"\n'
                      'description = "total energy, Acme\'s name"\n\n'
                      '[[points]]\nname = "power"\naddress = 2\ntype = "float32"\nunit = "W"\n\n'
                      '[[points]]\nname = "alarms"\naddress = 4\ntype = "uint16"\n'
                      'bits = { 0 = "event_overvoltage", 1 = "door_open" }\n')
    config = tmp_path / "agent.toml"
    config.write_text(f'''
[gateway]
id = "gw-lab"
state_dir = "{tmp_path / 'state'}"

[[devices]]
kind = "modbus-tcp"
id = "acme"
profile = "{custom}"
host = "127.0.0.1"
measurement = "hall_b"

[[devices]]
kind = "serial"
id = "weather"
port = "/dev/ttyUSB2"
protocol = "ascii"
ascii = {{ regex = '^T=(?P<t>-?\\d+)C W=(?P<wind>\\d+)$', fields = [{{ group = "t", name = "temperature", unit = "°C" }}] }}

[[devices]]
kind = "serial"
id = "optical"
port = "/dev/ttyUSB3"
protocol = "iec62056-21"
''')
    result = _run("edge_agent.cli", "catalog", "--json", str(config))
    assert result.returncode == 0, result.stderr
    by = {(r["device"], r["field"]): r for r in json.loads(result.stdout)}
    total = by["acme", "total_kwh"]
    assert (total["measurement"], total["unit"], total["type"], total["standard"], total["description"],
            total["note"]) == ("hall_b", "kWh", "float", False, "total energy, Acme's name", "not in the vocabulary")
    assert by["acme", "power"]["standard"] and by["acme", "power"]["source"] == "modbus-tcp custom.toml"
    assert by["acme", "door_open"]["type"] == "bool" and not by["acme", "door_open"]["standard"]
    assert by["weather", "temperature"]["standard"] and by["weather", "temperature"]["measurement"] == "sensor"
    assert (by["weather", "wind"]["unit"], by["weather", "wind"]["standard"]) == ("", False)
    assert by["optical", "energy_import"]["unit"] == "kWh" and not by["optical", "obis_*"]["standard"]


def test_agent_catalog_errors_are_one_line(tmp_path: Path) -> None:
    result = _run("edge_agent.cli", "catalog", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "missing.toml" in result.stderr


# -- edge-collector catalog: the pure part -----------------------------------------------------------------------

def test_collector_rows_from_the_stores_answers_and_the_inventory() -> None:
    from collector import catalog as ccat

    answer = {"results": [
        {"series": [{"name": "electricity", "columns": ["fieldKey", "fieldType"],
                     "values": [["power", "float"], ["voltage_l1", "float"], ["odd", "integer"],
                                ["tariff", "float"]]},
                    {"name": "citynerve_ingest", "columns": ["fieldKey", "fieldType"], "values": [["seq", "integer"]]}]},
        {"series": [{"name": "electricity", "columns": ["key", "value"], "values": [["gateway", "gw-2"],
                                                                                    ["gateway", "gw-1"]]},
                    {"name": "citynerve_ingest", "columns": ["key", "value"], "values": [["gateway", "gw-1"]]}]},
    ]}
    fields = ccat.stored_fields(answer)
    assert fields == {"electricity": {"power": "float", "voltage_l1": "float", "odd": "int", "tariff": "float"}}
    assert ccat.gateways_by_measurement(answer) == {"electricity": ["gw-1", "gw-2"]}
    statements = ccat.device_statements([("electricity", "gw-'1")])
    assert statements == ['SHOW TAG VALUES FROM "electricity" WITH KEY = "device" WHERE "gateway" = \'gw-\\\'1\'']
    inventory = {"gw-1": ccat.GatewayInfo("52.37, 4.89", {"m1": "modbus eastron_sdm630", "m9": "serial dsmr"}),
                 "gw-3": ccat.GatewayInfo()}
    rows = ccat.rows(fields, {("electricity", "gw-1"): ["m1"], ("electricity", "gw-2"): ["x"]}, inventory)
    by = {(r.gateway, r.device, r.field): r for r in rows}
    assert by["gw-1", "m1", "power"].location == "52.37, 4.89" and by["gw-1", "m1", "power"].unit == "W"
    assert by["gw-1", "m1", "power"].source == "modbus eastron_sdm630" and by["gw-2", "x", "power"].source == "stored"
    assert by["gw-1", "m1", "tariff"].note == "type float, the table's int" and not by["gw-1", "m1", "odd"].standard
    assert by["gw-1", "m9", ""].note == "nothing stored of this device yet"
    assert by["gw-3", "", ""].note == "no devices reported and nothing stored"
    assert [r.gateway for r in rows] == sorted(r.gateway for r in rows)


def test_collector_catalog_errors_are_one_line(tmp_path: Path) -> None:
    from labkit import stack
    from labkit.process import free_port

    result = _run("collector.cli", "catalog", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    config = stack.write_collector_config(tmp_path / "collector.toml", {"host": "127.0.0.1", "port": 1883},
                                          {"url": f"http://127.0.0.1:{free_port()}", "timeout": "2s"})
    result = _run("collector.cli", "catalog", "-c", str(config))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {config}: InfluxDB at http://127.0.0.1:") and "connection" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


# -- edge-collector catalog end to end ----------------------------------------------------------------------------

@pytest.mark.integration
def test_collector_catalog_lists_what_a_real_agent_stored(tmp_path: Path, mosquitto, influxd, influx_db: str,
                                                          meter_sim) -> None:
    """pymodbus SDM630 -> edge-agent -> mosquitto -> edge-collector -> influxd, then `edge-collector catalog`:
    every stored field of the meter, with the vocabulary's units; the collector's own measurements left out."""
    from labkit import stack
    from tests.test_e2e import start_pair, wait_until

    device = stack.modbus_tcp_device("meter-a", meter_sim.port, interval="1s")
    collector, agent = start_pair(tmp_path, mosquitto, {"api": "v1", "url": influxd.url, "database": influx_db},
                                  [device], gateway="gw-cat")
    try:
        agent.start()
        wait_until(lambda: influxd.query('SELECT count("voltage_l1") FROM "electricity"', influx_db), 20,
                   "a reading in InfluxDB")
    finally:
        agent.stop()
        collector.stop()
    result = _run("collector.cli", "catalog", "-c", str(tmp_path / "collector.toml"), "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    stored = {r["fieldKey"] for r in influxd.query('SHOW FIELD KEYS FROM "electricity"', influx_db)}
    assert {(r["gateway"], r["device"], r["measurement"]) for r in rows} == {("gw-cat", "meter-a", "electricity")}
    assert {r["field"] for r in rows} == stored and len(stored) > 10
    by = {r["field"]: r for r in rows}
    assert (by["voltage_l1"]["unit"], by["voltage_l1"]["type"], by["voltage_l1"]["standard"]) == ("V", "float", True)
    assert by["energy_import"]["unit"] == "kWh" and all(r["standard"] for r in rows)
    csv_text = _run("collector.cli", "catalog", "-c", str(tmp_path / "collector.toml"), "--csv").stdout
    assert len(list(csv.DictReader(io.StringIO(csv_text, newline="")))) == len(rows)
