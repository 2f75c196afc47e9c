"""SunSpec model definitions: JSON files in, flat point layouts and decoded values out. Pure, no I/O but reading
the model files.

A SunSpec device describes itself as a chain of models (docs/sunspec.md). Each model's registers are defined
by the SunSpec Alliance's model files (github.com/sunspec/models, `json/model_<id>.json`, Apache-2.0), shipped
unchanged in `firmware_profiles/sunspec_models/`. A model file holds one top-level group:

    {"id": 103, "group": {"name": "inverter", "points": [{"name": "ID", ...}, {"name": "L", ...}, ...],
                          "groups": [{"name": "module", "count": "N", "points": [...]}, ...]}}

`ModelDef.layout(length)` turns it into the flat list of points of one model instance: offsets counted from the
model's ID register, repeating groups expanded. A group whose `count` names a point (model 160's `module`,
count `N`) repeats as often as the model's length word allows: n = (L - fixed part) / group length, which is
what the SunSpec specification prescribes for a single trailing repeating group. Layouts that need register
values to be known (several variable groups, variable groups nested in variable groups) are refused with
`ModelLayoutError`; the walker then lists the model as not mapped instead of guessing.

`decode_value(point, registers)` applies SunSpec's "not implemented" values: int16 0x8000, uint16 0xFFFF,
acc16/acc32/acc64 0, uint32 0xFFFFFFFF, int32 0x80000000, float NaN, an all-zero string, ... decode to None.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "firmware_profiles"
MODEL_DIR = "sunspec_models"

#: Registers each SunSpec type occupies when a point gives no `size` (some model file versions leave it out).
TYPE_SIZES: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "count": 1,
    "acc16": 1,
    "enum16": 1,
    "bitfield16": 1,
    "sunssf": 1,
    "pad": 1,
    "int32": 2,
    "uint32": 2,
    "acc32": 2,
    "enum32": 2,
    "bitfield32": 2,
    "float32": 2,
    "ipaddr": 2,
    "int64": 4,
    "uint64": 4,
    "acc64": 4,
    "bitfield64": 4,
    "float64": 4,
    "eui48": 4,
    "ipv6addr": 8,
}

#: SunSpec type -> the register type the agent decodes it as (edge_agent.modbus.decode / profiles names).
#: Accumulators, enums, bitfields and counts are unsigned. Types missing here (pad, eui48, ipaddr, ipv6addr)
#: are not turned into points.
PROFILE_TYPES: dict[str, str] = {
    "int16": "int16",
    "sunssf": "int16",
    "uint16": "uint16",
    "count": "uint16",
    "acc16": "uint16",
    "enum16": "uint16",
    "bitfield16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "acc32": "uint32",
    "enum32": "uint32",
    "bitfield32": "uint32",
    "float32": "float32",
    "int64": "int64",
    "uint64": "uint64",
    "acc64": "uint64",
    "bitfield64": "uint64",
    "float64": "float64",
    "string": "string",
}

#: The raw unsigned register value that means "not implemented", per SunSpec type (floats: NaN, strings: all
#: registers zero; both handled in decode_value).
NOT_IMPLEMENTED: dict[str, int] = {
    "int16": 0x8000,
    "sunssf": 0x8000,
    "uint16": 0xFFFF,
    "count": 0,
    "acc16": 0,
    "enum16": 0xFFFF,
    "bitfield16": 0xFFFF,
    "pad": 0x8000,
    "int32": 0x8000_0000,
    "uint32": 0xFFFF_FFFF,
    "acc32": 0,
    "enum32": 0xFFFF_FFFF,
    "bitfield32": 0xFFFF_FFFF,
    "ipaddr": 0,
    "int64": 0x8000_0000_0000_0000,
    "uint64": 0xFFFF_FFFF_FFFF_FFFF,
    "acc64": 0,
    "bitfield64": 0xFFFF_FFFF_FFFF_FFFF,
}

_SIGNED = frozenset({"int16", "sunssf", "int32", "int64"})

# A string point longer than this many registers is not believable in a model file (the longest SunSpec
# strings are 16 registers); the bound keeps a broken model file from producing absurd points.
_MAX_POINT_SIZE = 125


class ModelError(ValueError):
    """A model file that cannot be used: not JSON, not the SunSpec model shape, an unknown type."""


class ModelLayoutError(ValueError):
    """A model instance whose declared length does not fit its definition, or whose layout needs values."""


@dataclass(frozen=True)
class PointDef:
    """One point of one model instance, at `offset` registers from the model's ID register.

    `key` is unique within the model instance: the point name, prefixed by the group path below the model
    ("module_2_DCA" for point DCA of the second repetition of group "module"). `sf` is the key of the point
    holding this one's scale factor exponent, or an int for a constant exponent, or None.
    """

    key: str
    name: str
    type: str
    size: int
    offset: int
    sf: str | int | None = None
    units: str = ""
    label: str = ""
    desc: str = ""
    symbols: tuple[tuple[str, int], ...] = ()
    access: str = "R"
    mandatory: bool = False
    static: bool = False

    @property
    def profile_type(self) -> str | None:
        """The agent's register type for this point, or None for types that are not read (pad, addresses)."""
        return PROFILE_TYPES.get(self.type)


