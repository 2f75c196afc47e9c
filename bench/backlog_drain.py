"""Backlog drain after a gateway outage: how fast the real edge-agent empties a prefilled outbox through mosquitto
and edge-collector into influxd while it keeps polling live, against a direct write of the same points, same run.

    python -m bench.backlog_drain [--minutes 60] [--rate 100] [--live 4]

The outage: the gateway made `--rate` readings per second (one message per second of `--rate` SDM630
readings, 30 float fields each, as the eastron_sdm630 profile decodes them) for `--minutes` minutes and
nothing was acknowledged. The outbox is prefilled with exactly that, with the agent's own Outbox.commit (sample
times spread over the past `--minutes`, well inside the collector's validation limits: min_time 2020-01-01,
max_future 300 s, so nothing is stored aside), and the sequence file is set past it.

Baseline (first): the same points, as the collector's own lines (collector.ingest.Ingest on the same message
bodies), written to the same influxd with the collector's backend (collector.influx.backends.V1Backend, gzip)
in batches of the collector's batch size (5000 lines), one request at a time, into another database.

Then edge-collector (defaults, flush_interval 200 ms, acks every 1 s) and the agent start (publish_interval 1 s,
max_unacked_messages 200, ack_timeout 30 s, outbox max_size 1GB: at this rate the default 200MB would hold only
~43 minutes) with `--live` simulated meters polled every 1 s. Measured from the agent's start:
- drain time: until no prefilled message is left in the outbox (the sqlite file polled read-only every 0.25 s;
  a message is deleted at the agent's first commit after its acknowledgement, i.e. after InfluxDB stored it);
- real-time factor: outage duration / drain time (goal >= 20);
- live latency: sample time of each live reading -> first seen in InfluxDB (polled every 0.25 s, so up to
  0.25 s too high), during the drain and for `--after` seconds after it;
- drain time / direct write time.
At the end every prefilled point must be in InfluxDB (count) and none stored aside.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from collector.influx.backends import V1Backend
from collector.influx.config import InfluxConfig
from collector.ingest import Ingest, TimePolicy
from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import meter_in_thread
from labkit.mosquitto import MosquittoServer
from labkit.mqtt_probe import MqttProbe
from labkit.outbox_lab import ReadingMaker, backlog_messages, cpu_seconds, prefill_outbox, proc_status_kb, server_pid
from labkit.pki import LabCA
from wire import topics
from wire.envelope import frame_plain
from wire.mqttlink import DEFAULT_PREFIX
from wire.status import decode_status

GATEWAY = "gw-drain"
BATCH_SIZE = 5000  # the collector's default influx.batch_size
OUTBOX_MAX = 10**9


def direct_write(influx: InfluxdServer, state: Path, last_seq: int) -> tuple[float, int, float]:
    """Seconds to write the backlog's points with V1Backend in batches of BATCH_SIZE lines, the point count, and
    influxd's CPU seconds meanwhile."""
    ingest = Ingest(DEFAULT_PREFIX, 1 << 30, TimePolicy(300 * 10**9, 0), "suspect")
    topic = topics.up(DEFAULT_PREFIX, GATEWAY)
    now = time.time_ns()
    db = sqlite3.connect(f"file:{state / 'outbox.sqlite3'}?mode=ro", uri=True)
    lines = [line for (body,) in db.execute("SELECT body FROM message WHERE seq <= ? ORDER BY seq", (last_seq,))
             for line in ingest.uplink(topic, frame_plain(body), now).lines if line.startswith(b"electricity")]
    db.close()
    bodies = [b"\n".join(lines[i:i + BATCH_SIZE]) for i in range(0, len(lines), BATCH_SIZE)]
    count = len(lines)
    del lines
    influx.create_database("direct")
    backend = V1Backend(InfluxConfig(url=influx.url, database="direct"))
    influx_cpu = cpu_seconds(server_pid(influx))
    start = time.perf_counter()
    for body in bodies:
        backend.write(body)
    elapsed = time.perf_counter() - start
    influx_cpu = cpu_seconds(server_pid(influx)) - influx_cpu
    backend.close()
    stored = count_points(influx, "direct")
    assert stored == count, (stored, count)
    return elapsed, count, influx_cpu


def count_points(influx: InfluxdServer, db: str, where: str = "") -> int:
    rows = influx.query(f'SELECT count(power) FROM "electricity" {where}', db)
    return int(rows[0]["count"]) if rows else 0


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "median_s": round(statistics.median(ordered), 2),
            "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
            "max_s": round(ordered[-1], 2)}


