"""Flood: one enrolled gateway (A) floods the collector; another (B) must not starve, the collector must not grow.

    python -m bench.flood [--flood-seconds 30] [--kind all|valid|garbage|forged] [--baseline-seconds 30]
                          [--recovery-seconds 15] [--drain-max 300]
    experiments (never the recorded goal): [--limit KEY=VALUE] [--set SECTION.KEY=VALUE] [--flood-rate [KIND=]N]

Real parts: mosquitto 2.0.11 with the SHIPPED configuration (deploy/mosquitto: mutual TLS, per-gateway ACL;
labkit.flood_lab.QuietSecureBroker leaves out the per-PUBLISH debug log the lab adds for the ACL tests), influxd
1.x, the real `edge-collector` process with DEFAULT settings (no [limits] section, influx batch_size 5000 and
flush_interval 1 s as shipped; only the connections, [security], the quarantine file and log.stats_interval
= "1s" are set), and gateways gw-flood-a and gw-flood-b enrolled with the real CLIs (labkit.enrolled).

Gateway B (in this process, labkit.flood_lab.SteadyGateway): its own mutual-TLS connection and sealer (wire.seal,
as edge-agent builds it from the enrolled files); one sealed QoS 1 message of 30 readings (10 float fields) per
second, every reading stamped with the time the message was made; it opens its end-to-end acknowledgements and
sends a message again after 30 s without one (the agent's uplink.ack_timeout). Sample-to-store latency of each of
B's points = the wall time of the first InfluxDB poll that returned it - its sample time: polled every 100 ms
(`SELECT ... WHERE time >= <oldest sample time not yet fully seen>`), so at most 100 ms + the query's duration
late (the query durations are reported). InfluxDB 1.x keeps no write time and the collector logs none per
message, so there is no exact store time to read; B's PUBACK from the broker and its end-to-end acknowledgement
(sent by the collector every acks.interval = 1 s once stored) are reported next to it.

Gateway A (a child process, labkit.flood_lab.Flooder): its own mutual-TLS connection (MqttLink: TCP_NODELAY,
MQTT 5), QoS 1 as fast as the broker acknowledges, 1000 messages in flight (64 for valid), one kind per phase:
  valid    sealed batches of 5000 readings (100 devices x 50 sample times, 10 float fields, ~765 KB): a fresh
           Batch and seal per message; within A's default budgets (100 devices, 100 series)
  garbage  random bytes, 16..4096 long, on A's uplink topic
  forged   sealed-format payloads (~4.7 KB) with A's gateway id and the collector's key id but a random session id
           and a random signature: every one a new session announcement whose signature is bad

Phases: B alone (baseline), then per kind A floods for --flood-seconds with B running, then B alone ("after")
for at least --recovery-seconds and until the collector has worked off what A sent (3 stats lines in a row with
no rejection and no more readings than B's; at most --drain-max), so that each kind starts clean; the last one
is the recovery. B's points are given to the phase they were sampled in. Per phase: B's latency p50/p99/max, B's
points stored/sent, A's messages sent, how many of A's messages the collector took off the broker (counted
from its stats line every 1 s: processed + declined + rejected, less B's), the collector's reason counters,
collector peak RSS (VmHWM, reset per phase through /proc/<pid>/clear_refs, and VmRSS sampled every 100 ms),
mosquitto's peak RSS, CPU seconds of collector, mosquitto, influxd and A; and the broker's log lines about
dropped messages. At the end every point B sent must be in InfluxDB (re-sends included).
Goals (issue 10 §3): p99 during each flood <= 2 x baseline p99 + 1 s; collector peak RSS <= 150 MB.

Experiments: --limit and --set change the collector's configuration, --flood-rate caps A's publish rate (what a
per-gateway limit in front of the broker's queue would do); each run prints that it is an experiment.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labkit import enrolled, stack
from labkit.flood_lab import (
    Flooder,
    FloodPayloads,
    QuietSecureBroker,
    RssSampler,
    SteadyGateway,
    StoreWatch,
    counters_between,
    cpu_seconds,
    load_sealer,
    mqtt_settings,
    stats_lines,
    status_kb,
)
from labkit.influxd import InfluxdServer
from labkit.outbox_lab import server_pid
from labkit.pki import LabCA
from labkit.secure_broker import SecureBroker

GW_A = "gw-flood-a"
GW_B = "gw-flood-b"
DB = "citynerve"
KINDS = ("valid", "garbage", "forged")
RSS_GOAL_MB = 150.0  # 10^6 bytes; RSS figures below are MiB (kB / 1024) as /proc gives them


# -- gateway A, in a child process --------------------------------------------------------------------------------


def flooder_main(spec_json: str) -> None:
    """Build the payload pools, say "ready", then flood once per line "<kind> <seconds>" read from stdin."""
    spec = json.loads(spec_json)
    gw_dir = Path(spec["gateway_dir"])
    sealer = load_sealer(gw_dir, spec["gateway"], Path(spec["collector_pub"]))
    payloads = FloodPayloads(spec["gateway"], sealer, readings=spec["readings"])
    settings = mqtt_settings(spec["port"], spec["ca_file"], gw_dir, spec["gateway"])
    print(json.dumps({"ready": True, "valid_bytes": payloads.valid_size()}), flush=True)
    for line in sys.stdin:
        kind, seconds, rate = line.split()
        flooder = Flooder(settings, spec["gateway"], window=64 if kind == "valid" else 1000)
        start = time.time()
        result = flooder.run(payloads.stream(kind), payloads.topic, float(seconds), float(rate))
        print(json.dumps({"kind": kind, "start": start, "end": time.time(), **result}), flush=True)


# -- measurement helpers ---------------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def r2(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def b_summary(gateway: SteadyGateway, watch: StoreWatch, t0: float, t1: float) -> dict:
    """B's messages sampled in [t0, t1): points sent and stored, latency of the stored ones."""
    lat = watch.latencies()
    entries = [e for e in gateway.snapshot() if t0 <= e.sample_ns / 1e9 < t1]
    points = [x for e in entries for x in lat.get(e.sample_ns, [])]
    pubacks = [e.puback_s for e in entries if e.puback_s is not None]
    acks = [e.acked_s for e in entries if e.acked_s is not None]
    return {
        "messages": len(entries), "points_sent": len(entries) * gateway.readings, "points_stored": len(points),
        "resent_messages": sum(e.sends - 1 for e in entries),
        "p50_s": r2(pct(points, 0.5)), "p99_s": r2(pct(points, 0.99)), "max_s": r2(max(points, default=None)),
        "puback_p50_s": r2(pct(pubacks, 0.5)), "puback_max_s": r2(max(pubacks, default=None)),
        "e2e_ack_p50_s": r2(pct(acks, 0.5)), "e2e_ack_max_s": r2(max(acks, default=None)),
    }


