"""Line protocol encoding: exact bytes for the tricky cases, and a property test against a real influxd."""

from __future__ import annotations

import math
import re
import sys
from enum import IntEnum

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.influx.lineproto import TIME_MAX, TIME_MIN, LineProtocolError, encode_line
from labkit.influxd import InfluxdServer, quote_ident
from wire.names import bad_character
from wire.schema import Batch, ConfigName, Reading, decode_batch, encode_batch

T = 1_700_000_000_123_456_789


# -- exact output --------------------------------------------------------------------------------------------


def test_basic_line_with_sorted_tags_and_typed_fields() -> None:
    line = encode_line("power", {"site": "a", "phase": "L1"}, {"w": 1.5, "n": 3, "ok": True, "s": "x"}, T)
    assert line == b'power,phase=L1,site=a w=1.5,n=3i,ok=true,s="x" 1700000000123456789'


def test_fields_keep_their_order_and_false_is_false() -> None:
    assert encode_line("m", {}, {"b": False, "a": 0}, 0) == b"m b=false,a=0i 0"


def test_measurement_escapes_comma_and_space_only() -> None:
    assert encode_line("a,b c=d", {}, {"v": 1.0}, 1) == b"a\\,b\\ c=d v=1.0 1"


def test_tag_keys_values_and_field_keys_escape_comma_equals_space() -> None:
    line = encode_line("m", {"k,1 =": "v,1 =x"}, {"f,1 =": 2.0}, 1)
    assert line == b"m,k\\,1\\ \\==v\\,1\\ \\=x f\\,1\\ \\==2.0 1"


def test_string_values_escape_quote_and_backslash() -> None:
    assert encode_line("m", {}, {"s": 'say "hi" \\o/'}, 1) == b'm s="say \\"hi\\" \\\\o/" 1'


def test_backslash_inside_a_name_is_kept_as_is() -> None:
    assert encode_line("m\\x", {"t": "a\\b"}, {"f\\g": 1.0}, 1) == b"m\\x,t=a\\b f\\g=1.0 1"


def test_quotes_and_hash_inside_names_need_no_escape() -> None:
    assert encode_line('"m#"', {"t": '"q"'}, {'"f"': 1.0}, 1) == b'"m#",t="q" "f"=1.0 1'


def test_empty_tag_values_are_skipped() -> None:
    assert encode_line("m", {"a": "", "b": "1"}, {"v": 1.0}, 1) == b"m,b=1 v=1.0 1"
    assert encode_line("m", {"a": ""}, {"v": 1.0}, 1) == b"m v=1.0 1"


def test_unicode_is_utf8() -> None:
    assert encode_line("température", {"lieu": "Zürich"}, {"°C": 21.5}, 1) == (
        "température,lieu=Zürich °C=21.5 1".encode()
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1, "0.1"),
        (1 / 3, "0.3333333333333333"),
        (-0.0, "-0.0"),
        (1e16, "1e16"),
        (1.5e-07, "1.5e-7"),
        (1e-05, "0.00001"),
        (sys.float_info.max, "1.7976931348623157e308"),
        (5e-324, "5e-324"),
        (42.0, "42.0"),
    ],
)
def test_floats_round_trip_exactly(value: float, text: str) -> None:
    """A reading of floats only is written by msgspec's JSON encoder (its spelling of the exponent); with any other
    value beside them, value by value with repr() (Python's spelling). Both read back as the same float64."""
    line = encode_line("m", {}, {"v": value}, 1)
    assert line == f"m v={text} 1".encode()
    assert float(line.split(b"=")[1].split(b" ")[0]) == value
    mixed = encode_line("m", {}, {"v": value, "n": 1}, 1)
    assert mixed == f"m v={value!r},n=1i 1".encode()


@given(st.dictionaries(st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1,
                               max_size=8).filter(lambda n: n != "time" and not n.endswith("\\")),
                       st.floats(), min_size=1, max_size=12))
def test_a_reading_of_floats_is_written_as_value_by_value(fields: dict[str, float]) -> None:
    """The JSON path (every value a float, keys that need no escape) and the value-by-value path give the same
    fields: same keys in the same order, the same float64 values, NaN and infinities left out."""
    from collector.influx import lineproto

    finite = {k: v for k, v in fields.items() if math.isfinite(v)}
    try:
        line = encode_line("m", {}, fields, 1).decode()
    except LineProtocolError as exc:
        assert not finite or "backslash" in str(exc), exc
        return
    slow = f"m{lineproto._fields_text(fields, 'm')} 1"
    assert _parsed(line) == _parsed(slow)
    assert list(_parsed(line).items()) == [(lineproto._key(k, "field key"), v) for k, v in finite.items()]


