"""Request planning: valid plans, and as few requests as brute force over every grouping finds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.modbus.decode import make_decoder
from edge_agent.modbus.plan import PointSpec, ReadRequest, Unreadable, decode_answers, decode_poll, plan_reads

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
        ([spec("a", 0, 4)], 2, 0, "more than the limit of 2"),
        ([spec("a", 0), spec("b", 1)], 125, 0, "overlap"),
        ([spec("a", 65535, 2)], 125, 0, "outside the address range"),
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


# -- unreadable ranges, bit tables, workarounds, quality ---------------------------------------------------


@st.composite
def point_sets_with_holes(draw: st.DrawFn) -> tuple[list[PointSpec], int, int, list[Unreadable]]:
    points, max_registers, max_gap = draw(point_sets())
    used = {(p.table, r) for p in points for r in range(p.address, p.end)}
    holes = []
    for _ in range(draw(st.integers(0, 3))):
        table = draw(st.sampled_from(["input", "holding"]))
        start = draw(st.integers(0, 40))
        end = start + draw(st.integers(0, 3))
        if not any((table, r) in used for r in range(start, end + 1)):
            holes.append(Unreadable(table, start, end))
    return points, max_registers, max_gap, holes


@settings(max_examples=300, deadline=None)
@given(case=point_sets_with_holes())
def test_plan_never_reads_unreadable_addresses_and_stays_minimal(case) -> None:
    points, max_registers, max_gap, holes = case
    plan = plan_reads(points, max_registers, max_gap, unreadable=holes)
    check_valid(plan, points, max_registers, max_gap)
    for request in plan:
        for hole in holes:
            if hole.table == request.table:
                assert request.address + request.count - 1 < hole.start or request.address > hole.end

    def allowed(group: list[PointSpec]) -> bool:
        if not feasible(group, max_registers, max_gap):
            return False
        table, start = group[0].table, min(p.address for p in group)
        end = max(p.end for p in group)
        return not any(h.table == table and start <= h.end and end - 1 >= h.start for h in holes)

    best = min(len(part) for part in partitions(points) if all(allowed(g) for g in part))
    assert len(plan) == best


def test_unreadable_gap_splits_a_request() -> None:
    points = [spec("a", 0), spec("b", 4)]
    assert [(r.address, r.count) for r in plan_reads(points, 125, 2)] == [(0, 6)]
    split = plan_reads(points, 125, 2, unreadable=[Unreadable("input", 3, 3)])
    assert [(r.address, r.count) for r in split] == [(0, 2), (4, 2)]
    other_table = plan_reads(points, 125, 2, unreadable=[Unreadable("holding", 3, 3)])
    assert len(other_table) == 1
    with pytest.raises(ValueError, match=r"unreadable input addresses 1\.\.1"):
        plan_reads(points, 125, 2, unreadable=[Unreadable("input", 1, 1)])


def test_bit_tables_use_the_bit_limit() -> None:
    coils = [PointSpec(f"c{i}", "coil", i, 1, lambda bits: bool(bits[0]), "m") for i in range(0, 3000, 1)]
    plan = plan_reads(coils, max_registers=10)
    assert [(r.table, r.address, r.count) for r in plan] == [("coil", 0, 2000), ("coil", 2000, 1000)]
    assert [r.count for r in plan_reads(coils, max_bits=800)] == [800, 800, 800, 600]
    with pytest.raises(ValueError, match=r"max_bits must be 1\.\.2000"):
        plan_reads(coils, max_bits=2001)


def test_one_request_per_point_workaround() -> None:
    points = [spec("a", 0), spec("b", 2), spec("c", 4)]
    assert len(plan_reads(points)) == 1
    plan = plan_reads(points, one_request_per_point=True)
    assert [(r.address, r.count) for r in plan] == [(0, 2), (2, 2), (4, 2)]


def test_decode_poll_reports_errors_sentinels_bitfields_and_scale_factors() -> None:
    from edge_agent.modbus import plan as plan_module

    missing = plan_module.Missing  # the decoders' marker type
    not_available = missing("not_available") if missing.__init__ is not object.__init__ else missing()
    points = [
        PointSpec("w", "holding", 0, 1, lambda r: r[0], "inv", scale_factor="w_sf"),
        PointSpec("w_sf", "holding", 1, 1, lambda r: r[0] - 65536 if r[0] > 32767 else r[0], "inv", emit=False),
        PointSpec("status", "holding", 2, 1, lambda r: {"alarm": bool(r[0] & 1), "running": bool(r[0] & 2)}, "inv"),
        PointSpec("va", "holding", 3, 1, lambda r: not_available if r[0] == 0xFFFF else r[0], "inv"),
        PointSpec("hz", "input", 0, 1, lambda r: r[0] / 100, "inv"),
    ]
    plan = plan_reads(points)
    assert [r.table for r in plan] == ["holding", "input"]
    got = decode_poll(plan, [[2301, 0xFFFF, 2, 0xFFFF], TimeoutError("no answer")])
    assert got.fields == {"inv": {"w": 230.1, "alarm": False, "running": True}}
    assert got.quality == {"inv": {"va": "not_available", "hz": "error"}}
    scaled_up = decode_poll(plan, [[5, 2, 0, 7], [5000]]).fields
    assert scaled_up == {"inv": {"w": 500.0, "alarm": False, "running": False, "va": 7, "hz": 50.0}}
    assert type(scaled_up["inv"]["w"]) is float  # one field type whatever the exponent
    no_sf = decode_poll(plan, [[5, 99, 0, 7], [5000]])  # exponent outside any sane range
    assert no_sf.quality == {"inv": {"w": "no_scale_factor"}}


def test_same_field_name_in_two_measurements_keeps_both_values_and_scale_factors() -> None:
    sf = lambda r: r[0] - 65536 if r[0] > 32767 else r[0]  # noqa: E731
    points = [
        PointSpec("current", "holding", 0, 1, lambda r: r[0], "inverter", scale_factor="a_sf"),
        PointSpec("a_sf", "holding", 1, 1, sf, "inverter", emit=False),
        PointSpec("current", "holding", 2, 1, lambda r: r[0], "meter", scale_factor="a_sf"),
        PointSpec("a_sf", "holding", 3, 1, sf, "meter", emit=False),
    ]
    got = decode_poll(plan_reads(points), [[243, 0xFFFF, 1234, 0xFFFE]])
    assert got.fields == {"inverter": {"current": 24.3}, "meter": {"current": 12.34}}
