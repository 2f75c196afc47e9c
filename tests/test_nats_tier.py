"""The clustered broker tier on real parts: three nats-server 2.9 nodes from the SHIPPED deploy/nats/ files (TLS
everywhere, JetStream R3, MQTT), the users file made by `edge-collector nats users` from the registry, a real
edge-agent (MQTT, through a balancer in front of the three nodes), a real edge-collector with [nats] and influxd.

- readings go agent -> MQTT -> stream -> collector -> InfluxDB, and the end-to-end acknowledgements come back to
  the agent's MQTT session (its outbox drains): the uplink and the downlink of this tier;
- a gateway may publish only on its own topics and read only its own downlinks: a forbidden PUBLISH never reaches
  the collectors (proved with a sentinel published after it on the same connection), a forbidden SUBSCRIBE is
  refused; a certificate whose gateway the registry does not hold as active is refused, and a gateway revoked
  while connected is disconnected by the reload that follows `nats users`.

The fault test (a node killed with -9 during the run) is tests/test_nats_fault.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from collector.quarantine import Quarantine
from edge_agent.outbox import summary
from labkit import enrolled, stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import meter_in_thread
from labkit.nats import NatsCluster
from labkit.pki import LabCA
from labkit.process import ServerProcess
from labkit.secure_broker import TestClient
from tests.test_e2e import wait_until

pytestmark = pytest.mark.integration

AGENT_GW, PROBE_GW, REVOKED_GW, LATE_GW = "gw-n1", "gw-n2", "gw-n3", "gw-n4"
GRANTED_QOS1, SUBACK_FAILURE = 1, 0x80
ACK_WAIT = 2.0  # the consumer's: a message not acknowledged (nor marked in progress) within it goes out again


def write_users(config: Path, out: Path, *collectors: str) -> str:
    """`edge-collector nats users` as an operator runs it; its stdout."""
    args = [arg for name in collectors for arg in ("--collector", name)]
    result = subprocess.run([sys.executable, "-m", "collector.cli", "nats", "users", str(config), *args, "--out",
                             str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@dataclass
class Tier:
    deployment: enrolled.Deployment
    cluster: NatsCluster
    collector_config: Path
    collector: ServerProcess
    users: Path
    db: str
    influx: InfluxdServer

    def probe(self, gateway: str) -> TestClient:
        gw = self.deployment.gateways[gateway]
        return TestClient(self.cluster.nodes[1].mqtt_port, self.cluster.ca_file, gw.tls_cert, gw.tls_key,
                          client_id=gateway, protocol=paho.MQTTv311)

    def node_logs(self) -> str:
        return "".join(node.log_path.read_text(errors="replace") for node in self.cluster.nodes.values())


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    root = tmp_path_factory.mktemp("nats-tier")
    db = "nats_tier"
    influxd = InfluxdServer(root / "influxd").start()  # its own: one test stops it
    influxd.create_database(db)
    deployment = enrolled.create(root / "deployment", [AGENT_GW, PROBE_GW, REVOKED_GW])
    deployment.enroll(LATE_GW, register=False)  # a valid certificate, but not (yet) in the registry
    cluster = NatsCluster(root / "nats", device_ca_dir=deployment.ca_dir, collector_ca_dir=deployment.collector_ca_dir,
                          server_ca=LabCA(root / "server-ca"), users=root / "users.conf")
    config = stack.write_collector_config(
        root / "collector.toml", None, {"api": "v1", "url": influxd.url, "database": db},
        nats=cluster.collector_nats(deployment.collector_cert, deployment.collector_key, ack_wait=f"{ACK_WAIT}s"),
        security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
        log={"stats_interval": "1s"},
    )
    out = write_users(config, root / "users.conf", "collector-1")
    assert "3 gateway(s) (0 revoked left out), 1 collector instance(s)" in out
    cluster.start()
    collector = None
    try:
        collector = stack.collector_process(config).start()
        yield Tier(deployment, cluster, config, collector, root / "users.conf", db, influxd)
    finally:
        if collector is not None:
            collector.stop()
        cluster.close()
        influxd.close()


def collector_stats(tier: Tier) -> dict[str, int]:
    """The collector's newest stats line (once a second), as counters."""
    line = tier.collector.log_path.read_text().rsplit("stats: ", 1)[1].split("\n", 1)[0]
    return {k: int(v) for k, _, v in (part.partition("=") for part in line.split()) if v.isdigit()}


