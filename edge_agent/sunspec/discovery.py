"""SunSpec discovery: find the `SunS` marker, walk the model chain, build the point map. Sans-IO core.

A SunSpec device keeps, in its holding registers, the marker 0x5375 0x6E53 ("SunS") at a base address
(40000, 0 or 50000), then a chain of models, each a header of two registers (model id, length L) followed by
L registers, and finally the end marker (0xFFFF, 0):

    base:      0x5375 0x6E53                 "SunS"
    base+2:    1      66      <66 registers> model 1 (common: manufacturer, model, serial number, ...)
    base+70:   103    50      <50 registers> model 103 (three-phase inverter)
    base+122:  0xFFFF 0                      end

`SunSpecWalker` decides which registers to read next and takes the answers (`next_read()` / `feed()`); it never
touches a socket, so the tests drive it with plain lists and the engine with its own bus. `discover()` drives it
with any async `read_holding(address, count)` function (function code 3). The result, a `SunSpecMap`, lists the
models found; `points_for()` / `profile_for()` turn it into the agent's firmware-profile points, so a SunSpec
device without a hand-written profile is polled like any other (docs/sunspec.md).

The walker stops
- at the end marker (the map is `complete`);
- when a header cannot be read, when the chain would run past register 65535, at a model id 0, after
  `max_models` models, or at a known model whose length contradicts its definition (the map is not complete,
  `end_reason` says why; the models before the stop are kept, so a device with a broken tail is still polled).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from edge_agent.modbus.decode import make_decoder, width_of
from edge_agent.modbus.plan import PointSpec
from edge_agent.sunspec import vocabulary as sunspec_vocabulary
from edge_agent.sunspec.models import (
    ModelDef,
    ModelLayoutError,
    ModelLibrary,
    PointDef,
    decode_value,
    shipped_models,
    unresolved_sf,
)
from wire.names import BAD_CHARACTER

SUNS = (0x5375, 0x6E53)  # "SunS"
END_ID = 0xFFFF
DEFAULT_BASES = (40000, 0, 50000)
DEFAULT_MAX_MODELS = 100
COMMON_MODEL = 1
MAX_READ = 125  # registers per FC3 request


class SunSpecNotFound(Exception):
    """No base answered with the SunS marker; the message says what each base answered."""


@dataclass(frozen=True)
class ModelInstance:
    """One model in a device's chain. `address`: PDU address of its ID register; `length`: its L word.

    `known`: a shipped (or given) definition exists and fits `length`, so its points can be mapped; `note` says
    why not otherwise.
    """

    model_id: int
    address: int
    length: int
    known: bool
    name: str = ""  # the definition's group name ("inverter"), "" if unknown
    note: str = ""

    @property
    def end(self) -> int:
        """Address of the next model's header."""
        return self.address + 2 + self.length

    def describe(self) -> str:
        what = self.name or "unknown"
        text = f"model {self.model_id} ({what}) at {self.address}, length {self.length}"
        return f"{text}: {self.note}" if self.note else text


@dataclass(frozen=True)
class Probe:
    """What one candidate base answered."""

    base: int
    answer: str  # "SunS", "exception: ...", "0x0000 0x0000"


@dataclass(frozen=True)
class SunSpecMap:
    """The discovered layout of one device."""

    base: int
    models: tuple[ModelInstance, ...]
    complete: bool  # the chain ended with the end marker
    end_reason: str  # how the walk ended, for logs and `edge-agent` output
    common: Mapping[str, str | int] = field(default_factory=dict)  # model 1's Mn, Md, Opt, Vr, SN, DA if read
    probes: tuple[Probe, ...] = ()

    def model(self, model_id: int) -> ModelInstance | None:
        """The first instance of `model_id`, if the device has one."""
        return next((m for m in self.models if m.model_id == model_id), None)

    @property
    def model_ids(self) -> list[int]:
        return [m.model_id for m in self.models]

    def describe(self) -> str:
        lines = [f"SunSpec at {self.base}: {len(self.models)} models, {self.end_reason}"]
        lines += [f"  {m.describe()}" for m in self.models]
        for key in ("Mn", "Md", "Vr", "SN"):
            if key in self.common:
                lines.append(f"  {key} = {self.common[key]}")
        return "\n".join(lines)


