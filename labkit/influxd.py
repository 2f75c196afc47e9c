"""A real InfluxDB 1.x (Debian's influxd) on free loopback ports, with all its state in a temp dir.

    with InfluxdServer() as influx:
        influx.create_database("citynerve")
        ...  # write to influx.url
        rows = influx.query('SELECT * FROM "power"', db="citynerve")  # [{"time": ns, "w": 1.5, ...}]

It starts in a few tens of milliseconds. restart() comes back on the same port with the same data, as a
fault test needs; kill() is SIGKILL (the WAL is fsynced on every write, so acknowledged points survive).

auth=True turns on HTTP authentication. influxd 1.x lets anyone run CREATE USER ... WITH ALL PRIVILEGES while
no admin user exists ("create admin user first or disable authentication"); start() does exactly that once,
then every request needs credentials: the helpers here send the admin's.

settings adds or overrides keys of the config file's sections, e.g. limits a test wants to reach quickly:

    InfluxdServer(settings={"data": {"max-values-per-tag": 3, "max-series-per-database": 10},
                            "http": {"max-body-size": 1000}})

config runs a given configuration file instead of the lab's, with only its paths, ports and log level replaced
(`render_config`): the shipped production settings (SHIPPED_CONFIG, deploy/influxdb/influxdb.conf) or Debian's
packaged file (DEBIAN_CONFIG: every setting at its default), as the benchmarks compare them; `env` adds to the
process's environment (GOGC, as deploy/influxdb/influxdb.service.d sets it):

    InfluxdServer(config=SHIPPED_CONFIG, env=shipped_environment())
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from labkit.process import LabServer, ServerProcess, free_port

INFLUXD = shutil.which("influxd") or "/usr/bin/influxd"
REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "deploy" / "influxdb" / "influxdb.conf"
SHIPPED_DROP_IN = REPO / "deploy" / "influxdb" / "influxdb.service.d" / "citynerve.conf"
DEBIAN_CONFIG = Path("/etc/influxdb/influxdb.conf")


def shipped_environment(drop_in: Path = SHIPPED_DROP_IN) -> dict[str, str]:
    """The Environment= lines of the shipped systemd drop-in, as influxd gets them in production."""
    env = {}
    for line in drop_in.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key.strip()] = value.strip()
    return env


def render_config(text: str, directory: Path, port: int, rpc_port: int, log_level: str) -> str:
    """A production influxdb.conf with the lab's directories (everything under /var/lib/influxdb/ moves to
    `directory`), loopback ports and log level; any other absolute production path is refused, so the lab runs
    the file's own settings and nothing else."""
    text = text.replace("/var/lib/influxdb/", f"{directory}/")
    lines = [ln for ln in text.splitlines() if not ln.startswith(("bind-address", "reporting-"))]
    out = _with_settings("\n".join([f'bind-address = "127.0.0.1:{rpc_port}"', "reporting-disabled = true", *lines]),
                         {"http": {"bind-address": f"127.0.0.1:{port}"}, "logging": {"level": log_level}})
    for number, line in enumerate(out.splitlines(), 1):
        if any(root in line for root in ('"/etc/', '"/var/', '"/run/')) and not line.lstrip().startswith("#"):
            raise ValueError(f"line {number}: a production path the lab cannot map: {line.strip()!r}")
    return out


class InfluxError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}")


