"""InfluxDB line protocol, one point per call: pure, no I/O, on the collector's hot path.

    measurement[,tag=value...] field=value[,field=value...] timestamp_ns

Escaping follows the InfluxDB 1.x/2.x parser (models.ParsePoints), checked against a real influxd:

- measurement: comma and space are escaped with a backslash (an "=" needs no escape there and would be
  stored with the backslash if it had one);
- tag keys, tag values and field keys: comma, equals sign and space;
- string field values: double quote and backslash.

A backslash in a name is kept as it is, with one exception. The InfluxDB parser reads a backslash two ways:
the scanners for measurement and tags take a character as escaped when the byte before it is a backslash,
while the line and field scanners take a backslash as escaping whatever byte follows, and field keys are
unescaped for '\\"' as well. All readings agree unless a backslash stands right before ",", "=", space or
'"', or at the end of a name (where a separator follows), so such a name is refused: no escaping can express
it. Also refused: characters no name may hold (wire/names.py, the rule the wire schema applies too: C0 and C1
controls, DEL, lone surrogates; a newline would split the line), a measurement starting with "#" (InfluxDB
skips the line as a comment), the key "time" (InfluxDB drops such a field or tag and answers 400) and a
newline in a string value (InfluxDB would take it inside the quotes, but VictoriaMetrics and other
line-protocol readers split lines on every newline, so one reading could become two, one of them forged).

Fields keep the mapping's order; tags are sorted by key, as InfluxDB prefers. Tags with an empty value are
left out (InfluxDB has no empty tag values). Floats are written as their shortest text that reads back as the
same float64: by msgspec's JSON encoder when every value of the reading is a float (see _plain_names), else
with repr(); NaN and infinities are left out because InfluxDB cannot store them; a point left with no field is
an error.

VictoriaMetrics reads the same bytes with one difference: it also turns "\\\\" into "\\" in names, so a name
holding two backslashes in a row is stored with one there (see labkit.victoria).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec

from wire.names import bad_character, describe

__all__ = ["LineProtocolError", "encode_line"]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# InfluxDB reserves the two extreme int64 values; writing either is a 400 "time outside range".
TIME_MIN = INT64_MIN + 2
TIME_MAX = INT64_MAX - 1


class LineProtocolError(ValueError):
    """The point cannot be written as one valid line (bad name, unsupported value, no storable field)."""


_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_BAD_BACKSLASH = re.compile(r"\\(?:[,= \"]|\Z)")

# Names repeat endlessly (a few measurements, field keys, device tags), so their checked and escaped forms are
# kept. Bounded: cleared when full, which costs one re-check per name.
_CACHE_LIMIT = 50_000
_measurements: dict[str, str] = {}
_keys: dict[str, str] = {}
_tag_values: dict[str, str] = {}
# Field keys that JSON writes exactly as line protocol does (no escape in either): a reading whose values are all
# floats and whose keys are all such is written by msgspec's JSON encoder, one C call for the whole field set,
# and turned into line protocol by two replacements. Kept per key, bounded as the caches above (a cache of
# field-key tuples would let one gateway fill the collector's memory with orderings of its keys). repr() per
# value was the largest cost of encoding a reading (docs/benchmarks.md "Collector ingest"). msgspec writes the
# shortest text that reads back as the same float64, as repr() does, in its own spelling (1e16 and 0.00001 where
# repr() writes 1e+16 and 1e-05): the same value for every line-protocol reader (Go's strconv.ParseFloat in
# InfluxDB, VictoriaMetrics' fastfloat). NaN and infinities come out as null: such a reading takes the
# value-by-value path, which leaves them out.
_plain_names: set[str] = set()
_json = msgspec.json.Encoder().encode
_ALL_FLOAT = {float}


def _checked(name: str, what: str) -> None:
    if type(name) is not str and not isinstance(name, str):
        raise LineProtocolError(f"{what} must be a string, got {type(name).__name__}: {name!r}")
    if not name:
        raise LineProtocolError(f"{what} is empty")
    bad = bad_character(name)  # the names rule, shared with the wire schema
    if bad is not None:
        raise LineProtocolError(f"{what} {name!r} contains the {describe(bad)}")
    if "\\" in name and _BAD_BACKSLASH.search(name):
        raise LineProtocolError(
            f"{what} {name!r} has a backslash before a comma, equals sign, space, quote or at its end, "
            "which line protocol cannot express"
        )


def _measurement(name: str) -> str:
    escaped = _measurements.get(name)
    if escaped is None:
        _checked(name, "measurement")
        if name[0] == "#":
            raise LineProtocolError(f"measurement {name!r} starts with '#': InfluxDB skips it as a comment")
        escaped = name.translate(_MEASUREMENT_ESCAPES)
        if len(_measurements) >= _CACHE_LIMIT:
            _measurements.clear()
        _measurements[name] = escaped
    return escaped


def _key(name: str, what: str) -> str:
    escaped = _keys.get(name)
    if escaped is None:
        _checked(name, what)
        if name == "time":
            raise LineProtocolError(f'{what} "time" is reserved: InfluxDB drops it')
        escaped = name.translate(_KEY_ESCAPES)
        if len(_keys) >= _CACHE_LIMIT:
            _keys.clear()
        _keys[name] = escaped
    return escaped


def _tag_value(value: str, key: str) -> str:
    escaped = _tag_values.get(value)
    if escaped is None:
        _checked(value, f"value of tag {key!r}")
        escaped = value.translate(_KEY_ESCAPES)
        if len(_tag_values) >= _CACHE_LIMIT:
            _tag_values.clear()
        _tag_values[value] = escaped
    return escaped


def _string(value: str, key: str) -> str:
    if "\n" in value:
        raise LineProtocolError(f"string field {key!r} contains a newline")
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if '"' in value:
        value = value.replace('"', '\\"')
    return '"' + value + '"'


def _other(value: object, key: str) -> str | None:
    """Values that are not exactly float/int/bool/str: subclasses (IntEnum, numpy scalars) and mistakes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _int(int(value), key)
    if isinstance(value, float):
        value = float(value)
        return repr(value) if value - value == 0.0 else None
    if isinstance(value, str):
        return _string(str(value), key)
    if hasattr(value, "dtype") and hasattr(value, "item"):  # numpy scalar that is no float subclass
        return _other(value.item(), key)
    raise LineProtocolError(f"field {key!r} has an unsupported type {type(value).__name__}: {value!r}")


