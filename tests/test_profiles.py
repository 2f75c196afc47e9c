"""Firmware profiles: the shipped ones load and decode their golden register dumps; mistakes name file and key."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from edge_agent.modbus.decode import NOT_AVAILABLE, Missing
from edge_agent.modbus.plan import PointSpec, ReadRequest, Unreadable, decode_poll, plan_reads
from edge_agent.profiles import WORKAROUNDS, Profile, available_profiles, load_profile
from labkit.meter_sim import SDM630_INPUT
from wire.config import ConfigError

GOLDEN = Path(__file__).parent / "golden" / "profiles"
SHIPPED = {
    "abb_b2x",
    "acrel_adl400",
    "carlo_gavazzi_em24",
    "carlo_gavazzi_em340",
    "chint_ddsu666",
    "chint_dtsu666",
    "eastron_sdm120",
    "eastron_sdm230",
    "eastron_sdm630",
    "eastron_sdm72d",
    "eastron_sdm72dm_v2",
    "growatt_tlx",
    "huawei_sun2000",
    "janitza_umg604",
    "janitza_umg96rm",
    "schneider_iem3000",
    "schneider_pm5000",
    "siemens_pac3200",
    "sunspec_generic",
    "xy_md02",
}

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


def plan_for(profile: Profile, measurement: str | None = None) -> list[ReadRequest]:
    """The plan the engine builds for a device with this profile and no overrides."""
    return plan_reads(
        profile.point_specs(measurement),
        profile.max_registers,
        0 if "no_gap_reads" in profile.workarounds else profile.max_gap,
        max_bits=profile.max_bits,
        unreadable=[Unreadable(u.table, u.start, u.end) for u in profile.unreadable],
        one_request_per_point="one_request_per_point" in profile.workarounds,
    )


# --- shipped profiles ---------------------------------------------------------------------------------


def test_available_profiles_lists_the_library() -> None:
    assert set(available_profiles()) == SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_profile_loads_and_plans(name: str) -> None:
    profile = load_profile(name)
    plan = plan_for(profile)
    assert sum(len(r.slots) for r in plan) == len(profile.points)
    for request in plan:
        limit = profile.max_bits if request.table in ("coil", "discrete") else profile.max_registers
        assert request.count <= limit
    assert profile.serial is not None  # every shipped device speaks RS-485 (SunSpec: RTU devices)
    assert profile.firmware and profile.description
    assert all(w in WORKAROUNDS for w in profile.workarounds)


def test_sdm630_profile(sdm630_profile: Profile) -> None:
    profile = sdm630_profile
    assert (profile.vendor, profile.model, profile.measurement) == ("Eastron", "SDM630", "electricity")
    assert profile.max_registers == 50
    by_name = {p.name: p for p in profile.points}
    # the addresses Eastron's table gives (0-based: 30001 -> 0x0000)
    expected = {
        "voltage_l1": 0x0000,
        "voltage_l2": 0x0002,
        "voltage_l3": 0x0004,
        "current_l1": 0x0006,
        "power": 0x0034,
        "frequency": 0x0046,
        "energy_import": 0x0048,
        "reactive_energy_export": 0x004E,
    }
    for name, address in expected.items():
        assert by_name[name].address == address
    for point in profile.points:
        assert (point.table, point.type, point.order or profile.order) == ("input", "float32", "ABCD")
        assert point.address + 2 <= 0x50  # the window the simulator serves
        if point.name in SDM630_INPUT:  # the simulator's independently written register table agrees
            assert SDM630_INPUT[point.name] == point.address
    assert (profile.serial.baud, profile.serial.parity) == (9600, "N")


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


# --- point specs: the contract with the planner -----------------------------------------------------------


def test_point_specs_carry_scale_factors_internal_points_and_decoders(tmp_path: Path) -> None:
    body = """
order = "CDAB"

[[points]]
name = "w"
address = 0
type = "int16"
table = "holding"
scale_factor = "w_sf"
sentinel = "auto"

[[points]]
name = "w_sf"
address = 1
type = "int16"
table = "holding"
internal = true
sentinel = "auto"

[[points]]
name = "state"
address = 2
type = "uint16"
enum = { 1 = "off", 4 = "mppt" }

[[points]]
name = "alarms"
address = 3
type = "uint32"
bits = { 0 = "alarm_a", 17 = "alarm_b" }