class InfluxdServer(LabServer):
    name = "influxd"

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        auth: bool = False,
        admin_user: str = "admin",
        admin_password: str = "lab-admin-password",
        log_level: str = "info",
        start_timeout: float = 10.0,
        settings: Mapping[str, Mapping[str, bool | int | str]] | None = None,
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(directory, start_timeout)
        self.settings = {section: dict(keys) for section, keys in (settings or {}).items()}
        self.config = config
        self.env = dict(env or {})
        self.auth = auth
        self.admin_user = admin_user
        self.admin_password = admin_password
        self.log_level = log_level
        self.config_path = self.directory / "influxdb.conf"
        self.rpc_port = 0
        self._admin_created = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------------------------

    def _choose_ports(self) -> None:
        self.port, self.rpc_port = free_port(), free_port()

    def _after_start(self) -> None:
        if self.auth and not self._admin_created:
            self._request(
                "POST", "/query",
                {"q": f"CREATE USER \"{self.admin_user}\" WITH PASSWORD '{self.admin_password}' "
                      "WITH ALL PRIVILEGES"},
                credentials=False,
            )
            self._admin_created = True

    def _new_process(self) -> ServerProcess:
        self._write_config()
        return ServerProcess(
            "influxd",
            [INFLUXD, "-config", str(self.config_path)],
            self.log_path,
            ready=self.ping,
            env=self.env or None,
            start_timeout=self.start_timeout,
        )

    def _write_config(self) -> None:
        d = self.directory
        if self.config is not None:
            text = render_config(self.config.read_text(), d, self.port, self.rpc_port, self.log_level)
            self.config_path.write_text(_with_settings(text, self.settings))
            return
        text = (
            f"""\
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"

[meta]
  dir = "{d / 'meta'}"
  logging-enabled = false

[data]
  dir = "{d / 'data'}"
  wal-dir = "{d / 'wal'}"
  wal-fsync-delay = "0s"
  query-log-enabled = false
  trace-logging-enabled = false

[coordinator]
  log-queries-after = "0s"

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[shard-precreation]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
  pprof-enabled = false

[logging]
  level = "{self.log_level}"
  suppress-logo = true
"""
        )
        self.config_path.write_text(_with_settings(text, self.settings))

    # -- HTTP helpers (stdlib only) -------------------------------------------------------------------------

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=0.5) as response:
                return response.status == 204
        except (OSError, urllib.error.URLError):
            return False

    def create_database(self, name: str) -> None:
        self._request("POST", "/query", {"q": f"CREATE DATABASE {quote_ident(name)}"})

    def drop_database(self, name: str) -> None:
        self._request("POST", "/query", {"q": f"DROP DATABASE {quote_ident(name)}"})

    def write(self, body: bytes | str, db: str, rp: str = "", precision: str = "ns") -> None:
        """Write raw line protocol (for setting up a test, e.g. a field type to conflict with)."""
        params = {"db": db, "precision": precision}
        if rp:
            params["rp"] = rp
        self._request("POST", "/write", params, body=body.encode() if isinstance(body, str) else body)

    def query_series(self, q: str, db: str | None = None) -> list[dict[str, Any]]:
        """The raw series of every statement: [{"name", "tags"?, "columns", "values"}], times as int ns."""
        params = {"q": q, "epoch": "ns"}
        if db is not None:
            params["db"] = db
        doc = json.loads(self._request("GET", "/query", params))
        series: list[dict[str, Any]] = []
        for result in doc.get("results", []):
            if "error" in result:
                raise InfluxError(200, result["error"])
            series.extend(result.get("series", []))
        return series

    def query(self, q: str, db: str | None = None) -> list[dict[str, Any]]:
        """Rows as dicts: {"time": int ns, column: value, ...}; with GROUP BY, the series' tags are merged in
        (a field of the same name wins)."""
        rows: list[dict[str, Any]] = []
        for series in self.query_series(q, db):
            tags = series.get("tags") or {}
            columns = series["columns"]
            for values in series.get("values", []):
                row = dict(tags)
                row.update(zip(columns, values, strict=True))
                rows.append(row)
        return rows

    def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        body: bytes | None = None,
        credentials: bool = True,
    ) -> bytes:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        if method == "POST" and body is None:
            body = b""
        request = urllib.request.Request(url, data=body, method=method)
        if self.auth and credentials:
            pair = f"{self.admin_user}:{self.admin_password}".encode()
            request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError, AttributeError):
                text = json.loads(text).get("error", text)
            raise InfluxError(exc.code, text) from None
        if path == "/query" and data:
            doc = json.loads(data)
            if isinstance(doc, dict) and doc.get("error"):
                raise InfluxError(200, doc["error"])
        return data


def _with_settings(text: str, settings: Mapping[str, Mapping[str, bool | int | str]]) -> str:
    """The config text with each section's keys replaced or added (a section it lacks is appended)."""
    lines = text.splitlines()
    for section, keys in settings.items():
        header = f"[{section}]"
        if header not in lines:
            lines += ["", header]
        start = lines.index(header) + 1
        end = start
        while end < len(lines) and lines[end].strip() and not lines[end].startswith("["):
            end += 1
        body = [ln for ln in lines[start:end] if ln.split("=")[0].strip() not in keys]
        body += [f"  {key} = {_toml_value(value)}" for key, value in keys.items()]
        lines[start:end] = body
    return "\n".join(lines) + "\n"


def _toml_value(value: bool | int | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_string(value: str) -> str:
    """An InfluxQL string literal in single quotes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
