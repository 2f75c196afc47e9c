"""edge-collector: run | check."""

from __future__ import annotations

import argparse
import asyncio
import sys

from wire.cli import add_log_options, fail, run_until_signal
from wire.config import ConfigError
from wire.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-collector", description="citynerve central collector")
    add_log_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="subscribe, validate and write to InfluxDB until stopped")
    run.add_argument("config", metavar="FILE", help="collector.toml")
    check = sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("config", metavar="FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from collector import config as collector_config

    try:
        cfg = collector_config.load(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    setup_logging(args.log_format or cfg.log.format, args.log_level or cfg.log.level)
    if args.command == "check":
        print(describe(args.config, cfg))
        return 0

    from collector.app import Collector

    async def run(stop: asyncio.Event) -> None:
        await Collector(cfg).run(stop)

    return run_until_signal(run)


def describe(path: str, cfg: object) -> str:
    m, i = cfg.mqtt, cfg.influx  # type: ignore[attr-defined]
    scheme = "mqtts" if m.tls else "mqtt"
    share = f" (shared group {m.shared_group})" if m.shared_group else ""
    target = f"database {i.database}" if i.api == "v1" else f"org {i.org} bucket {i.bucket}"
    return "\n".join([
        f"{path}: OK",
        f"  subscribe {scheme}://{m.host}:{m.port} {m.topic_prefix}/+/up{share}, session expiry "
        f"{float(m.session_expiry):g}s, receive maximum {m.receive_maximum}",
        f"  write InfluxDB {i.api} API {i.url} {target}, batches of {i.batch_size} or every "
        f"{float(i.flush_interval):g}s, gzip {'on' if i.gzip else 'off'}",
    ])


if __name__ == "__main__":
    sys.exit(main())
