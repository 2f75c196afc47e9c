"""Small parts of the agent: aligned schedule, the outbox's sequence counter and the old sequence file's
migration, uplink buffer, config errors."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent.outbox import NewMessage, Outbox
from edge_agent.schedule import next_aligned, phase, skipped_deadlines
from edge_agent.sequence import SequenceCorrupt, migrate_legacy, read_legacy
from edge_agent.uplink import UplinkBuffer
from wire.schema import Reading


def test_next_aligned_lands_on_wall_clock_multiples() -> None:
    assert next_aligned(1000.0, 10) == 1010.0
    assert next_aligned(1003.7, 10) == 1010.0
    assert next_aligned(1009.999, 10) == 1010.0
    assert next_aligned(59.5, 0.5) == 60.0
    assert next_aligned(3599.0, 900) == 3600.0


def test_a_phase_offsets_every_deadline_by_the_same_fraction() -> None:
    assert next_aligned(1003.7, 10, 0.5) == 1005.0
    assert next_aligned(1005.0, 10, 0.5) == 1015.0  # strictly after now
    assert next_aligned(1004.999, 10, 0.5) == 1005.0
    assert next_aligned(1009.0, 10, 0.25) == 1012.5
    assert next_aligned(1000.0, 10, 0.0) == next_aligned(1000.0, 10) == 1010.0
    # one deadline per interval, wherever the clock is: never two close together, never a gap of two intervals
    deadlines = []
    now = 1000.0
    for _ in range(20):
        now = next_aligned(now, 10, 0.37)
        deadlines.append(now)
    assert all(b - a == pytest.approx(10.0) for a, b in itertools.pairwise(deadlines))
    assert all((d - 3.7) % 10 == pytest.approx(0.0, abs=1e-6) for d in deadlines)


def test_the_phase_is_fixed_per_gateway_and_spreads_a_fleet_evenly() -> None:
    assert phase("gw-0001") == phase("gw-0001") and phase("gw-0001") != phase("gw-0002")
    phases = [phase(f"gw-{i:05d}") for i in range(10_000)]
    assert all(0.0 <= p < 1.0 for p in phases)
    per_tenth = [0] * 10
    for p in phases:
        per_tenth[int(p * 10)] += 1
    assert all(900 <= n <= 1100 for n in per_tenth), per_tenth  # within 10 % of 1,000 each


def test_skipped_deadlines() -> None:
    assert skipped_deadlines(100.0, 100.5, 1.0) == 0
    assert skipped_deadlines(100.0, 101.0, 1.0) == 1
    assert skipped_deadlines(100.0, 103.2, 1.0) == 3


def test_sequence_numbers_come_from_the_outbox_and_survive_an_empty_outbox(tmp_path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = Outbox(path, 10**9, 10**9)
    assert box.next_seq == 0
    box.commit([NewMessage(s, 1, 1, b"x") for s in range(25)])
    box.commit([], acked=[(0, 24)])  # everything acknowledged and deleted: only the counter remembers
    box.close()
    box = Outbox(path, 10**9, 10**9)
    assert box.backlog.messages == 0 and box.next_seq == 25
    with pytest.raises(ValueError, match="never used twice"):
        box.commit([NewMessage(3, 1, 1, b"x")])
    box.close()


def test_the_old_sequence_file_is_folded_into_the_outbox_once(tmp_path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 10**9, 10**9)
    box.commit([NewMessage(s, 1, 1, b"x") for s in range(11)])
    (tmp_path / "sequence").write_text("500\n")  # an older agent's reservation, ahead of the outbox
    assert migrate_legacy(tmp_path, box) == 500
    assert box.next_seq == 500 and not (tmp_path / "sequence").exists()
    box.close()
    box = Outbox(tmp_path / "outbox.sqlite3", 10**9, 10**9)
    assert box.next_seq == 500 and migrate_legacy(tmp_path, box) is None  # committed, and the file is gone
    (tmp_path / "sequence").write_text("7\n")  # a file behind the outbox (restored from an old image)
    assert migrate_legacy(tmp_path, box) == 7 and box.next_seq == 500
    box.close()


def test_corrupt_sequence_file_is_reported(tmp_path) -> None:
    path = tmp_path / "sequence"
    path.write_text("garbage")
    with pytest.raises(SequenceCorrupt, match="expected a non-negative integer"):
        read_legacy(path)


def _reading(i: int) -> Reading:
    return Reading("d", "m", i, {"v": float(i)})


def test_uplink_buffer_drops_oldest_and_counts() -> None:
    buf = UplinkBuffer(max_readings=5, max_message_readings=3)
    assert buf.add([_reading(i) for i in range(4)]) == 0
    assert buf.add([_reading(i) for i in range(4, 8)]) == 3
    assert buf.dropped_total == 3
    batch = buf.take()
    assert [r.time_ns for r in batch] == [3, 4, 5]
    buf.put_back(batch)
    assert [r.time_ns for r in buf.take()] == [3, 4, 5]
    assert [r.time_ns for r in buf.take()] == [6, 7]
    assert buf.take() == []


AGENT_OK = """
[gateway]
id = "gw-test"
state_dir = "{state}"

