"""The outbox with the real agent, broker, collector and InfluxDB: rows leave only when acknowledged as stored,
a backlog built while no collector runs drains when one comes, the heartbeat reports it, and a damaged outbox
never stops the gateway."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.outbox import summary
from labkit import stack
from labkit.counter_field import PROFILE, CounterField
from labkit.influxd import InfluxdServer
from labkit.mqtt_probe import MqttProbe
from tests.test_e2e import wait_until

pytestmark = pytest.mark.integration

GATEWAY = "gw-outbox"


def outbox_rows(path: Path) -> int:
    return summary(path)["messages"]


def stored_ns(influx: InfluxdServer, db: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for row in influx.query('SELECT "n" FROM "counter" GROUP BY "device"', db=db):
        out.setdefault(row["device"], set()).add(int(row["n"]))
    return out


@pytest.fixture
def field():
    f = CounterField(2).start()
    yield f
    if f._server is not None:
        f.stop()


def agent_config(tmp_path: Path, mosquitto, field: CounterField, **uplink) -> Path:
    return stack.write_agent_config(
        tmp_path / "agent.toml", GATEWAY, stack.mqtt_section(mosquitto),
        [stack.modbus_tcp_device(f"counter-{u}", field.port, unit=u, interval="0.5s", profile=str(PROFILE))
         for u in field.units],
        publish_interval="0.5s", uplink={"ack_timeout": "2s", "ack_timeout_max": "4s", **uplink},
    )


def collector_config(tmp_path: Path, mosquitto, influx: InfluxdServer, db: str) -> Path:
    return stack.write_collector_config(
        tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-outbox"),
        {"api": "v1", "url": influx.url, "database": db}, log={"stats_interval": "1s"},
    )


def test_backlog_waits_for_a_collector_then_drains_completely(tmp_path, mosquitto, influxd: InfluxdServer,
                                                              influx_db: str, field: CounterField) -> None:
    config = agent_config(tmp_path, mosquitto, field, heartbeat_interval="1s")
    outbox = tmp_path / f"{GATEWAY}-state" / "outbox.sqlite3"
    status = MqttProbe(mosquitto.port, str(mosquitto.ca.cert_path), [f"citynerve/v1/{GATEWAY}/status"])
    agent = stack.agent_process(config).start()
    collector = None
    try:
        # No collector: the broker PUBACKs every message, yet nothing is acknowledged as stored, so nothing leaves:
        # the outbox only grows (waited for, not slept: a loaded machine polls and commits later).
        wait_until(lambda: outbox_rows(outbox) >= 6, 30, "six messages held in the outbox")

        def backlog_reported(msgs) -> bool:
            docs = [json.loads(m.payload) for m in msgs]
            return any(d.get("backlog_messages", 0) >= 6 and d.get("oldest_unacked_seq") is not None
                       and d.get("resent_messages", 0) >= 1 for d in docs)

        seen = status.wait_for(backlog_reported, timeout=30)
        last = json.loads(seen[-1].payload)
        assert last["last_ack_ns"] is None and last["last_publish_ns"] and last["resent_messages"] >= 1
        assert last["devices"]["counter-1"]["polls"] >= 6 and last["devices"]["counter-1"]["errors"] == 0
        out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "outbox", str(config)], capture_output=True,
                             text=True, check=True).stdout
        assert "not yet acknowledged" in out and "sequence numbers 0 .." in out

        collector = stack.collector_process(collector_config(tmp_path, mosquitto, influxd, influx_db)).start()
        wait_until(lambda: outbox_rows(outbox) <= 2, 60, "the backlog to drain")
        field.stop()
        wait_until(lambda: outbox_rows(outbox) == 0, 30, "the last messages to be acknowledged")
        produced = {f"counter-{u}": {n for n, _ in field.served[u]} for u in field.units}
        assert stored_ns(influxd, influx_db) == produced  # every reading, built up while nobody stored them
        docs = [json.loads(m.payload) for m in status.wait_for(
            lambda msgs: json.loads(msgs[-1].payload).get("backlog_messages") == 0, timeout=30)]
        assert docs[-1]["last_ack_ns"] and docs[-1]["dropped_readings"] == 0
        assert "Traceback" not in agent.log_path.read_text()
    finally:
        agent.stop()
        if collector is not None:
            collector.stop()
        status.close()


def test_a_damaged_outbox_is_moved_aside_and_polling_goes_on(tmp_path, mosquitto, influxd: InfluxdServer,
                                                             influx_db: str, field: CounterField) -> None:
    config = agent_config(tmp_path, mosquitto, field)
    state = tmp_path / f"{GATEWAY}-state"
    state.mkdir()
    (state / "outbox.sqlite3").write_bytes(b"SQLite format 3\x00" + b"\xff" * 8000)  # a header, then garbage
    collector = stack.collector_process(collector_config(tmp_path, mosquitto, influxd, influx_db)).start()
    agent = stack.agent_process(config).start()
    try:
        wait_until(lambda: len(stored_ns(influxd, influx_db).get("counter-1", ())) >= 4, 20, "readings stored")
    finally:
        agent.stop()
        collector.stop()
    log = agent.log_path.read_text()
    assert "is unreadable" in log and "moved aside" in log and "Traceback" not in log
    assert [p.name.split(".damaged-")[0] for p in state.iterdir() if ".damaged-" in p.name] == ["outbox.sqlite3"]


def test_clean_stop_commits_the_cycle_in_progress(tmp_path, mosquitto, field: CounterField) -> None:
    """SIGTERM: the readings of the unfinished cycle are committed, not lost (kill -9 is the fault tests' job)."""
    config = agent_config(tmp_path, mosquitto, field)
    config.write_text(config.read_text().replace('publish_interval = "0.5s"', 'publish_interval = "1h"'))
    agent = stack.agent_process(config).start()
    time.sleep(2.2)
    agent.stop()
    field.stop()
    served = sum(len(v) for v in field.served.values())
    db = sqlite3.connect(tmp_path / f"{GATEWAY}-state" / "outbox.sqlite3")
    readings = db.execute("SELECT coalesce(sum(readings), 0) FROM message").fetchone()[0]
    assert served >= 4 and readings == served
