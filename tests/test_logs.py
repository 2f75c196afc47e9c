"""Operator logs: one line per event, JSON when asked, repeated errors rate-limited per source."""

from __future__ import annotations

import io
import json
import logging
import os

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


def test_priority_prefix_only_when_stderr_is_the_journal(tmp_path) -> None:
    """sd-daemon(3): "<3>" etc. before each line when the stream is the journal's ($JOURNAL_STREAM = its dev:inode)."""
    from wire.logs import is_journal

    journal, other = tmp_path / "journal", tmp_path / "other"
    with open(journal, "w") as stream, open(other, "w") as elsewhere:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert is_journal(stream, env)
        assert not is_journal(elsewhere, env)  # inherited by a program that writes somewhere else
        assert not is_journal(stream, {}) and not is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not is_journal(io.StringIO(), env)
        setup_logging("text", "debug", stream=stream, environ=env)
        logger = logging.getLogger("citynerve.test")
        logger.debug("d")
        logger.info("i")
        logger.warning("w")
        logger.error("e")
        logger.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    lines = journal.read_text().splitlines()
    assert [line[:3] for line in lines[:5]] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert lines[5].startswith("<3>") and lines[5].endswith("failed")
    traceback = lines[6:]  # each line is an entry of its own in the journal: each carries the priority
    assert traceback[0] == "<3>Traceback (most recent call last):" and traceback[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in traceback)


def test_json_lines_to_the_journal_carry_the_prefix_too(tmp_path) -> None:
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        setup_logging("json", "info", stream=stream, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        logging.getLogger("citynerve.test").warning("w")
    line = path.read_text()
    assert line.startswith("<4>{") and json.loads(line[3:])["msg"] == "w"
