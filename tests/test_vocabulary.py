"""The one vocabulary (wire/vocabulary.toml): the table itself, its generated document, and the decoders that
emit it - every name they produce is standard for its measurement, in the table's unit, of the table's type."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit import mbus_suite
from wire import vocabulary

ROOT = Path(__file__).resolve().parent.parent


def test_the_document_is_made_from_the_table() -> None:
    assert (ROOT / "docs" / "vocabulary.md").read_text(encoding="utf-8") == vocabulary.markdown(), \
        "docs/vocabulary.md is stale: python -m wire.vocabulary --markdown > docs/vocabulary.md"


def test_names_carry_no_unit_and_variants_do_not_collide() -> None:
    unit_words = ("_kwh", "_kw", "_w", "_v", "_a", "_hz", "_kvar", "_kvarh", "_m3", "_degc", "_ppm", "_pct")
    seen: dict[str, str] = {}
    for entry in vocabulary.entries().values():
        assert not entry.name.endswith(unit_words), entry.name
        for name in [entry.name] + [f"{entry.name}_{v}" for v in entry.variants]:
            assert name not in seen, f"{name} is both {seen[name]} and {entry.name}"
            seen[name] = entry.name


@pytest.mark.parametrize(("name", "base", "variant", "modifiers"), [
    ("voltage_l1_l2", "voltage", "l1_l2", ""),
    ("energy_import_t2", "energy_import", "t2", ""),
    ("energy_s3_t1", "energy", "", "_s3_t1"),
    ("temperature_return_max", "temperature", "return", "_max"),
    ("volume_settlement_p2", "volume", "settlement", "_p2"),
])
def test_lookup(name: str, base: str, variant: str, modifiers: str) -> None:
    m = vocabulary.lookup(name)
    assert m is not None and (m.entry.name, m.variant, m.modifiers) == (base, variant, modifiers)


@pytest.mark.parametrize("name", ["power_total", "energy_import_kwh", "voltage_l4", "energy_x7e", "temperature_",
                                  "pressure_bar", "power_s1_max"])
def test_names_outside_the_vocabulary(name: str) -> None:
    assert vocabulary.lookup(name) is None


def _check(measurement: str, fields: dict[str, object], units: dict[str, str], allowed_outside: set[str]) -> None:
    for name, value in fields.items():
        m = vocabulary.lookup(name)
        if m is None:
            assert name in allowed_outside, f"{measurement}.{name} is not in the vocabulary"
            continue
        assert measurement in m.entry.measurements, f"{name} is not a field of {measurement}"
        assert vocabulary.value_type(value) == m.type, f"{measurement}.{name} = {value!r}, the table says {m.type}"
        if name in units or m.unit:
            assert units.get(name, "") == m.unit, f"{measurement}.{name} in {units.get(name)!r}, the table says {m.unit}"


@pytest.mark.parametrize("edition", ["2007", "1997"])
def test_dlt645_tables(edition: str) -> None:
    from edge_agent.dlt645.identifiers import decode_value, encode_value, table
    from labkit.dlt645_sim import SimMeter

    t = table(edition)
    sim = SimMeter("1", edition=edition)  # type: ignore[arg-type]
    fields = {i.name: decode_value(i, encode_value(i, sim.value(i, sim.clock + 10))) for i in t.identifiers}
    _check(t.measurement, fields, {i.name: i.unit for i in t.identifiers if i.unit}, set())


def test_cjt188_meters() -> None:
    from edge_agent.cjt188.session import Cjt188Session
    from labkit.cjt188_sim import MeterLine, SimMeter
    from tests.test_cjt188 import _drive

    for meter_type in (0x10, 0x11, 0x20, 0x21, 0x30):
        line = MeterLine([SimMeter(meter_type, "1")])
        session = Cjt188Session(meter_type, "1")
        _drive(session, line)
        assert not session.result.error
        _check(session.result.measurement, session.result.fields, session.result.units, set())


def test_mbus_records_of_the_libmbus_suite() -> None:
    """Every standard name an M-Bus telegram yields is in the table's unit and type; names outside it are only
    the ones M-Bus has no common quantity for (manufacturer data, identification details), and say so."""
    from edge_agent.mbus import frames, records

    outside: set[str] = set()
    standard = 0
    for case in mbus_suite.load():
        try:
            frame = frames.parse(case.telegram)
            telegram = records.decode(frame.ci, frame.data)
        except (frames.FrameError, records.TelegramError):
            continue
        values, _, units = telegram.fields()
        for name, value in values.items():
            m = vocabulary.lookup(name)
            if m is None:
                base = mbus_suite.base_name(name)
                # a standard quantity whose VIFE changes its meaning (_x28, _mfr01, _positive ...): visibly
                # outside the vocabulary on purpose; anything else must be a known non-quantity
                if vocabulary.lookup(base) is None:
                    outside.add(base)
                continue
            standard += 1
            assert vocabulary.value_type(value) == m.type, (case.name, name, value)
            assert units.get(name, "") == m.unit, (case.name, name, units.get(name))
    assert standard > 500
    expected_outside = {"hca_units", "vif_7f", "vif_7e", "enhanced_identification", "bus_address", "access_number",
                        "medium", "manufacturer", "parameter_set", "model_version", "hardware_version",
                        "software_version", "customer_location", "customer", "digital_output", "digital_input",
                        "baud_rate", "reset_counter", "cumulation_counter", "storage_interval",
                        "duration_since_readout"}
    unexpected = {n for n in outside if not (n in expected_outside or n.startswith(("vif_", "plain_")))}
    assert not unexpected, f"M-Bus names outside the vocabulary: {sorted(unexpected)}"


# -- every bundled profile and decoder ---------------------------------------------------------------------------
#
# How a unit is known: a profile point declares its `unit` (the test requires the table's, so every point of a
# quantity with a unit declares it; `scale` is what converts the device's unit into it); a serial decoder's
# Sample carries `units`; DL/T 645 and CJ/T 188 tables and the M-Bus VIF tables give theirs (above). The type is
# what the decoder's value is: a profile point's `value_type()` (float types, fractional scales and scale factors
# make floats) and, in the golden dumps, the decoded value itself.


def _profile_checks(profile, measurement_kinds=None) -> list[str]:
    """Every field of a profile against the table: (problem text) for each that is not standard, of another type
    or unit. `measurement_kinds` maps a profile's measurement to the vocabulary measurement it holds."""
    problems = []
    for point in profile.points:
        measurement = point.measurement or profile.measurement
        kind = (measurement_kinds or {}).get(measurement, measurement)
        for field in point.fields():
            m = vocabulary.lookup(field)
            where = f"{measurement}.{field}"
            if m is None:
                problems.append(f"{where}: not in the vocabulary")
                continue
            if kind not in m.entry.measurements:
                problems.append(f"{where}: not a field of {kind}")
            value_type = "bool" if point.bits else point.value_type()
            if value_type != m.type:
                problems.append(f"{where}: a {value_type}, the table says {m.type}")
            if not point.bits and point.unit != m.unit:
                problems.append(f"{where}: unit {point.unit!r}, the table says {m.unit!r}")
    return problems


