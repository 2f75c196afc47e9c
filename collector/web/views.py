"""The fleet page's data: the InfluxQL it asks and what the answers become. Pure: no I/O, no clock (times are
passed in), so every state decision is tested without a server.

The page reads InfluxDB, not this collector's memory: with several collectors on a shared subscription each sees
only part of the fleet, InfluxDB all of it. Sources (docs/wire-format.md "Health heartbeat", docs/dashboards.md):

    citynerve_gateway_health    the last heartbeat of each gateway: online, backlog, backlog age, drops, re-sends
    citynerve_device_health     per device: polls, errors, last error; errors that grew recently make it failing
    citynerve_gateway_info      its location (configured, or its GPS's) and running configuration version
    gps                         a gateway's last GPS fix (an NMEA source), for gateways whose heartbeat says none
    the readings' measurements  a gateway page's latest values and last-hour charts

A gateway's state, worst first (the map's colours):

    offline   its last status says offline (a clean stop, or the broker's last will)
    stale     no heartbeat for `stale_after` (a gateway that is gone without a will reaching the broker)
    errors    a device's error count grew within `errors_window`
    backlog   its oldest unacknowledged message is older than `backlog_after`
    online
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GATEWAY_HEALTH = "citynerve_gateway_health"
DEVICE_HEALTH = "citynerve_device_health"
# The inventory's points (docs/control.md "Fleet inventory"): version, configuration and location as the
# heartbeat says them, written on a change and every [inventory] info_interval (1 h by default).
GATEWAY_INFO = "citynerve_gateway_info"
GPS = "gps"
# Measurements the collector owns (collector/guard.py reserves the prefix): not a gateway's readings.
OWN_PREFIX = "citynerve_"
STATES = ("offline", "stale", "errors", "backlog", "online")  # worst first
# A chart's buckets over the last hour: one a minute.
CHART_WINDOW_S = 3600
CHART_BUCKET_S = 60
# Bounds on what one gateway page shows (a gateway's readings are bounded by the collector's budgets, but a page
# must stay small whatever the store holds).
MAX_MEASUREMENTS = 20
MAX_DEVICES = 200
MAX_FIELDS = 200


@dataclass(frozen=True)
class ViewSettings:
    # Heartbeats (and GPS fixes) older than this are not read: what InfluxDB scans per refresh is bounded (a
    # heartbeat a minute: 60 points per gateway). A gateway silent for longer is still listed, from the store's
    # index of gateway tags, as not heard.
    window_s: float = 3600
    info_window_s: float = 2 * 86400  # inventory points come at least every info_interval: a few per gateway
    stale_after_s: float = 300
    backlog_after_s: float = 120
    errors_window_s: float = 900


def string(value: str) -> str:
    """An InfluxQL string literal (single quotes; backslash and quote escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ident(name: str) -> str:
    """An InfluxQL identifier (double quotes; backslash and quote escaped)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _seconds(value: float) -> str:
    return f"{max(1, int(value))}s"


# -- the fleet -----------------------------------------------------------------------------------------------------

def _info_statement(s: ViewSettings, where: str = "") -> str:
    return ('SELECT last("version") AS "version", "config_version", "latitude", "longitude", "location_source", '
            f'"location_time_ns" FROM {ident(GATEWAY_INFO)} WHERE {where}time > now() - {_seconds(s.info_window_s)}'
            + ("" if where else ' GROUP BY "gateway"'))


def fleet_query(s: ViewSettings) -> str:
    """One request, five statements: each gateway's last heartbeat, last GPS fix, recent device errors (all within
    the window), every gateway the store knows (its tag index: cheap, however old), and its inventory point
    (location, configuration; none before a collector and agents that write it)."""
    window, errors = _seconds(s.window_s), _seconds(s.errors_window_s)
    return ";".join([
        'SELECT last("online") AS "online", "backlog_messages", "backlog_age_s", "backlog_oldest_ns", '
        f'"dropped_readings", "resent_messages", "since_ns" FROM {ident(GATEWAY_HEALTH)} WHERE time > now() - {window} '
        'GROUP BY "gateway"',
        f'SELECT last("latitude") AS "latitude", "longitude" FROM {ident(GPS)} WHERE time > now() - {window} '
        'GROUP BY "gateway"',
        f'SELECT sum("grew") AS "grew" FROM (SELECT non_negative_difference("errors") AS "grew" FROM '
        f'{ident(DEVICE_HEALTH)} WHERE time > now() - {errors} GROUP BY "gateway", "device") '
        'GROUP BY "gateway", "device"',
        f'SHOW TAG VALUES FROM {ident(GATEWAY_HEALTH)} WITH KEY = "gateway"',
        _info_statement(s),
    ])


def _results(answer: Mapping[str, Any], count: int) -> list[list[dict[str, Any]]]:
    """The series of each statement; InfluxQLError for a statement InfluxDB refused."""
    results = list(answer.get("results") or [])
    out: list[list[dict[str, Any]]] = []
    for index in range(count):
        result = results[index] if index < len(results) else {}
        if "error" in result:
            raise InfluxQLError(result["error"])
        out.append(list(result.get("series") or []))
    return out


class InfluxQLError(Exception):
    """InfluxDB refused a statement of the page's (a store without the 1.x query API, a bad name)."""


