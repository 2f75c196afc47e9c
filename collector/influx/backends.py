"""One body of line protocol to InfluxDB over HTTP: synchronous, called from the batcher's worker thread.

Both backends make exactly one HTTP request per write() and raise WriteFailure on anything but a 2xx; they
never retry on their own (urllib3 retries are off), so BatchWriter is the only retry policy.

What counts as retryable: 5xx, 429, 408, timeouts and connection errors (the server is down, overloaded or
restarting: the same body will be accepted later). Any other 4xx is the data's or the configuration's fault
and will fail the same way every time: bad line protocol or a field type conflict (400, InfluxDB's "partial
write: ..." text: lines before and after the bad one are stored), bad credentials (401/403), unknown database
(404), body too large (413).

Caveat: InfluxDB 1.x answers an unknown retention policy with 500 "retention policy not found", so that
configuration mistake is retried (and logged) until someone creates the policy; nothing is lost meanwhile.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import ssl
import warnings
from typing import Any
from urllib.parse import urlencode

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import InsecureRequestWarning, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from collector.influx.config import InfluxConfig, base_url
from wire.config import redact, redact_url

log = logging.getLogger(__name__)

_RETRYABLE_4XX = frozenset({408, 429})
# Line protocol compresses about 10:1 at level 1, and levels above that cost several times the CPU for a few
# per cent less: the collector's CPU is the scarcer resource.
_GZIP_LEVEL = 1


class WriteFailure(Exception):
    """A write that did not succeed. `reason` is the server's own message when it sent one."""

    def __init__(
        self, status: int | None, reason: str, retryable: bool, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after  # seconds, from a Retry-After header (429/503), else None
        super().__init__(f"HTTP {status}: {reason}" if status is not None else reason)


def is_retryable_status(status: int) -> bool:
    return status >= 500 or status in _RETRYABLE_4XX


def server_reason(status: int, body: bytes | str, headers: Any, http_reason: str | None = None) -> str:
    """The server's own explanation: 1.x {"error": ...}, 2.x {"message": ...}, a header, or the body text."""
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", "replace")
    text = body.strip() if body else ""
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            for key in ("error", "message"):
                if isinstance(doc.get(key), str) and doc[key]:
                    return doc[key]
    if headers is not None:
        for name in ("X-Influxdb-Error", "X-Platform-Error-Code"):
            value = headers.get(name)
            if value:
                return str(value)
    if text:
        return text[:2000]
    return http_reason or f"HTTP {status}"


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare enough to fall back on the normal backoff
    return seconds if seconds >= 0 else None


def _basic_auth(cfg: InfluxConfig) -> str | None:
    if cfg.username is None or cfg.password is None:
        return None
    return base64.b64encode(f"{cfg.username.value}:{cfg.password.value}".encode()).decode("ascii")


def _scrubbed(cfg: InfluxConfig, text: str) -> str:
    # Every reason ends up in a log line: a library's or a server's text quoting a URL or echoing a credential
    # (also as the Basic header's base64) must not carry it there.
    return redact(text, _basic_auth(cfg), cfg.password, cfg.token)  # a user name is no secret: kept


def _connection_failure(cfg: InfluxConfig, exc: BaseException) -> WriteFailure:
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2.x: a refused connection is no timeout.
    if isinstance(exc, Urllib3Timeout) and not isinstance(exc, NewConnectionError):
        return WriteFailure(None, _scrubbed(cfg, f"timed out: {_describe(exc)}"), retryable=True)
    return WriteFailure(None, _scrubbed(cfg, f"connection failed: {_describe(exc)}"), retryable=True)


def _describe(exc: BaseException) -> str:
    # urllib3 nests the interesting part ("Connection refused") inside wrappers: show the innermost text.
    seen = exc
    while True:
        inner = getattr(seen, "reason", None)
        if isinstance(inner, BaseException) and inner is not seen:
            seen = inner
            continue
        nxt = seen.__cause__ or seen.__context__
        if isinstance(nxt, OSError) and nxt is not seen:
            seen = nxt
            continue
        break
    if isinstance(seen, OSError) and seen.strerror:
        return seen.strerror
    return str(seen) or type(seen).__name__


def _warn_insecure(cfg: InfluxConfig) -> None:
    if cfg.url.startswith("https") and not cfg.tls_verify:
        log.warning("TLS certificate verification is off for %s (tls_verify = false)", redact_url(cfg.url))


class V1Backend:
    """POST {url}/write?db=&rp=&precision=ns with urllib3: InfluxDB 1.x, or any server with its 1.x API."""

    def __init__(self, cfg: InfluxConfig) -> None:
        self.cfg = cfg
        params = {"db": cfg.database, "precision": "ns"}
        if cfg.retention_policy:
            params["rp"] = cfg.retention_policy
        self.write_url = f"{base_url(cfg.url)}/write?{urlencode(params)}"
        self._headers = {"Content-Type": "text/plain; charset=utf-8", "Accept": "application/json"}
        if cfg.gzip:
            self._headers["Content-Encoding"] = "gzip"
        if cfg.username is not None and cfg.password is not None:
            pair = f"{cfg.username.value}:{cfg.password.value}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        elif cfg.token is not None:  # InfluxDB 2.x/3.x 1.x-compatibility API
            self._headers["Authorization"] = "Token " + cfg.token.value
        self._timeout = urllib3.Timeout(total=float(cfg.timeout))
        pool_args: dict[str, Any] = {"num_pools": 2, "maxsize": 2, "retries": False}
        if cfg.url.startswith("https"):
            _warn_insecure(cfg)
            pool_args["cert_reqs"] = ssl.CERT_REQUIRED if cfg.tls_verify else ssl.CERT_NONE
            if cfg.ca_file:
                pool_args["ca_certs"] = cfg.ca_file
        self._pool = urllib3.PoolManager(**pool_args)

    def write(self, body: bytes) -> None:
        if self.cfg.gzip:
            body = gzip.compress(body, compresslevel=_GZIP_LEVEL, mtime=0)
        try:
            if not self.cfg.tls_verify:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                    response = self._request(body)
            else:
                response = self._request(body)
        except Urllib3Error as exc:
            raise _connection_failure(self.cfg, exc) from exc
        status = response.status
        if 200 <= status < 300:
            return
        raise WriteFailure(
            status,
            _scrubbed(self.cfg, server_reason(status, response.data, response.headers, response.reason)),
            retryable=is_retryable_status(status),
            retry_after=_retry_after(response.headers),
        )

    def _request(self, body: bytes) -> urllib3.BaseHTTPResponse:
        return self._pool.request(
            "POST", self.write_url, body=body, headers=self._headers, timeout=self._timeout,
            retries=False, redirect=False,
        )

    def query(self, q: str, epoch: str | None = None) -> dict[str, Any]:
        """GET {url}/query (InfluxQL, read-only statements): the parsed JSON answer, or WriteFailure. `epoch`
        ("ns", "ms", ...): times as integers in that unit instead of RFC 3339 text."""
        params = {"db": self.cfg.database, "q": q}
        if epoch is not None:
            params["epoch"] = epoch
        if self.cfg.retention_policy:
            params["rp"] = self.cfg.retention_policy
        headers = {k: v for k, v in self._headers.items() if k == "Authorization"}
        url = f"{base_url(self.cfg.url)}/query?{urlencode(params)}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InsecureRequestWarning)
                response = self._pool.request("GET", url, headers=headers, timeout=self._timeout,
                                              retries=False, redirect=False)
        except Urllib3Error as exc:
            raise _connection_failure(self.cfg, exc) from exc
        if not 200 <= response.status < 300:
            raise WriteFailure(response.status, _scrubbed(self.cfg, server_reason(
                response.status, response.data, response.headers, response.reason)), retryable=True)
        try:
            doc = json.loads(response.data)
        except ValueError as exc:
            raise WriteFailure(response.status, f"not JSON: {exc}", retryable=True) from None
        return doc if isinstance(doc, dict) else {}

    def close(self) -> None:
        self._pool.clear()

    def __repr__(self) -> str:
        return f"V1Backend({redact_url(self.cfg.url)}, db={self.cfg.database!r})"


class V2Backend:
    """POST {url}/api/v2/write through influxdb-client's synchronous write API."""

    def __init__(self, cfg: InfluxConfig) -> None:
        # Imported here: influxdb-client (and reactivex behind it) is only needed for api = "v2".
        from influxdb_client import InfluxDBClient, WritePrecision
        from influxdb_client.client.write_api import SYNCHRONOUS

        assert cfg.token is not None
        self.cfg = cfg
        if cfg.url.startswith("https"):
            _warn_insecure(cfg)
        self._precision = WritePrecision.NS
        self._client = InfluxDBClient(
            url=base_url(cfg.url),
            token=cfg.token.value,
            org=cfg.org,
            timeout=int(float(cfg.timeout) * 1000),  # milliseconds
            enable_gzip=cfg.gzip,
            verify_ssl=cfg.tls_verify,
            ssl_ca_cert=cfg.ca_file,
            retries=False,  # no urllib3 retries: BatchWriter retries
            connection_pool_maxsize=2,
        )
        # SYNCHRONOUS: one HTTP request per call, errors raised to us (the batching mode would retry and
        # buffer on its own).
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def write(self, body: bytes) -> None:
        from influxdb_client.rest import ApiException

        try:
            self._write_api.write(
                bucket=self.cfg.bucket, org=self.cfg.org, record=body, write_precision=self._precision
            )
        except ApiException as exc:
            status = int(exc.status) if exc.status else None
            if status is None:
                raise WriteFailure(None, _scrubbed(self.cfg, str(exc.reason or exc)), retryable=True) from exc
            raise WriteFailure(
                status,
                _scrubbed(self.cfg, server_reason(status, exc.body or b"", exc.headers, exc.reason)),
                retryable=is_retryable_status(status),
                retry_after=_retry_after(exc.headers),
            ) from exc
        except Urllib3Error as exc:
            raise _connection_failure(self.cfg, exc) from exc
        except OSError as exc:
            raise WriteFailure(None, _scrubbed(self.cfg, f"connection failed: {_describe(exc)}"),
                               retryable=True) from exc

    def close(self) -> None:
        self._write_api.close()
        self._client.close()

    def __repr__(self) -> str:
        return f"V2Backend({redact_url(self.cfg.url)}, bucket={self.cfg.bucket!r})"


def make_backend(cfg: InfluxConfig) -> V1Backend | V2Backend:
    return V1Backend(cfg) if cfg.api == "v1" else V2Backend(cfg)