def test_every_bundled_profile_emits_the_vocabulary() -> None:
    from edge_agent.profiles import available_profiles, load_profile

    names = available_profiles()
    assert len(names) >= 20  # issue 13 part 7
    problems = [f"{name}: {p}" for name in names for p in _profile_checks(load_profile(name))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "tests" / "golden" / "profiles").iterdir()
                                        if (ROOT / "firmware_profiles" / f"{p.name}.toml").exists()))
def test_golden_values_have_the_tables_types(name: str) -> None:
    """What the golden dumps decode to (tests/test_profiles.py checks the decoding) is of the table's type."""
    import json

    expected = json.loads((ROOT / "tests" / "golden" / "profiles" / name / "expected.json").read_text())
    for measurement, fields in expected.items():
        for field, value in fields.items():
            if isinstance(value, dict):  # {"missing": reason}
                continue
            m = vocabulary.lookup(field)
            assert m is not None and vocabulary.value_type(value) == m.type, (name, measurement, field, value)


def test_the_lab_meter_models_the_sdm630_in_the_vocabulary() -> None:
    """labkit/profiles/lab_meter.toml models a real SDM630: its electricity points are standard. Its meter_setup
    points are the lab's writable settings (no real device has them) and counter.toml is a test counter."""
    from edge_agent.profiles import load_profile

    profile = load_profile(ROOT / "labkit" / "profiles" / "lab_meter.toml")
    problems = [p for p in _profile_checks(profile) if p.startswith("electricity.")]
    assert not problems and "electricity" in profile.fields()


