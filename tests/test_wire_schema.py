"""Wire format v1: round trips, strictness, and garbage that must end in a typed rejection."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import topics
from wire.config import ConfigError, convert
from wire.envelope import Format, Rejection, WireError, open_plain, seal_plain
from wire.names import bad_character
from wire.schema import Batch, ConfigName, ConfigTagValue, Reading, decode_batch, encode_batch

names = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20
)
gateway_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
field_values = st.one_of(
    st.floats(allow_nan=False),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.text(max_size=30),
)
readings = st.builds(
    Reading,
    device=names,
    measurement=names,
    time_ns=st.integers(min_value=0, max_value=2**63 - 1),
    fields=st.dictionaries(names, field_values, min_size=1, max_size=6),
    tags=st.dictionaries(names, st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=20),
                         max_size=4),
    quality=st.dictionaries(names, st.sampled_from(["not_available", "error", "no_scale_factor"]), max_size=3),
)
batches = st.builds(
    Batch,
    gateway=gateway_ids,
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    sent_ns=st.integers(min_value=0, max_value=2**63 - 1),
    readings=st.lists(readings, max_size=8),
)


@given(batches)
@settings(max_examples=300)
def test_round_trip(batch: Batch) -> None:
    assert open_plain(seal_plain(batch)) == batch


@given(st.binary(max_size=300))
@settings(max_examples=1000)
def test_garbage_is_rejected_with_a_reason(data: bytes) -> None:
    try:
        open_plain(data)
    except WireError as exc:
        assert isinstance(exc.reason, Rejection)


@given(batches, st.data())
@settings(max_examples=200)
def test_truncated_payloads_are_rejected(batch: Batch, data: st.DataObject) -> None:
    payload = seal_plain(batch)
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    with pytest.raises(WireError):
        open_plain(payload[:cut])


def test_format_byte_dispatch() -> None:
    batch = Batch("gw-1", 1, 2, [])
    body = encode_batch(batch)
    assert seal_plain(batch)[0] == Format.PLAIN_V1
    with pytest.raises(WireError) as exc:
        open_plain(bytes([Format.SEALED_V2]) + body)
    assert exc.value.reason == Rejection.UNSUPPORTED_FORMAT
    with pytest.raises(WireError) as exc:
        open_plain(b"\x7f" + body)
    assert exc.value.reason == Rejection.UNKNOWN_FORMAT
    assert "byte offset 0" in exc.value.detail
    with pytest.raises(WireError) as exc:
        open_plain(b"")
    assert exc.value.reason == Rejection.EMPTY


@pytest.mark.parametrize(
    "doc, why",
    [
        (["gw 1", 1, 2, []], "gateway id with a space"),
        (["gw/1", 1, 2, []], "gateway id with a topic separator"),
        (["gw-1\n", 1, 2, []], "gateway id with a trailing newline"),
        (["gw-1", -1, 2, []], "negative sequence"),
        (["gw-1", 1, 2, [["dev", "m", 1, {}, {}, "extra"]]], "unknown trailing field"),
        (["gw-1", 1, 2, [["dev", "m", -5, {"v": 1.0}]]], "negative sample time"),
        (["gw-1", 1, 2, [["de\nv", "m", 5, {"v": 1.0}]]], "control character in a device id"),
        (["gw-1", 1, 2, [["dev", "m", 5, {"v\x00": 1.0}]]], "NUL in a field name"),
        (["gw-1", 1, 2, [["dev", "m", 5, {"v": 1.0}, {"site": "a\x1b[31m"}]]], "escape sequence in a tag value"),
        (["gw-1", 1, 2, [["dev", "m\r", 5, {"v": 1.0}]]], "carriage return in a measurement"),
        (["gw-1", 1, 2, [["dev\x85", "m", 5, {"v": 1.0}]]], "C1 control (NEL) in a device id"),
        (["gw-1", 1, 2, [["dev", "m", 5, {"v": 1.0}, {}, {"v": "not_available\x9b"}]]], "CSI in a quality flag"),
        (["gw-1", 1, 2, [["dev", "m", 5, {"v": [1, 2]}]]], "field value that is a list"),
        (["gw-1", 1, 2, [["dev", "m", 5, {"v": None}]]], "field value that is null"),
        (["gw-1", "1", 2, []], "sequence as a string"),
    ],
)
def test_schema_is_strict(doc: list, why: str) -> None:
    payload = bytes([Format.PLAIN_V1]) + msgspec.msgpack.encode(doc)
    with pytest.raises(WireError) as exc:
        open_plain(payload)
    assert exc.value.reason == Rejection.SCHEMA, why


@pytest.mark.parametrize(
    "reading, path",
    [
        (["dev\x85", "m", 5, {"v": 1.0}], "$.readings[1].device"),
        (["dev", "m\x85", 5, {"v": 1.0}], "$.readings[1].measurement"),
        (["dev", "m", 5, {"v\x85": 1.0}], "$.readings[1].fields"),
        (["dev", "m", 5, {"v": 1.0}, {"site\x85": "a"}], "$.readings[1].tags"),
        (["dev", "m", 5, {"v": 1.0}, {"site": "a\x85"}], "$.readings[1].tags.site"),
        (["dev", "m", 5, {"v": 1.0}, {}, {"w\x85": "error"}], "$.readings[1].quality"),
    ],
)
def test_a_c1_control_in_a_name_is_refused_naming_the_character_and_the_path(reading: list, path: str) -> None:
    """U+0085 (NEL) passed the schema before while the line-protocol encoder refused it: the reading was
    acknowledged and never stored. One rule now (wire/names.py), and the message says what and where."""
    doc = ["gw-1", 1, 2, [["ok", "m", 5, {"v": 1.0}], reading]]
    with pytest.raises(WireError) as exc:
        open_plain(bytes([Format.PLAIN_V1]) + msgspec.msgpack.encode(doc))
    assert exc.value.reason == Rejection.SCHEMA
    assert "control character U+0085" in exc.value.detail and f"`{path}`" in exc.value.detail
    with pytest.raises(msgspec.ValidationError, match="U\\+0085"):
        decode_batch(msgspec.msgpack.encode(doc))


@pytest.mark.parametrize("char", ["\x00", "\n", "\x1f", "\x7f", "\x80", "\x85", "\x9b", "\x9f", "\ud800", "\udfff"])
def test_config_names_and_tag_values_follow_the_same_rule(char: str) -> None:
    assert bad_character(f"a{char}b") == char
    for kind in (ConfigName, ConfigTagValue):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(f"a{char}b", kind)


@pytest.mark.parametrize("text", ["a", "température", "Zürich", "a b", "日本", "😀", "x" * 128,
                                  "\xa0nbsp", "line\u2028separator", "\ufeffbom", "soft\xadhyphen"])
def test_config_names_allow_any_other_character(text: str) -> None:
    # the last four are not str.isprintable() (bad_character's fast path) but are no controls: allowed
    assert bad_character(text) is None
    assert msgspec.convert(text, ConfigName) == text == msgspec.convert(text, ConfigTagValue)


def test_a_config_name_with_a_trailing_newline_is_refused_with_its_key_path() -> None:
    """The old pattern ended in "$", which also matches before a final newline: "meter\\n" passed."""

    class Device(msgspec.Struct):
        id: ConfigName
        site: ConfigTagValue = ""

    for raw, key in (({"id": "meter\n"}, "id"), ({"id": "m", "site": "north\x85"}, "site")):
        with pytest.raises(ConfigError) as exc:
            convert(raw, Device, "agent.toml")
        assert f"agent.toml: {key}: expected" in str(exc.value) and "U+007F-U+009F" in str(exc.value)
    assert convert({"id": "m", "site": ""}, Device, "agent.toml").site == ""  # an empty tag value is left out


def test_optional_tags_default_keeps_old_payloads_decodable() -> None:
    payload = bytes([Format.PLAIN_V1]) + msgspec.msgpack.encode(["gw-1", 3, 4, [["dev", "m", 5, {"v": 1.5}]]])
    batch = open_plain(payload)
    assert batch.readings[0].tags == {}
    assert math.isclose(batch.readings[0].fields["v"], 1.5)


def test_compactness() -> None:
    """A 10-field meter reading costs its names and values, not a JSON-like envelope."""
    fields = {f"f{i}": 230.0 + i for i in range(10)}
    batch = Batch("gw-0001", 123456, 1_700_000_000_000_000_000,
                  [Reading("meter-1", "energy", 1_700_000_000_000_000_000, fields, {"model": "SDM630"})])
    payload = seal_plain(batch)
    as_json = msgspec.json.encode({"gateway": batch.gateway, "seq": batch.seq, "sent_ns": batch.sent_ns,
                                   "readings": [msgspec.structs.asdict(r) for r in batch.readings]})
    # msgpack floats are 9 bytes each; the saving is in keys, numbers and framing.
    assert len(payload) < 0.75 * len(as_json), (len(payload), len(as_json))


@pytest.mark.parametrize(
    "topic, expected",
    [
        ("citynerve/v1/gw-1/up", ("gw-1", "up")),
        ("citynerve/v1/gw-1/down/ack", ("gw-1", "down/ack")),
        ("citynerve/v1/gw-1", None),
        ("citynerve/v1//up", None),
        ("other/v1/gw-1/up", None),
        ("citynerve/v1/g+w/up", None),
        ("citynerve/v1/gw\n/up", None),
    ],
)
def test_topic_parse(topic: str, expected: tuple[str, str] | None) -> None:
    assert topics.parse("citynerve/v1", topic) == expected


def test_topic_builders() -> None:
    assert topics.up("p/x", "gw") == "p/x/gw/up"
    assert topics.status("p", "gw") == "p/gw/status"
    assert topics.down("p", "gw", "ack") == "p/gw/down/ack"
    assert topics.subscription("p", "up") == "p/+/up"
    assert not topics.is_valid_prefix("a/+/b") and not topics.is_valid_prefix("a//b") and topics.is_valid_prefix("a/b")
