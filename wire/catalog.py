"""The data catalogue (docs/catalog.md): one row per gateway, device, measurement and field - what the city
measures, where, in which unit. Pure: what is known in, rows and their text out. Both `edge-agent catalog` (from a
configuration) and `edge-collector catalog` (fleet-wide, from the inventory and the stored fields) make their rows
with `row()`, so the vocabulary (wire/vocabulary.py) is the one source of names, units, types and descriptions.

Formats: a readable table (default), CSV (RFC 4180: CRLF line ends, a field with a comma, quote or line break in
double quotes, quotes doubled, a header line) and JSON (a list of objects with the keys COLUMNS, in that order).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass

from wire import vocabulary

#: the columns, in order: the CSV header and the keys of each JSON object (stable: scripts read them)
COLUMNS = ("gateway", "location", "device", "source", "measurement", "field", "unit", "type", "standard",
           "description", "note")


@dataclass(frozen=True)
class Row:
    gateway: str
    location: str  # where the gateway is ("" when not known)
    device: str
    source: str  # how the device is read: "modbus-tcp chint_dtsu666", "serial dsmr", "stored" (collector)
    measurement: str
    field: str
    unit: str  # "" for no unit or not known
    type: str  # float, int, bool, string (wire/vocabulary.py TYPES); "" when not known
    standard: bool  # the vocabulary's name for this measurement, in its unit
    description: str
    note: str = ""  # why a field is not standard, or what is not known yet


_MODIFIER_WORDS = {"max": "maximum", "min": "minimum", "error": "at error", "s": "storage", "t": "tariff",
                   "u": "subunit", "p": "period"}
_MODIFIER = re.compile(r"_(max|min|error|[stup])(\d*)")


def describe(match: vocabulary.Match) -> str:
    """The table's description of a name, with what its variant and record modifiers add (energy_import_t2:
    "... (variant t2)"; energy_s1_max: "... (storage 1, maximum)")."""
    extra = [f"variant {match.variant}"] if match.variant else []
    extra += [f"{_MODIFIER_WORDS[word]} {number}".strip() for word, number in _MODIFIER.findall(match.modifiers)]
    return match.entry.description + (f" ({', '.join(extra)})" if extra else "")


def row(*, gateway: str, device: str, source: str, measurement: str, field: str, unit: str | None = None,
        type: str = "", description: str = "", location: str = "", note: str = "") -> Row:
    """One field of one device. A standard name (wire/vocabulary.py `problems` finds nothing) takes the table's
    unit, type and description; any other keeps what is known of it (`unit`: None when not known; a profile
    point's unit, type and description) and says why it is not standard in `note`. A `type` other than the
    table's (a custom point's, the store's) makes a name not standard either."""
    found = vocabulary.problems(measurement, {field: unit})
    match = vocabulary.lookup(field)
    if match is not None and not found and type and type != match.type:
        found = [f"{field} (type {type}, the table's {match.type})"]  # a profile's point, or how the store holds it
    if not found and match is not None:
        return Row(gateway, location, device, source, measurement, field, match.unit, match.type, True,
                   describe(match), note)
    why = "not in the vocabulary" if match is None else found[0].removeprefix(field).strip(" ()")
    return Row(gateway, location, device, source, measurement, field, unit or "", type, False, description,
               "; ".join(n for n in (why, note) if n))


def note_row(*, gateway: str, device: str, source: str, note: str, location: str = "", measurement: str = "") -> Row:
    """A device whose fields are not known from what the catalogue reads (SunSpec before discovery, a device
    nothing is stored of yet): one row saying so, so the device is still listed."""
    return Row(gateway, location, device, source, measurement, "", "", "", False, "", note)


def to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2, ensure_ascii=False) + "\n"


def _cells(r: Row) -> list[str]:
    return [("yes" if v else "no") if isinstance(v, bool) else str(v) for v in asdict(r).values()]


def to_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180 §2: CRLF; QUOTE_MINIMAL quotes what §2.6 needs
    writer.writerow(COLUMNS)
    writer.writerows(_cells(r) for r in rows)
    return out.getvalue()


def to_table(rows: list[Row]) -> str:
    """Aligned columns for a terminal; columns empty in every row (no location known, no notes) are left out."""
    if not rows:
        return "no devices\n"
    cells = [_cells(r) for r in rows]
    keep = [i for i, name in enumerate(COLUMNS) if name not in ("location", "note") or any(c[i] for c in cells)]
    table = [[COLUMNS[i] for i in keep]] + [[c[i].replace("\n", " ") for i in keep] for c in cells]
    widths = [max(len(line[j]) for line in table) for j in range(len(keep))]
    return "".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in table)


def render(rows: list[Row], fmt: str) -> str:
    return {"json": to_json, "csv": to_csv, "table": to_table}[fmt](rows)


def location_text(lat: float, lon: float, alt: float | None = None) -> str:
    """A WGS 84 position as the catalogue shows it: "52.37, 4.89" (degrees, north and east positive), ", 2 m"."""
    return f"{lat:g}, {lon:g}" + (f", {alt:g} m" if alt is not None else "")
