"""The remote configuration's files on the gateway (edge_agent/remote_config.py `ConfigStore`, `what_to_run`) and
`edge-agent config status|reset`: what a start finds after each step of a trial, a damaged file, a local file
that changed a fixed key. Files only: no broker, no agent process."""

from __future__ import annotations

import json
import logging
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.remote_config import ConfigStore, what_to_run
from wire.control import config_sha256

LOCAL = """
[gateway]
id = "gw-files"
state_dir = "{state}"
[mqtt]
host = "127.0.0.1"
tls = false
[[devices]]
kind = "modbus-tcp"
id = "meter"
host = "127.0.0.1"
profile = "eastron_sdm630"
"""


@pytest.fixture
def local(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(LOCAL.format(state=tmp_path / "state")))
    return path


def pushed(local: Path, interval: str) -> str:
    return local.read_text().replace('profile = "eastron_sdm630"', f'profile = "eastron_sdm630"\ninterval = "{interval}"')


def test_a_confirmed_configuration_runs_instead_of_the_local_file_until_reset(local: Path, caplog) -> None:
    start = what_to_run(local)
    assert (start.running.version, start.floor, start.interrupted) == (0, 0, None)
    assert start.running.sha256 == config_sha256(local.read_text())
    store = ConfigStore(local.parent / "state")
    text = pushed(local, "7s")
    store.begin(3, config_sha256(text), text, "alice (engineer)")
    assert store.pending_path.read_text().startswith("# citynerve remote configuration version 3 sha256 ")
    assert stat.S_IMODE(store.pending_path.stat().st_mode) == 0o600
    assert json.loads(store.state_path.read_text()) == {"floor": 3, "trying": 3}
    store.confirm(3)
    assert not store.pending_path.exists() and json.loads(store.state_path.read_text()) == {"floor": 3, "trying": None}
    with caplog.at_level(logging.INFO):
        start = what_to_run(local)
    assert (start.running.version, start.running.sha256, start.floor) == (3, config_sha256(text), 3)
    assert float(start.running.cfg.devices[0].interval) == 7.0
    assert "running remote configuration version 3" in caplog.text and "is ignored" in caplog.text

    # `edge-agent check` reads the confirmed file as it is (its header is a comment)
    check = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check", str(store.confirmed_path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "every 7s" in check.stdout, check.stderr
    status = subprocess.run([sys.executable, "-m", "edge_agent.cli", "config", "status", str(local)],
                            capture_output=True, text=True, timeout=60)
    assert f"remote configuration version 3 (sha256 {config_sha256(text)})" in status.stdout
    assert "pushed versions must exceed 3" in status.stdout

    reset = subprocess.run([sys.executable, "-m", "edge_agent.cli", "config", "reset", str(local)],
                           capture_output=True, text=True, timeout=60)
    assert reset.returncode == 0 and "remote configuration version 3 removed" in reset.stdout
    start = what_to_run(local)
    assert (start.running.version, start.floor) == (0, 3)  # the local file, and version 3 still cannot return


def test_a_trial_cut_short_is_dropped_at_start_and_reported_interrupted(local: Path) -> None:
    store = ConfigStore(local.parent / "state")
    first = pushed(local, "7s")
    store.begin(1, config_sha256(first), first, "alice (engineer)")
    store.confirm(1)
    second = pushed(local, "9s")
    store.begin(2, config_sha256(second), second, "alice (engineer)")  # then kill -9
    start = what_to_run(local)
    assert (start.running.version, start.interrupted, start.floor) == (1, 2, 2)
    assert float(start.running.cfg.devices[0].interval) == 7.0
    assert not store.pending_path.exists() and json.loads(store.state_path.read_text())["trying"] is None
    assert what_to_run(local).interrupted is None  # reported once


def test_killed_between_the_confirming_rename_and_the_state_file_it_counts_as_confirmed(local: Path) -> None:
    store = ConfigStore(local.parent / "state")
    text = pushed(local, "7s")
    store.begin(5, config_sha256(text), text, "alice (engineer)")
    store.pending_path.rename(store.confirmed_path)  # the rename happened, the state file still says "trying"
    start = what_to_run(local)
    assert (start.running.version, start.interrupted) == (5, None)


def test_a_damaged_or_edited_confirmed_file_is_not_run(local: Path, caplog) -> None:
    store = ConfigStore(local.parent / "state")
    text = pushed(local, "7s")
    store.begin(2, config_sha256(text), text, "alice (engineer)")
    store.confirm(2)
    store.confirmed_path.write_text(store.confirmed_path.read_text().replace('"7s"', '"1s"'))
    with caplog.at_level(logging.ERROR):
        start = what_to_run(local)
    assert start.running.version == 0 and start.floor == 2
    assert "does not match the sha256 in its header" in caplog.text


def test_a_local_file_that_changed_a_fixed_key_since_wins(local: Path, caplog) -> None:
    store = ConfigStore(local.parent / "state")
    text = pushed(local, "7s")
    store.begin(2, config_sha256(text), text, "alice (engineer)")
    store.confirm(2)
    local.write_text(local.read_text() + '[outbox]\npath = "' + str(local.parent / "elsewhere.sqlite3") + '"\n')
    with caplog.at_level(logging.ERROR):
        start = what_to_run(local)
    assert start.running.version == 0
    assert "changed outbox.path since" in caplog.text
