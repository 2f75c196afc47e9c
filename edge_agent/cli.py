"""edge-agent: run | check | poll-once | profiles."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

from wire.cli import EXIT_USAGE, add_log_options, fail, iso_ns, run_until_signal
from wire.config import ConfigError
from wire.logs import setup_logging

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="citynerve edge gateway agent")
    add_log_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="poll devices and publish readings until stopped")
    run.add_argument("config", metavar="FILE", help="agent.toml")
    check = sub.add_parser("check", help="validate a configuration file (and its profiles) and exit")
    check.add_argument("config", metavar="FILE")
    once = sub.add_parser("poll-once", help="poll every device once, print readings as JSON lines, publish nothing")
    once.add_argument("config", metavar="FILE")
    sub.add_parser("profiles", help="list the bundled firmware profiles")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        return fail(str(exc))
    except BrokenPipeError:
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    from edge_agent import config as agent_config

    if args.command == "profiles":
        from edge_agent.profiles import available_profiles, load_profile

        for name in available_profiles():
            profile = load_profile(name)
            print(f"{name:<28} {profile.vendor} {profile.model} ({len(profile.points)} points)")
        return 0

    cfg = agent_config.load(args.config)
    setup_logging(args.log_format or cfg.log.format, args.log_level or cfg.log.level)

    if args.command == "check":
        print(describe(args.config, cfg))
        return 0
    if args.command == "poll-once":
        return _poll_once(cfg)

    from edge_agent.app import Agent, state_dir_problem

    problem = state_dir_problem(cfg.gateway.state_dir)
    if problem:
        return fail(f"{args.config}: gateway.state_dir: {problem}")

    async def run(stop: asyncio.Event) -> None:
        await Agent(cfg).run(stop)

    return run_until_signal(run)


def describe(path: str, cfg: AgentConfig) -> str:
    lines = [f"{path}: OK", f"  gateway {cfg.gateway.id}, state in {cfg.gateway.state_dir}"]
    m = cfg.mqtt
    scheme = "mqtts" if m.tls else "mqtt"
    lines.append(f"  uplink {scheme}://{m.host}:{m.port} topic {m.topic_prefix}/{cfg.gateway.id}/up, "
                 f"MQTT {m.protocol}, client cert {'yes' if m.cert_file else 'no'}")
    for d in cfg.devices:
        kind = type(d).__struct_config__.tag
        lines.append(f"  device {d.id}: {kind} {d.host}:{d.port} unit {d.unit}, profile {d.profile}, "
                     f"every {float(d.interval):g}s")
    return "\n".join(lines)


def _poll_once(cfg: AgentConfig) -> int:
    from edge_agent.app import poll_once

    failed = 0
    for device_id, outcome in asyncio.run(poll_once(cfg)):
        if isinstance(outcome, Exception):
            failed += 1
            print(f"error: device {device_id}: {getattr(outcome, 'message', outcome)}", file=sys.stderr)
            continue
        for r in outcome:
            print(json.dumps({
                "device": r.device, "measurement": r.measurement, "time": iso_ns(r.time_ns),
                "time_ns": r.time_ns, "tags": r.tags, "fields": r.fields,
            }), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["EXIT_USAGE", "main"]
