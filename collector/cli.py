"""edge-collector: run | check | quarantine | ca | keys | gateways | operators | audit | config | command | poll-now |
catalog | nats."""

from __future__ import annotations

import argparse
import asyncio
import sys

from wire.cli import add_log_options, add_version_option, fail, reports_missing_dependencies, run_until_signal
from wire.config import ConfigError
from wire.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `audit ... --log FILE` must not be taken for an abbreviation of --log-format/--log-level
    p = argparse.ArgumentParser(prog="edge-collector", description="citynerve central collector", allow_abbrev=False)
    add_log_options(p)
    add_version_option(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="subscribe, validate and write to InfluxDB until stopped")
    run.add_argument("config", metavar="FILE", help="collector.toml")
    check = sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("config", metavar="FILE")
    quarantine = sub.add_parser("quarantine", help="inspect rejected payloads")
    qsub = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")
    qlist = qsub.add_parser("list", help="newest first")
    qlist.add_argument("config", metavar="FILE")
    qlist.add_argument("--gateway")
    qlist.add_argument("--reason")
    qlist.add_argument("--limit", type=int, default=50)
    qshow = qsub.add_parser("show", help="one entry with a hex dump of its payload")
    qshow.add_argument("config", metavar="FILE")
    qshow.add_argument("id", type=int)
    qshow.add_argument("--raw", action="store_true", help="write the payload bytes to stdout")
    # ca / keys / gateways: the device CA, the collector's keys, the gateway registry (collector/pki.py)
    from collector import audit, natsauth, operators, pki

    pki.register_subcommands(sub)
    # operators: the operator CA and certificates (collector/operators.py); audit: the audit log (collector/audit.py)
    operators.register_subcommands(sub)
    audit.register_subcommands(sub)
    # config / command / poll-now: the operator's side of the control plane (collector/control_cli.py)
    from collector import control_cli

    control_cli.register_subcommands(sub)
    # catalog: the fleet's data catalogue (collector/catalog.py)
    from collector import catalog

    catalog.register_subcommands(sub)
    # nats: the clustered broker tier's users file, from the registry (collector/natsauth.py)
    natsauth.register_subcommands(sub)
    return p


