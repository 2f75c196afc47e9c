"""`edge-collector gateways list | show`: the fleet at a glance, from the gateway registry (who may send:
collector/registry.py) and the fleet inventory (what each gateway last said: collector/inventory.py).

    edge-collector gateways list [-c collector.toml] [--registry FILE] [--json]
    edge-collector gateways show GW [-c collector.toml] [--registry FILE] [--json]

The collector.toml names both files ([security] registry, [inventory] path); --registry overrides the first.
Without a collector.toml (none at the default path and no -c), --registry alone lists the registry as before:
id, status, identity key, when added or revoked.

A gateway's state: "revoked" (the registry says so, whatever it last said), "online" / "offline" (its last
status or last will), "unknown" (seen only through its uplinks so far), "never seen" (registered, nothing
received yet). The rows and details are pure functions of the two files' contents and the time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import msgspec

from collector.inventory import GatewayRecord, InventoryError, read_inventory
from collector.registry import GatewayEntry, GatewayRegistry, RegistryError

DEFAULT_CONFIG = "/etc/citynerve/collector.toml"
NEVER_SEEN = "never seen"
REVOKED = "revoked"


class FleetError(Exception):
    """A file the command needs cannot be used: one line for wire.cli.fail()."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"collector.toml: where the registry and the inventory are (default {DEFAULT_CONFIG})")
    parser.add_argument("--registry", metavar="FILE", help="the gateway registry (default: [security] registry)")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")


def _sources(args: argparse.Namespace) -> tuple[dict[str, GatewayEntry], dict[str, GatewayRecord] | None, list[str]]:
    """(registry entries, inventory records or None without a collector.toml, notes for stderr)."""
    from collector import config as collector_config
    from wire.config import ConfigError

    notes: list[str] = []
    registry_path = args.registry
    inventory_path = None
    config = args.config or DEFAULT_CONFIG
    if args.config or Path(config).exists() or not registry_path:
        try:
            cfg = collector_config.load(config)
        except ConfigError as exc:
            hint = "" if args.config or registry_path else " (give -c FILE, or --registry FILE for the registry alone)"
            raise FleetError(f"{exc}{hint}") from None
        inventory_path = cfg.inventory.path
        if registry_path is None and cfg.security is not None:
            registry_path = cfg.security.registry
    entries: dict[str, GatewayEntry] = {}
    if registry_path is not None:
        try:
            with GatewayRegistry(registry_path) as registry:
                entries = {e.gateway_id: e for e in registry.list()}
        except RegistryError as exc:
            raise FleetError(str(exc)) from None
    if inventory_path is None:
        return entries, None, notes
    if not Path(inventory_path).exists():
        notes.append(f"note: no fleet inventory at {inventory_path} yet (has the collector run?)")
    try:
        records = read_inventory(inventory_path)
    except InventoryError as exc:
        raise FleetError(str(exc)) from None
    return entries, records, notes


# --- pure views ------------------------------------------------------------------------------------------------


def state_of(entry: GatewayEntry | None, record: GatewayRecord | None) -> str:
    if entry is not None and entry.status == "revoked":
        return REVOKED
    if record is None:
        return NEVER_SEEN
    return record.state


def fleet_rows(entries: dict[str, GatewayEntry], records: dict[str, GatewayRecord], now_ns: int) -> list[dict[str, Any]]:
    """One row per gateway in the registry or the inventory, sorted by id."""
    rows = []
    for gateway in sorted(entries.keys() | records.keys()):
        entry, record = entries.get(gateway), records.get(gateway)
        row: dict[str, Any] = {"gateway": gateway, "state": state_of(entry, record),
                               "registry": entry.status if entry is not None else None}
        if record is not None:
            devices = len(record.devices)
            failing = record.failing_devices()
            row |= {
                "last_seen_ns": record.last_seen_ns,
                "last_seen_age_s": _age(record.last_seen_ns, now_ns),
                "backlog_messages": record.backlog_messages,
                "devices": devices, "devices_ok": devices - failing, "devices_failing": failing,
                "version": record.version,
                "config_version": record.config_version, "config_sha256": record.config_sha256,
                "location": msgspec.to_builtins(record.location) if record.location is not None else None,
                "location_source": record.location_source,
            }
        rows.append(row)
    return rows


def gateway_detail(gateway: str, entry: GatewayEntry | None, record: GatewayRecord | None,
                   now_ns: int) -> dict[str, Any]:
    """Everything about one gateway: its registry entry and its inventory record (devices with their
    identification and health)."""
    detail: dict[str, Any] = {"gateway": gateway, "state": state_of(entry, record)}
    if entry is not None:
        detail["registry"] = {"status": entry.status, "identity_key": entry.public_text, "added_at": entry.added_at,
                              "revoked_at": entry.revoked_at}
    if record is not None:
        detail |= msgspec.to_builtins(record)
        detail["state"] = state_of(entry, record)  # the record's own "state" field must not hide "revoked"
        detail["last_seen_age_s"] = _age(record.last_seen_ns, now_ns)
        detail["devices_failing"] = record.failing_devices()
    return detail


def _age(time_ns: int | None, now_ns: int) -> float | None:
    return None if time_ns is None else round(max(0, now_ns - time_ns) / 1e9, 1)


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _config(version: int | None, sha256: str | None) -> str:
    if version is None:
        return "-"
    name = "local" if version == 0 else f"v{version}"
    return f"{name} {sha256[:8]}" if sha256 else name