class LiveWatch:
    """Live readings (time > since_ns) as they appear in InfluxDB: sample time -> first seen."""

    def __init__(self, influx: InfluxdServer, db: str, since_ns: int) -> None:
        self.influx = influx
        self.db = db
        self.watermark = since_ns
        self.seen: set[tuple[str, int]] = set()
        self.latencies: list[tuple[float, float]] = []  # (seen wall time, latency s)

    def poll(self) -> None:
        now = time.time()
        rows = self.influx.query(f"SELECT power, device FROM electricity WHERE time > {self.watermark - 30 * 10**9}"
                                 f" AND device =~ /^live-/", self.db)
        for row in rows:
            key = (row["device"], row["time"])
            if key not in self.seen:
                self.seen.add(key)
                self.latencies.append((now, now - row["time"] / 1e9))
        if rows:
            self.watermark = max(self.watermark, max(r["time"] for r in rows))

    def between(self, t0: float, t1: float) -> list[float]:
        return [lat for seen, lat in self.latencies if t0 <= seen < t1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the outage (recorded: 60)")
    parser.add_argument("--rate", type=int, default=100, help="readings per second during the outage")
    parser.add_argument("--live", type=int, default=4, help="live meters polled every 1 s during the drain")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of live latency after the drain")
    parser.add_argument("--window", type=int, default=200, help="the agent's uplink.max_unacked_messages")
    parser.add_argument("--ack-interval", default="1s", help="the collector's acks.interval")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up on the drain after this long")
    args = parser.parse_args(argv)
    messages = round(args.minutes * 60)

    with tempfile.TemporaryDirectory(prefix="bench-drain-", dir=os.environ.get("BENCH_TMP")) as tmp, \
            contextlib.ExitStack() as sims:
        work = Path(tmp)
        state = work / f"{GATEWAY}-state"
        t_gen = time.perf_counter()
        end_ns = time.time_ns()
        prefilled = prefill_outbox(
            state, backlog_messages(GATEWAY, ReadingMaker(args.rate, prefix="meter"), messages, 0,
                                    end_ns - (messages - 1) * 10**9, 10**9),
            max_bytes=OUTBOX_MAX, max_age_s=30 * 86400)
        print(f"  prefilled {prefilled.messages} messages, {prefilled.readings} readings, "
              f"{prefilled.file_bytes / 1e6:.0f} MB outbox in {time.perf_counter() - t_gen:.0f} s")
        ca = LabCA(work / "pki")
        with MosquittoServer(work / "mq", ca) as broker, InfluxdServer(work / "influxd", log_level="warn") as influx:
            direct_s, direct_points, direct_influx_cpu = direct_write(influx, state, prefilled.last_seq)
            print(f"  direct write: {direct_points} points in {direct_s:.2f} s (influxd CPU {direct_influx_cpu:.1f} s)")
            influx.create_database("citynerve")
            collector = stack.quiet_collector(
                work / "collector.toml", broker, "bench-drain-collector",
                {"api": "v1", "url": influx.url, "database": "citynerve", "batch_size": BATCH_SIZE},
                acks={"interval": args.ack_interval})
            ports = [sims.enter_context(meter_in_thread("127.0.0.1", 0, unit=1, seed=i)).port
                     for i in range(args.live)]
            devices = [stack.modbus_tcp_device(f"live-{i}", port, interval="1s") for i, port in enumerate(ports)]
            acfg = stack.write_agent_config(work / "agent.toml", GATEWAY, stack.mqtt_section(broker), devices,
                                            publish_interval="1s", uplink={"heartbeat_interval": "5s",
                                                                                "max_unacked_messages": args.window},
                                            outbox={"max_size": OUTBOX_MAX})
            probe = MqttProbe(broker.port, str(broker.ca.cert_path), [topics.status(DEFAULT_PREFIX, GATEWAY)])
            agent = stack.agent_process(acfg)
            live = LiveWatch(influx, "citynerve", time.time_ns())
            timeline: list[tuple[float, int]] = []
            try:
                assert collector.proc is not None
                collector_cpu0 = cpu_seconds(collector.proc.pid)
                influx_cpu0 = cpu_seconds(server_pid(influx))
                broker_cpu0 = cpu_seconds(server_pid(broker))
                start_wall = time.time()
                start = time.monotonic()
                agent.start()
                assert agent.proc is not None
                connected_s = time.monotonic() - start
                outbox = sqlite3.connect(f"file:{state / 'outbox.sqlite3'}?mode=ro", uri=True)
                left = prefilled.messages
                next_print = 0.0
                while left:
                    now = time.monotonic() - start
                    if now > args.timeout:
                        raise TimeoutError(f"{left} prefilled messages still in the outbox after {now:.0f} s")
                    left = outbox.execute("SELECT count(*) FROM message WHERE seq <= ?",
                                          (prefilled.last_seq,)).fetchone()[0]
                    timeline.append((now, left))
                    live.poll()
                    if now >= next_print:
                        print(f"  {now:6.1f} s: {left} prefilled messages left")
                        next_print += 15
                    if left:
                        time.sleep(0.25)
                drain_s = time.monotonic() - start
                drain_end_wall = time.time()
                agent_cpu = cpu_seconds(agent.proc.pid)
                agent_hwm_kb = proc_status_kb(agent.proc.pid)["VmHWM"]
                collector_cpu = cpu_seconds(collector.proc.pid) - collector_cpu0
                influx_cpu = cpu_seconds(server_pid(influx)) - influx_cpu0
                broker_cpu = cpu_seconds(server_pid(broker)) - broker_cpu0
                outbox.close()
                while time.monotonic() - start < drain_s + args.after:
                    live.poll()
                    time.sleep(0.25)
                stored = count_points(influx, "citynerve", "WHERE device !~ /^live-/")
                suspect = influx.query("SELECT count(*) FROM citynerve_suspect_time", "citynerve")
            finally:
                agent.stop()
                collector.stop()
                probe.close()
        statuses = [decode_status(m.payload) for m in probe.messages]
        last = next((s for s in reversed(statuses) if s.get("state") == "online" and "resent_messages" in s), {})
        for proc in (agent, collector):
            if "Traceback" in proc.log_path.read_text(errors="replace"):
                raise RuntimeError(f"{proc.name} failed:\n{proc.tail_log()}")

    outage_s = args.minutes * 60
    suspect_points = max((v for k, v in suspect[0].items() if k.startswith("count_")), default=0) if suspect else 0
    during = live.between(start_wall, drain_end_wall)
    after = live.between(drain_end_wall, drain_end_wall + args.after + 1)
    half = [t for t, n in timeline if n <= prefilled.messages / 2]
    result = {
        "outage_minutes": args.minutes, "window": args.window, "ack_interval": args.ack_interval,
        "messages": prefilled.messages, "points": prefilled.readings,
        "outbox_mb": round(prefilled.file_bytes / 1e6, 1), "fields_per_point": 30,
        "agent_ready_s": round(connected_s, 2),
        "drain_s": round(drain_s, 2), "real_time_factor": round(outage_s / drain_s, 1),
        "half_drained_s": round(half[0], 2) if half else None,
        "drain_points_per_s": round(prefilled.readings / drain_s),
        "direct_write_s": round(direct_s, 2), "direct_points_per_s": round(direct_points / direct_s),
        "drain_over_direct": round(drain_s / direct_s, 2), "direct_influxd_cpu_s": round(direct_influx_cpu, 1),
        "stored_points": stored, "suspect_points": suspect_points,
        "live_latency_during_drain": summary(during), "live_latency_after_drain": summary(after),
        "resent_messages": last.get("resent_messages"), "agent_vm_hwm_mib": round(agent_hwm_kb / 1024, 1),
        "cpu_s_during_drain": {"agent": round(agent_cpu, 1), "collector": round(collector_cpu, 1),
                               "influxd": round(influx_cpu, 1), "mosquitto": round(broker_cpu, 1)},
        "goal_real_time_factor": 20, "met": outage_s / drain_s >= 20,
    }
    print(f"{'outage':>7} {'points':>8} {'drain s':>8} {'× real time':>11} {'direct s':>8} {'drain÷direct':>12} "
          f"{'live p50/p95/max during':>24} {'after':>16}")
    d, a = result["live_latency_during_drain"], result["live_latency_after_drain"]
    print(f"{args.minutes:>5g} m {prefilled.readings:>8} {drain_s:>8.1f} {outage_s / drain_s:>11.1f} "
          f"{direct_s:>8.2f} {drain_s / direct_s:>12.2f} "
          f"{d.get('median_s', '-')!s:>8}/{d.get('p95_s', '-')!s}/{d.get('max_s', '-')!s:<8} "
          f"{a.get('median_s', '-')!s:>6}/{a.get('p95_s', '-')!s}/{a.get('max_s', '-')!s}")
    print(json.dumps(result, indent=2))
    if stored != prefilled.readings:
        raise SystemExit(f"InfluxDB holds {stored} of the {prefilled.readings} prefilled points")
    return result


if __name__ == "__main__":
    main()
