"""The commented example configurations in examples/ stay valid as the schema grows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def lab_copy(tmp_path: Path, name: str) -> Path:
    """examples/<name> with its production paths replaced by a lab deployment's files (the loader reads them)."""
    from labkit import enrolled

    dep = enrolled.create(tmp_path / "dep", ["gw-0001"])
    gw = dep.gateways["gw-0001"]
    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder: check only tests that the file is readable\n")
    text = (EXAMPLES / name).read_text().replace("/etc/citynerve/ca.crt", str(ca))
    for production, lab in {
        "/etc/citynerve/pki/identity.key": gw.identity_key, "/etc/citynerve/pki/tls.crt": gw.tls_cert,
        "/etc/citynerve/pki/tls.key": gw.tls_key, "/etc/citynerve/collector.pub": dep.collector_pub,
        "/etc/citynerve/collector-1.crt": dep.collector_cert, "/etc/citynerve/collector-1.key": dep.collector_key,
        "/etc/citynerve/collector-keys": dep.keys_dir, "/var/lib/citynerve-collector/gateways.db": dep.registry,
    }.items():
        text = text.replace(production, str(lab))
    text = text.replace('state_dir = "/var/lib/citynerve"', f'state_dir = "{tmp_path / "state"}"')
    text = text.replace("/var/lib/citynerve-collector/", f"{tmp_path}/")
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, program", [("agent.toml", "edge_agent.cli"), ("collector.toml", "collector.cli"),
                                           ("collector-nats.toml", "collector.cli")])
def test_example_passes_check(tmp_path: Path, name: str, program: str) -> None:
    path = lab_copy(tmp_path, name)
    result = subprocess.run([sys.executable, "-m", program, "check", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: OK")
    if name == "agent.toml":  # an example of every device kind
        for kind in ("modbus", "modbus-tcp", "serial", "dlt645", "cjt188", "mbus"):
            assert f": {kind} " in result.stdout, kind
