"""Firmware profiles: what registers a device model has and how to read them (docs/profiles.md).

A profile is a TOML file validated with the shared config rules (wire.config), so a mistake is reported as

    firmware_profiles/eastron_sdm630.toml: points[4].type: expected one of "bool", ..., got "float"

Profiles shipped with the agent live in the `firmware_profiles` package; `load_profile("eastron_sdm630")`
finds them by name, `load_profile("/etc/citynerve/my_meter.toml")` loads any file.

`Profile.point_specs()` turns the points into the planner's `PointSpec`s, each with its decoder built once;
`Profile.write_point(name)` a writable point (`writable = true`) into what the bus engine writes
(edge_agent/modbus/write.py), with the encoder that is the exact inverse of its decoder.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from edge_agent.modbus import frames
from edge_agent.modbus.decode import (
    BYTE_TYPES,
    FLOAT_TYPES,
    INTEGER_TYPES,
    MAX_STRING_REGISTERS,
    NUMERIC_TYPES,
    SIGNED_TYPES,
    Decoder,
    Encoding,
    Missing,
    NotRepresentable,
    Order,
    PointType,
    make_decoder,
    make_encoder,
    normalize_sentinels,
    orders_for,
    value_bits,
    width_of,
)
from edge_agent.modbus.plan import MODBUS_MAX_REGISTERS, PointSpec
from edge_agent.modbus.write import WritePoint
from wire.config import ConfigError, convert, invalid, read_toml
from wire.names import NAME_PATTERN
from wire.schema import ConfigName as Name

PROFILE_PACKAGE = "firmware_profiles"
MODBUS_MAX_BITS = 2000  # FC1/FC2 limit of the Modbus application protocol
_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")

Table = Literal["input", "holding", "coil", "discrete"]
BIT_TABLES = frozenset({"coil", "discrete"})
Address = Annotated[int, msgspec.Meta(ge=0, le=65535)]
# vendor, model (the `model` tag of every reading) and enum labels (string field values): the names rule
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=NAME_PATTERN, extra={
    "expect": "1..256 characters, no control characters (U+0000-U+001F, U+007F-U+009F)"})]

#: Device quirks a profile can name; docs/profiles.md says which vendor behaviour each one addresses.
WORKAROUNDS: dict[str, str] = {
    "one_request_per_point": "every point is read with its own request (devices or register groups that "
    "refuse multi-quantity reads, e.g. Carlo Gavazzi's 'limited to a word at a time' tables)",
    "no_gap_reads": "no request ever covers a register the profile does not name, whatever max_gap says "
    "(devices that answer exception 2 for any unmapped register inside a block)",
}
Workaround = Literal["one_request_per_point", "no_gap_reads"]

#: Conversions a point's decoded value can go through (docs/profiles.md "Transforms"), so that every profile emits
#: the shared vocabulary (wire/vocabulary.toml) in its type and unit.
TRANSFORMS: dict[str, str] = {
    "text": "an integer sent as its decimal digits, a string field (serial numbers that devices hold as integers)",
    "pf_four_quadrant": "Schneider Electric's four-quadrant power factor (-2..2: above 1 it is 2 - value, below -1 it "
    "is -2 - value) into the signed power factor -1..1, the sign that of the active power",
}
Transform = Literal["text", "pf_four_quadrant"]
WRITABLE_TABLES = frozenset({"holding", "coil"})  # input registers and discrete inputs are read-only in Modbus
Number = int | float


class Serial(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """RS-485 line settings: the device's factory default, or one it can be set to."""

    baud: Literal[1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200]
    parity: Literal["N", "E", "O"] = "N"
    data_bits: Literal[7, 8] = 8
    stop_bits: Literal[1, 2] = 1

    def describe(self) -> str:
        return f"{self.baud} {self.data_bits}{self.parity}{self.stop_bits}"


