"""HTTP backends against real servers: influxd 1.6 (v1 API) and VictoriaMetrics (v1 and v2 APIs)."""

from __future__ import annotations

import gzip
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest

from collector.influx.backends import V1Backend, V2Backend, WriteFailure, make_backend
from collector.influx.config import InfluxConfig
from collector.influx.lineproto import encode_line
from labkit.influxd import InfluxdServer
from labkit.process import free_port
from labkit.victoria import VictoriaMetricsServer
from wire.config import ConfigError, Secret, convert

T = 1_700_000_000_000_000_000


def v1(url: str, **kwargs: object) -> InfluxConfig:
    return InfluxConfig(api="v1", url=url, **kwargs)  # type: ignore[arg-type]


def v2(url: str, **kwargs: object) -> InfluxConfig:
    args = {"token": Secret("lab-token"), "org": "lab", "bucket": "citynerve", **kwargs}
    return InfluxConfig(api="v2", url=url, **args)  # type: ignore[arg-type]


def failure_of(backend: V1Backend | V2Backend, body: bytes) -> WriteFailure:
    with pytest.raises(WriteFailure) as info:
        backend.write(body)
    return info.value


# -- config ------------------------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    cfg = InfluxConfig()
    assert (cfg.api, cfg.url, cfg.database, cfg.batch_size, cfg.gzip) == (
        "v1", "http://127.0.0.1:8086", "citynerve", 5000, False,
    )
    assert (float(cfg.flush_interval), float(cfg.retry_initial), float(cfg.retry_max)) == (1.0, 0.5, 30.0)


