"""Units of the readings' fields, for the fleet page. The wire carries values, not units; a field's unit is

1. the one vocabulary's (wire/vocabulary.toml: a standard name has one unit, whatever the device), else
2. the bundled firmware profile's (firmware_profiles/*.toml, the files the agent polls with: the `unit` of each
   point), matched by the `model` tag a profile gives its readings - for the names the profiles have not yet
   moved to the vocabulary. Read as data (TOML), not through the agent's code: the collector never imports
   edge_agent.

A field known to neither (a custom point, a custom profile file) is shown without a unit.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path

import firmware_profiles
from wire import vocabulary

PROFILES = Path(firmware_profiles.__file__).resolve().parent


@functools.cache
def units_by_model(directory: Path = PROFILES) -> dict[str, dict[str, str]]:
    """{model tag: {field: unit}} of every bundled profile. A profile that does not parse is skipped (the agent's
    `edge-agent check` is where a broken profile is reported)."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted(directory.glob("*.toml")):
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        model = doc.get("model")
        if not isinstance(model, str):
            continue
        units = found.setdefault(model, {})
        for point in doc.get("points") or []:
            if isinstance(point, dict) and isinstance(point.get("name"), str) and point.get("unit"):
                units[point["name"]] = str(point["unit"])
    return found


def unit_of(field: str, model: str | None = None) -> str:
    match = vocabulary.lookup(field)
    if match is not None:
        return match.unit
    return units_by_model().get(model or "", {}).get(field, "")