[[points]]
name = "serial"
address = 5
type = "string"
length = 2
measurement = "info"

[[points]]
name = "running"
address = 0
type = "bool"
table = "coil"
"""
    profile = load_profile(write_profile(tmp_path, body))
    specs = {s.field: s for s in profile.point_specs()}
    assert all(isinstance(s, PointSpec) for s in specs.values())
    w, w_sf = specs["w"], specs["w_sf"]
    assert (w.scale_factor, w.emit, w_sf.scale_factor, w_sf.emit) == ("w_sf", True, None, False)
    assert (w.table, w.address, w.width, w.measurement) == ("holding", 0, 1, "meter")
    assert w.decode([0x8000]) is NOT_AVAILABLE and w_sf.decode([0xFFFE]) == -2
    assert specs["state"].decode([4]) == "mppt"
    assert specs["alarms"].decode([0x0001, 0x0002]) == {"alarm_a": True, "alarm_b": True}  # CDAB: low word first
    assert (specs["serial"].decode([0x4142, 0x4300]), specs["serial"].measurement) == ("ABC", "info")
    assert (specs["running"].table, specs["running"].width, specs["running"].decode([1])) == ("coil", 1, True)
    assert profile.fields() == {"meter": ["w", "state", "alarm_a", "alarm_b", "running"], "info": ["serial"]}
    assert profile.fields("hall") == {"hall": ["w", "state", "alarm_a", "alarm_b", "running"], "info": ["serial"]}

    # through the planner: scale factor applied after decoding, internal point not emitted, bits merged
    plan = plan_reads(profile.point_specs(), profile.max_registers, profile.max_gap)
    answers = {("holding", 0): [1234, 0xFFFF], ("input", 2): [4, 0x0000, 0x0002, 0x4142, 0x4300], ("coil", 0): [0]}
    poll = decode_poll(plan, [answers[r.table, r.address] for r in plan])
    assert poll.fields == {
        "meter": {"w": 123.4, "state": "mppt", "alarm_a": False, "alarm_b": True, "running": False},
        "info": {"serial": "ABC"},
    }


def test_8_bit_points(tmp_path: Path) -> None:
    """int8h/int8l/uint8h/uint8l: one byte of one register (Telegraf's INT8H ... UINT8L), with the profile's
    byte order, scale and offset, sentinels, enumerations and bitfields like every integer type."""
    body = """
order = "CDAB"                       # a 16-bit point takes its in-word byte order: AB

[[points]]
name = "temperature"
address = 0
type = "int8h"
scale = 0.5
offset = -10
sentinel = "auto"
unit = "°C"

[[points]]
name = "mode"
address = 1
type = "uint8l"
enum = { 0 = "off", 1 = "heat", 2 = "cool" }

[[points]]
name = "flags"
address = 2
type = "uint8h"
order = "BA"                         # bytes swapped: the high byte is the second on the wire
bits = { 0 = "pump", 7 = "alarm" }

[[points]]
name = "count"
address = 3
type = "int8l"
scale = 10
"""
    profile = load_profile(write_profile(tmp_path, body))
    assert [p.width for p in profile.points] == [1, 1, 1, 1]
    assert profile.fields() == {"meter": ["temperature", "mode", "pump", "alarm", "count"]}
    plan = plan_for(profile)
    assert [(r.table, r.address, r.count) for r in plan] == [("input", 0, 4)]
    # temperature: high byte 0x2A = 42 -> 42 * 0.5 - 10; flags: BA, so the high byte is 0x01 (0x81 with AB)
    poll = decode_poll(plan, [[0x2AFF, 0x7702, 0x8101, 0x00FE]])
    assert poll.fields == {"meter": {"temperature": 11.0, "mode": "cool", "pump": True, "alarm": False, "count": -20}}
    assert type(poll.fields["meter"]["count"]) is int  # integer scale: an integer field, as for int16
    poll = decode_poll(plan, [[0x8000, 0x0003, 0x0000, 0x007F]])
    assert poll.fields == {"meter": {"mode": "3", "pump": False, "alarm": False, "count": 1270}}
    assert poll.quality == {"meter": {"temperature": "not_available"}}


@pytest.mark.parametrize(("point", "key", "message"), [
    ('type = "int8"', "points[0].type", '"int64", "int8h", "int8l", "string", "uint16", "uint32", "uint64", "uint8h", "uint8l", got "int8"'),
    ('type = "INT8H"', "points[0].type", 'got "INT8H"'),
    ('type = "uint8l"\nenum = { 256 = "x" }', "points[0].enum", "256 is not a possible uint8l value (0..255)"),
    ('type = "int8h"\nenum = { 128 = "x" }', "points[0].enum", "128 is not a possible int8h value (-128..127)"),
    ('type = "uint8h"\nbits = { 8 = "x" }', "points[0].bits", 'bit "8" does not exist in a 8-bit uint8h (0..7)'),
    ('type = "uint8h"\nsentinel = [256]', "points[0].sentinel", "does not fit a uint8h (8 bits)"),
    ('type = "int8l"\norder = "ABCDEFGH"', "points[0].order", "ABCDEFGH does not fit int8l"),
])
def test_8_bit_point_errors_name_the_file_and_key(tmp_path: Path, point: str, key: str, message: str) -> None:
    path = write_profile(tmp_path, '[[points]]\nname = "v"\naddress = 0\n' + point + "\n")
    err = error_of(path)
    assert (err.source, err.path) == (str(path), key)
    assert message in err.message, err.message


def test_the_two_bytes_of_one_register_are_not_two_points_yet(tmp_path: Path) -> None:
    body = '[[points]]\nname = "hi"\naddress = 7\ntype = "uint8h"\n\n[[points]]\nname = "lo"\naddress = 7\ntype = "uint8l"\n'
    err = error_of(write_profile(tmp_path, body))
    assert err.path == "points[1].address"
    assert err.message == ('"lo" (0x0007..0x0007) overlaps "hi" (0x0007..0x0007, points[0]) in the input registers; '
                           "the two bytes of one register cannot be two points yet (the read planner gives every "
                           "point registers of its own)")


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
    assert (profile.max_registers, profile.max_bits, profile.max_gap) == (125, 2000, 0)
    assert (profile.serial, profile.serial_alternatives, profile.workarounds, profile.unreadable) == (None, [], [], [])
    assert (profile.default_unit, profile.firmware) == (None, "")
    a, _ = profile.points
    assert (a.table, a.order, a.scale, a.offset, a.unit, a.sentinel, a.internal) == ("input", None, 1, 0, "", None, False)
    specs = {s.field: s for s in profile.point_specs()}
    assert specs["a"].decode([0x0002, 0x0001]) == 0x00010002  # profile order CDAB
    assert specs["b"].decode([0x0100]) == 10  # its own order BA, scale 10
    assert {s.field: s.measurement for s in profile.point_specs()} == {"a": "meter", "b": "status"}
    # a device's measurement replaces the profile default, not a point's own
    assert {s.field: s.measurement for s in profile.point_specs("hall_a")} == {"a": "hall_a", "b": "status"}


def test_profile_keys_are_read(tmp_path: Path) -> None:
    body = """
description = "d"
firmware = "1.0 .. 2.3"
default_unit = 3
max_registers = 60
max_bits = 100
max_gap = 0
workarounds = ["one_request_per_point", "no_gap_reads"]

[serial]
baud = 19200
parity = "E"

[[serial_alternatives]]
baud = 9600
stop_bits = 2

[[unreadable]]
table = "input"
start = 10
end = 19

[[points]]
name = "v"
address = 0
type = "int16"

[[points]]
name = "w"
address = 1
type = "int16"
"""
    profile = load_profile(write_profile(tmp_path, body))
    assert (profile.firmware, profile.default_unit, profile.max_bits) == ("1.0 .. 2.3", 3, 100)
    assert profile.serial is not None and profile.serial.describe() == "19200 8E1"
    assert [s.describe() for s in profile.serial_alternatives] == ["9600 8N2"]
    assert [(u.table, u.start, u.end) for u in profile.unreadable] == [("input", 10, 19)]
    assert [(r.address, r.count) for r in plan_for(profile)] == [(0, 1), (1, 1)]  # one request per point


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
    assert 'got "float"' in err.message and '"float32"' in err.message and '"string"' in err.message
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


def test_overlapping_bits(tmp_path: Path) -> None:
    body = '[[points]]\nname = "a"\naddress = 4\ntype = "bool"\ntable = "coil"\n\n' \
           '[[points]]\nname = "b"\naddress = 4\ntype = "bool"\ntable = "coil"\n'
    err = error_of(write_profile(tmp_path, body))
    assert (err.path, err.message) == ("points[1].address", '"b" (0x0004..0x0004) overlaps "a" (0x0004..0x0004, points[0]) in the coils')


# Each case: the point's keys (replacing name/address/type where given), the key path, part of the message.
POINT_ERRORS = [
    ("address = -1", "points[0].address", "expected an integer 0..65535, got -1"),
    ("address = 65536", "points[0].address", "expected an integer 0..65535, got 65536"),
    ('address = 65535\ntype = "float32"', "points[0].address", "would end past register 65535"),
    ('order = "AB"\ntype = "float32"', "points[0].order", "AB does not fit float32"),
    ('order = "GHEFCDAB"\ntype = "uint32"', "points[0].order", "GHEFCDAB does not fit uint32"),
    ('order = "XY"', "points[0].order", "expected one of"),
    ('table = "coils"', "points[0].table", 'expected one of "coil", "discrete", "holding", "input", got "coils"'),
    ('table = "coil"', "points[0].table", 'holds single bits: use type = "bool"'),
    ('type = "bool"', "points[0].type", 'a bool lives in the "coil" or "discrete" table'),
    ("scale = 0", "points[0].scale", "must not be 0"),
    ("scale = nan", "points[0].scale", "finite"),
    ("offset = inf", "points[0].offset", "finite"),
    ('name = ""', "points[0].name", "expected a name: 1..128 characters, no control characters"),
    ('name = "v\\u0085"', "points[0].name", "no control characters (U+0000-U+001F, U+007F-U+009F)"),
    ('type = "string"', "points[0].length", "a string needs its length"),
    ('type = "string"\nlength = 124', "points[0].length", "expected an integer 1..123"),
    ("length = 2", "points[0].length", "only string points take a length"),
    ('encoding = "utf-8"', "points[0].encoding", "only string points take a encoding"),
    ('type = "string"\nlength = 2\nencoding = "latin-1"', "points[0].encoding", 'expected one of "ascii", "utf-8"'),
    ('type = "string"\nlength = 2\nscale = 2', "points[0].scale", "a string takes no scale or offset"),
    ('type = "string"\nlength = 2\nsentinel = "auto"', "points[0].sentinel", "a string point has no sentinels"),
    ("sentinel = [65536]", "points[0].sentinel", "does not fit a int16"),
    ("sentinel = [1.5]", "points[0].sentinel", "is a float but the point is a int16"),
    ('sentinel = "always"', "points[0].sentinel", "expected"),
    ("sentinel = 5", "points[0].sentinel", "expected"),
    ('enum = { 1 = "a" }\nscale = 2', "points[0].scale", "an enumeration takes no scale or offset"),
    ('enum = { x = "a" }', "points[0].enum", 'key "x" is not an integer'),
    ('enum = { 40000 = "a" }', "points[0].enum", "40000 is not a possible int16 value (-32768..32767)"),
    ('type = "float32"\nenum = { 1 = "a" }', "points[0].enum", "needs an integer or bool type"),
    ("enum = {}", "points[0].enum", "expected at least one value"),
    ('enum = { 1 = "a" }\nbits = { 1 = "b" }', "points[0].enum", "either an enumeration or a bitfield"),
    ('bits = { 16 = "b" }', "points[0].bits", 'bit "16" does not exist in a 16-bit int16 (0..15)'),
    ('bits = { 1 = "b", 2 = "b" }', "points[0].bits", '"b" names bits 1 and 2'),
    ('type = "float32"\nbits = { 1 = "b" }', "points[0].bits", "a bitfield needs an integer type"),
    ('bits = { 1 = "b" }\noffset = 1', "points[0].offset", "a bitfield takes no scale or offset"),
    ('enum = { 1 = "a" }\nscale = 1.0', "points[0].scale", "an enumeration takes no scale or offset"),
    ('type = "string"\nlength = 2\noffset = 0.0', "points[0].offset", "a string takes no scale or offset"),
    ('type = "bool"\ntable = "coil"\nscale = 2', "points[0].scale", "a bool takes no scale or offset"),
    ('scale_factor = "v"', "points[0].scale_factor", "cannot be its own scale factor"),
    ('enum = { 1 = "a" }\nscale_factor = "x"', "points[0].scale_factor", "only plain numbers take a scale factor"),
]


@pytest.mark.parametrize(("point", "key", "message"), POINT_ERRORS)
def test_point_validation(tmp_path: Path, point: str, key: str, message: str) -> None:
    fields = {"name": '"v"', "address": "0", "type": '"int16"'}
    for line in point.splitlines():
        fields.pop(line.split("=")[0].strip(), None)
    body = "[[points]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items()) + point + "\n"
    err = error_of(write_profile(tmp_path, body))
    assert err.path == key
    assert message in err.message


POINTS_W_AND_SF = """
[[points]]
name = "w"
address = 0
type = "int16"
scale_factor = "w_sf"

[[points]]
name = "w_sf"
address = 1
"""

PROFILE_ERRORS = [
    # scale factors
    ('[[points]]\nname = "w"\naddress = 0\ntype = "int16"\nscale_factor = "nope"\n', "points[0].scale_factor",
     'no point is named "nope"'),
    (POINTS_W_AND_SF + 'type = "float32"\n', "points[0].scale_factor", '"w_sf" is a float32; a scale factor is a plain integer'),
    (POINTS_W_AND_SF + 'type = "int16"\nscale = 10\n', "points[0].scale_factor", '"w_sf" is itself scaled'),
    (POINTS_W_AND_SF + 'type = "int16"\nmeasurement = "other"\n', "points[0].scale_factor", "is in another measurement"),
    (POINTS_W_AND_SF + 'type = "int16"\n\n[[points]]\nname = "w_sf"\naddress = 2\ntype = "int16"\nmeasurement = "m2"\n',
     "points[0].scale_factor", '"w_sf" names points [1, 2]'),
    # names, bits, limits, ranges
    ('[[points]]\nname = "a"\naddress = 0\ntype = "uint16"\nbits = { 0 = "b" }\n\n[[points]]\nname = "b"\naddress = 1\ntype = "int16"\n',
     "points[1].name", '"b" is already used by a bit of points[0] in measurement "meter"'),
    ('[[points]]\nname = "a"\naddress = 0\ntype = "int16"\n\n[[points]]\nname = "x"\naddress = 1\ntype = "uint16"\nbits = { 3 = "a" }\n',
     "points[1].bits", '"a" is already used by points[0] in measurement "meter"'),
    ('max_registers = 4\n[[points]]\nname = "s"\naddress = 0\ntype = "string"\nlength = 5\n', "points[0].length",
     "a string needs 5 registers but max_registers is 4"),
    ('[[unreadable]]\ntable = "input"\nstart = 4\nend = 9\n[[points]]\nname = "v"\naddress = 3\ntype = "float32"\n',
     "points[0].address", '"v" (0x0003..0x0004) lies in unreadable[0] (0x0004..0x0009)'),
    ('[[unreadable]]\ntable = "input"\nstart = 4\nend = 3\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n',
     "unreadable[0].end", "3 is before start 4"),
    ('max_gap = 2\nworkarounds = ["no_gap_reads"]\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n', "max_gap",
     "is 2 but the no_gap_reads workaround forbids bridging gaps"),
    ('workarounds = ["no_gap_reads", "no_gap_reads"]\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n', "workarounds",
     "listed twice"),
    ('workarounds = ["swap_words"]\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n', "workarounds[0]",
     'expected one of "no_gap_reads", "one_request_per_point", got "swap_words"'),
    ('max_bits = 2001\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n', "max_bits", "expected an integer 1..2000"),
    ('default_unit = 0\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n', "default_unit", "expected an integer 1..255"),
    ('[serial]\nbaud = 9600\nparity = "X"\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n', "serial.parity",
     'expected one of "E", "N", "O", got "X"'),
    ('[serial]\nbaud = 9601\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n', "serial.baud", "got 9601"),
    ('[serial]\nparity = "E"\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n', "serial.baud", "required key is missing"),
    ('[serial]\nbaud = 9600\n[[serial_alternatives]]\nbaud = 9600\nparity = "N"\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n',
     "serial_alternatives[0]", "9600 8N1 is listed already"),
    ('[[serial_alternatives]]\nbaud = 9600\nstop_bits = 3\n[[points]]\nname = "v"\naddress = 0\ntype = "int16"\n',
     "serial_alternatives[0].stop_bits", "got 3"),
]


@pytest.mark.parametrize(("body", "key", "message"), PROFILE_ERRORS)
def test_profile_validation(tmp_path: Path, body: str, key: str, message: str) -> None:
    err = error_of(write_profile(tmp_path, body))
    assert (err.path, message in err.message) == (key, True), err.message


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


# --- golden register dumps ---------------------------------------------------------------------------------


def golden_dirs() -> list[Path]:
    return sorted(p for p in GOLDEN.iterdir() if p.is_dir())


def test_there_is_a_golden_dir_for_every_shipped_profile() -> None:
    assert {p.name for p in golden_dirs()} >= set(available_profiles())


def answers_for(plan: list[ReadRequest], tables: dict[str, dict[int, int]], golden: Path) -> list[list[int]]:
    answers = []
    for request in plan:
        registers = tables.get(request.table, {})
        missing = [a for a in range(request.address, request.address + request.count) if a not in registers]
        if missing:
            pytest.fail(f"{golden.name}/registers.json lacks {request.table} 0x{missing[0]:04X}, "
                        f"read by the request {request.describe()}")
        answers.append([registers[a] for a in range(request.address, request.address + request.count)])
    return answers


def same_value(actual: Any, expected: Any) -> bool:
    """Types must match exactly (an int field stays an int: InfluxDB field types); floats to 1e-6 relative,
    what a float32 register and a display's digits can agree on."""
    if isinstance(expected, bool | str | int):
        return type(actual) is type(expected) and actual == expected
    return type(actual) is float and math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9)


