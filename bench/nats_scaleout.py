"""Collector scale-out on the clustered broker tier: stored readings per second with one collector instance, then
two, taking the uplink from the one durable JetStream consumer they share (the baseline is the one instance).

    python -m bench.nats_scaleout [--gateways 20] [--messages 300] [--readings 30] [--fields 10] [--store influxd]
                                  [--collector-cpu 0.25]

The tier as tests/test_nats_tier.py runs it: three nats-server nodes from the shipped deploy/nats/ files (TLS,
JetStream R3, MQTT), the users file from `edge-collector nats users`, enrolled gateways with their own sealing
sessions, real edge-collector processes ([nats], sealed payloads), a real influxd (or VictoriaMetrics with
--store victoria, through the same InfluxDB v1 write API).

Each run starts from a backlog, so that what is measured is how fast the collectors empty it, not how fast the
publishers fill it: `--gateways` enrolled gateways each publish `--messages` sealed messages of `--readings`
readings (`--fields` float fields each, distinct sample times a day old) over MQTT 3.1.1 at QoS 1 into the stream
while no collector runs; then the collectors start, and the clock runs until the consumer has nothing pending and
nothing unacknowledged (a message is acknowledged only once the store confirmed its lines). Reported per run:
- the stored rate: lines the collectors wrote per second (their own stats lines, once a second), between 10 % and
  90 % of the backlog (steady state: start-up and the tail left out), and in readings per second;
- the whole drain, from the first collector's start to an empty consumer;
- the three nodes' CPU per message published by the gateways (MQTT in, while the backlog is made);
- CPU seconds of the collectors, the three NATS nodes and the store during the drain, per 1,000 readings;
- for influxd, that every reading is in the store (count); the messages each instance wrote (their sum above the
  backlog would be duplicates: a message handed to both).

On a machine with few cores the instances, NATS and the store compete for the same CPU, and a second instance
adds only what is left; --collector-cpu gives each instance a fixed budget (a cgroup CPU quota, as a container
limit would), so that the collectors are the bottleneck and the ratio shows what adding an instance adds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from collector.config import CollectorNats
from collector.natsin import consumer_config, stream_config, tls_context
from labkit import enrolled, stack
from labkit.flood_lab import FloodPayloads, load_sealer, stats_lines
from labkit.influxd import InfluxdServer
from labkit.nats import NatsCluster
from labkit.outbox_lab import cpu_seconds, server_pid
from labkit.pki import LabCA
from labkit.process import ServerProcess
from labkit.victoria import VictoriaMetricsServer
from wire import topics
from wire.mqttlink import MqttLink, MqttSettings

STREAM, CONSUMER = "CITYNERVE_UP", "collectors"
COLLECTORS = ("collector-1", "collector-2")


def ensure_stream(cluster: NatsCluster, cert: Path, key: Path) -> None:
    """The stream and consumer as a collector makes them (collector/natsin.py), before any collector runs, so that
    the backlog has somewhere to wait."""
    import nats

    settings = CollectorNats(servers=cluster.servers, ca_file=cluster.ca_file, cert_file=str(cert),
                             key_file=str(key))

    async def run() -> None:
        nc = await nats.connect(servers=cluster.servers, tls=tls_context(settings))
        js = nc.jetstream()
        await js.add_stream(stream_config(settings))
        await js.add_consumer(STREAM, consumer_config(settings))
        await nc.close()

    asyncio.run(run())


def publish_backlog(cluster: NatsCluster, deployment: enrolled.Deployment, gateway_ids: list[str], messages: int,
                    readings: int, fields: int) -> float:
    """Every gateway publishes `messages` sealed messages at QoS 1 on its own connection; returns the seconds."""
    errors: list[str] = []

    def one(n: int, gateway_id: str) -> None:
        gw = deployment.gateways[gateway_id]
        payloads = FloodPayloads(gateway_id, load_sealer(gw.dir, gateway_id, deployment.collector_pub),
                                 readings=readings, devices=readings, fields=fields, blocks=messages, pool=1)
        node = cluster.nodes[1 + n % len(cluster.nodes)]
        settings = MqttSettings(host="127.0.0.1", port=node.mqtt_port, ca_file=cluster.ca_file,
                                cert_file=str(gw.tls_cert), key_file=str(gw.tls_key), client_id=gateway_id,
                                protocol="3.1.1")
        free = threading.Semaphore(50)
        link = MqttLink(settings, gateway_id, max_inflight=50, on_published=lambda _mid: free.release())
        link.start()
        if not link.connected.wait(20):
            errors.append(f"{gateway_id}: cannot connect ({link.last_error})")
            return
        stream = payloads.stream("valid")
        topic = topics.up(topics.DEFAULT_PREFIX, gateway_id)
        for _ in range(messages):
            free.acquire()
            link.publish(topic, next(stream), qos=1)
        for _ in range(50):  # every PUBACK in
            free.acquire()
        link.stop()

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(n, g)) for n, g in enumerate(gateway_ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return time.monotonic() - start


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller, as on this machine


class CpuCap:
    """A CPU budget for one process, as a container limit gives it: a cgroup (v1 cpu controller) with a CFS quota of
    `cores` x the period. The process joins it before it execs (a shell wrapper), so no message is taken uncapped."""

    def __init__(self, name: str, cores: float) -> None:
        self.path = CPU_CGROUPS / f"citynerve-bench-{name}"
        self.path.mkdir(exist_ok=True)
        period = int((self.path / "cpu.cfs_period_us").read_text())
        (self.path / "cpu.cfs_quota_us").write_text(str(int(period * cores)))

    def wrap(self, argv: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "capped", *argv]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def steady_rate(logs: list[Path], total_lines: int) -> tuple[float, float]:
    """(lines per second between 10 % and 90 % of `total_lines` written, seconds of that window), from the
    collectors' stats lines summed over instances."""
    series = []
    for log in logs:
        series.append([(t, c.get("lines_written", 0)) for t, c in stats_lines(log.read_text(errors="replace"))])
    times = sorted({t for s in series for t, _ in s})

    def written_at(t: float) -> int:
        return sum(next((v for tt, v in reversed(s) if tt <= t), 0) for s in series)

    points = [(t, written_at(t)) for t in times]
    lo = next(p for p in points if p[1] >= 0.1 * total_lines)
    hi = next(p for p in points if p[1] >= 0.9 * total_lines)
    if hi[0] <= lo[0]:
        return float("nan"), 0.0
    return (hi[1] - lo[1]) / (hi[0] - lo[0]), hi[0] - lo[0]