def test_sunspec_discovery_stores_the_vocabulary() -> None:
    """Every shipped SunSpec model as discovered: the fields that carry a standard name are in the table's unit
    and type and belong to the vocabulary measurement their model is (edge_agent/sunspec/vocabulary.py KINDS);
    scale factors are never fields; the points left with SunSpec names are the ones the table has no name for."""
    from edge_agent.sunspec import vocabulary as sunspec_vocabulary
    from edge_agent.sunspec.discovery import mapped_points, profile_for, register_reader, walk
    from tests.test_sunspec import every_model_image

    smap = walk(register_reader(every_model_image()), read_common=False).result
    profile = profile_for(smap)
    kinds = {mp.measurement: sunspec_vocabulary.KINDS.get(mp.model.name, "") for mp in mapped_points(smap)}
    standard = [p for p in profile.points if vocabulary.lookup(p.name) is not None or p.bits]
    problems = [p for p in _profile_checks(profile, kinds)
                if "not in the vocabulary" not in p and p.split(".")[0] in kinds and kinds[p.split(".")[0]]]
    assert not problems, "\n".join(problems)
    assert len(standard) > 100
    assert all(p.internal for p in profile.points if p.name.endswith("_SF"))  # read, never stored
    assert not [f for fields in profile.fields().values() for f in fields if f.endswith("_SF")]
    fields = profile.fields()
    assert {"power", "energy", "power_factor", "dc_current", "event_ground_fault"} <= set(fields["sunspec_inverter"])
    assert {"energy_import", "voltage_l1_l2", "reactive_energy_q4"} <= set(fields["sunspec_ac_meter"])
    assert {"dc_current_pv1", "dc_energy_pv2"} <= set(fields["sunspec_mppt"])


def _samples(decoder, data: bytes) -> list:
    from edge_agent.serial.base import Sample

    return [e for e in decoder.feed(data) + decoder.flush() if isinstance(e, Sample)]


def _check_samples(samples, default_measurement: str, allowed_outside=lambda name: False) -> int:
    checked = 0
    for sample in samples:
        measurement = sample.measurement or default_measurement
        outside = {n for n in sample.fields if vocabulary.lookup(n) is None}
        assert all(allowed_outside(n) for n in outside), (measurement, sorted(outside))
        _check(measurement, sample.fields, sample.units, outside)
        checked += len(sample.fields) - len(outside)
    return checked


def test_dsmr_telegrams() -> None:
    from edge_agent.serial.dsmr import DsmrDecoder

    golden = ROOT / "tests" / "golden" / "dsmr"
    checked = sum(_check_samples(_samples(DsmrDecoder(), path.read_bytes()), "electricity")
                  for path in sorted(golden.glob("*.txt")))
    assert checked > 200