def decode_by_contract(plan: list[ReadRequest], answers: list[list[int]]) -> tuple[dict, dict]:
    """(fields, quality) as the decoder contract defines them (docs/profiles.md, "How a profile is read").

    Decoders give a value, a Missing (-> quality = its reason) or a dict of bits (-> one field each);
    internal points are not emitted; a point with a scale factor gets value * 10**sf once every request is
    decoded, where the scale factor is the named point *of the same measurement*, always as a float (a device
    may change its exponent at run time, a field must not change type); a missing scale factor makes the
    value missing with "no_scale_factor".
    """
    fields: dict[str, dict[str, Any]] = {}
    quality: dict[str, dict[str, str]] = {}
    raw: dict[tuple[str, str], Any] = {}
    scaled = []
    for request, registers in zip(plan, answers, strict=True):
        for slot in request.slots:
            value = slot.decode(registers[slot.offset : slot.offset + slot.width])
            raw[slot.measurement, slot.field] = value
            if not slot.emit:
                continue
            if slot.scale_factor is not None:
                scaled.append(slot)
            elif isinstance(value, dict):
                fields.setdefault(slot.measurement, {}).update(value)
            elif isinstance(value, Missing):
                quality.setdefault(slot.measurement, {})[slot.field] = value.reason
            else:
                fields.setdefault(slot.measurement, {})[slot.field] = value
    for slot in scaled:
        value, sf = raw[slot.measurement, slot.field], raw[slot.measurement, slot.scale_factor]
        if isinstance(value, Missing):
            quality.setdefault(slot.measurement, {})[slot.field] = value.reason
        elif not isinstance(sf, int) or isinstance(sf, bool):
            quality.setdefault(slot.measurement, {})[slot.field] = "no_scale_factor"
        else:
            fields.setdefault(slot.measurement, {})[slot.field] = float(value) * 10.0**sf
    return fields, quality