def _parsed(line: str) -> dict[str, float]:
    """The fields of a line of floats whose keys hold no escaped comma (what this test generates and checks)."""
    fields_text = line[2:line.rindex(" ")]
    out = {}
    for part in re.split(r"(?<!\\),", fields_text):
        key, _, value = part.rpartition("=")
        out[key] = float(value)
    return out


@pytest.mark.parametrize("value", [-(2**63), 2**63 - 1, 0, -1])
def test_int64_limits(value: int) -> None:
    assert encode_line("m", {}, {"v": value}, 1) == f"m v={value}i 1".encode()


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_ints_beyond_int64_are_refused(value: int) -> None:
    with pytest.raises(LineProtocolError, match="64-bit"):
        encode_line("m", {}, {"v": value}, 1)


def test_non_finite_floats_are_dropped() -> None:
    fields = {"a": math.nan, "b": 2.0, "c": math.inf, "d": -math.inf}
    assert encode_line("m", {}, fields, 1) == b"m b=2.0 1"


def test_no_storable_field_is_an_error() -> None:
    with pytest.raises(LineProtocolError, match="no storable field"):
        encode_line("m", {"t": "x"}, {"a": math.nan, "b": math.inf}, 1)
    with pytest.raises(LineProtocolError, match="no storable field"):
        encode_line("m", {}, {}, 1)


def test_int_and_float_subclasses() -> None:
    class Phase(IntEnum):
        L2 = 2

    class F(float):
        pass

    assert encode_line("m", {}, {"p": Phase.L2, "f": F(0.5), "nan": F("nan")}, 1) == b"m p=2i,f=0.5 1"


@pytest.mark.parametrize(
    ("measurement", "tags", "fields", "match"),
    [
        ("", {}, {"v": 1.0}, "measurement is empty"),
        ("m\n", {}, {"v": 1.0}, "control character"),
        ("m", {"t": "a\nb"}, {"v": 1.0}, "control character"),
        ("m", {"t\r": "a"}, {"v": 1.0}, "control character"),
        ("m", {}, {"f\t": 1.0}, "control character"),
        ("m", {}, {"f\x00": 1.0}, "control character"),
        ("m\x85", {}, {"v": 1.0}, "control character"),
        ("m", {"": "x"}, {"v": 1.0}, "tag key is empty"),
        ("m", {}, {"": 1.0}, "field key is empty"),
        ("m\\", {}, {"v": 1.0}, "backslash"),
        ("m", {"t": "x\\"}, {"v": 1.0}, "backslash"),
        ("m", {"t\\": "x"}, {"v": 1.0}, "backslash"),
        ("m", {}, {"v\\": 1.0}, "backslash"),
        ("a\\ b", {}, {"v": 1.0}, "backslash"),
        ("m", {"t": "a\\,b"}, {"v": 1.0}, "backslash"),
        ("m", {"t": "a\\=b"}, {"v": 1.0}, "backslash"),
        ("m", {"t\\\\ ": "x"}, {"v": 1.0}, "backslash"),
        ("m", {}, {"v\\ w": 1.0}, "backslash"),
        ("m", {}, {'\\"': 1.0}, "backslash"),
        ("#m", {}, {"v": 1.0}, "comment"),
        ("m", {"time": "x"}, {"v": 1.0}, '"time" is reserved'),
        ("m", {}, {"time": 1.0}, '"time" is reserved'),
        ("m", {}, {"s": "two\nlines"}, "newline"),
        ("m", {}, {"v": [1]}, "unsupported type"),
        ("m", {}, {"v": None}, "unsupported type"),
        ("m", {"t": 5}, {"v": 1.0}, "must be a string"),
        ("m\ud800", {}, {"v": 1.0}, "UTF-8"),
    ],
)
def test_refused(measurement: str, tags: dict, fields: dict, match: str) -> None:
    with pytest.raises(LineProtocolError, match=match):
        encode_line(measurement, tags, fields, 1)


def test_time_range() -> None:
    assert encode_line("m", {}, {"v": 1.0}, TIME_MIN).endswith(b" -9223372036854775806")
    assert encode_line("m", {}, {"v": 1.0}, TIME_MAX).endswith(b" 9223372036854775806")
    for bad in (TIME_MIN - 1, TIME_MAX + 1):
        with pytest.raises(LineProtocolError, match="outside"):
            encode_line("m", {}, {"v": 1.0}, bad)
    with pytest.raises(LineProtocolError, match="integer"):
        encode_line("m", {}, {"v": 1.0}, 1.5)  # type: ignore[arg-type]


def test_refusal_is_not_cached_as_success() -> None:
    for _ in range(2):
        with pytest.raises(LineProtocolError):
            encode_line("m", {}, {"time": 1.0}, 1)