def test_config_from_toml_values() -> None:
    cfg = convert(
        {"api": "v2", "url": "https://influx.example:8443/", "token": {"env": "PATH"}, "org": "o",
         "bucket": "b", "flush_interval": "250ms", "retry_max": "1m", "timeout": 5},
        InfluxConfig, "collector.toml",
    )
    assert float(cfg.flush_interval) == 0.25 and float(cfg.retry_max) == 60.0 and float(cfg.timeout) == 5.0
    assert cfg.token is not None and cfg.token.origin == "env:PATH"


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        ({"api": "v2", "token": "t", "org": "o"}, "bucket", 'required when api = "v2"'),
        ({"api": "v2", "org": "o", "bucket": "b"}, "token", 'required when api = "v2"'),
        ({"api": "v2", "token": "t", "bucket": "b"}, "org", 'required when api = "v2"'),
        ({"url": "127.0.0.1:8086"}, "url", "must start with http:// or https://"),
        ({"url": "ftp://host"}, "url", "must start with http:// or https://"),
        ({"url": "http://host:99999"}, "url", "not a valid URL"),
        ({"url": "http://host/write"}, "url", "only scheme, host and port"),
        ({"url": "http://user:pw@host"}, "url", "must not hold credentials"),
        ({"url": "http://"}, "url", "has no host"),
        ({"username": "u"}, "password", "required when username is set"),
        ({"database": ""}, "database", 'required when api = "v1"'),
        ({"batch_size": 0}, "batch_size", "expected an integer 1..1000000"),
        ({"batch_size": 10, "max_pending_lines": 5}, "max_pending_lines", "at least batch_size"),
        ({"retry_initial": "0s"}, "retry_initial", "more than 0"),
        ({"retry_initial": "10s", "retry_max": "1s"}, "retry_max", "at least retry_initial"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file", "file not found"),
        ({"bukcet": "x"}, "bukcet", "unknown key"),
    ],
)
def test_config_errors_name_the_key(raw: dict, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        convert(raw, InfluxConfig, "collector.toml")
    assert info.value.path == path
    assert message in info.value.message


def test_make_backend_picks_the_api() -> None:
    assert isinstance(make_backend(v1("http://127.0.0.1:1")), V1Backend)
    backend = make_backend(v2("http://127.0.0.1:1"))
    assert isinstance(backend, V2Backend)
    backend.close()


def test_v1_url_and_headers() -> None:
    backend = V1Backend(v1("http://127.0.0.1:1/", database="d b", retention_policy="rp 1",
                           username=Secret("u"), password=Secret("p"), gzip=True))
    assert backend.write_url == "http://127.0.0.1:1/write?db=d+b&precision=ns&rp=rp+1"
    assert backend._headers["Content-Encoding"] == "gzip"
    assert backend._headers["Authorization"] == "Basic dTpw"
    assert "Content-Encoding" not in V1Backend(v1("http://127.0.0.1:1", gzip=False))._headers


# -- v1 against influxd ------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("gzip", [True, False], ids=["gzip", "plain"])
def test_v1_write_and_read_back(influxd: InfluxdServer, influx_db: str, gzip: bool) -> None:
    backend = V1Backend(v1(influxd.url, database=influx_db, gzip=gzip))
    lines = [encode_line("power", {"site": "north", "phase": f"L{i % 3 + 1}"}, {"w": i * 1.5, "n": i}, T + i)
             for i in range(300)]
    backend.write(b"\n".join(lines))
    backend.close()
    rows = influxd.query('SELECT "w", "n", "phase" FROM "power" ORDER BY time', influx_db)
    assert len(rows) == 300
    assert rows[7] == {"time": T + 7, "w": 10.5, "n": 7, "phase": "L2"}


@pytest.mark.integration
def test_v1_retention_policy(influxd: InfluxdServer, influx_db: str) -> None:
    influxd.query_series(f'CREATE RETENTION POLICY "short" ON "{influx_db}" DURATION 1h REPLICATION 1', None)
    now = time.time_ns()
    V1Backend(v1(influxd.url, database=influx_db, retention_policy="short")).write(b"m v=1 %d" % now)
    assert influxd.query('SELECT * FROM "short"."m"', influx_db) == [{"time": now, "v": 1}]
    assert influxd.query('SELECT * FROM "autogen"."m"', influx_db) == []


@pytest.mark.integration
def test_v1_unknown_retention_policy_is_a_500_and_so_retried(influxd: InfluxdServer, influx_db: str) -> None:
    failure = failure_of(V1Backend(v1(influxd.url, database=influx_db, retention_policy="nope")), b"m v=1 1")
    assert (failure.status, failure.retryable) == (500, True)
    assert failure.reason == "retention policy not found: nope"


@pytest.mark.integration
def test_v1_with_auth(influxd_factory) -> None:
    server = influxd_factory(auth=True)
    server.create_database("secure")
    good = V1Backend(v1(server.url, database="secure", username=Secret(server.admin_user),
                        password=Secret(server.admin_password)))
    good.write(b"m v=1 1")
    assert server.query('SELECT * FROM "m"', "secure") == [{"time": 1, "v": 1}]

    wrong = failure_of(V1Backend(v1(server.url, database="secure", username=Secret(server.admin_user),
                                    password=Secret("wrong"))), b"m v=2 2")
    assert (wrong.status, wrong.retryable, wrong.reason) == (401, False, "authorization failed")

    anonymous = failure_of(V1Backend(v1(server.url, database="secure")), b"m v=2 2")
    assert (anonymous.status, anonymous.retryable) == (401, False)
    assert anonymous.reason == "unable to parse authentication credentials"


@pytest.mark.integration
def test_v1_unknown_database(influxd: InfluxdServer) -> None:
    failure = failure_of(V1Backend(v1(influxd.url, database="no_such_db")), b"m v=1 1")
    assert (failure.status, failure.retryable) == (404, False)
    assert failure.reason == 'database not found: "no_such_db"'
    assert str(failure) == 'HTTP 404: database not found: "no_such_db"'


@pytest.mark.integration
@pytest.mark.parametrize("gzip", [True, False], ids=["gzip", "plain"])
def test_v1_field_type_conflict_is_a_partial_write(influxd: InfluxdServer, influx_db: str, gzip: bool) -> None:
    backend = V1Backend(v1(influxd.url, database=influx_db, gzip=gzip))
    backend.write(b"m v=1.5 1")
    failure = failure_of(backend, b'm v=2.5 2\nm v="text" 3\nm v=4.5 4')
    assert (failure.status, failure.retryable) == (400, False)
    assert failure.reason == (
        'partial write: field type conflict: input field "v" on measurement "m" is type string, '
        "already exists as type float dropped=1"
    )
    # The lines around the bad one were stored: retrying the batch could not help.
    assert [r["v"] for r in influxd.query('SELECT * FROM "m"', influx_db)] == [1.5, 2.5, 4.5]


@pytest.mark.integration
def test_v1_unparsable_line_is_not_retryable(influxd: InfluxdServer, influx_db: str) -> None:
    failure = failure_of(V1Backend(v1(influxd.url, database=influx_db)), b"m v=1 notatime")
    assert (failure.status, failure.retryable) == (400, False)
    assert failure.reason == "unable to parse 'm v=1 notatime': bad timestamp"


# -- what influxd 1.6.7 refuses, and what it stores of the rest of the request --------------------------------
# The table in collector/influx/batcher.py, replayed. One server with low limits for all of them.


@pytest.fixture(scope="module")
def limited_influxd() -> Iterator[InfluxdServer]:
    limits = {"data": {"max-values-per-tag": 3, "max-series-per-database": 5}, "http": {"max-body-size": 2000}}
    with InfluxdServer(settings=limits) as server:
        yield server


_db_counter = iter(range(1, 1_000_000))


def refused(server: InfluxdServer, setup: str | None, body: str, *,
            gzip: bool = False) -> tuple[str, WriteFailure | None, set[tuple[str, str, int, object]]]:
    """A fresh database on `server`, `setup` written, then `body` through V1Backend: the refusal and what is
    stored afterwards, as (measurement, tags, time - T, v)."""
    db = f"refusal_{next(_db_counter)}"
    server.create_database(db)
    if setup:
        server.write(setup, db)
    try:
        V1Backend(v1(server.url, database=db, gzip=gzip)).write(body.encode())
        failure = None
    except WriteFailure as exc:
        failure = exc
    return db, failure, stored_points(server, db)


def stored_points(server: InfluxdServer, db: str) -> set[tuple[str, str, int, object]]:
    points = set()
    for series in server.query_series("SELECT * FROM /.*/ GROUP BY *", db):
        tags = ",".join(f"{k}={v}" for k, v in sorted((series.get("tags") or {}).items()) if v)
        for row in series["values"]:
            values = [v for v in row[1:] if v is not None]
            points.add((series["name"], tags, row[0] - T, values[0] if len(values) == 1 else tuple(values)))
    return points


@pytest.mark.integration
def test_influxd_type_conflict_inside_one_request(limited_influxd: InfluxdServer) -> None:
    # The measurement is already in the shard: a partial write, the first line's type wins.
    _, failure, points = refused(limited_influxd, f"m w=1 {T}", f"m v=1i {T + 1}\nm v=2.5 {T + 2}\nm v=3i {T + 3}")
    assert failure is not None and (failure.status, failure.retryable) == (400, False)
    assert failure.reason == ('partial write: field type conflict: input field "v" on measurement "m" is type '
                              "float, already exists as type integer dropped=1")
    assert points == {("m", "", 0, 1.0), ("m", "", 1, 1), ("m", "", 3, 3)}

    # The measurement is new to the shard (new database; or the first write after a shard rollover): the whole
    # request is refused and nothing is stored, but the field types are recorded, so the same request again is
    # a partial write.
    body = f"a v=1 {T}\nm v=1i {T + 1}\nm v=2.5 {T + 2}\nb v=1 {T + 3}"
    db, failure, points = refused(limited_influxd, None, body)
    assert failure is not None and (failure.status, failure.reason) == (400, "field type conflict")
    assert points == set()
    again = failure_of(V1Backend(v1(limited_influxd.url, database=db, gzip=False)), body.encode())
    assert again.reason.startswith('partial write: field type conflict: input field "v" on measurement "m"')
    assert stored_points(limited_influxd, db) == {("a", "", 0, 1.0), ("m", "", 1, 1), ("b", "", 3, 1.0)}


@pytest.mark.integration
def test_influxd_max_values_per_tag_loses_good_lines_too(limited_influxd: InfluxdServer) -> None:
    existing = "\n".join(f"m,t=v{i} v={i} {T + i}" for i in range(3))
    # The limit is checked against what was stored before the request: one request may pass it.
    _, failure, points = refused(limited_influxd, None, "\n".join(f"m,t=v{i} v={i} {T + i}" for i in range(5)))
    assert failure is None and len(points) == 5
    # Over the limit: the new value's line is dropped, and influxd 1.6.7 loses the good line of an existing
    # series before it as well (its index compacts the shard's list of series keys in place). "dropped=1".
    body = f"m,t=v0 v=10 {T + 10}\nm,t=v1 v=11 {T + 11}\nm,t=v3 v=13 {T + 13}"
    _, failure, points = refused(limited_influxd, existing, body)
    assert failure is not None and failure.status == 400
    assert failure.reason == ('partial write: max-values-per-tag limit exceeded (3/3): measurement="m" tag="t" '
                              'value="v3" dropped=1')
    assert points == {("m", "t=v0", 0, 0.0), ("m", "t=v1", 1, 1.0), ("m", "t=v2", 2, 2.0),
                      ("m", "t=v1", 11, 11.0)}  # v0 at +10 is lost, though not counted as dropped


@pytest.mark.integration
def test_influxd_max_series_per_database_counts_lines(limited_influxd: InfluxdServer) -> None:
    # 6 lines of ONE new series against a limit of 5 series: every line of it dropped; 5 lines pass.
    _, failure, points = refused(limited_influxd, None, "\n".join(f"m v={i} {T + i}" for i in range(6)))
    assert failure is not None and failure.status == 400
    assert failure.reason == "partial write: max-series-per-database limit exceeded: (5) dropped=6"
    assert points == set()
    _, failure, points = refused(limited_influxd, None, "\n".join(f"m v={i} {T + i}" for i in range(5)))
    assert failure is None and len(points) == 5
    # 4 series exist, 2 new ones in the request: both dropped, and the good line of an existing series too.
    existing = "\n".join(f"{m},s={s} v=1 {T}" for m in "mn" for s in "ab")
    _, failure, points = refused(limited_influxd, existing, f"m,s=a v=2 {T + 10}\no v=1 {T + 11}\np v=1 {T + 12}")
    assert failure is not None and failure.reason.startswith("partial write: max-series-per-database limit")
    assert ("m", "s=a", 10, 2.0) not in points and len(points) == 4


@pytest.mark.integration
def test_influxd_retention_parse_and_time_field(limited_influxd: InfluxdServer) -> None:
    now = time.time_ns()
    db = f"refusal_{next(_db_counter)}"
    limited_influxd.create_database(db)
    limited_influxd.query_series(f'CREATE RETENTION POLICY "short" ON "{db}" DURATION 1h REPLICATION 1 DEFAULT')
    backend = V1Backend(v1(limited_influxd.url, database=db, gzip=False))
    failure = failure_of(backend, b"r v=1 %d\nr v=2 %d\nr v=3 %d" % (now, now - 3 * 3600 * 10**9, now + 5))
    assert (failure.status, failure.reason) == (400, "partial write: points beyond retention policy dropped=1")
    assert [row["v"] for row in limited_influxd.query("SELECT v FROM r", db)] == [1, 3]

    _, failure, points = refused(limited_influxd, None, f"m v=1 {T + 1}\nm v= {T + 2}\nm v=3 {T + 3}\ngarbage")
    assert failure is not None and failure.status == 400
    assert failure.reason == (f"partial write: unable to parse 'm v= {T + 2}': missing field value\n"
                              "unable to parse 'garbage': missing fields dropped=0")
    assert points == {("m", "", 1, 1.0), ("m", "", 3, 3.0)}

    _, failure, points = refused(limited_influxd, None, f"m time=1 {T}\nm v=1 {T + 1}")
    assert failure is not None and failure.reason == (
        'partial write: invalid field name: input field "time" on measurement "m" is invalid dropped=1')
    assert points == {("m", "", 1, 1.0)}


@pytest.mark.integration
def test_influxd_body_too_large(limited_influxd: InfluxdServer) -> None:
    body = "\n".join(f"m v={i} {T + i}" for i in range(80))
    assert len(body) > 2000
    _, failure, points = refused(limited_influxd, None, body)
    assert failure is not None and (failure.status, failure.retryable) == (413, False)
    assert failure.reason == "Request Entity Too Large"
    assert points == set()
    # With gzip, max-body-size applies to the compressed body: 13 KB of lines in 1.1 KB pass. (The series
    # exists first: 500 lines of a new one would pass max-series-per-database = 5, see above.)
    body = "\n".join(f"m v=1 {T + i}" for i in range(500))
    _, failure, points = refused(limited_influxd, f"m v=1 {T}", body, gzip=True)
    assert failure is None and len(points) == 500


def test_v1_connection_refused_is_retryable() -> None:
    failure = failure_of(V1Backend(v1(f"http://127.0.0.1:{free_port()}")), b"m v=1 1")
    assert (failure.status, failure.retryable) == (None, True)
    assert failure.reason == "connection failed: Connection refused"


def test_v1_timeout_is_retryable() -> None:
    # A real listening socket that never answers: the connection opens, the response never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        backend = V1Backend(v1(f"http://127.0.0.1:{port}", timeout=0.3))
        started = time.monotonic()
        failure = failure_of(backend, b"m v=1 1")
        assert time.monotonic() - started < 2
    assert (failure.status, failure.retryable) == (None, True)
    assert failure.reason.startswith("timed out")


@pytest.mark.integration
def test_v1_to_victoria_metrics_adds_the_db_label(victoria: VictoriaMetricsServer) -> None:
    now = time.time_ns()
    V1Backend(v1(victoria.url, database="labdb")).write(encode_line("v1vm", {"site": "a"}, {"w": 2.5}, now))
    (sample,) = victoria.export_samples('{__name__="v1vm_w"}', expect=1)
    assert (sample.labels, sample.value, sample.timestamp_ms) == ({"db": "labdb", "site": "a"}, 2.5, now // 10**6)


# -- v2 (influxdb-client) ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("gzip", [True, False], ids=["gzip", "plain"])
def test_v2_write_to_victoria_metrics_and_read_back(victoria: VictoriaMetricsServer, gzip: bool) -> None:
    measurement = f"v2vm_{'gz' if gzip else 'plain'}"
    now = time.time_ns() // 10**6 * 10**6
    backend = V2Backend(v2(victoria.url, gzip=gzip))
    lines = [encode_line(measurement, {"device": f"meter-{i % 2}", "empty": ""},
                         {"w": i + 0.25, "n": i, "ok": i % 2 == 0}, now + i * 10**6) for i in range(10)]
    backend.write(b"\n".join(lines))
    backend.close()
    samples = victoria.export_samples(f'{{__name__=~"{measurement}_.*"}}', expect=30)
    assert len(samples) == 30
    by_name: dict[str, list] = {}
    for s in samples:
        by_name.setdefault(s.name, []).append(s)
    assert sorted(by_name) == [f"{measurement}_n", f"{measurement}_ok", f"{measurement}_w"]
    w = sorted(by_name[f"{measurement}_w"], key=lambda s: s.timestamp_ms)
    assert [s.value for s in w] == [i + 0.25 for i in range(10)]
    assert [s.timestamp_ms for s in w] == [now // 10**6 + i for i in range(10)]
    assert [s.labels for s in w[:2]] == [{"device": "meter-0"}, {"device": "meter-1"}]
    assert sorted(s.value for s in by_name[f"{measurement}_ok"]) == [0.0] * 5 + [1.0] * 5


@pytest.mark.integration
def test_v2_bad_lines_in_a_batch_are_skipped_by_victoria_metrics(victoria: VictoriaMetricsServer) -> None:
    """VictoriaMetrics never refuses a batch for its content: what it cannot parse it skips (and logs), and
    it answers 204 all the same. Every value becomes a float, so there are no type conflicts; a string
    becomes 0."""
    now = time.time_ns() // 10**6 * 10**6
    backend = V2Backend(v2(victoria.url))
    backend.write(b"vmbad_a v=1 %d\nvmbad_b v= %d\ngarbage\nvmbad_c v=\"text\" %d\nvmbad_d v=2i %d\nvmbad_a v=true %d"
                  % (now, now, now, now, now + 10**6))
    backend.close()
    samples = victoria.export_samples('{__name__=~"vmbad_.*"}', expect=4)
    assert [(s.name, s.value, s.timestamp_ms - now // 10**6) for s in samples] == [
        ("vmbad_a_v", 1.0, 0), ("vmbad_a_v", 1.0, 1), ("vmbad_c_v", 0.0, 0), ("vmbad_d_v", 2.0, 0)]


@pytest.mark.integration
def test_victoria_metrics_reads_the_float_spelling_of_the_json_path(victoria: VictoriaMetricsServer) -> None:
    """A reading of floats only is written by msgspec's JSON encoder (collector/influx/lineproto.py), whose
    exponents are spelled 1e16, 1.5e-7 and 0.00001: VictoriaMetrics stores what it stores for repr()'s spelling
    of the same values (its own storage keeps about 15 digits and no negative zero, whichever the spelling)."""
    now = time.time_ns() // 10**6 * 10**6
    fields = {"a": 1e16, "b": 1.5e-07, "c": 1e-05, "d": -0.0, "e": 230.12, "f": 1.7976931348623157e308}
    line = encode_line("vmjson", {}, fields, now)
    assert b"a=1e16,b=1.5e-7,c=0.00001," in line  # the JSON path's spelling
    by_repr = "vmrepr " + ",".join(f"{k}={v!r}" for k, v in fields.items()) + f" {now}"
    assert "a=1e+16,b=1.5e-07,c=1e-05," in by_repr
    backend = V2Backend(v2(victoria.url))
    backend.write(line + b"\n" + by_repr.encode())
    backend.close()
    samples = victoria.export_samples('{__name__=~"vm(json|repr)_.*"}', expect=2 * len(fields))
    stored = {(s.name.partition("_")[0], s.name.partition("_")[2]): s.value for s in samples}
    assert {k: stored[("vmjson", k)] for k in fields} == {k: stored[("vmrepr", k)] for k in fields}
    assert [stored[("vmjson", k)] for k in "abce"] == [1e16, 1.5e-07, 1e-05, 230.12]


def test_v2_connection_refused_is_retryable() -> None:
    backend = V2Backend(v2(f"http://127.0.0.1:{free_port()}"))
    failure = failure_of(backend, b"m v=1 1")
    backend.close()
    assert (failure.status, failure.retryable) == (None, True)
    assert failure.reason == "connection failed: Connection refused"


@pytest.mark.integration
def test_v2_http_error_is_mapped(influxd: InfluxdServer) -> None:
    # influxd 1.6 has no /api/v2/write (1.8 added it): a real 4xx through influxdb-client's ApiException.
    backend = V2Backend(v2(influxd.url))
    failure = failure_of(backend, b"m v=1 1")
    backend.close()
    assert (failure.status, failure.retryable) == (404, False)
    assert failure.reason == "404 page not found"


class _Overloaded(http.server.BaseHTTPRequestHandler):
    """A real HTTP server for the one answer influxd cannot be made to give on demand: 503 + Retry-After."""

    requests: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append((self.path, dict(self.headers), body))
        payload = b'{"code":"unavailable","message":"overloaded, come back later"}'
        self.send_response(503)
        self.send_header("Retry-After", "7")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def overloaded() -> Iterator[str]:
    _Overloaded.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Overloaded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_one_request_per_write_gzip_and_retry_after(overloaded: str, api: str) -> None:
    """No retries inside the backends (BatchWriter is the only retry policy), the body really is gzip,
    and a 503's Retry-After and JSON message come through."""
    backend = make_backend(v1(overloaded, gzip=True) if api == "v1" else v2(overloaded, gzip=True))
    body = b"\n".join(b"m v=%di %d" % (i, i) for i in range(100))
    failure = failure_of(backend, body)
    backend.close()
    assert (failure.status, failure.retryable, failure.retry_after) == (503, True, 7.0)
    assert failure.reason == "overloaded, come back later"
    (path, headers, sent), = _Overloaded.requests
    assert path.startswith("/write?" if api == "v1" else "/api/v2/write?")
    assert "precision=ns" in path
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(sent) == body
