"""The OBIS codes a DSMR P1 telegram carries, as data: which become fields (name, type, unit), tags or times.

Sources: DSMR P1 companion standard 2.2, 3.0, 4.0.7/4.2.2 and 5.0.2 (Netbeheer Nederland), Fluvius e-MUCS H
1.7.1 (Belgium), the E.ON Hungary and Sagemcom T210-D-r telegrams in the project's fixtures.

Names carry their unit (`energy_import_t1_kwh`), as the IEC 62056-21 decoder's do, so a field can never hold
kWh from one meter and Wh from another: values sent in another unit of the same quantity are converted (Wh ->
kWh, W -> kW, varh -> kvarh, var -> kvar, MJ -> GJ, dm3 -> m3; powers of ten, computed in decimal). A unit of
another quantity (kW where kWh is expected) or no unit where one is expected makes the value "malformed".
"""

from __future__ import annotations

from typing import NamedTuple


class Obis(NamedTuple):
    """What one code of the electricity meter (A-B:C.D.E, F = 255 dropped) means.

    kind: "float" (a number with `unit`; "" for a ratio), "int" (a count or state, no unit), "tag" (an identifier
    or version: a tag of the electricity sample), "timestamp" (0-0:1.0.0: the sample's time), "max_demand"
    (1-0:1.6.0: a time and a value), "skip" (known, deliberately not reported: logs, histories, text messages).
    """

    kind: str
    name: str = ""
    unit: str = ""
    alternative: tuple[str, str] | None = None  # (unit, name): another quantity the meter may send instead


# Unit spelling -> (canonical unit, power of ten to multiply by). Case matters: mW is not MW.
UNITS: dict[str, tuple[str, int]] = {
    "kWh": ("kWh", 0), "Wh": ("kWh", -3), "MWh": ("kWh", 3),
    "kW": ("kW", 0), "W": ("kW", -3), "MW": ("kW", 3),
    "kvarh": ("kvarh", 0), "kVArh": ("kvarh", 0), "kVarh": ("kvarh", 0), "kVARh": ("kvarh", 0),
    "varh": ("kvarh", -3), "VArh": ("kvarh", -3), "Varh": ("kvarh", -3), "VARh": ("kvarh", -3),
    "kvar": ("kvar", 0), "kVAr": ("kvar", 0), "kVar": ("kvar", 0), "kVAR": ("kvar", 0),
    "var": ("kvar", -3), "VAr": ("kvar", -3), "Var": ("kvar", -3), "VAR": ("kvar", -3),
    "V": ("V", 0), "A": ("A", 0), "Hz": ("Hz", 0), "s": ("s", 0),
    "m3": ("m3", 0), "dm3": ("m3", -3),
    "GJ": ("GJ", 0), "MJ": ("GJ", -3),
}


def _phases(c: tuple[int, int, int], d_e: str, kind: str, name: str, unit: str = "") -> dict[str, Obis]:
    """The same quantity on L1, L2, L3 (OBIS C = c[0], c[1], c[2])."""
    return {f"1-0:{c[i]}.{d_e}": Obis(kind, name.format(i + 1), unit) for i in range(3)}


def _tariffs(c: int, d: int, name: str, unit: str, tariffs: int) -> dict[str, Obis]:
    """C.D.0 total and C.D.1 .. C.D.tariffs."""
    table = {f"1-0:{c}.{d}.0": Obis("float", f"{name}_{unit.lower()}", unit)}
    for t in range(1, tariffs + 1):
        table[f"1-0:{c}.{d}.{t}"] = Obis("float", f"{name}_t{t}_{unit.lower()}", unit)
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
    "1-0:5.8.0": Obis("float", "reactive_energy_q1_kvarh", "kvarh"),
    "1-0:6.8.0": Obis("float", "reactive_energy_q2_kvarh", "kvarh"),
    "1-0:7.8.0": Obis("float", "reactive_energy_q3_kvarh", "kvarh"),
    "1-0:8.8.0": Obis("float", "reactive_energy_q4_kvarh", "kvarh"),
    "1-0:15.8.0": Obis("float", "energy_absolute_kwh", "kWh"),  # |import| + |export|
    "0-0:96.14.0": Obis("int", "tariff"),  # the tariff in force (1, 2, ...)
    # instantaneous power, total and per phase
    "1-0:1.7.0": Obis("float", "power_import_kw", "kW"),
    "1-0:2.7.0": Obis("float", "power_export_kw", "kW"),
    "1-0:3.7.0": Obis("float", "reactive_power_import_kvar", "kvar"),
    "1-0:4.7.0": Obis("float", "reactive_power_export_kvar", "kvar"),
    "1-0:5.7.0": Obis("float", "reactive_power_q1_kvar", "kvar"),
    "1-0:6.7.0": Obis("float", "reactive_power_q2_kvar", "kvar"),
    "1-0:7.7.0": Obis("float", "reactive_power_q3_kvar", "kvar"),
    "1-0:8.7.0": Obis("float", "reactive_power_q4_kvar", "kvar"),
    **_phases((21, 41, 61), "7.0", "float", "power_import_l{}_kw", "kW"),
    **_phases((22, 42, 62), "7.0", "float", "power_export_l{}_kw", "kW"),
    **_phases((32, 52, 72), "7.0", "float", "voltage_l{}_v", "V"),
    **_phases((31, 51, 71), "7.0", "float", "current_l{}_a", "A"),
    "1-0:13.7.0": Obis("float", "power_factor"),
    **_phases((33, 53, 73), "7.0", "float", "power_factor_l{}"),
    "1-0:14.7.0": Obis("float", "frequency_hz", "Hz"),
    # Belgian demand (capacity tariff): the running 15-minute average and this month's maximum
    "1-0:1.4.0": Obis("float", "demand_average_kw", "kW"),
    "1-0:1.6.0": Obis("max_demand", "demand_max_month_kw", "kW"),
    # power quality
    "0-0:96.7.21": Obis("int", "power_failures"),
    "0-0:96.7.9": Obis("int", "long_power_failures"),
    **_phases((32, 52, 72), "32.0", "int", "voltage_sags_l{}"),
    **_phases((32, 52, 72), "36.0", "int", "voltage_swells_l{}"),
    # breaker / limiter
    "0-0:96.3.10": Obis("int", "breaker_state"),  # DSMR 2.2/3.0 switch position; e-MUCS 0 off, 1 on, 2 ready
    "0-0:17.0.0": Obis("float", "limiter_threshold_kw", "kW", ("A", "limiter_threshold_a")),  # DSMR 3.0: in A
    **_phases((31, 51, 71), "4.0", "float", "current_threshold_l{}_a", "A"),  # e-MUCS fuse supervision (L1)
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
# canonical unit of a reading -> the quantity in the field name
MBUS_QUANTITY: dict[str, str] = {"m3": "volume", "kWh": "energy", "GJ": "energy"}
# M-Bus device types (EN 13757-3), as DSMR writes them (decimal) -> the sample's measurement
MBUS_MEASUREMENT: dict[int, str] = {
    3: "gas",
    4: "heat", 12: "heat", 13: "heat",  # heat (outlet), heat (inlet), heat/cooling
    10: "cooling", 11: "cooling",  # outlet, inlet
    7: "water", 22: "water",  # water, cold water
    6: "hot_water", 21: "hot_water",  # warm water (30-90 °C), hot water
}
MBUS_OTHER = "mbus"  # any other or a missing device type; the sample then carries the tag device_type