def _hex(registers: Sequence[int]) -> str:
    return " ".join(f"0x{r:04X}" for r in registers)


class SunSpecWalker:
    """Which registers to read next to discover a SunSpec device, and what they mean. Sans-IO.

        walker = SunSpecWalker()
        while (request := walker.next_read()) is not None:
            address, count = request
            walker.feed(read_holding_registers(address, count))   # None for an exception answer
        walker.result   # SunSpecMap, or None with walker.reason when no base has the marker

    `bases` are tried in order; the first with the marker wins. With `read_common` (default) the walker also
    reads model 1 once the chain is known, for the manufacturer, model and serial number.
    """

    def __init__(
        self,
        bases: Iterable[int] = DEFAULT_BASES,
        *,
        library: ModelLibrary | None = None,
        max_models: int = DEFAULT_MAX_MODELS,
        read_common: bool = True,
    ) -> None:
        self.bases = tuple(bases)
        if not self.bases:
            raise ValueError("at least one base address is needed")
        for base in self.bases:
            if not 0 <= base <= 65532:
                raise ValueError(f"base {base}: the marker and a model header need 4 registers from 0..65535")
        if max_models < 1:
            raise ValueError("max_models must be 1 or more")
        self.library = library if library is not None else shipped_models()
        self.max_models = max_models
        self.read_common = read_common
        self.probes: list[Probe] = []
        self.models: list[ModelInstance] = []
        self.common: dict[str, str | int] = {}
        self.base: int | None = None
        self.reason = ""  # why the walk ended (also when nothing was found)
        self._complete = False
        self._phase = "probe"
        self._probe_index = 0
        self._header = 0
        self._pending: tuple[int, int] | None = None
        self._common_at: ModelInstance | None = None
        self.reads = 0

    # -- the protocol --------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._phase == "done"

    def next_read(self) -> tuple[int, int] | None:
        """(address, count) of the holding registers to read next; None once the walk is over."""
        if self._phase == "done":
            return None
        if self._pending is None:
            self._pending = self._plan()
        return self._pending

    def feed(self, registers: Sequence[int] | None, why: str = "") -> None:
        """The answer to the last `next_read()`: its registers, or None if the device answered with an exception
        (or the read failed otherwise; `why` says how, for the probe log).
        """
        if self._pending is None:
            raise RuntimeError("feed() without a read to answer: call next_read() first")
        address, count = self._pending
        self._pending = None
        self.reads += 1
        if registers is not None:
            registers = list(registers)
            if len(registers) != count or any(not 0 <= r <= 0xFFFF for r in registers):
                why = why or f"{len(registers)} registers for a read of {count}"
                registers = None
        if self._phase == "probe":
            self._on_probe(address, registers, why)
        elif self._phase == "header":
            self._on_header(address, registers, why)
        elif self._phase == "common":
            self._on_common(registers, why)

    @property
    def result(self) -> SunSpecMap | None:
        """The map once `done`; None while walking or when no base had the marker."""
        if self._phase != "done" or self.base is None:
            return None
        return SunSpecMap(
            base=self.base,
            models=tuple(self.models),
            complete=self._complete,
            end_reason=self.reason,
            common=dict(self.common),
            probes=tuple(self.probes),
        )

    # -- the steps -----------------------------------------------------------------------------------------------

    def _plan(self) -> tuple[int, int]:
        if self._phase == "probe":
            return (self.bases[self._probe_index], 2)
        if self._phase == "header":
            return (self._header, 2)
        assert self._common_at is not None
        return (self._common_at.address + 2, min(self._common_at.length, MAX_READ))

    def _on_probe(self, address: int, registers: list[int] | None, why: str) -> None:
        if registers is not None and tuple(registers) == SUNS:
            self.probes.append(Probe(address, "SunS"))
            self.base = address
            self._phase = "header"
            self._header = address + 2
            return
        answer = _hex(registers) if registers is not None else f"exception{': ' + why if why else ''}"
        self.probes.append(Probe(address, answer))
        self._probe_index += 1
        if self._probe_index >= len(self.bases):
            self.reason = "no SunS marker: " + "; ".join(f"{p.base}: {p.answer}" for p in self.probes)
            self._phase = "done"

    def _stop(self, reason: str, complete: bool = False) -> None:
        self.reason = reason
        self._complete = complete
        common = self.library.get(COMMON_MODEL)
        first = self.models[0] if self.models else None
        if (self.read_common and first is not None and first.model_id == COMMON_MODEL and first.known
                and common is not None):
            self._common_at = first
            self._phase = "common"
        else:
            self._phase = "done"

    def _on_header(self, address: int, registers: list[int] | None, why: str) -> None:
        if registers is None:
            self._stop(f"no end marker: reading the model header at {address} failed"
                       f"{' (' + why + ')' if why else ''}")
            return
        model_id, length = registers
        if model_id == END_ID:
            note = "" if length == 0 else f" (with length {length} instead of 0)"
            self._stop(f"end marker at {address}{note}", complete=True)
            return
        if model_id == 0:
            self._stop(f"no end marker: model id 0 at {address}")
            return
        end = address + 2 + length
        if end + 2 > 65536:
            self._stop(f"model {model_id} at {address} declares length {length}: the chain would run past "
                       "register 65535")
            return
        definition = self.library.get(model_id)
        if definition is None:
            self.models.append(ModelInstance(model_id, address, length, known=False, note="no model definition"))
        else:
            try:
                definition.repetitions(length)
            except ModelLayoutError as exc:
                self.models.append(ModelInstance(model_id, address, length, False, definition.name, str(exc)))
                self._stop(f"invalid length: {exc}; the walk stops here (the next header's place is in doubt)")
                return
            self.models.append(ModelInstance(model_id, address, length, True, definition.name))
        if len(self.models) >= self.max_models:
            self._stop(f"no end marker after {self.max_models} models")
            return
        self._header = end

    def _on_common(self, registers: list[int] | None, why: str) -> None:
        instance = self._common_at
        definition = self.library.get(COMMON_MODEL)
        self._phase = "done"
        if registers is None or instance is None or definition is None:
            return
        block = [0, 0, *registers]  # offsets in the layout count from the ID register
        for point in definition.layout(instance.length):
            if point.name in ("ID", "L") or point.type == "pad" or point.offset + point.size > len(block):
                continue
            value = decode_value(point, block[point.offset : point.offset + point.size])
            if isinstance(value, str):
                value = _printable(value)
            if value is not None and value != "":
                self.common[point.key] = value