def test_encoding_is_fast_enough() -> None:
    """The collector encodes every reading: keep one line well below 10 µs on a typical core."""
    import time

    tags = {"gateway": "gw-0042", "device": "meter-7", "phase": "L1", "site": "north"}
    fields = {"voltage": 230.12, "current": 4.27, "power": 982.5, "energy": 123456, "ok": True}
    n = 20_000
    start = time.perf_counter()
    for i in range(n):
        encode_line("power", tags, fields, T + i)
    per_line = (time.perf_counter() - start) / n
    assert per_line < 20e-6, f"{per_line * 1e6:.1f} µs per line"


# -- property: the wire schema and the encoder agree on what a name may hold ------------------------------------

# Every character class the rules care about, plus any other character a msgpack string can carry.
_EDGE_CHARACTERS = st.sampled_from(
    ["\x00", "\t", "\n", "\r", "\x1b", "\x1f", "\x7f", "\x80", "\x85", "\x9b", "\x9f", "\xa0", "\u2028", "\ufeff",
     "\\", ",", "=", " ", '"', "#", "é", "😀"]
)
_SOME_NAME = st.one_of(
    st.sampled_from(["time", "#m", "m\\", "a\\,b", "a\\ b", "ok"]),
    st.text(st.one_of(_EDGE_CHARACTERS, st.characters(codec="utf-8")), min_size=1, max_size=12),
)
_ROLES = ("measurement", "tag key", "tag value", "field key")


def _line_only_rule(name: str, role: str) -> bool:
    """The rules encode_line adds for line protocol alone (its module docstring), not about characters."""
    backslash = name.endswith("\\") or any(name[i] == "\\" and name[i + 1] in ',= "' for i in range(len(name) - 1))
    return backslash or (role == "measurement" and name.startswith("#")) or (role.endswith("key") and name == "time")


def _schema_accepts(name: str, role: str) -> bool:
    reading = {
        "measurement": Reading("dev", name, 1, {"v": 1.0}),
        "tag key": Reading("dev", "m", 1, {"v": 1.0}, {name: "x"}),
        "tag value": Reading(name, "m", 1, {"v": 1.0}),  # the device id: the collector's "device" tag value
        "field key": Reading("dev", "m", 1, {name: 1.0}),
    }[role]
    try:
        decode_batch(encode_batch(Batch("gw-1", 1, 1, [reading])))
    except msgspec.ValidationError:
        return False
    return True


def _encoder_accepts(name: str, role: str) -> bool:
    point = {
        "measurement": (name, {}, {"v": 1.0}),
        "tag key": ("m", {name: "x"}, {"v": 1.0}),
        "tag value": ("m", {"device": name}, {"v": 1.0}),
        "field key": ("m", {}, {name: 1.0}),
    }[role]
    try:
        encode_line(*point, 1)
    except LineProtocolError:
        return False
    return True


@settings(max_examples=500)
@given(name=_SOME_NAME)
def test_the_schema_and_the_encoder_apply_one_character_rule(name: str) -> None:
    """Whatever name the wire schema accepts, encode_line accepts in every role, except for the documented
    line-protocol rules; whatever name encode_line refuses for a character, the schema refuses too. Before, the
    schema let the C1 controls (U+0080-U+009F) through and the encoder did not: acknowledged, never stored."""
    clean = bad_character(name) is None
    for role in _ROLES:
        schema, encoder = _schema_accepts(name, role), _encoder_accepts(name, role)
        assert schema == clean, (role, name)
        assert encoder == (clean and not _line_only_rule(name, role)), (role, name)


@pytest.mark.parametrize("name", ["a\ud800", "\udfff", "x\udc80y"])
def test_lone_surrogates_are_refused_by_the_config_schema_and_the_encoder_alike(name: str) -> None:
    # A msgpack string cannot carry one (it is UTF-8), but a name made in Python can (e.g. bytes decoded with
    # errors="surrogateescape"): the one rule refuses it, with the same words in both places.
    assert bad_character(name) is not None
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(name, ConfigName)
    for role in _ROLES:
        with pytest.raises(LineProtocolError, match=r"lone surrogate U\+D[89A-F][0-9A-F]{2} \(not encodable as UTF-8\)"):
            encode_line(*{"measurement": (name, {}, {"v": 1.0}), "tag key": ("m", {name: "x"}, {"v": 1.0}),
                          "tag value": ("m", {"t": name}, {"v": 1.0}), "field key": ("m", {}, {name: 1.0})}[role], 1)


# -- property: whatever encode_line accepts, a real influxd stores exactly ----------------------------------

# Characters that exercise the escaping rules, plus any printable Unicode.
_SPECIAL = st.sampled_from(list(',= "\\#\'_-.=:;{}[]/é日😀'))
_ANY = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))


