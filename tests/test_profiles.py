"""Firmware profiles: the shipped ones load and agree with the simulator; mistakes name file and key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edge_agent.modbus.plan import decode_answers, plan_reads
from edge_agent.profiles import Profile, available_profiles, load_profile
from labkit.meter_sim import SDM630_INPUT
from wire.config import ConfigError

GOLDEN = Path(__file__).parent / "golden" / "profiles"

HEADER = """
vendor = "Acme"
model = "M1"
measurement = "meter"
"""


def write_profile(tmp_path: Path, body: str, name: str = "acme.toml") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + body, encoding="utf-8")
    return path


def error_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    return info.value


# --- shipped profiles ---------------------------------------------------------------------------------


def test_every_shipped_profile_loads_and_plans() -> None:
    names = available_profiles()
    assert "eastron_sdm630" in names
    for name in names:
        profile = load_profile(name)
        plan = plan_reads(profile.point_specs(), profile.max_registers, profile.max_gap)
        assert sum(len(r.slots) for r in plan) == len(profile.points)


def test_sdm630_profile(sdm630_profile: Profile) -> None:
    profile = sdm630_profile
    assert (profile.vendor, profile.model, profile.measurement) == ("Eastron", "SDM630", "electricity")
    assert profile.max_registers == 50
    by_name = {p.name: p for p in profile.points}
    # the addresses the brief and Eastron's table give (0-based: 30001 -> 0x0000)
    expected = {
        "voltage_l1": 0x0000,
        "voltage_l2": 0x0002,
        "voltage_l3": 0x0004,
        "current_l1": 0x0006,
        "power_total": 0x0034,
        "frequency": 0x0046,
        "energy_import": 0x0048,
    }
    for name, address in expected.items():
        assert by_name[name].address == address
    for point in profile.points:
        assert (point.table, point.type, point.order or profile.order) == ("input", "float32", "ABCD")
        # the simulator's independently written register table agrees
        assert SDM630_INPUT[point.name] == point.address


def test_profile_by_path_equals_profile_by_name(sdm630_profile: Profile) -> None:
    path = Path(__file__).parent.parent / "firmware_profiles" / "eastron_sdm630.toml"
    assert load_profile(path) == sdm630_profile
    assert load_profile(str(path)) == sdm630_profile


def test_unknown_profile_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("eastron_sdm999")
    assert str(info.value).startswith("eastron_sdm999: no firmware profile of that name")
    assert "eastron_sdm630" in str(info.value)
    with pytest.raises(ConfigError, match="not a profile name"):
        load_profile("Eastron SDM630")


def test_missing_profile_file(tmp_path: Path) -> None:
    err = error_of(tmp_path / "nope.toml")
    assert err.source == str(tmp_path / "nope.toml")
    assert err.message == "file not found"


# --- validation: every error names the file and the key path ----------------------------------------------


def test_bad_type(tmp_path: Path) -> None:
    path = write_profile(
        tmp_path,
        """
[[points]]
name = "ok"
address = 0
type = "float32"

[[points]]
name = "bad"
address = 2
type = "float"
""",
    )
    err = error_of(path)
    assert (err.source, err.path) == (str(path), "points[1].type")
    assert 'got "float"' in err.message and '"float32"' in err.message
    assert str(err).startswith(f"{path}: points[1].type: expected one of")


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = write_profile(tmp_path, '[[points]]\nname = "v"\nadress = 0\ntype = "float32"\n')
    err = error_of(path)
    assert (err.path, err.message) == ("points[0].adress", 'unknown key (did you mean "address"?)')


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write_profile(tmp_path, 'max_registrs = 10\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n')
    err = error_of(path)
    assert (err.path, err.message) == ("max_registrs", 'unknown key (did you mean "max_registers"?)')


def test_overlapping_points(tmp_path: Path) -> None:
    path = write_profile(
        tmp_path,
        """
[[points]]
name = "a"
address = 10
type = "float32"

[[points]]
name = "holding_ok"
address = 11
type = "float32"
table = "holding"