def _printable(text: str) -> str:
    return BAD_CHARACTER.sub("", text).strip()  # the one name rule (wire/names.py): it may become a tag


# -- drivers -----------------------------------------------------------------------------------------------------

ReadHolding = Callable[[int, int], Awaitable[Sequence[int]]]
#: Exceptions that mean "the device did not answer" rather than "it has no such register": discover() lets them
#: propagate instead of trying the next base, so an unreachable device is not reported as "not SunSpec".
#: The agent's own transport errors (edge_agent.modbus.transport: NoAnswer, TransportError) are added when
#: that module is there.
NO_ANSWER: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError)


def default_no_answer() -> tuple[type[BaseException], ...]:
    try:
        from edge_agent.modbus.transport import NoAnswer, TransportError
    except ImportError:  # pragma: no cover - the bus engine's transport not installed
        return NO_ANSWER
    return (*NO_ANSWER, NoAnswer, TransportError)


async def discover(
    read_holding: ReadHolding,
    bases: Iterable[int] = DEFAULT_BASES,
    *,
    library: ModelLibrary | None = None,
    max_models: int = DEFAULT_MAX_MODELS,
    read_common: bool = True,
    no_answer: tuple[type[BaseException], ...] | None = None,
) -> SunSpecMap:
    """Walk a device through `read_holding(address, count) -> registers` (function code 3).

    An exception from `read_holding` counts as an exception answer ("no such register": try the next base,
    or end the chain), except `no_answer` types (default: timeouts, lost connections and the agent's transport
    errors, see `default_no_answer`), which propagate. Raises SunSpecNotFound when no base has the marker.
    """
    if no_answer is None:
        no_answer = default_no_answer()
    walker = SunSpecWalker(bases, library=library, max_models=max_models, read_common=read_common)
    while (request := walker.next_read()) is not None:
        try:
            registers = await read_holding(*request)
        except no_answer:
            raise
        except Exception as exc:
            walker.feed(None, why=str(exc) or type(exc).__name__)
            continue
        walker.feed(registers)
    if walker.result is None:
        raise SunSpecNotFound(walker.reason)
    return walker.result


