"""For every bundled profile, the agent's request plan uses the minimum number of requests the limits allow
(checked against an independent dynamic-programming optimum), and never covers an unreadable address."""

from __future__ import annotations

import pytest

from edge_agent.modbus.config import ModbusDevice
from edge_agent.modbus.devices import plan_for
from edge_agent.modbus.plan import Unreadable
from edge_agent.profiles import available_profiles, load_profile
from labkit.planning import minimum_requests


@pytest.mark.parametrize("name", available_profiles())
@pytest.mark.parametrize("workarounds", [[], ["no_gap_reads"], ["one_request_per_point"]], ids=str)
def test_plan_is_minimal(name: str, workarounds: list[str]) -> None:
    profile = load_profile(name)
    device = ModbusDevice(id="d", bus="b", profile=name, workarounds=workarounds)  # type: ignore[arg-type]
    plan = plan_for(device, profile)
    active = set(profile.workarounds) | set(workarounds)
    holes = [Unreadable(u.table, u.start, u.end) for u in profile.unreadable]
    best = minimum_requests(
        profile.point_specs(), profile.max_registers, 0 if "no_gap_reads" in active else profile.max_gap,
        max_bits=profile.max_bits, unreadable=holes, one_request_per_point="one_request_per_point" in active,
    )
    assert len(plan) == best
    for request in plan:
        assert request.count <= (profile.max_bits if request.table in ("coil", "discrete") else profile.max_registers)
        for hole in holes:
            if hole.table == request.table:
                assert request.address + request.count - 1 < hole.start or request.address > hole.end
    covered = {(r.table, r.address + s.offset) for r in plan for s in r.slots}
    assert covered == {(p.table, p.address) for p in profile.point_specs()}


def test_device_may_lower_the_request_limit() -> None:
    profile = load_profile("eastron_sdm630")
    device = ModbusDevice(id="d", bus="b", profile="eastron_sdm630", max_registers=10)
    plan = plan_for(device, profile)
    assert max(r.count for r in plan) <= 10
    assert len(plan) == minimum_requests(profile.point_specs(), 10, profile.max_gap)
