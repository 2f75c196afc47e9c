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
