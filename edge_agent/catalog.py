"""`edge-agent catalog agent.toml`: the data catalogue of one gateway from its configuration alone (docs/catalog.md).
No device I/O: a Modbus device's fields are its profile's points, a serial device's are its protocol's known fields
(edge_agent/serial/protocols.py `fields`) or its ASCII settings; a SunSpec device names its fields at discovery, so
its row says so. Names, units, types and descriptions come from the vocabulary (wire/catalog.py `row`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.meters.config import METER_KINDS
from wire import catalog

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig, ModbusKind
    from edge_agent.meters.config import MeterDevice
    from edge_agent.serial.config import SerialDevice

MBUS_NOTE = ("fields named by the meter's data records (DIF/VIF, docs/mbus.md), known when it is read; "
             "edge-collector catalog lists what it stores")
SUNSPEC_NOTE = ("fields known after SunSpec discovery (docs/sunspec.md): the models the device offers; "
                "edge-collector catalog lists what it stores")


def rows(cfg: AgentConfig) -> list[catalog.Row]:
    from edge_agent.serial.config import SerialDevice

    gateway = str(cfg.gateway.id)
    where = getattr(cfg.gateway, "location", None)  # [gateway] location (the fleet inventory's), when configured
    location = catalog.location_text(where.lat, where.lon, where.alt) if where is not None else ""
    out: list[catalog.Row] = []
    for device in cfg.devices:
        common = {"gateway": gateway, "location": location, "device": str(device.id)}
        if isinstance(device, SerialDevice):
            out += _serial_rows(device, common)
        elif isinstance(device, METER_KINDS):
            out += _meter_rows(device, common)
        else:
            out += _modbus_rows(device, common)
    return out


def _meter_rows(device: MeterDevice, common: dict[str, str]) -> list[catalog.Row]:
    """DL/T 645: the identifiers the device reads (firmware_profiles/dlt645/<edition>.toml); CJ/T 188: its meter
    type's metering data (901F); M-Bus: named by the meter's own data records, known only when read."""
    from edge_agent.cjt188.frames import METER_TYPES, METERING_FIELDS
    from edge_agent.dlt645.identifiers import table
    from edge_agent.meters.config import Cjt188Device, Dlt645Device

    if isinstance(device, Dlt645Device):
        source = f"dlt645 {device.edition}"
        measurement = device.measurement or table(device.edition).measurement
        return [catalog.row(**common, source=source, measurement=measurement, field=i.name, unit=i.unit,
                            description=i.description) for i in device.reads()]
    if isinstance(device, Cjt188Device):
        kind = METER_TYPES[device.type_byte()][0]
        return [catalog.row(**common, source=f"cjt188 {device.meter_type}", measurement=device.measurement or kind,
                            field=field, unit=unit) for field, unit in METERING_FIELDS[kind].items()]
    return [catalog.note_row(**common, source="mbus", measurement=device.measurement or "", note=MBUS_NOTE)]


def _modbus_rows(device: ModbusKind, common: dict[str, str]) -> list[catalog.Row]:
    from edge_agent.profiles import load_profile

    kind = type(device).__struct_config__.tag
    if device.profile == "sunspec":
        return [catalog.note_row(**common, source=f"{kind} sunspec", note=SUNSPEC_NOTE)]
    profile = load_profile(device.profile)
    source = f"{kind} {Path(device.profile).name}"  # a bundled profile's name, or a profile file's name
    out = []
    for point in profile.points:
        measurement = point.measurement or device.measurement or profile.measurement
        for field in point.fields():
            if point.bits is not None:  # one flag per bit: no unit; the point's description says of what
                unit, value_type = None, "bool"
            else:
                unit, value_type = point.unit, point.value_type()
            out.append(catalog.row(**common, source=source, measurement=measurement, field=field, unit=unit,
                                   type=value_type, description=point.description))
    return out


def _serial_rows(device: SerialDevice, common: dict[str, str]) -> list[catalog.Row]:
    from edge_agent.serial.protocols import protocol_info

    info = protocol_info(device.protocol)
    source = f"serial {device.protocol}"
    default = device.measurement or info.measurement
    if info.fields is None:  # ascii: the device's settings name its fields
        from edge_agent.serial.ascii_line import AsciiLineDecoder

        fields = {"": {name: unit or None for name, unit in AsciiLineDecoder(device.ascii).field_units().items()}}
    else:
        fields = info.fields()
    out = [catalog.row(**common, source=source, measurement=measurement or default, field=field, unit=unit)
           for measurement, names in fields.items() for field, unit in names.items()]
    if device.protocol == "iec62056-21":
        out.append(catalog.row(**common, source=source, measurement=default, field="obis_*", unit=None,
                               note="any other OBIS code the meter sends, named by its code (docs/serial.md)"))
    return out
