"""The walking skeleton end to end, with real parts only:

    pymodbus SDM630 simulator -> edge-agent (process) -> mosquitto (TLS) -> edge-collector (process) -> InfluxDB

Every stored value must equal what the simulated meter served, at the sample time the agent stamped.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from edge_agent.profiles import load_profile
from edge_agent.schedule import phase
from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import MeterSimulator, Served, decode_served
from labkit.mosquitto import MosquittoServer
from labkit.mqtt_probe import MqttProbe
from labkit.pki import LabCA
from labkit.victoria import VictoriaMetricsServer
from tests.fixtures_mqtt import mqtt_settings
from wire.envelope import Format, seal_plain
from wire.mqttlink import MqttLink
from wire.schema import Batch, Reading

pytestmark = pytest.mark.integration

MEASUREMENT = "electricity"
# The agent stamps a reading when the last answer of a poll arrived; the simulator logs when it built each
# answer. On loopback the two are well under this apart.
SAME_POLL_NS = 500_000_000


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def served_for(sample_ns: int, served: list[Served]) -> list[Served]:
    """The answers of the poll that produced a reading stamped `sample_ns`."""
    return [s for s in served if sample_ns - SAME_POLL_NS <= s.time_ns <= sample_ns]


def expected_fields(sample_ns: int, served: list[Served]) -> dict[str, float]:
    answers = served_for(sample_ns, served)
    assert answers, f"no served answer precedes the sample time {sample_ns}"
    return decode_served(answers, load_profile("eastron_sdm630"))[MEASUREMENT]


def start_pair(tmp_path: Path, broker: MosquittoServer, influx: dict[str, Any], devices: list[dict[str, Any]],
               gateway: str = "gw-e2e", **agent_sections: Any):
    collector = stack.collector_process(stack.write_collector_config(
        tmp_path / "collector.toml", stack.mqtt_section(broker, client_id=f"collector-{gateway}"), influx,
        log={"stats_interval": "1s"},
    )).start()
    agent = stack.agent_process(stack.write_agent_config(
        tmp_path / "agent.toml", gateway, stack.mqtt_section(broker), devices, **agent_sections,
    ))
    return collector, agent


def test_values_in_influxdb_v1_equal_values_served(tmp_path, mosquitto, influxd: InfluxdServer, influx_db: str,
                                                   meter_sim: MeterSimulator) -> None:
    device = stack.modbus_tcp_device("meter-a", meter_sim.port, interval="1s", tags={"site": "lab"})
    # gw-e2e-a: its publishing phase (0.56) lies far from a whole second, where a gateway without one sends
    collector, agent = start_pair(tmp_path, mosquitto, {"api": "v1", "url": influxd.url, "database": influx_db},
                                  [device], gateway="gw-e2e-a")
    try:
        agent.start()
        rows = wait_until(
            lambda: (r := influxd.query(f'SELECT * FROM "{MEASUREMENT}" GROUP BY *', influx_db)) and len(r) >= 4 and r,
            20, "4 readings in InfluxDB",
        )
        sent = influxd.query("SELECT seq FROM citynerve_ingest WHERE gateway = 'gw-e2e-a'", influx_db)
    finally:
        agent.stop()
        collector.stop()

    # The agent publishes at its own phase within each 1 s cycle (uplink.publish_spread, edge_agent/schedule.py):
    # every message was sent shortly after k + phase("gw-e2e-a") seconds, not just after a whole second.
    assert sent and all((row["time"] / 1e9 - phase("gw-e2e-a")) % 1.0 < 0.3 for row in sent), (phase("gw-e2e-a"), sent)
    served = list(meter_sim.served)
    for row in rows:
        assert row["gateway"] == "gw-e2e-a" and row["device"] == "meter-a"
        assert row["model"] == "SDM630" and row["site"] == "lab"
        # aligned to the wall clock: 1 s interval -> just after a whole second
        assert row["time"] % 1_000_000_000 < 300_000_000, row["time"]
        expected = expected_fields(row["time"], served)
        stored = {k: v for k, v in row.items() if k in expected}
        assert stored == expected  # exact: float32 -> float64 is exact, and line protocol keeps the shortest round trip
    # the per-message ingest record carries the receive time and sequence numbers, strictly increasing
    ingest = influxd.query("SELECT seq, readings, received_ns FROM citynerve_ingest", influx_db)
    seqs = [r["seq"] for r in ingest]
    assert seqs == sorted(set(seqs)) and len(seqs) >= 4
    assert all(r["received_ns"] >= r["time"] for r in ingest)
    assert "Traceback" not in agent.log_path.read_text() + collector.log_path.read_text()


def test_values_through_the_v2_write_api(tmp_path, mosquitto, victoria: VictoriaMetricsServer,
                                          meter_sim: MeterSimulator) -> None:
    device = stack.modbus_tcp_device("meter-v2", meter_sim.port, interval="1s")
    influx = {"api": "v2", "url": victoria.url, "token": "lab-token", "org": "city", "bucket": "meters"}
    collector, agent = start_pair(tmp_path, mosquitto, influx, [device], gateway="gw-v2")
    match = '{__name__="electricity_voltage_l1",gateway="gw-v2"}'
    try:
        agent.start()
        wait_until(lambda: len(victoria.export(match)) >= 3, 20, "3 samples in VictoriaMetrics")
    finally:
        agent.stop()
        collector.stop()
    served = list(meter_sim.served)
    samples = victoria.export('{__name__=~"electricity_.*",gateway="gw-v2",device="meter-v2"}')  # not its health
    by_time: dict[int, dict[str, float]] = {}
    for s in samples:
        assert s.name.startswith(MEASUREMENT + "_")
        by_time.setdefault(s.timestamp_ms, {})[s.name.removeprefix(MEASUREMENT + "_")] = s.value
    assert len(by_time) >= 3
    for ts_ms, fields in by_time.items():
        # VictoriaMetrics keeps milliseconds: the poll's answers precede the sample time by < SAME_POLL_NS
        expected = expected_fields(ts_ms * 1_000_000 + 999_999, served)
        # VictoriaMetrics keeps ~12 significant digits (decimal compression); InfluxDB above is exact.
        assert fields == pytest.approx(expected, rel=1e-10)


def test_poll_once_prints_what_the_meter_serves(tmp_path, mosquitto, meter_sim: MeterSimulator) -> None:
    config = stack.write_agent_config(
        tmp_path / "agent.toml", "gw-once", stack.mqtt_section(mosquitto),
        [stack.modbus_tcp_device("meter-1", meter_sim.port),
         stack.modbus_tcp_device("meter-gone", 1, interval="1s", timeout="500ms")],
    )
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "poll-once", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1  # one device failed
    assert "error: device meter-gone: " in result.stderr and "127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
    lines = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert len(lines) == 1 and lines[0]["device"] == "meter-1"
    assert lines[0]["fields"] == expected_fields(lines[0]["time_ns"], list(meter_sim.served))
    assert lines[0]["time"].endswith("Z")


def test_polling_goes_on_while_the_broker_is_down(tmp_path, lab_ca: LabCA, influxd: InfluxdServer, influx_db: str,
                                                   meter_sim: MeterSimulator) -> None:
    broker = MosquittoServer(tmp_path / "mq", lab_ca)
    device = stack.modbus_tcp_device("meter-b", meter_sim.port, interval="1s")
    collector = agent = None
    try:
        broker.start()
        collector, agent = start_pair(tmp_path, broker, {"api": "v1", "url": influxd.url, "database": influx_db},
                                      [device], gateway="gw-outage")
        agent.start()
        wait_until(lambda: influxd.query(f'SELECT count(voltage_l1) FROM "{MEASUREMENT}"', influx_db), 15, "first row")
        broker.stop()
        outage_start = time.time_ns()
        time.sleep(4)
        outage_end = time.time_ns()
        broker.restart()

        def during_outage() -> list[dict[str, Any]]:
            return influxd.query(
                f'SELECT voltage_l1 FROM "{MEASUREMENT}" WHERE time >= {outage_start} AND time <= {outage_end}',
                influx_db,
            )

        rows = wait_until(lambda: len(during_outage()) >= 3 and during_outage(), 30, "readings taken during the outage")
        served = list(meter_sim.served)
        for row in rows:
            assert row["voltage_l1"] == expected_fields(row["time"], served)["voltage_l1"]
        assert "disconnected from MQTT broker" in agent.log_path.read_text()
    finally:
        for proc in (agent, collector):
            if proc is not None:
                proc.stop()
        broker.stop()


def test_collector_rejects_bad_messages_flags_bad_clocks_and_keeps_going(
        tmp_path, mosquitto, influxd: InfluxdServer, influx_db: str) -> None:
    collector = stack.collector_process(stack.write_collector_config(
        tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-bad"),
        {"api": "v1", "url": influxd.url, "database": influx_db}, log={"stats_interval": "1s"},
    )).start()
    link = MqttLink(mqtt_settings(mosquitto), "bad-publisher")
    link.start()
    try:
        assert link.connected.wait(10)
        now = time.time_ns()
        good = Reading("meter-x", "electricity", now, {"voltage_l1": 231.5})
        from_1970 = Reading("meter-x", "electricity", 12_345, {"voltage_l1": 229.0})
        from_future = Reading("meter-x", "electricity", now + 3600 * 10**9, {"voltage_l1": 228.0})
        up = "citynerve/v1/{}/up"
        messages = [
            (up.format("gw-bad"), b"\x01\xc1garbage"),                                 # 0xc1: never valid msgpack
            (up.format("gw-bad"), b""),                                                # empty
            (up.format("gw-bad"), b"\x09" + b"x" * 10),                                # unknown format
            (up.format("gw-other"), seal_plain(Batch("gw-bad", 1, now, [good]))),      # topic mismatch
            (up.format("gw-bad"), bytes([Format.PLAIN_V1]) + msgspec.msgpack.encode(["gw-bad", "x", 1, []])),
            (up.format("gw-bad"), seal_plain(Batch("gw-bad", 2, now, [good, from_1970, from_future]))),
        ]
        for topic, payload in messages:
            link.publish(topic, payload, qos=1).wait_for_publish(5)

        rows = wait_until(lambda: influxd.query('SELECT * FROM "electricity" GROUP BY *', influx_db), 15, "good row")
        assert [(r["time"], r["voltage_l1"]) for r in rows] == [(now, 231.5)]
        suspect = wait_until(
            lambda: influxd.query("SELECT * FROM citynerve_suspect_time GROUP BY *", influx_db), 10, "suspect rows")
        assert sorted((r["sample_time_ns"], r["voltage_l1"]) for r in suspect) == [
            (12_345, 229.0), (now + 3600 * 10**9, 228.0)]
        assert all(r["measurement"] == "electricity" and r["gateway"] == "gw-bad" for r in suspect)

        log = wait_until(lambda: (t := collector.log_path.read_text()) and "rejected.schema=1" in t and t, 10,
                         "counters in the stats line")
        for reason in ("malformed", "empty", "unknown_format", "topic_mismatch", "schema"):
            assert f"rejected.{reason}=1" in log
            assert f"reason={reason}" in log
        assert "suspect_time=2" in log
        assert "implausible sample time" in log
        assert collector.running and "Traceback" not in log

        # every rejected payload is kept for inspection, with its reason
        listing = subprocess.run([sys.executable, "-m", "collector.cli", "quarantine", "list",
                                  str(tmp_path / "collector.toml")], capture_output=True, text=True, timeout=30)
        assert listing.returncode == 0, listing.stderr
        reasons = [line.split()[3] for line in listing.stdout.splitlines()]
        assert sorted(reasons) == sorted(["malformed", "empty", "unknown_format", "topic_mismatch", "schema"])
        newest = listing.stdout.splitlines()[0].split()[0]
        shown = subprocess.run([sys.executable, "-m", "collector.cli", "quarantine", "show",
                                str(tmp_path / "collector.toml"), newest], capture_output=True, text=True, timeout=30)
        assert "reason schema:" in shown.stdout and "00000000  01 " in shown.stdout
    finally:
        link.stop()
        collector.stop()


def test_eavesdropper_sees_status_and_uplink_topics(tmp_path, mosquitto, influxd: InfluxdServer, influx_db: str,
                                                    meter_sim: MeterSimulator) -> None:
    """Birth and last-will on the retained status topic; uplink at QoS 1 on <prefix>/<gw>/up."""
    probe = MqttProbe(mosquitto.port, str(mosquitto.ca.cert_path), ["citynerve/v1/gw-status/#"])
    device = stack.modbus_tcp_device("meter-s", meter_sim.port, interval="1s")
    collector, agent = start_pair(tmp_path, mosquitto, {"api": "v1", "url": influxd.url, "database": influx_db},
                                  [device], gateway="gw-status")
    try:
        agent.start()
        seen = probe.wait_for(lambda m: any(s.topic.endswith("/up") for s in m))
        status = [s for s in seen if s.topic == "citynerve/v1/gw-status/status"]
        assert status and msgspec.json.decode(status[0].payload)["state"] == "online"
        assert all(s.qos == 1 for s in seen if s.topic.endswith("/up"))
        agent.kill()  # no clean goodbye: the broker publishes the last will
        probe.wait_for(lambda m: any(s.topic.endswith("/status") and b'"offline"' in s.payload for s in m), 60)
    finally:
        agent.stop()
        collector.stop()
        probe.close()


def test_small_messages_are_not_held_back_by_the_receive_maximum(tmp_path, mosquitto, influxd: InfluxdServer,
                                                                 influx_db: str) -> None:
    """The collector acknowledges only stored messages, so at most receive_maximum are in flight to it; it must
    write them out then, not wait for batch_size lines or the flush interval (which would cap throughput)."""
    collector = stack.collector_process(stack.write_collector_config(
        tmp_path / "collector.toml",
        stack.mqtt_section(mosquitto, client_id="collector-small", receive_maximum=20),
        {"api": "v1", "url": influxd.url, "database": influx_db, "batch_size": 5000, "flush_interval": "10s"},
    )).start()
    link = MqttLink(mqtt_settings(mosquitto), "small-publisher", max_inflight=100)
    link.start()
    try:
        assert link.connected.wait(10)
        now = time.time_ns()
        started = time.monotonic()
        infos = [link.publish("citynerve/v1/gw-small/up",
                              seal_plain(Batch("gw-small", i, now, [Reading("m", "small", now + i, {"v": i})])))
                 for i in range(300)]
        for info in infos:
            info.wait_for_publish(10)
        # All but the last partial batch (< receive_maximum / 2 = 10 messages, which waits for the flush
        # interval) are stored at once; without the early flush it would take 15 batches x 10 s.
        wait_until(lambda: (r := influxd.query("SELECT count(v) FROM small", influx_db)) and r[0]["count"] > 290,
                   8, "at least 291 of 300 small messages stored")
        assert time.monotonic() - started < 8
    finally:
        link.stop()
        collector.stop()