def walk(read: Callable[[int, int], Sequence[int] | None], bases: Iterable[int] = DEFAULT_BASES,
         **kwargs: object) -> SunSpecWalker:
    """Run a walker to its end with a synchronous `read(address, count)` (None: exception answer)."""
    walker = SunSpecWalker(bases, **kwargs)  # type: ignore[arg-type]
    while (request := walker.next_read()) is not None:
        walker.feed(read(*request))
    return walker


def register_reader(registers: Mapping[int, int]) -> Callable[[int, int], list[int] | None]:
    """read(address, count) over a register image {address: value}; None (exception 2) for any missing one."""

    def read(address: int, count: int) -> list[int] | None:
        try:
            return [registers[a] for a in range(address, address + count)]
        except KeyError:
            return None

    return read


# -- the point map -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MappedPoint:
    """One SunSpec point placed on the device: what the profile point is built from.

    `native` is the point's SunSpec name, unique on the device ("inverter_W", "mppt_module_2_DCA"); `field` is
    the name it is stored under: the vocabulary's where it has one (edge_agent/sunspec/vocabulary.py: "power",
    "dc_current_pv2"), unique within the measurement, else `native`. `unit` is the stored value's unit and `factor`
    the conversion from the model file's (Wh -> kWh: 0.001). `sf_field` is the field of the point holding this
    one's scale factor exponent (scale factors keep their native names), `sf_exponent` a constant exponent from
    the model file.
    """

    field: str
    measurement: str
    address: int
    point: PointDef
    model: ModelInstance
    sf_field: str | None = None
    sf_exponent: int | None = None
    native: str = ""
    unit: str = ""
    factor: float = 1.0

    @property
    def internal(self) -> bool:
        return self.point.type == "sunssf"


def model_keys(smap: SunSpecMap) -> dict[int, str]:
    """{address of a mapped model: its key}: the definition's group name, "_2", "_3" ... for repeats."""
    seen: dict[str, int] = {}
    keys: dict[int, str] = {}
    for instance in smap.models:
        if not instance.known:
            continue
        seen[instance.name] = seen.get(instance.name, 0) + 1
        n = seen[instance.name]
        keys[instance.address] = instance.name if n == 1 else f"{instance.name}_{n}"
    return keys


