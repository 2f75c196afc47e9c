"""Fault tests with exact accounting: every reading of a simulated field is known, the whole secure stack runs
for real (the shipped mosquitto config with mutual TLS and ACL, sealed payloads, two collectors on a shared
subscription, influxd), and during the run the broker, the collectors, InfluxDB and the agent fail.

After recovery every committed reading must be in InfluxDB exactly once, with its value and sample time. The
only readings allowed to be missing are those the agent had read but not yet committed when it was killed
(the cycle in progress): the outbox's guarantee (docs/operations.md).

Run with `make test-fault` (about 2 minutes: InfluxDB alone is down for 60 s).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.outbox import summary
from labkit import enrolled, stack
from labkit.counter_field import CounterField, account
from labkit.counter_field import agent_config as counter_agent_config
from labkit.faults import kill_inside_write
from labkit.influxd import InfluxdServer
from labkit.pki import LabCA
from labkit.process import ServerProcess
from labkit.secure_broker import SecureBroker
from tests.test_e2e import wait_until

# Its own waits add up to ~100 s, plus start-up and the final drain: more than the suite's default 120 s.
pytestmark = [pytest.mark.fault, pytest.mark.integration, pytest.mark.timeout(300)]

GATEWAY = "gw-fault-1"
UNITS = 6
POLL = 0.5  # seconds between polls of each unit
CYCLE = 0.5  # the agent's commit cycle (uplink.publish_interval)
DB = "fault"


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, what: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {what}", flush=True)


def stored_counts(influx: InfluxdServer) -> dict[str, list[tuple[int, int]]]:
    rows = influx.query('SELECT "n" FROM "counter" GROUP BY "device"', db=DB)
    out: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        out.setdefault(row["device"], []).append((int(row["n"]), int(row["time"])))
    return out


def delivered_messages(logs: list[Path]) -> int:
    """Messages the collectors wrote, duplicates included, from the last stats line of each process (a process
    killed with -9 loses at most its last second: the figure is a lower bound)."""
    total = 0
    for log in logs:
        counts = re.findall(r"stats: .*?\bmessages=(\d+)", log.read_text(errors="replace"))
        total += int(counts[-1]) if counts else 0
    return total


def test_nothing_lost_through_every_fault(tmp_path: Path, influxd_factory: Callable[..., InfluxdServer]) -> None:
    clock = Clock()
    influx = influxd_factory()
    influx.create_database(DB)
    deployment = enrolled.create(tmp_path / "deployment", [GATEWAY])
    gw = deployment.gateways[GATEWAY]
    cert2, key2 = enrolled.collector_certificate(deployment.root, deployment.collector_ca_dir, "collector-2")
    broker = SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir,
                          collector_ca_dir=deployment.collector_ca_dir, server_ca=LabCA(tmp_path / "server-ca")).start()
    field = CounterField(UNITS).start()
    processes: list[ServerProcess] = []
    collector_logs: list[Path] = []

    def collector(name: str, cert: Path, key: Path, run: int) -> ServerProcess:
        config = stack.write_collector_config(
            tmp_path / f"{name}-run{run}.toml",
            broker.collector_mqtt(cert, key, shared_group="citynerve", client_id=name, reconnect_min="1s",
                                  reconnect_max="2s"),
            {"api": "v1", "url": influx.url, "database": DB, "retry_max": "2s"},
            security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
            log={"stats_interval": "1s"},
        )
        collector_logs.append(config.with_suffix(".log"))
        proc = stack.collector_process(config).start()
        processes.append(proc)
        return proc

    agent_config = counter_agent_config(
        tmp_path / "agent.toml", GATEWAY,
        broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_min="1s", reconnect_max="2s"), field,
        identity_key=gw.identity_key, collector_key=deployment.collector_pub, poll=POLL, cycle=CYCLE)
    outbox = tmp_path / f"{GATEWAY}-state" / "outbox.sqlite3"

    def agent() -> ServerProcess:
        proc = stack.agent_process(agent_config, wait_for_broker=False).start()
        processes.append(proc)
        return proc

    agent_kills: list[int] = []
    kills_inside_commit: list[str | None] = []

    def kill_agent_mid_commit(proc: ServerProcess) -> ServerProcess:
        assert proc.proc is not None
        # A commit's WAL writes take microseconds (no fsync per commit): catching one is a matter of chances, and
        # a loaded machine gives fewer of them in 5 s (seen failing once in a full suite); the first catch ends
        # the wait, so a longer bound costs nothing when it is not needed.
        inside = kill_inside_write(proc.proc.pid, "outbox.sqlite3-wal", timeout=20)
        agent_kills.append(time.time_ns())
        kills_inside_commit.append(inside)
        proc.kill()  # reaps it
        clock.say(f"    killed inside {inside}() of the outbox WAL" if inside else
                  "    not caught inside a commit within 20 s: killed anyway")
        return agent()

    try:
        collector_a = collector("collector-1", deployment.collector_cert, deployment.collector_key, 1)
        collector_b = collector("collector-2", cert2, key2, 1)
        the_agent = agent()
        wait_until(lambda: stored_counts(influx), 30, "the first readings in InfluxDB")
        clock.say("running: 6 units polled every 0.5 s, two collectors on $share/citynerve")

        time.sleep(4)
        clock.say("(a) restart mosquitto (clean shutdown)")
        broker.restart()
        time.sleep(5)
        clock.say("(a) restart mosquitto again (kill -9: its queues are lost since the last snapshot)")
        broker.kill()
        broker.restart()
        time.sleep(5)

        clock.say("(b) kill -9 collector-1 in the middle of a batch, restart it")
        collector_a.kill()
        collector_a = collector("collector-1", deployment.collector_cert, deployment.collector_key, 2)
        time.sleep(4)

        clock.say("(c) stop InfluxDB for 60 s")
        influx.stop()
        stopped = time.monotonic()
        time.sleep(20)
        clock.say("(d) kill -9 the agent in the middle of a commit (InfluxDB still down), restart it")
        the_agent = kill_agent_mid_commit(the_agent)
        time.sleep(max(0.0, 60 - (time.monotonic() - stopped)))
        influx.restart()
        clock.say("(c) InfluxDB is back")
        time.sleep(8)

        clock.say("(d) kill -9 the agent in the middle of a commit again, restart it")
        the_agent = kill_agent_mid_commit(the_agent)
        time.sleep(4)

        clock.say("(e) kill -9 collector-2 for good: collector-1 alone serves the shared subscription")
        collector_b.kill()
        time.sleep(6)

        clock.say("field stops producing; waiting for the outbox to drain")
        field.stop()
        produced = {f"counter-{u}": list(field.served[u]) for u in field.units}
        total = sum(len(v) for v in produced.values())
        wait_until(lambda: outbox.exists() and summary(outbox)["messages"] == 0, 90, "the agent's outbox to drain")

        def all_stored() -> bool:
            stored = stored_counts(influx)
            return sum(len(v) for v in stored.values()) >= total - 2 * UNITS * len(agent_kills) * 3

        wait_until(all_stored, 30, "InfluxDB to hold what was produced")
        clock.say("drained")
        stored = stored_counts(influx)
    finally:
        for proc in processes:
            proc.stop()
        if field._server is not None:
            field.stop()
        broker.close()

    # -- accounting -------------------------------------------------------------------------------------------
    # A reading missing from InfluxDB is allowed only if it was served in the cycle in progress at an agent kill.
    result = account(produced, stored, excused=lambda served_ns: any(
        kill - 2 * int(CYCLE * 1e9) - 250_000_000 <= served_ns <= kill + 50_000_000 for kill in agent_kills))
    problems, uncommitted = result.problems, result.excused
    lost, duplicates_in_db, wrong = result.lost, result.duplicates, result.wrong
    messages = len(influx.query(f"SELECT \"seq\" FROM \"citynerve_ingest\" WHERE \"gateway\" = '{GATEWAY}'", db=DB))
    deliveries = delivered_messages(collector_logs)
    stored_total = sum(len(v) for v in stored.values())
    print(f"\nproduced {total} readings ({UNITS} units) in {messages} messages")
    print(f"stored {stored_total}; duplicates collapsed >= {max(0, deliveries - messages)} messages "
          f"(writes {deliveries} >= messages {messages}); duplicates in InfluxDB {duplicates_in_db}")
    print(f"uncommitted at the agent's {len(agent_kills)} kill -9 ({sum(map(bool, kills_inside_commit))} inside a "
          f"commit): {uncommitted} (allowed: the cycle in progress)")
    print(f"lost {lost}; wrong value or time {wrong}")
    assert not problems, "\n".join(problems[:30])
    assert any(kills_inside_commit), "no kill -9 landed inside a commit: the scenario did not happen"
    assert uncommitted <= len(agent_kills) * UNITS * 3
    assert stored_total == total - uncommitted