def run(instances: int, args: argparse.Namespace, work: Path, cluster: NatsCluster, deployment: enrolled.Deployment,
        certs: dict[str, tuple[Path, Path]], store: InfluxdServer | VictoriaMetricsServer, gateway_ids: list[str]
        ) -> dict[str, Any]:
    db = f"scale{instances}"
    if isinstance(store, InfluxdServer):
        store.create_database(db)
    total = args.gateways * args.messages
    pids = {n: node.pid for n, node in cluster.nodes.items()}
    nats_in0 = sum(cpu_seconds(p) for p in pids.values())
    publish_s = publish_backlog(cluster, deployment, gateway_ids, args.messages, args.readings, args.fields)
    wait_for(lambda: (s := cluster.stream_state(STREAM, CONSUMER)) and s["num_pending"] >= total, 60,
             "the backlog in the stream")
    nats_in = sum(cpu_seconds(p) for p in pids.values()) - nats_in0  # MQTT in: PUBACKs, $MQTT_msgs, the stream
    processes: list[ServerProcess] = []
    caps: list[CpuCap] = []
    logs: list[Path] = []
    store_pid = server_pid(store)
    cpu0 = {"nats": sum(cpu_seconds(p) for p in pids.values()), "store": cpu_seconds(store_pid)}
    start = time.monotonic()
    try:
        for name in COLLECTORS[:instances]:
            cert, key = certs[name]
            config = stack.write_collector_config(
                work / f"{db}-{name}.toml", None, {"api": "v1", "url": store.url, "database": db},
                nats=cluster.collector_nats(cert, key, name=name),
                security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
                log={"stats_interval": "1s"}, quarantine={"path": str(work / f"{db}-{name}.quarantine.db")},
            )
            logs.append(config.with_suffix(".log"))
            process = stack.collector_process(config)
            if args.collector_cpu:
                cap = CpuCap(f"{db}-{name}", args.collector_cpu)
                caps.append(cap)
                process.argv = cap.wrap(process.argv)
            processes.append(process.start())
        wait_for(lambda: (s := cluster.stream_state(STREAM, CONSUMER)) and s["num_pending"] == 0
                 and s["num_ack_pending"] == 0, 900, "the consumer to drain", poll=0.25)
        drain_s = time.monotonic() - start
        cpu = {"collectors": sum(cpu_seconds(p.proc.pid) for p in processes if p.proc is not None),
               "nats": sum(cpu_seconds(p) for p in pids.values()) - cpu0["nats"],
               "store": cpu_seconds(store_pid) - cpu0["store"]}
        time.sleep(1.2)  # the last stats line of each collector
    finally:
        for proc in processes:
            proc.stop()
        for cap in caps:
            cap.close()
    readings = total * args.readings
    lines = readings + total  # one line per reading, one citynerve_ingest record per message
    taken = [stats_lines(log.read_text(errors="replace"))[-1][1].get("messages", 0) for log in logs]
    rate, window = steady_rate(logs, lines)
    if window < 3:  # too short a backlog for a steady state: the whole drain instead
        rate, window = lines / drain_s, 0.0
    stored = None
    if isinstance(store, InfluxdServer):
        rows = store.query('SELECT count("v0") FROM "flood_a"', db=db)
        stored = int(rows[0]["count"]) if rows else 0
    return {"collectors": instances, "messages": total, "readings": readings, "publish_s": round(publish_s, 1),
            "drain_s": round(drain_s, 1), "lines_per_s": round(rate), "readings_per_s": round(rate * readings / lines),
            "steady_window_s": round(window, 1), "stored": stored, "messages_per_instance": taken,
            "nats_cpu_ms_per_message_in": round(nats_in / total * 1000, 2),
            "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
            "cpu_ms_per_1000_readings": {k: round(v / readings * 1e6, 1) for k, v in cpu.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--messages", type=int, default=300, help="per gateway")
    parser.add_argument("--readings", type=int, default=30, help="per message")
    parser.add_argument("--fields", type=int, default=10, help="per reading")
    parser.add_argument("--store", choices=("influxd", "victoria"), default="influxd")
    parser.add_argument("--collector-cpu", type=float, default=0.0, metavar="CORES",
                        help="give each collector instance this CPU budget (a cgroup quota, e.g. 0.25), so that the "
                             "collectors, not the machine's free cores, are what limits; 0: no cap")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    gateway_ids = [f"gw-{i:04d}" for i in range(args.gateways)]
    print(f"enrolling {args.gateways} gateways ...", flush=True)
    deployment = enrolled.create(work / "deployment", gateway_ids)
    certs = {"collector-1": (deployment.collector_cert, deployment.collector_key),
             "collector-2": enrolled.collector_certificate(deployment.root, deployment.collector_ca_dir, "collector-2")}
    users = work / "users.conf"
    base = stack.write_collector_config(work / "users-source.toml", None, {}, nats={"servers": ["tls://127.0.0.1:1"]},
                                        security={"keys_dir": str(deployment.keys_dir),
                                                  "registry": str(deployment.registry)})
    subprocess.run([sys.executable, "-m", "collector.cli", "nats", "users", str(base), "--collector", "collector-1",
                    "--collector", "collector-2", "--out", str(users)], check=True, capture_output=True)
    store: InfluxdServer | VictoriaMetricsServer = (InfluxdServer(work / "influxd") if args.store == "influxd"
                                                    else VictoriaMetricsServer(work / "victoria"))
    cluster = NatsCluster(work / "nats", device_ca_dir=deployment.ca_dir, collector_ca_dir=deployment.collector_ca_dir,
                          server_ca=LabCA(work / "server-ca"), users=users)
    results = []
    try:
        store.start()
        cluster.start()
        ensure_stream(cluster, *certs["collector-1"])
        for instances in (1, 2):
            print(f"run: {instances} collector(s) ...", flush=True)
            results.append(run(instances, args, work, cluster, deployment, certs, store, gateway_ids))
            print(json.dumps(results[-1]), flush=True)
    finally:
        cluster.close()
        store.close()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    one, two = results
    ratio = two["lines_per_s"] / one["lines_per_s"] if one["lines_per_s"] else float("nan")
    cap = f", each collector capped at {args.collector_cpu:g} core" if args.collector_cpu else ""
    print(f"\n{args.gateways} gateways x {args.messages} messages x {args.readings} readings ({args.fields} fields), "
          f"store {args.store}{cap}")
    for r in results:
        print(f"  {r['collectors']} collector(s): {r['readings_per_s']:,} readings/s stored ({r['lines_per_s']:,} "
              f"lines/s, steady {r['steady_window_s']} s), drain {r['drain_s']} s; CPU ms per 1,000 readings: "
              f"collectors {r['cpu_ms_per_1000_readings']['collectors']}, NATS {r['cpu_ms_per_1000_readings']['nats']},"
              f" store {r['cpu_ms_per_1000_readings']['store']}"
              + (f"; stored {r['stored']:,} of {r['readings']:,}" if r["stored"] is not None else "")
              + f"; messages written per instance {r['messages_per_instance']} (of {r['messages']:,})"
              + f"; NATS CPU per MQTT message in (3 nodes) {r['nats_cpu_ms_per_message_in']} ms")
    print(f"  two collectors / one: {ratio:.2f}x")
    return {"runs": results, "ratio": round(ratio, 2)}


if __name__ == "__main__":
    main()