[[points]]
name = "b"
address = 11
type = "int16"
""",
    )
    err = error_of(path)
    assert err.source == str(path)
    assert err.path == "points[2].address"
    assert (
        err.message == '"b" (0x000B..0x000B) overlaps "a" (0x000A..0x000B, points[0]) in the input registers'
    )


@pytest.mark.parametrize(
    ("point", "key", "message"),
    [
        ("address = -1", "points[0].address", "expected an integer 0..65535, got -1"),
        ("address = 65536", "points[0].address", "expected an integer 0..65535, got 65536"),
        ('address = 65535\ntype = "float32"', "points[0].address", "would end past register 65535"),
        ('order = "AB"\ntype = "float32"', "points[0].order", "AB does not fit float32"),
        ('order = "XY"', "points[0].order", "expected one of"),
        ('table = "coils"', "points[0].table", 'expected one of "holding", "input", got "coils"'),
        ("scale = 0", "points[0].scale", "must not be 0"),
        ("scale = nan", "points[0].scale", "finite"),
        ("offset = inf", "points[0].offset", "finite"),
        ('name = ""', "points[0].name", "expected a string matching"),
    ],
)
def test_point_validation(tmp_path: Path, point: str, key: str, message: str) -> None:
    fields = {"name": '"v"', "address": "0", "type": '"int16"'}
    lines = point.splitlines()
    for line in lines:
        fields.pop(line.split("=")[0].strip(), None)
    body = "[[points]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items()) + point + "\n"
    err = error_of(write_profile(tmp_path, body))
    assert err.path == key
    assert message in err.message


def test_point_wider_than_max_registers(tmp_path: Path) -> None:
    path = write_profile(
        tmp_path, 'max_registers = 2\n[[points]]\nname = "e"\naddress = 0\ntype = "float64"\n'
    )
    err = error_of(path)
    assert (err.path, err.message) == (
        "points[0].type",
        "a float64 needs 4 registers but max_registers is 2",
    )


def test_max_registers_range(tmp_path: Path) -> None:
    path = write_profile(
        tmp_path, 'max_registers = 126\n[[points]]\nname = "e"\naddress = 0\ntype = "int16"\n'
    )
    err = error_of(path)
    assert (err.path, err.message) == ("max_registers", "expected an integer 1..125, got 126")


def test_duplicate_field_in_one_measurement(tmp_path: Path) -> None:
    body = """
[[points]]
name = "v"
address = 0
type = "int16"

[[points]]
name = "v"
address = 1
type = "int16"
measurement = "other"

[[points]]
name = "v"
address = 2
type = "int16"
"""
    err = error_of(write_profile(tmp_path, body))
    assert (err.path, err.message) == (
        "points[2].name",
        '"v" is already used by points[0] in measurement "meter"',
    )


def test_no_points(tmp_path: Path) -> None:
    err = error_of(write_profile(tmp_path, "points = []\n"))
    assert err.path == "points"


def test_missing_required_key(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('vendor = "A"\nmeasurement = "m"\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n')
    err = error_of(path)
    assert (err.path, err.message.split(":")[0]) == ("model", "required key is missing")


def test_defaults_and_measurement_overrides(tmp_path: Path) -> None:
    body = """
order = "CDAB"

[[points]]
name = "a"
address = 0
type = "uint32"

[[points]]
name = "b"
address = 2
type = "uint16"
measurement = "status"
order = "BA"
scale = 10
"""
    profile = load_profile(write_profile(tmp_path, body))
    assert (profile.max_registers, profile.max_gap) == (125, 0)
    a, _ = profile.points
    assert (a.table, a.order, a.scale, a.offset, a.unit) == ("input", None, 1, 0, "")
    specs = {s.field: s for s in profile.point_specs()}
    assert specs["a"].decode([0x0002, 0x0001]) == 0x00010002  # profile order CDAB
    assert specs["b"].decode([0x0100]) == 10  # its own order BA, scale 10
    assert {s.field: s.measurement for s in profile.point_specs()} == {"a": "meter", "b": "status"}
    # a device's measurement replaces the profile default, not a point's own
    assert {s.field: s.measurement for s in profile.point_specs("hall_a")} == {"a": "hall_a", "b": "status"}


# --- golden register dumps ---------------------------------------------------------------------------------


def golden_dirs() -> list[Path]:
    return sorted(p for p in GOLDEN.iterdir() if p.is_dir())


def test_there_is_a_golden_dir_for_every_shipped_profile() -> None:
    assert {p.name for p in golden_dirs()} >= set(available_profiles())


@pytest.mark.parametrize("golden", golden_dirs(), ids=lambda p: p.name)
def test_golden(golden: Path) -> None:
    """registers.json (registers by table and address) through plan + decoders gives expected.json."""
    own = golden / "profile.toml"
    profile = load_profile(own if own.exists() else golden.name)
    raw = json.loads((golden / "registers.json").read_text())
    tables = {table: {int(a, 0): r for a, r in regs.items()} for table, regs in raw.items()}
    expected = json.loads((golden / "expected.json").read_text())

    plan = plan_reads(profile.point_specs(), profile.max_registers, profile.max_gap)
    answers = [[tables[r.table][a] for a in range(r.address, r.address + r.count)] for r in plan]
    got = decode_answers(plan, answers)

    assert got.keys() == expected.keys()
    for measurement, fields in expected.items():
        assert got[measurement].keys() == fields.keys(), measurement
        for name, value in fields.items():
            actual = got[measurement][name]
            point = next(p for p in profile.points if p.name == name)
            if point.type.startswith("float") or isinstance(value, float):
                # expected.json holds the human-readable value; float32 carries about 7 significant digits
                rel = 1e-6 if point.type == "float32" else 1e-12
                assert math.isclose(actual, value, rel_tol=rel, abs_tol=1e-9), (name, actual, value)
            else:
                assert actual == value and type(actual) is int, (name, actual, value)