def mapped_points(
    smap: SunSpecMap,
    measurement_prefix: str = "sunspec",
    *,
    library: ModelLibrary | None = None,
    models: Collection[int] | None = None,
) -> list[MappedPoint]:
    """Every readable point of the known models in `smap` (or of those whose id is in `models`).

    Left out: the ID and L header registers, pad registers, types the agent does not read (eui48, ipaddr,
    ipv6addr) and points whose scale factor names no point (a broken model file: a value is never stored
    unscaled). Scale-factor points (sunssf) are included; they are internal.
    """
    library = library if library is not None else shipped_models()
    keys = model_keys(smap)
    out: list[MappedPoint] = []
    for instance in smap.models:
        if not instance.known or (models is not None and instance.model_id not in models):
            continue
        definition: ModelDef | None = library.get(instance.model_id)
        if definition is None:
            continue
        key = keys[instance.address]
        measurement = f"{measurement_prefix}_{key}" if measurement_prefix else key
        layout = definition.layout(instance.length)
        dangling = {p.key for p in unresolved_sf(layout)}
        fields = {p.key: f"{key}_{p.key}" for p in layout}
        for point in layout:
            if point.name in ("ID", "L") and point.offset < 2:
                continue
            if point.profile_type is None or point.key in dangling:
                continue
            standard = None if point.type == "sunssf" else sunspec_vocabulary.standard_field(
                definition.name, point.key, point.units)
            name, unit, factor = standard if standard is not None else (fields[point.key], point.units, 1.0)
            out.append(
                MappedPoint(
                    field=name,
                    measurement=measurement,
                    address=instance.address + point.offset,
                    point=point,
                    model=instance,
                    sf_field=fields.get(point.sf) if isinstance(point.sf, str) else None,
                    sf_exponent=point.sf if isinstance(point.sf, int) else None,
                    native=fields[point.key],
                    unit=unit,
                    factor=factor,
                )
            )
    return out


#: SunSpec types whose "not implemented" value is 0 rather than the all-ones / minimum pattern that the agent's
#: `sentinel = "auto"` stands for.
_ZERO_SENTINEL = frozenset({"acc16", "acc32", "acc64", "count"})


def point_settings(mp: MappedPoint) -> dict[str, object]:
    """The firmware-profile settings of one mapped point: the keyword arguments of `edge_agent.profiles.Point`.

    - sunssf points are `internal`; a point with a scale factor names its field in `scale_factor`;
    - SunSpec's "not implemented" values are sentinels: "auto" (int16 0x8000, uint16 0xFFFF, uint32
      0xFFFFFFFF, ...), [0] for accumulators and counts; NaN floats and all-zero strings are missing anyway;
    - enum16/enum32 with symbols get `enum` (the label is stored), bitfields with symbols `bits` (one bool field
      per named bit, `<field>_<symbol>`); without symbols both stay plain integers.
    """
    p = mp.point
    settings: dict[str, object] = {
        "name": mp.field,
        "address": mp.address,
        "type": p.profile_type,
        "table": "holding",
        "measurement": mp.measurement,
        "unit": mp.unit,
        "description": _description(mp),
    }
    if p.type == "string":
        settings["length"] = p.size
        settings["encoding"] = "utf-8"
    else:
        settings["sentinel"] = [0] if p.type in _ZERO_SENTINEL else "auto"
    if mp.internal:
        settings["internal"] = True
    if mp.sf_field is not None:
        settings["scale_factor"] = mp.sf_field
        if mp.factor != 1:  # applied before the exponent: raw Wh x 0.001 x 10^sf = kWh
            settings["scale"] = mp.factor
    elif mp.sf_exponent is not None:
        exponent = 10**mp.sf_exponent if mp.sf_exponent >= 0 else 10.0**mp.sf_exponent
        settings["scale"] = exponent * mp.factor if mp.factor != 1 else exponent
    elif mp.factor != 1:
        settings["scale"] = mp.factor
    if p.symbols and p.type.startswith("enum"):
        settings["enum"] = {str(value): name for name, value in p.symbols}
    elif p.symbols and p.type.startswith("bitfield"):
        bits = {value: name for name, value in p.symbols if 0 <= value < 16 * p.size}
        native = mp.native or mp.field
        settings["bits"] = {
            str(bit): (mp.field != native and sunspec_vocabulary.event_field(mp.model.name, name)) or f"{native}_{name}"
            for bit, name in sorted(bits.items())
        }
    return settings


