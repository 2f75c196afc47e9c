"""The OBIS codes a DSMR P1 telegram carries, as data: which become fields (name, type, unit), tags or times.

Sources: DSMR P1 companion standard 2.2, 3.0, 4.0.7/4.2.2 and 5.0.2 (Netbeheer Nederland), Fluvius e-MUCS H
1.7.1 (Belgium), the E.ON Hungary and Sagemcom T210-D-r telegrams in the project's fixtures.

Names are the shared vocabulary's (wire/vocabulary.toml: `energy_import_t1`, `power_import`, `voltage_l1`), each in
the vocabulary's one unit, so a field can never hold kWh from one meter and Wh from another: values sent in another
unit of the same quantity are converted (Wh, MWh -> kWh; kW, MW -> W; varh -> kvarh; kvar -> var; GJ, MJ -> kWh;
dm3 -> m³), in decimal. A unit of another quantity (kW where kWh is expected) or no unit where one is expected makes
the value "malformed".
"""

from __future__ import annotations

from decimal import Decimal
from typing import NamedTuple


class Obis(NamedTuple):
    """What one code of the electricity meter (A-B:C.D.E, F = 255 dropped) means.

    kind: "float" (a number in the vocabulary's `unit`; "" for a ratio), "int" (a count or state, no unit), "tag"
    (an identifier or version: a tag of the electricity sample), "timestamp" (0-0:1.0.0: the sample's time),
    "max_demand" (1-0:1.6.0: a time and a value), "skip" (known, deliberately not reported: logs, histories, text
    messages).
    """

    kind: str
    name: str = ""
    unit: str = ""
    alternative: tuple[str, str] | None = None  # (unit, name): another quantity the meter may send instead


# Unit spelling -> (the vocabulary's unit, factor into it). Case matters: mW is not MW. 1 GJ = 10^9 J = 277.7... kWh.
_K, _M = Decimal(1000), Decimal(1_000_000)
UNITS: dict[str, tuple[str, Decimal]] = {
    "kWh": ("kWh", Decimal(1)), "Wh": ("kWh", 1 / _K), "MWh": ("kWh", _K),
    "kW": ("W", _K), "W": ("W", Decimal(1)), "MW": ("W", _M),
    **{u: ("kvarh", Decimal(1)) for u in ("kvarh", "kVArh", "kVarh", "kVARh")},
    **{u: ("kvarh", 1 / _K) for u in ("varh", "VArh", "Varh", "VARh")},
    **{u: ("var", _K) for u in ("kvar", "kVAr", "kVar", "kVAR")},
    **{u: ("var", Decimal(1)) for u in ("var", "VAr", "Var", "VAR")},
    "V": ("V", Decimal(1)), "A": ("A", Decimal(1)), "Hz": ("Hz", Decimal(1)), "s": ("s", Decimal(1)),
    "m3": ("m³", Decimal(1)), "dm3": ("m³", 1 / _K),
    "GJ": ("kWh", _K / Decimal("3.6")), "MJ": ("kWh", 1 / Decimal("3.6")),
}


def _phases(c: tuple[int, int, int], d_e: str, kind: str, name: str, unit: str = "") -> dict[str, Obis]:
    """The same quantity on L1, L2, L3 (OBIS C = c[0], c[1], c[2])."""
    return {f"1-0:{c[i]}.{d_e}": Obis(kind, name.format(i + 1), unit) for i in range(3)}


def _tariffs(c: int, d: int, name: str, unit: str, tariffs: int) -> dict[str, Obis]:
    """C.D.0 total and C.D.1 .. C.D.tariffs."""
    table = {f"1-0:{c}.{d}.0": Obis("float", name, unit)}
    for t in range(1, tariffs + 1):
        table[f"1-0:{c}.{d}.{t}"] = Obis("float", f"{name}_t{t}", unit)
    return table