def scale_factor_names_collide(profile: Profile) -> bool:
    """Whether a scaled point or scale factor shares its name with a point of another measurement."""
    names = [p.name for p in profile.points]
    return any(names.count(p.name) > 1 for p in profile.points if p.scale_factor is not None)


@pytest.mark.parametrize("golden", golden_dirs(), ids=lambda p: p.name)
def test_golden(golden: Path) -> None:
    """registers.json (registers by table and address) through the engine's plan and the decoders gives
    expected.json: every field a poll can emit, as a value or as {"missing": reason}, and nothing else."""
    own = golden / "profile.toml"
    profile = load_profile(own if own.exists() else golden.name)
    raw = json.loads((golden / "registers.json").read_text())
    tables = {table: {int(a, 0): r for a, r in regs.items()} for table, regs in raw.items()}
    expected = json.loads((golden / "expected.json").read_text())

    plan = plan_for(profile)
    answers = answers_for(plan, tables, golden)
    fields, quality = decode_by_contract(plan, answers)

    assert {m: sorted(f) for m, f in expected.items()} == {m: sorted(f) for m, f in profile.fields().items()}
    for measurement, wanted in expected.items():
        got, reasons = fields.get(measurement, {}), quality.get(measurement, {})
        assert set(got) | set(reasons) == set(wanted), measurement
        for name, value in wanted.items():
            if isinstance(value, dict):
                assert (name in got, reasons.get(name)) == (False, value["missing"]), (measurement, name)
            else:
                assert name in got, (measurement, name, reasons.get(name))
                assert same_value(got[name], value), (measurement, name, got[name], value)

    # the engine's own decode_poll agrees, including profiles whose scaled names repeat across measurements
    # (sunspec_generic: the inverter's and the meter's "current")
    assert scale_factor_names_collide(profile) == (golden.name == "sunspec_generic")
    poll = decode_poll(plan, answers)
    assert poll.quality == quality
    assert {m: set(f) for m, f in poll.fields.items()} == {m: set(f) for m, f in fields.items()}
    for measurement, values in fields.items():
        for name, value in values.items():
            assert same_value(poll.fields[measurement][name], value), (measurement, name)


