"""`make demo` runs the real path and leaves nothing running."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _children_named(*names: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "citynerve-demo-" in line and any(n in line for n in names)]


def test_demo_shows_stored_readings_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "labkit.demo", "--duration", "9", "--summary-after", "6"],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "readings as InfluxDB stores them:" in out
    assert out.count("stored ") >= 2 and "gw-demo-01/main-meter  voltage_l1=" in out
    assert "queried back from InfluxDB" in out and "SDM630" in out
    assert "nothing left running" in out
    assert not _children_named("mosquitto", "influxd", "edge-agent", "edge-collector", "meter_sim")
