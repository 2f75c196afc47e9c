"""Request planning: valid plans, and as few requests as brute force over every grouping finds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.modbus.decode import make_decoder
from edge_agent.modbus.plan import PointSpec, ReadRequest, decode_answers, plan_reads

WIDTH_TYPE = {1: "uint16", 2: "uint32", 4: "uint64"}


def spec(field: str, address: int, width: int = 2, table: str = "input", measurement: str = "m") -> PointSpec:
    return PointSpec(field, table, address, width, make_decoder(WIDTH_TYPE[width]), measurement)


@st.composite
def point_sets(draw: st.DrawFn) -> tuple[list[PointSpec], int, int]:
    """Up to 7 non-overlapping points in one or two tables, and limits that every point fits in."""
    count = draw(st.integers(1, 7))
    points: list[PointSpec] = []
    cursor = {"input": draw(st.integers(0, 5)), "holding": draw(st.integers(0, 5))}
    for i in range(count):
        table = draw(st.sampled_from(["input", "input", "holding"]))
        width = draw(st.sampled_from([1, 2, 4]))
        address = cursor[table] + draw(st.integers(0, 6))
        cursor[table] = address + width
        points.append(spec(f"p{i}", address, width, table))
    widest = max(p.width for p in points)
    max_registers = draw(st.integers(widest, 16))
    max_gap = draw(st.integers(0, 5))
    order = draw(st.permutations(points))  # the planner must not depend on input order
    return list(order), max_registers, max_gap


def feasible(group: list[PointSpec], max_registers: int, max_gap: int) -> bool:
    """One read can fetch exactly this group: one table, span within the limit, no unused run > max_gap."""
    if len({p.table for p in group}) != 1:
        return False
    start = min(p.address for p in group)
    end = max(p.address + p.width for p in group)
    if end - start > max_registers:
        return False
    used = set()
    for p in group:
        used.update(range(p.address, p.address + p.width))
    gap = 0
    for register in range(start, end):
        gap = 0 if register in used else gap + 1
        if gap > max_gap:
            return False
    return True


def partitions(items: list[PointSpec]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in partitions(rest):
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]
        yield [[first], *partition]


def brute_force_minimum(points: list[PointSpec], max_registers: int, max_gap: int) -> int:
    return min(
        len(partition)
        for partition in partitions(points)
        if all(feasible(group, max_registers, max_gap) for group in partition)
    )


def check_valid(plan: list[ReadRequest], points: list[PointSpec], max_registers: int, max_gap: int) -> None:
    placed: dict[str, tuple[str, int]] = {}
    for request in plan:
        assert 1 <= request.count <= max_registers
        covered: set[int] = set()
        for slot in request.slots:
            assert slot.offset >= 0 and slot.offset + slot.width <= request.count
            assert slot.field not in placed
            placed[slot.field] = (request.table, request.address + slot.offset)
            covered.update(range(slot.offset, slot.offset + slot.width))
        assert 0 in covered and request.count - 1 in covered  # no useless registers at either end
        gap = 0
        for offset in range(request.count):
            gap = 0 if offset in covered else gap + 1
            assert gap <= max_gap
    assert placed == {p.field: (p.table, p.address) for p in points}


@settings(max_examples=300, deadline=None)
@given(case=point_sets())
def test_plan_is_valid_and_minimal(case: tuple[list[PointSpec], int, int]) -> None:
    points, max_registers, max_gap = case
    plan = plan_reads(points, max_registers, max_gap)
    check_valid(plan, points, max_registers, max_gap)
    assert len(plan) == brute_force_minimum(points, max_registers, max_gap)


def test_adjacent_points_share_a_request_gaps_split_it() -> None:
    points = [spec("a", 0), spec("b", 2), spec("c", 6), spec("d", 8)]
    assert [(r.address, r.count) for r in plan_reads(points, 125, 0)] == [(0, 4), (6, 4)]
    assert [(r.address, r.count) for r in plan_reads(points, 125, 2)] == [(0, 10)]
    assert [(r.address, r.count) for r in plan_reads(points, 4, 2)] == [(0, 4), (6, 4)]


def test_tables_never_share_a_request() -> None:
    plan = plan_reads([spec("a", 0, table="input"), spec("b", 2, table="holding")], 125, 10)
    assert [(r.table, r.address, r.count) for r in plan] == [("holding", 2, 2), ("input", 0, 2)]


def test_slots_carry_offsets_decoders_and_measurements() -> None:
    points = [spec("a", 10, 1, measurement="x"), spec("b", 12, 2, measurement="y")]
    (request,) = plan_reads(points, 125, 1)
    assert request.describe() == "input 0x000A+4"
    assert [(s.offset, s.width, s.field, s.measurement) for s in request.slots] == [
        (0, 1, "a", "x"),
        (2, 2, "b", "y"),
    ]
    assert decode_answers([request], [[7, 0, 0, 9]]) == {"x": {"a": 7}, "y": {"b": 9}}


def test_decode_answers_leaves_out_none_and_rejects_wrong_lengths() -> None:
    nan = PointSpec("nan", "input", 0, 2, make_decoder("float32"), "m")
    ok = PointSpec("ok", "input", 2, 2, make_decoder("float32"), "m")
    plan = plan_reads([nan, ok], 125, 0)
    assert decode_answers(plan, [[0x7FC0, 0, 0x4366, 0]]) == {"m": {"ok": 230.0}}
    assert decode_answers(plan_reads([nan], 125, 0), [[0x7FC0, 0]]) == {}
    with pytest.raises(ValueError, match="3 registers"):
        decode_answers(plan, [[0, 0, 0]])
    with pytest.raises(ValueError, match="0 answers for 1 requests"):
        decode_answers(plan, [])


def test_empty_point_list_gives_empty_plan() -> None:
    assert plan_reads([], 125, 0) == []


@pytest.mark.parametrize(
    ("points", "max_registers", "max_gap", "message"),
    [
        ([spec("a", 0, 4)], 2, 0, "more than max_registers"),
        ([spec("a", 0), spec("b", 1)], 125, 0, "overlap"),
        ([spec("a", 65535, 2)], 125, 0, "outside the register range"),
        ([spec("a", 0)], 0, 0, "max_registers must be 1..125"),
        ([spec("a", 0)], 126, 0, "max_registers must be 1..125"),
        ([spec("a", 0)], 125, -1, "max_gap must be 0 or more"),
    ],
)
def test_impossible_plans_are_refused(
    points: list[PointSpec], max_registers: int, max_gap: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_reads(points, max_registers, max_gap)
