"""The outbox's guarantee while configurations are pushed (docs/control.md "Remote configuration",
docs/operations.md "The guarantee"), with exact accounting: a field of counting Modbus units whose every reading
is known (labkit/counter_field.py) on a bus that no push changes, the whole secure stack (shipped mosquitto
config, sealed payloads, the collector, influxd; signed configuration documents delivered as the collector's
relay does, by labkit.control_lab.ControlLab), and during the run:

  v1  a good push that rebuilds another bus and replaces the MQTT connection        -> confirmed
  v2  a push with a wrong broker port (confirm timeout 10 s)                         -> rolled back
  v3  a push during which the agent is killed with -9, then restarted                -> rolled back (interrupted)
  v4  a good push again                                                              -> confirmed

After the field stops and the outbox drains, every reading the agent committed must be in InfluxDB exactly once,
with its value and its sample time; the only readings allowed to be missing are those of the cycle in progress
when the agent was killed.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.outbox import summary
from labkit import enrolled, stack
from labkit.counter_field import PROFILE, CounterField
from labkit.influxd import InfluxdServer
from labkit.meter_sim import meter_in_thread
from labkit.pki import LabCA
from labkit.process import free_port
from labkit.secure_broker import SecureBroker
from tests.test_e2e import wait_until
from tests.test_fault import Clock
from tests.test_remote_config_e2e import ConfigPusher

pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(240)]

GATEWAY = "gw-fault-conf"
UNITS = 4
POLL = 0.5
CYCLE = 0.5
DB = "fault_config"


def test_every_committed_reading_stored_once_while_configurations_are_pushed(
        tmp_path: Path, influxd_factory) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    influx: InfluxdServer = influxd_factory()
    influx.create_database(DB)
    deployment = enrolled.create(tmp_path / "deployment", [GATEWAY])
    gw = deployment.gateways[GATEWAY]
    broker = SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir,
                          collector_ca_dir=deployment.collector_ca_dir, server_ca=LabCA(tmp_path / "server-ca")).start()
    field = CounterField(UNITS).start()
    cert, key = enrolled.collector_certificate(deployment.root, deployment.collector_ca_dir, "collector-2")
    collector_config = stack.write_collector_config(
        tmp_path / "collector.toml",
        broker.collector_mqtt(cert, key, client_id="collector-2", reconnect_min="1s", reconnect_max="2s"),
        {"api": "v1", "url": influx.url, "database": DB, "retry_max": "2s"},
        security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
    )
    pusher = ConfigPusher(tmp_path, broker, deployment, GATEWAY)
    mqtt = broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_min="1s", reconnect_max="2s")
    security = {"identity_key": str(gw.identity_key), "collector_key": str(deployment.collector_pub),
                "operator_ca": str(pusher.pki.ca_pub)}
    counters = [stack.modbus_tcp_device(f"counter-{u}", field.port, unit=u, interval=f"{POLL}s", profile=str(PROFILE))
                for u in field.units]

    def agent_toml(name: str, *, other: dict[str, Any], mqtt_extra: dict[str, Any] | None = None,
                   **uplink: Any) -> Path:
        return stack.write_agent_config(
            tmp_path / name, GATEWAY, {**mqtt, **(mqtt_extra or {})}, [*counters, other],
            publish_interval=f"{CYCLE}s", security=security,
            uplink={"ack_timeout": "3s", "ack_timeout_max": "10s", "heartbeat_interval": "2s", **uplink})

    def wait_state(version: int, state: str, timeout: float) -> str:
        return pusher.report(version, state, timeout).reason

    outbox = tmp_path / f"{GATEWAY}-state" / "outbox.sqlite3"
    kills: list[int] = []
    with contextlib.ExitStack() as meter_running:
        meter = meter_running.enter_context(meter_in_thread(unit=1, seed=3, update_interval=0.05))
        other = stack.modbus_tcp_device("other", meter.port, interval="1s", tags={"phase": "local"})
        local = agent_toml("agent.toml", other=other)
        collector = stack.collector_process(collector_config).start()
        agent = stack.agent_process(local, wait_for_broker=False).start()
        try:
            wait_until(lambda: influx.query('SELECT count("n") FROM "counter"', db=DB), 30, "the first readings")
            clock.say("running: 4 counting units every 0.5 s on a bus no push changes")

            v1 = pusher.push(agent_toml("v1.toml", other={**other, "tags": {"phase": "v1"}},
                                        mqtt_extra={"keepalive": "20s"}, max_unacked_messages=50))
            wait_state(v1, "confirmed", 30)
            clock.say(f"v{v1}: another bus rebuilt, a new MQTT connection, a smaller window: confirmed")

            v2 = pusher.push(agent_toml("v2.toml", other=other, mqtt_extra={"port": free_port()}), confirm_timeout=10)
            assert wait_state(v2, "rolled_back", 40) == "no_ack"
            clock.say(f"v{v2}: a wrong broker port: rolled back after 10 s")

            v3 = pusher.push(agent_toml("v3.toml", other={**other, "tags": {"phase": "v3"}}, ack_timeout="4s"))
            wait_until(lambda: f"applying configuration version {v3}" in agent.log_path.read_text(), 20, "v3 on trial")
            kills.append(time.time_ns())
            agent.kill()
            agent = stack.agent_process(local, wait_for_broker=False).start()
            assert wait_state(v3, "rolled_back", 30) == "interrupted"
            clock.say(f"v{v3}: kill -9 during the trial, restarted: rolled back (interrupted)")

            v4 = pusher.push(agent_toml("v4.toml", other={**other, "tags": {"phase": "v4"}}))
            wait_state(v4, "confirmed", 30)
            clock.say(f"v{v4}: confirmed")
            wait_until(lambda: len(influx.query("SELECT voltage_l1 FROM electricity WHERE phase = 'v4'", db=DB)) >= 2,
                       15, "readings of the final configuration stored")

            field.stop()
            meter_running.close()  # nothing new is read: the outbox can drain to empty
            produced = {f"counter-{u}": list(field.served[u]) for u in field.units}
            total = sum(len(v) for v in produced.values())
            wait_until(lambda: summary(outbox)["messages"] == 0, 60, "the outbox to drain")
            stored_rows = influx.query('SELECT "n" FROM "counter" GROUP BY "device"', db=DB)
            clock.say("drained")
        finally:
            pusher.lab.close()
            agent.stop()
            collector.stop()
            if field._server is not None:
                field.stop()
            broker.close()

    stored: dict[str, dict[int, list[int]]] = {}
    for row in stored_rows:
        stored.setdefault(row["device"], {}).setdefault(int(row["n"]), []).append(int(row["time"]))
    problems: list[str] = []
    uncommitted = 0
    for device, served in produced.items():
        by_n = stored.get(device, {})
        for n, served_ns in served:
            times = by_n.get(n)
            if times is None:
                if any(kill - 2 * int(CYCLE * 1e9) - 250_000_000 <= served_ns <= kill + 50_000_000 for kill in kills):
                    uncommitted += 1
                else:
                    problems.append(f"{device} n={n} (served {served_ns}) is not in InfluxDB")
                continue
            if len(times) > 1:
                problems.append(f"{device} n={n} stored {len(times)} times")
            if not served_ns <= times[0] <= served_ns + 1_000_000_000:
                problems.append(f"{device} n={n} stored at {times[0]}, served at {served_ns}")
        extra = set(by_n) - {n for n, _ in served}
        if extra:
            problems.append(f"{device}: stored values never served: {sorted(extra)[:10]}")
    stored_total = sum(len(v) for d in stored.values() for v in d.values())
    print(f"\nproduced {total} readings; stored {stored_total}; uncommitted at the kill -9: {uncommitted}")
    assert not problems, "\n".join(problems[:30])
    assert uncommitted <= UNITS * 3
    assert stored_total == total - uncommitted
