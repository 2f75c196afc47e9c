"""edge-agent: run | check | catalog | poll-once | outbox | config | profiles | read | scan | decode | enroll."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING

from wire.cli import (
    EXIT_USAGE,
    add_catalog_format,
    add_log_options,
    add_version_option,
    fail,
    iso_ns,
    reports_missing_dependencies,
    run_until_signal,
)
from wire.config import ConfigError
from wire.logs import setup_logging

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="citynerve edge gateway agent")
    add_log_options(p)
    add_version_option(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="poll devices and publish readings until stopped")
    run.add_argument("config", metavar="FILE", help="agent.toml")
    check = sub.add_parser("check", help="validate a configuration file (and its profiles) and exit")
    check.add_argument("config", metavar="FILE")
    once = sub.add_parser("poll-once", help="poll every device once, print readings as JSON lines, publish nothing")
    once.add_argument("config", metavar="FILE")
    sub.add_parser("profiles", help="list the bundled firmware profiles")
    cat = sub.add_parser("catalog", help="the data catalogue of this gateway: every device, measurement, field, unit, "
                                         "type and description, from the configuration (docs/catalog.md)")
    cat.add_argument("config", metavar="FILE")
    add_catalog_format(cat)
    outbox = sub.add_parser("outbox", help="what the durable outbox holds: messages not yet acknowledged as stored")
    outbox.add_argument("config", metavar="FILE")
    conf = sub.add_parser("config", help="the remote configuration that runs instead of the local file "
                                         "(docs/control.md \"Remote configuration\")")
    conf_sub = conf.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    conf_status = conf_sub.add_parser("status", help="which configuration the agent runs at its next start")
    conf_status.add_argument("config", metavar="FILE", help="the local agent.toml")
    conf_reset = conf_sub.add_parser("reset", help="forget the pushed configuration: the local file runs from the "
                                                   "next start or reload (SIGHUP)")
    conf_reset.add_argument("config", metavar="FILE", help="the local agent.toml")
    from edge_agent import enroll  # enroll: keys and certificate request (edge_agent/enroll.py)

    enroll.register_subcommands(sub)

    read = sub.add_parser("read", help="read a device once and print named values (or raw registers)")
    _line_options(read)
    read.add_argument("--unit", type=int, required=True, help="Modbus unit id")
    what = read.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", help="decode with this firmware profile (name or file)")
    what.add_argument("--table", choices=["input", "holding", "coil", "discrete"], help="raw read of this table")
    read.add_argument("--address", type=int, default=0, help="raw read: 0-based start address")
    read.add_argument("--count", type=int, default=2, help="raw read: registers (or bits)")
    read.add_argument("--json", action="store_true", help="one JSON object per point")

    decode = sub.add_parser("decode", help="decode a capture file of a serial protocol: readings to stdout, "
                                           "rejected frames (with byte offsets) to stderr, as JSON lines")
    decode.add_argument("protocol", help="dsmr, iec62056-21, nmea, sds011, pmsx003, mhz19b, ascii")
    decode.add_argument("file", help="bytes as received from the port")
    decode.add_argument("--config", help="ascii: the agent.toml holding the device's [devices.ascii] settings")
    decode.add_argument("--device", help="ascii: the id of that device")

    scan = sub.add_parser("scan", help="find what answers on a bus: Modbus units (and which profile fits), "
                                       "DL/T 645, CJ/T 188 or M-Bus meters")
    _line_options(scan, several=True)
    scan.add_argument("--protocol", choices=["modbus", "dlt645", "cjt188", "mbus"], default="modbus",
                      help="what to look for (default modbus); meters: one line setting, 2400 8E1 by default")
    scan.add_argument("--units", default="1-247", help='modbus: unit ids to try, e.g. "1-247" or "1,2,10-20"')
    scan.add_argument("--profile", action="append", help="modbus: only try these profiles (repeatable)")
    scan.add_argument("--addresses", help='dlt645: 12-digit addresses to probe, comma-separated; mbus: primary '
                                          'addresses to try (default "0-250")')
    scan.add_argument("--config", metavar="FILE", help="dlt645: also probe the addresses of the DL/T 645 meters "
                                                       "this agent.toml configures on --target")
    scan.add_argument("--secondary", action="store_true",
                      help="mbus: search secondary addresses by wildcard narrowing (EN 13757-3) instead")
    scan.add_argument("--max-probes", type=int, default=400, help="mbus --secondary: at most this many selections")
    scan.add_argument("--meter-type", action="append",
                      help="cjt188: meter types to try (cold_water, hot_water, drinking_water, reclaimed_water, heat, "
                           "cooling, gas; default all)")
    return p


def _line_options(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("--target", required=True,
                   help="tcp://HOST:PORT, rtu-over-tcp://HOST:PORT or a serial port such as /dev/ttyUSB0")
    if several:
        p.add_argument("--baud", help="serial baud rate(s) to try, comma-separated (default 9600; meters 2400)")
        p.add_argument("--parity", help="serial parity/parities to try: N, E, O, comma-separated (default N; "
                                        "meters E)")
    else:
        p.add_argument("--baud", type=int, default=9600)
        p.add_argument("--parity", choices=["N", "E", "O"], default="N")
    p.add_argument("--data-bits", type=int, choices=[7, 8], default=8)
    p.add_argument("--stop-bits", type=int, choices=[1, 2], default=1)
    p.add_argument("--framing", choices=["rtu", "ascii"], default="rtu")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for an answer")


@reports_missing_dependencies("edge-agent")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from edge_agent import enroll

    if (code := enroll.dispatch(args)) is not None:
        return code
    try:
        return _dispatch(args)
    except ConfigError as exc:
        return fail(str(exc))


def _dispatch(args: argparse.Namespace) -> int:
    from edge_agent import config as agent_config

    if args.command == "profiles":
        from edge_agent.profiles import available_profiles, load_profile

        for name in available_profiles():
            profile = load_profile(name)
            print(f"{name:<28} {profile.vendor} {profile.model} ({len(profile.points)} points)")
        return 0

    if args.command in ("read", "scan"):
        return _technician(args)
    if args.command == "decode":
        return _decode(args)

    if args.command == "config":
        from edge_agent import remote_config

        setup_logging(args.log_format or "text", args.log_level or "warning")
        if args.config_command == "reset":
            print(remote_config.reset(args.config))
        else:
            print(remote_config.status(args.config))
        return 0
    if args.command == "run":
        return _run(args)

    cfg = agent_config.load(args.config)
    setup_logging(args.log_format or cfg.log.format, args.log_level or cfg.log.level)

    if args.command == "check":
        print(describe(args.config, cfg))
        return 0
    if args.command == "catalog":
        from edge_agent.catalog import rows
        from wire.catalog import render

        sys.stdout.write(render(rows(cfg), args.format))
        return 0
    if args.command == "poll-once":
        return _poll_once(cfg)
    assert args.command == "outbox", args.command
    return _outbox(cfg)


def _run(args: argparse.Namespace) -> int:
    from edge_agent import remote_config
    from edge_agent.app import Agent, state_dir_problem

    local = remote_config.local_running(args.config)  # the local file must pass the check, whatever runs
    setup_logging(args.log_format or local.cfg.log.format, args.log_level or local.cfg.log.level)
    problem = state_dir_problem(local.cfg.gateway.state_dir)
    if problem:
        return fail(f"{args.config}: gateway.state_dir: {problem}")
    # The last confirmed remote configuration runs instead of the local file, if there is one.
    start = remote_config.what_to_run(args.config, local)
    cfg = start.running.cfg
    setup_logging(args.log_format or cfg.log.format, args.log_level or cfg.log.level)
    agent = Agent(cfg)
    agent.on_log_settings = lambda section: setup_logging(args.log_format or section.format,
                                                          args.log_level or section.level)
    control = remote_config.RemoteConfig(agent, args.config, start)
    return run_until_signal(agent.run, on_hangup=control.reload)


def _outbox(cfg: AgentConfig) -> int:
    import sqlite3
    import time

    from edge_agent.outbox import summary

    path = cfg.outbox_path
    if not path.exists():
        print(f"{path}: no outbox yet (the agent has not run with this state directory)")
        return 0
    try:
        info = summary(path)
    except sqlite3.Error as exc:
        return fail(f"{path}: unreadable outbox ({exc}); the agent moves it aside at its next start")
    oldest = info["oldest_ns"]
    age = f", oldest from {iso_ns(oldest)} ({(time.time_ns() - oldest) / 1e9:.0f} s ago)" if oldest else ""
    print(f"{path}: {info['messages']} message(s) not yet acknowledged, {info['readings']} reading(s), "
          f"{info['bytes']} bytes{age}")
    if info["messages"]:
        print(f"  sequence numbers {info['oldest_seq']} .. {info['newest_seq']}")
    print(f"  the next message gets sequence number {info['next_seq']}")
    if info["held_readings"]:
        print(f"  {info['held_readings']} reading(s) held until the gateway's clock is synchronised "
              f"(docs/operations.md \"Time on gateways without an RTC\")")
    print(f"  dropped by the outbox bounds since it was created: {info['dropped_messages']} message(s), "
          f"{info['dropped_readings']} reading(s)")
    return 0


def _decode(args: argparse.Namespace) -> int:
    from edge_agent.serial.base import Rejected
    from edge_agent.serial.protocols import protocol_info

    try:
        info = protocol_info(args.protocol)
    except ValueError as exc:
        return fail(str(exc))
    device = None
    if args.protocol == "ascii":
        if not (args.config and args.device):
            return fail("decode ascii needs --config FILE --device ID (the regex and field settings)")
        from edge_agent import config as agent_config

        cfg = agent_config.load(args.config)
        device = next((d for d in cfg.serial_devices if d.id == args.device), None)
        if device is None:
            return fail(f"{args.config}: no serial device with id {args.device!r}")
    try:
        data = open(args.file, "rb").read()  # noqa: SIM115 - a capture is small; read whole
    except OSError as exc:
        return fail(f"{args.file}: {exc.strerror or exc}")
    decoder = info.make_decoder(device)
    events = decoder.feed(data) + decoder.flush()
    samples = rejected = 0
    for event in events:
        if isinstance(event, Rejected):
            rejected += 1
            print(json.dumps({"offset": event.offset, "length": event.length, "reason": event.reason,
                              "detail": event.detail}), file=sys.stderr)
            continue
        samples += 1
        line = {"measurement": event.measurement or info.measurement,
                "time": iso_ns(event.time_ns) if event.time_ns else None, "time_ns": event.time_ns,
                "fields": event.fields, "units": event.units, "tags": event.tags}
        if event.quality:
            line["quality"] = event.quality
        print(json.dumps(line, default=str))
    return 0


def _technician(args: argparse.Namespace) -> int:
    from edge_agent import technician as tech

    setup_logging(args.log_format or "text", args.log_level or "warning")
    common = {"data_bits": args.data_bits, "stop_bits": args.stop_bits, "framing": args.framing}
    try:
        if args.command == "read":
            line = tech.LineSettings(args.target, baud=args.baud, parity=args.parity,
                                     timeout=args.timeout or 1.0, **common)
            line.bus()  # validates the target and settings
            if args.profile:
                tech.print_profile_rows(asyncio.run(tech.read_profile(line, args.unit, args.profile)), args.json)
            else:
                registers = asyncio.run(tech.read_raw(line, args.unit, args.table, args.address, args.count))
                tech.print_raw(args.table, args.address, registers, args.json)
            return 0
        if args.protocol != "modbus":
            return _scan_meters(args, tech, common)
        units = tech.parse_units(args.units)
        bauds = [int(b) for b in (args.baud or "9600").split(",")]
        parities = [p.strip().upper() for p in (args.parity or "N").split(",")]
        lines = tech.line_settings(args.target, bauds, parities, timeout=args.timeout or 0.3, **common)
        for line in lines:
            line.bus()
        progress = tech.Progress(len(lines) * len(units))
        try:
            found, notes = asyncio.run(tech.scan(lines, units, args.profile, progress))
        finally:
            progress.close()
    except tech.TechnicianError as exc:
        return fail(str(exc), 1)
    except ValueError as exc:  # a bad --target, --baud, --units ...
        return fail(str(exc))
    for item in found:
        fits = ", ".join(item.profiles) if item.profiles else "no bundled profile reads cleanly"
        note = f"  [{item.note}]" if item.note else ""
        print(f"unit {item.unit:>3}  {item.line.describe()}  profiles: {fits}{note}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not found:
        print(f"no unit answered on {args.target}", file=sys.stderr)
        return 1
    return 0


def _scan_meters(args: argparse.Namespace, tech, common: dict) -> int:  # type: ignore[no-untyped-def]
    """`scan --protocol dlt645|cjt188|mbus`: one line setting, bounded probes, what was tried on stderr."""
    from edge_agent.cjt188.frames import TYPE_NAMES

    protocol = args.protocol
    try:
        if "," in (args.baud or "") or "," in (args.parity or ""):
            raise ValueError(f"--protocol {protocol} scans one line setting: give one --baud and one --parity")
        line = tech.LineSettings(args.target, baud=int(args.baud or 2400), parity=(args.parity or "E").upper(),
                                 timeout=args.timeout or 1.0, **common)
        line.bus()  # validates the target and settings
        addresses: list[str] = []
        if args.addresses and protocol == "dlt645":
            addresses = [a.strip() for a in args.addresses.split(",") if a.strip()]
            for a in addresses:
                if not (a.isdigit() and len(a) == 12):
                    raise ValueError(f'--addresses: "{a}" is not a DL/T 645 address (12 digits, e.g. 000102030425)')
        elif args.addresses and protocol == "mbus":
            addresses = [str(u) for u in tech.parse_units(args.addresses)]
            if int(addresses[-1]) > 250:
                raise ValueError("--addresses: M-Bus primary addresses are 0..250")
        elif args.addresses:
            raise ValueError("--addresses: for dlt645 and mbus scans")
        if args.config:
            if protocol != "dlt645":
                raise ValueError("--config: for dlt645 scans (the configured addresses are probed)")
            from edge_agent import config as agent_config
            from edge_agent.meters.config import Dlt645Device

            cfg = agent_config.load(args.config)
            targets = {b.id: b.target for b in cfg.buses}
            addresses += [d.address for d in cfg.meter_devices if isinstance(d, Dlt645Device)
                          and targets.get(d.bus) == args.target and d.address not in addresses]
        types = None
        if args.meter_type:
            if protocol != "cjt188":
                raise ValueError("--meter-type: for cjt188 scans")
            unknown = [t for t in args.meter_type if t not in TYPE_NAMES]
            if unknown:
                raise ValueError(f"--meter-type {unknown[0]}: expected one of {', '.join(TYPE_NAMES)}")
            types = [TYPE_NAMES[t] for t in args.meter_type]
        if args.secondary and protocol != "mbus":
            raise ValueError("--secondary: for mbus scans")
        progress = tech.Progress(args.max_probes if args.secondary else
                                 (251 if protocol == "mbus" and not addresses else len(addresses) * 2 + 2))
        try:
            result = asyncio.run(tech.scan_meters(protocol, line, addresses=addresses, meter_types=types,
                                                  secondary=args.secondary, max_probes=args.max_probes,
                                                  answer_s=args.timeout, progress=progress))
        finally:
            progress.close()
    except tech.TechnicianError as exc:
        return fail(str(exc), 1)
    except ValueError as exc:
        return fail(str(exc))
    for item in result.found:
        note = f"  [{item.note}]" if item.note else ""
        print(f"{item.protocol} {item.address}  {item.line.describe(protocol)}{note}")
    for tried in result.tried:
        print(f"tried: {tried}", file=sys.stderr)
    print(f"scan: {result.requests} request(s) in {result.seconds:.1f} s", file=sys.stderr)
    if not result.found:
        print(f"no {protocol} meter answered on {args.target}", file=sys.stderr)
        return 1
    return 0


def describe(path: str, cfg: AgentConfig) -> str:
    lines = [f"{path}: OK", f"  gateway {cfg.gateway.id}, state in {cfg.gateway.state_dir}"]
    m = cfg.mqtt
    scheme = "mqtts" if m.tls else "mqtt"
    lines.append(f"  uplink {scheme}://{m.host}:{m.port} topic {m.topic_prefix}/{cfg.gateway.id}/up, "
                 f"MQTT {m.protocol}, client cert {'yes' if m.cert_file else 'no'}")
    u, o = cfg.uplink, cfg.outbox
    lines.append(f"  outbox {cfg.outbox_path}: at most {int(o.max_size) / 1e6:g} MB or {float(o.max_age) / 86400:g} days; "
                 f"cycle {float(u.publish_interval):g}s, re-send after {float(u.ack_timeout):g}s "
                 f"(up to {float(u.ack_timeout_max):g}s), {u.max_unacked_messages} messages in flight")
    lines.append(f"  metrics {cfg.metrics.url}" if cfg.metrics else "  metrics off")
    for d in cfg.devices:
        kind = type(d).__struct_config__.tag
        if kind == "serial":
            from edge_agent.serial.protocols import protocol_info

            baud, bits, parity, stop = protocol_info(d.protocol).line_settings(d)
            lines.append(f"  device {d.id}: serial {d.protocol} on {d.port} {baud} {bits}{parity}{stop}")
        elif kind in ("dlt645", "cjt188", "mbus"):  # their decoders emit the vocabulary (tests/test_vocabulary.py)
            from edge_agent.meters.config import describe as describe_meter

            lines.append(f"  device {d.id}: {kind} on {cfg.bus_of(d).describe_line()}, {describe_meter(d)}")
        else:
            writable = f"; operators may write {', '.join(d.writable)}" if d.writable else ""
            lines.append(f"  device {d.id}: {kind} on {cfg.bus_of(d).target} unit {d.unit}, profile {d.profile}, "
                         f"every {float(d.interval):g}s{writable}")
        note = _vocabulary_note(d)
        if note:
            lines.append(note)
    sec = cfg.security
    if sec is not None and sec.operator_ca:
        lines.append(f"  commands: signed by operators of the CA in {sec.operator_ca} (docs/control.md)")
    else:
        lines.append("  commands: none accepted (no [security] operator_ca)")
    return "\n".join(lines)


def _vocabulary_note(device: object) -> str | None:
    """One line naming the fields of a device that are not the shared vocabulary's (docs/vocabulary.md), or None.
    Not an error: custom points may have names of their own. Known statically for Modbus profiles and ASCII lines;
    the other decoders emit the vocabulary by construction (tests/test_vocabulary.py), SunSpec devices name their
    fields at discovery."""
    from wire import vocabulary

    fields: dict[str, dict[str, str | None]] = {}
    if getattr(device, "protocol", None) == "ascii" and getattr(device, "ascii", None) is not None:
        from edge_agent.serial.ascii_line import AsciiLineDecoder
        from edge_agent.serial.protocols import protocol_info

        units = AsciiLineDecoder(device.ascii).field_units()  # type: ignore[attr-defined]
        measurement = device.measurement or protocol_info("ascii").measurement  # type: ignore[attr-defined]
        fields[measurement] = {name: unit or None for name, unit in units.items()}  # "": no unit given
    elif isinstance(getattr(device, "profile", None), str) and device.profile != "sunspec":  # type: ignore[attr-defined]
        from edge_agent.profiles import load_profile

        fields = load_profile(device.profile).field_units(device.measurement)  # type: ignore[attr-defined]
    found = [p for measurement, names in fields.items() for p in vocabulary.problems(measurement, names)]
    if not found:
        return None
    return f"    names outside the vocabulary (docs/vocabulary.md): {', '.join(found)}"


def _poll_once(cfg: AgentConfig) -> int:
    from edge_agent.app import poll_once

    logging.getLogger("citynerve.modbus").setLevel(logging.ERROR)  # failures are reported below, once
    failed = 0
    for outcome in asyncio.run(poll_once(cfg)):
        if outcome.error:
            failed += 1
            print(f"error: device {outcome.device.id}: {outcome.error}", file=sys.stderr)
        for r in outcome.readings:
            line = {"device": r.device, "measurement": r.measurement, "time": iso_ns(r.time_ns),
                    "time_ns": r.time_ns, "tags": r.tags, "fields": r.fields}
            if r.quality:
                line["quality"] = r.quality
            print(json.dumps(line), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["EXIT_USAGE", "main"]