def test_missing_values_are_never_numbers() -> None:
    """The decoders' marker is not a number by accident: no arithmetic, no comparison with numbers."""
    assert isinstance(NOT_AVAILABLE, Missing)
    with pytest.raises(TypeError):
        NOT_AVAILABLE * 10  # type: ignore[operator]
    assert NOT_AVAILABLE != 0


# --- writable points (commands, docs/control.md) -----------------------------------------------------------

REGISTER = '[[points]]\nname = "sp"\naddress = 0x10\ntable = "holding"\ntype = "int16"\nscale = 0.1\n'


@pytest.mark.parametrize(("point", "key", "message"), [
    ('[[points]]\nname = "v"\naddress = 0\ntype = "int16"\nwritable = true\nmin = 0\nmax = 1\n', "points[0].writable",
     "the input registers are read-only in Modbus: only holding registers and coils can be written"),
    ('[[points]]\nname = "v"\naddress = 0\ntable = "discrete"\ntype = "bool"\nwritable = true\n', "points[0].writable",
     "the discrete inputs are read-only"),
    (REGISTER + "writable = true\nmax = 5\n", "points[0].min", "a writable register needs min and max"),
    (REGISTER + "writable = true\nmin = 5\n", "points[0].max", "a writable register needs min and max"),
    (REGISTER + "writable = true\nmin = 5\nmax = 1\n", "points[0].max", "1 is below min 5"),
    (REGISTER + "writable = true\nmin = 0\nmax = 1\nstep = 0\n", "points[0].step", "greater than 0"),
    (REGISTER + "writable = true\nmin = -4000\nmax = 1\n", "points[0].min",
     "cannot be written to this point: -4000 needs the raw value -40000, outside a int16 (-32768..32767)"),
    (REGISTER + "writable = true\nmin = 0.05\nmax = 1\n", "points[0].min", "not a whole number of steps of 0.1"),
    (REGISTER + "min = 0\n", "points[0].min", "only a writable point takes it (writable = true)"),
    (REGISTER + "critical = true\n", "points[0].critical", "only a writable point takes it"),
    ('[[points]]\nname = "v"\naddress = 0\ntable = "holding"\ntype = "int32"\nwritable = true\nmin = 0\nmax = 1\n'
     'write_function = 6\n', "points[0].write_function", "a int32 in the holding registers is written with function 16"),
    ('[[points]]\nname = "r"\naddress = 0\ntable = "coil"\ntype = "bool"\nwritable = true\nmax = 1\n', "points[0].max",
     "a coil is true or false: it takes no min, max or step"),
    ('[[points]]\nname = "r"\naddress = 0\ntable = "coil"\ntype = "bool"\nwritable = true\nwrite_function = 16\n',
     "points[0].write_function", "is written with function 5 or 15"),
    ('[[points]]\nname = "m"\naddress = 0\ntable = "holding"\ntype = "uint16"\nenum = { 1 = "on" }\nwritable = true\n',
     "points[0].writable", "an enumeration cannot be written"),
    ('[[points]]\nname = "b"\naddress = 0\ntable = "holding"\ntype = "uint8h"\nwritable = true\nmin = 0\nmax = 1\n',
     "points[0].writable", "a uint8h is one byte of a register: writing it would overwrite the other byte"),
    ('[[points]]\nname = "s"\naddress = 0\ntable = "holding"\ntype = "string"\nlength = 2\nwritable = true\n',
     "points[0].writable", "a string point cannot be written as one value"),
    (REGISTER + 'writable = true\nmin = 0\nmax = 1\n[[points]]\nname = "sp"\naddress = 0x20\ntable = "holding"\n'
     'type = "int16"\nmeasurement = "other"\n', "points[0].name", "a writable point's name must be unique"),
])
def test_writable_point_errors_name_the_file_and_key(tmp_path: Path, point: str, key: str, message: str) -> None:
    path = write_profile(tmp_path, point)
    err = error_of(path)
    assert (err.source, err.path) == (str(path), key)
    assert message in err.message, err.message


