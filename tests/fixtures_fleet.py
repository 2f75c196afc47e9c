"""The fleet lab (labkit/fleet_lab.py) for the operator's views: one per session, shared by the dashboard queries
and the fleet page (it takes ~15 s to make every trouble an operator must see). Its agents and collector poll and
publish every second, so it is closed as soon as the last test using it is done, not at the session's end: the
timing-sensitive tests that follow run on a quiet machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labkit.fleet_lab import FleetLab
from labkit.influxd import InfluxdServer

_open: list[FleetLab] = []
_last_user = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, mosquitto, influxd: InfluxdServer) -> Iterator[FleetLab]:
    lab = FleetLab(tmp_path_factory.mktemp("fleet"), mosquitto, influxd, "fleet", web=True).start()
    _open.append(lab)
    try:
        yield lab
    finally:
        lab.close()


def _uses_the_fleet_lab(item: pytest.Item) -> bool:
    """Whether the item's `fleet` is this session fixture (a test module may define a `fleet` of its own, as
    tests/test_seal.py does: counted as a user, it kept the lab running through the tests after it)."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.get("fleet", ()) if info is not None else ()
    return bool(defs) and defs[-1].func is fleet.__wrapped__  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    users = [item.nodeid for item in items if _uses_the_fleet_lab(item)]
    if users:
        config.stash[_last_user] = users[-1]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if item.config.stash.get(_last_user, None) == item.nodeid:
        while _open:
            _open.pop().close()
