"""labkit.pprof against a real influxd: its CPU profile decoded without a Go toolchain, functions named."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from labkit import pprof
from labkit.influxd import InfluxdServer

pytestmark = pytest.mark.integration


@pytest.fixture
def influxd(tmp_path) -> Iterator[InfluxdServer]:  # type: ignore[no-untyped-def]
    """The lab's influxd turns pprof off; the shipped configuration (like Debian's) leaves it on."""
    server = InfluxdServer(tmp_path / "influxd", settings={"http": {"pprof-enabled": True}})
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_an_influxd_cpu_profile_names_its_write_path(influxd: InfluxdServer) -> None:
    influxd.create_database("pprof_lab")
    stop = threading.Event()

    def write() -> None:  # work for the profiler to see
        n = 0
        while not stop.is_set():
            body = "\n".join(f"m,d=d{i % 50} v={n + i}.5 {1_700_000_000_000_000_000 + n + i}" for i in range(2000))
            influxd.write(body, db="pprof_lab")
            n += 2000

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        raw = pprof.profile(influxd.url, 2)
    finally:
        stop.set()
        writer.join(10)
    flat, cum, total = pprof.summarize(raw)
    assert total > 0
    assert any("ParsePoints" in name for name in cum), cum.most_common(10)
    assert sum(flat.values()) <= total
    text = pprof.report(raw, 10)
    assert text.splitlines()[0].split() == ["flat", "%", "cum", "%", "function"]
