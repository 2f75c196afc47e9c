"""SunSpec discovery: model files, the sans-IO walker, the point map, and discovery over real Modbus TCP."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.modbus.plan import decode_poll, plan_reads
from edge_agent.sunspec import (
    SunSpecNotFound,
    SunSpecWalker,
    decode_value,
    discover,
    mapped_points,
    point_settings,
    point_specs_for,
    points_for,
    profile_for,
    register_reader,
    shipped_models,
    walk,
)
from edge_agent.sunspec.models import (
    NOT_IMPLEMENTED,
    ModelError,
    ModelLayoutError,
    PointDef,
    load_model_file,
    parse_model,
    sentinel_registers,
)
from labkit.sunspec_sim import fixture_image, load_register_dump, relocate, sunspec_in_thread

GOLDEN = Path(__file__).resolve().parent / "golden" / "sunspec"
DUMP = GOLDEN / "test_inverter_1_registers_base40000.txt"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text(encoding="utf-8"))
MODELS_DIR = resources.files("firmware_profiles") / "sunspec_models"

# The lengths (L) the SunSpec specification gives each shipped model, written down independently of the files.
SPEC_LENGTHS = {1: 66, 101: 50, 102: 50, 103: 50, 111: 60, 112: 60, 113: 60, 120: 26, 121: 30, 122: 44,
                123: 24, 160: 8, 201: 105, 202: 105, 203: 105, 204: 105}


def fixture() -> dict[int, int]:
    return load_register_dump(DUMP)


def image(base: int, models: Sequence[tuple[int, int] | tuple[int, int, Sequence[int]]], end: bool = True,
          fill: int = 0) -> dict[int, int]:
    """A register image: SunS at `base`, then (id, length[, body]) models, then the end marker."""
    regs = {base: 0x5375, base + 1: 0x6E53}
    at = base + 2
    for model in models:
        model_id, length = model[0], model[1]
        body = list(model[2]) if len(model) > 2 else [fill] * length  # type: ignore[misc]
        regs[at], regs[at + 1] = model_id, length
        for i, value in enumerate(body):
            regs[at + 2 + i] = value
        at += 2 + length
    if end:
        regs[at], regs[at + 1] = 0xFFFF, 0
    return regs


# -- model files -------------------------------------------------------------------------------------------------


def test_shipped_model_files_are_unchanged_copies():
    notice = (MODELS_DIR / "NOTICE").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\s+(model_\d+\.json)\s+[0-9a-f]{40}\s+([0-9a-f]{64})$", notice, flags=re.M))
    files = sorted(e.name for e in MODELS_DIR.iterdir() if e.name.endswith(".json"))
    assert sorted(listed) == files
    for name in files:
        assert hashlib.sha256((MODELS_DIR / name).read_bytes()).hexdigest() == listed[name], name
    assert "Apache License" in (MODELS_DIR / "LICENSE").read_text(encoding="utf-8")


def test_every_shipped_model_has_its_specified_length():
    library = shipped_models()
    assert library.ids() == sorted(SPEC_LENGTHS)
    for model_id, length in SPEC_LENGTHS.items():
        model = library.get(model_id)
        assert model is not None and model.fixed_length == length, model_id
        layout = model.layout(length)
        assert layout[0].name == "ID" and layout[1].name == "L"
        # points tile the model without holes or overlaps
        offsets = [p.offset for p in layout]
        assert offsets == sorted(offsets)
        assert all(a.offset + a.size == b.offset for a, b in itertools.pairwise(layout))
        assert layout[-1].offset + layout[-1].size == length + 2
        for point in layout:
            if isinstance(point.sf, str):
                sf = next(p for p in layout if p.key == point.sf)
                assert sf.type == "sunssf", (model_id, point.key)


def test_model_names_become_measurements():
    names = {i: shipped_models().get(i).name for i in SPEC_LENGTHS}
    assert names[1] == "common" and names[103] == "inverter" and names[120] == "nameplate"
    assert names[160] == "mppt" and names[201] == "ac_meter" and names[122] == "status"


def test_model_112_without_sizes_takes_them_from_the_types():
    model = shipped_models().get(112)
    sizes = {p.name: p.size for p in model.layout(60)}
    assert sizes["A"] == 2 and sizes["St"] == 1 and sizes["Evt1"] == 2


def test_repeating_group_count_follows_the_length():
    model = shipped_models().get(160)
    assert (model.fixed_length, model.repeat_length) == (8, 20)
    assert model.repetitions(8) == 0
    assert model.repetitions(48) == 2
    layout = model.layout(48)
    keys = [p.key for p in layout]
    assert "module_1_DCA" in keys and "module_2_DCEvt" in keys and "module_3_DCA" not in keys
    dca2 = next(p for p in layout if p.key == "module_2_DCA")
    assert dca2.offset == 10 + 20 + 9 and dca2.sf == "DCA_SF"  # scale factor found in the enclosing group
    with pytest.raises(ModelLayoutError, match="not 8 \\+ n x 20"):
        model.repetitions(50)


def test_common_model_of_length_65_drops_only_the_pad():
    model = shipped_models().get(1)
    assert [p.key for p in model.layout(65)][-1] == "DA"
    with pytest.raises(ModelLayoutError, match="needs 66"):
        model.repetitions(64)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"group": {}}, "expected an object with 'id' and 'group'"),
        ({"id": 0, "group": {"name": "x"}}, "id must be"),
        ({"id": 9, "group": {"name": "x", "points": [{"name": "ID", "type": "uint16"}]}}, "first two points"),
        ({"id": 9, "group": {"name": "x", "points": [{"name": "ID", "type": "uint17"}]}}, "unknown SunSpec type"),
        ({"id": 9, "group": {"name": "x", "points": [{"name": "ID", "type": "uint16", "size": 2}]}}, "not 2"),
        ({"id": 9, "group": {"name": "x", "points": [{"name": "S", "type": "string"}]}}, "size"),
    ],
)
def test_broken_model_files_are_refused(data, message):
    with pytest.raises(ModelError, match=message):
        parse_model(data, "model_9.json")


def test_model_file_from_a_path(tmp_path):
    path = tmp_path / "model_64999.json"
    path.write_text(json.dumps({"id": 64999, "group": {"name": "vendor", "points": [
        {"name": "ID", "type": "uint16", "size": 1}, {"name": "L", "type": "uint16", "size": 1},
        {"name": "Temp", "type": "int16", "size": 1, "sf": -1, "units": "C"}]}}))
    model = load_model_file(path)
    assert model.fixed_length == 1 and model.layout(1)[2].sf == -1
    with pytest.raises(ModelError, match="not JSON"):
        path.write_text("{")
        load_model_file(path)


# -- SunSpec values ----------------------------------------------------------------------------------------------


def _point(type_: str, size: int | None = None) -> PointDef:
    from edge_agent.sunspec.models import TYPE_SIZES

    return PointDef(key="P", name="P", type=type_, size=size or TYPE_SIZES[type_], offset=0)


@pytest.mark.parametrize("type_", sorted(NOT_IMPLEMENTED))
def test_not_implemented_values_decode_to_none(type_):
    point = _point(type_)
    assert decode_value(point, sentinel_registers(point)) is None


@pytest.mark.parametrize(
    ("type_", "registers", "value"),
    [
        ("int16", [0xFFFF], -1),
        ("int16", [0x8001], -32767),
        ("sunssf", [0xFFFE], -2),
        ("uint16", [0xFFFE], 65534),
        ("acc32", [0x0012, 0xD687], 1234567),
        ("int32", [0xFFFF, 0xFFFE], -2),
        ("uint32", [0, 7], 7),
        ("acc64", [0, 0, 0, 1], 1),
        ("float32", [0x4366, 0x1999], pytest.approx(230.1, rel=1e-6)),
        ("bitfield32", [0, 3], 3),
        ("enum16", [0, ], 0),
    ],
)
def test_values(type_, registers, value):
    assert decode_value(_point(type_), registers) == value


def test_strings_and_their_absence():
    point = _point("string", 4)
    assert decode_value(point, [0x5375, 0x6E53, 0, 0]) == "SunS"
    assert decode_value(point, [0x2041, 0x2000, 0x5858, 0]) == "A"  # cut at the first NUL, blanks stripped
    assert decode_value(point, [0, 0, 0, 0]) is None
    assert decode_value(_point("float32"), [0x7FC0, 0]) is None
    with pytest.raises(ValueError, match="2 registers"):
        decode_value(point, [1, 2])


# -- the walker --------------------------------------------------------------------------------------------------


def test_walker_on_the_fixture_reads_exactly_the_chain():
    regs = fixture()
    walker = SunSpecWalker()
    requests = []
    while (request := walker.next_read()) is not None:
        assert walker.next_read() == request  # asking again does not advance
        requests.append(request)
        walker.feed(register_reader(regs)(*request))
    assert requests == [(40000, 2), (40002, 2), (40070, 2), (40122, 2), (40004, 66)]
    smap = walker.result
    assert smap is not None and smap.complete and smap.base == 40000
    assert [(m.model_id, m.address, m.length, m.known) for m in smap.models] == [
        (1, 40002, 66, True), (103, 40070, 50, True)]
    assert smap.end_reason == "end marker at 40122"
    assert dict(smap.common) == {"Mn": "SunSpecTest", "Md": "TestInverter-1", "Opt": "opt_a_b_c", "Vr": "1.2.3",
                                 "SN": "sn-123456789", "DA": 1}
    assert "model 103 (inverter) at 40070, length 50" in smap.describe()


@pytest.mark.parametrize("base", [0, 50000])
def test_other_bases_are_probed_in_order(base):
    walker = walk(register_reader(relocate(fixture(), base)))
    smap = walker.result
    assert smap is not None and smap.base == base and smap.complete
    assert [m.address for m in smap.models] == [base + 2, base + 70]
    expected = [40000, 0, 50000][: [40000, 0, 50000].index(base) + 1]
    assert [p.base for p in smap.probes] == expected
    assert all(p.answer.startswith("exception") for p in smap.probes[:-1])


def test_no_suns_anywhere_is_a_clear_result():
    regs = {a: 0 for a in range(0, 10)} | {40000: 0x5375, 40001: 0x6E52}
    walker = walk(register_reader(regs))
    assert walker.done and walker.result is None
    assert walker.reason == "no SunS marker: 40000: 0x5375 0x6E52; 0: 0x0000 0x0000; 50000: exception"


def test_custom_bases_and_their_checks():
    walker = walk(register_reader(image(1000, [(103, 50)])), bases=(1000,), read_common=False)
    assert walker.result.base == 1000 and walker.result.model_ids == [103]
    with pytest.raises(ValueError):
        SunSpecWalker(bases=())
    with pytest.raises(ValueError):
        SunSpecWalker(bases=(65533,))


def test_invalid_length_of_a_known_model_stops_the_walk():
    regs = image(40000, [(1, 66), (103, 49), (120, 26)])
    smap = walk(register_reader(regs)).result
    assert not smap.complete
    assert [(m.model_id, m.known) for m in smap.models] == [(1, True), (103, False)]
    assert "model 103 declares length 49" in smap.models[1].note
    assert smap.end_reason.startswith("invalid length")
    assert [p.field for p in mapped_points(smap)][:2] == ["manufacturer", "model_name"]  # model 1 is still mapped
    assert not any(p.model.model_id == 103 for p in mapped_points(smap))


def test_length_running_past_the_address_space_stops_the_walk():
    regs = image(50000, [(64001, 10), (64002, 20000)], end=False)
    smap = walk(register_reader(regs)).result
    assert not smap.complete and smap.model_ids == [64001]
    assert smap.end_reason == ("model 64002 at 50014 declares length 20000: the chain would run past "
                               "register 65535")


def test_truncated_chain_keeps_the_models_before_the_cut():
    regs = image(40000, [(1, 66), (103, 50)], end=False)  # no end marker: the next header is unreadable
    smap = walk(register_reader(regs)).result
    assert not smap.complete and smap.model_ids == [1, 103]
    assert smap.end_reason == "no end marker: reading the model header at 40122 failed"
    regs = image(40000, [(1, 66)], end=False) | {40070: 0, 40071: 0}
    smap = walk(register_reader(regs)).result
    assert smap.end_reason == "no end marker: model id 0 at 40070" and smap.model_ids == [1]


def test_unknown_models_are_skipped_by_their_length():
    regs = image(40000, [(1, 66), (64001, 7), (103, 50)])
    smap = walk(register_reader(regs)).result
    assert smap.complete and smap.model_ids == [1, 64001, 103]
    unknown = smap.models[1]
    assert not unknown.known and unknown.note == "no model definition" and smap.models[2].address == 40079
    assert {p.model.model_id for p in mapped_points(smap)} == {1, 103}


def test_end_marker_with_a_nonzero_length_still_ends_the_chain():
    regs = image(0, [(103, 50)], end=False) | {54: 0xFFFF, 55: 0xFFFF}
    smap = walk(register_reader(regs)).result
    assert smap.complete and smap.end_reason == "end marker at 54 (with length 65535 instead of 0)"


def test_a_chain_without_end_stops_after_max_models():
    regs = image(0, [(64001, 0)] * 10, end=False)
    walker = walk(register_reader(regs), max_models=5)
    assert walker.result.end_reason == "no end marker after 5 models" and len(walker.result.models) == 5


def test_short_answers_and_protocol_misuse():
    walker = SunSpecWalker()
    with pytest.raises(RuntimeError):
        walker.feed([1, 2])
    assert walker.next_read() == (40000, 2)
    walker.feed([0x5375])  # one register for a read of two: treated as a failed read
    assert walker.probes[0].answer == "exception: 1 registers for a read of 2"
    assert walker.next_read() == (0, 2)


def test_common_model_read_failure_leaves_the_map_without_names():
    regs = fixture()
    del regs[40030]
    smap = walk(register_reader(regs)).result
    assert smap.complete and dict(smap.common) == {} and smap.model_ids == [1, 103]


# -- property: any chain of known models is recovered exactly; garbage never hangs the walker ----------------------

_KNOWN = sorted(SPEC_LENGTHS)


@st.composite
def chains(draw):
    base = draw(st.sampled_from([40000, 0, 50000]))
    count = draw(st.integers(0, 6))
    models = []
    for _ in range(count):
        model_id = draw(st.sampled_from([*_KNOWN, 64001, 65000]))
        if model_id == 160:
            length = 8 + 20 * draw(st.integers(0, 4))
        elif model_id in SPEC_LENGTHS:
            length = SPEC_LENGTHS[model_id]
        else:
            length = draw(st.integers(0, 40))
        models.append((model_id, length))
    return base, models


@settings(max_examples=150, deadline=None)
@given(chains())
def test_property_chain_round_trip(chain):
    base, models = chain
    smap = walk(register_reader(image(base, models, fill=0xFFFF)), read_common=False).result
    assert smap is not None and smap.base == base and smap.complete
    assert [(m.model_id, m.length) for m in smap.models] == models
    assert all(m.known == (m.model_id in SPEC_LENGTHS) for m in smap.models)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(39990, 40200), st.integers(0, 0xFFFF), max_size=200),
       st.booleans())
def test_property_garbage_never_hangs_or_crashes(regs, marker):
    if marker:
        regs = regs | {40000: 0x5375, 40001: 0x6E53}
    walker = walk(register_reader(regs), max_models=20)
    assert walker.done
    assert walker.reads <= 3 + 20 + 1 + 1
    if walker.result is not None:
        addresses = [m.address for m in walker.result.models]
        assert addresses == sorted(addresses)


# -- the point map -----------------------------------------------------------------------------------------------


def _profile_fields_missing() -> list[str]:
    from edge_agent.profiles import Point

    needed = {"sentinel", "length", "encoding", "enum", "bits", "scale_factor", "internal"}
    return sorted(needed - set(Point.__struct_fields__))


needs_profile_fields = pytest.mark.skipif(
    bool(_profile_fields_missing()),
    reason=f"edge_agent.profiles.Point lacks {', '.join(_profile_fields_missing())}",
)


def fixture_map():
    return walk(register_reader(fixture())).result


def settings_by_field(smap, prefix="sunspec", **kwargs) -> dict[str, dict]:
    return {s["name"]: s for s in (point_settings(mp) for mp in mapped_points(smap, prefix, **kwargs))}


def test_points_of_the_fixture():
    points = settings_by_field(fixture_map())
    w = points["power"]  # W: the vocabulary's name (edge_agent/sunspec/vocabulary.py)
    assert w == {"name": "power", "address": 40084, "type": "int16", "table": "holding",
                 "measurement": "sunspec_inverter", "unit": "W", "sentinel": "auto",
                 "scale_factor": "inverter_W_SF", "description": "SunSpec model 103 W: Watts"}
    assert points["inverter_W_SF"]["internal"] and points["inverter_W_SF"]["sentinel"] == "auto"  # native names
    energy = points["energy"]  # WH, acc32 in Wh: x 0.001 into kWh before the scale factor
    assert (energy["type"], energy["sentinel"], energy["unit"], energy["scale"]) == ("uint32", [0], "kWh", 0.001)
    assert (points["power_factor"]["unit"], points["power_factor"]["scale"]) == ("", 0.01)  # Pct -> ratio
    assert points["temperature_cabinet"]["unit"] == "°C"
    assert points["serial_number"]["type"] == "string" and points["serial_number"]["length"] == 16
    assert "sentinel" not in points["serial_number"]
    assert points["state"]["enum"]["4"] == "MPPT"
    assert points["event"]["bits"]["0"] == "event_ground_fault"
    assert "bits" not in points["inverter_EvtVnd1"] and "enum" not in points["status"]
    assert points["common_DA"]["description"] == "SunSpec model 1 DA: Device Address (writable setting)"
    assert "common_ID" not in points and "common_Pad" not in points and "inverter_L" not in points


@needs_profile_fields
def test_points_are_profile_points():
    points = {p.name: p for p in points_for(fixture_map())}
    assert points["power"].scale_factor == "inverter_W_SF" and points["inverter_W_SF"].internal
    assert points["serial_number"].length == 16 and points["state"].enum["4"] == "MPPT"
    profile = profile_for(fixture_map())
    assert (profile.vendor, profile.model, profile.measurement) == ("SunSpecTest", "TestInverter-1", "sunspec")
    assert profile.description == "SunSpec discovery at 40000: models 1 (common, L=66), 103 (inverter, L=50)"


def test_the_chain_is_read_in_one_request():
    plan = plan_reads(point_specs_for(fixture_map()), 125, 123)
    assert [(r.table, r.address, r.count) for r in plan] == [("holding", 40004, 118)]


def _poll(specs, regs: Mapping[int, int]):
    plan = plan_reads(specs, 125, 123)
    return decode_poll(plan, [[regs[a] for a in range(r.address, r.address + r.count)] for r in plan])


def _check_golden(values) -> None:
    expected = EXPECTED["fields"]
    assert values.fields.keys() == expected.keys()
    for measurement, fields in expected.items():
        got = values.fields[measurement]
        assert got.keys() == fields.keys(), measurement
        for name, value in fields.items():
            if isinstance(value, float):
                assert got[name] == pytest.approx(value, rel=1e-12), name
            else:
                assert got[name] == value and type(got[name]) is type(value), name
    assert values.quality == EXPECTED["quality"]


def test_golden_fixture_decodes_to_the_xml_values():
    _check_golden(_poll(point_specs_for(fixture_map()), fixture()))


def test_not_implemented_scale_factor_and_values():
    regs = fixture() | {40085: 0x8000, 40072: 0xFFFF, 40094: 0, 40095: 0}  # W_SF, A, WH
    values = _poll(point_specs_for(fixture_map()), regs)
    quality = values.quality["sunspec_inverter"]
    assert quality["power"] == "no_scale_factor"
    assert quality["current"] == "not_available" and quality["energy"] == "not_available"
    assert "power" not in values.fields["sunspec_inverter"]
    assert values.fields["sunspec_inverter"]["current_l1"] == pytest.approx(4.1)


@needs_profile_fields
def test_golden_fixture_through_a_profile():
    profile = profile_for(fixture_map())
    assert (profile.max_registers, profile.max_gap) == (125, 123)
    _check_golden(_poll(profile.point_specs(), fixture()))


def test_golden_raw_values_by_the_model_definition_alone():
    regs = fixture()
    model = shipped_models().get(103)
    raw = {p.key: decode_value(p, [regs[40070 + p.offset + i] for i in range(p.size)])
           for p in model.layout(50) if p.name not in ("ID", "L")}
    assert raw == EXPECTED["raw"]["103"]


def repeated_map():
    regs = image(40000, [(1, 66), (201, 105), (201, 105), (160, 48)])
    return walk(register_reader(regs), read_common=False).result


def test_models_filter_and_repeated_models():
    smap = repeated_map()
    meters = [s for s in (point_settings(mp) for mp in mapped_points(smap, "pv")) if s["name"] == "power"]
    assert [(s["measurement"], s["address"]) for s in meters] == [("pv_ac_meter", 40000 + 2 + 68 + 2 + 16),
                                                                 ("pv_ac_meter_2", 40000 + 2 + 68 + 107 + 2 + 16)]
    names = settings_by_field(smap, "pv")
    assert names["dc_current_pv2"]["scale_factor"] == "mppt_DCA_SF"  # module 2's DCA, the model-level DCA_SF
    assert names["dc_energy_pv1"]["unit"] == "kWh" and names["mppt_module_2_IDStr"]["type"] == "string"
    assert names["ac_meter_2_TotVArhImpQ1PhA"]["unit"] == "varh"  # no vocabulary name: SunSpec's name and unit
    assert {p.model.model_id for p in mapped_points(smap, models={160})} == {160}


@needs_profile_fields
def test_profile_of_repeated_models():
    smap = repeated_map()
    profile = profile_for(smap, "pv")
    assert (profile.vendor, profile.model, profile.measurement) == ("SunSpec", "SunSpec device", "pv")
    with pytest.raises(ValueError, match="no mapped points"):
        profile_for(smap, models={999})


def every_model_image() -> dict[int, int]:
    return image(40000, [(i, SPEC_LENGTHS[i] + (40 if i == 160 else 0)) for i in _KNOWN], fill=0)


def test_every_shipped_model_is_polled():
    regs = every_model_image()
    smap = walk(register_reader(regs), read_common=False).result
    assert smap.complete and all(m.known for m in smap.models)
    values = _poll(point_specs_for(smap), regs)
    # an all-zero image: plain integers read 0; accumulators and strings say "not available"
    assert values.quality["sunspec_inverter"]["energy"] == "not_available"
    assert values.fields["sunspec_inverter"]["power"] == 0
    assert values.fields["sunspec_inverter_6"]["power"] == 0  # 101, 102, 103, 111-113 are all "inverter"
    assert "energy_import" in values.quality["sunspec_ac_meter_4"]


@needs_profile_fields
def test_every_shipped_model_makes_a_valid_profile():
    smap = walk(register_reader(every_model_image()), read_common=False).result
    profile = profile_for(smap)  # the profile validator checks names, scale factors, overlaps, enums, bits
    assert "power" in profile.fields()["sunspec_inverter_6"] and "inverter_6_W_SF" not in profile.fields()["sunspec_inverter_6"]


# -- discovery over Modbus TCP -----------------------------------------------------------------------------------


class ExceptionAnswer(Exception):
    """The device answered with a Modbus exception."""


async def _discover_over_tcp(port: int, **kwargs):
    from pymodbus.client import AsyncModbusTcpClient

    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    await client.connect()
    try:
        async def read_holding(address: int, count: int) -> list[int]:
            answer = await client.read_holding_registers(address, count=count, device_id=1)
            if answer.isError():
                raise ExceptionAnswer(f"exception code {getattr(answer, 'exception_code', '?')}")
            return list(answer.registers)

        return await discover(read_holding, **kwargs)
    finally:
        client.close()


@pytest.mark.integration
@pytest.mark.parametrize("base", [40000, 0, 50000])
def test_discovery_over_tcp(base):
    with sunspec_in_thread(base=base) as sim:
        smap = asyncio.run(_discover_over_tcp(sim.port))
        served = list(sim.served)
    assert smap.base == base and smap.complete and smap.model_ids == [1, 103]
    assert smap.common["Md"] == "TestInverter-1"
    assert served == [(base, 2), (base + 2, 2), (base + 70, 2), (base + 122, 2), (base + 4, 66)]
    assert all(p.answer == "exception: exception code 2" for p in smap.probes[:-1])
    values = _poll(point_specs_for(smap), fixture_image(base))
    assert values.fields["sunspec_inverter"]["power"] == 2970


@pytest.mark.integration
def test_discovery_over_tcp_without_sunspec():
    with sunspec_in_thread({a: 0 for a in range(100)}) as sim, pytest.raises(SunSpecNotFound) as caught:
        asyncio.run(_discover_over_tcp(sim.port))
    assert str(caught.value) == ("no SunS marker: 40000: exception: exception code 2; 0: 0x0000 0x0000; "
                                 "50000: exception: exception code 2")


def test_a_device_that_does_not_answer_is_not_reported_as_not_sunspec():
    calls = []

    async def silent(address: int, count: int) -> list[int]:
        calls.append(address)
        raise TimeoutError("no answer within 1 s")

    with pytest.raises(TimeoutError):
        asyncio.run(discover(silent))
    assert calls == [40000]


def test_discover_with_a_plain_async_reader():
    regs = fixture()

    async def read(address: int, count: int) -> list[int]:
        values = register_reader(regs)(address, count)
        if values is None:
            raise ExceptionAnswer("exception code 2")
        return values

    smap = asyncio.run(discover(read, read_common=False))
    assert smap.model_ids == [1, 103] and dict(smap.common) == {}


def test_which_failures_mean_no_answer_is_the_callers_choice():
    class LinkDown(Exception):
        pass

    async def down(address: int, count: int) -> list[int]:
        raise LinkDown("gateway offline")

    with pytest.raises(LinkDown):
        asyncio.run(discover(down, no_answer=(LinkDown,)))
    with pytest.raises(SunSpecNotFound, match="40000: exception: gateway offline; 0: exception: gateway offline"):
        asyncio.run(discover(down, no_answer=()))
