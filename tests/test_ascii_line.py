"""Generic ASCII line sensors: settings validated with key paths, lines decoded in any split, junk survived."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.serial.ascii_line import AsciiLineDecoder, AsciiLineSettings
from edge_agent.serial.base import Rejected, Sample
from wire.config import ConfigError, convert

WEATHER = {
    # a hobby weather station: "T=21.4C H=45% P=1013.2hPa"
    "regex": r"^T=(?P<temperature>-?\d+(?:\.\d+)?)C H=(?P<humidity>\d+)% P=(?P<pressure>\d+(?:\.\d+)?)hPa$",
    "fields": [
        {"group": "temperature", "unit": "°C"},
        {"group": "humidity", "type": "int", "unit": "%"},
        {"group": "pressure", "name": "pressure_pa", "scale": 100, "unit": "Pa"},
    ],
}
WXT = {
    # Vaisala WXT5x0-style composite message; the station writes "#" for a value it could not measure
    "regex": r"^0R0,Dm=(?P<wind_dir>[^D,]*)D,Sm=(?P<wind_speed>[^M,]*)M,Ta=(?P<temperature>[^C,]*)C,"
             r"Ua=(?P<humidity>[^P,]*)P,Pa=(?P<pressure>[^H,]*)H$",
    "fields": [{"group": "wind_dir", "type": "int", "unit": "°"}, {"group": "wind_speed", "unit": "m/s"},
               {"group": "temperature", "unit": "°C"}, {"group": "humidity", "unit": "%RH"},
               {"group": "pressure", "unit": "hPa"}],
    "terminator": "crlf",
}
LOGGER = {
    # a data logger's CSV line with its own clock in local time
    "regex": r"^(?P<ts>[^;]+);(?P<temperature>[^;]*);(?P<pump>[^;]*)(?:;(?P<note>.*))?$",
    "fields": [{"group": "pump", "type": "bool"}, {"group": "note", "type": "str"}],
    "time": {"group": "ts", "format": "%Y-%m-%d %H:%M:%S", "timezone": "Europe/Berlin"},
}


def make(raw: dict) -> AsciiLineSettings:
    return convert(raw, AsciiLineSettings, "agent.toml")


def run(decoder: AsciiLineDecoder, *chunks: bytes):
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
        assert len(decoder._buf) <= decoder.max_buffer
    return events + decoder.flush()


def decode(raw: dict, data: bytes):
    return run(AsciiLineDecoder(make(raw)), data)


def samples(events) -> list[Sample]:
    return [e for e in events if isinstance(e, Sample)]


def rejections(events) -> list[tuple[str, int, int]]:
    return [(e.reason, e.offset, e.length) for e in events if isinstance(e, Rejected)]


def ns(*args) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp()) * 10**9


# --- realistic lines ----------------------------------------------------------------------------------------------

def test_weather_station():
    events = decode(WEATHER, b"T=21.4C H=45% P=1013.2hPa\nT=-3C H=99% P=987hPa\n")
    first, second = samples(events)
    assert first.fields == {"temperature": 21.4, "humidity": 45, "pressure_pa": 101320.0}
    assert type(first.fields["humidity"]) is int and type(first.fields["pressure_pa"]) is float
    assert first.units == {"temperature": "°C", "humidity": "%", "pressure_pa": "Pa"}
    assert first.quality == {} and first.time_ns is None and first.measurement is None and first.tags == {}
    assert second.fields == {"temperature": -3.0, "humidity": 99, "pressure_pa": 98700.0}


def test_vaisala_composite_with_invalid_values():
    data = (b"0R0,Dm=283D,Sm=1.0M,Ta=23.6C,Ua=14.2P,Pa=1026.6H\r\n"
            b"0R0,Dm=#D,Sm=#.#M,Ta=23.5C,Ua=14.3P,Pa=1026.5H\r\n"
            b"0R1,Dn=236D,Dm=283D\r\n")
    events = decode(WXT, data)
    good, partial = samples(events)
    assert good.fields == {"wind_dir": 283, "wind_speed": 1.0, "temperature": 23.6, "humidity": 14.2, "pressure": 1026.6}
    assert partial.fields == {"temperature": 23.5, "humidity": 14.3, "pressure": 1026.5}
    assert partial.quality == {"wind_dir": "malformed", "wind_speed": "malformed"}
    assert "wind_dir" not in partial.units
    (no_match,) = [e for e in events if isinstance(e, Rejected)]
    assert (no_match.reason, no_match.offset, no_match.length) == ("no_match", 98, 19)
    assert no_match.detail == "line '0R1,Dn=236D,Dm=283D' does not match the regex"


def test_padded_values_are_stripped():
    raw = {"regex": r"RH=(?P<humidity>[ \d.]+)%RH T=(?P<temperature>[ \d.+-]+)'C"}
    (sample,) = samples(decode(raw, b"RH= 45.3 %RH T= 21.4 'C\r\n"))
    assert sample.fields == {"humidity": 45.3, "temperature": 21.4}


def test_device_time_in_a_zone():
    events = decode(LOGGER, b"2024-05-01 12:00:00;21.4;ON;door open\n2024-01-15 08:30:00;-1.5;off\n")
    summer, winter = samples(events)
    assert summer.time_ns == ns(2024, 5, 1, 10, 0, 0)  # CEST, UTC+2
    assert winter.time_ns == ns(2024, 1, 15, 7, 30, 0)  # CET, UTC+1
    assert summer.fields == {"temperature": 21.4, "pump": True, "note": "door open"}
    assert winter.fields == {"temperature": -1.5, "pump": False}  # the optional group did not take part
    assert winter.quality == {}


def test_a_time_that_does_not_parse_leaves_the_gateway_clock():
    (sample,) = samples(decode(LOGGER, b"2024-13-01 12:00:00;21.4;maybe\n"))
    assert sample.time_ns is None
    assert sample.fields == {"temperature": 21.4}
    assert sample.quality == {"ts": "malformed", "pump": "malformed"}


@pytest.mark.parametrize(("fmt", "text", "want"), [
    ("epoch", "1714557600", ns(2024, 5, 1, 10, 0, 0)),
    ("epoch", "1714557600.25", ns(2024, 5, 1, 10, 0, 0) + 250_000_000),
    ("epoch_ms", "1714557600250", ns(2024, 5, 1, 10, 0, 0) + 250_000_000),
    ("epoch_us", "1714557600000001", ns(2024, 5, 1, 10, 0, 0) + 1000),
    ("epoch_ns", "1714557600000000007", ns(2024, 5, 1, 10, 0, 0) + 7),
    ("%Y-%m-%dT%H:%M:%S%z", "2024-05-01T12:00:00+0200", ns(2024, 5, 1, 10, 0, 0)),
    ("%d.%m.%Y %H:%M:%S.%f", "01.05.2024 10:00:00.5", ns(2024, 5, 1, 10, 0, 0) + 500_000_000),
    ("epoch", "-5", None), ("epoch", "12x", None), ("epoch", "1e30", None),
    ("%Y-%m-%d %H:%M:%S", "1969-12-31 23:59:59", None),
])
def test_time_formats(fmt, text, want):
    raw = {"regex": r"^(?P<when>[^|]+)\|(?P<v>.*)$", "time": {"group": "when", "format": fmt}}
    (sample,) = samples(decode(raw, f"{text}|1\n".encode()))
    assert sample.time_ns == want
    assert sample.quality == ({} if want is not None else {"when": "malformed"})


def test_offset_time_zone():
    raw = {"regex": r"^(?P<when>[^|]+)\|(?P<v>.*)$",
           "time": {"group": "when", "format": "%Y-%m-%d %H:%M", "timezone": "-05:30"}}
    (sample,) = samples(decode(raw, b"2024-05-01 04:30|1\n"))
    assert sample.time_ns == ns(2024, 5, 1, 10, 0, 0)


@pytest.mark.parametrize(("field", "text", "want"), [
    ({"type": "float"}, "21.4", 21.4),
    ({"type": "float"}, " +.5 ", 0.5),
    ({"type": "float"}, "1e3", 1000.0),
    ({"type": "float"}, "nan", None),
    ({"type": "float"}, "inf", None),
    ({"type": "float"}, "1e400", None),
    ({"type": "float"}, "1_000", None),
    ({"type": "float"}, "", None),
    ({"type": "float"}, "#.#", None),
    ({"type": "float", "scale": 0.1}, "214", 21.4),  # decimal arithmetic: not 21.400000000000002
    ({"type": "float", "offset": -273.15}, "294.55", 21.4),
    ({"type": "float", "scale": 1e300}, "1e300", None),  # overflows to inf
    ({"type": "float", "decimal": ","}, "21,4", 21.4),
    ({"type": "float", "decimal": ","}, "1.021,4", None),
    ({"type": "int"}, "-42", -42),
    ({"type": "int", "scale": 10, "offset": -5}, "3", 25),
    ({"type": "int"}, "4.0", None),
    ({"type": "int"}, "99999999999999999999", None),  # does not fit int64 on the wire
    ({"type": "bool"}, "ON", True),
    ({"type": "bool"}, "no", False),
    ({"type": "bool"}, "1", True),
    ({"type": "bool"}, "maybe", None),
    ({"type": "str"}, " as is ", " as is "),
])
def test_conversions(field, text, want):
    raw = {"regex": r"^v=(?P<v>.*)$", "fields": [{"group": "v", **field}]}
    (sample,) = samples(decode(raw, f"v={text}\n".encode()))
    if want is None:
        assert sample.fields == {} and sample.quality == {"v": "malformed"}
    else:
        assert sample.fields == {"v": want} and type(sample.fields["v"]) is type(want)


def test_bytes_outside_the_encoding():
    raw = {"regex": r"T=(?P<t>[\d.]+)\S* H=(?P<h>\S+)"}
    (sample,) = samples(decode(raw, b"T=21.4\xb0C H=4\xff5\n"))  # latin-1 degree sign, a flipped byte in H
    assert sample.fields == {"t": 21.4} and sample.quality == {"h": "malformed"}
    latin = {"regex": r"T=(?P<t>[\d.]+)°C", "encoding": "latin-1"}
    (sample,) = samples(decode(latin, b"T=21.4\xb0C\n"))
    assert sample.fields == {"t": 21.4}


# --- lines: terminators, limits, offsets --------------------------------------------------------------------------

LINES = [b"T=21.4C H=45% P=1013.2hPa", b"garbage", b"", b"   ", b"T=21.5C H=44% P=1013.1hPa"]


@pytest.mark.parametrize(("terminator", "sep"), [("lf", b"\n"), ("lf", b"\r\n"), ("crlf", b"\r\n"), ("cr", b"\r"),
                                                 ("cr", b"\r\n"), ("\n", b"\n"), ("\r\n", b"\r\n"), ("\r", b"\r")])
def test_terminators(terminator, sep):
    data = sep.join(LINES) + sep
    events = decode({**WEATHER, "terminator": terminator}, data)
    assert [s.fields["temperature"] for s in samples(events)] == [21.4, 21.5]
    offset = len(LINES[0]) + len(sep)
    assert rejections(events) == [("no_match", offset, 7)]  # blank lines are skipped silently


def test_crlf_mode_keeps_a_bare_lf_inside_the_line():
    events = decode({**WEATHER, "terminator": "crlf"}, b"T=21.4C H=45% P=1013.2hPa\nT=1C H=1% P=1hPa\r\n")
    assert samples(events) == [] and rejections(events) == [("no_match", 0, 42)]
    # and LF-only lines never end in crlf mode: the last is incomplete at the end of the stream
    events = decode({**WEATHER, "terminator": "crlf"}, b"T=21.4C H=45% P=1013.2hPa\n")
    assert rejections(events) == [("incomplete", 0, 26)]


def test_too_long_lines_are_skipped_to_the_next_terminator():
    raw = {"regex": r"^v=(?P<v>\d+)$", "max_line": 8}
    data = b"v=123456\n" + b"v=1234567\n" + b"x" * 100 + b"\nv=1\n"
    events = decode(raw, data)
    assert [s.fields for s in samples(events)] == [{"v": 123456}, {"v": 1}]
    assert rejections(events) == [("too_long", 9, 9), ("too_long", 19, 9)]
    too_long = next(e for e in events if isinstance(e, Rejected))
    assert "max_line = 8" in too_long.detail


def test_max_line_does_not_count_the_terminator():
    for terminator, sep in (("lf", b"\r\n"), ("crlf", b"\r\n"), ("cr", b"\r\n"), ("lf", b"\n")):
        raw = {"regex": r"^v=(?P<v>\d+)$", "max_line": 8, "terminator": terminator}
        data = b"v=123456" + sep + b"v=7" + sep
        for cut in range(len(data) + 1):
            events = run(AsciiLineDecoder(make(raw)), data[:cut], data[cut:])
            assert [s.fields for s in samples(events)] == [{"v": 123456}, {"v": 7}], (terminator, sep, cut)


def test_flush():
    decoder = AsciiLineDecoder(make(WEATHER))
    assert decoder.feed(b"T=21.4C H=45% P=1013.2hPa\nT=21.5C") != []
    (event,) = decoder.flush()
    assert (event.reason, event.offset, event.length) == ("incomplete", 26, 7)
    assert decoder.flush() == []
    assert decoder.feed(b"  \n") == [] and decoder.feed(b"\r\n  ") == [] and decoder.flush() == []
    # offsets go on counting over the whole stream
    assert rejections(decoder.feed(b"nope\n")) == [("no_match", 40, 4)]


MIXED = (b"T=21.4C H=45% P=1013.2hPa\r\n" + b"noise \xff\xfe\n" + b"\n\r\n" + b"T=1" + b"0" * 600 + b"\r\n"
         + b"T=21.5C H=44% P=1013.1hPa\n" + b"T=x" + b"y" * 700 + b"\nT=21.6C H=43% P=1013hPa\r\nT=21")


@pytest.mark.parametrize("terminator", ["lf", "crlf", "cr"])
def test_every_split_gives_the_same_events(terminator):
    raw = {**WEATHER, "terminator": terminator}
    whole = decode(raw, MIXED)
    if terminator == "lf":
        assert [s.fields["temperature"] for s in samples(whole)] == [21.4, 21.5, 21.6]
        assert [r[0] for r in rejections(whole)] == ["no_match", "too_long", "too_long", "incomplete"]
    for cut in range(len(MIXED) + 1):
        assert run(AsciiLineDecoder(make(raw)), MIXED[:cut], MIXED[cut:]) == whole, cut
    assert run(AsciiLineDecoder(make(raw)), *(MIXED[i:i + 1] for i in range(len(MIXED)))) == whole


# --- junk ---------------------------------------------------------------------------------------------------------

JUNKY = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"T=21.4C H=45% P=1013.2hPa", b"x" * 37, b"\xff", b"\x00",
                                  b"T=", b"C H=", b"9", b"% P=", b"hPa"]), max_size=60).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(st.binary(max_size=400), JUNKY), cuts=st.lists(st.integers(0, 2000), max_size=10),
       terminator=st.sampled_from(["lf", "crlf", "cr"]))
def test_junk_is_bounded_and_never_raises(data, cuts, terminator):
    raw = {**WEATHER, "terminator": terminator, "max_line": 40}
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    events = run(AsciiLineDecoder(make(raw)), *(data[a:b] for a, b in itertools.pairwise(points)))
    assert events == decode(raw, data)
    offsets = [e.offset for e in events if isinstance(e, Rejected)]
    assert offsets == sorted(offsets)
    for event in events:
        if isinstance(event, Rejected):
            assert event.reason in ("no_match", "too_long", "incomplete")
            assert 0 <= event.offset < len(data) and event.length > 0
            assert event.offset + min(event.length, 41) <= len(data)
        else:
            assert set(event.fields) | set(event.quality) <= {"temperature", "humidity", "pressure_pa"}


# --- settings -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "error"), [
    ({"regex": r"T=(?P<t>[\d.]+C"},
     'regex: not a valid regular expression: missing ), unterminated subpattern at position 2 (near "T=(?P<t>[\\d.")'),
    ({"regex": r"T=(?P<t>\d+)(?P<t>\d)"}, "regex: not a valid regular expression: redefinition of group name 't' as "
                                          "group 2; was group 1 at position 16"),
    ({"regex": r"T=(\d+)"}, "regex: has no named group (?P<name>...) for a value: nothing to report"),
    ({"regex": ""}, "regex: "),
    ({"regex": r"(?P<t>\d)", "fields": [{"group": "h", "type": "int"}]},
     "fields[0].group: no group (?P<h>...) in the regex (its named groups: t)"),
    ({"regex": r"(?P<t>\d)", "fields": [{"group": "t"}, {"group": "t"}]}, "fields[1].group: group t is listed twice"),
    ({"regex": r"(?P<t>\d)", "fields": [{"unit": "C"}]},
     "fields[0].group: required key is missing: expected the name of a group (?P<name>...) of the regex"),
    ({"regex": r"(?P<t>\d)", "fields": [{"group": "t", "unti": "C"}]}, 'fields[0].unti: unknown key (did you mean "unit"?)'),
    ({"regex": r"(?P<t>\d)", "fields": [{"group": "t", "type": "double"}]},
     'fields[0].type: expected one of "bool", "float", "int", "str", got "double"'),
    ({"regex": r"(?P<t>\d)", "fields": [{"group": "t", "type": "bool", "scale": 2}]},
     'fields[0].scale: only for int and float fields, not type = "bool"'),
    ({"regex": r"(?P<t>\d)", "fields": [{"group": "t", "type": "int", "offset": 0.5}]},
     'fields[0].offset: must be a whole number for an int field, got 0.5 (or use type = "float")'),
    ({"regex": r"(?P<t>\d)", "fields": [{"group": "t", "scale": float("nan")}]}, "fields[0].scale: expected a finite number, got nan"),
    ({"regex": r"(?P<t>\d)", "fields": [{"group": "t", "type": "int", "decimal": ","}]},
     'fields[0].decimal: only for float fields, not type = "int"'),
    ({"regex": r"(?P<a>\d)(?P<b>\d)", "fields": [{"group": "a", "name": "b"}]},
     'fields[0].name: field name "b" is already used by group b'),
    ({"regex": r"(?P<a>\d)(?P<b>\d)", "fields": [{"group": "a", "name": "x"}, {"group": "b", "name": "x"}]},
     'fields[1].name: field name "x" is already used by group a'),
    ({"regex": r"(?P<a>\d)(?P<ts>\d+)", "fields": [{"group": "a", "name": "ts"}], "time": {"group": "ts", "format": "epoch"}},
     'fields[0].name: field name "ts" is already used by the time group'),
    ({"regex": r"(?P<a>\d)(?P<ts>\d+)", "fields": [{"group": "ts"}], "time": {"group": "ts", "format": "epoch"}},
     "fields[0].group: ts is the time group (time.group), not a field"),
    ({"regex": r"(?P<a>\d)", "time": {"group": "ts", "format": "epoch"}},
     "time.group: no group (?P<ts>...) in the regex (its named groups: a)"),
    ({"regex": r"(?P<ts>\d+)", "time": {"group": "ts", "format": "epoch"}},
     "regex: has no named group (?P<name>...) for a value: nothing to report"),
    ({"regex": r"(?P<a>\d) (?P<ts>\S+)", "time": {"group": "ts", "format": "%H:%M:%S"}},
     "time.format: the format must give the full date (e.g. %Y-%m-%d): a time of day alone cannot stamp a reading"),
    ({"regex": r"(?P<a>\d) (?P<ts>\S+)", "time": {"group": "ts", "format": "%s"}},
     "time.format: not a strptime format: 's' is a bad directive in format '%s'"),
    ({"regex": r"(?P<a>\d) (?P<ts>\S+)", "time": {"group": "ts", "format": "iso"}}, 'time.format: "iso" has no % directive'),
    ({"regex": r"(?P<a>\d) (?P<ts>\S+)", "time": {"group": "ts", "format": "epoch", "timezone": "Mars/Olympus"}},
     'time.timezone: unknown time zone "Mars/Olympus"'),
    ({"regex": r"(?P<a>\d) (?P<ts>\S+)", "time": {"group": "ts", "format": "epoch", "timezone": "+24:00"}},
     'time.timezone: time zone offset "+24:00" is out of range'),
    ({"regex": r"(?P<a>\d)", "time": {"group": "a"}}, "time.format: required key is missing"),
    ({"regex": r"(?P<a>\d)", "encoding": "utf-16"}, 'encoding: "utf-16" is not an ASCII-compatible text encoding'),
    ({"regex": r"(?P<a>\d)", "encoding": "klingon"}, 'encoding: unknown encoding "klingon"'),
    ({"regex": r"(?P<a>\d)", "encoding": "base64"}, 'encoding: "base64" is not an ASCII-compatible text encoding'),
    ({"regex": r"(?P<a>\d)", "terminator": "\n\r"}, "terminator: expected \"lf\", \"crlf\" or \"cr\""),
    ({"regex": r"(?P<a>\d)", "max_line": 0}, "max_line: expected an integer 1..65536, got 0"),
    ({"regex": r"(?P<a>\d)", "fields": {"a": {}}}, "fields: expected a list of tables, got a table"),
    ({"regex": r"(?P<a>\d)", "sep": ";"}, "sep: unknown key"),
])
def test_settings_errors_name_the_key(raw, error):
    with pytest.raises(ConfigError) as exc:
        make(raw)
    assert str(exc.value).startswith("agent.toml: " + error), str(exc.value)


def test_settings_defaults():
    s = make({"regex": r"(?P<a>\d)"})
    assert (s.terminator, s.encoding, s.max_line, s.fields, s.time) == ("lf", "utf-8", 512, [], None)
    for raw in (WEATHER, WXT, LOGGER):
        make(raw)
