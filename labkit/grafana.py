"""What Grafana does to a dashboard's InfluxQL before InfluxDB sees it, so that a test can run every panel's query
against a real influxd. Grafana itself is not a Debian package; this follows its source (Grafana 10/11, the
InfluxDB data source in InfluxQL mode, raw queries):

- the browser replaces template variables in the raw query with the "regex" format
  (public/app/plugins/datasource/influxdb/datasource.ts applyVariables -> templateSrv.replace(query, rest,
  'regex')): a value is regex-escaped (kbn.regexEscape: \\ ^ $ * + ? . ( ) | [ ] { } /), several values become
  (a|b), "All" becomes the variable's allValue as it is, or every option; $__interval and $__interval_ms are left
  for the backend, and so is $timeFilter (no such variable);
- the backend (pkg/tsdb/influxdb/models/query.go Build) replaces $timeFilter with
  `time >= <from>ms and time <= <to>ms`, $interval and $__interval with the interval as gtime.FormatInterval
  writes it, $__interval_ms with its milliseconds;
- the interval is the panel's (rangeutil.calculateInterval): (to - from) / max data points, rounded by
  rangeutil.roundInterval, at least the panel's `interval` or the data source's jsonData.timeInterval;
- a variable's options are the query's values (response_parser.ts: the second column where there is one, the
  first for SHOW FIELD KEYS), filtered by the variable's regex (a capture group is the value);
- a repeated panel is run once per value of its variable, with that one value.

    ds = load_datasources(Path("deploy/grafana/provisioning"))["citynerve-influxdb"]
    board = Dashboard.load(Path("deploy/grafana/dashboards/citynerve-fleet.json"))
    values = board.resolve_variables(run_query, {"gateway": "gw-1"})   # run_query(q) -> InfluxDB's series
    for panel, scoped in board.query_panels(values):
        for target in panel["targets"]:
            q = render(target["query"], scoped, range_ms, interval_ms(panel, ds, range_ms))
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALL = "$__all"

# public/app/features/templating/template_srv.ts variableRegex: $name, [[name:fmt]], ${name.field:fmt}
_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}")
_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|\[\]{}/]")  # kbn.regexEscape
_INTERVAL = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|[Mwdhmsy])")  # rangeutil describeInterval
_INTERVAL_SECONDS = {"y": 31536000, "M": 2592000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
# rangeutil.roundInterval: (upper bound of the computed interval, the interval used), milliseconds
_ROUND = ((10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
          (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
          (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000),
          (2700000, 1800000), (5400000, 3600000), (9000000, 7200000), (16200000, 10800000), (32400000, 21600000),
          (86400000, 43200000), (604800000, 86400000), (1814400000, 604800000), (3628800000, 2592000000))
# What a panel is this wide by default (Grafana uses the panel's width in pixels as max data points).
DEFAULT_MAX_DATA_POINTS = 1000


class GrafanaError(ValueError):
    """A dashboard or provisioning file that Grafana would not accept or could not run as meant."""


# -- provisioning ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Datasource:
    uid: str
    name: str
    type: str
    url: str
    database: str
    time_interval: str  # jsonData.timeInterval: the lowest $__interval ("" for none)
    version: str


def load_datasources(provisioning: Path) -> dict[str, Datasource]:
    """The data sources of provisioning/datasources/*.yaml by uid, checked as Grafana's provisioning reads them."""
    import yaml

    found: dict[str, Datasource] = {}
    for path in sorted((provisioning / "datasources").glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or doc.get("apiVersion") != 1 or not isinstance(doc.get("datasources"), list):
            raise GrafanaError(f"{path}: expected apiVersion: 1 and a list of datasources")
        for index, ds in enumerate(doc["datasources"]):
            where = f"{path}: datasources[{index}]"
            for key in ("name", "uid", "type", "access", "url"):
                if not isinstance(ds.get(key), str) or not ds[key]:
                    raise GrafanaError(f"{where}.{key}: expected a non-empty string")
            json_data = ds.get("jsonData") or {}
            if ds["uid"] in found:
                raise GrafanaError(f"{where}.uid: {ds['uid']!r} is provisioned twice")
            found[ds["uid"]] = Datasource(ds["uid"], ds["name"], ds["type"], ds["url"],
                                          json_data.get("dbName") or ds.get("database", ""),
                                          json_data.get("timeInterval", ""), json_data.get("version", "InfluxQL"))
    return found


def load_providers(provisioning: Path) -> list[dict[str, Any]]:
    import yaml

    providers: list[dict[str, Any]] = []
    for path in sorted((provisioning / "dashboards").glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or doc.get("apiVersion") != 1 or not isinstance(doc.get("providers"), list):
            raise GrafanaError(f"{path}: expected apiVersion: 1 and a list of providers")
        for index, provider in enumerate(doc["providers"]):
            if provider.get("type", "file") != "file" or not (provider.get("options") or {}).get("path"):
                raise GrafanaError(f"{path}: providers[{index}]: expected type file with options.path")
            providers.append(provider)
    return providers


# -- intervals and macros ----------------------------------------------------------------------------------------

def interval_to_ms(text: str) -> float:
    """rangeutil.intervalToMs: "10s" -> 10000; a plain number is seconds."""
    try:
        return float(text) * 1000 if float(text) else 0.0
    except ValueError:
        pass
    match = _INTERVAL.match(text)
    if match is None:
        raise GrafanaError(f"invalid interval {text!r}: expected a number and one of ms, s, m, h, d, w, M, y")
    return _INTERVAL_SECONDS[match.group(2)] * 1000 * int(float(match.group(1)))


def round_interval(ms: float) -> int:
    for bound, value in _ROUND:
        if ms < bound:
            return value
    return 31536000000


def calculate_interval_ms(from_ms: int, to_ms: int, max_data_points: int, low_limit: str = "") -> int:
    """rangeutil.calculateInterval."""
    low = interval_to_ms(low_limit) if low_limit else 1
    return int(max(low, round_interval((to_ms - from_ms) / max_data_points)))


def format_interval(ms: int) -> str:
    """grafana-plugin-sdk-go gtime.FormatInterval, which the InfluxQL backend writes for $__interval."""
    for unit, size in (("y", 31536000000), ("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms" if ms >= 1 else "1ms"


def panel_interval_ms(panel: Mapping[str, Any], datasource: Datasource, from_ms: int, to_ms: int) -> int:
    low = panel.get("interval") or datasource.time_interval
    return calculate_interval_ms(from_ms, to_ms, int(panel.get("maxDataPoints") or DEFAULT_MAX_DATA_POINTS), low)


def backend_macros(query: str, from_ms: int, to_ms: int, interval_ms: int) -> str:
    """pkg/tsdb/influxdb/models/query.go Build, in its order."""
    text = format_interval(interval_ms)
    query = query.replace("$timeFilter", f"time >= {from_ms}ms and time <= {to_ms}ms")
    query = query.replace("$interval", text)
    query = query.replace("$__interval_ms", str(interval_ms))
    return query.replace("$__interval", text)


# -- template variables ------------------------------------------------------------------------------------------

def regex_escape(value: str) -> str:
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


@dataclass(frozen=True)
class Value:
    """A variable's current value: one string, or several (a multi-value variable); `all` when it is "All"."""

    values: tuple[str, ...]
    multi: bool = False
    all_value: str | None = None  # the variable's allValue when "All" is selected and it has one
    options: tuple[str, ...] = ()  # what the variable offered (its query's values)

    def format(self, fmt: str) -> str:
        if self.all_value is not None and fmt not in ("text", "percentencode"):
            return self.all_value  # template_srv: a custom all value is not formatted
        if fmt == "regex":
            escaped = [regex_escape(v) for v in self.values]
            if not self.multi:
                return escaped[0]
            return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        if fmt in ("raw", "text", ""):
            return ",".join(self.values)
        raise GrafanaError(f"format {fmt!r} is not emulated here")


def interpolate(text: str, values: Mapping[str, Value], fmt: str = "regex") -> str:
    """templateSrv.replace(text, scopedVars, fmt): unknown names are left as they are (for the backend)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        value = values.get(name)
        if value is None:
            return match.group(0)
        return value.format(match.group(3) or match.group(6) or fmt)

    return _VARIABLE.sub(replace, text)


def variables_in(text: str) -> set[str]:
    return {m.group(1) or m.group(2) or m.group(4) for m in _VARIABLE.finditer(text)}


def metric_find_values(query: str, series: Sequence[Mapping[str, Any]]) -> list[str]:
    """response_parser.ts parse(): the values of a variable's query, in order, without repeats."""
    value_first = any(kind in query.lower() for kind in ("show field keys", "show retention policies"))
    found: dict[str, None] = {}
    for one in series:
        for row in one.get("values") or []:
            value = row[0] if value_first or len(row) < 2 or row[1] is None else row[1]
            found[str(value)] = None
    return list(found)


def js_regex(text: str) -> re.Pattern[str]:
    """stringToJsRegex: "/pattern/flags" (Python's re reads the patterns Grafana users write the same way)."""
    match = re.fullmatch(r"/(.*)/([gimsuy]*)", text, re.S)
    if match is None:
        raise GrafanaError(f"variable regex {text!r}: expected /pattern/flags")
    flags = (re.I if "i" in match.group(2) else 0) | (re.M if "m" in match.group(2) else 0)
    return re.compile(match.group(1), flags)


def apply_regex(options: list[str], regex: str) -> list[str]:
    """variables/utils.ts metricNamesToVariableValues: keep what the regex matches; a capture group is the value."""
    if not regex:
        return options
    pattern = js_regex(regex)
    kept: dict[str, None] = {}
    for option in options:
        match = pattern.search(option)
        if match is None:
            continue
        kept[match.group(1) if match.groups() and match.group(1) is not None else option] = None
    return list(kept)


# -- dashboards --------------------------------------------------------------------------------------------------

@dataclass
class Dashboard:
    path: Path
    doc: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> Dashboard:
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise GrafanaError(f"{path}: not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        if not isinstance(doc, dict):
            raise GrafanaError(f"{path}: expected a JSON object")
        return cls(path, doc)

    @property
    def uid(self) -> str:
        return self.doc["uid"]

    @property
    def variables(self) -> list[dict[str, Any]]:
        return list((self.doc.get("templating") or {}).get("list") or [])

    def panels(self) -> Iterator[dict[str, Any]]:
        """Every panel, those inside rows (collapsed rows hold theirs in "panels") included."""
        for panel in self.doc.get("panels") or []:
            yield panel
            yield from panel.get("panels") or []

    def resolve_variables(self, run_query: Callable[[str], list[dict[str, Any]]],
                          chosen: Mapping[str, str | Sequence[str]] | None = None) -> dict[str, Value]:
        """Each query variable's options from its query (with the variables before it), then its value: the one
        in `chosen` (which must be an option), else "All" for an includeAll variable, else the first option.
        Raises GrafanaError for a variable without options or a chosen value that is not one."""
        chosen = dict(chosen or {})
        values: dict[str, Value] = {}
        for var in self.variables:
            name = var["name"]
            if var.get("type") != "query":
                raise GrafanaError(f"{self.path.name}: variable {name}: type {var.get('type')!r} is not emulated")
            query = interpolate(var["query"] if isinstance(var["query"], str) else var["query"]["query"], values)
            options = apply_regex(metric_find_values(query, run_query(query)), var.get("regex") or "")
            if not options:
                raise GrafanaError(f"{self.path.name}: variable {name} has no options: {query}")
            multi = bool(var.get("multi"))
            if name in chosen:
                picked = chosen[name]
                picked = [picked] if isinstance(picked, str) else list(picked)
                missing = [p for p in picked if p not in options]
                if missing:
                    raise GrafanaError(f"{self.path.name}: variable {name}: {missing} not among its options {options}")
                values[name] = Value(tuple(picked), multi, options=tuple(options))
            elif var.get("includeAll"):
                values[name] = Value(tuple(options), True, var.get("allValue") or None, tuple(options))
            else:
                values[name] = Value((options[0],), multi, options=tuple(options))
        return values

    def query_panels(self, values: Mapping[str, Value]) -> Iterator[tuple[dict[str, Any], dict[str, Value]]]:
        """(panel, its variables) for every panel with targets; a repeated panel once per value of its variable."""
        for panel in self.panels():
            if not panel.get("targets"):
                continue
            repeat = panel.get("repeat")
            if not repeat:
                yield panel, dict(values)
                continue
            if repeat not in values:
                raise GrafanaError(f"{self.path.name}: panel {panel.get('title')!r} repeats by unknown variable {repeat}")
            for one in values[repeat].values:
                yield panel, {**values, repeat: Value((one,))}


def render(query: str, values: Mapping[str, Value], from_ms: int, to_ms: int, interval_ms: int) -> str:
    """The query InfluxDB receives for a raw InfluxQL target."""
    return backend_macros(interpolate(query, values, "regex"), from_ms, to_ms, interval_ms)
