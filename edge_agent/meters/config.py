"""DL/T 645, CJ/T 188 and M-Bus meters in agent.toml: `kind = "dlt645"`, `"cjt188"`, `"mbus"` devices on a serial
[[buses]] entry, whose line settings they use (2400 8E1 unless the bus says otherwise; edge_agent/config.py
checks the bus). Every error names the key; edge_agent/config.py adds the file and the device's place.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Literal

import msgspec

from edge_agent.cjt188 import frames as cjt188_frames
from edge_agent.dlt645.identifiers import Identifier, table
from edge_agent.modbus.config import DeviceId
from wire.config import Duration, invalid
from wire.schema import ConfigName as Name
from wire.schema import ConfigTagValue as TagValue

Dlt645Address = Annotated[str, msgspec.Meta(
    pattern=r"^[0-9]{12}\Z", extra={"expect": 'the meter\'s 12-digit address as on its nameplate, e.g. "000102030425"'})]
Cjt188Address = Annotated[str, msgspec.Meta(
    pattern=r"^[0-9]{14}\Z", extra={"expect": 'the meter\'s 14-digit address, e.g. "11111111111111"'})]
MbusSecondary = Annotated[str, msgspec.Meta(
    pattern=r"^[0-9Ff]{8}[0-9A-Fa-f]{8}\Z",
    extra={"expect": 'a secondary address: 16 hex digits, identification (8 digits), manufacturer (4), version (2), '
                     'medium (2), F for "any", e.g. "26718590FFFFFFFF"'})]


def _common(device: Dlt645Device | Cjt188Device | MbusDevice) -> None:
    if device.interval <= 0:
        raise invalid("interval", "must be more than 0 s")


class Dlt645Device(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="dlt645", tag_field="kind"):
    """A DL/T 645-2007 or -1997 electricity meter on a serial bus (docs/dlt645.md).

    [[devices]]
    kind = "dlt645"
    id = "flat-12"
    bus = "rs485-1"
    address = "000102030425"         # 12 digits, as on the nameplate
    edition = "2007"                 # or "1997"
    identifiers = ["energy_import", "voltage_l1", "current_l1", "power"]   # default: every numeric one
    interval = "60s"
    """

    id: DeviceId
    bus: DeviceId
    address: Dlt645Address
    edition: Literal["2007", "1997"] = "2007"
    # By name, from firmware_profiles/dlt645/<edition>.toml. Default: every numeric identifier of the table (not
    # the address, serial number, date and time: they do not change from poll to poll; name them to read them).
    identifiers: list[Name] = []
    interval: Duration = Duration(60.0)
    tags: dict[Name, TagValue] = {}
    measurement: Name | None = None  # default: the table's ("electricity")

    def __post_init__(self) -> None:
        _common(self)
        known = table(self.edition).by_name()
        for index, name in enumerate(self.identifiers):
            if name in self.identifiers[:index]:
                raise invalid(f"identifiers[{index}]", f'device "{self.id}": "{name}" is listed already')
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f'did you mean "{close[0]}"?' if close else f"known: {', '.join(known)}"
                raise invalid(f"identifiers[{index}]", f'device "{self.id}": DL/T 645-{self.edition} has no identifier '
                                                       f'"{name}" in firmware_profiles/dlt645/{self.edition}.toml '
                                                       f"({hint})")

    def reads(self) -> list[Identifier]:
        """The identifiers read every poll, in the table's order when defaulted, else in the order given."""
        t = table(self.edition)
        if self.identifiers:
            by_name = t.by_name()
            return [by_name[name] for name in self.identifiers]
        return [i for i in t.identifiers if i.numeric]