def _rows(series: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for one in series:
        tags = one.get("tags") or {}
        for values in one.get("values") or []:
            rows.append({**dict(zip(one["columns"], values, strict=True)), **tags})
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _location(row: Mapping[str, Any] | None, source: str = "gps") -> dict[str, Any] | None:
    if row is None:
        return None
    lat, lon = _number(row.get("latitude")), _number(row.get("longitude"))
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    given = row.get("location_source")
    return {"lat": lat, "lon": lon, "source": given if isinstance(given, str) and given else source,
            "time_ns": row.get("location_time_ns") or row.get("time")}


def _where(info: Mapping[str, Any] | None, fix: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The heartbeat's location (configured, or the agent's own GPS fix) first; else the gateway's last fix."""
    return _location(info, "config") or _location(fix)


def gateway_state(health: Mapping[str, Any], failing: int, now_ns: int, s: ViewSettings) -> str:
    """One of STATES for a gateway's last heartbeat row and its count of failing devices."""
    if health.get("online") == 0:
        return "offline"
    last = health.get("time")
    if not isinstance(last, int) or now_ns - last > s.stale_after_s * 1e9:
        return "stale"
    if failing:
        return "errors"
    age = _number(health.get("backlog_age_s"))
    if age is None and isinstance(health.get("backlog_oldest_ns"), int):
        age = (last - health["backlog_oldest_ns"]) / 1e9  # from a collector before backlog_age_s
    if age is not None and age > s.backlog_after_s:
        return "backlog"
    return "online"


def fleet_view(answer: Mapping[str, Any], now_ns: int, s: ViewSettings) -> dict[str, Any]:
    """The page's fleet document: every gateway the store knows, its state and location."""
    health, fixes, errors, known, infos = (_rows(series) for series in _results(answer, 5))
    info = {row["gateway"]: row for row in infos if "gateway" in row}
    heard = {row.get("gateway") for row in health}
    # known to the store, silent within the window: a row of its own, not heard
    health += [{"gateway": row["value"]} for row in known if row.get("value") and row["value"] not in heard]
    located = {row["gateway"]: row for row in fixes if "gateway" in row}
    failing: dict[str, list[str]] = {}
    for row in errors:
        if (_number(row.get("grew")) or 0) > 0:
            failing.setdefault(row.get("gateway", ""), []).append(row.get("device", ""))
    gateways = []
    for row in sorted(health, key=lambda r: r.get("gateway", "")):
        gateway = row.get("gateway")
        if not gateway:
            continue
        devices = sorted(failing.get(gateway, []))
        gateways.append({
            "id": gateway,
            "state": gateway_state(row, len(devices), now_ns, s),
            "online": row.get("online") == 1,
            "last_seen_ns": row.get("time"),
            "backlog_messages": row.get("backlog_messages"),
            "backlog_age_s": _number(row.get("backlog_age_s")),
            "dropped_readings": row.get("dropped_readings"),
            "resent_messages": row.get("resent_messages"),
            "since_ns": row.get("since_ns"),
            "failing_devices": devices,
            "location": _where(info.get(gateway), located.get(gateway)),
            "config_version": (info.get(gateway) or {}).get("config_version"),
            "version": (info.get(gateway) or {}).get("version"),
        })
    summary = {state: sum(1 for g in gateways if g["state"] == state) for state in STATES}
    return {"generated_ns": now_ns, "gateways": gateways, "summary": summary,
            "settings": {"stale_after_s": s.stale_after_s, "backlog_after_s": s.backlog_after_s,
                         "errors_window_s": s.errors_window_s}}


# -- one gateway ---------------------------------------------------------------------------------------------------

def gateway_query(gateway: str, s: ViewSettings) -> str:
    """Its last heartbeat, its devices' health, their recent errors, its GPS fix, which measurements it writes
    (the values are asked for in a second request, `values_query`, once these are known), its inventory point."""
    gw, window, errors = string(gateway), _seconds(s.window_s), _seconds(s.errors_window_s)
    return ";".join([
        'SELECT last("online") AS "online", "backlog_messages", "backlog_readings", "backlog_bytes", '
        '"backlog_age_s", "backlog_oldest_ns", "dropped_readings", "resent_messages", "since_ns", "last_ack_ns" '
        f'FROM {ident(GATEWAY_HEALTH)} WHERE "gateway" = {gw} AND time > now() - {window}',
        f'SELECT last("polls") AS "polls", "errors", "last_error" FROM {ident(DEVICE_HEALTH)} '
        f'WHERE "gateway" = {gw} AND time > now() - {window} GROUP BY "device"',
        f'SELECT sum("grew") AS "grew" FROM (SELECT non_negative_difference("errors") AS "grew" FROM '
        f'{ident(DEVICE_HEALTH)} WHERE "gateway" = {gw} AND time > now() - {errors} GROUP BY "device") '
        'GROUP BY "device"',
        f'SELECT last("latitude") AS "latitude", "longitude" FROM {ident(GPS)} WHERE "gateway" = {gw} '
        f'AND time > now() - {window}',
        f'SHOW MEASUREMENTS WHERE "gateway" = {gw}',
        _info_statement(s, f'"gateway" = {gw} AND '),
    ])


def measurements_of(answer: Mapping[str, Any]) -> list[str]:
    """The readings' measurements in a gateway_query answer (the collector's own left out), bounded."""
    series = _results(answer, 6)[4]
    names = [row.get("name") for row in _rows(series)]
    return sorted(n for n in names if isinstance(n, str) and not n.startswith(OWN_PREFIX))[:MAX_MEASUREMENTS]


def values_query(gateway: str, measurements: Iterable[str]) -> str:
    """Per measurement: each device's latest reading in the last hour (the newest point of each series: one
    reading, its fields and its time), and the hour's per-minute means (the charts). Two statements each."""
    gw = string(gateway)
    statements = []
    for m in measurements:
        statements.append(f'SELECT * FROM {ident(m)} WHERE "gateway" = {gw} AND time > now() - '
                          f'{CHART_WINDOW_S}s GROUP BY * ORDER BY time DESC LIMIT 1')
        statements.append(f'SELECT mean(*) FROM {ident(m)} WHERE "gateway" = {gw} AND time > now() - '
                          f'{CHART_WINDOW_S}s GROUP BY time({CHART_BUCKET_S}s), "device" fill(none)')
    return ";".join(statements)


_PREFIXED = re.compile(r"^(last|mean)_(.+)$")


def gateway_view(gateway: str, answer: Mapping[str, Any], measurements: list[str], values: Mapping[str, Any] | None,
                 now_ns: int, s: ViewSettings, unit_of: Callable[[str, str | None], str] | None = None
                 ) -> dict[str, Any]:
    """A gateway's page: state, devices with their latest values (and units where known: `unit_of(field, model
    tag)`, collector/web/units.py), a last-hour series per device and field, poll errors."""
    health_series, device_series, errors_series, fix_series, _, info_series = _results(answer, 6)
    health = _rows(health_series)
    failing = {r.get("device") for r in _rows(errors_series) if (_number(r.get("grew")) or 0) > 0}
    devices: dict[str, dict[str, Any]] = {}
    for row in _rows(device_series)[:MAX_DEVICES]:
        name = row.get("device")
        if name:
            devices[name] = {"id": name, "polls": row.get("polls"), "errors": row.get("errors"),
                             "last_error": row.get("last_error") or "", "failing": name in failing,
                             "health_ns": row.get("time"), "measurements": {}}
    if values is not None:
        results = _results(values, 2 * len(measurements))
        for index, measurement in enumerate(measurements):
            latest, charts = results[2 * index], results[2 * index + 1]
            # newest first: a device whose tags changed within the hour has several series, the newest wins
            newest = sorted(latest, key=lambda one: (one.get("values") or [[0]])[0][0] or 0, reverse=True)
            for one in newest:
                device = (one.get("tags") or {}).get("device")
                if not device or (device not in devices and len(devices) >= MAX_DEVICES):
                    continue
                entry = devices.setdefault(device, {"id": device, "polls": None, "errors": None, "last_error": "",
                                                    "failing": False, "health_ns": None, "measurements": {}})
                if measurement in entry["measurements"] or not one.get("values"):
                    continue
                row = dict(zip(one["columns"], one["values"][0], strict=False))
                fields = {column: value for column, value in row.items() if column != "time" and value is not None}
                model = (one.get("tags") or {}).get("model") or None
                kept = dict(sorted(fields.items())[:MAX_FIELDS])
                units = {name: unit_of(name, model) for name in kept} if unit_of is not None else {}
                entry["measurements"][measurement] = {
                    "time_ns": row.get("time"),
                    "model": model,
                    "fields": kept,
                    "units": {name: unit for name, unit in units.items() if unit},
                    "series": {},
                }
            for one in charts:
                device = (one.get("tags") or {}).get("device")
                entry = devices.get(device or "")
                if entry is None or measurement not in entry["measurements"]:
                    continue
                columns = one["columns"]
                series: dict[str, list[list[float]]] = {}
                for values_row in one.get("values") or []:
                    t = values_row[0]
                    for column, value in zip(columns[1:], values_row[1:], strict=False):
                        match = _PREFIXED.match(column)
                        if match and _number(value) is not None:
                            series.setdefault(match.group(2), []).append([t, value])
                entry["measurements"][measurement]["series"] = dict(sorted(series.items())[:MAX_FIELDS])
    row = health[0] if health else None
    fix = _rows(fix_series)
    info = _rows(info_series)
    return {
        "id": gateway,
        "found": row is not None or bool(devices),
        "generated_ns": now_ns,
        "state": gateway_state(row, len(failing & set(devices)), now_ns, s) if row else "stale",
        "health": row,
        "location": _where(info[0] if info else None, fix[0] if fix else None),
        "version": info[0].get("version") if info else None,
        "config_version": info[0].get("config_version") if info else None,
        "devices": [devices[name] for name in sorted(devices)],
    }