def test_write_points_use_the_points_own_decoder_and_its_inverse(tmp_path: Path) -> None:
    profile = load_profile(write_profile(tmp_path, (
        REGISTER + "writable = true\nmin = -5\nmax = 5\nstep = 0.5\ncritical = true\nunit = \"°C\"\n"
        '[[points]]\nname = "limit"\naddress = 0x20\ntable = "holding"\ntype = "float32"\norder = "CDAB"\n'
        "writable = true\nmin = 0\nmax = 1000\n"
        '[[points]]\nname = "sp16"\naddress = 0x30\ntable = "holding"\ntype = "uint16"\nwritable = true\nmin = 0\n'
        "max = 9\nwrite_function = 16\n"
        '[[points]]\nname = "relay"\naddress = 3\ntable = "coil"\ntype = "bool"\nwritable = true\n'
        '[[points]]\nname = "v"\naddress = 0\ntype = "float32"\n'
    )))
    assert profile.writable_points() == ["sp", "limit", "sp16", "relay"]
    sp = profile.write_point("sp")
    assert (sp.function, sp.table, sp.address, sp.width, sp.critical) == (6, "holding", 0x10, 1, True)
    assert sp.registers_for(-2.5) == [0xFFE7] and sp.decode([0xFFE7]) == -2.5
    assert sp.request([0xFFE7]) == bytes.fromhex("06 0010 FFE7")
    limit = profile.write_point("limit")
    assert (limit.function, limit.width) == (16, 2)
    assert limit.registers_for(230) == [0x0000, 0x4366] and limit.decode([0x0000, 0x4366]) == 230.0
    assert profile.write_point("sp16").function == 16
    relay = profile.write_point("relay")
    assert (relay.function, relay.registers_for(True), relay.readback().describe()) == (5, [1], "coil 0x0003+1")
    with pytest.raises(KeyError):
        profile.write_point("v")  # not writable


