"""The libmbus test telegrams (tests/fixtures/mbus/libmbus, NOTICE.md) as a test suite for M-Bus parsers: each
telegram with libmbus's normalised decoding, and a scorer that compares a parser's values with it.

Used by tests/test_mbus.py (citynerve's parser must meet it) and bench/mbus_parsers.py (the comparison with
pyMeterBus that chose the parser, docs/mbus.md).

Scoring, per numeric record of a quantity both sides name (energy, volume, power, flow, temperatures, voltage,
current, durations), matched by position in the telegram:
- agree: the values are equal in libmbus's unit (to the six decimals libmbus prints);
- refused: libmbus's raw value is not a number (BCD digits A-F: the meter's "no valid value"), libmbus's
  normalised file still shows a number (made up from the hex digits), and the parser gives no value - the
  right answer for a city's data;
- invented: the same case, but the parser gives a number;
- disagree: anything else (a different value, or no value for a valid one).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

SUITE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "mbus" / "libmbus"

# libmbus's normalised quantity -> (citynerve field name, factor from citynerve's unit to libmbus's unit)
QUANTITIES = {
    "Energy": ("energy", 1000.0),  # kWh -> Wh
    "Volume": ("volume", 1.0),
    "Power": ("power", 1.0),
    "Volume flow": ("flow", 1.0),
    "Flow temperature": ("temperature_supply", 1.0),
    "Return temperature": ("temperature_return", 1.0),
    "Temperature difference": ("temperature_difference", 1.0),
    "External temperature": ("temperature_external", 1.0),
    "Voltage": ("voltage", 1.0),
    "Current": ("current", 1.0),
    "Operating time": ("operating_time", 1.0),
    "On time": ("on_time", 1.0),
    "Averaging Duration": ("averaging_duration", 1.0),
    "Actuality Duration": ("actuality_duration", 1.0),
}
_HEX_LETTER = re.compile(r"[A-Fa-f]")


@dataclass
class Expected:
    quantity: str
    unit: str
    value: float | None  # libmbus's normalised number
    raw_invalid: bool  # libmbus's raw value holds hex letters: the meter sent "no valid value"
    storage: int
    function: str


@dataclass
class Case:
    name: str
    telegram: bytes
    records: list[Expected] = field(default_factory=list)


def load() -> list[Case]:
    cases = []
    for hex_file in sorted(SUITE.glob("*.hex")):
        name = hex_file.stem
        telegram = bytes.fromhex(hex_file.read_text())
        norm = ET.parse(SUITE / f"{name}.norm.xml").getroot()
        raw_values = {}
        raw_path = SUITE / f"{name}.xml"
        if raw_path.exists():
            for rec in ET.parse(raw_path).getroot().iter("DataRecord"):
                raw_values[rec.get("id")] = rec.findtext("Value") or ""
        case = Case(name, telegram)
        for rec in norm.iter("DataRecord"):
            text = rec.findtext("Value") or ""
            try:
                value: float | None = float(text)
            except ValueError:
                value = None
            case.records.append(Expected(
                rec.findtext("Quantity") or "", rec.findtext("Unit") or "", value,
                bool(_HEX_LETTER.search(raw_values.get(rec.get("id"), ""))) and "Time" not in
                (rec.findtext("Quantity") or ""), int(rec.findtext("StorageNumber") or 0),
                rec.findtext("Function") or ""))
        cases.append(case)
    return cases


@dataclass
class Score:
    agree: int = 0
    refused: int = 0
    invented: int = 0
    disagree: int = 0
    failed_telegrams: int = 0  # the parser raised on the whole telegram
    problems: list[str] = field(default_factory=list)

    @property
    def compared(self) -> int:
        return self.agree + self.refused + self.invented + self.disagree


def score(cases: list[Case], values_of) -> Score:  # type: ignore[no-untyped-def]
    """`values_of(telegram) -> list[(quantity_key, value in citynerve's unit or None)]` in record order, where
    quantity_key is citynerve's field base name (QUANTITIES' first element) or anything else for other records;
    raises on a telegram it cannot decode."""
    s = Score()
    for case in cases:
        try:
            got = values_of(case.telegram)
        except Exception as exc:  # a parser's failure on one telegram is its score, not the bench's end
            s.failed_telegrams += 1
            s.problems.append(f"{case.name}: {type(exc).__name__}: {exc}")
            continue
        for index, expected in enumerate(case.records):
            mapping = QUANTITIES.get(expected.quantity)
            if mapping is None or (expected.value is None and not expected.raw_invalid):
                continue
            name, factor = mapping
            if index >= len(got) or got[index][0] != name:
                s.disagree += 1
                s.problems.append(f"{case.name} record {index}: expected {name}, got "
                                  f"{got[index][0] if index < len(got) else 'nothing'}")
                continue
            value = got[index][1]
            if expected.raw_invalid:
                if value is None:
                    s.refused += 1
                else:
                    s.invented += 1
                continue
            if value is not None and expected.value is not None and _close(value * factor, expected.value):
                s.agree += 1
            else:
                s.disagree += 1
                s.problems.append(f"{case.name} record {index} {name}: expected {expected.value} {expected.unit}, "
                                  f"got {None if value is None else value * factor}")
    return s


def _close(a: float, b: float) -> bool:
    # libmbus prints its normalised values with six decimals
    return abs(a - b) <= 5e-7 + 1e-9 * max(abs(a), abs(b))


_MODIFIERS = re.compile(r"(_max|_min|_error|_positive|_negative|_record_error|_mfr[0-9a-f]*|_x[0-9a-f]{2}|_s\d+|_t\d+"
                        r"|_u\d+|_\d+)+$")


def base_name(name: str) -> str:
    """A field's quantity without what its record adds (function, storage, tariff, subunit, VIFE modifiers)."""
    return _MODIFIERS.sub("", name)


def citynerve_values(telegram: bytes) -> list[tuple[str, float | None]]:
    from edge_agent.mbus import frames, records

    frame = frames.parse(telegram)
    decoded = records.decode(frame.ci, frame.data)
    out = []
    for r in decoded.records:
        out.append((base_name(r.name), r.value if not isinstance(r.value, str) else None))
    return out
