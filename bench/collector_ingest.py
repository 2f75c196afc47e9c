"""Collector ingest: readings/s from a local mosquitto through edge-collector into influxd, divided by a direct
line-protocol write of the same points into the same influxd from one client, in the same run.

    python -m bench.collector_ingest [--messages 2000] [--readings 50] [--gateways 20] [--sealed]

With --sealed every message is sealed end to end (wire v2) by enrolled gateways and opened by the collector;
the run also measures the collector process's CPU time and the cost of opening the same messages in this
process, and reports the share of crypto in the collector's CPU time per message.

The publisher pre-builds every message, publishes at QoS 1 as fast as the broker takes them, and the clock
stops when InfluxDB holds every reading (polled with count()). The baseline posts the collector's own lines
(gzip, batches of the collector's batch size) with urllib3, one request at a time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import urllib3

from collector.ingest import Ingest, TimePolicy
from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.mosquitto import MosquittoServer
from labkit.pki import LabCA
from wire.envelope import seal_plain
from wire.mqttlink import MqttLink, MqttSettings
from wire.schema import Batch, Reading

FIELDS = ("voltage_l1", "voltage_l2", "voltage_l3", "current_l1", "current_l2", "current_l3", "power_l1",
          "power_l2", "power_l3", "power", "power_factor", "frequency", "energy_import",
          "energy_export", "reactive_power")
BATCH_SIZE = 5000


class Sealing:
    """Enrolled gateways (registry + identity keys) and the collector's key, made through the same modules the
    CLIs use, and one GatewaySealer per gateway."""

    def __init__(self, work: Path, gateways: int) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from collector.pki import init_collector_key, load_private_keys
        from collector.registry import GatewayRegistry
        from wire.seal import CollectorKey, GatewaySealer, Opener

        self.keys_dir = work / "collector-keys"
        init_collector_key(self.keys_dir)
        self.registry_path = work / "gateways.db"
        registry = GatewayRegistry(self.registry_path, create=True)
        keys = [CollectorKey.from_private(k) for k in load_private_keys(self.keys_dir).values()]
        self.sealers = {}
        for i in range(gateways):
            identity = Ed25519PrivateKey.generate()
            gw = f"gw-{i:04d}"
            registry.add(gw, identity.public_key())
            self.sealers[gw] = GatewaySealer(gw, identity, keys[0].public_only())
        self.opener = Opener(keys, registry.lookup)
        self.registry = registry

    def seal(self, gateway: str, topic: str, plaintext: bytes) -> bytes:
        return self.sealers[gateway].seal(topic, plaintext)


def build_messages(count: int, per_message: int, gateways: int, t0_ns: int,
                   sealing: Sealing | None = None) -> list[tuple[str, bytes]]:
    from wire.schema import encode_batch

    messages = []
    for i in range(count):
        gw = f"gw-{i % gateways:04d}"
        seq = i // gateways
        readings = [
            Reading(f"meter-{j}", "electricity", t0_ns + seq * 1_000_000_000 + j,
                    {f: 230.0 + (i * 7 + j * 13 + k) % 1000 / 10 for k, f in enumerate(FIELDS)},
                    {"model": "SDM630"})
            for j in range(per_message)
        ]
        batch = Batch(gw, seq, t0_ns + seq * 1_000_000_000, readings)
        topic = f"citynerve/v1/{gw}/up"
        payload = sealing.seal(gw, topic, encode_batch(batch)) if sealing else seal_plain(batch)
        messages.append((topic, payload))
    return messages


def open_cost_us(sealing: Sealing, messages: list[tuple[str, bytes]]) -> float:
    """Mean µs to open one of these messages with a warm session cache: the collector's per-message crypto."""
    for topic, payload in messages[: len(sealing.sealers)]:  # first message of each session: cache warm-up
        sealing.opener.open(topic.split("/")[2], topic, payload)
    from wire.seal import Opener

    opener = sealing.opener
    best = float("inf")
    for _ in range(3):
        fresh = Opener(list(opener._keys.values()), sealing.registry.lookup)
        for topic, payload in messages[: len(sealing.sealers)]:
            fresh.open(topic.split("/")[2], topic, payload)
        start = time.perf_counter()
        for topic, payload in messages[len(sealing.sealers):]:
            fresh.open(topic.split("/")[2], topic, payload)
        best = min(best, (time.perf_counter() - start) / max(1, len(messages) - len(sealing.sealers)) * 1e6)
    return best


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_readings(influx: InfluxdServer, db: str) -> int:
    rows = influx.query('SELECT count(voltage_l1) FROM "electricity"', db)
    return int(rows[0]["count"]) if rows else 0


