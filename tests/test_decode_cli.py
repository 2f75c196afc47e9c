"""`edge-agent decode PROTOCOL FILE` on every fixture capture: readings on stdout, rejected frames with their
byte offsets on stderr, as JSON lines; the same results as the golden tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


def decode(protocol: str, path: Path, *extra: str) -> tuple[list[dict], list[dict], int]:
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "decode", protocol, str(path), *extra],
                            capture_output=True, text=True, timeout=60)
    out = [json.loads(line) for line in result.stdout.splitlines()]
    err = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return out, err, result.returncode


@pytest.mark.parametrize("protocol, capture", [("sds011", "pypms_SDS01x.hexdump"), ("pmsx003", "pypms_PMSx003.hexdump"),
                                               ("mhz19b", "pypms_MHZ19B.hexdump")])
def test_decode_sensor_captures(tmp_path: Path, protocol: str, capture: str) -> None:
    from tests.test_serial_sensors import frames

    raw = tmp_path / f"{protocol}.bin"
    raw.write_bytes(b"\x00junk" + b"".join(frames(protocol)) + frames(protocol)[0][:3])  # junk first, torn frame last
    out, err, code = decode(protocol, raw)
    assert code == 0
    expected = json.loads((GOLDEN / "serial_sensors" / "expected.json").read_text())[capture]["samples"]
    assert [o["fields"] for o in out] == [s["fields"] for s in expected]
    assert all(o["measurement"] == "air_quality" for o in out)
    assert err[0]["offset"] == 0 and err[0]["reason"] == "garbage"
    assert err[-1]["reason"] == "incomplete" and err[-1]["offset"] == raw.stat().st_size - 3


def test_decode_usage_errors(tmp_path: Path) -> None:
    _, _, code = decode("dsmr9", tmp_path / "x")
    assert code == 2
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "decode", "nmea", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "No such file" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "decode", "ascii", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=60)
    assert "needs --config FILE --device ID" in result.stderr


def test_decode_nmea_captures() -> None:
    for capture, golden in (("pynmea2_valid_sentences.txt", "expected_valid.json"),
                            ("pynmea2_examples_data.log", "expected_examples.json")):
        out, err, code = decode("nmea", GOLDEN / "nmea" / capture)
        assert code == 0
        expected = json.loads((GOLDEN / "nmea" / golden).read_text())
        if golden == "expected_valid.json":
            expected = [e for entry in expected for e in entry["events"]]
        samples = [e for e in expected if "rejected" not in e]
        rejects = [e for e in expected if "rejected" in e]
        assert [o["fields"] for o in out] == [s["fields"] for s in samples]
        if golden == "expected_examples.json":  # one capture: offsets are the file's
            assert [(r["reason"], r["offset"]) for r in err] == [(r["rejected"], r["offset"]) for r in rejects]
        else:  # golden per sentence; the file as one stream also holds what lies between sentences
            assert {r["rejected"] for r in rejects} <= {r["reason"] for r in err}
            assert all(isinstance(r["offset"], int) and r["offset"] >= 0 for r in err)


def test_decode_iec62056_21_capture() -> None:
    out, err, code = decode("iec62056-21", GOLDEN / "iec62056_21" / "capture_synthetic.bin")
    assert code == 0
    expected = json.loads((GOLDEN / "iec62056_21" / "expected_capture.json").read_text())
    events = expected if isinstance(expected, list) else expected.get("events", expected)
    samples = [e for e in events if "rejected" not in e and "reason" not in e]
    rejects = [e for e in events if "rejected" in e or "reason" in e]
    assert [o["fields"] for o in out] == [s["fields"] for s in samples]
    assert len(err) == len(rejects)


@pytest.mark.parametrize("capture", sorted(p.stem for p in (GOLDEN / "dsmr").glob("*.txt")))
def test_decode_every_dsmr_capture(capture: str) -> None:
    out, err, code = decode("dsmr", GOLDEN / "dsmr" / f"{capture}.txt")
    assert code == 0
    events = json.loads((GOLDEN / "dsmr" / f"{capture}.json").read_text())["events"]
    samples = [e for e in events if "fields" in e]
    rejects = [e for e in events if "fields" not in e]
    assert [(o["measurement"], o["fields"], o["time_ns"]) for o in out] == [
        (s["measurement"] or "electricity", s["fields"], s["time_ns"]) for s in samples]
    assert [(r["offset"], r["reason"], r["length"]) for r in err] == [(r["offset"], r["rejected"], r["length"]) for r in rejects]
