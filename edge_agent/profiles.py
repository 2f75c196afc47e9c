"""Firmware profiles: what registers a device model has and how to read them (docs/profiles.md).

A profile is a TOML file validated with the shared config rules (wire.config), so a mistake is reported as

    firmware_profiles/eastron_sdm630.toml: points[4].type: expected one of "int16", ..., got "float"

Profiles shipped with the agent live in the `firmware_profiles` package; `load_profile("eastron_sdm630")`
finds them by name, `load_profile("/etc/citynerve/my_meter.toml")` loads any file.
"""

from __future__ import annotations

import itertools
import math
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from edge_agent.modbus.decode import WIDTHS, Order, PointType, make_decoder, orders_for
from edge_agent.modbus.plan import MODBUS_MAX_REGISTERS, PointSpec
from wire.config import ConfigError, convert, invalid, read_toml
from wire.schema import ConfigName as Name

PROFILE_PACKAGE = "firmware_profiles"
_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")

Table = Literal["input", "holding"]
Address = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class Point(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One value of a device: `name` becomes the field name in the reading."""

    name: Name
    address: Address  # 0-based PDU address (manual's 30001 / 40001 -> 0)
    type: PointType
    table: Table = "input"
    order: Order | None = None  # None: the profile's `order`
    scale: int | float = 1  # value = raw * scale + offset; integers keep integer points integer
    offset: int | float = 0
    unit: str = ""  # informational (docs, dashboards); not sent on the wire
    measurement: Name | None = None  # None: the device's or profile's measurement
    description: str = ""

    def __post_init__(self) -> None:
        if self.address + WIDTHS[self.type] > 65536:
            raise invalid(
                "address",
                f"a {self.type} at {self.address} would end past register 65535",
            )
        if self.order is not None and self.order not in orders_for(self.type):
            raise invalid(
                "order",
                f"{self.order} does not fit {self.type}; expected one of " + ", ".join(orders_for(self.type)),
            )
        for key, number in (("scale", self.scale), ("offset", self.offset)):
            if not math.isfinite(number):
                raise invalid(key, f"expected a finite number, got {number}")
        if self.scale == 0:
            raise invalid("scale", "must not be 0 (every value would read 0)")

    @property
    def width(self) -> int:
        return WIDTHS[self.type]


class Profile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    vendor: Text
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]
    measurement: Name  # default measurement of every point
    points: Annotated[list[Point], msgspec.Meta(min_length=1)]
    description: str = ""
    order: Literal["ABCD", "CDAB", "BADC", "DCBA"] = "ABCD"  # default byte order of the points
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=MODBUS_MAX_REGISTERS)] = MODBUS_MAX_REGISTERS
    max_gap: Annotated[int, msgspec.Meta(ge=0, le=MODBUS_MAX_REGISTERS - 2)] = 0

    def __post_init__(self) -> None:
        claimed: dict[tuple[str, str], int] = {}
        for i, point in enumerate(self.points):
            if point.width > self.max_registers:
                raise invalid(
                    f"points[{i}].type",
                    f"a {point.type} needs {point.width} registers but max_registers is {self.max_registers}",
                )
            order = point.order or self.order
            if order not in orders_for(point.type):  # pragma: no cover - every profile order fits every type
                raise invalid(f"points[{i}].order", f"{order} does not fit {point.type}")
            key = (point.measurement or self.measurement, point.name)
            if key in claimed:
                raise invalid(
                    f"points[{i}].name",
                    f'"{point.name}" is already used by points[{claimed[key]}] in measurement "{key[0]}"',
                )
            claimed[key] = i

        by_table: dict[str, list[int]] = {}
        for i, point in enumerate(self.points):
            by_table.setdefault(point.table, []).append(i)
        for table, indexes in by_table.items():
            indexes.sort(key=lambda i: self.points[i].address)
            for before, after in itertools.pairwise(indexes):
                a, b = self.points[before], self.points[after]
                if b.address < a.address + a.width:
                    raise invalid(
                        f"points[{after}].address",
                        f'"{b.name}" ({_span(b)}) overlaps "{a.name}" ({_span(a)}, points[{before}]) '
                        f"in the {table} registers",
                    )

    def point_specs(self, measurement: str | None = None) -> list[PointSpec]:
        """The points with their decoders built, ready for plan_reads.

        `measurement` (a device's override) replaces the profile's default measurement; points that name their
        own measurement keep it.
        """
        default = measurement or self.measurement
        return [
            PointSpec(
                field=p.name,
                table=p.table,
                address=p.address,
                width=p.width,
                decode=make_decoder(p.type, p.order or self.order, p.scale, p.offset),
                measurement=p.measurement or default,
            )
            for p in self.points
        ]


def _span(point: Point) -> str:
    return f"0x{point.address:04X}..0x{point.address + point.width - 1:04X}"


def available_profiles() -> list[str]:
    """Names of the profiles shipped with the agent."""
    root = resources.files(PROFILE_PACKAGE)
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in root.iterdir()
        if entry.is_file() and entry.name.endswith(".toml")
    )


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by bare name ("eastron_sdm630"), or any profile file by path.

    Anything with a path separator or a ".toml" suffix is a path. Raises ConfigError naming the file and key.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(".toml"):
        return convert(read_toml(text), Profile, text)
    if not _PROFILE_NAME.match(text):
        raise ConfigError(
            text, "", "not a profile name (lowercase letters, digits, _) nor a path to a .toml file"
        )
    resource = resources.files(PROFILE_PACKAGE) / f"{text}.toml"
    if not resource.is_file():
        known = ", ".join(available_profiles()) or "none"
        raise ConfigError(text, "", f"no firmware profile of that name (shipped profiles: {known})")
    with resources.as_file(resource) as path:
        return convert(read_toml(path), Profile, f"{PROFILE_PACKAGE}/{text}.toml")