@dataclass(frozen=True)
class _PointTemplate:
    name: str
    type: str
    size: int
    sf: str | int | None
    units: str
    label: str
    desc: str
    symbols: tuple[tuple[str, int], ...]
    access: str
    mandatory: bool
    static: bool


@dataclass(frozen=True)
class _GroupTemplate:
    name: str
    count: int | str | None  # None: once, no index in keys; int: fixed repetitions; str: named count point
    points: tuple[_PointTemplate, ...]
    groups: tuple[_GroupTemplate, ...]

    @property
    def length(self) -> int:
        """Registers of one repetition, if every nested group has a fixed count."""
        total = sum(p.size for p in self.points)
        for group in self.groups:
            if isinstance(group.count, str):
                raise ModelLayoutError(f"group {group.name!r} repeats by point {group.count!r} inside {self.name!r}")
            total += group.length * (1 if group.count is None else group.count)
        return total


@dataclass(frozen=True)
class ModelDef:
    """A SunSpec model definition: its id, its group name (becomes the measurement) and its layout."""

    id: int
    name: str
    label: str
    desc: str
    top: _GroupTemplate = field(repr=False)
    source: str = ""

    @functools.cached_property
    def _shape(self) -> tuple[int, _GroupTemplate | None]:
        """(fixed registers after the 2 header registers, the one trailing repeating group or None)."""
        fixed = sum(p.size for p in self.top.points)
        repeating = [g for g in self.top.groups if isinstance(g.count, str)]
        for group in self.top.groups:
            if not isinstance(group.count, str):
                fixed += group.length * (1 if group.count is None else group.count)
        if len(repeating) > 1:
            raise ModelLayoutError(
                f"model {self.id} has {len(repeating)} groups repeated by point values "
                f"({', '.join(g.name for g in repeating)}); their counts cannot be told from the length alone"
            )
        if repeating and self.top.groups[-1] is not repeating[0]:
            raise ModelLayoutError(f"model {self.id}: repeating group {repeating[0].name!r} is not the last group")
        return fixed - 2, (repeating[0] if repeating else None)

    @property
    def fixed_length(self) -> int:
        """Registers after the header that every instance has (L without repetitions)."""
        return self._shape[0]

    @property
    def repeat_length(self) -> int:
        """Registers of one repetition of the trailing repeating group, 0 if the model has none."""
        group = self._shape[1]
        return group.length if group is not None else 0

    def repetitions(self, length: int) -> int:
        """How many times the repeating group occurs in an instance of `length` (its L); 0 without one.

        Raises ModelLayoutError if `length` does not fit the definition.
        """
        fixed, group = self._shape
        if group is None:
            if length >= fixed:
                return 0
            missing = self._tail_points_beyond(length)
            if all(p.type == "pad" for p in missing):
                return 0  # e.g. model 1 with L=65: written before the trailing Pad register was added
            raise ModelLayoutError(
                f"model {self.id} declares length {length}, but its definition needs {fixed} registers"
            )
        rest = length - fixed
        size = group.length
        if rest < 0 or size == 0 or rest % size:
            raise ModelLayoutError(
                f"model {self.id} declares length {length}, which is not {fixed} + n x {size} "
                f"(fixed part + repetitions of group {group.name!r})"
            )
        return rest // size

    def _tail_points_beyond(self, length: int) -> list[PointDef]:
        return [p for p in self.layout_unchecked(0) if p.offset + p.size > length + 2]

    def layout(self, length: int) -> list[PointDef]:
        """The points of an instance whose length word is `length`, offsets from its ID register.

        Points beyond `length` (a trailing pad of an older model version) are left out; registers beyond the
        definition (a newer version's additions) are not mapped. Raises ModelLayoutError.
        """
        points = self.layout_unchecked(self.repetitions(length))
        return [p for p in points if p.offset + p.size <= length + 2]

    def layout_unchecked(self, repetitions: int) -> list[PointDef]:
        out: list[PointDef] = []
        _expand(self.top, (), 0, repetitions, out, scopes=())
        return out


