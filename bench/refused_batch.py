"""Refused batches: time and HTTP requests for BatchWriter to write batches of 5000 lines from 50 gateways into
a real influxd when one gateway's message in each batch is refused, divided by the same run with nothing
refused (the baseline, same run, same server).

    python -m bench.refused_batch [--batches 20] [--gateways 50] [--lines 5000] [--rounds 3]

Each batch holds one message (put) per gateway, lines / gateways lines each (100 by default): 10 devices x 10
sample times of `power,device=...,gateway=... current=...,power=...,voltage=...`, as the collector writes them
(V1Backend, gzip, batch_size 5000, max_pending_lines 100,000; one put per gateway and batch, group = gateway).
Scenarios, each into a fresh database where the measurement already exists (voltage is a float there):
- clean: nothing refused (the baseline);
- same: the same gateway's message in every batch carries one line with `voltage=230i`, a field type conflict
  (InfluxDB: 400 "partial write: field type conflict ..."): a gateway that poisons every message;
- rotating: the conflicting message comes from another gateway in each batch, so the writer's memory of
  suspect groups never helps: every batch is written apart (1 + gateways requests), the worst case per batch.
Clock: from the first put until close() returned (every batch settled). Requests are counted in the backend,
lines sent too. Each round runs the three scenarios back to back (in an order rotated from round to round) and
divides each one's time by the clean run's of the same round; reported: the median of those ratios over the
rounds and their spread. At the end of each scenario InfluxDB must hold every line but the conflicting ones
(count), and exactly the conflicting messages must be reported refused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from collector.influx.backends import V1Backend
from collector.influx.batcher import BatchResult, BatchWriter
from collector.influx.config import InfluxConfig
from labkit.influxd import InfluxdServer

BATCH_SIZE = 5000  # the collector's default influx.batch_size
DEVICES = 10
SCENARIOS = ("clean", "same", "rotating")


class CountingBackend:
    """V1Backend, counting requests and the lines they carried."""

    def __init__(self, inner: V1Backend) -> None:
        self.inner = inner
        self.requests = 0
        self.lines = 0

    def write(self, body: bytes) -> None:
        self.requests += 1
        self.lines += body.count(b"\n") + 1
        self.inner.write(body)


@dataclass
class Run:
    scenario: str
    seconds: float
    requests: int
    lines_sent: int
    lines: int
    refused: int
    stored_points: int


def build_puts(scenario: str, batches: int, gateways: int, per_put: int, t0: int) -> list[tuple[str, list[bytes]]]:
    times = per_put // DEVICES
    puts = []
    for b in range(batches):
        bad_gateway = {"clean": None, "same": 0, "rotating": b % gateways}[scenario]
        for g in range(gateways):
            gw = f"gw-{g:04d}"
            lines = []
            for s in range(times):
                t = t0 + (b * times + s) * 10**9
                for d in range(DEVICES):
                    x = b + g + s + d
                    lines.append(b"power,device=meter-%d,gateway=%s current=%d.25,power=%d.5,voltage=%d.75 %d"
                                 % (d, gw.encode(), x % 40, x % 9000, 225 + x % 10, t))
            if g == bad_gateway:
                lines[len(lines) // 2] = lines[len(lines) // 2].replace(b"voltage=", b"voltage=230i,x=")
            puts.append((gw, lines))
    return puts


async def write_all(backend: CountingBackend, puts: list[tuple[str, list[bytes]]]) -> tuple[float, int]:
    refused = 0

    def on_result(result: BatchResult) -> None:
        nonlocal refused
        refused += len(result.refused)

    writer = BatchWriter(backend, batch_size=BATCH_SIZE, flush_interval=60.0, retry_initial=0.5, retry_max=30.0,
                         max_pending_lines=100_000, on_result=on_result)
    await writer.start()
    started = time.perf_counter()
    for i, (gw, lines) in enumerate(puts):
        await writer.put(lines, token=i, group=gw)
    await writer.close(drain=True)
    return time.perf_counter() - started, refused


def one_run(influx: InfluxdServer, scenario: str, number: int, args: argparse.Namespace) -> Run:
    db = f"refused_{scenario}_{number}"
    influx.create_database(db)
    t0 = (time.time_ns() // 10**9 - 7200) * 10**9  # two hours ago, in one shard most of the time
    influx.write(f"power,device=setup,gateway=setup current=0.5,power=0.5,voltage=0.5 {t0 - 10**9}", db)
    puts = build_puts(scenario, args.batches, args.gateways, args.lines // args.gateways, t0)
    backend = CountingBackend(V1Backend(InfluxConfig(url=influx.url, database=db, timeout=60.0)))
    seconds, refused = asyncio.run(write_all(backend, puts))
    backend.inner.close()
    lines = sum(len(lines) for _, lines in puts)
    count = influx.query('SELECT count("current") FROM "power" WHERE "gateway" != \'setup\'', db)[0]["count"]
    expected_refused = 0 if scenario == "clean" else args.batches
    if refused != expected_refused or count != lines - expected_refused:
        raise SystemExit(f"{scenario}: {refused} refused (expected {expected_refused}), {count} of {lines} points "
                         f"stored (expected {lines - expected_refused})")
    influx.drop_database(db)
    return Run(scenario, seconds, backend.requests, backend.lines, lines, refused, count)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="batches per scenario and round")
    parser.add_argument("--gateways", type=int, default=50, help="gateways (one message each per batch)")
    parser.add_argument("--lines", type=int, default=BATCH_SIZE, help="lines per batch")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all scenarios (median reported)")
    args = parser.parse_args(argv)
    if args.lines % args.gateways or (args.lines // args.gateways) % DEVICES:
        parser.error(f"--lines must be a multiple of gateways x {DEVICES}")

    runs: dict[str, list[Run]] = {s: [] for s in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="bench-refused-", dir=os.environ.get("BENCH_TMP")) as tmp, \
            InfluxdServer(Path(tmp) / "influxd", log_level="warn") as influx:
        for number in range(args.rounds):
            order = SCENARIOS[number % 3:] + SCENARIOS[:number % 3]
            for scenario in order:
                run = one_run(influx, scenario, number, args)
                runs[scenario].append(run)
                print(f"  round {number + 1} {scenario:8s}: {run.seconds:6.2f} s, {run.requests:5d} requests, "
                      f"{run.lines_sent / run.lines:.2f} lines sent per line, {run.refused} refused")

    summary = {}
    print(f"{args.batches} batches of {args.lines} lines from {args.gateways} gateways, {args.rounds} rounds:")
    print("| scenario | s (median) | requests | requests/batch | lines sent/line | messages refused | time ÷ clean "
          "(median) | spread of rounds |")
    print("|---|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        ratios = [r.seconds / c.seconds for r, c in zip(runs[scenario], runs["clean"], strict=True)]
        seconds = statistics.median(r.seconds for r in runs[scenario])
        last = runs[scenario][-1]
        ratio = statistics.median(ratios)
        summary[scenario] = {"seconds": seconds, "requests": last.requests, "ratio": ratio}
        print(f"| {scenario} | {seconds:.2f} | {last.requests} | {last.requests / args.batches:.2f} | "
              f"{last.lines_sent / last.lines:.2f} | {last.refused} | **{ratio:.2f}** | "
              f"{min(ratios):.2f}..{max(ratios):.2f} |")
    return summary


if __name__ == "__main__":
    main()
