"""The shipped unit files parse and carry the hardening the install guide promises."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "systemd"


def _section(name: str, section: str) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return dict(parser[section])


def _service(name: str) -> dict[str, str]:
    return _section(name, "Service")


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


CRL_SERVICE, CRL_TIMER = "edge-collector-operators-crl.service", "edge-collector-operators-crl.timer"


def test_operator_crl_is_re_signed_daily_well_before_it_expires() -> None:
    """A gateway refuses every document once its newest operator revocation list is past its next update: the
    timer must re-sign it far more often than the list's validity, and catch up on runs missed while off."""
    svc, timer = _service(CRL_SERVICE), _section(CRL_TIMER, "Timer")
    argv = svc["ExecStart"].split()
    assert argv[1:4] == ["operators", "crl", "--dir"] and argv[0].endswith("/edge-collector")
    days = int(argv[argv.index("--days") + 1])
    assert timer["OnCalendar"] == "daily" and timer["Persistent"] == "true"
    assert days >= 7  # six missed daily runs before any gateway stops accepting commands
    assert _section(CRL_TIMER, "Install")["WantedBy"] == "timers.target"
    # the list the CA writes is what the collector is told to read ([control] crl)
    ca_dir = argv[argv.index("--dir") + 1]
    assert svc["ExecStartPost"].split()[-2] == f"{ca_dir}/operators.crl"


def test_operator_crl_runs_as_the_cas_own_user_sandboxed() -> None:
    svc = _service(CRL_SERVICE)
    assert svc["Type"] == "oneshot"
    assert svc["User"] not in ("citynerve", "root")  # the CA key is never the collector service's (nor root's)
    ca_dir = svc["ExecStart"].split()[svc["ExecStart"].split().index("--dir") + 1]
    assert ca_dir == f"/var/lib/{svc['StateDirectory']}" and svc["StateDirectoryMode"] == "0700"
    assert "ReadWritePaths" not in svc  # the state directory is the only writable place
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateNetwork", "yes"),
                       ("ProtectHome", "yes"), ("CapabilityBoundingSet", "")):
        assert svc[key] == value, key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("names", [["edge-agent.service"], ["edge-collector.service"], [CRL_SERVICE, CRL_TIMER]])
def test_systemd_analyze_verify(tmp_path: Path, names: list[str]) -> None:
    bindir = Path(sys.executable).parent
    units = []
    for name in names:
        unit = tmp_path / name
        unit.write_text((UNITS / name).read_text().replace("/opt/citynerve/bin", str(bindir)))
        units.append(str(unit))
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if any(name in line for name in names)]
    assert not problems, problems