def _expand(
    group: _GroupTemplate,
    path: tuple[str, ...],
    offset: int,
    repetitions: int,
    out: list[PointDef],
    scopes: tuple[dict[str, str], ...],
) -> int:
    """Append the points of one instance of `group` at `offset`; returns the offset after it."""
    scope: dict[str, str] = {}
    scopes = (scope, *scopes)  # innermost first: a scale factor is looked up in its own group, then outwards
    for template in group.points:
        scope[template.name] = "_".join((*path, template.name))
    pending: list[tuple[_PointTemplate, int]] = []
    for template in group.points:
        pending.append((template, offset))
        offset += template.size
    for template, at in pending:
        out.append(
            PointDef(
                key=scope[template.name],
                name=template.name,
                type=template.type,
                size=template.size,
                offset=at,
                sf=_resolve_sf(template.sf, scopes),
                units=template.units,
                label=template.label,
                desc=template.desc,
                symbols=template.symbols,
                access=template.access,
                mandatory=template.mandatory,
                static=template.static,
            )
        )
    for sub in group.groups:
        if sub.count is None:
            offset = _expand(sub, (*path, sub.name), offset, 0, out, scopes)
            continue
        count = repetitions if isinstance(sub.count, str) else sub.count
        for index in range(1, count + 1):
            offset = _expand(sub, (*path, sub.name, str(index)), offset, 0, out, scopes)
    return offset


def _resolve_sf(sf: str | int | None, scopes: tuple[dict[str, str], ...]) -> str | int | None:
    if sf is None or isinstance(sf, int):
        return sf
    for scope in scopes:
        if sf in scope:
            return scope[sf]
    return f"?{sf}"  # a dangling reference: the point is decoded unscaled and reported (see unresolved_sf)


def unresolved_sf(points: Iterable[PointDef]) -> list[PointDef]:
    """Points whose scale factor names no point of their model (a broken model file)."""
    return [p for p in points if isinstance(p.sf, str) and p.sf.startswith("?")]


# -- reading model files -----------------------------------------------------------------------------------------


def parse_model(data: Mapping[str, Any], source: str = "") -> ModelDef:
    """A ModelDef from the parsed JSON of a SunSpec model file. Raises ModelError naming `source`."""
    where = source or "model"
    try:
        model_id = data["id"]
        group = data["group"]
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{where}: expected an object with 'id' and 'group'") from exc
    if not isinstance(model_id, int) or isinstance(model_id, bool) or not 1 <= model_id <= 0xFFFE:
        raise ModelError(f"{where}: id must be an integer 1..65534, got {model_id!r}")
    top = _parse_group(group, f"{where}: group", top=True)
    names = [p.name for p in top.points[:2]]
    if names != ["ID", "L"]:
        raise ModelError(f"{where}: the first two points must be ID and L, got {names}")
    return ModelDef(
        id=model_id,
        name=top.name,
        label=str(group.get("label", "")),
        desc=str(group.get("desc", "")),
        top=top,
        source=source,
    )


def _parse_group(group: Any, where: str, top: bool = False) -> _GroupTemplate:
    if not isinstance(group, Mapping):
        raise ModelError(f"{where}: expected an object")
    name = group.get("name")
    if not isinstance(name, str) or not name:
        raise ModelError(f"{where}.name: expected a non-empty string")
    count = group.get("count")
    if top:
        count = None
    elif count is not None and not (isinstance(count, str) or (isinstance(count, int) and count >= 0)):
        raise ModelError(f"{where}.count: expected a point name or a non-negative integer, got {count!r}")
    points = tuple(_parse_point(p, f"{where}.points[{i}]") for i, p in enumerate(group.get("points", [])))
    groups = tuple(_parse_group(g, f"{where}.groups[{i}]") for i, g in enumerate(group.get("groups", [])))
    return _GroupTemplate(name=name, count=count, points=points, groups=groups)


def _parse_point(point: Any, where: str) -> _PointTemplate:
    if not isinstance(point, Mapping):
        raise ModelError(f"{where}: expected an object")
    name, type_ = point.get("name"), point.get("type")
    if not isinstance(name, str) or not name:
        raise ModelError(f"{where}.name: expected a non-empty string")
    if type_ != "string" and type_ not in TYPE_SIZES:
        raise ModelError(f"{where}.type: unknown SunSpec type {type_!r}")
    size = point.get("size", TYPE_SIZES.get(type_))
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= _MAX_POINT_SIZE:
        raise ModelError(f"{where}.size: expected 1..{_MAX_POINT_SIZE} registers, got {size!r}")
    if type_ != "string" and size != TYPE_SIZES[type_]:
        raise ModelError(f"{where}.size: a {type_} is {TYPE_SIZES[type_]} registers, not {size}")
    sf = point.get("sf")
    if sf is not None and not isinstance(sf, str | int):
        raise ModelError(f"{where}.sf: expected a point name or an integer, got {sf!r}")
    symbols = tuple(
        (str(s["name"]), int(s["value"]))
        for s in point.get("symbols", [])
        if isinstance(s, Mapping) and "name" in s and isinstance(s.get("value"), int)
    )
    return _PointTemplate(
        name=name,
        type=type_,
        size=size,
        sf=sf,
        units=str(point.get("units", "")),
        label=str(point.get("label", "")),
        desc=str(point.get("desc", "")),
        symbols=symbols,
        access=str(point.get("access", "R")),
        mandatory=point.get("mandatory") == "M",
        static=point.get("static") == "S",
    )


