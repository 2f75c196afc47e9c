"""`make demo`: the whole path on loopback, in a temporary directory, with real programs.

    simulated SDM630 (pymodbus, TCP) -> edge-agent (enrolled, sealing) -> mosquitto (shipped config: mutual
    TLS, per-gateway ACL) -> edge-collector (opens and checks) -> influxd 1.x

It prints readings as InfluxDB stores them, after --summary-after seconds a table queried back from InfluxDB,
and runs until Ctrl-C (or --duration). Everything it started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from labkit import enrolled, stack
from labkit.influxd import InfluxdServer
from labkit.pki import LabCA
from labkit.process import ServerProcess, free_port, port_is_open
from labkit.secure_broker import SecureBroker

GATEWAY = "gw-demo-01"
DEVICE = "main-meter"
DATABASE = "citynerve"
MEASUREMENT = "electricity"
SHOWN_FIELDS = ("voltage_l1", "current_l1", "power", "frequency", "energy_import")


def write_configs(work: Path, dep: enrolled.Deployment, broker: SecureBroker, influx_url: str,
                  meter_port: int) -> tuple[Path, Path]:
    gw = dep.gateways[GATEWAY]

    agent = stack.write_agent_config(
        work / "agent.toml", GATEWAY, broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_max="5s"),
        [stack.modbus_tcp_device(DEVICE, meter_port, interval="2s", tags={"site": "demo-substation"})],
        security={"identity_key": str(gw.identity_key), "collector_key": str(dep.collector_pub)},
    )
    collector = stack.write_collector_config(
        work / "collector.toml", broker.collector_mqtt(dep.collector_cert, dep.collector_key, reconnect_max="5s"),
        {"api": "v1", "url": influx_url, "database": DATABASE, "flush_interval": "500ms"},
        security={"keys_dir": str(dep.keys_dir), "registry": str(dep.registry)},
        log={"stats_interval": "10s"},
    )
    return agent, collector


def _fmt_time(ns: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ns / 1e9)) + f".{(ns // 1_000_000) % 1000:03d}"


def _print_new_rows(influx: InfluxdServer, since_ns: int) -> int:
    fields = ", ".join(SHOWN_FIELDS)
    rows = influx.query(
        f'SELECT {fields} FROM "{MEASUREMENT}" WHERE time > {since_ns} ORDER BY time ASC LIMIT 50', DATABASE
    )
    for row in rows:
        values = "  ".join(
            f"{name}={row[name]:.2f}" for name in SHOWN_FIELDS if isinstance(row.get(name), int | float)
        )
        print(f"  stored {_fmt_time(row['time'])}  {GATEWAY}/{DEVICE}  {values}", flush=True)
        since_ns = max(since_ns, row["time"])
    return since_ns


def _print_summary(influx: InfluxdServer) -> None:
    count = influx.query(f'SELECT count(voltage_l1) FROM "{MEASUREMENT}"', DATABASE)
    latency = influx.query("SELECT mean(latency_ms), max(latency_ms), count(seq) FROM citynerve_ingest", DATABASE)
    rows = influx.query(
        f'SELECT * FROM "{MEASUREMENT}" GROUP BY * ORDER BY time DESC LIMIT 5', DATABASE
    )
    print("\n=== queried back from InfluxDB (database citynerve, measurement electricity), newest first ===")
    header = f"{'time':<14}{'gateway':<13}{'device':<12}{'model':<8}" + "".join(f"{f:>15}" for f in SHOWN_FIELDS)
    print(header)
    for row in rows:
        print(
            f"{_fmt_time(row['time']):<14}{row.get('gateway', ''):<13}{row.get('device', ''):<12}"
            f"{row.get('model', ''):<8}" + "".join(f"{row.get(f, float('nan')):>15.3f}" for f in SHOWN_FIELDS)
        )
    if count:
        print(f"readings stored: {count[0].get('count')}", end="")
    if latency and latency[0].get("count"):
        lat = latency[0]
        print(f"   messages: {lat['count']}   agent->collector latency mean {lat['mean']:.1f} ms, max {lat['max']:.1f} ms")
    else:
        print()
    print("=== (Ctrl-C to stop) ===\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=0, help="stop by itself after this many seconds")
    parser.add_argument("--summary-after", type=float, default=20, help="seconds before the table is printed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="citynerve-demo-"))
    started: list[object] = []
    code = 0
    try:
        print(f"citynerve demo in {work} (loopback only)", flush=True)
        print("  enrolling      device CA, collector CA, collector key, gateway gw-demo-01 (edge-agent enroll, "
              "edge-collector ca/keys/gateways)", flush=True)
        dep = enrolled.create(work / "deployment", [GATEWAY])
        broker = SecureBroker(work / "mosquitto", device_ca_dir=dep.ca_dir, collector_ca_dir=dep.collector_ca_dir,
                              server_ca=LabCA(work / "server-ca")).start()
        started.append(broker)
        print(f"  mosquitto      mqtts://127.0.0.1:{broker.port} gateways, :{broker.collector_port} collectors  "
              "(deploy/mosquitto: mutual TLS, per-gateway ACL)", flush=True)
        influx = InfluxdServer(work / "influxd").start()
        started.append(influx)
        influx.create_database(DATABASE)
        print(f"  influxd 1.x    {influx.url}  database {DATABASE}", flush=True)
        meter_port = free_port()
        meter = ServerProcess(
            "meter", [sys.executable, "-m", "labkit.meter_sim", "--port", str(meter_port), "--unit", "1"],
            work / "meter.log", ready=lambda: port_is_open(meter_port),
        ).start()
        started.append(meter)
        print(f"  SDM630 sim     modbus-tcp://127.0.0.1:{meter_port} unit 1", flush=True)
        agent_cfg, collector_cfg = write_configs(work, dep, broker, influx.url, meter_port)
        collector = stack.collector_process(collector_cfg).start()
        started.append(collector)
        print(f"  edge-collector running (log: {collector.log_path})", flush=True)
        agent = stack.agent_process(agent_cfg).start()
        started.append(agent)
        print(f"  edge-agent     {GATEWAY}, polling {DEVICE} every 2 s, payloads sealed end to end "
              f"(log: {agent.log_path})\n", flush=True)
        print("readings as InfluxDB stores them:", flush=True)

        t0 = time.monotonic()
        since = time.time_ns() - 10**9
        summary_done = False
        while True:
            time.sleep(1)
            since = _print_new_rows(influx, since)
            for proc in (collector, agent):
                if not proc.running:
                    print(f"{proc.name} exited unexpectedly:\n{proc.tail_log()}", file=sys.stderr)
                    return 1
            elapsed = time.monotonic() - t0
            if not summary_done and elapsed >= args.summary_after:
                _print_summary(influx)
                summary_done = True
            if args.duration and elapsed >= args.duration:
                break
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    except Exception as exc:  # the demo's own failure: say what, keep the logs
        print(f"demo failed: {exc}", file=sys.stderr)
        args.keep = True
        code = 1
    finally:
        for item in reversed(started):
            with contextlib.suppress(Exception):
                item.stop()  # type: ignore[attr-defined]
        if args.keep:
            print(f"logs and configs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        print("demo stopped; nothing left running.", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
