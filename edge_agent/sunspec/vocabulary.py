"""SunSpec points in the shared vocabulary (wire/vocabulary.toml). Pure data and lookups.

A discovered SunSpec device's points are named `<model key>_<point>` (docs/sunspec.md "Naming"), except the points
of the common, inverter, meter and MPPT models that measure a quantity the vocabulary has a name for: those carry
the vocabulary's name and unit, so a SunSpec inverter's output power is `power` in W like any other inverter's, and
its energy counter `energy` in kWh. The model files' units are converted: Wh -> kWh, VAh -> kVAh, varh -> kvarh
(x 0.001), Pct -> the ratio of a power factor (x 0.01), C -> °C.

Scale-factor points keep their SunSpec names (they are internal, never stored), as do points the vocabulary has no
name for (settings, vendor event words, per-phase quadrant energies, the MPPT modules beyond the fourth).
"""

from __future__ import annotations

import re

from wire import vocabulary

#: model file unit -> (vocabulary unit, factor)
_UNITS: dict[str, tuple[str, float]] = {
    "Wh": ("kWh", 0.001),
    "VAh": ("kVAh", 0.001),
    "varh": ("kvarh", 0.001),
    "Pct": ("", 0.01),  # only power factors are mapped: SunSpec gives them in percent
    "C": ("°C", 1.0),
}

_PHASES = {"A": "l1", "B": "l2", "C": "l3"}
_PAIRS = {"AB": "l1_l2", "BC": "l2_l3", "CA": "l3_l1"}


def _per_phase(point: str, field: str) -> dict[str, str]:
    return {f"{point}ph{p}": f"{field}_{v}" for p, v in _PHASES.items()}


_INVERTER: dict[str, str] = {
    "A": "current", **_per_phase("A", "current"),
    **{f"PPVph{p}": f"voltage_{v}" for p, v in _PAIRS.items()},
    **_per_phase("PhV", "voltage"),
    "W": "power", "Hz": "frequency", "VA": "apparent_power", "VAr": "reactive_power", "PF": "power_factor",
    "WH": "energy", "DCA": "dc_current", "DCV": "dc_voltage", "DCW": "dc_power",
    "TmpCab": "temperature_cabinet", "TmpSnk": "temperature_heatsink", "TmpTrns": "temperature_transformer",
    "TmpOt": "temperature_other", "St": "state", "StVnd": "status", "Evt1": "event",
}

_METER: dict[str, str] = {
    "A": "current", **_per_phase("A", "current"),
    "PhV": "voltage_average", **_per_phase("PhV", "voltage"),
    "PPV": "voltage_ll_average",
    # model 201 names the line-to-line voltages PPVphAB.., models 203 and 204 PhVphAB..: the same quantities
    **{f"PPVph{p}": f"voltage_{v}" for p, v in _PAIRS.items()},
    **{f"PhVph{p}": f"voltage_{v}" for p, v in _PAIRS.items()},
    "Hz": "frequency",
    "W": "power", **_per_phase("W", "power"),
    "VA": "apparent_power", **_per_phase("VA", "apparent_power"),
    "VAR": "reactive_power", **_per_phase("VAR", "reactive_power"),
    "PF": "power_factor", **_per_phase("PF", "power_factor"),
    "TotWhExp": "energy_export", **{f"TotWhExpPh{p}": f"energy_export_{v}" for p, v in _PHASES.items()},
    "TotWhImp": "energy_import", **{f"TotWhImpPh{p}": f"energy_import_{v}" for p, v in _PHASES.items()},
    "TotVAhExp": "apparent_energy_export", "TotVAhImp": "apparent_energy_import",
    "TotVArhImpQ1": "reactive_energy_q1", "TotVArhImpQ2": "reactive_energy_q2",
    "TotVArhExpQ3": "reactive_energy_q3", "TotVArhExpQ4": "reactive_energy_q4",
    "Evt": "event",
}

_COMMON: dict[str, str] = {"Mn": "manufacturer", "Md": "model_name", "Vr": "firmware_version", "SN": "serial_number"}

_MPPT_MODULE = re.compile(r"module_(\d+)_(DCA|DCV|DCW|DCWH)\Z")
_MPPT: dict[str, str] = {"DCA": "dc_current", "DCV": "dc_voltage", "DCW": "dc_power", "DCWH": "dc_energy"}

#: model group name (the definition's, docs/sunspec.md) -> {point key: vocabulary field}
MAPS: dict[str, dict[str, str]] = {"common": _COMMON, "inverter": _INVERTER, "ac_meter": _METER}

#: the vocabulary's measurement a model group's fields belong to (the discovered measurement is named
#: `<prefix>_<model key>`, docs/sunspec.md; this is the kind of data each holds)
KINDS: dict[str, str] = {"common": "device_info", "inverter": "pv_inverter", "mppt": "pv_inverter",
                         "ac_meter": "electricity"}


def standard_field(model: str, key: str, units: str) -> tuple[str, str, float] | None:
    """(vocabulary field, its unit, factor from the model file's unit) for point `key` of a model whose group name
    is `model`, or None for a point the vocabulary has no name for."""
    match = _MPPT_MODULE.fullmatch(key) if model == "mppt" else None
    name = f"{_MPPT[match[2]]}_pv{int(match[1])}" if match is not None else MAPS.get(model, {}).get(key, "")
    entry = vocabulary.lookup(name) if name else None
    if entry is None:
        return None
    unit, factor = _UNITS.get(units, (units, 1.0))
    if unit != entry.unit:  # a model file whose unit the table does not expect: keep the SunSpec name
        return None
    return name, unit, factor


def event_field(model: str, symbol: str) -> str | None:
    """The vocabulary's name of a bit of an inverter's Evt1 or a meter's Evt (GROUND_FAULT -> event_ground_fault,
    M_EVENT_Power_Failure -> event_power_failure), or None for reserved and vendor bits."""
    if model not in ("inverter", "ac_meter"):
        return None
    name = "event_" + symbol.removeprefix("M_EVENT_").lower()
    return name if vocabulary.lookup(name) is not None else None


__all__ = ["KINDS", "MAPS", "event_field", "standard_field"]
