"""Health points on change plus a slow heartbeat (collector/health.py health_mark, collector/inventory.py
Inventory.health_due): the pure rule, and the real collector writing fewer points for the same heartbeats."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import msgspec
import pytest

from collector.health import health_mark
from collector.inventory import Inventory
from labkit import stack
from labkit.influxd import InfluxdServer, quote_string
from labkit.mosquitto import MosquittoServer
from tests.test_collector_acks import collector_config, publish_all, publisher
from tests.test_e2e import wait_until
from wire.status import decode_status, encode_status

SEC = 10**9
T0 = 1_800_000_000 * SEC


def heartbeat(t: int, **overrides: object):
    doc = {"gateway": "gw-1", "time_ns": t, "since_ns": T0 - 3600 * SEC, "backlog_messages": 0, "next_seq": t // SEC,
           "last_publish_ns": t - SEC, "dropped_readings": 0, "resent_messages": 0, "outbox_resets": 0,
           "devices": {"meter-1": {"polls": t // SEC, "errors": 0}}}
    return decode_status(encode_status("online", **{**doc, **overrides}))


def due(inv: Inventory, doc, t: int) -> bool:
    inv.status("gw-1", doc, t)
    return inv.health_due("gw-1", doc, t)


def test_a_steady_heartbeat_is_written_once_per_interval() -> None:
    inv = Inventory(health_interval_ns=120 * SEC)
    written = [t for t in range(0, 600, 60) if due(inv, heartbeat(T0 + t * SEC), T0 + t * SEC)]
    # next_seq, polls and the last publish time move with every heartbeat: not news by themselves
    assert written == [0, 120, 240, 360, 480]


@pytest.mark.parametrize("change", [
    {"resent_messages": 1}, {"dropped_readings": 30}, {"outbox_resets": 1}, {"since_ns": T0},  # a restart
    {"devices": {"meter-1": {"polls": 1, "errors": 1, "last_error": "timeout"}}},
    {"devices": {"meter-1": {"polls": 1, "errors": 0}, "meter-2": {"polls": 1, "errors": 0}}},  # a device more
])
def test_what_matters_is_written_at_once(change: dict) -> None:
    inv = Inventory(health_interval_ns=600 * SEC)
    assert due(inv, heartbeat(T0), T0)
    assert not due(inv, heartbeat(T0 + 60 * SEC), T0 + 60 * SEC)
    assert due(inv, heartbeat(T0 + 120 * SEC, **change), T0 + 120 * SEC)
    assert not due(inv, heartbeat(T0 + 180 * SEC, **change), T0 + 180 * SEC)  # the same again: not news


def test_a_backlog_is_written_with_every_heartbeat_and_its_end_too() -> None:
    inv = Inventory(health_interval_ns=600 * SEC)
    assert due(inv, heartbeat(T0), T0)
    assert [due(inv, heartbeat(T0 + t * SEC, backlog_messages=n), T0 + t * SEC)
            for t, n in ((60, 5), (120, 9), (180, 2))] == [True, True, True]
    assert due(inv, heartbeat(T0 + 240 * SEC), T0 + 240 * SEC)  # drained: a change
    assert not due(inv, heartbeat(T0 + 300 * SEC), T0 + 300 * SEC)


def test_the_last_will_and_the_next_start_are_written() -> None:
    inv = Inventory(health_interval_ns=600 * SEC)
    assert due(inv, heartbeat(T0), T0)
    will = decode_status(encode_status("offline", gateway="gw-1"))
    assert due(inv, will, T0 + 10 * SEC)
    assert due(inv, heartbeat(T0 + 20 * SEC), T0 + 20 * SEC)  # online again


def test_interval_zero_writes_every_heartbeat_and_gateways_beyond_the_bound_are_written() -> None:
    inv = Inventory(health_interval_ns=0)
    assert all(due(inv, heartbeat(T0 + t * SEC), T0 + t * SEC) for t in range(0, 300, 60))
    small = Inventory(max_gateways=1, health_interval_ns=600 * SEC)
    small.status("gw-0", heartbeat(T0), T0)
    other = heartbeat(T0, gateway="gw-2")
    assert all(small.status("gw-2", other, T0 + t) is not None and small.health_due("gw-2", other, T0 + t)
               for t in range(3))  # not recorded: no memory of it, so nothing is held back


def test_the_mark_leaves_out_what_moves_with_every_heartbeat() -> None:
    a, b = heartbeat(T0), heartbeat(T0 + 60 * SEC, backlog_bytes=0, last_ack_ns=T0)
    assert health_mark(a) == health_mark(b)
    assert health_mark(a) != health_mark(msgspec.structs.replace(a, state="offline"))


def test_the_collector_stores_a_steady_heartbeat_once_and_a_change_at_once(
        tmp_path: Path, mosquitto: MosquittoServer, influxd: InfluxdServer, influx_db: str) -> None:
    """The real collector with the default [inventory] health_interval (2 min): three heartbeats a second apart
    that differ only in what moves with every heartbeat make one health point; a device's new error makes one
    more at once; the collector's stats line counts the heartbeats it had nothing to store for. Then a reload
    (SIGHUP) with health_interval "0s" applies at once: the next steady heartbeat is stored."""
    prefix, gateway = "healthlab/v1", "gw-steady"
    influx = {"api": "v1", "url": influxd.url, "database": influx_db}
    config = collector_config(tmp_path / "collector.toml", mosquitto, prefix, influx)
    collector = stack.collector_process(config)
    link = publisher(mosquitto, "health-publisher")
    now = time.time_ns()

    def status(i: int, errors: int = 0) -> tuple[str, bytes]:
        return (f"{prefix}/{gateway}/status", encode_status(
            "online", gateway=gateway, time_ns=now + i * SEC, since_ns=now - 60 * SEC, backlog_messages=0,
            next_seq=100 + i, last_publish_ns=now + i * SEC, dropped_readings=0, resent_messages=0, outbox_resets=0,
            devices={"meter-1": {"polls": 10 * i, "errors": errors}}))

    where = f"WHERE gateway = {quote_string(gateway)}"
    try:
        collector.start()
        publish_all(link, [status(0), status(1), status(2)])
        wait_until(lambda: "status_unchanged=2" in collector.log_path.read_text(), 10, "two heartbeats not stored")
        publish_all(link, [status(3, errors=1)])
        rows = wait_until(lambda: len(r := influxd.query(f"SELECT next_seq FROM citynerve_gateway_health {where}",
                                                         influx_db)) == 2 and r, 10, "the change stored")
        devices = influxd.query(f"SELECT errors FROM citynerve_device_health {where}", influx_db)
        assert [r["next_seq"] for r in rows] == [100, 103]
        assert [d["errors"] for d in devices] == [0, 1]

        # The interval is applied by a reload, without a restart.
        collector_config(config, mosquitto, prefix, influx,
                         inventory={"path": str(config.with_suffix(".inventory.db")), "health_interval": "0s"})
        os.kill(collector.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        wait_until(lambda: "applied inventory.health_interval" in collector.log_path.read_text(), 10,
                   "the reload not applied")
        publish_all(link, [status(4, errors=1)])  # the same as the last but what moves with every heartbeat
        rows = wait_until(lambda: len(r := influxd.query(f"SELECT next_seq FROM citynerve_gateway_health {where}",
                                                         influx_db)) == 3 and r, 10, "the steady heartbeat stored")
    finally:
        link.stop()
        collector.stop()
    assert [r["next_seq"] for r in rows] == [100, 103, 104]
    assert "Traceback" not in collector.log_path.read_text()
