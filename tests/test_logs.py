"""Operator logs: one line per event, JSON when asked, repeated errors rate-limited per source."""

from __future__ import annotations

import io
import json
import logging

from wire.logs import RateLimitedLog, setup_logging


def test_text_format_puts_subject_after_the_message() -> None:
    out = io.StringIO()
    setup_logging("text", "info", stream=out)
    logging.getLogger("citynerve.test").warning("rejected message from gateway %s", "gw-1",
                                                extra={"gateway": "gw-1", "reason": "schema"})
    line = out.getvalue()
    assert line.count("\n") == 1
    assert "WARNING citynerve.test: rejected message from gateway gw-1  [gateway=gw-1 reason=schema]" in line


def test_json_format_is_one_object_per_line() -> None:
    out = io.StringIO()
    setup_logging("json", "info", stream=out)
    logging.getLogger("citynerve.test").info("gateway %s is %s", "gw-2", "online", extra={"gateway": "gw-2"})
    doc = json.loads(out.getvalue())
    assert doc["msg"] == "gateway gw-2 is online" and doc["gateway"] == "gw-2"
    assert doc["level"] == "info" and doc["logger"] == "citynerve.test" and doc["ts"].endswith("Z")


def test_rate_limit_per_key_and_suppressed_count(monkeypatch) -> None:
    out = io.StringIO()
    setup_logging("text", "info", stream=out)
    clock = [1000.0]
    monkeypatch.setattr("wire.logs.time.monotonic", lambda: clock[0])
    limited = RateLimitedLog(logging.getLogger("citynerve.rl"), interval=60)
    assert limited.warning(("reject", "gw-1"), "bad message from %s", "gw-1")
    for _ in range(5):
        assert not limited.warning(("reject", "gw-1"), "bad message from %s", "gw-1")
    assert limited.warning(("reject", "gw-2"), "bad message from %s", "gw-2")  # another source shows at once
    clock[0] += 61
    assert limited.warning(("reject", "gw-1"), "bad message from %s", "gw-1")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "(5 similar suppressed in the last 60s)" in lines[2] and "suppressed=5" in lines[2]


def test_collector_json_logs_from_the_command_line(tmp_path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "collector.toml"
    cfg.write_text('[influx]\napi = "v2"\nurl = "http://127.0.0.1:1"\n')
    result = subprocess.run([sys.executable, "-m", "collector.cli", "--log-format", "json", "check", str(cfg)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {cfg}: influx.")
    assert 'required when api = "v2"' in result.stderr