[mqtt]
host = "127.0.0.1"
port = 8883

[[devices]]
kind = "modbus-tcp"
id = "meter-1"
profile = "eastron_sdm630"
host = "127.0.0.1"
port = 5020
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("port = 5020", 'port = "abc"'), 'devices[0].port: expected an integer 1..65535, got "abc"'),
        (("port = 5020", "port = 70000"), "devices[0].port: expected an integer 1..65535, got 70000"),
        (('id = "gw-test"', 'id = "gw/test"'), "gateway.id: expected 1-64 letters, digits"),
        (("port = 5020", "prot = 5020"), 'devices[0].prot: unknown key (did you mean "port"?)'),
        (('kind = "modbus-tcp"', 'kind = "modbus-tpc"'), 'devices[0].kind: expected one of "modbus", "modbus-tcp", "serial", "dlt645", "cjt188", "mbus", got "modbus-tpc"'),
        (('profile = "eastron_sdm630"', 'profile = "no_such_meter"'), "devices[0].profile"),
        (("[mqtt]", "[mqtt]\nca_file = \"/nonexistent/ca.crt\""), "mqtt.ca_file: /nonexistent/ca.crt does not exist"),
        (("[mqtt]", '[mqtt]\nkeepalive = "often"'), 'mqtt.keepalive: expected a duration such as "10s"'),
        (("[mqtt]", '[mqtt]\npassword = { env = "CITYNERVE_NO_SUCH_VAR" }'),
         "mqtt.password: environment variable CITYNERVE_NO_SUCH_VAR is not set"),
        (("[gateway]", "[gateway"), "not valid TOML"),
        (("[mqtt]", '[outbox]\nmax_size = "lots"\n[mqtt]'), 'outbox.max_size: expected a size such as "200MB"'),
        (("[mqtt]", '[outbox]\nmax_size = "10KB"\n[mqtt]'), "outbox.max_size: expected at least 1MB"),
        (("[mqtt]", '[outbox]\nmax_age = 0\n[mqtt]'), "outbox.max_age: expected a duration greater than 0"),
        (("[mqtt]", '[uplink]\nack_timeout = "1m"\nack_timeout_max = "30s"\n[mqtt]'),
         "uplink.ack_timeout_max: expected at least ack_timeout (60 s)"),
        (("[mqtt]", '[uplink]\nmax_unacked_messages = 0\n[mqtt]'), "uplink.max_unacked_messages"),
    ],
)
def test_agent_config_errors_name_file_and_key(tmp_path, edit: tuple[str, str], expected: str) -> None:
    text = AGENT_OK.format(state=tmp_path / "state").replace(*edit, 1)
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(text))
    result = run_cli("check", str(path))
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"error: {path}: "), result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_agent_config_check_ok_and_secret_from_file(tmp_path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    text = AGENT_OK.format(state=tmp_path / "state").replace(
        "[mqtt]", f'[mqtt]\nusername = "gw-test"\npassword = {{ file = "{secret}" }}')
    path = tmp_path / "agent.toml"
    path.write_text(text)
    result = run_cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "device meter-1: modbus-tcp on tcp://127.0.0.1:5020 unit 1" in result.stdout
    assert f"outbox {tmp_path / 'state' / 'outbox.sqlite3'}: at most 1000 MB or 30 days" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr

    from edge_agent import config

    assert config.load(path).mqtt.password.value == "s3cret"


def test_missing_config_file(tmp_path) -> None:
    result = run_cli("check", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'nope.toml'}: file not found\n"


def test_duplicate_device_ids(tmp_path) -> None:
    text = AGENT_OK.format(state=tmp_path) + AGENT_OK.split("[mqtt]")[1].split("port = 8883", 1)[1]
    path = tmp_path / "agent.toml"
    path.write_text(text)
    result = run_cli("check", str(path))
    assert 'devices[1].id: "meter-1" is already used by devices[0]' in result.stderr


def test_profile_path_is_relative_to_the_config_file(tmp_path) -> None:
    import shutil

    from edge_agent import config

    (tmp_path / "profiles").mkdir()
    shutil.copy(Path(__file__).parent.parent / "firmware_profiles" / "eastron_sdm630.toml",
                tmp_path / "profiles" / "my_meter.toml")
    path = tmp_path / "agent.toml"
    path.write_text(AGENT_OK.format(state=tmp_path / "state").replace('"eastron_sdm630"', '"profiles/my_meter.toml"'))
    cfg = config.load(path)
    assert cfg.devices[0].profile == str(tmp_path / "profiles" / "my_meter.toml")
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check", str(path)], capture_output=True,
                            text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
