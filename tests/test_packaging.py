"""What an operator installs: one version everywhere, extras that fit the two machines, a missing optional
dependency as one line, and `make dist` (sdist, wheel, and a bundle with examples, units, deploy files, docs).

The ARM install path (make arm-check, labkit/arm.py) is not part of this suite: it takes 15-30 minutes.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
BIN = Path(sys.executable).parent


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


# -- one version ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", ["edge-agent", "edge-collector"])
def test_version_is_the_installed_distributions(program: str) -> None:
    out = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{program} {metadata.version('citynerve')} (citynerve, Python 3.")


def test_the_status_heartbeat_reports_that_version_too() -> None:
    from edge_agent.app import AGENT_VERSION
    from wire.version import VERSION as WIRE_VERSION

    assert AGENT_VERSION == WIRE_VERSION == metadata.version("citynerve")


# -- extras -----------------------------------------------------------------------------------------------------


def test_each_machine_gets_only_what_it_needs() -> None:
    project = PYPROJECT["project"]
    base = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    gateway, server = base | extras["agent"], base | extras["collector"]
    assert "pyserial" in gateway and not gateway & {"influxdb-client", "urllib3", "pymodbus"}
    assert {"influxdb-client", "urllib3"} <= server and not server & {"pyserial", "pymodbus"}
    assert "pymodbus" in extras["lab"] and "citynerve" in extras["dev"]


def test_the_programs_do_not_import_what_the_other_machine_installs() -> None:
    """The extras are right only if the code agrees: the agent never imports influxdb_client, urllib3 or pymodbus;
    the collector never serial or pymodbus (labkit and tests use pymodbus; they are not installed programs)."""
    imports = re.compile(r"^\s*(?:from|import)\s+(\w+)", re.MULTILINE)

    def imported(package: str) -> set[str]:
        return {m for path in (ROOT / package).rglob("*.py") for m in imports.findall(path.read_text())}

    agent, collector, wire = imported("edge_agent"), imported("collector"), imported("wire")
    assert not (agent | wire) & {"influxdb_client", "urllib3", "pymodbus", "collector"}
    assert not (collector | wire) & {"serial", "pymodbus", "edge_agent"}


_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if the extra that provides it was not installed
module = __import__(sys.argv[2] + ".cli").cli
sys.exit(module.main(sys.argv[3:]))
"""


def _run_without(modules: str, program: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WITHOUT, modules, program, *argv], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_an_agent_without_pyserial_says_so_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[gateway]\nid = "gw-1"\nstate_dir = "state"\n[mqtt]\nhost = "127.0.0.1"\ntls = false\n'
                      '[[devices]]\nkind = "modbus-tcp"\nid = "m1"\nhost = "127.0.0.1"\nport = 1502\nunit = 1\n'
                      'profile = "eastron_sdm630"\n')
    out = _run_without("serial", "edge_agent", "poll-once", str(config))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == "error: edge-agent needs pyserial: pip install 'citynerve[agent]'\n"


@pytest.mark.parametrize(("hidden", "api", "distribution"), [
    ("influxdb_client", "v2", "influxdb-client"),
    ("urllib3", "v1", "urllib3"),
])
def test_a_collector_without_its_extra_says_so_in_one_line(tmp_path: Path, hidden: str, api: str,
                                                           distribution: str) -> None:
    config = tmp_path / "collector.toml"
    target = 'database = "db"' if api == "v1" else 'org = "o"\nbucket = "b"\ntoken = "t"'
    config.write_text(f'[mqtt]\nhost = "127.0.0.1"\ntls = false\n[influx]\napi = "{api}"\n'
                      f'url = "http://127.0.0.1:8086"\n{target}\n[quarantine]\npath = "{tmp_path / "q.db"}"\n')
    out = _run_without(hidden, "collector", "run", str(config))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"error: edge-collector needs {distribution}: pip install 'citynerve[collector]'\n"


def test_any_other_missing_module_is_a_bug_and_shows_its_traceback() -> None:
    out = _run_without("msgspec", "edge_agent", "profiles")
    assert out.returncode == 1 and "Traceback" in out.stderr and "msgspec" in out.stderr


# -- make dist --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="python -m build is missing: make venv")
def test_make_dist_builds_a_wheel_an_sdist_and_a_bundle(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # -o: the test runs in this virtualenv as it is; `make dist` itself first brings it up to date.
    out = subprocess.run(["make", "-o", ".venv/.installed", "dist", f"DIST={dist}", f"PY={sys.executable}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    name = f"citynerve-{VERSION}"
    wheel, sdist, bundle = dist / f"{name}-py3-none-any.whl", dist / f"{name}.tar.gz", dist / f"{name}-bundle.tar.gz"

    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
        meta = zf.read(f"{name}.dist-info/METADATA").decode()
    assert f"Version: {VERSION}" in meta.splitlines()
    assert "License-Expression: Apache-2.0" in meta and f"{name}.dist-info/licenses/LICENSE" in files
    assert {"edge_agent/cli.py", "collector/cli.py", "wire/systemd.py", "firmware_profiles/eastron_sdm630.toml"} <= set(files)
    assert not [f for f in files if f.startswith(("labkit/", "tests/", "bench/"))]
    required = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    base = _requirement_names(PYPROJECT["project"]["dependencies"])
    assert _requirement_names([r for r in required if "extra ==" not in r]) == base
    assert not base & {"pyserial", "influxdb-client", "urllib3", "pymodbus"}

    shipped = ("LICENSE", "README.md", "examples/agent.toml", "examples/collector.toml", "systemd/edge-agent.service",
               "systemd/edge-collector.service", "deploy/mosquitto/citynerve.conf", "deploy/mosquitto/acl",
               "docs/install.md")
    with tarfile.open(bundle) as tf:
        in_bundle = set(tf.getnames())
    assert {f"{name}/{f}" for f in shipped} <= in_bundle, sorted(in_bundle)
    assert {f"{name}/{wheel.name}", f"{name}/{sdist.name}"} <= in_bundle
    assert not [f for f in in_bundle if f.endswith((".so", ".pyc"))]
    with tarfile.open(sdist) as tf:
        in_sdist = set(tf.getnames())
    assert {f"{name}/{f}" for f in shipped} <= in_sdist
