"""An independent oracle for request planning: the minimum number of reads, by dynamic programming.

The agent's planner is greedy; this computes the optimum a different way (over every split of each table's
address-sorted points into consecutive runs) so a test and the benchmark can hold the planner to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from edge_agent.modbus.plan import BIT_TABLES, PointSpec, Unreadable


def _feasible(run: Sequence[PointSpec], limit: int, max_gap: int, holes: Sequence[Unreadable]) -> bool:
    start = run[0].address
    end = max(p.end for p in run)
    if end - start > limit:
        return False
    covered_end = run[0].end
    for point in run[1:]:
        if point.address - covered_end > max_gap:
            return False
        covered_end = max(covered_end, point.end)
    return not any(h.start <= end - 1 and h.end >= start for h in holes)


def minimum_requests(points: Iterable[PointSpec], max_registers: int = 125, max_gap: int = 0, *,
                     max_bits: int = 2000, unreadable: Iterable[Unreadable] = (),
                     one_request_per_point: bool = False) -> int:
    by_table: dict[str, list[PointSpec]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    holes = list(unreadable)
    total = 0
    for table, pts in by_table.items():
        pts.sort(key=lambda p: p.address)
        if one_request_per_point:
            total += len(pts)
            continue
        limit = max_bits if table in BIT_TABLES else max_registers
        table_holes = [h for h in holes if h.table == table]
        best = [0] + [len(pts) + 1] * len(pts)  # best[i]: fewest reads for the first i points
        for i in range(1, len(pts) + 1):
            for j in range(i - 1, -1, -1):
                if pts[i - 1].end - pts[j].address > limit:
                    break
                if _feasible(pts[j:i], limit, max_gap, table_holes):
                    best[i] = min(best[i], best[j] + 1)
        total += best[len(pts)]
    return total