def points_for(
    smap: SunSpecMap,
    measurement_prefix: str = "sunspec",
    *,
    library: ModelLibrary | None = None,
    models: Collection[int] | None = None,
) -> list:
    """The map as firmware-profile points (`edge_agent.profiles.Point`): holding registers, 0-based addresses,
    field `<model key>_<point>`, measurement `<prefix>_<model key>` (docs/sunspec.md; see `point_settings`).
    """
    from edge_agent.profiles import Point  # here, not at import time: profiles imports the planner

    return [
        Point(**point_settings(mp))  # type: ignore[arg-type]
        for mp in mapped_points(smap, measurement_prefix, library=library, models=models)
    ]


def point_specs_for(
    smap: SunSpecMap,
    measurement_prefix: str = "sunspec",
    *,
    library: ModelLibrary | None = None,
    models: Collection[int] | None = None,
) -> list[PointSpec]:
    """The same points as `points_for`, straight as the planner's `PointSpec`s (decoders built), for polling a
    discovered device without going through a Profile: `plan_reads(specs, 125, 123)`.
    """
    specs = []
    for mp in mapped_points(smap, measurement_prefix, library=library, models=models):
        s = point_settings(mp)
        enum = s.get("enum")
        bits = s.get("bits")
        length = s.get("length")
        specs.append(
            PointSpec(
                field=mp.field,
                table="holding",
                address=mp.address,
                width=width_of(str(s["type"]), length),  # type: ignore[arg-type]
                decode=make_decoder(
                    str(s["type"]),
                    "ABCD",
                    s.get("scale", 1),  # type: ignore[arg-type]
                    0,
                    sentinel=s.get("sentinel"),  # type: ignore[arg-type]
                    enum={int(k): v for k, v in enum.items()} if isinstance(enum, dict) else None,
                    bits={int(k): v for k, v in bits.items()} if isinstance(bits, dict) else None,
                    length=length,  # type: ignore[arg-type]
                    encoding=str(s.get("encoding", "ascii")),
                ),
                measurement=mp.measurement,
                scale_factor=mp.sf_field,
                emit=not mp.internal,
            )
        )
    return specs


def _description(mp: MappedPoint) -> str:
    p = mp.point
    label = p.label or p.name
    text = f"SunSpec model {mp.model.model_id} {p.key}: {label}"
    if p.access == "RW":
        text += " (writable setting)"
    return text


def profile_for(
    smap: SunSpecMap,
    measurement_prefix: str = "sunspec",
    *,
    library: ModelLibrary | None = None,
    models: Collection[int] | None = None,
):
    """A firmware profile for the discovered device: vendor/model from model 1's Mn/Md if read.

    SunSpec requires every register inside a model to be readable, so the profile may bridge gaps up to a
    whole request (max_gap 123): the chain is read in as few requests as the 125-register limit allows.
    """
    from edge_agent.profiles import Profile

    points = points_for(smap, measurement_prefix, library=library, models=models)
    if not points:
        raise ValueError(f"no mapped points: models {smap.model_ids} are all unknown or filtered out")
    known = [m for m in smap.models if m.known]
    listing = ", ".join(f"{m.model_id} ({m.name}, L={m.length})" for m in known)
    return Profile(
        vendor=str(smap.common.get("Mn") or "SunSpec"),
        model=str(smap.common.get("Md") or "SunSpec device"),
        measurement=measurement_prefix or "sunspec",
        points=points,
        description=f"SunSpec discovery at {smap.base}: models {listing}",
        max_registers=MAX_READ,
        max_gap=MAX_READ - 2,
    )


__all__ = [
    "DEFAULT_BASES",
    "END_ID",
    "SUNS",
    "MappedPoint",
    "ModelInstance",
    "Probe",
    "SunSpecMap",
    "SunSpecNotFound",
    "SunSpecWalker",
    "discover",
    "mapped_points",
    "model_keys",
    "point_settings",
    "point_specs_for",
    "points_for",
    "profile_for",
    "register_reader",
    "walk",
]
