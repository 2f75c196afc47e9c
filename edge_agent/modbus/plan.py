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


class ReadRequest(NamedTuple):
    table: str  # "input" (FC4) or "holding" (FC3)
    address: int  # 0-based PDU address of the first register
    count: int
    slots: tuple[Slot, ...]

    def describe(self) -> str:
        """How a technician reads it: "input 0x0048+6"."""
        return f"{self.table} 0x{self.address:04X}+{self.count}"


def plan_reads(points: Iterable[PointSpec], max_registers: int, max_gap: int = 0) -> list[ReadRequest]:
    """The fewest read requests that fetch every point, ordered by table then address.

    Raises ValueError for limits out of range, a point wider than max_registers, points outside 0..65535
    or points that overlap in one table (a profile is validated before it gets here; this is the backstop).
    """
    if not 1 <= max_registers <= MODBUS_MAX_REGISTERS:
        raise ValueError(f"max_registers must be 1..{MODBUS_MAX_REGISTERS}, got {max_registers}")
    if max_gap < 0:
        raise ValueError(f"max_gap must be 0 or more, got {max_gap}")

    by_table: dict[str, list[PointSpec]] = {}
    for point in points:
        if point.width > max_registers:
            raise ValueError(f"point {point.field!r} is {point.width} registers, more than max_registers")
        if point.address < 0 or point.end > 65536:
            raise ValueError(f"point {point.field!r} lies outside the register range 0..65535")
        by_table.setdefault(point.table, []).append(point)

    requests: list[ReadRequest] = []
    for table in sorted(by_table):
        run: list[PointSpec] = []
        for point in sorted(by_table[table], key=lambda p: p.address):
            if run:
                last_end = max(p.end for p in run)
                if point.address < last_end:
                    raise ValueError(f"points {run[-1].field!r} and {point.field!r} overlap in table {table}")
                if point.address - last_end <= max_gap and point.end - run[0].address <= max_registers:
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
    slots = tuple(Slot(p.address - start, p.width, p.decode, p.field, p.measurement) for p in run)
    return ReadRequest(table, start, end - start, slots)


def decode_answers(
    plan: Sequence[ReadRequest], answers: Sequence[Sequence[int]]
) -> dict[str, dict[str, Value]]:
    """Registers in, values out: {measurement: {field: value}} for one answer per planned request.

    Values that decode to None (NaN/inf) are left out; a measurement without any value is left out.
    """
    if len(answers) != len(plan):
        raise ValueError(f"{len(answers)} answers for {len(plan)} requests")
    fields: dict[str, dict[str, Value]] = {}
    for request, registers in zip(plan, answers, strict=True):
        if len(registers) != request.count:
            raise ValueError(f"{len(registers)} registers for {request.describe()}")
        for slot in request.slots:
            value = slot.decode(registers[slot.offset : slot.offset + slot.width])
            if value is not None:
                fields.setdefault(slot.measurement, {})[slot.field] = value
    return fields