class Cjt188Device(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="cjt188", tag_field="kind"):
    """A CJ/T 188-2004 water, gas or heat meter on a serial bus (docs/cjt188.md).

    [[devices]]
    kind = "cjt188"
    id = "water-3"
    bus = "rs485-1"
    meter_type = "cold_water"        # or the type byte: 0x10
    address = "11111111111111"       # 14 digits
    di_order = "low_first"           # vendor variant: "high_first" sends 901F as 90 1F
    unit_first = false               # vendor variant (heat meters): the unit byte before its value
    """

    id: DeviceId
    bus: DeviceId
    meter_type: str | int
    address: Cjt188Address
    di_order: Literal["low_first", "high_first"] = "low_first"
    unit_first: bool = False
    # Water, gas and heat meters are often battery powered and count their reads: every 5 minutes by default.
    interval: Duration = Duration(300.0)
    tags: dict[Name, TagValue] = {}
    measurement: Name | None = None  # default: by meter type (water, gas, heat, cooling)

    def __post_init__(self) -> None:
        _common(self)
        self.type_byte()  # raises for an unknown type

    def type_byte(self) -> int:
        value = self.meter_type
        if isinstance(value, str) and value in cjt188_frames.TYPE_NAMES:
            return cjt188_frames.TYPE_NAMES[value]
        if isinstance(value, int) and value in cjt188_frames.TYPE_NAMES.values():
            return value
        names = ", ".join(f'"{n}" ({b:02X}H)' for n, b in cjt188_frames.TYPE_NAMES.items())
        extra = " (40H electricity meters speak DL/T 645: kind = \"dlt645\")" if value == 0x40 else ""
        shown = f"0x{value:02X}" if isinstance(value, int) else f'"{value}"'
        raise invalid("meter_type", f'device "{self.id}": expected one of {names}, or the type byte as a number '
                                    f"(0x10), got {shown}{extra}")


class MbusDevice(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="mbus", tag_field="kind"):
    """A wired M-Bus meter (EN 13757-2/-3) behind an M-Bus level converter on a serial bus (docs/mbus.md).

    [[devices]]
    kind = "mbus"
    id = "heat-1"
    bus = "mbus-1"
    address = 5                      # primary address 0..250, or:
    # secondary = "26718590FFFFFFFF" # identification, manufacturer, version, medium; F = any
    max_telegrams = 8                # a multi-telegram answer is read up to this many telegrams
    """

    id: DeviceId
    bus: DeviceId
    address: Annotated[int, msgspec.Meta(ge=0, le=250)] | None = None
    secondary: MbusSecondary | None = None
    max_telegrams: Annotated[int, msgspec.Meta(ge=1, le=32)] = 8
    interval: Duration = Duration(300.0)  # battery-powered meters count their reads
    tags: dict[Name, TagValue] = {}
    measurement: Name | None = None  # default: by the meter's medium (heat, water, gas, electricity, meter)

    def __post_init__(self) -> None:
        _common(self)
        if (self.address is None) == (self.secondary is None):
            raise invalid("address", f'device "{self.id}": give the primary address (address = 0..250) or the '
                                     f'secondary address (secondary = "26718590FFFFFFFF"), one of them')

    @property
    def where(self) -> str:
        return f"primary address {self.address}" if self.address is not None else f"secondary address {self.secondary}"


MeterDevice = Dlt645Device | Cjt188Device | MbusDevice
METER_KINDS = Dlt645Device | Cjt188Device | MbusDevice  # for isinstance


def describe(device: MeterDevice) -> str:
    """What `edge-agent check` says of a meter, after its bus."""
    if isinstance(device, Dlt645Device):
        what = f"DL/T 645-{device.edition} address {device.address}, {len(device.reads())} identifier(s)"
    elif isinstance(device, Cjt188Device):
        what = f"CJ/T 188 {device.type_byte():02X}H address {device.address}"
        variants = [f"di_order {device.di_order}"] if device.di_order != "low_first" else []
        variants += ["unit_first"] if device.unit_first else []
        what += f" ({', '.join(variants)})" if variants else ""
    else:
        what = f"M-Bus {device.where}, up to {device.max_telegrams} telegram(s)"
    return f"{what}, every {float(device.interval):g}s"


def bus_key(device: MeterDevice) -> tuple[str, str]:
    """What two meters on one bus must not share: their protocol's address (a CJ/T 188 address with its type)."""
    if isinstance(device, Dlt645Device):
        return "DL/T 645 address", device.address
    if isinstance(device, Cjt188Device):
        return "CJ/T 188 address", f"{device.type_byte():02X}H {device.address}"
    if device.address is not None:
        return "M-Bus primary address", str(device.address)
    return "M-Bus secondary address", device.secondary.upper() if device.secondary else ""