@pytest.mark.parametrize(("value", "detail"), [
    (5.5, "5.5 °C is outside sp's range -5..5"),
    (-5.01, "outside sp's range"),
    (1.2, "1.2 is not on sp's step of 0.5 from -5"),
    (True, "sp takes a number, not True"),
    (float("nan"), "sp takes a number"),
    ("3", "sp takes a number"),
])
def test_values_outside_a_writable_points_rules_are_refused(tmp_path: Path, value: object, detail: str) -> None:
    from wire.control import ControlReason, ControlRefused

    profile = load_profile(write_profile(tmp_path, REGISTER + 'writable = true\nmin = -5\nmax = 5\nstep = 0.5\nunit = "°C"\n'))
    with pytest.raises(ControlRefused) as caught:
        profile.write_point("sp").registers_for(value)  # type: ignore[arg-type]
    assert caught.value.reason == ControlReason.OUT_OF_RANGE
    assert detail in caught.value.detail


def test_xy_md02_corrections_are_writable_within_the_sellers_range() -> None:
    profile = load_profile("xy_md02")
    assert profile.writable_points() == ["temperature_correction", "humidity_correction"]
    point = profile.write_point("temperature_correction")
    # the seller's sheet: holding 0x0103, "(/10) -10.0~10.0", function 06
    assert point.request(point.registers_for(-1.5)) == bytes.fromhex("06 0103 FFF1")
    assert point.registers_for(10.0) == [100] and point.registers_for(-10.0) == [0xFF9C]
