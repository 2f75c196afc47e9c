"""A gateway without RTC whose clock starts five years off and is set mid-run (NTP), end to end:

    pymodbus SDM630 -> edge-agent (process, injected clock: labkit/fake_clock.py) -> mosquitto -> edge-collector
    -> InfluxDB

Readings taken before the clock was set must land at their true times (the simulator's serve log says when each
answer was built, in real time), flagged corrected_ntp, none set aside in citynerve_suspect_time, none lost.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from labkit import stack
from labkit.fake_clock import write_control
from labkit.influxd import InfluxdServer
from labkit.meter_sim import MeterSimulator, Served
from labkit.process import ServerProcess
from tests.test_e2e import MEASUREMENT, SAME_POLL_NS, expected_fields, wait_until

pytestmark = pytest.mark.integration

FIVE_YEARS_S = 5 * 365.25 * 86400


def polls(served: list[Served]) -> list[int]:
    """The real time of each poll's last answer (a poll's requests follow each other within ms; polls are 1 s
    apart)."""
    ends: list[int] = []
    for s in sorted(served, key=lambda s: s.time_ns):
        if ends and s.time_ns - ends[-1] < SAME_POLL_NS:
            ends[-1] = s.time_ns
        else:
            ends.append(s.time_ns)
    return ends


def fake_clock_agent(config: Path, control: Path) -> ServerProcess:
    log = config.with_suffix(".log")
    return ServerProcess("edge-agent", [sys.executable, "-m", "labkit.fake_clock", str(control), "run", str(config)],
                         log, ready=lambda: "connected to MQTT broker" in log.read_text(errors="replace"))


def test_readings_before_ntp_land_at_their_true_times(tmp_path, mosquitto, influxd: InfluxdServer, influx_db: str,
                                                      meter_sim: MeterSimulator) -> None:
    control = tmp_path / "clock.json"
    write_control(control, -FIVE_YEARS_S, synchronised=False)
    collector = stack.collector_process(stack.write_collector_config(
        tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-clock"),
        {"api": "v1", "url": influxd.url, "database": influx_db})).start()
    config = stack.write_agent_config(
        tmp_path / "agent.toml", "gw-clock", stack.mqtt_section(mosquitto),
        [stack.modbus_tcp_device("meter-c", meter_sim.port, interval="1s")], clock={"rtc": False})
    agent = fake_clock_agent(config, control)
    try:
        agent.start()
        wait_until(lambda: len(polls(meter_sim.served)) >= 4, 15, "4 polls with the clock five years off")
        # held, not sent: nothing stored at the wrong time (the collector would set it aside as suspect)
        assert not influxd.query(f'SELECT count(*) FROM "{MEASUREMENT}"', influx_db)
        corrected_at = time.time_ns()
        write_control(control, 0.0, synchronised=True)  # NTP steps the clock and the kernel says synchronised
        wait_until(lambda: "held reading(s) converted with the offset from ntp" in agent.log_path.read_text(), 10,
                   "the held readings converted")
        before = [t for t in polls(meter_sim.served) if t < corrected_at]

        def stored() -> list[dict]:
            return influxd.query(f'SELECT * FROM "{MEASUREMENT}"', influx_db)

        wait_until(lambda: len(stored()) >= len(before) + 2, 15, "the readings of before and after the correction")
    finally:
        agent.stop()
        collector.stop()

    rows = stored()
    served = list(meter_sim.served)
    times = [row["time"] for row in rows]
    for t in before:  # none lost: every poll before the correction has its reading, at its true time
        assert any(t <= stamp <= t + SAME_POLL_NS for stamp in times), f"poll at {t} has no reading"
    for row in rows:
        assert row["time"] > corrected_at - 60 * 10**9  # nothing five years back
        expected = expected_fields(row["time"], served)  # the values the meter served at that (true) time
        assert {k: v for k, v in row.items() if k in expected} == expected
    flagged = [row for row in rows if row.get("time_quality") == "corrected_ntp"]
    assert len(flagged) >= len(before) - 1  # the poll in flight at the step may have been stamped after it
    assert all(row["time"] < corrected_at + SAME_POLL_NS for row in flagged)
    assert any(row.get("time_quality") is None for row in rows)  # after the correction: as stamped
    assert not influxd.query("SELECT count(*) FROM citynerve_suspect_time", influx_db)
    assert "Traceback" not in agent.log_path.read_text() + collector.log_path.read_text()


def test_without_ntp_the_offset_comes_from_an_acknowledgement(tmp_path, influxd: InfluxdServer, influx_db: str,
                                                              meter_sim: MeterSimulator) -> None:
    """The clock stays five years off and unsynchronised: the collector's time in a sealed acknowledgement (of
    the probe the agent sends for it) gives the offset, within half the round trip; every reading is stored at
    its true time within that bound, flagged corrected_ack."""
    from labkit import enrolled
    from labkit.pki import LabCA
    from labkit.secure_broker import SecureBroker

    deployment = enrolled.create(tmp_path / "deployment", ["gw-noclock"])
    gw = deployment.gateways["gw-noclock"]
    control = tmp_path / "clock.json"
    write_control(control, -FIVE_YEARS_S, synchronised=False)
    with SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir,
                      collector_ca_dir=deployment.collector_ca_dir, server_ca=LabCA(tmp_path / "server-ca")) as broker:
        collector = stack.collector_process(stack.write_collector_config(
            tmp_path / "collector.toml", broker.collector_mqtt(deployment.collector_cert, deployment.collector_key),
            {"api": "v1", "url": influxd.url, "database": influx_db},
            security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)})).start()
        agent = fake_clock_agent(stack.write_agent_config(
            tmp_path / "agent.toml", gw.id, broker.gateway_mqtt(gw.tls_cert, gw.tls_key),
            [stack.modbus_tcp_device("meter-n", meter_sim.port, interval="1s")],
            security={"identity_key": str(gw.identity_key), "collector_key": str(deployment.collector_pub)},
            clock={"rtc": False, "max_ack_error": "2s"}), control)
        try:
            agent.start()
            wait_until(lambda: "clock offset learned from an acknowledgement" in agent.log_path.read_text(), 20,
                       "the offset from an acknowledgement")

            def stored() -> list[dict]:
                return influxd.query(f'SELECT * FROM "{MEASUREMENT}"', influx_db)

            wait_until(lambda: len(stored()) >= 5, 20, "5 readings stored")
        finally:
            agent.stop()
            collector.stop()
    rows = stored()
    ends = polls(meter_sim.served)
    bound = 2 * 10**9 + SAME_POLL_NS  # max_ack_error, and the poll's own span
    for row in rows:
        assert row["time_quality"] == "corrected_ack"
        assert min(abs(row["time"] - t) for t in ends) <= bound, "a reading far from every poll's true time"
    first = min(row["time"] for row in rows)
    assert all(any(abs(row["time"] - t) <= bound for row in rows) for t in ends if first <= t <= rows[-1]["time"])
    assert not influxd.query("SELECT count(*) FROM citynerve_suspect_time", influx_db)
    assert "Traceback" not in agent.log_path.read_text() + collector.log_path.read_text()
