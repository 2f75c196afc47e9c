"""The fleet lab (labkit/fleet_lab.py) for the operator's views: one per session, shared by the dashboard queries
and the fleet page's browser test (it takes ~15 s to make every trouble an operator must see)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labkit.fleet_lab import FleetLab
from labkit.influxd import InfluxdServer


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, mosquitto, influxd: InfluxdServer) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path_factory.mktemp("fleet"), mosquitto, influxd, "fleet").start()
    try:
        yield lab
    finally:
        lab.close()
