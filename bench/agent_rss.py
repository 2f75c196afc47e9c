"""Agent peak RSS with a 10,000-message backlog in its outbox, against the same agent with an empty outbox and a
bare interpreter that imports the agent's main libraries, in the same run.

    python -m bench.agent_rss [--messages 10000] [--readings 20] [--seconds 60]

The outbox is prefilled with the agent's own Outbox.commit before the agent starts: `--messages` messages of
`--readings` SDM630 readings each (30 float fields, as the eastron_sdm630 profile decodes them), created 5 s
apart in the past, and the sequence file is set past them. Then the real edge-agent runs for `--seconds` with a
local mosquitto and live polling (4 simulated SDM630 on Modbus TCP, every 1 s, publish_interval 1 s):

- empty: no backlog, no collector (the baseline);
- backlog: the prefilled outbox, no collector: nothing is acknowledged, so the backlog stays; the agent sends
  the oldest `max_unacked_messages` (200) at once and, when nothing is acknowledged within ack_timeout (30 s),
  falls back to one probe message per round (edge_agent/delivery.py);
- backlog+collector: the same outbox while edge-collector writes to influxd and acknowledges, so it drains.

Each run reads the agent's VmHWM (peak resident set) from /proc/<pid>/status at the end, and samples VmRSS
every 0.5 s; the peak reported is the larger of the two (the kernel updates both lazily, so a sample can
exceed VmHWM by a few hundred kB). MiB = 2^20 bytes.
The bare baseline is `python -c 'import paho.mqtt.client, msgspec, sqlite3, pymodbus'`.
Goal: <= 60 MB with the 10k backlog (Telegraf's figure for a 10k-metric buffer: 84 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import meter_in_thread
from labkit.mosquitto import MosquittoServer
from labkit.mqtt_probe import MqttProbe
from labkit.outbox_lab import ReadingMaker, backlog_messages, prefill_outbox, proc_status_kb
from labkit.pki import LabCA
from wire import topics
from wire.mqttlink import DEFAULT_PREFIX
from wire.status import decode_status

GATEWAY = "gw-rss"
BARE = "import paho.mqtt.client, msgspec, sqlite3, pymodbus; print(open('/proc/self/status').read())"
OUTBOX_MAX = "1GB"


def bare_hwm_kb() -> int:
    out = subprocess.run([sys.executable, "-c", BARE], check=True, capture_output=True, text=True).stdout
    return next(int(line.split()[1]) for line in out.splitlines() if line.startswith("VmHWM:"))


def make_backlog(template: Path, messages: int, readings: int) -> dict:
    maker = ReadingMaker(4, prefix="meter")
    step = 5 * 10**9
    first_ns = time.time_ns() - (messages + 60) * step
    per_poll = 4
    prefilled = prefill_outbox(template, backlog_messages(GATEWAY, maker, messages, 0, first_ns, step,
                                                          polls_per_message=max(1, readings // per_poll)),
                               max_bytes=10**9, max_age_s=30 * 86400)
    return {"messages": prefilled.messages, "readings": prefilled.readings,
            "body_mb": round(prefilled.body_bytes / 1e6, 1), "file_mb": round(prefilled.file_bytes / 1e6, 1)}


def run_agent(work: Path, name: str, broker: MosquittoServer, ports: list[int], seconds: float,
              template: Path | None, influx: InfluxdServer | None) -> dict:
    run_dir = work / name
    run_dir.mkdir()
    state = run_dir / f"{GATEWAY}-state"
    if template is not None:
        shutil.copytree(template, state)
    collector = None
    if influx is not None:
        influx.create_database("rss")
        collector = stack.quiet_collector(run_dir / "collector.toml", broker, "bench-rss-collector",
                                          {"api": "v1", "url": influx.url, "database": "rss"})
    devices = [stack.modbus_tcp_device(f"live-{i}", port, interval="1s") for i, port in enumerate(ports)]
    cfg = stack.write_agent_config(run_dir / "agent.toml", GATEWAY, stack.mqtt_section(broker), devices,
                                   publish_interval="1s", uplink={"heartbeat_interval": "5s"},
                                   outbox={"max_size": OUTBOX_MAX})
    probe = MqttProbe(broker.port, str(broker.ca.cert_path), [topics.status(DEFAULT_PREFIX, GATEWAY)])
    agent = stack.agent_process(cfg)
    samples: list[int] = []
    try:
        agent.start()
        assert agent.proc is not None
        pid = agent.proc.pid
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples.append(proc_status_kb(pid)["VmRSS"])
            time.sleep(0.5)
        status_kb = proc_status_kb(pid)
        time.sleep(0.2)
    finally:
        agent.stop()
        if collector is not None:
            collector.stop()
        probe.close()
    statuses = [decode_status(m.payload) for m in probe.messages]
    last = next((s for s in reversed(statuses) if s.get("state") == "online" and "backlog_messages" in s), {})
    if "Traceback" in agent.log_path.read_text(errors="replace"):
        raise RuntimeError(f"agent failed:\n{agent.tail_log()}")
    return {
        "run": name, "peak_kb": max(status_kb["VmHWM"], *samples), "vm_hwm_kb": status_kb["VmHWM"],
        "vm_rss_end_kb": status_kb["VmRSS"],
        "vm_rss_max_sampled_kb": max(samples), "vm_rss_first_kb": samples[0],
        "backlog_messages_end": last.get("backlog_messages"), "resent_messages": last.get("resent_messages"),
        "last_ack": last.get("last_ack_ns") is not None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--readings", type=int, default=20, help="readings per prefilled message")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long each agent runs")
    args = parser.parse_args(argv)

    bare = bare_hwm_kb()
    with tempfile.TemporaryDirectory(prefix="bench-rss-", dir=os.environ.get("BENCH_TMP")) as tmp, \
            contextlib.ExitStack() as sims:
        work = Path(tmp)
        template = work / "backlog-template"
        backlog = make_backlog(template, args.messages, args.readings)
        print(f"  prefilled: {backlog}")
        ports = [sims.enter_context(meter_in_thread("127.0.0.1", 0, unit=1, seed=i)).port for i in range(4)]
        ca = LabCA(work / "pki")
        with MosquittoServer(work / "mq", ca) as broker, InfluxdServer(work / "influxd", log_level="warn") as influx:
            runs = [
                run_agent(work, "empty", broker, ports, args.seconds, None, None),
                run_agent(work, "backlog", broker, ports, args.seconds, template, None),
                run_agent(work, "backlog+collector", broker, ports, args.seconds, template, influx),
            ]
    empty = runs[0]["peak_kb"]
    print(f"{'run':<18} {'peak MiB':>9} {'VmRSS end MiB':>12} {'÷ empty':>8} {'÷ bare':>7} {'backlog end':>11} "
          f"{'resent':>6}")
    print(f"{'bare imports':<18} {bare / 1024:>9.1f} {'':>12} {bare / empty:>8.2f} {1:>7.2f}")
    for r in runs:
        r["ratio_to_empty"] = round(r["peak_kb"] / empty, 3)
        r["ratio_to_bare"] = round(r["peak_kb"] / bare, 3)
        print(f"{r['run']:<18} {r['peak_kb'] / 1024:>9.1f} {r['vm_rss_end_kb'] / 1024:>12.1f} "
              f"{r['ratio_to_empty']:>8.2f} {r['ratio_to_bare']:>7.2f} {r['backlog_messages_end']!s:>11} "
              f"{r['resent_messages']!s:>6}")
    result = {"backlog": backlog, "bare_vm_hwm_kb": bare, "runs": runs, "goal_mb": 60,
              "met": all(r["peak_kb"] / 1024 <= 60 for r in runs)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
