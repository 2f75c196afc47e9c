"""Fixtures for real influx servers: influxd 1.x and VictoriaMetrics on free loopback ports, in temp dirs.

- influxd / victoria: one server for the whole session (tests keep apart by database / metric names);
- influx_db: a fresh database on the session influxd, named after the test;
- influxd_factory: servers of a test's own (auth, stop/restart...), closed when the test ends.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from labkit.influxd import InfluxdServer
from labkit.victoria import VictoriaMetricsServer

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def influxd() -> Iterator[InfluxdServer]:
    with InfluxdServer() as server:
        yield server


@pytest.fixture(scope="session")
def victoria() -> Iterator[VictoriaMetricsServer]:
    with VictoriaMetricsServer() as server:
        yield server


@pytest.fixture
def influx_db(influxd: InfluxdServer, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t{next(_counter)}_" + re.sub(r"\W+", "_", request.node.name)[:40]
    influxd.create_database(name)
    yield name
    influxd.drop_database(name)


@pytest.fixture
def influxd_factory() -> Iterator[Callable[..., InfluxdServer]]:
    servers: list[InfluxdServer] = []

    def make(**kwargs: Any) -> InfluxdServer:
        server = InfluxdServer(**kwargs)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.close()
