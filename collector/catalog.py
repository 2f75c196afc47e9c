"""`edge-collector catalog [-c collector.toml] [--json | --csv]`: the fleet's data catalogue (docs/catalog.md).

What the collector knows, joined with the vocabulary (wire/catalog.py `row`):

- the fields actually stored: InfluxDB's `SHOW FIELD KEYS` (per measurement, with the stored type) and its tag
  index (`SHOW TAG VALUES ... WITH KEY = "gateway"`, then the "device" values of each measurement and gateway):
  metadata queries answered from the index, no scan of the data; at most MAX_PAIRS (measurement, gateway) pairs,
  asked STATEMENTS_PER_REQUEST at a time;
- the fleet inventory (collector/inventory.py, when the collector keeps one): each gateway's location, and its
  devices even when nothing of theirs is stored yet.

InfluxDB names a measurement's fields, not a device's: a device is listed with every field its measurement holds
in the store (two meter models sharing "electricity" share its field list). The store knows no units: a standard
field shows the table's; another shows none. A field stored with another type than the table's is not standard.

Pure core (the queries and what their answers become) and a thin shell (`run`: one HTTP client, blocking, as a
CLI may be).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from collector.web.views import OWN_PREFIX, ident, string
from wire import catalog

DEFAULT_CONFIG = "/etc/citynerve/collector.toml"
MAX_PAIRS = 20_000  # (measurement, gateway) pairs whose devices are asked: a bound on what one run asks
STATEMENTS_PER_REQUEST = 200
# InfluxDB 1.x field types -> the vocabulary's (wire/vocabulary.py TYPES)
INFLUX_TYPES = {"float": "float", "integer": "int", "unsigned": "int", "string": "string", "boolean": "bool"}
STORED = "stored"  # the source of a device known only from the store


class CatalogError(Exception):
    """What the command needs cannot be had: one line for wire.cli.fail()."""


@dataclass(frozen=True)
class GatewayInfo:
    """What the inventory says of one gateway: where it is, and its devices' sources ("modbus eastron_sdm630",
    "serial dsmr")."""

    location: str = ""
    devices: dict[str, str] = field(default_factory=dict)


# -- the queries and their answers ----------------------------------------------------------------------------------

STORE_QUERY = 'SHOW FIELD KEYS; SHOW TAG VALUES WITH KEY = "gateway"'


def _series(answer: Mapping[str, Any], index: int) -> list[Mapping[str, Any]]:
    results = answer.get("results") or []
    result = results[index] if index < len(results) else {}
    if "error" in result:
        raise CatalogError(f"InfluxDB refused a query: {result['error']}")
    return [s for s in result.get("series") or [] if isinstance(s, Mapping)]


def _values(series: Mapping[str, Any]) -> list[list[Any]]:
    return [v for v in series.get("values") or [] if isinstance(v, list) and v]


def stored_fields(answer: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """{measurement: {field: vocabulary type}} of STORE_QUERY's first statement; the collector's own measurements
    (citynerve_*: health, inventory, suspect times) are not readings and are left out."""
    out: dict[str, dict[str, str]] = {}
    for series in _series(answer, 0):
        name = series.get("name")
        if not isinstance(name, str) or name.startswith(OWN_PREFIX):
            continue
        fields = out.setdefault(name, {})
        for row in _values(series):
            # a field stored with two types in different shards is listed twice: the first is kept
            fields.setdefault(str(row[0]), INFLUX_TYPES.get(str(row[1]) if len(row) > 1 else "", ""))
    return out


def gateways_by_measurement(answer: Mapping[str, Any]) -> dict[str, list[str]]:
    """{measurement: [gateway, ...]} of STORE_QUERY's second statement (rows are ["gateway", value])."""
    out: dict[str, list[str]] = {}
    for series in _series(answer, 1):
        name = series.get("name")
        if isinstance(name, str) and not name.startswith(OWN_PREFIX):
            out[name] = sorted(str(row[1]) for row in _values(series) if len(row) > 1)
    return out


