"""SIGHUP reloads a running `edge-agent run` (docs/operations.md "Reloading the configuration"), with real parts:
two pymodbus meters on two TCP endpoints (two buses), mosquitto, the collector, InfluxDB. The meter whose
configuration did not change keeps its schedule through the reload (no gap in the sample times InfluxDB holds);
the changed one is rebuilt; changed MQTT settings restart the link; a file that fails the check is refused with
its error line and the running configuration kept."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest

from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import meter_in_thread
from tests.test_e2e import wait_until

pytestmark = pytest.mark.integration


def sample_times(influxd: InfluxdServer, db: str, device: str, after_ns: int = 0) -> list[int]:
    rows = influxd.query(f"SELECT voltage_l1 FROM electricity WHERE device = '{device}' AND time > {after_ns}", db)
    return sorted(int(r["time"]) for r in rows)


def largest_gap_s(times: list[int]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0) / 1e9


def log_line(path: Path, text: str, after: int = 0) -> str | None:
    """The first line of the log containing `text`, looking only past byte offset `after`."""
    for line in path.read_bytes()[after:].decode(errors="replace").splitlines():
        if text in line:
            return line
    return None


def test_sighup_rebuilds_only_what_changed_and_refuses_a_broken_file(tmp_path: Path, mosquitto, influxd: InfluxdServer,
                                                                     influx_db: str) -> None:
    with meter_in_thread(unit=1, seed=1, update_interval=0.05) as sim_a, \
            meter_in_thread(unit=1, seed=2, update_interval=0.05) as sim_b:
        collector = stack.collector_process(stack.write_collector_config(
            tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-reload"),
            {"api": "v1", "url": influxd.url, "database": influx_db},
        )).start()
        devices = [stack.modbus_tcp_device("steady", sim_a.port, interval="1s"),
                   stack.modbus_tcp_device("changing", sim_b.port, interval="1s", tags={"phase": "before"})]
        config = stack.write_agent_config(tmp_path / "agent.toml", "gw-reload", stack.mqtt_section(mosquitto), devices)
        agent = stack.agent_process(config).start()
        assert agent.proc is not None
        try:
            wait_until(lambda: len(sample_times(influxd, influx_db, "steady")) >= 3, 20, "the first readings")

            # 1. a good change: the second meter's tags (its bus is rebuilt) and the MQTT keepalive (a new link)
            devices[1]["tags"] = {"phase": "after"}
            stack.write_agent_config(config, "gw-reload", stack.mqtt_section(mosquitto, keepalive="20s"), devices)
            mark = agent.log_path.stat().st_size
            reloaded_ns = time.time_ns()
            os.kill(agent.proc.pid, signal.SIGHUP)
            line = wait_until(lambda: log_line(agent.log_path, "reloaded (SIGHUP)", mark), 10, "the reload")
            assert f"buses: kept tcp://127.0.0.1:{sim_a.port}; rebuilt tcp://127.0.0.1:{sim_b.port}" in line, line
            assert "MQTT link restarted" in line and "running the local file" in line, line
            wait_until(lambda: influxd.query(f"SELECT voltage_l1 FROM electricity WHERE phase = 'after' "
                                             f"AND time > {reloaded_ns}", influx_db), 15,
                       "readings of the rebuilt bus with its new tags, through the new link")
            wait_until(lambda: len(sample_times(influxd, influx_db, "steady", reloaded_ns)) >= 3, 15,
                       "three more readings of the unchanged meter")

            # 2. a broken file: refused with the line `edge-agent check` prints, nothing changes
            config.write_text(config.read_text().replace('id = "steady"', 'id = "steady"\nprot = 502'))
            mark = agent.log_path.stat().st_size
            os.kill(agent.proc.pid, signal.SIGHUP)
            line = wait_until(lambda: log_line(agent.log_path, "reload (SIGHUP) refused", mark), 10, "the refusal")
            assert line.endswith(f'the running configuration is kept: error: {config}: devices[0].prot: unknown key '
                                 f'(did you mean "port"?)'), line
            refused_ns = time.time_ns()
            wait_until(lambda: len(sample_times(influxd, influx_db, "steady", refused_ns)) >= 2, 15,
                       "readings go on after the refusal")
            assert agent.running
        finally:
            agent.stop()
            collector.stop()

    steady = sample_times(influxd, influx_db, "steady")
    assert largest_gap_s(steady) < 1.5, steady  # one sample per second, through both reloads
    assert agent.proc is not None and agent.proc.returncode == 0
    assert "Traceback" not in agent.log_path.read_text()
