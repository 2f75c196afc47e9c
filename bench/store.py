"""Store: what the store pays per reading for the fleet benchmark's data, today's shape against the shipped one,
in one run (issue 14 §3), and the same load into VictoriaMetrics.

    python -m bench.store [--gateways 10000] [--cycles 12] [--variants today,shipped] [--victoria]

The data are the fleet benchmark's (labkit.fleet_sim.Meters): per gateway `--devices` three-phase meters polled
every second, ten float32 values each, one message of 30 readings per 10 s cycle, and a status heartbeat with
device health every 60 s (every sixth cycle), time-aligned as the agents align them. Each message goes through
the collector's own pure code (collector.ingest.Ingest: the readings' lines and the per-message record; the
heartbeats through collector.health and the inventory's schedule) and the collector's own writer
(collector.influx.batcher.BatchWriter with the V1 or V2 backend): what reaches each store is exactly what the
collector would send it with those settings. The bench's own Python work is not measured; each store's CPU
(utime + stime from /proc) is, from before its first write to the end of a quiet tail after the last one
(`--tail`), its data directory's size and its peak RSS (VmHWM). Deferred work is counted: the tail lasts until
each influxd's write cache is empty (every value written was snapshotted into a TSM file), no compaction runs or
waits (its /debug/vars) and every store's CPU was idle `--quiet` seconds. influxd snapshots a cache that stays
below `cache-snapshot-memory-size` 10 minutes after the last write (`cache-snapshot-write-cold-duration`, left
at its default so the variants run as configured), hence the long tail. Ending the tail at the first quiet moment
charged a variant with 256 MB snapshots for WAL and cache only, not for encoding its last cache into TSM files,
while one with Debian's 25 MB had paid for nearly all of its own (docs/benchmarks.md "Store", the correction).

Variants (each its own store process, all fed the same messages cycle by cycle, so drift of this shared
machine weighs on them alike):
  today      influxd with Debian's packaged influxdb.conf (every setting at its default), GOGC unset; the
             collector as it was: sample times in ns, gzip, batch_size 5000, a health point per heartbeat
  shipped    influxd with deploy/influxdb/influxdb.conf and the GOGC of deploy/influxdb/influxdb.service.d;
             the collector's defaults now
  ...        further variants (VARIANTS below) change one thing of `shipped`, to attribute the difference
--victoria adds VictoriaMetrics (labkit.victoria, default flags) fed through the V2 API (/api/v2/write,
influxdb-client) with the collector's defaults.
Result: readings per store CPU-second per variant, and the ratios to `today`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from collector.config import InventorySection
from collector.health import health_lines
from collector.influx.backends import make_backend
from collector.influx.batcher import BatchWriter
from collector.influx.config import InfluxConfig
from collector.ingest import PRECISIONS, Ingest, TimePolicy
from collector.inventory import Inventory
from labkit import pprof
from labkit.fleet_sim import Meters
from labkit.flood_lab import cpu_seconds, status_kb
from labkit.influxd import DEBIAN_CONFIG, SHIPPED_CONFIG, InfluxdServer, shipped_environment
from labkit.outbox_lab import server_pid
from wire import topics
from wire.config import Secret
from wire.envelope import seal_plain
from wire.schema import Batch
from wire.status import decode_status, encode_status

DB = "citynerve"
PREFIX = topics.DEFAULT_PREFIX
_NEW = InfluxConfig()


@dataclass(frozen=True)
class Variant:
    name: str
    config: Path | None  # influxd's configuration file (None: VictoriaMetrics)
    gogc: bool = True  # the shipped drop-in's environment
    precision: str = _NEW.precision
    gzip: bool = _NEW.gzip
    batch_size: int = _NEW.batch_size
    health_interval: float = float(InventorySection().health_interval)
    api: str = "v1"
    # float32 values as the agent's register decoder gives them now, their shortest decimal (230.12); False: as
    # it did, the float32's bits as a float64 (230.1199951171875)
    short_floats: bool = True
    settings: dict = field(default_factory=dict)  # influxd settings on top of the file
    env: dict = field(default_factory=dict)  # influxd's environment on top of the drop-in's (GOGC, GOMEMLIMIT)


VARIANTS = {
    "today": Variant("today", DEBIAN_CONFIG, gogc=False, precision="ns", gzip=True, batch_size=5000,
                     health_interval=0.0, short_floats=False),
    "shipped": Variant("shipped", SHIPPED_CONFIG),
    # one change from `shipped` each:
    "shipped-gogc100": Variant("shipped-gogc100", SHIPPED_CONFIG, gogc=False),
    "shipped-memlimit": Variant("shipped-memlimit", SHIPPED_CONFIG, env={"GOMEMLIMIT": "2GiB"}),
    "shipped-inmem": Variant("shipped-inmem", SHIPPED_CONFIG, settings={"data": {"index-version": "inmem"}}),
    "shipped-cache25m": Variant("shipped-cache25m", SHIPPED_CONFIG,
                                settings={"data": {"cache-snapshot-memory-size": "25m"}}),
    "shipped-ms": Variant("shipped-ms", SHIPPED_CONFIG, precision="ms"),
    "shipped-gzip": Variant("shipped-gzip", SHIPPED_CONFIG, gzip=True),
    "shipped-nogzip": Variant("shipped-nogzip", SHIPPED_CONFIG, gzip=False),
    "shipped-b5000": Variant("shipped-b5000", SHIPPED_CONFIG, batch_size=5000),
    "shipped-b20000": Variant("shipped-b20000", SHIPPED_CONFIG, batch_size=20000),
    "shipped-health0": Variant("shipped-health0", SHIPPED_CONFIG, health_interval=0.0),
    "shipped-long": Variant("shipped-long", SHIPPED_CONFIG, short_floats=False),
    "shipped-cache1g": Variant("shipped-cache1g", SHIPPED_CONFIG,
                               settings={"data": {"cache-snapshot-memory-size": "1g", "cache-max-memory-size": "2g"}}),
    "shipped-walfsync": Variant("shipped-walfsync", SHIPPED_CONFIG, settings={"data": {"wal-fsync-delay": "100ms"}}),
    "shipped-gogc800": Variant("shipped-gogc800", SHIPPED_CONFIG, env={"GOGC": "800", "GOMEMLIMIT": "4GiB"}),
    "shipped-procs1": Variant("shipped-procs1", SHIPPED_CONFIG, env={"GOMAXPROCS": "1"}),
    "victoria": Variant("victoria", None, api="v2"),
    # VictoriaMetrics sets GOGC=30 when the environment has none (lib/cgroup: less memory for more CPU; its docs
    # advise raising GOGC when go_memstats_gc_cpu_fraction passes 0.05)
    "victoria-gogc100": Variant("victoria-gogc100", None, api="v2", env={"GOGC": "100"}),
    "victoria-gogc400": Variant("victoria-gogc400", None, api="v2", env={"GOGC": "400"}),
}


class Store:
    """One variant: its server, its collector pieces, what it was fed."""

    def __init__(self, variant: Variant, work: Path) -> None:
        self.v = variant
        if variant.config is None:
            from labkit.victoria import VictoriaMetricsServer

            self.server = VictoriaMetricsServer(work / variant.name, env=variant.env)
            self.data_dir = work / variant.name / "data"
        else:
            self.server = InfluxdServer(work / variant.name, log_level="warn", config=variant.config,
                                        env=({**shipped_environment(), **variant.env} if variant.gogc else variant.env),
                                        settings=variant.settings)
            self.data_dir = work / variant.name
        self.ingest = Ingest(PREFIX, 1 << 30, TimePolicy(300 * 10**9, 1_577_836_800 * 10**9), "citynerve_suspect_time",
                             precision_ns=PRECISIONS[variant.precision])
        self.inventory = Inventory(health_interval_ns=int(variant.health_interval * 1e9))
        self.readings = 0
        self.lines = 0
        self.cpu0 = 0.0
        self.writer: BatchWriter | None = None

    async def start(self) -> None:
        self.server.start()
        if self.v.api == "v1":
            self.server.create_database(DB)
            cfg = InfluxConfig(api="v1", url=self.server.url, database=DB, gzip=self.v.gzip,
                               batch_size=self.v.batch_size, max_pending_lines=max(100_000, self.v.batch_size))
        else:
            cfg = InfluxConfig(api="v2", url=self.server.url, token=Secret("bench"), org="bench", bucket=DB,
                               gzip=self.v.gzip, batch_size=self.v.batch_size,
                               max_pending_lines=max(100_000, self.v.batch_size))
        # As collector/app.py builds it: a batch leaves at batch_size lines or 500 messages (receive maximum / 2).
        self.writer = BatchWriter(make_backend(cfg), batch_size=cfg.batch_size, flush_interval=float(cfg.flush_interval),
                                  retry_initial=0.5, retry_max=5.0, max_pending_lines=cfg.max_pending_lines,
                                  max_batch_puts=500)
        await self.writer.start()
        self.cpu0 = self.cpu()

    def pid(self) -> int:
        return server_pid(self.server)

    def cpu(self) -> float:
        return cpu_seconds(self.pid())

    def encode(self, gateway: str, payload: bytes, receive_ns: int) -> tuple[int, list[bytes]]:
        """(readings, lines) of one message, as the collector encodes it with this variant's settings."""
        accepted = self.ingest.uplink(topics.up(PREFIX, gateway), payload, receive_ns)
        return accepted.readings, accepted.lines

    async def message(self, gateway: str, readings: int, lines: list[bytes]) -> None:
        self.readings += readings
        self.lines += len(lines)
        assert self.writer is not None
        await self.writer.put(lines, group=gateway)

    async def status(self, gateway: str, status: bytes, receive_ns: int) -> None:
        doc = decode_status(status)
        self.inventory.status(gateway, doc, receive_ns)
        if self.inventory.health_due(gateway, doc, receive_ns):
            lines = health_lines(doc, gateway, receive_ns, self.ingest.time_policy).lines
            self.lines += len(lines)
            assert self.writer is not None
            await self.writer.put(lines, group=gateway)

    async def drained(self) -> None:
        assert self.writer is not None
        while self.writer.stats.pending_lines:
            await asyncio.sleep(0.05)

    def engine(self) -> dict[str, int] | None:
        """influxd's write cache and compactions for the bench's database, summed over its shards, from
        /debug/vars: bytes still in the cache, compactions running or queued, and how many ran of each kind (None:
        not influxd)."""
        if self.v.config is None:
            return None
        with urllib.request.urlopen(f"{self.server.url}/debug/vars", timeout=10) as resp:
            stats = json.load(resp)
        out = {"cache_bytes": 0, "compactions_pending": 0, "cache_snapshots": 0, "tsm_compactions": 0}
        for entry in stats.values():
            if not isinstance(entry, dict) or (entry.get("tags") or {}).get("database") != DB:
                continue
            values = entry.get("values", {})
            if entry.get("name") == "tsm1_cache":
                out["cache_bytes"] += values.get("memBytes", 0)
            elif entry.get("name") == "tsm1_engine":
                for key, value in values.items():
                    if key.endswith(("Active", "Queue")):
                        out["compactions_pending"] += value
                    elif key == "cacheCompactions":
                        out["cache_snapshots"] += value
                    elif key.startswith("tsm") and key.endswith("Compactions"):
                        out["tsm_compactions"] += value
        return out

    def settled(self) -> bool:
        """Nothing deferred is left: the write cache is empty and no compaction runs or waits."""
        engine = self.engine()
        return engine is None or (engine["cache_bytes"] == 0 and engine["compactions_pending"] == 0)

    def disk_mb(self) -> float:
        out = subprocess.run(["du", "-sk", str(self.data_dir)], capture_output=True, text=True).stdout.split()
        return int(out[0]) / 1024 if out else 0.0


