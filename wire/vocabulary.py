"""The one vocabulary of field names, units and types (wire/vocabulary.toml; docs/vocabulary.md is made from it).
Pure: names in, entries out. Used by every decoder's tests, by `edge-agent check` (which names of a configuration
are not standard) and by the data catalogue (`catalog`: unit, type and description of each field).

    python -m wire.vocabulary --markdown > docs/vocabulary.md
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

# The record modifiers any standard name may carry, in this order (meters with stored, extreme or per-tariff
# values: M-Bus, DSMR); see the table's header.
_MODIFIERS = re.compile(r"(?:_(?:max|min|error))?(?:_s\d+)?(?:_t\d+)?(?:_u\d+)?(?:_p\d+)?\Z")
TYPES = ("float", "int", "bool", "string")


@dataclass(frozen=True)
class Entry:
    name: str  # the base name (a variant's own name is base + "_" + variant)
    unit: str
    type: str
    description: str
    measurements: tuple[str, ...]
    variants: tuple[str, ...] = ()


@dataclass(frozen=True)
class Match:
    """What a field name is in the vocabulary: its entry, the variant and the modifiers it carries."""

    entry: Entry
    variant: str
    modifiers: str

    @property
    def unit(self) -> str:
        return self.entry.unit

    @property
    def type(self) -> str:
        return self.entry.type


@cache
def entries() -> dict[str, Entry]:
    raw = tomllib.loads(resources.files("wire").joinpath("vocabulary.toml").read_text(encoding="utf-8"))
    out: dict[str, Entry] = {}
    for i, item in enumerate(raw["fields"]):
        entry = Entry(item["name"], item["unit"], item["type"], item["description"], tuple(item["measurements"]),
                      tuple(item.get("variants", ())))
        if entry.type not in TYPES:
            raise ValueError(f"wire/vocabulary.toml: fields[{i}].type: {entry.type!r}, expected one of {TYPES}")
        if entry.name in out:
            raise ValueError(f"wire/vocabulary.toml: fields[{i}].name: {entry.name!r} twice")
        out[entry.name] = entry
    return out


@cache
def _names() -> dict[str, tuple[Entry, str]]:
    """Every standard name without modifiers -> (entry, variant)."""
    table: dict[str, tuple[Entry, str]] = {}
    for entry in entries().values():
        table.setdefault(entry.name, (entry, ""))
        for variant in entry.variants:
            table.setdefault(f"{entry.name}_{variant}", (entry, variant))
    return table


@cache
def lookup(name: str) -> Match | None:
    """The vocabulary's entry for a field name, or None for a name outside it."""
    names = _names()
    if name in names:
        entry, variant = names[name]
        return Match(entry, variant, "")
    # the longest standard prefix followed by valid modifiers
    for cut in range(len(name) - 1, 0, -1):
        if name[cut] != "_":
            continue
        head, tail = name[:cut], name[cut:]
        if head in names and _MODIFIERS.match(tail):
            entry, variant = names[head]
            return Match(entry, variant, tail)
    return None


def is_standard(name: str, measurement: str | None = None) -> bool:
    m = lookup(name)
    return m is not None and (measurement is None or measurement in m.entry.measurements)


@cache
def measurements() -> frozenset[str]:
    """Every measurement the table names a field of."""
    return frozenset(m for entry in entries().values() for m in entry.measurements)


def problems(measurement: str, fields: Mapping[str, str | None]) -> list[str]:
    """What is not standard about the fields of one measurement, {name: unit, or None where the unit is not known}:
    one short text per such field - "x" (not in the table), "x (not a field of gps)" (only for a measurement the
    table knows: a device may name its own), "x (in kW, the table's W)". Standard fields give nothing."""
    out: list[str] = []
    for name, unit in fields.items():
        m = lookup(name)
        if m is None:
            out.append(name)
        elif measurement in measurements() and measurement not in m.entry.measurements:
            out.append(f"{name} (not a field of {measurement})")
        elif unit is not None and unit != m.unit:
            out.append(f"{name} (in {unit or 'no unit'}, the table's {m.unit or 'no unit'})")
    return out


def value_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "string"


def markdown() -> str:
    lines = [
        "# The vocabulary: field names, units, types",
        "",
        "Made from `wire/vocabulary.toml` by `python -m wire.vocabulary --markdown` (a test checks it is current).",
        "The rules are at the top of that file: no unit in a name, one unit per name (decoders convert), variants",
        "for phases / tariffs / quadrants, record modifiers (`_max`, `_min`, `_error`, `_s<n>`, `_t<n>`, `_u<n>`,",
        "`_p<n>`) on any name, numbers that are measurements are always floats.",
        "",
        "| field | unit | type | variants (`field_<variant>`) | measurements | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries().values():
        variants = ", ".join(e.variants) or "-"
        lines.append(f"| `{e.name}` | {e.unit or '-'} | {e.type} | {variants} | {', '.join(e.measurements)} | "
                     f"{e.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown())
    else:
        sys.exit("usage: python -m wire.vocabulary --markdown")