def _expressible(name: str) -> bool:
    """What encode_line accepts: no backslash before , = space " or at the end; not "time"."""
    if name == "time" or name.endswith("\\"):
        return False
    return not any(name[i] == "\\" and name[i + 1] in ',= "' for i in range(len(name) - 1))


_NAME = st.text(st.one_of(_SPECIAL, _ANY), min_size=1, max_size=10).filter(_expressible)
_MEASUREMENT = _NAME.filter(lambda s: not s.startswith("#"))
_STRING_VALUE = st.text(
    st.one_of(st.sampled_from(list('"\\ ,=\t\r')), st.characters(codec="utf-8", exclude_categories=("Cs",))),
    max_size=30,
).filter(lambda s: "\n" not in s)
_VALUE = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    _STRING_VALUE,
)
_POINT = st.tuples(
    _MEASUREMENT,
    st.dictionaries(_NAME, st.one_of(_NAME, st.just("")), max_size=4),
    st.dictionaries(_NAME, _VALUE, min_size=1, max_size=4),
    st.integers(min_value=T - 3 * 86400 * 10**9, max_value=T + 3 * 86400 * 10**9),
)


def _read_back(influxd: InfluxdServer, db: str, measurements: list[str]) -> dict[str, dict]:
    query = "; ".join(f"SELECT * FROM {quote_ident(m)} GROUP BY *" for m in measurements)
    found: dict[str, dict] = {}
    for series in influxd.query_series(query, db):
        rows = [dict(zip(series["columns"], values, strict=True)) for values in series["values"]]
        found[series["name"]] = {"tags": series.get("tags") or {}, "rows": rows}
    return found


def _same(expected: object, got: object) -> bool:
    if isinstance(expected, (bool, str)):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, int):
        return type(got) is int and got == expected
    # Go prints integral floats without a fraction ("2", "1e+16" as 10000000000000000): compare as float.
    return isinstance(got, int | float) and not isinstance(got, bool) and float(got) == expected


@pytest.mark.integration
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=st.lists(_POINT, min_size=1, max_size=25, unique_by=lambda p: p[0]))
def test_whatever_is_encoded_is_stored_exactly(influxd: InfluxdServer, points: list) -> None:
    # A database per example: the same field name with another type in an earlier example would conflict.
    db = "prop"
    influxd.create_database(db)
    try:
        body = b"\n".join(encode_line(m, tags, fields, t) for m, tags, fields, t in points)
        influxd.write(body, db)
        found = _read_back(influxd, db, [p[0] for p in points])
    finally:
        influxd.drop_database(db)
    for measurement, tags, fields, t in points:
        assert measurement in found, f"{measurement!r} not stored; stored: {sorted(found)}"
        series = found[measurement]
        assert series["tags"] == {k: v for k, v in tags.items() if v}
        (row,) = series["rows"]
        assert row.pop("time") == t
        assert set(row) == set(fields)
        for key, value in fields.items():
            assert _same(value, row[key]), f"{measurement!r}.{key!r}: wrote {value!r}, read {row[key]!r}"


@pytest.mark.integration
def test_edge_cases_are_stored_exactly(influxd: InfluxdServer, influx_db: str) -> None:
    points = [
        ("a,b c", {"t": "x,y=z w"}, {"f=1": 1.0}, 1),
        ("m\\x\\\\y", {"t": "a\\b\\\\c", "u": "\\\\x"}, {"v\\w x": 2.0}, 2),
        ('"q"', {"'": '"'}, {"s": '\\"\\'}, 3),
        (" lead", {" t ": " v "}, {" f ": -0.0}, 4),
        ("ext", {}, {"lo": -(2**63), "hi": 2**63 - 1, "big": 1.7976931348623157e308}, TIME_MIN),
        ("ext2", {}, {"tiny": 5e-324, "b": False}, TIME_MAX),
        # all floats: msgspec's spelling (1e16, 1.5e-7, 0.00001, 1.7976931348623157e308)
        ("floats", {}, {"a": 1e16, "b": 1.5e-07, "c": 1e-05, "d": sys.float_info.max, "e": 5e-324, "f": -0.0,
                        "g": 0.1, "h": -123456.789e-300}, 5),
    ]
    influxd.write(b"\n".join(encode_line(*p) for p in points), influx_db)
    found = _read_back(influxd, influx_db, [p[0] for p in points])
    for measurement, tags, fields, t in points:
        series = found[measurement]
        assert series["tags"] == tags
        (row,) = series["rows"]
        assert row.pop("time") == t
        assert set(row) == set(fields)
        for key, value in fields.items():
            assert _same(value, row[key]), f"{measurement!r}.{key!r}: wrote {value!r}, read {row[key]!r}"
