"""The Grafana dashboards of deploy/grafana: their JSON as Grafana loads it, and every panel's query run against a
real influxd that the fleet lab (real agents, collector and meters: labkit/fleet_lab.py) filled, after Grafana's
own substitutions (labkit/grafana.py). A query with a wrong measurement, field, tag, variable use or macro
returns nothing, or not what its panel is meant to show, and fails here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labkit.fleet_lab import EAST, NORTH, PLANS, SOUTH, FleetLab
from labkit.grafana import (
    Dashboard,
    GrafanaError,
    Value,
    backend_macros,
    calculate_interval_ms,
    format_interval,
    interpolate,
    load_datasources,
    load_providers,
    metric_find_values,
    panel_interval_ms,
    render,
    variables_in,
)
from labkit.influxd import InfluxError

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "citynerve-influxdb"
ALL_GATEWAYS = {NORTH, SOUTH, EAST}
# The values the lab's dashboards are looked at with (Grafana takes the first option where none is chosen).
CHOSEN = {"citynerve-gateway": {"gateway": NORTH},
          "citynerve-device": {"gateway": NORTH, "device": "meter-1", "measurement": "electricity"}}
# Grafana's own variables, and those of data links (${__data.fields.x}, ${__url_time_range}).
BUILTIN = {"timeFilter", "__interval", "__interval_ms", "interval", "__from", "__to", "__url_time_range", "__data",
           "__field", "__series", "__value", "__all_variables", "__dashboard", "__org", "__user", "__timezone"}
PANEL_TYPES = {"stat", "timeseries", "table", "geomap", "text", "row", "bargauge", "gauge", "state-timeline"}

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Expect:
    """What a panel's query must return in the lab: these columns, each with a value in some row; a series for at
    least each of these tag values; and whatever `check` says of the rows (tags merged in)."""

    columns: frozenset[str]
    tags: dict[str, frozenset[str]] = field(default_factory=dict)
    check: Callable[[Rows], bool] | None = None


def expect(*columns: str, check: Callable[[Rows], bool] | None = None, **tags: set[str]) -> Expect:
    return Expect(frozenset(columns), {k: frozenset(v) for k, v in tags.items()}, check)


def of(rows: Rows, column: str, **where: str) -> list[Any]:
    return [r[column] for r in rows if r.get(column) is not None and all(r.get(k) == v for k, v in where.items())]


def _near(a: float, b: float) -> bool:
    return abs(a - b) < 1e-4


# (dashboard uid, panel title, refId) -> what it must show of the fleet lab
EXPECTED: dict[tuple[str, str, str], Expect] = {
    ("citynerve-fleet", "Gateways online", "A"): expect("online", check=lambda r: of(r, "online") == [2]),
    ("citynerve-fleet", "Gateways offline", "A"): expect("offline", check=lambda r: of(r, "offline") == [1]),
    ("citynerve-fleet", "Messages waiting on gateways", "A"): expect("backlog", check=lambda r: of(r, "backlog")[0] > 0),
    ("citynerve-fleet", "Oldest unacknowledged", "A"): expect("age", check=lambda r: of(r, "age")[0] > 0),
    ("citynerve-fleet", "Readings stored", "A"): expect("readings", check=lambda r: of(r, "readings")[0] > 20),
    ("citynerve-fleet", "Readings set aside (clock)", "A"): expect("set aside", check=lambda r: of(r, "set aside") == [3]),
    ("citynerve-fleet", "Gateways", "A"): expect(
        "online", "backlog", "oldest unacked", "dropped", "re-sent", "running since", gateway=ALL_GATEWAYS,
        check=lambda r: of(r, "online", gateway=SOUTH) == [0] and of(r, "online", gateway=NORTH) == [1]
        and of(r, "backlog", gateway=EAST)[0] > 0),
    ("citynerve-fleet", "Backlog by gateway", "A"): expect("max", gateway=ALL_GATEWAYS),
    ("citynerve-fleet", "Oldest unacknowledged message by gateway", "A"): expect(
        "max", gateway=ALL_GATEWAYS, check=lambda r: max(of(r, "max", gateway=EAST)) > 0),
    ("citynerve-fleet", "Readings stored per second by gateway", "A"): expect(
        "sum", gateway=ALL_GATEWAYS, check=lambda r: max(of(r, "sum", gateway=NORTH)) > 0),
    ("citynerve-fleet", "Poll errors by gateway", "A"): expect(
        "sum", gateway={NORTH}, check=lambda r: sum(of(r, "sum", gateway=NORTH)) > 0),
    ("citynerve-fleet", "Devices", "A"): expect(
        "errors", "polls", "last error", gateway=ALL_GATEWAYS, device={"meter-1", "meter-dead", "gps"},
        check=lambda r: of(r, "errors", device="meter-dead")[0] > 0
        and "no answer" in of(r, "last error", device="meter-dead")[0]),
    ("citynerve-fleet", "Last GPS fix of each gateway", "A"): expect(
        "latitude", "longitude", gateway=ALL_GATEWAYS,
        check=lambda r: all(_near(of(r, "latitude", gateway=p.id)[0], p.latitude)
                            and _near(of(r, "longitude", gateway=p.id)[0], p.longitude) for p in PLANS)),
    ("citynerve-gateway", "State", "A"): expect("online", check=lambda r: of(r, "online") == [1]),
    ("citynerve-gateway", "Agent running since", "A"): expect("since"),
    ("citynerve-gateway", "Backlog", "A"): expect("backlog"),
    ("citynerve-gateway", "Oldest unacknowledged", "A"): expect("age"),
    ("citynerve-gateway", "Readings dropped (outbox bounds)", "A"): expect("dropped"),
    ("citynerve-gateway", "Messages re-sent", "A"): expect("resent"),
    ("citynerve-gateway", "Outbox backlog", "A"): expect("messages", "readings"),
    ("citynerve-gateway", "Backlog size", "A"): expect("bytes"),
    ("citynerve-gateway", "Oldest unacknowledged message", "A"): expect("age"),
    ("citynerve-gateway", "Online", "A"): expect("online"),
    ("citynerve-gateway", "Readings stored per second", "A"): expect("readings",
                                                                      check=lambda r: max(of(r, "readings")) > 0),
    ("citynerve-gateway", "Delivery latency", "A"): expect("mean", "max", check=lambda r: max(of(r, "max")) < 60_000),
    ("citynerve-gateway", "Poll errors per device", "A"): expect(
        "non_negative_difference", device={"meter-1", "meter-dead", "gps"},
        check=lambda r: sum(of(r, "non_negative_difference", device="meter-dead")) > 0),
    ("citynerve-gateway", "Re-sent per interval", "A"): expect("re-sent"),
    ("citynerve-gateway", "Readings set aside or declined", "A"): expect(
        "set aside (clock)", "declined (limits)", check=lambda r: sum(of(r, "set aside (clock)")) == 3),
    ("citynerve-gateway", "Devices", "A"): expect("errors", "polls", "last error", device={"meter-1", "meter-dead", "gps"}),
    ("citynerve-device", "Latest values", "A"): expect("last_voltage_l1", "last_energy_import", "last_frequency"),
    ("citynerve-device", "Poll errors", "A"): expect("errors", "polls", check=lambda r: max(of(r, "polls")) > 0),
    ("citynerve-device", "Last error", "A"): expect("last error", "errors", "polls", check=lambda r: of(r, "errors") == [0]),
    ("citynerve-device", "$field", "A"): expect(),  # mean_<field>: checked per repetition below
    ("citynerve-pipeline", "Messages stored per second", "A"): expect("count", gateway=ALL_GATEWAYS),
    ("citynerve-pipeline", "Readings per message", "A"): expect("mean", gateway=ALL_GATEWAYS),
    ("citynerve-pipeline", "Delivery latency, all gateways", "A"): expect("mean", "p95", "max"),
    ("citynerve-pipeline", "Delivery latency p95 by gateway", "A"): expect("percentile", gateway=ALL_GATEWAYS),
    ("citynerve-pipeline", "Readings set aside (implausible time)", "A"): expect(
        "sum", gateway={NORTH}, check=lambda r: sum(of(r, "sum", gateway=NORTH)) == 3),
    ("citynerve-pipeline", "Readings declined by the collector's limits", "A"): expect(
        "sum", gateway={EAST}, check=lambda r: sum(of(r, "sum", gateway=EAST)) > 0 and not any(of(r, "sum", gateway=NORTH))),
    ("citynerve-pipeline", "Health points per minute", "A"): expect("count", gateway=ALL_GATEWAYS),
    ("citynerve-pipeline", "Messages re-sent by gateways", "A"): expect(
        "sum", gateway={EAST}, check=lambda r: sum(of(r, "sum", gateway=EAST)) > 0),
    ("citynerve-pipeline", "Readings set aside, by gateway and measurement", "A"): expect(
        "readings", "earliest gateway time", "latest gateway time", gateway={NORTH}, measurement={"electricity"},
        check=lambda r: of(r, "readings") == [3] and of(r, "earliest gateway time") == [1000]),
}


def dashboards() -> list[Dashboard]:
    return [Dashboard.load(path) for path in DASHBOARDS]


def targets() -> Iterator[tuple[Dashboard, dict[str, Any], dict[str, Any]]]:
    for board in dashboards():
        for panel in board.panels():
            for target in panel.get("targets") or []:
                yield board, panel, target


# -- the files, as Grafana loads them ----------------------------------------------------------------------------

def test_provisioning_has_the_influxql_datasource_and_the_dashboards_provider() -> None:
    sources = load_datasources(GRAFANA / "provisioning")
    assert list(sources) == [DATASOURCE_UID]
    ds = sources[DATASOURCE_UID]
    assert (ds.type, ds.version, ds.database) == ("influxdb", "InfluxQL", "citynerve")
    assert ds.time_interval and calculate_interval_ms(0, 1, 1, ds.time_interval) == 10_000
    [provider] = load_providers(GRAFANA / "provisioning")
    assert provider["options"]["path"].endswith("/citynerve") and provider["allowUiUpdates"] is False


def test_four_dashboards_with_unique_uids_and_titles() -> None:
    boards = dashboards()
    assert {b.uid for b in boards} == {"citynerve-fleet", "citynerve-gateway", "citynerve-device", "citynerve-pipeline"}
    assert len({b.doc["title"] for b in boards}) == len(boards)
    for board in boards:
        assert board.path.name == f"{board.uid}.json"
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board.uid), "Grafana's uid: at most 40 of a-z A-Z 0-9 - _"


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_structure(path: Path) -> None:
    board = Dashboard.load(path)
    doc = board.doc
    # schemaVersion 39 is Grafana 10.4/11's model: older Grafanas refuse newer models, newer migrate older ones.
    assert doc["schemaVersion"] == 39 and doc.get("id") is None  # a provisioned dashboard must not carry an id
    assert doc["time"]["from"].startswith("now-") and doc["time"]["to"] == "now"
    panels = list(board.panels())
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids), f"panel ids {ids}"
    titles = [p["title"] for p in panels]
    assert len(set(titles)) == len(titles), f"two panels share a title: {titles}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        where = f"{path.name}: panel {panel['title']!r}"
        assert panel["type"] in PANEL_TYPES, where
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, where
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{where} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] in ("text", "row"):
            continue
        assert panel["datasource"] == {"type": "influxdb", "uid": DATASOURCE_UID}, where
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(set(refs)) == len(refs), where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            # Raw InfluxQL only: what runs is the text below, which this test runs (the visual editor's model is not).
            assert target["rawQuery"] is True and target["query"].strip(), where
            assert target["resultFormat"] in ("time_series", "table"), where
            assert "$timeFilter" in target["query"], f"{where}: not bounded by the dashboard's time range"


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_variable_used_is_defined_and_links_lead_somewhere(path: Path) -> None:
    board = Dashboard.load(path)
    uids = {b.uid: b for b in dashboards()}
    defined = [v["name"] for v in board.variables]
    for var in board.variables:
        assert var["datasource"] == {"type": "influxdb", "uid": DATASOURCE_UID}, var["name"]
        # a variable's query may use only the variables before it (Grafana resolves them in order)
        used = variables_in(var["query"]) - BUILTIN
        assert used <= set(defined[:defined.index(var["name"])]), f"variable {var['name']} uses {used}"
    for panel in board.panels():
        texts = [panel["title"], *(t["query"] for t in panel.get("targets") or []),
                 *(t.get("alias", "") for t in panel.get("targets") or [])]
        used = set().union(*(variables_in(t) for t in texts)) - BUILTIN
        used = {u for u in used if not u.startswith(("tag_", "col", "m"))} - {"m", "col"}  # alias patterns
        assert used <= set(defined), f"{path.name}: panel {panel['title']!r} uses undefined {used - set(defined)}"
        if panel.get("repeat"):
            repeat = next(v for v in board.variables if v["name"] == panel["repeat"])
            assert repeat["multi"], f"{panel['title']!r} repeats by a single-value variable"
        links = [link for o in panel.get("fieldConfig", {}).get("overrides", []) for p in o["properties"]
                 if p["id"] == "links" for link in p["value"]]
        for link in links:
            match = re.fullmatch(r"/d/([\w-]+)/[\w-]+\?(.*)", link["url"])
            assert match and match.group(1) in uids, f"{panel['title']!r}: link to an unknown dashboard {link['url']}"
            target_vars = {v["name"] for v in uids[match.group(1)].variables}
            params = re.findall(r"var-(\w+)=", match.group(2))
            assert params and set(params) <= target_vars, f"{panel['title']!r}: {link['url']}"


def test_every_query_has_an_expectation_and_every_expectation_a_query() -> None:
    keys = {(b.uid, p["title"], t["refId"]) for b, p, t in targets()}
    assert keys == set(EXPECTED), f"without expectation: {keys - set(EXPECTED)}; stale: {set(EXPECTED) - keys}"


# -- Grafana's substitutions, as its source has them --------------------------------------------------------------

def test_template_variables_are_regex_escaped_and_all_is_the_custom_all_value() -> None:
    one = {"gateway": Value(("gw.north-1",))}
    assert interpolate('"gateway" =~ /^$gateway$/', one) == '"gateway" =~ /^gw\\.north-1$/'
    # = '$gateway' is a mistake a test must catch: Grafana escapes the value for a regex there too
    assert interpolate("\"gateway\" = '$gateway'", one) == "\"gateway\" = 'gw\\.north-1'"
    several = {"gateway": Value(("a/b", "c"), multi=True)}
    assert interpolate("/^${gateway}$/ [[gateway]]", several) == "/^(a\\/b|c)$/ (a\\/b|c)"
    assert interpolate("/^$gateway$/", {"gateway": Value(("a", "b"), True, ".*")}) == "/^.*$/"
    assert interpolate("$timeFilter $__interval $unknown", one) == "$timeFilter $__interval $unknown"


def test_backend_macros_and_interval() -> None:
    assert backend_macros("WHERE $timeFilter GROUP BY time($__interval) LIMIT $__interval_ms $interval", 1000, 61000,
                          20000) == "WHERE time >= 1000ms and time <= 61000ms GROUP BY time(20s) LIMIT 20000 20s"
    six_hours = 6 * 3600 * 1000
    assert calculate_interval_ms(0, six_hours, 1000, "10s") == 20_000  # 21.6 s rounds to 20 s
    assert calculate_interval_ms(0, 300_000, 1000, "10s") == 10_000  # the data source's lower bound
    assert calculate_interval_ms(0, 300_000, 1000) == 200
    assert [format_interval(ms) for ms in (200, 20_000, 120_000, 3_600_000, 86_400_000)] == [
        "200ms", "20s", "2m", "1h", "1d"]


def test_variable_values_as_grafana_reads_them() -> None:
    tag_values = [{"name": "m", "columns": ["key", "value"], "values": [["gateway", "a"], ["gateway", "b"]]}]
    assert metric_find_values("SHOW TAG VALUES WITH KEY = gateway", tag_values) == ["a", "b"]
    fields = [{"name": "m", "columns": ["fieldKey", "fieldType"], "values": [["v", "float"], ["n", "integer"]]}]
    assert metric_find_values("SHOW FIELD KEYS FROM m", fields) == ["v", "n"]
    with pytest.raises(GrafanaError, match="no options"):
        Dashboard(Path("x.json"), {"templating": {"list": [
            {"name": "g", "type": "query", "query": "SHOW TAG VALUES", "regex": ""}]}}).resolve_variables(lambda q: [])


# -- every query against the fleet lab ----------------------------------------------------------------------------

def _run(lab: FleetLab, query: str) -> list[dict[str, Any]]:
    return lab.influx.query_series(query, lab.database)


def _rows(series: list[dict[str, Any]]) -> Rows:
    rows: Rows = []
    for one in series:
        for values in one.get("values") or []:
            rows.append({**(one.get("tags") or {}), **dict(zip(one["columns"], values, strict=True))})
    return rows


def _problems(expected: Expect, series: list[dict[str, Any]], rows: Rows) -> list[str]:
    problems: list[str] = []
    if not rows:
        return ["no rows"]
    columns = {c for one in series for c in one["columns"]} - {"time"}
    for column in sorted(expected.columns - columns):
        problems.append(f"no column {column!r} (has {sorted(columns)})")
    for column in sorted(columns):
        if all(r.get(column) is None for r in rows):
            problems.append(f"column {column!r} is null in every row")
    for key, wanted in expected.tags.items():
        have = {(one.get("tags") or {}).get(key) for one in series}
        if not wanted <= have:
            problems.append(f"no series for {key} {sorted(wanted - have)} (has {sorted(h for h in have if h)})")
    if not problems and expected.check is not None:
        try:
            ok = expected.check(rows)
        except (IndexError, ValueError, TypeError) as exc:
            ok, problems = False, [f"check raised {type(exc).__name__}: {exc}"]
        if not ok:
            problems.append(f"values not as expected: {rows[:6]}")
    return problems


@pytest.mark.integration
@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_shows_what_it_is_meant_to_from_the_lab(path: Path, fleet: FleetLab) -> None:
    ds = load_datasources(GRAFANA / "provisioning")[DATASOURCE_UID]
    board = Dashboard.load(path)
    values = board.resolve_variables(lambda q: _run(fleet, q), CHOSEN.get(board.uid, {}))
    now_ms = time.time_ns() // 1_000_000
    # Grafana's "Last 5 minutes": the lab's data is ~20 s old, and a panel's rate of a counter needs two intervals
    # (the interval is the data source's 10 s at the finest; over the default 6 h it would be 20 s).
    span = 5 * 60_000
    failures: list[str] = []
    ran = 0
    for panel, scoped in board.query_panels(values):
        for target in panel["targets"]:
            key = (board.uid, panel["title"], target["refId"])
            interval = panel_interval_ms(panel, ds, now_ms - span, now_ms)
            query = render(target["query"], scoped, now_ms - span, now_ms, interval)
            try:
                series = _run(fleet, query)
            except InfluxError as exc:
                failures.append(f"{panel['title']!r} {target['refId']}: InfluxDB says {exc}\n    {query}")
                continue
            expected = EXPECTED[key]
            if panel.get("repeat"):
                (one,) = scoped[panel["repeat"]].values
                expected = Expect(frozenset({f"mean_{one}"}))
            failures += [f"{panel['title']!r} {target['refId']}: {problem}\n    {query}"
                         for problem in _problems(expected, series, _rows(series))]
            # Bounded by the dashboard's time range: the hour before the lab started shows nothing.
            before = render(target["query"], scoped, fleet.started_ns // 1_000_000 - 7200_000,
                            fleet.started_ns // 1_000_000 - 3600_000, interval)
            stale = [r for r in _rows(_run(fleet, before)) if any(v not in (None, 0) for k, v in r.items()
                                                                  if k != "time" and k not in ("gateway", "device"))]
            if stale:
                failures.append(f"{panel['title']!r} {target['refId']}: shows data outside the time range: {stale[:2]}")
            ran += 1
    assert ran >= 6
    assert not failures, f"{path.name}:\n" + "\n".join(failures)


@pytest.mark.integration
def test_the_device_dashboard_offers_the_devices_measurements_and_fields_of_the_lab(fleet: FleetLab) -> None:
    board = Dashboard.load(GRAFANA / "dashboards" / "citynerve-device.json")
    values = board.resolve_variables(lambda q: _run(fleet, q), {"gateway": NORTH, "device": "meter-1"})
    assert values["measurement"].values == ("electricity",)  # citynerve_* measurements are not offered
    fields = values["field"].values
    assert {"voltage_l1", "power", "energy_import"} <= set(fields)
    assert not [f for f in fields if f.endswith("_quality")]
    assert set(values["device"].options) == {"gps", "meter-1", "meter-dead"}  # the chosen gateway's, no other's
    assert set(values["gateway"].options) == ALL_GATEWAYS