def direct_write(influx: InfluxdServer, db: str, messages: list[tuple[str, bytes]],
                 sealing: Sealing | None = None) -> float:
    """Seconds to write the same points with one plain HTTP client: the baseline."""
    from wire.seal import Opener

    opener = Opener(list(sealing.opener._keys.values()), sealing.registry.lookup) if sealing else None
    ingest = Ingest("citynerve/v1", 1 << 30, TimePolicy(10**18, 0), "suspect", opener)
    lines = [line for topic, payload in messages for line in ingest.uplink(topic, payload, time.time_ns()).lines
             if line.startswith(b"electricity")]
    http = urllib3.PoolManager()
    url = f"{influx.url}/write?db={db}&precision=ns"
    start = time.perf_counter()
    for i in range(0, len(lines), BATCH_SIZE):
        body = gzip.compress(b"\n".join(lines[i:i + BATCH_SIZE]), 1)
        r = http.request("POST", url, body=body, headers={"Content-Encoding": "gzip"})
        assert r.status == 204, r.data
    elapsed = time.perf_counter() - start
    assert count_readings(influx, db) == len(lines)
    return elapsed


def through_collector(work: Path, broker: MosquittoServer, influx: InfluxdServer, db: str,
                      messages: list[tuple[str, bytes]], expected: int,
                      sealing: Sealing | None = None) -> tuple[float, float]:
    """(seconds until every reading is stored, collector CPU seconds spent on it)."""
    sections: dict = {}
    if sealing:
        sections["security"] = {"keys_dir": str(sealing.keys_dir), "registry": str(sealing.registry_path)}
    collector = stack.quiet_collector(
        work / "collector.toml", broker, "bench-collector",
        {"api": "v1", "url": influx.url, "database": db, "batch_size": BATCH_SIZE, "flush_interval": "200ms"},
        **sections,
    )
    assert collector.proc is not None
    cpu_before = process_cpu_seconds(collector.proc.pid)
    publisher = MqttLink(MqttSettings(host="127.0.0.1", port=broker.port, ca_file=str(broker.ca.cert_path)),
                         "bench-publisher", max_inflight=1000)
    publisher.start()
    assert publisher.connected.wait(10)
    try:
        start = time.perf_counter()
        infos = [publisher.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(60)
        published = time.perf_counter() - start
        while count_readings(influx, db) < expected:
            if time.perf_counter() - start > 300:
                raise TimeoutError(f"collector stored {count_readings(influx, db)} of {expected}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - start
        cpu = process_cpu_seconds(collector.proc.pid) - cpu_before
        print(f"  publishing took {published:.2f} s of {elapsed:.2f} s; collector CPU {cpu:.2f} s")
        return elapsed, cpu
    finally:
        publisher.stop()
        collector.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--readings", type=int, default=50, help="readings per message")
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--sealed", action="store_true", help="seal every message end to end (wire v2)")
    args = parser.parse_args(argv)

    total = args.messages * args.readings
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        ca = LabCA(work / "pki")
        with MosquittoServer(work / "mq", ca, extra_config="max_queued_messages 0\n") as broker, \
                InfluxdServer(work / "influxd", log_level="warn") as influx:
            t0 = (time.time_ns() // 10**9 - 86400) * 10**9
            sealing = Sealing(work, args.gateways) if args.sealed else None
            messages = build_messages(args.messages, args.readings, args.gateways, t0, sealing)
            influx.create_database("direct")
            influx.create_database("collector")
            direct_s = direct_write(influx, "direct", messages, sealing)
            collector_s, collector_cpu = through_collector(work, broker, influx, "collector", messages, total, sealing)
            crypto_us = open_cost_us(sealing, messages) if sealing else 0.0

    result = {
        "sealed": args.sealed, "readings": total, "messages": args.messages, "fields_per_reading": len(FIELDS),
        "direct_readings_per_s": round(total / direct_s), "collector_readings_per_s": round(total / collector_s),
        "ratio": round(direct_s / collector_s, 3),
        "collector_cpu_us_per_message": round(collector_cpu / args.messages * 1e6, 1),
    }
    if sealing:
        result["open_us_per_message"] = round(crypto_us, 2)
        result["crypto_share_of_collector_cpu"] = round(crypto_us * args.messages / 1e6 / collector_cpu, 4)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
