"""The clustered broker tier loses nothing when a node dies: exact accounting of every reading while NATS nodes
are killed with -9 and restarted.

Real parts: three nats-server nodes from the shipped deploy/nats/ configuration (TLS, JetStream R3, MQTT), three
real edge-agents (MQTT through a balancer in front of the nodes, sealed payloads) each reading its own simulated
field whose every value is known (labkit/counter_field.py), two real edge-collectors taking the uplink from the one
durable consumer they share, and a real influxd.

During the run the node leading the uplink stream is killed with -9, later started again; then the node leading it
by then is killed and started again. After recovery every reading served by the fields must be in InfluxDB exactly
once, with its value and sample time: nothing is allowed to be missing (no agent is killed here, so there is no
uncommitted cycle to excuse).

Why it holds: a message the cluster lost (stored on the dying leader only, or dropped while no leader was elected)
was never acknowledged end to end, so its gateway sends it again from its outbox; a message delivered twice (an
acknowledgement to JetStream lost with the node) is written again onto the same points.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.config import CollectorNats
from edge_agent.outbox import summary
from labkit import enrolled, stack
from labkit.counter_field import CounterField, account
from labkit.counter_field import agent_config as counter_agent_config
from labkit.influxd import InfluxdServer
from labkit.nats import NatsCluster
from labkit.pki import LabCA
from labkit.process import ServerProcess
from tests.test_e2e import wait_until
from tests.test_fault import Clock, delivered_messages
from tests.test_nats_tier import write_users

# Not marked `fault`: it runs in `make test` (about 50 s), so that every CI run shows the clustered tier losing
# nothing when a node dies (issue 14: "the NATS cluster fault test passes on every run").
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

GATEWAYS = ("gw-nf1", "gw-nf2", "gw-nf3")
UNITS = 3  # per gateway
POLL = 0.5  # seconds between polls of each unit
CYCLE = 0.5  # the agents' commit cycle
DB = "nats_fault"
STREAM = "CITYNERVE_UP"
CONSUMER = CollectorNats().consumer


def stored_counts(influx: InfluxdServer) -> dict[tuple[str, str], list[tuple[int, int]]]:
    rows = influx.query('SELECT "n" FROM "counter" GROUP BY "gateway", "device"', db=DB)
    out: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for row in rows:
        out.setdefault((row["gateway"], row["device"]), []).append((int(row["n"]), int(row["time"])))
    return out


def resent_messages(logs: list[Path]) -> int:
    """Messages the agents sent again (no end-to-end acknowledgement in time), from their last line."""
    return sum(int(m) for log in logs for m in re.findall(r"messages published \((\d+) sent again\)",
                                                          log.read_text(errors="replace"))[-1:])


@pytest.fixture
def influx(influxd: InfluxdServer) -> Iterator[InfluxdServer]:
    influxd.create_database(DB)
    yield influxd
    influxd.drop_database(DB)


def test_nothing_lost_when_nats_nodes_die(tmp_path: Path, influx: InfluxdServer) -> None:
    clock = Clock()
    deployment = enrolled.create(tmp_path / "deployment", list(GATEWAYS))
    cert2, key2 = enrolled.collector_certificate(deployment.root, deployment.collector_ca_dir, "collector-2")
    cluster = NatsCluster(tmp_path / "nats", device_ca_dir=deployment.ca_dir,
                          collector_ca_dir=deployment.collector_ca_dir, server_ca=LabCA(tmp_path / "server-ca"),
                          users=tmp_path / "users.conf")
    fields = {gw: CounterField(UNITS) for gw in GATEWAYS}
    processes: list[ServerProcess] = []
    logs: list[Path] = []

    def collector_config(name: str, cert: Path, key: Path) -> Path:
        config = stack.write_collector_config(
            tmp_path / f"{name}.toml", None, {"api": "v1", "url": influx.url, "database": DB, "retry_max": "2s"},
            nats=cluster.collector_nats(cert, key, ack_wait="5s"),
            security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
            log={"stats_interval": "1s"},
        )
        logs.append(config.with_suffix(".log"))
        return config

    configs = [collector_config("collector-1", deployment.collector_cert, deployment.collector_key),
               collector_config("collector-2", cert2, key2)]
    write_users(configs[0], tmp_path / "users.conf", "collector-1", "collector-2")
    outboxes = []
    try:
        cluster.start()
        for config in configs:
            processes.append(stack.collector_process(config).start())
        for gw_id, field in fields.items():
            field.start()
            gw = deployment.gateways[gw_id]
            agent_config = counter_agent_config(
                tmp_path / f"{gw_id}.toml", gw_id,
                cluster.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_min="1s", reconnect_max="2s"), field,
                identity_key=gw.identity_key, collector_key=deployment.collector_pub, poll=POLL, cycle=CYCLE)
            outboxes.append(tmp_path / f"{gw_id}-state" / "outbox.sqlite3")
            processes.append(stack.agent_process(agent_config).start())
        wait_until(lambda: len({gw for gw, _ in stored_counts(influx)}) == len(GATEWAYS), 30,
                   "readings of every gateway in InfluxDB")
        node_of = {node.mqtt_port: n for n, node in cluster.nodes.items()}
        clock.say(f"running: {len(GATEWAYS)} agents x {UNITS} units every {POLL}s, 2 collectors on one consumer; "
                  f"MQTT connections placed on nodes {[node_of[p] for p in cluster.balancer.placed]}")

        for round_ in (1, 2):
            time.sleep(3)
            leader = wait_until(lambda: cluster.stream_leader(STREAM), 20, f"a leader of {STREAM}")
            clock.say(f"({round_}) kill -9 nats-{leader}, the leader of {STREAM}")
            cluster.nodes[leader].kill()
            # (asked of the running nodes, which may name the dead one until they notice)
            new_leader = wait_until(lambda dead=leader: (n := cluster.stream_leader(STREAM)) != dead and n, 30,
                                    "a new stream leader")
            clock.say(f"    nats-{new_leader} leads {STREAM} now")
            # the new leader sees the dead node's replica lag (so that wait_current below has something to see)
            wait_until(lambda dead=leader: f"stream:nats-{dead}" in (cluster.lagging_replicas(STREAM, CONSUMER)
                                                                      or []), 30,
                       f"nats-{new_leader} to report nats-{leader}'s replica not current")
            time.sleep(4)
            clock.say(f"({round_}) restart nats-{leader}")
            cluster.nodes[leader].restart()
            cluster.wait_current(STREAM, CONSUMER, 60)
            clock.say(f"    every replica of {STREAM} and its consumer current again")

        time.sleep(3)
        clock.say("fields stop producing; waiting for the outboxes to drain")
        for field in fields.values():
            field.stop()
        produced = {(gw, f"counter-{u}"): list(field.served[u]) for gw, field in fields.items() for u in field.units}
        total = sum(len(v) for v in produced.values())
        wait_until(lambda: all(o.exists() and summary(o)["messages"] == 0 for o in outboxes), 90,
                   "every agent's outbox to drain")
        wait_until(lambda: sum(len(v) for v in stored_counts(influx).values()) >= total, 30,
                   "InfluxDB to hold what was produced")
        clock.say("drained")
        time.sleep(1.5)  # one more stats line from each collector for the report below
        stored = stored_counts(influx)
    finally:
        for proc in processes:
            proc.stop()
        for field in fields.values():
            if field._server is not None:
                field.stop()
        cluster.close()

    # -- accounting: no agent is killed, so no reading may be missing ------------------------------------------
    result = account(produced, stored)
    problems, lost, duplicates_in_db, wrong = result.problems, result.lost, result.duplicates, result.wrong
    messages = len(influx.query('SELECT "seq" FROM "citynerve_ingest"', db=DB))
    writes = delivered_messages(logs)
    stored_total = sum(len(v) for v in stored.values())
    print(f"\nproduced {total} readings ({len(GATEWAYS)} gateways x {UNITS} units) in {messages} messages")
    print(f"re-sent by the agents {resent_messages([tmp_path / f'{gw}.log' for gw in GATEWAYS])} messages; "
          f"messages written {writes} (>= {max(0, writes - messages)} duplicates collapsed onto their points)")
    print(f"stored {stored_total}; duplicates in InfluxDB {duplicates_in_db}; lost {lost}; wrong value or time {wrong}")
    assert not problems, "\n".join(problems[:30])
    assert stored_total == total