ELECTRICITY: dict[str, Obis] = {
    # identification and versions -> tags of the electricity sample
    "1-3:0.2.8": Obis("tag", "dsmr_version"),  # "42", "50": DSMR 4.2, 5.0
    "0-0:96.1.4": Obis("tag", "emucs_version"),  # Fluvius e-MUCS, e.g. "50217"
    "0-0:96.1.1": Obis("tag", "equipment_id"),  # as sent (DSMR: hex of the ASCII serial number)
    "0-0:96.1.0": Obis("tag", "equipment_id"),  # meter serial number (E.ON Hungary); 96.1.1 wins when both
    "0-0:1.0.0": Obis("timestamp"),
    # energy registers: total (C.8.0) and tariffs 1..4
    **_tariffs(1, 8, "energy_import", "kWh", 4),
    **_tariffs(2, 8, "energy_export", "kWh", 4),
    **_tariffs(3, 8, "reactive_energy_import", "kvarh", 2),
    **_tariffs(4, 8, "reactive_energy_export", "kvarh", 2),
    "1-0:5.8.0": Obis("float", "reactive_energy_q1", "kvarh"),
    "1-0:6.8.0": Obis("float", "reactive_energy_q2", "kvarh"),
    "1-0:7.8.0": Obis("float", "reactive_energy_q3", "kvarh"),
    "1-0:8.8.0": Obis("float", "reactive_energy_q4", "kvarh"),
    "1-0:15.8.0": Obis("float", "energy_absolute", "kWh"),  # |import| + |export|
    "0-0:96.14.0": Obis("int", "tariff"),  # the tariff in force (1, 2, ...)
    # instantaneous power, total and per phase
    "1-0:1.7.0": Obis("float", "power_import", "W"),
    "1-0:2.7.0": Obis("float", "power_export", "W"),
    "1-0:3.7.0": Obis("float", "reactive_power_import", "var"),
    "1-0:4.7.0": Obis("float", "reactive_power_export", "var"),
    "1-0:5.7.0": Obis("float", "reactive_power_q1", "var"),
    "1-0:6.7.0": Obis("float", "reactive_power_q2", "var"),
    "1-0:7.7.0": Obis("float", "reactive_power_q3", "var"),
    "1-0:8.7.0": Obis("float", "reactive_power_q4", "var"),
    **_phases((21, 41, 61), "7.0", "float", "power_import_l{}", "W"),
    **_phases((22, 42, 62), "7.0", "float", "power_export_l{}", "W"),
    **_phases((32, 52, 72), "7.0", "float", "voltage_l{}", "V"),
    **_phases((31, 51, 71), "7.0", "float", "current_l{}", "A"),
    "1-0:13.7.0": Obis("float", "power_factor"),
    **_phases((33, 53, 73), "7.0", "float", "power_factor_l{}"),
    "1-0:14.7.0": Obis("float", "frequency", "Hz"),
    # Belgian demand (capacity tariff): the running 15-minute average and this month's maximum (with its time,
    # demand_power_max_time)
    "1-0:1.4.0": Obis("float", "demand_power", "W"),
    "1-0:1.6.0": Obis("max_demand", "demand_power_max", "W"),
    # power quality
    "0-0:96.7.21": Obis("int", "power_failures"),
    "0-0:96.7.9": Obis("int", "power_failures_long"),
    **_phases((32, 52, 72), "32.0", "int", "voltage_sags_l{}"),
    **_phases((32, 52, 72), "36.0", "int", "voltage_swells_l{}"),
    # breaker / limiter
    "0-0:96.3.10": Obis("int", "breaker_state"),  # DSMR 2.2/3.0 switch position; e-MUCS 0 off, 1 on, 2 ready
    "0-0:17.0.0": Obis("float", "limiter_threshold", "W", ("A", "current_threshold")),  # DSMR 3.0: in A
    **_phases((31, 51, 71), "4.0", "float", "current_threshold_l{}", "A"),  # e-MUCS fuse supervision (L1)
    # known, not reported
    "1-0:99.97.0": Obis("skip"),  # power failure event log
    "0-0:98.1.0": Obis("skip"),  # e-MUCS monthly maximum history; E.ON billing-period values
    "0-0:96.13.0": Obis("skip"),  # text message
    "0-0:96.13.1": Obis("skip"),  # numeric message (DSMR 2.2 - 4.0)
    "0-0:42.0.0": Obis("skip"),  # COSEM logical device name (E.ON Hungary)
}

# M-Bus sub-meters: 0-n:C.D.E with channel n = 1..; the key is C.D.E.
MBUS_DEVICE_TYPE = "24.1.0"
MBUS_EQUIPMENT_ID = ("96.1.0", "96.1.1")  # DSMR / e-MUCS
MBUS_VALVE = "24.4.0"
# reading codes -> a name infix: 24.2.1 DSMR 4/5 (gas temperature converted) and e-MUCS water/heat, 24.2.3 e-MUCS
# gas ("not temperature corrected"), 24.3.0 DSMR 2.2/3.0 (the hourly value on the next line)
MBUS_READINGS: dict[str, str] = {"24.2.1": "", "24.2.3": "_uncorrected", "24.3.0": ""}
# the vocabulary's unit of a reading -> its field (GJ and MJ of heat meters are converted into kWh)
MBUS_QUANTITY: dict[str, str] = {"m³": "volume", "kWh": "energy"}
# M-Bus device types (EN 13757-3), as DSMR writes them (decimal) -> the sample's measurement, as the M-Bus decoder
# names them (edge_agent/mbus/records.py MEASUREMENT): warm and hot water are "water" (the tag device_type tells)
MBUS_MEASUREMENT: dict[int, str] = {
    3: "gas",
    4: "heat", 12: "heat", 13: "heat",  # heat (outlet), heat (inlet), heat/cooling
    10: "cooling", 11: "cooling",  # outlet, inlet
    7: "water", 22: "water",  # water, cold water
    6: "water", 21: "water",  # warm water (30-90 °C), hot water
}
MBUS_OTHER = "meter"  # any other or a missing device type (the M-Bus decoder's name for it)


def dsmr_fields() -> dict[str, dict[str, str]]:
    """{measurement: {field: unit}} of every field a DSMR telegram can give (the data catalogue, docs/catalog.md):
    the electricity meter's codes above, and each M-Bus sub-meter's readings in the measurements its device type
    maps to."""
    electricity: dict[str, str] = {}
    for entry in ELECTRICITY.values():
        if entry.kind in ("float", "int", "max_demand"):
            electricity[entry.name] = entry.unit
            if entry.alternative:
                electricity[entry.alternative[1]] = entry.alternative[0]
        if entry.kind == "max_demand":
            electricity[entry.name + "_time"] = ""  # when the maximum was reached, ISO 8601
    out = {"electricity": electricity}
    for measurement in [*dict.fromkeys(MBUS_MEASUREMENT.values()), MBUS_OTHER]:
        sub = out.setdefault(measurement, {})
        for unit, quantity in MBUS_QUANTITY.items():
            if quantity == "energy" and measurement in ("gas", "water"):
                continue  # a volume meter: kWh would be malformed data, not a reading
            sub[quantity] = unit
            if measurement == "gas":
                sub[quantity + MBUS_READINGS["24.2.3"]] = unit  # e-MUCS gas, not temperature corrected
        sub["valve_position"] = ""
    return out
