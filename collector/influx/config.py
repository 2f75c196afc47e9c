"""The [influx] section of collector.toml: where and how the collector writes line protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from wire.config import Duration, Secret, invalid, redact_url


class InfluxConfig(msgspec.Struct, forbid_unknown_fields=True):
    # "v1": POST /write?db=&rp=&precision=ns (InfluxDB 1.x, and the 1.x compatibility API of 2.x/3.x and
    #       VictoriaMetrics), with username/password (HTTP basic auth) or, for 2.x/3.x, a token.
    # "v2": POST /api/v2/write through influxdb-client (InfluxDB 2.x/3.x, 1.8+ with its v2 API,
    #       VictoriaMetrics), with token, org and bucket.
    api: Literal["v1", "v2"] = "v1"
    url: str = "http://127.0.0.1:8086"
    # v1
    database: str = "citynerve"
    retention_policy: str = ""
    username: Secret | None = None
    password: Secret | None = None
    # v2 (for InfluxDB 1.8 through its v2 API: token = "user:password", bucket = "database/retention_policy")
    token: Secret | None = None
    org: str = ""
    bucket: str = ""
    # The resolution readings' sample times are stored at: "ns" (as stamped), "us", "ms" or "s" (cut to it).
    # The collector's own records keep ns. Measured in docs/benchmarks.md "Store": no difference to the store's
    # CPU worth having; two readings of one device within one unit would become one point.
    precision: Literal["ns", "us", "ms", "s"] = "ns"
    # batching and retries
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 5000
    flush_interval: Duration = Duration(1.0)
    timeout: Duration = Duration(10.0)
    # Compress each write (gzip, HTTP Content-Encoding). Off by default: the store decompresses every byte again,
    # ~11 % of influxd's CPU in its profile and 1.16x readings per store CPU-second without it (bench/store.py,
    # docs/benchmarks.md "Store"), and the collector saves its own gzip (~7 % of its CPU). Turn it on when the store
    # is reached over a metered or slow link: it sends ~6x fewer bytes.
    gzip: bool = False
    retry_initial: Duration = Duration(0.5)
    retry_max: Duration = Duration(30.0)
    max_pending_lines: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    # TLS, for an https:// url
    ca_file: str | None = None
    tls_verify: bool = True

    def __post_init__(self) -> None:
        _check_url(self.url)
        if self.api == "v1":
            if not self.database:
                raise invalid("database", 'required when api = "v1"')
            if self.username is not None and self.password is None:
                raise invalid("password", "required when username is set")
            if self.password is not None and self.username is None:
                raise invalid("username", "required when password is set")
        else:
            for key in ("token", "org", "bucket"):
                if not getattr(self, key):
                    raise invalid(key, 'required when api = "v2"')
        if self.timeout <= 0:
            raise invalid("timeout", "must be more than 0 seconds")
        if self.retry_initial <= 0:
            raise invalid("retry_initial", "must be more than 0 seconds")
        if self.retry_max < self.retry_initial:
            raise invalid("retry_max", f"must be at least retry_initial ({float(self.retry_initial):g}s)")
        if self.max_pending_lines < self.batch_size:
            raise invalid("max_pending_lines", f"must be at least batch_size ({self.batch_size})")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise invalid("ca_file", f"file not found: {self.ca_file}")


def _check_url(url: str) -> None:
    problem = None
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        parts, port, problem = None, None, "not a valid URL"
    if parts is not None:
        if parts.scheme not in ("http", "https"):
            problem = "must start with http:// or https://"
        elif not parts.hostname:
            problem = "has no host"
        elif parts.username is not None or parts.password is not None:
            problem = "must not hold credentials: use username/password or token"
        elif parts.path not in ("", "/") or parts.query or parts.fragment:
            problem = "must be only scheme, host and port"
        elif port == 0:
            problem = "port must be 1..65535"
    if problem:
        example = "http://127.0.0.1:8086"
        # redact_url: the url this message quotes may be the one holding the credentials it complains about.
        raise invalid("url", f'expected http(s)://host[:port] such as "{example}": {problem}, got "{redact_url(url)}"')


def base_url(url: str) -> str:
    """The url without a trailing slash, ready for appending a path."""
    return url.rstrip("/")