def load_model_file(path: str | Path) -> ModelDef:
    """A model definition from a JSON file (any path). Raises ModelError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"{path}: {exc.strerror or exc}") from exc
    return _parse_text(text, str(path))


def _parse_text(text: str, source: str) -> ModelDef:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{source}: not JSON: {exc}") from exc
    return parse_model(data, source)


class ModelLibrary:
    """The model definitions a walker knows, by id: the shipped ones, plus any `extra` (overriding by id)."""

    def __init__(self, models: Iterable[ModelDef] = ()) -> None:
        self._models: dict[int, ModelDef] = {m.id: m for m in models}

    def get(self, model_id: int) -> ModelDef | None:
        return self._models.get(model_id)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def ids(self) -> list[int]:
        return sorted(self._models)

    def with_models(self, extra: Iterable[ModelDef]) -> ModelLibrary:
        return ModelLibrary([*self._models.values(), *extra])


@functools.cache
def shipped_models() -> ModelLibrary:
    """Every model file in firmware_profiles/sunspec_models/ (read once)."""
    root = resources.files(MODEL_PACKAGE) / MODEL_DIR
    models = []
    for entry in root.iterdir():
        if entry.is_file() and entry.name.startswith("model_") and entry.name.endswith(".json"):
            models.append(_parse_text(entry.read_text(encoding="utf-8"), f"{MODEL_DIR}/{entry.name}"))
    return ModelLibrary(models)


# -- decoding ----------------------------------------------------------------------------------------------------

Value = int | float | str


def raw_int(registers: Sequence[int], signed: bool = False) -> int:
    """Big-endian registers (SunSpec's only word and byte order) as one integer."""
    value = 0
    for register in registers:
        value = (value << 16) | register
    if signed and registers and value >= 1 << (16 * len(registers) - 1):
        value -= 1 << (16 * len(registers))
    return value


def decode_string(registers: Sequence[int]) -> str:
    """A SunSpec string: two bytes per register, NUL-padded; cut at the first NUL, outer blanks stripped."""
    data = b"".join(r.to_bytes(2, "big") for r in registers)
    return data.split(b"\x00", 1)[0].decode("utf-8", errors="replace").strip()


def decode_value(point: PointDef, registers: Sequence[int]) -> Value | None:
    """The raw (unscaled) value of `point` from its `point.size` registers; None when not implemented.

    Raises ValueError for the wrong number of registers or a register outside 0..65535.
    """
    if len(registers) != point.size:
        raise ValueError(f"{point.key}: {len(registers)} registers for a {point.size}-register {point.type}")
    if any(not 0 <= r <= 0xFFFF for r in registers):
        raise ValueError(f"{point.key}: register values must be 0..65535")
    type_ = point.type
    if type_ == "string":
        if not any(registers):
            return None
        return decode_string(registers)
    if type_ in ("float32", "float64"):
        raw = raw_int(registers)
        value = struct.unpack(">f" if type_ == "float32" else ">d", raw.to_bytes(2 * point.size, "big"))[0]
        return value if math.isfinite(value) else None
    raw = raw_int(registers)
    if raw == NOT_IMPLEMENTED.get(type_, -1):
        return None
    if type_ in _SIGNED:
        return raw_int(registers, signed=True)
    return raw


def sentinel_registers(point: PointDef) -> list[int] | None:
    """The registers that say "not implemented" for `point` (what a simulator serves for an absent value)."""
    if point.type == "string":
        return [0] * point.size
    if point.type == "float32":
        return [0x7FC0, 0x0000]
    if point.type == "float64":
        return [0x7FF8, 0, 0, 0]
    raw = NOT_IMPLEMENTED.get(point.type)
    if raw is None:
        return None
    return [(raw >> (16 * (point.size - 1 - i))) & 0xFFFF for i in range(point.size)]


__all__ = [
    "NOT_IMPLEMENTED",
    "PROFILE_TYPES",
    "TYPE_SIZES",
    "ModelDef",
    "ModelError",
    "ModelLayoutError",
    "ModelLibrary",
    "PointDef",
    "decode_string",
    "decode_value",
    "load_model_file",
    "parse_model",
    "raw_int",
    "sentinel_registers",
    "shipped_models",
    "unresolved_sf",
]
