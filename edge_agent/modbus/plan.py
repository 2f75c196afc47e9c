"""Request planning: which Modbus reads fetch a set of points in the fewest requests. Pure, no I/O.

Built once at start-up; a poll then just runs the plan's requests and hands each response to its slots.

Rules (per table, points sorted by address):
- a request never exceeds `max_registers` registers (Modbus allows 125 for FC3/FC4; many devices fewer), or
  `max_bits` bits for the bit tables (coil FC1, discrete FC2; Modbus allows 2000);
- a request may bridge unused registers between two points only if that gap is at most `max_gap` registers
  (0 = only adjacent points share a request), because some devices answer exception 2 for unmapped registers;
- a request never covers an address the profile marks as unreadable (`unreadable` ranges);
- with the `one_request_per_point` workaround every point is its own request (devices that refuse any
  multi-point read);
- a request starts at its first point and ends with its last, so no register is read that no point needs
  except inside a bridged gap.

Greedy packing (extend the current request while the next point fits, else start a new one) gives the fewest
requests: any feasible request's points form a run of consecutive points in address order, every sub-run of a
feasible run is feasible, so the greedy first k requests always cover at least as many points as the first k
requests of any other plan ("greedy stays ahead"). tests/test_modbus_plan.py checks this against brute force.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from edge_agent.modbus.decode import Decoder, Value

try:  # the Missing marker arrives with the extended decoders
    from edge_agent.modbus.decode import Missing
except ImportError:  # pragma: no cover - transitional
    class Missing:  # type: ignore[no-redef]
        reason = "not_available"

MODBUS_MAX_REGISTERS = 125  # FC3/FC4 limit of the Modbus application protocol (PDU of 253 bytes)


class PointSpec(NamedTuple):
    """A point as the planner sees it: where it lives, how wide it is, how to decode it, where it goes.

    `width` is in registers, or in bits for the bit tables. `scale_factor` names the point holding a
    SunSpec-style power-of-ten exponent for this one; `emit` is False for points read only to serve others
    (scale factors).
    """

    field: str
    table: str
    address: int
    width: int
    decode: Decoder
    measurement: str
    scale_factor: str | None = None
    emit: bool = True

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.address + self.width


class Slot(NamedTuple):
    """Where a point sits inside a response: registers[offset : offset + width]."""

    offset: int
    width: int
    decode: Decoder
    field: str
    measurement: str
    scale_factor: str | None = None
    emit: bool = True


class ReadRequest(NamedTuple):
    table: str  # "input" (FC4) or "holding" (FC3)
    address: int  # 0-based PDU address of the first register
    count: int
    slots: tuple[Slot, ...]

    def describe(self) -> str:
        """How a technician reads it: "input 0x0048+6"."""
        return f"{self.table} 0x{self.address:04X}+{self.count}"


BIT_TABLES = frozenset({"coil", "discrete"})
MODBUS_MAX_BITS = 2000  # FC1/FC2 limit


class Unreadable(NamedTuple):
    """Addresses start..end (inclusive) of one table that a request must never cover."""

    table: str
    start: int
    end: int


def plan_reads(
    points: Iterable[PointSpec],
    max_registers: int = MODBUS_MAX_REGISTERS,
    max_gap: int = 0,
    *,
    max_bits: int = MODBUS_MAX_BITS,
    unreadable: Iterable[Unreadable] = (),
    one_request_per_point: bool = False,
) -> list[ReadRequest]:
    """The fewest read requests that fetch every point, ordered by table then address.

    Raises ValueError for limits out of range, a point wider than the limit, points outside 0..65535,
    points that overlap in one table or lie on an unreadable address (a profile is validated before it gets
    here; this is the backstop).
    """
    if not 1 <= max_registers <= MODBUS_MAX_REGISTERS:
        raise ValueError(f"max_registers must be 1..{MODBUS_MAX_REGISTERS}, got {max_registers}")
    if not 1 <= max_bits <= MODBUS_MAX_BITS:
        raise ValueError(f"max_bits must be 1..{MODBUS_MAX_BITS}, got {max_bits}")
    if max_gap < 0:
        raise ValueError(f"max_gap must be 0 or more, got {max_gap}")
    blocked: dict[str, list[Unreadable]] = {}
    for block in unreadable:
        blocked.setdefault(block.table, []).append(block)

    by_table: dict[str, list[PointSpec]] = {}
    for point in points:
        limit = max_bits if point.table in BIT_TABLES else max_registers
        if point.width > limit:
            raise ValueError(f"point {point.field!r} is {point.width} wide, more than the limit of {limit}")
        if point.address < 0 or point.end > 65536:
            raise ValueError(f"point {point.field!r} lies outside the address range 0..65535")
        for block in blocked.get(point.table, ()):
            if point.address <= block.end and point.end - 1 >= block.start:
                raise ValueError(f"point {point.field!r} lies on unreadable {block.table} addresses "
                                 f"{block.start}..{block.end}")
        by_table.setdefault(point.table, []).append(point)

    requests: list[ReadRequest] = []
    for table in sorted(by_table):
        limit = max_bits if table in BIT_TABLES else max_registers
        blocks = blocked.get(table, [])
        run: list[PointSpec] = []
        for point in sorted(by_table[table], key=lambda p: p.address):
            if run:
                last_end = max(p.end for p in run)
                if point.address < last_end:
                    raise ValueError(f"points {run[-1].field!r} and {point.field!r} overlap in table {table}")
                if (not one_request_per_point
                        and point.address - last_end <= max_gap
                        and point.end - run[0].address <= limit
                        and not any(last_end <= b.end and point.address - 1 >= b.start for b in blocks)):
                    run.append(point)
                    continue
                requests.append(_request(table, run))
            run = [point]
        if run:
            requests.append(_request(table, run))
    return requests


def _request(table: str, run: list[PointSpec]) -> ReadRequest:
    start = run[0].address
    end = max(p.end for p in run)
    slots = tuple(Slot(p.address - start, p.width, p.decode, p.field, p.measurement, p.scale_factor, p.emit)
                  for p in run)
    return ReadRequest(table, start, end - start, slots)


class PollValues(NamedTuple):
    """What one poll of a device produced: values, and why any expected value is missing."""

    fields: dict[str, dict[str, Value]]  # measurement -> field -> value
    quality: dict[str, dict[str, str]]  # measurement -> field -> reason ("not_available", "error", ...)


def decode_poll(plan: Sequence[ReadRequest], answers: Sequence[Sequence[int] | BaseException]) -> PollValues:
    """Registers in, values out, for one answer per planned request.

    An answer may be the exception that request ended with: its points are then missing with quality
    "error", while the other requests' points are decoded as usual. A decoder returning a `Missing` gives a
    missing value with that reason; one returning a dict (a bitfield) adds each named bit as a field.
    Scale factors are applied after every request is decoded: value * 10**sf.
    """
    if len(answers) != len(plan):
        raise ValueError(f"{len(answers)} answers for {len(plan)} requests")
    fields: dict[str, dict[str, Value]] = {}
    quality: dict[str, dict[str, str]] = {}
    raw: dict[tuple[str, str], object] = {}  # (measurement, field): names repeat across measurements
    scaled: list[Slot] = []
    for request, registers in zip(plan, answers, strict=True):
        if isinstance(registers, BaseException):
            for slot in request.slots:
                if slot.emit:
                    quality.setdefault(slot.measurement, {})[slot.field] = "error"
            continue
        if len(registers) != request.count:
            raise ValueError(f"{len(registers)} registers for {request.describe()}")
        for slot in request.slots:
            value = slot.decode(registers[slot.offset : slot.offset + slot.width])
            raw[(slot.measurement, slot.field)] = value
            if not slot.emit:
                continue
            if slot.scale_factor is not None:
                scaled.append(slot)
            elif isinstance(value, dict):
                fields.setdefault(slot.measurement, {}).update(value)
            elif value is None or isinstance(value, Missing):
                quality.setdefault(slot.measurement, {})[slot.field] = getattr(value, "reason", "not_available")
            else:
                fields.setdefault(slot.measurement, {})[slot.field] = value
    for slot in scaled:
        value, sf = raw[(slot.measurement, slot.field)], raw.get((slot.measurement, slot.scale_factor))  # type: ignore[arg-type]
        if value is None or isinstance(value, Missing):
            quality.setdefault(slot.measurement, {})[slot.field] = getattr(value, "reason", "not_available")
        elif not isinstance(sf, int) or isinstance(sf, bool) or not -20 <= sf <= 20:
            quality.setdefault(slot.measurement, {})[slot.field] = "no_scale_factor"
        else:
            fields.setdefault(slot.measurement, {})[slot.field] = _apply_exponent(value, sf)  # type: ignore[arg-type]
    return PollValues(fields, quality)


def _apply_exponent(value: float | int, sf: int) -> float:
    # Always a float: a device may change its scale factor at run time, and a field that turned from integer
    # to float would be refused by InfluxDB. An integer is rounded to the precision the exponent gives, so
    # 2301 * 10**-1 is 230.1 and not 230.10000000000002.
    if sf >= 0:
        return float(value * 10**sf)
    return round(value * 10.0**sf, -sf) if isinstance(value, int) else value * 10.0**sf


def decode_answers(
    plan: Sequence[ReadRequest], answers: Sequence[Sequence[int]]
) -> dict[str, dict[str, Value]]:
    """The values of `decode_poll`, without the quality flags."""
    return decode_poll(plan, answers).fields