def test_readings_go_through_the_cluster_and_acknowledgements_come_back(tier: Tier, tmp_path: Path) -> None:
    gw = tier.deployment.gateways[AGENT_GW]
    with meter_in_thread() as meter:
        config = stack.write_agent_config(
            tmp_path / "agent.toml", AGENT_GW, tier.cluster.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_max="2s"),
            [stack.modbus_tcp_device("meter-1", meter.port)],
            uplink={"ack_timeout": "5s"},
            security={"identity_key": str(gw.identity_key), "collector_key": str(tier.deployment.collector_pub)},
        )
        outbox = tmp_path / f"{AGENT_GW}-state" / "outbox.sqlite3"

        def stored() -> int:
            return len(tier.influx.query(f"SELECT \"voltage_l1\" FROM \"electricity\" WHERE \"gateway\" = "
                                         f"'{AGENT_GW}'", db=tier.db))

        with stack.agent_process(config) as agent:
            wait_until(lambda: stored() >= 4, 30, "four readings of the agent in InfluxDB")
            # The agent deletes a message from its outbox only when its end-to-end acknowledgement arrived: the
            # acks the collector published to its MQTT session (QoS 1, through the server's $MQTT_msgs stream).
            wait_until(lambda: (s := summary(outbox))["messages"] == 0 or s["oldest_seq"] > 4, 15,
                       "the agent's first four messages acknowledged and deleted")
            # InfluxDB away for three times the consumer's ack_wait: the collector holds what it took and marks it
            # in progress, so JetStream hands none of it out again; all of it is stored once InfluxDB is back.
            tier.influx.stop()
            time.sleep(3 * ACK_WAIT)
            tier.influx.restart()
            before = stored()
            wait_until(lambda: stored() >= before + 3 and summary(outbox)["messages"] <= 2, 30,
                       "the outage's readings stored and acknowledged")
        stats = collector_stats(tier)
        assert stats.get("nats_marked_in_progress", 0) > 0, stats
        assert stats.get("nats_redelivered", 0) == 0, stats
    log = agent.log_path.read_text()
    assert "refused MQTT 5; falling back to MQTT 3.1.1" in log  # NATS 2.9 speaks 3.1.1 only
    published = int(log.rsplit("agent stopped: ", 1)[1].split(" messages published")[0])
    acked = int(log.rsplit(" acknowledged;", 1)[0].rsplit(" ", 1)[1])
    assert published >= 5 and acked >= 4, log[-400:]
    stored = tier.influx.query(f"SELECT \"seq\" FROM \"citynerve_ingest\" WHERE \"gateway\" = '{AGENT_GW}'",
                               db=tier.db)
    assert len(stored) >= acked


def test_a_gateway_reaches_only_its_own_topics(tier: Tier) -> None:
    probe = tier.probe(PROBE_GW)
    assert probe.connect() == "connected"
    try:
        assert probe.subscribe(f"citynerve/v1/{PROBE_GW}/down/ack") == [GRANTED_QOS1]
        assert probe.subscribe(f"citynerve/v1/{AGENT_GW}/down/ack") == [SUBACK_FAILURE]
        assert probe.subscribe("citynerve/v1/+/up") == [SUBACK_FAILURE]
        assert probe.subscribe("#") == [SUBACK_FAILURE]
        # MQTT 3.1.1 has no refusal in PUBACK: the forbidden message is dropped by the server. The sentinel,
        # published after it on the same connection and allowed, reaches the collector (which quarantines its bad
        # envelope); had the forbidden one been let through, it would have reached it first.
        probe.publish(f"citynerve/v1/{AGENT_GW}/up", b"forged for another gateway")
        probe.publish(f"citynerve/v1/{AGENT_GW}/status", b"forged status")
        probe.publish(f"citynerve/v1/{PROBE_GW}/up", b"sentinel")
        quarantine = Quarantine(tier.collector_config.with_suffix(".quarantine.db"))
        try:
            entries = wait_until(lambda: [e for e in quarantine.list(200) if e.gateway == PROBE_GW], 20,
                                 "the sentinel in the quarantine")
            assert [e.topic for e in entries] == [f"citynerve/v1/{PROBE_GW}/up"]
            assert not [e for e in quarantine.list(200) if b"forged" in e.payload]
        finally:
            quarantine.close()
        logs = tier.node_logs()
        assert 'Publish Violation - User "urn:citynerve:identity:' in logs
        assert f'Subject "citynerve.v1.{AGENT_GW}.up"' in logs
    finally:
        probe.close()


def test_only_active_registered_gateways_connect_and_a_revoked_one_is_cut_off(tier: Tier) -> None:
    late = tier.probe(LATE_GW)  # its certificate is valid, but the registry does not hold it
    assert late.connect() != "connected"
    victim = tier.probe(REVOKED_GW)
    assert victim.connect() == "connected"
    try:
        tier.deployment.revoke(REVOKED_GW)
        out = write_users(tier.collector_config, tier.users, "collector-1")
        assert "2 gateway(s) (1 revoked left out)" in out
        tier.cluster.reload()
        assert victim.dropped.wait(10), "the revoked gateway's connection survived the reload"
    finally:
        victim.close()
    again = tier.probe(REVOKED_GW)
    assert again.connect() != "connected"
    # The others are untouched by the reload.
    still = tier.probe(PROBE_GW)
    assert still.connect() == "connected"
    still.close()