@reports_missing_dependencies("edge-collector")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from collector import audit, catalog, control_cli, natsauth, operators, pki

    # ca / keys / gateways / operators need no collector.toml; audit reads it only for [control] audit_log;
    # config / command / poll-now / catalog read it with -c/--config FILE (default /etc/citynerve/collector.toml);
    # nats users reads [nats] and [security] of the file it is given
    for module in (pki, operators, audit, control_cli, catalog, natsauth):
        if (code := module.dispatch(args)) is not None:
            return code
    from collector import config as collector_config

    try:
        cfg = collector_config.load(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    setup_logging(args.log_format or cfg.log.format, args.log_level or cfg.log.level)
    if args.command == "check":
        print(describe(args.config, cfg))
        return 0
    if args.command == "quarantine":
        return _quarantine(args, cfg)

    from collector.app import Collector
    from collector.pki import PkiError
    from collector.registry import RegistryError

    try:
        collector = Collector(cfg, config_path=args.config, log_override=(args.log_format, args.log_level))
    except (PkiError, RegistryError) as exc:  # a key or registry file that cannot be used: say which
        return fail(f"{args.config}: security: {exc}")

    async def run(stop: asyncio.Event) -> None:
        await collector.run(stop)

    return run_until_signal(run, on_hangup=collector.request_reload)


def _quarantine(args: argparse.Namespace, cfg: object) -> int:
    import os

    from collector.quarantine import Quarantine, hexdump
    from wire.cli import iso_ns

    path = cfg.quarantine.path  # type: ignore[attr-defined]
    if not os.path.exists(path):
        return fail(f"{args.config}: quarantine.path: {path} does not exist (nothing rejected yet?)", 1)
    store = Quarantine(path)
    try:
        if args.action == "list":
            for e in store.list(args.limit, args.gateway, args.reason):
                print(f"{e.id:>6}  {iso_ns(e.received_ns)}  {e.gateway:<20} {e.reason:<18} {e.size:>7} B  {e.detail[:60]}")
            return 0
        entry = store.get(args.id)
        if entry is None:
            return fail(f"no quarantine entry {args.id} in {path}", 1)
        if args.raw:
            sys.stdout.buffer.write(entry.payload)
            return 0
        print(f"id {entry.id}  received {iso_ns(entry.received_ns)}\ngateway {entry.gateway}  topic {entry.topic}\n"
              f"reason {entry.reason}: {entry.detail}\nsize {entry.size} bytes"
              f"{' (first ' + str(len(entry.payload)) + ' kept)' if len(entry.payload) < entry.size else ''}\n")
        print(hexdump(entry.payload))
        return 0
    finally:
        store.close()


def describe(path: str, cfg: object) -> str:
    m, i, n = cfg.mqtt, cfg.influx, cfg.nats  # type: ignore[attr-defined]
    target = f"database {i.database}" if i.api == "v1" else f"org {i.org} bucket {i.bucket}"
    if n is not None:
        source = (f"  consume NATS {', '.join(n.servers)}: stream {n.stream} ({n.topic_prefix}/+/up|status|report, "
                  f"R{n.replicas}), durable consumer {n.consumer} shared by every collector, at most {n.max_inflight} "
                  f"in flight, ack wait {float(n.ack_wait):g}s")
    else:
        scheme = "mqtts" if m.tls else "mqtt"
        share = f" (shared group {m.shared_group})" if m.shared_group else ""
        source = (f"  subscribe {scheme}://{m.host}:{m.port} {m.gateway_mount}{m.topic_prefix}/+/up{share}, session "
                  f"expiry {float(m.session_expiry):g}s, receive maximum {m.receive_maximum}")
    return "\n".join([
        f"{path}: OK",
        source,
        f"  write InfluxDB {i.api} API {i.url} {target}, batches of {i.batch_size} or every "
        f"{float(i.flush_interval):g}s, gzip {'on' if i.gzip else 'off'}",
        f"  acknowledge stored messages to their gateways every {float(cfg.acks.interval):g}s on "  # type: ignore[attr-defined]
        f"{cfg.gateway_mount}{cfg.topic_prefix}/<gateway>/down/ack"  # type: ignore[attr-defined]
        + (f" (QoS {n.downlink_qos})" if n is not None else ""),
        f"  fleet inventory {cfg.inventory.path} (gateways list|show), written on change and every "  # type: ignore[attr-defined]
        f"{float(cfg.inventory.flush_interval):g}s",  # type: ignore[attr-defined]
        _limits_line(cfg),
        _metrics_line(cfg),
        *([_web_line(cfg.web)] if cfg.web is not None else []),  # type: ignore[attr-defined]
        *_control_lines(cfg),
    ])


def _metrics_line(cfg: object) -> str:
    metrics = cfg.metrics  # type: ignore[attr-defined]
    if metrics is None:
        return "  metrics off"
    return f"  metrics {metrics.url}{'' if metrics.per_gateway else ' (no per-gateway series)'}"


def _web_line(web: object) -> str:
    auth = [name for name, on in (("token", web.token is not None),  # type: ignore[attr-defined]
                                  ("client certificates", web.client_ca is not None)) if on]  # type: ignore[attr-defined]
    tiles = f"tiles {web.tiles}" if web.tiles else "a coordinate grid (no tile server)"  # type: ignore[attr-defined]
    return f"  fleet page at {web.url} ({' and '.join(auth)}), map on {tiles}"  # type: ignore[attr-defined]


def _control_lines(cfg: object) -> list[str]:
    c = cfg.control  # type: ignore[attr-defined]
    if c is None:
        return ["  control: off (no [control] section)"]
    topics = f"{cfg.gateway_mount}{cfg.topic_prefix}"  # type: ignore[attr-defined]
    return [f"  control: reports on {topics}/+/report, documents to "
            f"{topics}/<gateway>/down/control (re-sent every {float(c.resend_interval):g}s); "
            f"store {c.store}, audit log {c.audit_log}, revocation list {c.crl}"]


def _limits_line(cfg: object) -> str:
    lim, schema = cfg.limits, cfg.schema  # type: ignore[attr-defined]
    declared = sum(len(fields) for fields in schema.declared().values())
    return (f"  per gateway: {lim.messages_per_second:g} msg/s (burst {lim.messages_burst:g}), "
            f"{lim.gateway_messages} waiting; per {float(lim.window):g}s at most {lim.new_series} new series, "
            f"{lim.new_devices} new devices, {lim.new_fields} new fields; {declared} field type(s) declared")


if __name__ == "__main__":
    sys.exit(main())
