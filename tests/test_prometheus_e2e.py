"""A real Prometheus scrapes a running agent and collector of the lab, and PromQL sees what they did:

    simulated SDM630 -> edge-agent (process, [metrics]) -> mosquitto (TLS) -> edge-collector (process, [metrics])
    -> influxd;  prometheus (Debian's) scrapes both every second and evaluates deploy/prometheus's rules.

Nothing is parsed from the text here: every check is a PromQL query to Prometheus's HTTP API, as Grafana and an
operator would ask it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import MeterSimulator
from labkit.process import free_port
from labkit.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "citynerve-rules.yml"
GATEWAY = "gw-prom"


def test_prometheus_scrapes_agent_and_collector(tmp_path: Path, mosquitto, influxd: InfluxdServer, influx_db: str,
                                                meter_sim: MeterSimulator) -> None:
    agent_port, collector_port = free_port(), free_port()
    collector = stack.collector_process(stack.write_collector_config(
        tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-prom"),
        {"api": "v1", "url": influxd.url, "database": influx_db},
        metrics={"listen": f"127.0.0.1:{collector_port}"},
    )).start()
    agent = stack.agent_process(stack.write_agent_config(
        tmp_path / "agent.toml", GATEWAY, stack.mqtt_section(mosquitto),
        [stack.modbus_tcp_device("meter-a", meter_sim.port, interval="1s")],
        metrics={"listen": agent_port},
    ))
    prom = PrometheusServer({"citynerve-collector": [f"127.0.0.1:{collector_port}"],
                             "citynerve-agent": [f"127.0.0.1:{agent_port}"]},
                            tmp_path / "prometheus", rule_files=[RULES])
    try:
        agent.start()
        with prom:
            prom.wait_targets_up(timeout=30)

            # the agent: a device's polls increase between scrapes, answers are timed, messages acknowledged
            polls = 'citynerve_agent_device_polls_total{job="citynerve-agent", device="meter-a"}'
            first = prom.wait_for(f"{polls} > 0")[0][1]
            prom.wait_for(f"{polls} > {first}")
            prom.wait_for('citynerve_agent_device_answer_seconds_count{device="meter-a"} > 0')
            assert prom.value('citynerve_agent_device_answer_seconds_bucket{device="meter-a", le="+Inf"}') == \
                prom.value('citynerve_agent_device_answer_seconds_count{device="meter-a"}')
            prom.wait_for("citynerve_agent_messages_acked_total > 0")
            prom.wait_for('citynerve_agent_bus_transactions_total{bus=~"tcp://.*"} > 0')
            assert prom.value("citynerve_agent_clock_synchronised") in (0.0, 1.0)
            assert prom.query(f'citynerve_agent_info{{gateway="{GATEWAY}"}}')
            assert prom.value('sum(citynerve_agent_device_errors_total{device="meter-a"}) or vector(0)') == 0
            assert prom.value("citynerve_agent_outbox_oldest_age_seconds") < 60

            # the collector: messages and readings stored, InfluxDB writes timed, the gateway seen just now
            prom.wait_for('citynerve_collector_messages_total{kind="up"} > 0')
            prom.wait_for("citynerve_collector_readings_total > 0")
            prom.wait_for("citynerve_collector_influx_lines_written_total > 0")
            prom.wait_for("citynerve_collector_influx_request_seconds_count > 0")
            prom.wait_for("citynerve_collector_acked_messages_total > 0")
            prom.wait_for('citynerve_collector_gateways{state="online"} == 1')
            age = prom.value(f'time() - citynerve_gateway_last_seen_timestamp_seconds{{gateway="{GATEWAY}"}}')
            assert age is not None and -5 < age < 30, age
            assert prom.value("sum(citynerve_collector_messages_rejected_total) or vector(0)") == 0
            assert prom.value("process_resident_memory_bytes{job='citynerve-collector'}") > 1e6

            # the shipped rules evaluate against the real series without an error, and none fires
            rules = prom.wait_for_rules(lambda rules: all(r["health"] == "ok" and r["lastEvaluation"][:4] != "0001"
                                                          for r in rules))
            assert {r["name"] for r in rules} >= {"CitynerveGatewayOffline", "CitynerveDeviceFailing"}
            assert prom.query('ALERTS{alertstate="firing"}') == []
    finally:
        agent.stop()
        collector.stop()
