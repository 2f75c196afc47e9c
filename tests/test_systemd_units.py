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


@pytest.mark.parametrize("name", ["edge-agent.service", "edge-collector.service"])
def test_notify_and_watchdog(name: str) -> None:
    svc = _service(name)
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["WatchdogSec"].endswith("s") and int(svc["WatchdogSec"][:-1]) >= 30
    assert "AF_UNIX" in svc["RestrictAddressFamilies"]  # the notification socket


def test_collector_reloads_on_sighup() -> None:
    assert _service("edge-collector.service")["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_agent_may_open_serial_ports() -> None:
    assert "dialout" in _service("edge-agent.service")["SupplementaryGroups"]


CRL_SERVICE, CRL_TIMER = "edge-collector-operators-crl.service", "edge-collector-operators-crl.timer"
TLS_CRL_SERVICE, TLS_CRL_TIMER = "edge-collector-tls-crl.service", "edge-collector-tls-crl.timer"


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
@pytest.mark.parametrize("names", [["edge-agent.service"], ["edge-collector.service"], [CRL_SERVICE, CRL_TIMER],
                                   [TLS_CRL_SERVICE, TLS_CRL_TIMER]])
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


def test_the_tls_crl_timer_runs_monthly_and_catches_up() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(UNITS / TLS_CRL_TIMER)
    assert parser["Timer"]["OnCalendar"] == "monthly" and parser["Timer"]["Persistent"] == "true"
    assert parser["Install"]["WantedBy"] == "timers.target"


def test_the_tls_crl_service_re_signs_each_ca_and_hands_the_lists_to_the_broker(tmp_path: Path) -> None:
    """Its `edge-collector ca crl` lines run as written (paths moved to a scratch CA): the list gets a fresh
    next-update date; then each list is installed where the broker reads it, and the broker reloaded."""
    from cryptography import x509

    text = (UNITS / TLS_CRL_SERVICE).read_text()
    starts = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ExecStart=")]
    crl_lines = [line for line in starts if " ca crl " in line]
    assert [line.split("--dir ")[1] for line in crl_lines] == ["/etc/citynerve/device-ca", "/etc/citynerve/collector-ca"]
    conf = (UNITS.parent / "deploy" / "mosquitto" / "citynerve.conf").read_text()
    for ca in ("device-ca", "collector-ca"):  # installed at the broker's crlfile paths, then mosquitto reloaded
        assert f"/usr/bin/install -m 0644 /etc/citynerve/{ca}/ca.crl /etc/mosquitto/citynerve/{ca}.crl" in starts
        assert f"crlfile /etc/mosquitto/citynerve/{ca}.crl" in conf
    assert starts[-1] == "-/bin/systemctl reload mosquitto.service"

    bindir = Path(sys.executable).parent
    ca = tmp_path / "device-ca"
    run = [str(bindir / "edge-collector"), "ca"]
    subprocess.run([*run, "init", "--dir", str(ca)], check=True, capture_output=True, timeout=60)
    subprocess.run([*run, "crl", "--dir", str(ca), "--crl-days", "1"], check=True, capture_output=True, timeout=60)
    before = x509.load_pem_x509_crl((ca / "ca.crl").read_bytes()).next_update_utc
    command = crl_lines[0].replace("/opt/citynerve/bin", str(bindir)).replace("/etc/citynerve/device-ca", str(ca))
    subprocess.run(command.split(), check=True, capture_output=True, timeout=60)
    after = x509.load_pem_x509_crl((ca / "ca.crl").read_bytes()).next_update_utc
    assert before is not None and after is not None and (after - before).days >= 363