def device_statements(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """One statement per (measurement, gateway): the device tag's values of that gateway in that measurement."""
    return [f'SHOW TAG VALUES FROM {ident(m)} WITH KEY = "device" WHERE "gateway" = {string(g)}' for m, g in pairs]


def devices_of(answer: Mapping[str, Any], count: int) -> list[list[str]]:
    """The device names each of `count` device_statements found."""
    return [sorted({str(row[1]) for series in _series(answer, i) for row in _values(series) if len(row) > 1})
            for i in range(count)]


def rows(fields: Mapping[str, Mapping[str, str]], devices: Mapping[tuple[str, str], list[str]],
         inventory: Mapping[str, GatewayInfo]) -> list[catalog.Row]:
    """The catalogue: a row per stored (gateway, device, measurement, field), sorted; a device or gateway the
    inventory knows and nothing is stored of gets one row saying so."""
    out: list[catalog.Row] = []
    stored_devices: set[tuple[str, str]] = set()
    for (measurement, gateway), names in sorted(devices.items(), key=lambda item: (item[0][1], item[0][0])):
        info = inventory.get(gateway, GatewayInfo())
        for device in names:
            stored_devices.add((gateway, device))
            source = info.devices.get(device, STORED)
            for name, value_type in sorted(fields.get(measurement, {}).items()):
                out.append(catalog.row(gateway=gateway, location=info.location, device=device, source=source,
                                       measurement=measurement, field=name, type=value_type))
    for gateway, info in sorted(inventory.items()):
        if not info.devices and not any(g == gateway for g, _ in stored_devices):
            out.append(catalog.note_row(gateway=gateway, location=info.location, device="", source="",
                                        note="no devices reported and nothing stored"))
        for device, source in sorted(info.devices.items()):
            if (gateway, device) not in stored_devices:
                out.append(catalog.note_row(gateway=gateway, location=info.location, device=device, source=source,
                                            note="nothing stored of this device yet"))
    out.sort(key=lambda r: (r.gateway, r.device, r.measurement, r.field))
    return out


# -- the shell ------------------------------------------------------------------------------------------------------


def collect(query: Any, inventory: Mapping[str, GatewayInfo]) -> tuple[list[catalog.Row], list[str]]:
    """(rows, notes for stderr), asking `query(q) -> InfluxDB's JSON answer`."""
    answer = query(STORE_QUERY)
    fields = stored_fields(answer)
    pairs = [(m, g) for m, gateways in sorted(gateways_by_measurement(answer).items()) for g in gateways
             if m in fields]
    notes = []
    if len(pairs) > MAX_PAIRS:
        notes.append(f"note: {len(pairs)} (measurement, gateway) pairs in the store; the first {MAX_PAIRS} listed")
        pairs = pairs[:MAX_PAIRS]
    devices: dict[tuple[str, str], list[str]] = {}
    for start in range(0, len(pairs), STATEMENTS_PER_REQUEST):
        part = pairs[start:start + STATEMENTS_PER_REQUEST]
        found = devices_of(query(";".join(device_statements(part))), len(part))
        devices.update(zip(part, found, strict=True))
    return rows(fields, devices, inventory), notes


def _inventory(cfg: Any) -> dict[str, GatewayInfo]:
    """The fleet inventory's gateways (collector/inventory.py), {} for a collector that keeps none."""
    try:
        from collector.inventory import InventoryError, read_inventory
    except ImportError:  # a collector without the fleet inventory
        return {}
    section = getattr(cfg, "inventory", None)
    if section is None:
        return {}
    try:
        records = read_inventory(section.path)
    except InventoryError as exc:
        raise CatalogError(str(exc)) from None
    out: dict[str, GatewayInfo] = {}
    for gateway, record in records.items():
        where = record.location
        location = catalog.location_text(where.lat, where.lon, where.alt) if where is not None else ""
        sources = {}
        for device, rec in record.devices.items():
            info = rec.info
            what = (info.profile or info.protocol or "") if info is not None else ""
            sources[device] = f"{info.kind} {what}".strip() if info is not None else STORED
        out[gateway] = GatewayInfo(location, sources)
    return out


def register_subcommands(sub: argparse._SubParsersAction) -> None:
    from wire.cli import add_catalog_format

    p = sub.add_parser("catalog", help="the fleet's data catalogue: every gateway, device, measurement, field, unit, "
                                       "type and description stored (docs/catalog.md)")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="FILE",
                   help="collector.toml: its InfluxDB and fleet inventory (default %(default)s)")
    add_catalog_format(p)


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "catalog":
        return None
    from collector import config as collector_config
    from collector.influx.backends import V1Backend, WriteFailure
    from wire.catalog import render
    from wire.cli import fail
    from wire.config import ConfigError, redact_url

    try:
        cfg = collector_config.load(args.config)
        if cfg.influx.api != "v1":
            raise CatalogError(f'{args.config}: influx.api: the catalogue reads InfluxDB through its 1.x query API '
                               '(api = "v1"), as the fleet page does')
        backend = V1Backend(cfg.influx)
        try:
            found, notes = collect(backend.query, _inventory(cfg))
        finally:
            backend.close()
    except ConfigError as exc:
        return fail(str(exc))
    except WriteFailure as exc:  # the store cannot be reached or refused
        return fail(f"{args.config}: InfluxDB at {redact_url(cfg.influx.url)}: {exc}", 1)
    except CatalogError as exc:
        return fail(str(exc), 1)
    for note in notes:
        print(note, file=sys.stderr)
    sys.stdout.write(render(found, args.format))
    return 0