def _location(location: dict[str, Any] | None, source: str | None) -> str:
    if not location:
        return "-"
    return f"{location['lat']:.5f},{location['lon']:.5f}" + (f" ({source})" if source else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("GATEWAY", "STATE", "LAST SEEN", "BACKLOG", "DEVICES", "AGENT", "CONFIG", "LOCATION")
    lines = [header]
    for row in rows:
        devices = "-"
        if "devices" in row:
            devices = f"{row['devices_ok']} ok" + (f", {row['devices_failing']} failing" if row["devices_failing"] else "")
        backlog = row.get("backlog_messages")
        lines.append((row["gateway"], row["state"], age(row.get("last_seen_age_s")),
                      "-" if backlog is None else str(backlog), devices, row.get("version") or "-",
                      _config(row.get("config_version"), row.get("config_sha256")),
                      _location(row.get("location"), row.get("location_source"))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _when(ns: int | None) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_detail(detail: dict[str, Any]) -> str:
    out = [f"gateway {detail['gateway']}: {detail['state']}"]
    reg = detail.get("registry")
    if reg:
        out.append(f"  registry   {reg['status']}, added {reg['added_at']}"
                   + (f", revoked {reg['revoked_at']}" if reg.get("revoked_at") else "") + f", {reg['identity_key']}")
    if "first_seen_ns" not in detail:
        return "\n".join(out)
    out += [
        f"  last seen  {age(detail['last_seen_age_s'])} ({_when(detail.get('last_seen_ns'))}); state since "
        f"{_when(detail.get('state_since_ns'))}; last uplink {_when(detail.get('last_uplink_ns'))}",
        f"  agent      {detail.get('version') or '-'} (started {_when(detail.get('since_ns'))}), MQTT "
        f"{detail.get('mqtt') or '-'}",
        f"  config     {_config(detail.get('config_version'), detail.get('config_sha256'))}"
        + (f" (sha256 {detail['config_sha256']})" if detail.get("config_sha256") else ""),
        f"  location   {_location(detail.get('location'), detail.get('location_source'))}"
        + (f", alt {detail['location']['alt']:g} m" if (detail.get("location") or {}).get("alt") is not None else ""),
        f"  backlog    {detail.get('backlog_messages', '-')} message(s), {detail.get('backlog_readings', '-')} "
        f"reading(s), oldest {_when(detail.get('backlog_oldest_ns'))}; last ack {_when(detail.get('last_ack_ns'))}; "
        f"dropped {detail.get('dropped_readings', '-')}",
        f"  devices    {len(detail.get('devices', {}))}, {detail['devices_failing']} failing",
    ]
    for device, rec in sorted(detail.get("devices", {}).items()):
        info, health = rec.get("info") or {}, rec.get("health") or {}
        where = " ".join(x for x in (info.get("kind"), info.get("bus"),
                                     f"unit {info['unit']}" if info.get("unit") is not None else "",
                                     f"address {info['address']}" if info.get("address") else "",
                                     info.get("protocol") if info.get("protocol") != info.get("kind") else "") if x)
        flag = "FAILING" if health.get("failing") else "ok"
        out.append(f"    {device}: {flag}; {where or '-'}")
        what = ", ".join(f"{k} {info[k]}" for k in ("profile", "model", "vendor", "serial", "revision") if info.get(k))
        if what:
            out.append(f"      {what}")
        ident = info.get("modbus_id")
        if ident:
            objects = ", ".join(f"{k} {v!r}" for k, v in ident.items() if k not in ("state", "conformity", "error"))
            conformity = f" conformity {ident['conformity']:#04x}" if ident.get("conformity") is not None else ""
            out.append(f"      Modbus identification (FC 43/14): {ident['state']}{conformity}"
                       + (f": {objects}" if objects else "") + (f" ({ident['error']})" if ident.get("error") else ""))
        if health:
            out.append(f"      polls {health.get('polls', '-')}, errors {health.get('errors', '-')}"
                       + (f", last error: {health['last_error']}" if health.get("last_error") else ""))
    return "\n".join(out)


# --- the commands ------------------------------------------------------------------------------------------------


def registry_rows(entries: dict[str, GatewayEntry]) -> list[dict[str, Any]]:
    """The registry alone (no collector.toml): who may send, with which identity key."""
    return [{"gateway": e.gateway_id, "registry": e.status, "identity_key": e.public_text, "added_at": e.added_at,
             "revoked_at": e.revoked_at} for e in sorted(entries.values(), key=lambda e: e.gateway_id)]


def format_registry(rows: list[dict[str, Any]]) -> str:
    return "\n".join(f"{r['gateway']:<24} {r['registry']:<8} {r['identity_key']}  "
                     + (f"revoked {r['revoked_at']}" if r["revoked_at"] else f"added {r['added_at']}") for r in rows)


def list_command(args: argparse.Namespace) -> int:
    import sys

    entries, records, notes = _sources(args)
    if records is None:
        registry = registry_rows(entries)
        print(json.dumps(registry, indent=2) if args.json else format_registry(registry))
        return 0
    rows = fleet_rows(entries, records, time.time_ns())
    for note in notes:
        print(note, file=sys.stderr)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def show_command(args: argparse.Namespace) -> int:
    import sys

    entries, found, notes = _sources(args)
    records = found or {}
    gateway = args.gateway_id
    if gateway not in entries and gateway not in records:
        raise FleetError(f"gateway {gateway!r} is neither registered nor in the fleet inventory")
    detail = gateway_detail(gateway, entries.get(gateway), records.get(gateway), time.time_ns())
    for note in notes:
        print(note, file=sys.stderr)
    print(json.dumps(detail, indent=2) if args.json else format_detail(detail))
    return 0