def _long_f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def lengthened(reading):  # type: ignore[no-untyped-def]
    """A reading as the agent's decoder gave it before: each float32 as its bits in a float64 (17 digits)."""
    return msgspec.structs.replace(reading, fields={k: _long_f32(v) if type(v) is float else v
                                                    for k, v in reading.fields.items()})


async def run(args: argparse.Namespace, work: Path) -> dict:
    names = args.variants.split(",") + (["victoria"] if args.victoria else [])
    stores = [Store(VARIANTS[name], work) for name in names]
    meters = [Meters(i, args.devices, 1.0, args.interval) for i in range(args.gateways)]
    gateways = [f"gw-{i:05d}" for i in range(args.gateways)]
    # The data's times: the last --cycles cycles before now (the stores' retention keeps them; no future times).
    first_end = (int(time.time() // args.interval) - args.cycles) * args.interval
    beat_every = max(1, round(args.heartbeat / args.interval))
    for store in stores:
        await store.start()
    profiled = next((s for s in stores if s.v.name == args.profile), None) if args.profile else None
    profile_result: list[bytes] = []
    t0 = time.monotonic()
    started_ns = time.time_ns() - 3600 * 10**9
    try:
        for c in range(args.cycles):
            end = first_end + c * args.interval
            receive_ns = int((end + 0.3) * 1e9)
            cycle_readings = [m.readings(end) for m in meters]
            payloads = {short: [seal_plain(Batch(gw, c + 1, int((end + 0.05) * 1e9),
                                                 rs if short else [lengthened(r) for r in rs]))
                                for gw, rs in zip(gateways, cycle_readings, strict=True)]
                        for short in {s.v.short_floats for s in stores}}
            statuses = []
            if c % beat_every == 0:
                statuses = [encode_status(
                    "online", gateway=gw, time_ns=receive_ns, since_ns=started_ns, backlog_messages=0, next_seq=c + 2,
                    last_publish_ns=receive_ns, dropped_readings=0, resent_messages=0, outbox_resets=0,
                    devices={d: {"polls": m.polls, "errors": 0} for d in m.devices})
                    for gw, m in zip(gateways, meters, strict=True)]
            encoded: dict[str, list[tuple[int, list[bytes]]]] = {}  # per precision: the same lines for each store
            for store in stores:
                key = f"{store.v.precision}/{store.v.short_floats}"
                lines = encoded.get(key)
                if lines is None:
                    lines = encoded[key] = [store.encode(gw, payload, receive_ns) for gw, payload
                                            in zip(gateways, payloads[store.v.short_floats], strict=True)]
                for gw, (readings, message) in zip(gateways, lines, strict=True):
                    await store.message(gw, readings, message)
                for gw, status in zip(gateways, statuses, strict=False):
                    await store.status(gw, status, receive_ns)
            for store in stores:
                await store.drained()
            if profiled is not None and c == 0:
                assert isinstance(profiled.server, InfluxdServer)
                url = profiled.server.url
                threading.Thread(target=lambda u=url: profile_result.append(pprof.profile(u, args.profile_seconds)),
                                 daemon=True, name="pprof").start()
            print(f"  cycle {c + 1}/{args.cycles} written ({time.monotonic() - t0:.0f} s)", flush=True)
        # The tail: deferred work (snapshots, compactions) counted until the stores are quiet.
        quiet_since, last = time.monotonic(), [s.cpu() for s in stores]
        deadline = time.monotonic() + args.tail
        while time.monotonic() < deadline:
            await asyncio.sleep(2.0)
            now = [s.cpu() for s in stores]
            if any(b - a > 0.05 for a, b in zip(last, now, strict=True)):
                quiet_since = time.monotonic()
            last = now
            if time.monotonic() - quiet_since >= args.quiet and all(s.settled() for s in stores):
                break
        else:
            unsettled = [s.v.name for s in stores if not s.settled()]
            if unsettled:
                print(f"  the tail of {args.tail:.0f} s ended with deferred work left in {', '.join(unsettled)}: "
                      "their CPU is undercounted (raise --tail)", flush=True)
        results = []
        for store in stores:
            cpu = store.cpu() - store.cpu0
            peak_mib = round(status_kb(store.pid())["VmHWM"] / 1024)
            results.append({"variant": store.v.name, "readings": store.readings, "lines": store.lines,
                            "peak_rss_mib": peak_mib, "settled": store.settled(), "engine": store.engine(),
                            "store_cpu_s": round(cpu, 2), "readings_per_cpu_s": round(store.readings / cpu),
                            "us_per_reading": round(cpu * 1e6 / store.readings, 2), "disk_mb": round(store.disk_mb(), 1),
                            "lines_per_reading": round(store.lines / store.readings, 3)})
    finally:
        for store in stores:
            if store.writer is not None:
                await store.writer.close(drain=False)
            store.server.close()
    if profile_result:
        print(f"where {args.profile} spent its CPU ({args.profile_seconds} s from the second cycle on):")
        print(pprof.report(profile_result[0], 45))
    base = next((r for r in results if r["variant"] == "today"), results[0])
    for r in results:
        r["ratio_to_today"] = round(r["readings_per_cpu_s"] / base["readings_per_cpu_s"], 2)
    return {"gateways": args.gateways, "cycles": args.cycles, "devices": args.devices, "load_before": args.load0,
            "load_after": [round(x, 2) for x in os.getloadavg()], "results": results}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateways", type=int, default=10_000)
    p.add_argument("--cycles", type=int, default=12)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--heartbeat", type=float, default=60.0)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--variants", default="today,shipped", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--victoria", action="store_true", help="also VictoriaMetrics through the V2 API")
    p.add_argument("--tail", type=float, default=900.0, help="at most this long after the last write")
    p.add_argument("--quiet", type=float, default=20.0, help="the tail ends once every store was idle this long")
    p.add_argument("--json", help="write the result here too")
    p.add_argument("--profile", metavar="VARIANT", help="print where this influxd variant spent its CPU (a Go CPU "
                   "profile of --profile-seconds from the second cycle on, labkit.pprof)")
    p.add_argument("--profile-seconds", type=int, default=30)
    args = p.parse_args(argv)
    args.load0 = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=os.environ.get("BENCH_TMP")) as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(f"\n{'variant':<18} {'readings':>10} {'lines/reading':>13} {'store CPU s':>11} {'readings/CPU-s':>14} "
          f"{'us/reading':>10} {'disk MB':>8} {'peak MiB':>8} {'x today':>8}")
    for r in result["results"]:
        print(f"{r['variant']:<18} {r['readings']:>10,} {r['lines_per_reading']:>13} {r['store_cpu_s']:>11} "
              f"{r['readings_per_cpu_s']:>14,} {r['us_per_reading']:>10} {r['disk_mb']:>8} {r['peak_rss_mib']:>8} "
              f"{r['ratio_to_today']:>8}")
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