def test_iec62056_21_readouts() -> None:
    """The well-known codes are standard; every other code keeps its generic obis_ name, visibly not standard."""
    from edge_agent.serial.iec62056_21 import Iec62056ReadoutDecoder

    capture = (ROOT / "tests" / "golden" / "iec62056_21" / "capture_synthetic.bin").read_bytes()
    checked = _check_samples(_samples(Iec62056ReadoutDecoder(), capture), "electricity",
                             lambda name: name.startswith("obis_"))
    assert checked >= 15


def test_nmea_sentences() -> None:
    from edge_agent.serial.nmea import NmeaDecoder

    golden = ROOT / "tests" / "golden" / "nmea"
    data = (golden / "pynmea2_valid_sentences.txt").read_bytes().replace(b"\n", b"\r\n")
    data += (golden / "pynmea2_examples_data.log").read_bytes()
    assert _check_samples(_samples(NmeaDecoder(), data), "gps") > 50


@pytest.mark.parametrize("protocol", ["sds011", "pmsx003", "mhz19b"])
def test_serial_sensors(protocol: str) -> None:
    from edge_agent.serial.protocols import protocol_info
    from edge_agent.serial.sensors import DECODERS
    from tests.test_serial_sensors import stream

    info = protocol_info(protocol)
    assert _check_samples(_samples(DECODERS[protocol](), stream(protocol)), info.measurement) > 0


def test_problems_names_what_is_not_standard() -> None:
    assert vocabulary.problems("electricity", {"power": "W", "voltage_l1": None}) == []
    assert vocabulary.problems("electricity", {"power_total": "W", "speed": "m/s", "power": "kW"}) == [
        "power_total", "speed (not a field of electricity)", "power (in kW, the table's W)"]
    assert vocabulary.problems("hall_a", {"speed": "m/s"}) == []  # a measurement of the user's own: names only


def test_check_lists_each_devices_names_outside_the_vocabulary(tmp_path: Path) -> None:
    """`edge-agent check` prints, under a device, its fields that are not standard: one line, not an error."""
    import subprocess
    import sys

    custom = tmp_path / "custom.toml"
    custom.write_text('vendor = "Acme"\nmodel = "M1"\nmeasurement = "electricity"\n\n'
                      '[[points]]\nname = "total_kwh"\naddress = 0\ntype = "float32"\nunit = "kWh"\n\n'
                      '[[points]]\nname = "power"\naddress = 2\ntype = "float32"\nscale = 1000\nunit = "W"\n\n'
                      '[[points]]\nname = "frequency"\naddress = 4\ntype = "float32"\nunit = "mHz"\n')
    config = tmp_path / "agent.toml"
    config.write_text(f'''
[gateway]
id = "gw-test"
state_dir = "{tmp_path / 'state'}"

[mqtt]
host = "127.0.0.1"
port = 8883

[[devices]]
kind = "modbus-tcp"
id = "meter-std"
profile = "chint_dtsu666"
host = "127.0.0.1"

[[devices]]
kind = "modbus-tcp"
id = "meter-custom"
profile = "{custom}"
host = "127.0.0.2"

[[devices]]
kind = "serial"
id = "weather"
port = "/dev/ttyUSB2"
protocol = "ascii"
ascii = {{ regex = '^T=(?P<temperature>-?\\d+)C W=(?P<wind>\\d+)$', fields = [{{ group = "temperature", unit = "°C" }}] }}
''')
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    custom_at = next(i for i, line in enumerate(lines) if "device meter-custom" in line)
    assert lines[custom_at + 1] == ("    names outside the vocabulary (docs/vocabulary.md): total_kwh, "
                                    "frequency (in mHz, the table's Hz)")
    weather_at = next(i for i, line in enumerate(lines) if "device weather" in line)
    assert lines[weather_at + 1] == "    names outside the vocabulary (docs/vocabulary.md): wind"
    std_at = next(i for i, line in enumerate(lines) if "device meter-std" in line)
    assert "names outside" not in lines[std_at + 1]