def _int(value: int, key: str) -> str:
    if INT64_MIN <= value <= INT64_MAX:
        return f"{value}i"
    raise LineProtocolError(f"field {key!r} = {value} does not fit in a 64-bit integer")


def encode_line(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, float | int | bool | str],
    time_ns: int,
) -> bytes:
    """One point as one line of line protocol (UTF-8, no newline at the end); LineProtocolError if not."""
    out = [_measurement(measurement)]
    if tags:
        for key, value in sorted(tags.items()):
            if value == "" or value is None:
                continue
            if type(value) is not str:
                if not isinstance(value, str):
                    raise LineProtocolError(
                        f"value of tag {key!r} must be a string, got {type(value).__name__}: {value!r}"
                    )
                value = str(value)
            out.append(",")
            out.append(_key(key, "tag key"))
            out.append("=")
            out.append(_tag_value(value, key))
    text = _all_floats(fields) if set(map(type, fields.values())) == _ALL_FLOAT else None
    if text is not None:
        out.append(" ")
        out.append(text)
    else:
        out.append(_fields_text(fields, measurement))
    if type(time_ns) is not int:
        if isinstance(time_ns, bool) or not isinstance(time_ns, int):
            raise LineProtocolError(f"time_ns must be an integer, got {type(time_ns).__name__}: {time_ns!r}")
        time_ns = int(time_ns)
    if not TIME_MIN <= time_ns <= TIME_MAX:
        raise LineProtocolError(f"time_ns {time_ns} is outside InfluxDB's range {TIME_MIN}..{TIME_MAX}")
    out.append(" ")
    out.append(str(time_ns))
    try:
        return "".join(out).encode()
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a badly decoded name
        raise LineProtocolError(f"measurement {measurement!r}: not encodable as UTF-8: {exc.reason}") from None


def _all_floats(fields: Mapping[str, float]) -> str | None:
    """The field set of a reading whose values are all floats, by the JSON encoder (see _plain_names); None when
    a key needs an escape or a value is NaN or infinite."""
    if not _plain_names.issuperset(fields):
        for name in fields:
            if name not in _plain_names:
                if _key(name, "field key") != name or '"' in name or "\\" in name:
                    return None
                if len(_plain_names) >= _CACHE_LIMIT:
                    _plain_names.clear()
                _plain_names.add(name)
    try:
        text = _json(fields)[2:-1]  # {"k":1.5,"l":2.0} -> k":1.5,"l":2.0
    except TypeError:  # a mapping msgspec does not take as a dict
        return None
    if b'":null' in text:  # a NaN or an infinity (a key holds no quote, so only a value can follow one so)
        return None
    # The opening quotes first: `,"` can only be a key's start (keys hold no quote, floats no comma); then every
    # `":` left is a key's end. The other order would take the opening quote of a key starting with ":" for one.
    return text.replace(b',"', b",").replace(b'":', b"=").decode()


def _fields_text(fields: Mapping[str, float | int | bool | str], measurement: str) -> str:
    """The field set value by value, with the space before it."""
    out = []
    separator = " "
    for key, value in fields.items():
        kind = type(value)
        if kind is float:
            if value - value != 0.0:  # NaN or an infinity: InfluxDB cannot store it
                continue
            text = repr(value)
        elif kind is int:
            text = f"{value}i" if INT64_MIN <= value <= INT64_MAX else _int(value, key)
        elif kind is bool:
            text = "true" if value else "false"
        elif kind is str:
            text = _string(value, key)
        else:
            text = _other(value, key)
            if text is None:
                continue
        out.append(separator)
        out.append(_key(key, "field key"))
        out.append("=")
        out.append(text)
        separator = ","
    if separator == " ":
        raise LineProtocolError(f"measurement {measurement!r}: no storable field in {dict(fields)!r}")
    return "".join(out)
