"""The shipped unit files parse and carry the hardening the install guide promises."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"


def _service(name: str) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return dict(parser["Service"])


@pytest.mark.parametrize("name", ["edge-agent.service", "edge-collector.service"])
def test_hardening(name: str) -> None:
    svc = _service(name)
    assert svc["User"] == "citynerve"
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["Restart"] == "on-failure"
    assert svc["StateDirectory"]
    assert "check" in svc["ExecStartPre"]


def test_agent_may_open_serial_ports() -> None:
    assert "dialout" in _service("edge-agent.service")["SupplementaryGroups"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", ["edge-agent.service", "edge-collector.service"])
def test_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    bindir = Path(sys.executable).parent
    text = (UNITS / name).read_text().replace("/opt/citynerve/bin", str(bindir))
    unit = tmp_path / name
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if name in line]
    assert not problems, problems