class UnreadableRange(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Addresses start..end (both included) of one table that no request may cover."""

    table: Table
    start: Address
    end: Address

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise invalid("end", f"{self.end} is before start {self.start}")


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
    sentinel: Literal["auto"] | list[int | float] | None = None  # raw values meaning "not available"
    measurement: Name | None = None  # None: the device's or profile's measurement
    description: str = ""
    length: Annotated[int, msgspec.Meta(ge=1, le=MAX_STRING_REGISTERS)] | None = None  # strings: registers
    encoding: Encoding | None = None  # strings: "ascii" (default) or "utf-8"
    enum: dict[str, Text] | None = None  # raw integer (as a TOML key) -> label
    bits: dict[str, Name] | None = None  # bit index (as a TOML key) -> field name
    scale_factor: Name | None = None  # name of the point holding this one's power-of-ten exponent
    internal: bool = False  # read (e.g. a scale factor) but not emitted as a field
    transform: Transform | None = None  # TRANSFORMS: a conversion of the decoded value
    # Commands (docs/control.md "Commands to devices"): an operator may write this point where a device opts in.
    writable: bool = False
    min: Number | None = None  # engineering units (after scale and offset); required for a writable register
    max: Number | None = None
    step: Number | None = None  # values allowed: min, min + step, ... (None: any value the registers hold)
    critical: bool = False  # a write needs two different operators' signatures
    write_function: Literal[5, 6, 15, 16] | None = None  # None: coil 5, one register 6, more registers 16

    def __post_init__(self) -> None:
        kind = self.type
        if kind == "bool" and self.table not in BIT_TABLES:
            raise invalid("type", f'a bool lives in the "coil" or "discrete" table, not in the {self.table} registers')
        if kind != "bool" and self.table in BIT_TABLES:
            raise invalid("table", f'the {self.table} table holds single bits: use type = "bool"')
        if kind == "string" and self.length is None:
            raise invalid("length", "a string needs its length in registers")
        if kind != "string":
            for key in ("length", "encoding"):
                if getattr(self, key) is not None:
                    raise invalid(key, f"only string points take a {key}")
        if self.address + self.width > 65536:
            where = "address" if self.table in BIT_TABLES else "register"
            raise invalid("address", f"a {self.type} at {self.address} would end past {where} 65535")
        if self.order is not None and self.order not in orders_for(kind):
            raise invalid("order", f"{self.order} does not fit {kind}; expected one of " + ", ".join(orders_for(kind)))
        for key, number in (("scale", self.scale), ("offset", self.offset)):
            if not math.isfinite(number):
                raise invalid(key, f"expected a finite number, got {number}")
        if self.scale == 0:
            raise invalid("scale", "must not be 0 (every value would read 0)")
        # `scale = 1.0` is not plain: it makes the value a float, which enums, bits and strings cannot be
        plain = self.scale == 1 and self.offset == 0 and type(self.scale) is int and type(self.offset) is int
        if not plain and (kind not in NUMERIC_TYPES or self.enum is not None or self.bits is not None):
            what = "an enumeration" if self.enum is not None else "a bitfield" if self.bits is not None else f"a {kind}"
            key = "scale" if self.scale != 1 or type(self.scale) is not int else "offset"
            raise invalid(key, f"{what} takes no scale or offset")
        if self.sentinel is not None:
            try:
                normalize_sentinels(kind, self.sentinel)
            except ValueError as exc:
                raise invalid("sentinel", str(exc)) from None
        if self.enum is not None:
            self._check_enum()
        if self.bits is not None:
            self._check_bits()
        if self.scale_factor is not None:
            if kind not in NUMERIC_TYPES or self.enum is not None or self.bits is not None:
                raise invalid("scale_factor", f"only plain numbers take a scale factor, not {self._kind_name()}")
            if self.scale_factor == self.name:
                raise invalid("scale_factor", "a point cannot be its own scale factor")
        if self.transform is not None:
            self._check_transform(plain)
        if self.writable:
            self._check_writable()
        else:
            for key in ("min", "max", "step", "critical", "write_function"):
                if getattr(self, key) is not None and getattr(self, key) is not False:
                    raise invalid(key, "only a writable point takes it (writable = true)")

    def _check_transform(self, plain: bool) -> None:
        wants = INTEGER_TYPES if self.transform == "text" else FLOAT_TYPES
        if self.type not in wants or self.enum is not None or self.bits is not None:
            what = "an integer" if self.transform == "text" else "a float"
            raise invalid("transform", f'"{self.transform}" takes {what} point, not {self._kind_name()}')
        if not plain or self.scale_factor is not None:
            raise invalid("transform", f'"{self.transform}" takes the value as the device sends it: no scale, offset '
                                       "or scale_factor")
        if self.writable:
            raise invalid("transform", "a transformed point cannot be written (its encoder would need the inverse)")

    def value_type(self) -> str:
        """The type of this point's field as the vocabulary names it (wire/vocabulary.py TYPES): a bitfield's
        fields are "bool" each; a number with a fractional scale or offset, or a scale factor, is a "float"."""
        if self.bits is not None or (self.type == "bool" and self.enum is None):
            return "bool"
        if self.type == "string" or self.enum is not None or self.transform == "text":
            return "string"
        plain = self.scale == 1 and self.offset == 0 and type(self.scale) is int and type(self.offset) is int
        if self.type in FLOAT_TYPES or self.scale_factor is not None or not plain:
            return "float"
        return "int"

    def _check_writable(self) -> None:
        if self.table not in WRITABLE_TABLES:
            raise invalid("writable", f"the {_table_words(self.table)} are read-only in Modbus: only holding "
                                      f"registers and coils can be written")
        if self.enum is not None or self.bits is not None or self.scale_factor is not None:
            what = "an enumeration" if self.enum is not None else "a bitfield" if self.bits is not None else \
                "a point with a scale factor"
            raise invalid("writable", f"{what} cannot be written: a writable point is a plain number or a coil")
        try:
            encode = make_encoder(self.type, self.order or "ABCD", self.scale, self.offset, sentinel=self.sentinel)
        except ValueError as exc:  # strings, 8-bit halves of a register
            raise invalid("writable", f"{exc}") from None
        functions = {"coil": (frames.WRITE_SINGLE_COIL, frames.WRITE_MULTIPLE_COILS),
                     "holding": ((frames.WRITE_SINGLE_REGISTER,) if self.width == 1 else ())
                     + (frames.WRITE_MULTIPLE_REGISTERS,)}[self.table]
        if self.write_function is not None and self.write_function not in functions:
            raise invalid("write_function", f"a {self.type} in the {_table_words(self.table)} is written with "
                                            f"function {' or '.join(map(str, functions))}")
        if self.table == "coil":
            for key in ("min", "max", "step"):
                if getattr(self, key) is not None:
                    raise invalid(key, "a coil is true or false: it takes no min, max or step")
            return
        for key in ("min", "max"):
            if getattr(self, key) is None:
                raise invalid(key, "a writable register needs min and max: the range an operator may set, in "
                                   "engineering units (after scale and offset)")
        for key in ("min", "max", "step"):
            number = getattr(self, key)
            if number is not None and not math.isfinite(number):
                raise invalid(key, f"expected a finite number, got {number}")
        if self.min > self.max:  # type: ignore[operator]
            raise invalid("max", f"{self.max} is below min {self.min}")
        if self.step is not None and self.step <= 0:
            raise invalid("step", f"expected a number greater than 0, got {self.step}")
        for key in ("min", "max"):
            try:
                encode(getattr(self, key))
            except NotRepresentable as exc:
                raise invalid(key, f"cannot be written to this point: {exc}") from None

    def _kind_name(self) -> str:
        if self.enum is not None:
            return "an enumeration"
        if self.bits is not None:
            return "a bitfield"
        return f"a {self.type}"

    def _check_enum(self) -> None:
        if self.bits is not None:
            raise invalid("enum", "a point is either an enumeration or a bitfield, not both")
        if self.type not in INTEGER_TYPES and self.type != "bool":
            raise invalid("enum", f"an enumeration needs an integer or bool type, not {self.type}")
        if not self.enum:
            raise invalid("enum", "expected at least one value")
        low, high = _int_range(self.type)
        for key in self.enum:
            number = _int_key(key)
            if number is None:
                raise invalid("enum", f'key "{key}" is not an integer')
            if not low <= number <= high:
                raise invalid("enum", f"{number} is not a possible {self.type} value ({low}..{high})")

    def _check_bits(self) -> None:
        if self.type not in INTEGER_TYPES:
            raise invalid("bits", f"a bitfield needs an integer type, not {self.type}")
        if not self.bits:
            raise invalid("bits", "expected at least one bit")
        count = value_bits(self.type)
        seen: dict[str, str] = {}
        for key, name in self.bits.items():
            number = _int_key(key)
            if number is None or not 0 <= number < count:
                raise invalid("bits", f'bit "{key}" does not exist in a {count}-bit {self.type} (0..{count - 1})')
            if name in seen:
                raise invalid("bits", f'"{name}" names bits {seen[name]} and {key}')
            seen[name] = key

    @property
    def width(self) -> int:
        """Registers occupied; bits for the coil and discrete tables."""
        return width_of(self.type, self.length)

    def enum_table(self) -> dict[int, str] | None:
        return None if self.enum is None else {_int_key(k): v for k, v in self.enum.items()}  # type: ignore[misc]

    def bits_table(self) -> dict[int, str] | None:
        return None if self.bits is None else {_int_key(k): v for k, v in self.bits.items()}  # type: ignore[misc]

    def fields(self) -> list[str]:
        """The field names this point adds to a reading (a bitfield adds one per named bit)."""
        if self.internal:
            return []
        return list(self.bits.values()) if self.bits is not None else [self.name]


def _int_key(key: str) -> int | None:
    try:
        return int(key, 0)
    except ValueError:
        return None


def _int_range(type_: str) -> tuple[int, int]:
    if type_ == "bool":
        return 0, 1
    bits = value_bits(type_)
    if type_ in SIGNED_TYPES:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


class Profile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    vendor: Text
    model: Text
    measurement: Name  # default measurement of every point
    points: Annotated[list[Point], msgspec.Meta(min_length=1)]
    description: str = ""
    firmware: str = ""  # firmware versions the map was checked against, and notes
    default_unit: Annotated[int, msgspec.Meta(ge=1, le=255)] | None = None  # factory Modbus unit id
    serial: Serial | None = None  # factory RS-485 settings (None: a Modbus TCP-only device)
    serial_alternatives: list[Serial] = []  # other settings a scan should try, most likely first
    order: Literal["ABCD", "CDAB", "BADC", "DCBA"] = "ABCD"  # default byte order of the points
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=MODBUS_MAX_REGISTERS)] = MODBUS_MAX_REGISTERS
    max_bits: Annotated[int, msgspec.Meta(ge=1, le=MODBUS_MAX_BITS)] = MODBUS_MAX_BITS
    max_gap: Annotated[int, msgspec.Meta(ge=0, le=MODBUS_MAX_REGISTERS - 2)] = 0
    unreadable: list[UnreadableRange] = []
    workarounds: list[Workaround] = []

    def __post_init__(self) -> None:
        self._check_serial()
        if "no_gap_reads" in self.workarounds and self.max_gap > 0:
            raise invalid("max_gap", f"is {self.max_gap} but the no_gap_reads workaround forbids bridging gaps")
        if len(set(self.workarounds)) != len(self.workarounds):
            raise invalid("workarounds", "a workaround is listed twice")
        claimed: dict[tuple[str, str], str] = {}
        by_name: dict[str, list[int]] = {}
        for i, point in enumerate(self.points):
            limit, limit_key = (self.max_bits, "max_bits") if point.table in BIT_TABLES else (
                self.max_registers, "max_registers")
            if point.width > limit:
                unit = "bits" if point.table in BIT_TABLES else "registers"
                raise invalid(f"points[{i}].{'length' if point.type == 'string' else 'type'}",
                              f"a {point.type} needs {point.width} {unit} but {limit_key} is {limit}")
            order = point.order or self.order
            if order not in orders_for(point.type):  # pragma: no cover - every profile order fits every type
                raise invalid(f"points[{i}].order", f"{order} does not fit {point.type}")
            measurement = point.measurement or self.measurement
            names = [(point.name, "name")] + [(f, "bits") for f in (point.bits or {}).values()]
            for field, key in names:
                if (measurement, field) in claimed:
                    owner = claimed[measurement, field]
                    raise invalid(f"points[{i}].{key}",
                                  f'"{field}" is already used by {owner} in measurement "{measurement}"')
                claimed[measurement, field] = f"points[{i}]" if key == "name" else f"a bit of points[{i}]"
            by_name.setdefault(point.name, []).append(i)
        self._check_scale_factors(by_name)
        for name, indexes in by_name.items():
            writable = [i for i in indexes if self.points[i].writable]
            if writable and len(indexes) > 1:
                others = [i for i in indexes if i != writable[0]]
                raise invalid(f"points[{writable[0]}].name", f'"{name}" also names points {others}: a writable '
                                                             f"point's name must be unique in the profile (a command "
                                                             f"names it)")
        self._check_overlaps()
        self._check_unreadable()
        for i, point in enumerate(self.points):  # so that point_specs() can never fail on a loaded profile
            try:
                _decoder(point, self.order)
            except ValueError as exc:  # pragma: no cover - every case is caught by the checks above
                raise invalid(f"points[{i}]", str(exc)) from None

    def _check_serial(self) -> None:
        seen = [self.serial] if self.serial is not None else []
        for i, alternative in enumerate(self.serial_alternatives):
            if alternative in seen:
                raise invalid(f"serial_alternatives[{i}]", f"{alternative.describe()} is listed already")
            seen.append(alternative)

    def _check_scale_factors(self, by_name: dict[str, list[int]]) -> None:
        for i, point in enumerate(self.points):
            if point.scale_factor is None:
                continue
            key = f"points[{i}].scale_factor"
            found = by_name.get(point.scale_factor, [])
            if not found:
                raise invalid(key, f'no point is named "{point.scale_factor}"')
            if len(found) > 1:
                raise invalid(key, f'"{point.scale_factor}" names points {found}: a scale factor\'s name must be unique')
            sf = self.points[found[0]]
            if sf.measurement != point.measurement:
                raise invalid(key, f'"{sf.name}" is in another measurement; a scale factor must share its point\'s')
            if sf.type not in INTEGER_TYPES or sf.enum is not None or sf.bits is not None:
                raise invalid(key, f'"{sf.name}" is {sf._kind_name()}; a scale factor is a plain integer (int16)')
            if sf.scale != 1 or sf.offset != 0 or sf.scale_factor is not None:
                raise invalid(key, f'"{sf.name}" is itself scaled; a scale factor is read as it is')

    def _check_overlaps(self) -> None:
        by_table: dict[str, list[int]] = {}
        for i, point in enumerate(self.points):
            by_table.setdefault(point.table, []).append(i)
        for table, indexes in by_table.items():
            indexes.sort(key=lambda i: self.points[i].address)
            for before, after in itertools.pairwise(indexes):
                a, b = self.points[before], self.points[after]
                if b.address < a.address + a.width:
                    # The planner gives every point registers of its own, so the high and the low byte of one
                    # register cannot be two points (yet): say so rather than leave the reader puzzled.
                    halves = ("; the two bytes of one register cannot be two points yet (the read planner gives "
                              "every point registers of its own)") if a.type in BYTE_TYPES and b.type in BYTE_TYPES else ""
                    raise invalid(
                        f"points[{after}].address",
                        f'"{b.name}" ({_span(b)}) overlaps "{a.name}" ({_span(a)}, points[{before}]) '
                        f"in the {_table_words(table)}{halves}",
                    )

    def _check_unreadable(self) -> None:
        for i, point in enumerate(self.points):
            for j, block in enumerate(self.unreadable):
                if block.table == point.table and point.address <= block.end and point.address + point.width > block.start:
                    raise invalid(f"points[{i}].address",
                                  f'"{point.name}" ({_span(point)}) lies in unreadable[{j}] '
                                  f"(0x{block.start:04X}..0x{block.end:04X})")

    def point_specs(self, measurement: str | None = None) -> list[PointSpec]:
        """The points with their decoders built, ready for plan_reads.

        `measurement` (a device's override) replaces the profile's default measurement; points that name their
        own measurement keep it. Internal points come with emit=False; `scale_factor` names the field whose
        value is this point's power-of-ten exponent (unique within the profile, same measurement).
        """
        default = measurement or self.measurement
        return [
            PointSpec(
                field=p.name,
                table=p.table,
                address=p.address,
                width=p.width,
                decode=_decoder(p, self.order),
                measurement=p.measurement or default,
                scale_factor=p.scale_factor,
                emit=not p.internal,
            )
            for p in self.points
        ]

    def writable_points(self) -> list[str]:
        """The names of the points a device with this profile may opt in to writing."""
        return [p.name for p in self.points if p.writable]

    def write_point(self, name: str) -> WritePoint:
        """The writable point `name`, ready for the bus engine. KeyError if there is no writable point of that
        name (edge-agent check refuses such an opt-in, edge_agent/config.py)."""
        point = next((p for p in self.points if p.name == name and p.writable), None)
        if point is None:
            raise KeyError(name)
        order = point.order or self.order
        if point.write_function is not None:
            function = point.write_function
        elif point.table == "coil":
            function = frames.WRITE_SINGLE_COIL
        else:
            function = frames.WRITE_SINGLE_REGISTER if point.width == 1 else frames.WRITE_MULTIPLE_REGISTERS
        return WritePoint(
            name=point.name, table=point.table, address=point.address, width=point.width, function=function,
            type=point.type, encode=make_encoder(point.type, order, point.scale, point.offset, sentinel=point.sentinel),
            decode=_decoder(point, self.order), minimum=point.min, maximum=point.max, step=point.step,
            critical=point.critical, unit=point.unit,
        )

    def field_units(self, measurement: str | None = None) -> dict[str, dict[str, str | None]]:
        """{measurement: {field: unit}} of every field a full poll can emit; a bitfield's flags have None (no unit
        applies). What `edge-agent check` holds against the vocabulary (wire/vocabulary.py `problems`)."""
        default = measurement or self.measurement
        out: dict[str, dict[str, str | None]] = {}
        for point in self.points:
            for field in point.fields():
                out.setdefault(point.measurement or default, {})[field] = None if point.bits else point.unit
        return out

    def fields(self, measurement: str | None = None) -> dict[str, list[str]]:
        """{measurement: [field, ...]}: every field a full poll of this profile can emit."""
        default = measurement or self.measurement
        out: dict[str, list[str]] = {}
        for point in self.points:
            if point.fields():
                out.setdefault(point.measurement or default, []).extend(point.fields())
        return out


def _decoder(point: Point, default_order: str) -> Decoder:
    decode = make_decoder(
        point.type,
        point.order or default_order,
        point.scale,
        point.offset,
        sentinel=point.sentinel,
        enum=point.enum_table(),
        bits=point.bits_table(),
        length=point.length,
        encoding=point.encoding or "ascii",
    )
    if point.transform is None:
        return decode
    convert = _TRANSFORM_FUNCTIONS[point.transform]

    def transformed(words: Sequence[int]) -> object:
        value = decode(words)
        return value if value is None or isinstance(value, Missing) else convert(value)

    return transformed  # type: ignore[return-value]


def _pf_four_quadrant(value: float) -> float:
    # Schneider's "4Q FP PF": 0 deg = 1, 90 deg = 0, 180 deg = -1, 270 deg = 2 (and -2); the part beyond +-1 is the
    # leading half of quadrants 4 and 2. Folded back, the magnitude is the power factor and the sign that of P.
    if value > 1:
        return 2.0 - value
    if value < -1:
        return -2.0 - value
    return value


_TRANSFORM_FUNCTIONS = {"text": str, "pf_four_quadrant": _pf_four_quadrant}


def _span(point: Point) -> str:
    return f"0x{point.address:04X}..0x{point.address + point.width - 1:04X}"


def _table_words(table: str) -> str:
    return {"coil": "coils", "discrete": "discrete inputs"}.get(table, f"{table} registers")


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


__all__ = [
    "BIT_TABLES",
    "FLOAT_TYPES",
    "TRANSFORMS",
    "WORKAROUNDS",
    "Point",
    "Profile",
    "Serial",
    "UnreadableRange",
    "available_profiles",
    "load_profile",
]
