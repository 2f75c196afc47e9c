"""Outbox fsyncs per poll cycle: the real edge-agent under strace, with and without a collector acknowledging,
against a naive outbox (one SQLite transaction per reading, rollback journal) fed the same readings, same run.

    python -m bench.outbox_fsync [--cycles 400] [--devices 4] [--interval 0.5]

The agent polls `--devices` simulated SDM630 meters (labkit.meter_sim, Modbus TCP, one thread each in this
process) every `--interval` seconds and commits every `--interval` seconds (uplink.publish_interval), under
`strace -f -y -e trace=fsync,fdatasync,sync_file_range`. Only calls inside a window of `--cycles` cycles after a
warm-up are counted, by the file they synced: the outbox's WAL (one per commit, plus checkpoints), the outbox's
database file (only a checkpoint writes it: its fsyncs count the checkpoints), the sequence reservation file and
its directory (every 1000 messages), anything else. Run 1: broker, no collector (nothing is acknowledged, every
commit only inserts). Run 2: a collector writing to influxd acknowledges, so most commits also delete what was
acknowledged since the previous cycle, in the same transaction.

Cycles = aligned commit ticks in the window; commits with a message are counted from the messages themselves
(run 1: rows left in the outbox; run 2: the citynerve_ingest points in InfluxDB, one per message).

Baseline, in a child process under the same strace: a naive outbox doing what the agent does not, one
autocommit INSERT per reading, SQLite's default rollback journal (journal_mode=DELETE, synchronous=FULL), with
the readings the agent made in run 1, cycle by cycle; for run 2's comparison it also deletes the previous
cycle's readings with one DELETE per cycle (a generous naive: one transaction per acknowledgement, not per
reading).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import msgspec

from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import meter_in_thread
from labkit.mosquitto import MosquittoServer
from labkit.outbox_lab import children, parse_strace, strace_available, under_strace
from labkit.pki import LabCA
from wire.schema import decode_batch

REPO = Path(__file__).resolve().parent.parent
GATEWAY = "gw-fsync"


def classify(path: str) -> str:
    name = Path(path).name
    if name.endswith("outbox.sqlite3-wal"):
        return "wal"
    if name.endswith("outbox.sqlite3"):
        return "db"
    if name.startswith("sequence"):
        return "sequence"
    if name == f"{GATEWAY}-state":
        return "state_dir"
    return "other"


def count_window(strace_out: Path, t0: float, t1: float) -> Counter[str]:
    counts: Counter[str] = Counter()
    for ev in parse_strace(strace_out):
        if t0 <= ev.time <= t1:
            counts[classify(ev.path)] += 1
    return counts


def stop_traced(process) -> None:
    """SIGTERM to the agent itself (not to strace), so strace records its clean stop and exits with it."""
    assert process.proc is not None
    for pid in children(process.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        process.proc.wait(timeout=30)
    finally:
        process.stop()


def run_agent(work: Path, broker: MosquittoServer, ports: list[int], interval: float, cycles: int, warmup: float,
              influx: InfluxdServer | None) -> dict:
    name = "acked" if influx else "no_collector"
    run_dir = work / name
    run_dir.mkdir()
    collector = None
    if influx is not None:
        influx.create_database("fsync")
        collector = stack.quiet_collector(run_dir / "collector.toml", broker, "bench-fsync-collector",
                                          {"api": "v1", "url": influx.url, "database": "fsync"})
    ms = f"{round(interval * 1000)}ms"
    devices = [stack.modbus_tcp_device(f"meter-{i}", port, interval=ms) for i, port in enumerate(ports)]
    cfg = stack.write_agent_config(run_dir / "agent.toml", GATEWAY, stack.mqtt_section(broker), devices,
                                   publish_interval=ms)
    strace_out = run_dir / "strace.txt"
    agent = under_strace(stack.agent_process(cfg), strace_out)
    try:
        agent.start()
        time.sleep(warmup)
        t0 = time.time()
        time.sleep(cycles * interval)
        t1 = time.time()
    finally:
        stop_traced(agent)
        if collector is not None:
            time.sleep(1.5)  # the last messages reach InfluxDB
            collector.stop()
    counts = count_window(strace_out, t0, t1)
    outbox = run_dir / f"{GATEWAY}-state" / "outbox.sqlite3"
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    rows = db.execute("SELECT created_ns, body FROM message WHERE created_ns BETWEEN ? AND ? ORDER BY seq",
                      (int(t0 * 1e9), int(t1 * 1e9))).fetchall()
    left = db.execute("SELECT count(*) FROM message").fetchone()[0]
    db.close()
    if influx is None:
        commits = len({created // 10**6 for created, _ in rows})  # one cycle's messages are 1 ns apart
        by_cycle: dict[int, list[bytes]] = {}
        for created, body in rows:
            by_cycle.setdefault(created // 10**6, []).extend(msgspec.msgpack.encode(r)
                                                             for r in decode_batch(body).readings)
        cycles_data = list(by_cycle.values())
    else:
        points = influx.query(f"SELECT seq FROM citynerve_ingest WHERE time >= {int(t0 * 1e9)} "
                              f"AND time <= {int(t1 * 1e9)}", "fsync")
        commits = len({p["time"] // 10**6 for p in points})
        cycles_data = []
    ticks = math.floor(t1 / interval) - math.floor(t0 / interval)
    log_text = agent.log_path.read_text(errors="replace")
    if "Traceback" in log_text:
        raise RuntimeError(f"agent failed:\n{agent.tail_log()}")
    return {"run": name, "cycles": ticks, "commits_with_message": commits, "fsyncs": dict(counts),
            "total": sum(counts.values()), "outbox_rows_at_end": left, "window_s": round(t1 - t0, 1),
            "_cycles_data": cycles_data}


def naive_worker(argv: list[str]) -> None:
    """Child process: the naive outbox on the readings of `data` (msgpack list of cycles of encoded readings)."""
    db_path, data_path, mode = Path(argv[0]), Path(argv[1]), argv[2]
    cycles = msgspec.msgpack.decode(data_path.read_bytes())
    db = sqlite3.connect(db_path, isolation_level=None)  # autocommit: every statement is its own transaction
    db.execute("CREATE TABLE reading (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    settings = {"journal_mode": db.execute("PRAGMA journal_mode").fetchone()[0],
                "synchronous": db.execute("PRAGMA synchronous").fetchone()[0]}
    start = time.time()
    time.sleep(0.01)
    previous: list[int] = []
    for cycle in cycles:
        ids = [db.execute("INSERT INTO reading (body) VALUES (?)", (body,)).lastrowid for body in cycle]
        if mode == "acked" and previous:
            db.execute("DELETE FROM reading WHERE id BETWEEN ? AND ?", (previous[0], previous[-1]))
        previous = ids
    db.close()
    print(json.dumps({"start": start, "end": time.time(), **settings}))


def run_naive(work: Path, cycles_data: list[list[bytes]], mode: str) -> dict:
    run_dir = work / f"naive_{mode}"
    run_dir.mkdir()
    data = run_dir / "readings.msgpack"
    data.write_bytes(msgspec.msgpack.encode(cycles_data))
    strace_out = run_dir / "strace.txt"
    argv = ["strace", "-f", "-y", "-ttt", "--seccomp-bpf", "-e", "trace=fsync,fdatasync,sync_file_range",
            "-o", str(strace_out), sys.executable, "-m", "bench.outbox_fsync", "--naive-worker",
            str(run_dir / "naive.sqlite3"), str(data), mode]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=REPO)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    counts: Counter[str] = Counter()
    for ev in parse_strace(strace_out):
        if info["start"] <= ev.time <= info["end"]:
            name = Path(ev.path).name
            counts["journal" if name.endswith("-journal") else "db" if name == "naive.sqlite3" else "dir"
                   if ev.path == str(run_dir) else "other"] += 1
    return {"run": f"naive_{mode}", "cycles": len(cycles_data), "readings": sum(map(len, cycles_data)),
            "fsyncs": dict(counts), "total": sum(counts.values()),
            "journal_mode": info["journal_mode"], "synchronous": info["synchronous"]}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--naive-worker"]:
        naive_worker(argv[1:])
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=400, help="cycles counted per run (after the warm-up)")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.5, help="poll and publish interval, seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after start before counting")
    args = parser.parse_args(argv)
    if not strace_available():
        raise SystemExit("bench.outbox_fsync needs strace (apt-get install strace)")

    with tempfile.TemporaryDirectory(prefix="bench-fsync-", dir=os.environ.get("BENCH_TMP")) as tmp, \
            contextlib.ExitStack() as sims:
        work = Path(tmp)
        ports = [sims.enter_context(meter_in_thread("127.0.0.1", 0, unit=1, seed=i, update_interval=0.25)).port
                 for i in range(args.devices)]
        ca = LabCA(work / "pki")
        with MosquittoServer(work / "mq", ca) as broker, InfluxdServer(work / "influxd", log_level="warn") as influx:
            plain = run_agent(work, broker, ports, args.interval, args.cycles, args.warmup, None)
            acked = run_agent(work, broker, ports, args.interval, args.cycles, args.warmup, influx)
        data = plain.pop("_cycles_data")
        acked.pop("_cycles_data")
        naive_plain = run_naive(work, data, "inserts")
        naive_acked = run_naive(work, data, "acked")

    def per_cycle(run: dict) -> float:
        return run["total"] / run["cycles"]

    rows = []
    for agent_run, naive_run in ((plain, naive_plain), (acked, naive_acked)):
        f = agent_run["fsyncs"]
        checkpoints = f.get("db", 0)
        rows.append({
            "run": agent_run["run"], "cycles": agent_run["cycles"], "commits": agent_run["commits_with_message"],
            "agent_fsyncs": agent_run["total"], "agent_per_cycle": round(per_cycle(agent_run), 3),
            "wal": f.get("wal", 0), "checkpoints": checkpoints,
            "cycles_per_checkpoint": round(agent_run["cycles"] / checkpoints, 1) if checkpoints else None,
            "wal_fsyncs_beyond_commits_per_checkpoint":
                round((f.get("wal", 0) - agent_run["commits_with_message"]) / checkpoints, 2) if checkpoints else None,
            "sequence_file": f.get("sequence", 0) + f.get("state_dir", 0), "other": f.get("other", 0),
            "naive_per_cycle": round(per_cycle(naive_run), 3),
            "ratio_naive_over_agent": round(per_cycle(naive_run) / per_cycle(agent_run), 2),
        })
    print(f"{'run':<13} {'cycles':>6} {'commits':>7} {'fsyncs':>6} {'per cycle':>9} {'wal':>5} {'ckpts':>5} "
          f"{'seq file':>8} {'naive/cycle':>11} {'naive÷agent':>11}")
    for r in rows:
        print(f"{r['run']:<13} {r['cycles']:>6} {r['commits']:>7} {r['agent_fsyncs']:>6} {r['agent_per_cycle']:>9.3f} "
              f"{r['wal']:>5} {r['checkpoints']:>5} {r['sequence_file']:>8} {r['naive_per_cycle']:>11.2f} "
              f"{r['ratio_naive_over_agent']:>11.2f}")
    result = {"devices": args.devices, "interval_s": args.interval, "rows": rows,
              "runs": [plain, acked, naive_plain, naive_acked]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
