"""Plan efficiency: for every bundled profile, the requests per poll cycle of the agent's plan (devices.plan_for)
divided by the minimum the same limits allow (labkit.planning.minimum_requests, an independent dynamic program).

    python -m bench.plan_efficiency

Limits as the agent applies them: the profile's max_registers, max_bits, max_gap (0 with the no_gap_reads
workaround), unreadable ranges and one_request_per_point. Each profile is planned as shipped, and again with
each workaround added by the device (as a utility would for a meter that refuses gaps or multi-point reads).
A ratio of 1.0 is the goal (it cannot be lower). For orientation: registers read per poll / registers the
points occupy (above 1 where a bridged gap is read).
"""

from __future__ import annotations

import argparse
import json
import time

from edge_agent.modbus.config import WORKAROUNDS, ModbusDevice
from edge_agent.modbus.devices import plan_for
from edge_agent.modbus.plan import BIT_TABLES, Unreadable
from edge_agent.profiles import Profile, available_profiles, load_profile
from labkit.planning import minimum_requests


def efficiency(name: str, profile: Profile, added: list[str]) -> dict:
    device = ModbusDevice(id="d", bus="b", profile=name, workarounds=added)  # type: ignore[arg-type]
    started = time.perf_counter()
    plan = plan_for(device, profile)
    plan_ms = (time.perf_counter() - started) * 1000
    active = set(profile.workarounds) | set(added)
    points = profile.point_specs()
    best = minimum_requests(
        points,
        profile.max_registers,
        0 if "no_gap_reads" in active else profile.max_gap,
        max_bits=profile.max_bits,
        unreadable=[Unreadable(u.table, u.start, u.end) for u in profile.unreadable],
        one_request_per_point="one_request_per_point" in active,
    )
    read = sum(r.count for r in plan if r.table not in BIT_TABLES)
    needed = sum(p.width for p in points if p.table not in BIT_TABLES)
    return {
        "profile": name,
        "workarounds": sorted(active),
        "added": added,
        "points": len(points),
        "plan_requests": len(plan),
        "minimum_requests": best,
        "ratio": round(len(plan) / best, 3),
        "registers_read": read,
        "registers_needed": needed,
        "read_overhead": round(read / needed, 3) if needed else None,
        "plan_ms": round(plan_ms, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shipped-only", action="store_true", help="skip the variants with a workaround added")
    args = parser.parse_args(argv)

    rows = []
    for name in available_profiles():
        profile = load_profile(name)
        variants: list[list[str]] = [[]]
        if not args.shipped_only:
            variants += [[w] for w in WORKAROUNDS if w not in profile.workarounds]
        rows += [efficiency(name, profile, added) for added in variants]

    print(f"{'profile':<20} {'workarounds':<22} {'points':>6} {'plan':>5} {'minimum':>7} {'ratio':>6} "
          f"{'registers read/needed':>22}")
    for r in rows:
        regs = f"{r['registers_read']}/{r['registers_needed']}"
        print(f"{r['profile']:<20} {','.join(r['workarounds']) or '-':<22} {r['points']:>6} {r['plan_requests']:>5} "
              f"{r['minimum_requests']:>7} {r['ratio']:>6.3f} {regs:>22}")
    shipped = [r for r in rows if not r["added"]]
    result = {
        "profiles": len(available_profiles()),
        "worst_ratio": max(r["ratio"] for r in rows),
        "requests_as_shipped": sum(r["plan_requests"] for r in shipped),
        "minimum_as_shipped": sum(r["minimum_requests"] for r in shipped),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return result


if __name__ == "__main__":
    main()