class Cpu:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def read(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            try:
                out[name] = cpu_seconds(pid)
            except OSError:
                out[name] = float("nan")
        out["bench (B, poller)"] = time.process_time()
        return out


def _limits(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood-seconds", type=float, default=30.0, help="length of each flood phase")
    parser.add_argument("--kind", choices=("all", *KINDS), default="all", help="all: each kind its own phase")
    parser.add_argument("--baseline-seconds", type=float, default=30.0, help="B alone, before the floods")
    parser.add_argument("--recovery-seconds", type=float, default=15.0, help="B alone after each flood")
    parser.add_argument("--drain-max", type=float, default=300.0,
                        help="after a flood, wait at most this long for the collector to work off A's backlog")
    parser.add_argument("--valid-readings", type=int, default=5000, help="readings per valid batch of A")
    parser.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                        help="EXPERIMENT ONLY: a [limits] setting of the collector (the goal is for the defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="EXPERIMENT ONLY: any other collector.toml setting, e.g. quarantine.max_entries=0")
    parser.add_argument("--broker-debug-log", action="store_true",
                        help="keep the lab's 'log_type debug' (one broker log line per PUBLISH)")
    parser.add_argument("--flood-rate", action="append", default=[], metavar="[KIND=]MSGS_PER_S",
                        help="EXPERIMENT ONLY: cap A's messages per second (as a per-gateway limit at the broker "
                             "would), for every kind or one")
    parser.add_argument("--flooder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flooder:
        flooder_main(args.flooder)
        return {}
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    rates: dict[str, float] = {}
    for item in args.flood_rate:
        kind, _, value = item.rpartition("=")
        rates.update({k: float(value) for k in ([kind] if kind else KINDS)})
    limits = _limits(args.limit)
    extra: dict[str, dict] = {}
    for kv in args.set:
        section, _, rest = kv.partition(".")
        extra.setdefault(section, {}).update(_limits([rest]))

    with tempfile.TemporaryDirectory(prefix="bench-flood-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        t_setup = time.monotonic()
        dep = enrolled.create(work / "deployment", [GW_A, GW_B])
        broker_cls = SecureBroker if args.broker_debug_log else QuietSecureBroker
        with broker_cls(work / "mosquitto", device_ca_dir=dep.ca_dir, collector_ca_dir=dep.collector_ca_dir,
                        server_ca=LabCA(work / "server-ca")) as broker, \
                InfluxdServer(work / "influxd", log_level="warn") as influx:
            influx.create_database(DB)
            sections: dict = {
                "security": {"keys_dir": str(dep.keys_dir), "registry": str(dep.registry)},
                "log": {"stats_interval": "1s"},
            }
            if limits:
                sections["limits"] = limits
            for section, values in extra.items():
                sections[section] = {**sections.get(section, {}), **values}
            config = stack.write_collector_config(
                work / "collector.toml",
                broker.collector_mqtt(dep.collector_cert, dep.collector_key, reconnect_max="2s"),
                {"api": "v1", "url": influx.url, "database": DB, "flush_interval": "1s"},  # the shipped default
                **sections)
            collector = stack.collector_process(config).start()
            gw_a, gw_b = dep.gateways[GW_A], dep.gateways[GW_B]
            spec = {"gateway": GW_A, "gateway_dir": str(gw_a.dir), "collector_pub": str(dep.collector_pub),
                    "port": broker.port, "ca_file": broker.ca_file, "readings": args.valid_readings}
            flooder = subprocess.Popen([sys.executable, "-m", "bench.flood", "--flooder", json.dumps(spec)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            gateway = SteadyGateway(mqtt_settings(broker.port, broker.ca_file, gw_b.dir, GW_B), GW_B,
                                    load_sealer(gw_b.dir, GW_B, dep.collector_pub))
            watch = StoreWatch(influx, DB, gateway)
            assert collector.proc is not None
            rss = RssSampler(collector.proc.pid)
            broker_rss = RssSampler(server_pid(broker), interval=0.5)
            phases: list[dict] = []
            try:
                ready = json.loads(flooder.stdout.readline() or "{}")
                if not ready.get("ready"):
                    raise RuntimeError("the flooder did not start")
                print(f"  set-up {time.monotonic() - t_setup:.0f} s; A's valid batch {ready['valid_bytes']:,} bytes "
                      f"of {args.valid_readings} readings", flush=True)
                cpu = Cpu({"collector": collector.proc.pid, "mosquitto": server_pid(broker),
                           "influxd": server_pid(influx), "A (flooder)": flooder.pid})
                gateway.connect()
                gateway.start()
                watch.start()
                rss.start()
                broker_rss.start()
                time.sleep(5)  # B's first session is verified, its series and field types are new: not measured

                plan: list[tuple[str, str | None, float]] = [("baseline", None, args.baseline_seconds)]
                for kind in kinds:
                    plan += [(f"flood {kind}", kind, args.flood_seconds),
                             (f"after {kind}", None, args.recovery_seconds)]
                for name, kind, seconds in plan:
                    rss.reset_peak()
                    c0, t0 = cpu.read(), time.time()
                    flood: dict = {}
                    drained = None
                    if kind is None and name == "baseline":
                        time.sleep(seconds)
                    elif kind is None:
                        # At least `seconds`, then until the collector has worked off what A sent (a backlog at
                        # the broker or in the collector): 3 stats lines in a row with no rejection and no more
                        # readings than B's.
                        time.sleep(seconds)
                        deadline = time.monotonic() + args.drain_max
                        while not (drained := quiet(collector.log_path, gateway.readings)) \
                                and time.monotonic() < deadline:
                            time.sleep(1.0)
                    else:
                        assert flooder.stdin is not None and flooder.stdout is not None
                        flooder.stdin.write(f"{kind} {seconds} {rates.get(kind, 0.0)}\n")
                        flooder.stdin.flush()
                        flood = json.loads(flooder.stdout.readline())
                    t1, c1 = time.time(), cpu.read()
                    hwm = status_kb(collector.proc.pid)["VmHWM"]
                    phase = {"phase": name, "kind": kind, "t0": t0, "t1": t1, "seconds": round(t1 - t0, 1),
                             "a": flood, "drained": drained, "collector_vm_hwm_mib": round(hwm / 1024, 1),
                             "collector_rss_peak_sampled_mib": round(rss.peak_kb(t0, t1) / 1024, 1),
                             "mosquitto_rss_peak_mib": round(broker_rss.peak_kb(t0, t1) / 1024, 1),
                             "cpu_s": {k: round(c1[k] - c0[k], 1) for k in c0}}
                    phases.append(phase)
                    print(f"  {name:<16} {phase['seconds']:5.1f} s  collector VmHWM {phase['collector_vm_hwm_mib']} MiB"
                          f"  mosquitto RSS {phase['mosquitto_rss_peak_mib']} MiB"
                          + (f"  A sent {flood['sent']} ({flood['messages_per_s']}/s, {flood['mb_per_s']} MB/s)"
                             if flood else "")
                          + ("" if drained is None else f"  (A's backlog {'worked off' if drained else 'NOT worked off'})"),
                          flush=True)
                # Every point B sent must be stored: wait for the last ones (and one re-send round, if any).
                gateway.sending = False
                deadline = time.monotonic() + gateway.ack_timeout + 20
                while (gateway.unacknowledged() or len(watch.seen) < len(gateway.snapshot()) * gateway.readings) \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(0.5)
            finally:
                gateway.stop()
                watch.stop()
                rss.stop()
                broker_rss.stop()
                gateway.close()
                if flooder.stdin:
                    flooder.stdin.close()
                try:
                    flooder.wait(15)
                except subprocess.TimeoutExpired:
                    flooder.kill()
                collector.stop()
            log_text = collector.log_path.read_text(errors="replace")
            if "Traceback" in log_text:
                raise RuntimeError(f"the collector failed:\n{collector.tail_log(40)}")
            stats = stats_lines(log_text)
            broker_log = broker.broker_log.read_text(errors="replace") if broker.broker_log.exists() else ""
            broker_drops = [ln for ln in broker_log.splitlines() if "dropped" in ln.lower()]
            stored_total = len(watch.seen)
            sent_total = len(gateway.snapshot()) * gateway.readings
            query_s = sorted(watch.query_s)

    for phase in phases:
        phase["b"] = b_summary(gateway, watch, phase["t0"], phase["t1"])
        counters = phase["collector_counters"] = counters_between(stats, phase["t0"], phase["t1"])
        # What the collector took off the broker of A's messages: every message is counted once, in messages
        # (processed), status_messages or one rejected.* counter (declined or rejected); B's are subtracted.
        handled = counters.get("messages", 0) + counters.get("status_messages", 0) \
            + sum(v for k, v in counters.items() if k.startswith("rejected."))
        phase["a_handled_by_collector"] = max(0, handled - phase["b"]["messages"] - phase["b"]["resent_messages"])
    return report(phases, args, limits, stored_total, sent_total, query_s, watch.errors, gateway.resent,
                  broker_drops)


def quiet(log_path: Path, b_readings: int, lines: int = 3) -> bool:
    """The collector's last `lines` stats intervals show no rejection and no more readings than B sends."""
    stats = stats_lines(log_path.read_text(errors="replace"))[-(lines + 1):]
    if len(stats) < lines + 1:
        return False
    for (_, before), (_, after) in itertools.pairwise(stats):
        delta = {k: v - before.get(k, 0) for k, v in after.items()}
        if any(v for k, v in delta.items() if k.startswith("rejected.")) or delta.get("readings", 0) > 1.5 * b_readings:
            return False
    return True


def report(phases: list[dict], args: argparse.Namespace, limits: dict, stored: int, sent: int,
           query_s: list[float], poll_errors: int, resent: int, broker_drops: list[str]) -> dict:
    base = phases[0]["b"]
    base_p99 = base["p99_s"] or 0.0
    bound = 2 * base_p99 + 1.0
    print(f"\n{'phase':<14} {'s':>5} {'A sent':>7} {'A msg/s':>7} {'A taken':>7} {'B stored/sent':>13} {'B p50':>6} "
          f"{'B p99':>6} {'B max':>6} {'coll.MiB':>8} {'mosq.MiB':>8} {'CPU s coll/mosq/infl/A':>22}  "
          f"collector counters")
    for p in phases:
        b, a, cpu = p["b"], p["a"], p["cpu_s"]
        counters = " ".join(f"{k}={v}" for k, v in sorted(p["collector_counters"].items())
                            if k.startswith("rejected.") or k in ("messages", "readings"))
        print(f"{p['phase']:<14} {p['seconds']:>5.1f} {a.get('sent', ''):>7} {a.get('messages_per_s', ''):>7} "
              f"{p['a_handled_by_collector']:>7} {b['points_stored']:>5}/{b['points_sent']:<7} {b['p50_s']!s:>6} "
              f"{b['p99_s']!s:>6} {b['max_s']!s:>6} "
              f"{max(p['collector_vm_hwm_mib'], p['collector_rss_peak_sampled_mib']):>8} {p['mosquitto_rss_peak_mib']:>8} "
              f"{cpu['collector']:>5}/{cpu['mosquitto']}/{cpu['influxd']}/{cpu['A (flooder)']:<6}  {counters}")
    print("(A taken: A's messages the collector took off the broker in the phase - processed, declined or rejected;"
          " B's latency: points sampled in the phase)")
    checks = []
    for p in phases:
        if p["kind"] is None:
            continue
        p99 = p["b"]["p99_s"]
        ok = p99 is not None and p99 <= bound and p["b"]["points_stored"] == p["b"]["points_sent"]
        checks.append({"phase": p["phase"], "p99_s": p99, "ratio_to_baseline_p99": r2(p99 / base_p99)
                       if p99 is not None and base_p99 else None, "bound_s": round(bound, 2), "pass": ok})
    peak = max(max(p["collector_vm_hwm_mib"], p["collector_rss_peak_sampled_mib"]) for p in phases)
    rss_pass = peak * 1.048576 <= RSS_GOAL_MB
    all_stored = stored == sent
    print(f"\nbaseline p99 {base_p99} s -> bound 2 x {base_p99} + 1 = {bound:.2f} s")
    for c in checks:
        print(f"  {c['phase']:<16} p99 {c['p99_s']} s = {c['ratio_to_baseline_p99']} x baseline: "
              f"{'PASS' if c['pass'] else 'FAIL'} (p99 <= 2 x baseline + 1 s, every point stored)")
    print(f"  collector peak RSS {peak} MiB = {peak * 1.048576:.1f} MB: {'PASS' if rss_pass else 'FAIL'} "
          f"(<= {RSS_GOAL_MB:g} MB)")
    print(f"  B's points stored {stored} of {sent}: {'PASS' if all_stored else 'FAIL'}; re-sent messages {resent}")
    if query_s:
        print(f"  poll every 100 ms; query duration p50 {pct(query_s, 0.5) * 1000:.0f} ms, "
              f"p99 {pct(query_s, 0.99) * 1000:.0f} ms, max {query_s[-1] * 1000:.0f} ms; failed polls {poll_errors}")
    print(f"  broker log lines about dropped messages: {len(broker_drops)}"
          + (f" (first: {broker_drops[0].strip()})" if broker_drops else ""))
    if limits or args.set or args.flood_rate:
        print(f"  EXPERIMENT: [limits] {limits} {' '.join(args.set)} A's rate capped: {args.flood_rate or 'no'} "
              f"(not the defaults)")
    result = {
        "flood_seconds": args.flood_seconds, "baseline_seconds": args.baseline_seconds,
        "recovery_seconds": args.recovery_seconds, "limits": limits or "defaults", "set": args.set,
        "flood_rate": args.flood_rate, "broker_drop_lines": len(broker_drops),
        "phases": [{k: v for k, v in p.items() if k not in ("t0", "t1")} for p in phases],
        "checks": checks, "peak_rss_mib": peak, "rss_pass": rss_pass,
        "b_points_stored": stored, "b_points_sent": sent, "b_resent_messages": resent,
        "poll_query_ms": {"p50": round(pct(query_s, 0.5) * 1000) if query_s else None,
                          "p99": round(pct(query_s, 0.99) * 1000) if query_s else None},
        "met": all(c["pass"] for c in checks) and rss_pass and all_stored,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
