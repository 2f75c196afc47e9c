"""Fleet: N enrolled gateways, each on its own mutual-TLS connection with its own sealing session, through the
real broker, collector and store (issue 14 §1-3).

    python -m bench.fleet [--gateways 1000] [--cycles 6] [--warmup 2] [--publishers 0 (auto)] [--storm]
                          [--no-jitter] [--no-backlog] [--no-spread] [--cache DIR]
                          [--influx-config shipped|debian|lab]
                          [--set SECTION.KEY=VALUE] [--json FILE]

Real parts: mosquitto 2.0.11 with the SHIPPED configuration (labkit.flood_lab.QuietSecureBroker), influxd 1.x
(deploy/influxdb/influxdb.conf and its GOGC drop-in; --influx-config debian: Debian's packaged file), one
`edge-collector` process with its default settings (only the connections, [security] and log.stats_interval =
"1s" are set; --set changes any other, and the run says so).

Gateways: enrolled in bulk (labkit.enrolled.Deployment.enroll_many: GatewayRegistry.add_many, DeviceCA.issue_many)
and kept in --cache for the next run. Simulated by labkit.fleet_sim in --publishers child processes (one asyncio
loop each, no thread per connection): the agent's send loop (edge_agent.delivery.Sender) on an outbox in RAM,
the agent's TLS settings, reconnect backoff (wire.mqttlink.reconnect_delay) and connect timeout; every
--interval seconds (at the gateway's phase within the interval, as the agent's cycle with uplink.publish_spread;
--no-spread: every gateway at the aligned deadline, as before) one sealed QoS 1 message of --devices x
(interval / poll interval) readings of 10 float32 values, each stamped when its (aligned) poll was answered; the
retained status heartbeat every 60 s (at the same phase) and at each connect.

Measured:
- per cycle: messages and readings produced; end-to-end acknowledgement latency (commit -> ack, all gateways)
  p50/p99 (a message is acknowledged once InfluxDB stored it); with --no-spread also sample-to-store latency
  p50/p99 for every --watch-every-th gateway: the wall time of the first InfluxDB poll (every 250 ms) that
  returned all of a message's readings - the cycle's end (the newest sample; the oldest reading of a message
  waits one publish interval more on the gateway, by design);
- in the end, once the gateways stopped producing and their outboxes drained (or --drain-max passed): readings
  stored (count in InfluxDB; per cycle with --no-spread) against produced: lost = produced - stored; re-sends;
- CPU seconds of collector, broker and store over the measured cycles, per message the collector processed in
  them (its stats lines); peak RSS of each (VmRSS every 0.5 s) over the whole run;
- --storm: the broker restarted (SIGTERM, start on the same ports and data) with every gateway connected and
  producing: seconds until every gateway is connected again, until every message committed before the
  gateways were all back is acknowledged, and the loss (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.flood import pct, r2
from labkit import enrolled, stack
from labkit.flood_lab import QuietSecureBroker, cpu_seconds, stats_lines
from labkit.influxd import DEBIAN_CONFIG, SHIPPED_CONFIG, InfluxdServer, shipped_environment
from labkit.outbox_lab import server_pid
from labkit.pki import LabCA

DB = "citynerve"
MEASUREMENT = "meter"
REPO = Path(__file__).resolve().parent.parent


def raise_nofile() -> int:
    """The soft limit of open files up to the hard limit (each gateway is a socket in the publisher and in the
    broker, which inherits the limit from this process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- the publisher processes --------------------------------------------------------------------------------------


def publisher_main(spec_file: str) -> None:
    raise_nofile()
    asyncio.run(_publisher(json.loads(Path(spec_file).read_text())))


async def _publisher(spec: dict) -> None:
    from labkit.fleet_sim import Fleet, SimSpec

    fleet = Fleet(SimSpec(**spec["sim"]), [tuple(g) for g in spec["gateways"]])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(doc: dict) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    say({"ready": len(fleet.gateways)})
    cycles = asyncio.ensure_future(fleet.run_cycles())
    while line := (await reader.readline()).decode().strip():
        command, _, arg = line.partition(" ")
        if command == "connect":
            say({"connected_s": await fleet.connect_all(float(arg))})
        elif command == "produce":
            fleet.producing = arg != "off"
            say({"producing": fleet.producing})
        elif command == "status":
            say({"connected": fleet.connected(), "unacked": sum(len(g.outbox) for g in fleet.gateways),
                 "committed": sum(g.next_seq - 1 for g in fleet.gateways)})
        elif command == "report":
            say(fleet.report())
        elif command == "unacked-before":  # messages committed until then and not acknowledged yet
            limit = float(arg)
            say({"unacked": sum(1 for g in fleet.gateways for m in g.log.values()
                                if m.committed <= limit and m.acked is None)})
        elif command == "exit":
            break
    cycles.cancel()
    await fleet.close()


class Publishers:
    """The child processes, each simulating a slice of the fleet; commands go to all, one answer each."""

    def __init__(self, slices: list[list[tuple[str, str]]], sim: dict, work: Path) -> None:
        self.procs = []
        for i, part in enumerate(slices):
            spec = work / f"publisher-{i}.json"
            spec.write_text(json.dumps({"sim": sim, "gateways": part}))
            self.procs.append(subprocess.Popen([sys.executable, "-m", "bench.fleet", "--publisher", str(spec)],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                               cwd=REPO))
        self.answers("")  # "ready"

    def answers(self, command: str) -> list[dict]:
        for proc in self.procs:
            if command:
                assert proc.stdin is not None
                proc.stdin.write(command + "\n")
                proc.stdin.flush()
        out = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a publisher process ended (exit {proc.poll()})")
            out.append(json.loads(line))
        return out

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        for proc in self.procs:
            try:
                if proc.stdin:
                    proc.stdin.write("exit\n")
                    proc.stdin.close()
                proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()


# -- watching the store -------------------------------------------------------------------------------------------


class StoreWatch(threading.Thread):
    """When each watched gateway's message of each cycle is complete in InfluxDB: every 250 ms one query counts
    the watched gateways' points per cycle (GROUP BY time(interval): a cycle's samples lie in [end - interval,
    end)); the first poll at which a (gateway, cycle) has all its readings is its store time."""

    def __init__(self, influx: InfluxdServer, gateways: list[str], interval: float, readings: int,
                 since: float) -> None:
        super().__init__(name="store-watch", daemon=True)
        self.influx = influx
        self.where = "(" + " OR ".join(f"\"gateway\" = '{g}'" for g in gateways) + ")"
        self.interval = interval
        self.readings = readings
        self.gateways = gateways
        self.low = int(since // interval * interval)
        self.stored: dict[tuple[str, int], float] = {}  # (gateway, cycle end s) -> wall time seen complete
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        step = f"{int(self.interval * 1000)}ms"
        while not self.halt.wait(0.25):
            q = (f'SELECT count("voltage_l1") FROM "{MEASUREMENT}" WHERE time >= {self.low * 10**9} AND '
                 f"{self.where} GROUP BY time({step}), \"gateway\"")
            try:
                rows = self.influx.query(q, DB)
            except Exception:  # a slow or failed poll: the next one catches up
                self.errors += 1
                continue
            seen = time.time()
            for row in rows:
                if row.get("count") == self.readings:
                    key = (row["gateway"], round(row["time"] / 1e9 + self.interval))
                    self.stored.setdefault(key, seen)
            # The next polls start at the oldest cycle some watched gateway has not completed (so each poll reads
            # a few cycles of a few gateways, not the whole run: the watch must not load the store it measures).
            end = self.low + self.interval
            while end < seen - self.interval and all((g, round(end)) in self.stored for g in self.gateways):
                end += self.interval
            self.low = int(end - self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


class Sampler(threading.Thread):
    """RSS of named processes every 0.5 s (the broker's pid changes when it restarts: looked up each time)."""

    def __init__(self, pids: dict[str, object]) -> None:
        super().__init__(name="rss", daemon=True)
        self.pids = pids
        self.peak_kb: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        from labkit.flood_lab import status_kb

        while not self.halt.wait(0.5):
            for name, pid in self.pids.items():
                try:
                    kb = status_kb(pid() if callable(pid) else pid)["VmRSS"]
                except (OSError, KeyError, RuntimeError):
                    continue
                self.peak_kb[name] = max(self.peak_kb.get(name, 0), kb)

    def stop(self) -> None:
        self.halt.set()
        self.join(3)


# -- the run -----------------------------------------------------------------------------------------------------------


def deployment(cache: Path, gateways: int) -> enrolled.Deployment:
    """The cached enrolled deployment, grown to `gateways` gateways when it holds fewer."""
    marker = cache / "deployment.json"
    if marker.exists():
        doc = json.loads(marker.read_text())
        dep = enrolled.Deployment(**{k: Path(v) for k, v in doc["paths"].items()})
        for gid in doc["gateways"]:
            dep.gateways[gid] = enrolled.GatewayFiles(gid, dep.root / "gateways" / gid)
    else:
        dep = enrolled.create(cache / "deployment", [])
    have = len(dep.gateways)
    if have < gateways:
        t0 = time.monotonic()
        ids = [f"gw-{i:05d}" for i in range(have, gateways)]
        for start in range(0, len(ids), 2000):
            dep.enroll_many(ids[start:start + 2000])
        print(f"  enrolled {len(ids):,} gateways in bulk in {time.monotonic() - t0:.1f} s", flush=True)
        paths = {k: str(getattr(dep, k)) for k in ("root", "ca_dir", "keys_dir", "registry", "collector_cert",
                                                    "collector_key", "collector_ca_dir")}
        marker.write_text(json.dumps({"paths": paths, "gateways": list(dep.gateways)}))
    return dep


def _sets(pairs: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        section, _, name = key.partition(".")
        parsed: object = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        if value in ("true", "false"):
            parsed = value == "true"
        out.setdefault(section, {})[name] = parsed
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateways", type=int, default=1000)
    p.add_argument("--cycles", type=int, default=6, help="measured publish cycles")
    p.add_argument("--warmup", type=int, default=2, help="cycles before the measured ones (sessions, new series)")
    p.add_argument("--interval", type=float, default=10.0, help="the agents' publish interval (s)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="each meter polled this often (s)")
    p.add_argument("--devices", type=int, default=3, help="meters per gateway")
    p.add_argument("--publishers", type=int, default=0, help="publisher processes (0: one per 2,500 gateways)")
    p.add_argument("--connect-rate", type=float, default=500.0, help="new connections per second at the start")
    p.add_argument("--watch-every", type=int, default=100, help="sample-to-store latency of every n-th gateway")
    p.add_argument("--storm", action="store_true", help="restart the broker after the measured cycles")
    p.add_argument("--no-jitter", action="store_true", help="reconnect without jitter (paho's own backoff)")
    p.add_argument("--no-spread", action="store_true",
                   help="every gateway publishes at the aligned deadline (uplink.publish_spread = false)")
    p.add_argument("--no-backlog", action="store_true",
                   help="leave mosquitto's listen backlog at its 100 (no plugin_opt_listen_backlog)")
    p.add_argument("--drain-max", type=float, default=300.0, help="at most this long for the outboxes to drain")
    p.add_argument("--cache", default=os.environ.get("FLEET_CACHE", "/tmp/citynerve-fleet-cache"),
                   help="enrolled gateways are kept here for the next run")
    p.add_argument("--influx-config", choices=("shipped", "debian", "lab"), default="shipped",
                   help="deploy/influxdb/influxdb.conf with its GOGC drop-in, Debian's packaged file, or the tests' own")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a collector.toml setting (the run says it is not the defaults)")
    p.add_argument("--json", help="write the result here too")
    p.add_argument("--publisher", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.publisher:
        publisher_main(args.publisher)
        return {}
    limit = raise_nofile()
    if limit < args.gateways + 1000:  # the broker holds a socket per gateway
        print(f"warning: open-file limit {limit} is low for {args.gateways} gateways", flush=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_setup = time.monotonic()
    dep = deployment(cache, args.gateways)
    ids = [gid for gid in sorted(dep.gateways)][: args.gateways]
    publishers_n = args.publishers or max(1, math.ceil(args.gateways / 2500))
    readings = args.devices * max(1, round(args.interval / args.poll_interval))
    extra = _sets(args.set)
    load0 = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        influx_args: dict = {}
        if args.influx_config == "shipped":
            influx_args = {"config": SHIPPED_CONFIG, "env": shipped_environment()}
        elif args.influx_config == "debian":
            influx_args = {"config": DEBIAN_CONFIG}
        broker_cls = BacklogOf100 if args.no_backlog else QuietSecureBroker
        with broker_cls(work / "mosquitto", device_ca_dir=dep.ca_dir, collector_ca_dir=dep.collector_ca_dir,
                        server_ca=LabCA(work / "server-ca")) as broker, \
                InfluxdServer(work / "influxd", log_level="warn", **influx_args) as influx:
            influx.create_database(DB)
            sections: dict = {"security": {"keys_dir": str(dep.keys_dir), "registry": str(dep.registry)},
                              "log": {"stats_interval": "1s"}}
            for section, values in extra.items():
                sections[section] = {**sections.get(section, {}), **values}
            influx_section = {"api": "v1", "url": influx.url, "database": DB, "flush_interval": "1s",
                              **sections.pop("influx", {})}
            config = stack.write_collector_config(
                work / "collector.toml",
                broker.collector_mqtt(dep.collector_cert, dep.collector_key, **sections.pop("mqtt", {})),
                influx_section, **sections)
            collector = stack.collector_process(config).start()
            assert collector.proc is not None
            sim = {"host": "127.0.0.1", "port": broker.port, "ca_file": broker.ca_file,
                   "collector_pub": str(dep.collector_pub), "devices": args.devices,
                   "poll_interval": args.poll_interval, "publish_interval": args.interval,
                   "jitter": not args.no_jitter, "publish_spread": not args.no_spread}
            slices = [[(gid, str(dep.gateways[gid].dir)) for gid in ids[i::publishers_n]]
                      for i in range(publishers_n)]
            pubs = Publishers(slices, sim, work)
            sampler = Sampler({"collector": collector.proc.pid, "broker": lambda: server_pid(broker),
                               "store": server_pid(influx)})
            sampler.start()
            watch = None
            result: dict = {}
            try:
                print(f"  set-up {time.monotonic() - t_setup:.0f} s; {args.gateways:,} gateways in {publishers_n} "
                      f"publisher process(es); {readings} readings per message", flush=True)
                t0 = time.time()
                pubs.answers(f"connect {args.connect_rate / publishers_n}")
                connect_s = time.time() - t0
                print(f"  connected in {connect_s:.1f} s", flush=True)
                # Start producing so that the first cycle is a whole one.
                start = (math.floor(time.time() / args.interval) + 1) * args.interval
                pubs.answers("produce on")
                # The end of the first cycle committed (each publisher commits at every aligned deadline after it
                # was told to produce).
                first_cycle = start if time.time() < start else start + args.interval
                measure_from = first_cycle + args.warmup * args.interval
                measure_to = measure_from + (args.cycles - 1) * args.interval
                if args.no_spread:
                    # Sample-to-store per cycle needs a cycle's samples in one aligned interval; with publishing
                    # spread a message's samples straddle two, and its commit-to-acknowledgement latency (an
                    # acknowledgement means stored) is the measure.
                    watched = ids[:: args.watch_every]
                    watch = StoreWatch(influx, watched, args.interval, readings, first_cycle - args.interval)
                    watch.start()
                # CPU over the measured cycles: from just after the cycle before the first measured one was
                # committed, to just after the last measured one was (so each window holds whole cycles' work).
                pids = {"collector": collector.proc.pid, "broker": server_pid(broker), "store": server_pid(influx)}
                _sleep_until(measure_from - args.interval + 0.05)
                cpu0, c_t0 = {k: cpu_seconds(v) for k, v in pids.items()}, time.time()
                _sleep_until(measure_to + 0.05)
                cpu1, c_t1 = {k: cpu_seconds(v) for k, v in pids.items()}, time.time()
                storm: dict = {}
                if args.storm:
                    storm = _storm(broker, pubs, args)
                pubs.answers("produce off")
                t_stop = time.time()
                deadline = time.monotonic() + args.drain_max
                while time.monotonic() < deadline:
                    status = pubs.answers("status")
                    if sum(s["unacked"] for s in status) == 0:
                        break
                    time.sleep(1.0)
                drained_s = time.time() - t_stop
                time.sleep(1.5)  # the store watch's last polls
                reports = pubs.answers("report")
                result = _result(args, reports, influx, watch, cpu0, cpu1, c_t0, c_t1, collector, sampler,
                                 first_cycle, measure_from, measure_to, readings, connect_s, drained_s, storm,
                                 load0, extra)
            finally:
                if watch is not None:
                    watch.stop()
                sampler.stop()
                pubs.close()
                collector.stop()
            log_text = collector.log_path.read_text(errors="replace")
            if "Traceback" in log_text:
                print(f"the collector logged a traceback:\n{collector.tail_log(40)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


class BacklogOf100(QuietSecureBroker):
    """The shipped configuration without plugin_opt_listen_backlog: mosquitto 2.0.11's own listen(sock, 100)."""

    def _new_process(self):  # type: ignore[no-untyped-def]
        process = super()._new_process()
        lines = self.config_path.read_text().splitlines()
        self.config_path.write_text("\n".join(ln for ln in lines if not ln.startswith("plugin_opt_listen_backlog")) + "\n")
        return process


def _sleep_until(wall: float) -> None:
    while (left := wall - time.time()) > 0:
        time.sleep(min(left, 1.0))


def _storm(broker: QuietSecureBroker, pubs: Publishers, args: argparse.Namespace) -> dict:
    """Restart the broker with every gateway connected; how long until all are back and their backlog acked."""
    t_down = time.time()
    broker.restart()
    t_up = time.time()
    print(f"  storm: broker restarted in {t_up - t_down:.1f} s", flush=True)
    deadline = time.monotonic() + args.drain_max
    total = args.gateways
    while time.monotonic() < deadline:
        if sum(s["connected"] for s in pubs.answers("status")) >= total:
            break
        time.sleep(0.2)
    t_all = time.time()
    # Drained: every message committed until every gateway was back is acknowledged.
    while time.monotonic() < deadline:
        if not sum(a["unacked"] for a in pubs.answers(f"unacked-before {t_all}")):
            break
        time.sleep(1.0)
    t_drained = time.time()
    reconnect = {"broker_restart_s": round(t_up - t_down, 2), "all_reconnected_s": round(t_all - t_up, 2),
                 "drained_s": round(t_drained - t_up, 2), "t_down": t_down, "t_up": t_up}
    print(f"  storm: every gateway back {reconnect['all_reconnected_s']} s after the broker, backlog acknowledged "
          f"after {reconnect['drained_s']} s", flush=True)
    return reconnect


def _result(args, reports, influx, watch, cpu0, cpu1, c_t0, c_t1, collector, sampler, first_cycle,
            measure_from, measure_to, readings, connect_s, drained_s, storm, load0, extra) -> dict:
    messages = [m for r in reports for m in r["messages"]]
    by_cycle: dict[int, list] = {}
    for m in messages:  # by the aligned deadline at or after the commit (the commit itself when not spread)
        by_cycle.setdefault(round(math.ceil(m[2] / args.interval - 1e-6) * args.interval), []).append(m)
    # What InfluxDB holds, per cycle (a cycle's samples lie in [end - interval, end)).
    step = f"{int(args.interval * 1000)}ms"
    rows = influx.query(f'SELECT count("voltage_l1") FROM "{MEASUREMENT}" WHERE time >= '
                        f"{int((first_cycle - args.interval) * 1e9)} GROUP BY time({step})", DB)
    stored_by_cycle = {round(r["time"] / 1e9 + args.interval): r["count"] or 0 for r in rows}
    # Everything stored (the store is the run's own): with publishing spread the first messages' samples can lie
    # before the first aligned cycle.
    (total,) = influx.query(f'SELECT count("voltage_l1") FROM "{MEASUREMENT}"', DB) or [{"count": 0}]
    stored_total = total["count"] or 0
    cycles = []
    for end in sorted(by_cycle):
        ms = by_cycle[end]
        acks = [m[7] - m[2] for m in ms if m[7] is not None]
        store = [t - end for (g, e), t in watch.stored.items() if e == end] if watch is not None else []
        produced = sum(m[3] for m in ms)
        cycles.append({
            "cycle_end": end, "measured": measure_from <= end <= measure_to, "messages": len(ms),
            "readings": produced, "stored": stored_by_cycle.get(end, 0) if args.no_spread else None,
            "ack_p50_s": r2(pct(acks, 0.5)), "ack_p99_s": r2(pct(acks, 0.99)), "ack_max_s": r2(max(acks, default=None)),
            "store_p50_s": r2(pct(store, 0.5)), "store_p99_s": r2(pct(store, 0.99)), "watched": len(store),
            "resent": sum(m[5] - 1 for m in ms if m[5] > 1), "unacked": sum(1 for m in ms if m[7] is None),
        })
    stats = stats_lines(collector.log_path.read_text(errors="replace"))
    before = next((c for t, c in reversed(stats) if t <= c_t0), {})
    after = next((c for t, c in reversed(stats) if t <= c_t1), {})
    processed = after.get("messages", 0) - before.get("messages", 0)
    processed_readings = after.get("readings", 0) - before.get("readings", 0)
    last = stats[-1][1] if stats else {}
    # The collector's throughput over time, per publish interval (its stats lines, every second): readings
    # processed (written or being written), messages acknowledged end to end, what paho's thread waited.
    timeline = []
    t = first_cycle - args.interval
    while stats and t < stats[-1][0]:
        a = next((c for tt, c in reversed(stats) if tt <= t), {})
        b = next((c for tt, c in reversed(stats) if tt <= t + args.interval), {})
        timeline.append({"t": round(t), **{k: b.get(k, 0) - a.get(k, 0) for k in (
            "messages", "readings", "lines_written", "acked_seqs", "acks_sent", "intake_wait_ms", "duplicates")}})
        t += args.interval
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    window = c_t1 - c_t0
    produced = sum(c["readings"] for c in cycles)
    stored = stored_total
    totals = {k: sum(r["stats"][k] for r in reports) for k in reports[0]["stats"]}
    result = {
        "gateways": args.gateways, "interval_s": args.interval, "readings_per_message": readings,
        "publishers": len(reports), "connect_s": round(connect_s, 1), "load_before": [round(x, 2) for x in load0],
        "load_after": [round(x, 2) for x in os.getloadavg()], "collector_settings": extra or "defaults",
        "influx_config": args.influx_config, "jitter": not args.no_jitter, "publish_spread": not args.no_spread,
        "listen_backlog": 100 if args.no_backlog else 4096,
        "produced_readings": produced, "stored_readings": stored, "lost_readings": produced - stored,
        "resent_messages": sum(r["resent"] for r in reports), "unacked_at_end": sum(r["unacked"] for r in reports),
        "drained_s": round(drained_s, 1), "lean": totals,
        "measured_window_s": round(window, 1), "processed_messages": processed,
        "processed_readings": processed_readings,
        "messages_per_s": round(processed / window, 1) if window else None,
        "readings_per_s": round(processed_readings / window, 1) if window else None,
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_ms_per_message": {k: round(v * 1000 / processed, 3) if processed else None for k, v in cpu.items()},
        "cpu_us_per_reading": {k: round(v * 1e6 / processed_readings, 1) if processed_readings else None
                               for k, v in cpu.items()},
        "store_readings_per_cpu_s": round(processed_readings / cpu["store"], 1) if cpu["store"] else None,
        "peak_rss_mib": {k: round(v / 1024, 1) for k, v in sampler.peak_kb.items()},
        "collector_counters": {k: v for k, v in last.items() if k.startswith(("rejected.", "acks", "declined"))
                               or k in ("messages", "readings", "duplicates", "lines_written", "status_messages")},
        "cycles": cycles, "timeline": timeline, "storm": storm, "watch_errors": watch.errors if watch is not None else 0,
    }
    _print(result)
    return result


def _print(res: dict) -> None:
    print(f"\n{'cycle end':>10} {'msgs':>6} {'readings':>9} {'stored':>9} {'ack p50':>7} {'ack p99':>7} "
          f"{'store p50':>9} {'store p99':>9} {'resent':>6} {'unacked':>7}")
    for c in res["cycles"]:
        mark = "*" if c["measured"] else " "
        print(f"{time.strftime('%H:%M:%S', time.localtime(c['cycle_end'])):>9}{mark} {c['messages']:>6} "
              f"{c['readings']:>9} {c['stored']!s:>9} {c['ack_p50_s']!s:>7} {c['ack_p99_s']!s:>7} "
              f"{c['store_p50_s']!s:>9} {c['store_p99_s']!s:>9} {c['resent']:>6} {c['unacked']:>7}")
    print("(* measured cycles; ack: from each message's commit; store: from the cycle's end, of every watched "
          "gateway, when publishing is not spread (--no-spread); stored per cycle likewise)")
    print(f"\n{'from':>9} {'msgs/s':>7} {'readings/s':>10} {'lines/s':>8} {'acked/s':>8} {'acks/s':>7} "
          f"{'dup/s':>6} {'intake wait':>11}")
    for w in res["timeline"]:
        span = res["interval_s"]
        print(f"{time.strftime('%H:%M:%S', time.localtime(w['t'])):>9} {w['messages'] / span:>7.0f} "
              f"{w['readings'] / span:>10.0f} {w['lines_written'] / span:>8.0f} {w['acked_seqs'] / span:>8.0f} "
              f"{w['acks_sent'] / span:>7.0f} {w['duplicates'] / span:>6.0f} {w['intake_wait_ms'] / 1000:>10.1f}s")
    print("(the collector's stats lines: messages and readings processed, lines InfluxDB confirmed, messages "
          "acknowledged end to end, acknowledgement messages, duplicates, seconds paho's thread held the broker)")
    print(f"\nreadings produced {res['produced_readings']:,}, stored {res['stored_readings']:,}, lost "
          f"{res['lost_readings']:,}; messages re-sent {res['resent_messages']:,}; unacknowledged at the end "
          f"{res['unacked_at_end']}")
    print(f"collector: {res['messages_per_s']} messages/s, {res['readings_per_s']} readings/s over "
          f"{res['measured_window_s']} s")
    print("CPU ms per message: " + ", ".join(f"{k} {v}" for k, v in res["cpu_ms_per_message"].items())
          + "; us per reading: " + ", ".join(f"{k} {v}" for k, v in res["cpu_us_per_reading"].items()))
    print(f"store: {res['store_readings_per_cpu_s']} readings per CPU-second")
    print("peak RSS MiB: " + ", ".join(f"{k} {v}" for k, v in res["peak_rss_mib"].items()))
    print(f"load average before {res['load_before']}, after {res['load_after']}; settings {res['collector_settings']}, "
          f"influxd {res['influx_config']}")
    print(json.dumps({k: v for k, v in res.items() if k not in ("cycles", "timeline")}))


if __name__ == "__main__":
    main()
