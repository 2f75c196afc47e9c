"""`edge-agent read` and `edge-agent scan` as a technician runs them, against real servers on ptys and TCP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.meter_sim import MeterSimulator, decode_served
from labkit.serial_lab import MisbehavingResponder, PtyLink, serial_modbus_server
from tests.test_modbus_bus_serial import PROFILE, registers

pytestmark = pytest.mark.integration


def agent(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def th1(tmp_path: Path) -> Path:
    path = tmp_path / "th1.toml"
    path.write_text(PROFILE)
    return path


def test_read_with_a_profile_over_tcp(meter_sim: MeterSimulator) -> None:
    before = len(meter_sim.served)
    result = agent("read", "--target", f"tcp://127.0.0.1:{meter_sim.port}", "--unit", "1",
                   "--profile", "eastron_sdm630", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    from edge_agent.profiles import load_profile

    served = decode_served(meter_sim.served[before:], load_profile("eastron_sdm630"))["electricity"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["voltage_l1"]["unit"] == "V"
    assert {name: row["value"] for name, row in by_name.items() if name in served} == served


def test_read_with_a_profile_on_a_serial_bus(th1: Path) -> None:
    with PtyLink() as link, serial_modbus_server(link, {3: registers(3)}):
        result = agent("read", "--target", link.client_path, "--baud", "19200", "--unit", "3", "--profile", str(th1))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["temperature", "20.3", "degC"]
    assert lines[1].split() == ["humidity", "45.3"]
    assert lines[2].split() == ["energy", "1003.5"]


def test_raw_read_shows_every_word_order(meter_sim: MeterSimulator) -> None:
    result = agent("read", "--target", f"tcp://127.0.0.1:{meter_sim.port}", "--unit", "1",
                   "--table", "input", "--address", "70", "--count", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "input registers 70..71 (0-based; a manual's 30071 is address 70)" in out
    header = next(line for line in out.splitlines() if "float32 ABCD" in line)
    assert header.split()[:9] == ["address", "float32", "ABCD", "float32", "CDAB", "float32", "BADC", "float32", "DCBA"]
    row = out.splitlines()[-1].split()
    assert row[0] == "70"
    # the frequency (~50 Hz) is plausible in the ABCD column only: the technician sees which order is right
    assert 49.0 < float(row[1]) < 51.0
    assert not any(49.0 < float(v) < 51.0 for v in row[2:5])

    as_json = agent("read", "--target", f"tcp://127.0.0.1:{meter_sim.port}", "--unit", "1",
                    "--table", "input", "--address", "70", "--count", "2", "--json")
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [d["kind"] for d in docs] == ["register", "register", "pair"]
    assert 49.0 < docs[2]["float32 ABCD"] < 51.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "/dev/ttyNOPE0"], "serial port /dev/ttyNOPE0 does not exist"),
        (["--target", "tcp://127.0.0.1:1"], "connection refused by 127.0.0.1:1"),
        (["--target", "udp://x:1"], '--target: expected "tcp://HOST:PORT"'),
        (["--target", "/dev/ttyUSB0", "--baud", "9601"], "--baud: expected one of"),
    ],
)
def test_read_errors_are_one_clear_line(args: list[str], message: str) -> None:
    result = agent("read", *args, "--unit", "1", "--table", "input", "--count", "2")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_read_no_answer_and_exception_say_what_to_check(th1: Path) -> None:
    with PtyLink() as link, serial_modbus_server(link, {3: registers(3)}):
        silent = agent("read", "--target", link.client_path, "--unit", "9", "--table", "input", "--count", "2",
                       "--timeout", "0.3")
        missing = agent("read", "--target", link.client_path, "--unit", "3", "--table", "input",
                        "--address", "500", "--count", "2")
    assert "no answer from unit 9 on" in silent.stderr and "wiring (A/B swapped?)" in silent.stderr
    assert "baud rate and parity" in silent.stderr
    assert "exception 2 (illegal data address)" in missing.stderr and "0-based address" in missing.stderr


def test_read_crc_errors_suggest_baud_or_parity() -> None:
    responder = MisbehavingResponder({1: [1, 2, 3, 4]})
    responder.plan("bad_crc")
    try:
        result = agent("read", "--target", responder.device, "--unit", "1", "--table", "input", "--count", "2")
    finally:
        responder.close()
    assert "fail their CRC check" in result.stderr and "wrong baud rate or parity" in result.stderr


def test_scan_finds_live_units_and_the_profile_that_fits(th1: Path) -> None:
    with PtyLink() as link, serial_modbus_server(link, {1: registers(1), 2: registers(2), 4: registers(4)}):
        result = agent("scan", "--target", link.client_path, "--baud", "19200", "--units", "1-5",
                       "--timeout", "0.2", "--profile", str(th1), "--profile", "eastron_sdm630")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [int(line.split()[1]) for line in lines] == [1, 2, 4]
    assert all(f"profiles: {th1}" in line for line in lines)
    assert all("eastron_sdm630" not in line for line in lines)  # the SDM630's registers are not there
    assert f"{link.client_path} 19200 8N1 RTU" in lines[0]


def test_scan_reports_garbled_answers_and_nothing_found() -> None:
    responder = MisbehavingResponder({2: [1, 2, 3, 4]})
    responder.plan("bad_crc", "bad_crc")
    try:
        result = agent("scan", "--target", responder.device, "--units", "1-3", "--timeout", "0.2",
                       "--profile", "eastron_sdm630")
    finally:
        responder.close()
    # unit 2 answered garbage twice (counted, not taken for a unit), then nothing else answered cleanly
    assert "garbled answer(s)" in result.stderr


def test_a_word_order_that_reads_as_a_sentinel_is_null_in_json_not_a_crash() -> None:
    """50.92 Hz as float32 ABCD is a NaN pattern in DCBA (a not-available sentinel): `read --json` crashed on it
    with a TypeError when the simulator's frequency happened to land there."""
    from edge_agent.modbus.inspect import format_table, pair_rows

    rows = pair_rows(70, [16971, 44671])
    assert rows[0]["float32 DCBA"] is None and 50.9 < rows[0]["float32 ABCD"] < 51.0
    json.dumps(rows)
    assert format_table(rows).splitlines()[1].split()[4] == "-"
