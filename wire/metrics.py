"""What both programs share to be scraped by Prometheus: the `[metrics]` section, a histogram the pure cores can
keep without a metrics library, and the `/metrics` route of the small HTTP/1.1 server that runs on the program's
own event loop (wire/http.py, written here for /metrics and shared since with the collector's fleet page).

One concurrency boundary (docs/architecture.md "Threads and loops"): prometheus_client's own server
(`start_http_server`) answers from a thread of its own, which would read the loop's state while the loop changes
it. Here the request is read, the text rendered (`render()`, which calls prometheus_client.generate_latest with
collectors that read the programs' counters) and the answer written, all on the loop: a scrape sees the state
between two of the loop's steps, never half of one.

GET or HEAD of `/metrics`; other paths are 404, other methods on /metrics 405 with `Allow` (RFC 9110 §15.5.6);
the server's bounds (head, time, connections; a body is never read) are wire/http.py's. No compression: a
collector's scrape is ~1 MB at 10,000 gateways, which a LAN carries in milliseconds.

    settings = MetricsSettings(listen="127.0.0.1:9108")
    server = MetricsServer(settings, render=lambda: generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
    await server.start()                 # binds now: a port in use is a one-line error (MetricsError)
    task = asyncio.create_task(server.serve(), name="metrics")
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec

from wire import http
from wire.config import invalid
from wire.http import MAX_CONNECTIONS, REQUEST_TIMEOUT, WRITE_TIMEOUT, HttpError, HttpServer, Request, Response
from wire.http import is_loopback as is_loopback
from wire.logs import RateLimitedLog

log = logging.getLogger("citynerve.metrics")

PATH = "/metrics"
# What connections may take and hold: wire/http.py's bounds (MAX_HEAD, REQUEST_TIMEOUT, WRITE_TIMEOUT,
# MAX_CONNECTIONS: Prometheus opens one per scrape, two when an HA pair scrapes).

# The metrics endpoint cannot be served (the port is taken, the address is not this machine's): one line.
MetricsError = HttpError


class MetricsSettings(msgspec.Struct, forbid_unknown_fields=True):
    """`[metrics]`: serve Prometheus metrics at http://<listen>/metrics. The section's presence turns it on.

    listen: "host:port", "[v6]:port", or a port alone (then 127.0.0.1). Metrics name devices and gateways and
    the endpoint has no authentication, so an address beyond this machine needs `allow_remote = true` (and a
    firewall that lets only the Prometheus server in).
    """

    listen: Annotated[str | int, msgspec.Meta(extra={"expect": 'an address such as "127.0.0.1:9108" or a port'})]
    allow_remote: bool = False

    def __post_init__(self) -> None:
        host, _ = self.address
        if not self.allow_remote and not is_loopback(host):
            raise invalid("listen", f"{host or 'every address'} is not a loopback address: metrics have no "
                          "authentication; set allow_remote = true to serve them beyond this machine")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to bind; the host without brackets. Raises the config error for a malformed value."""
        return http.parse_listen(self.listen)

    @property
    def url(self) -> str:
        return url(*self.address)


def url(host: str, port: int) -> str:
    return http.url(host, port, PATH)


# -- a histogram for the pure cores ------------------------------------------------------------------------------


class Histogram:
    """Counts of observations per upper bound, their sum and count: what a Prometheus histogram exposes.

    Plain data, no lock and no metrics library: it lives with the state it measures (a device, the InfluxDB
    writer), is changed on the loop, and read there by the scrape. `buckets` are the upper bounds, ascending; the
    last, +Inf, is implied."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be ascending and distinct")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, observations <= le)] ending with ("+Inf", count), as Prometheus exposes buckets."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


# -- HTTP: what to answer (pure) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    body: bool = False  # send the rendered metrics (GET)
    render: bool = False  # render them (GET, and HEAD for its Content-Length)
    allow: str = ""


OK = Answer(200, "OK", body=True, render=True)
HEAD_OK = Answer(200, "OK", render=True)
BAD_REQUEST = Answer(400, "Bad Request")
NOT_FOUND = Answer(404, "Not Found")
NOT_ALLOWED = Answer(405, "Method Not Allowed", allow="GET, HEAD")
TIMEOUT = Answer(408, "Request Timeout")
TOO_LARGE = Answer(431, "Request Header Fields Too Large")
SERVER_ERROR = Answer(500, "Internal Server Error")
BUSY = Answer(503, "Service Unavailable")
VERSION = Answer(505, "HTTP Version Not Supported")

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 §5.6.2 tchar


def answer(head: bytes) -> Answer:
    """The answer to a request head (request line and headers, up to the empty line): sans-IO, no socket."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        return BAD_REQUEST
    method, target, version = parts
    if not re.fullmatch(rb"HTTP/\d\.\d", version):
        return BAD_REQUEST
    if not version.startswith(b"HTTP/1."):
        return VERSION
    if target.startswith(b"http://") or target.startswith(b"https://"):  # absolute-form (RFC 9112 §3.2.2)
        target = b"/" + target.split(b"/", 3)[-1] if target.count(b"/") >= 3 else b"/"
    path = target.split(b"?", 1)[0]
    if path != PATH.encode():
        return NOT_FOUND
    if method == b"GET":
        return OK
    if method == b"HEAD":
        return HEAD_OK
    return NOT_ALLOWED


class MetricsServer(HttpServer):
    """wire/http.py's server with the /metrics route: `render()` on the loop for GET and HEAD."""

    def __init__(self, settings: MetricsSettings, render: Callable[[], bytes], content_type: str,
                 *, max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        host, port = settings.address
        super().__init__(host, port, self._answer, name="metrics", max_connections=max_connections,
                         request_timeout=request_timeout, write_timeout=write_timeout,
                         listen_text=str(settings.listen))
        self.settings = settings
        self._render = render
        self._content_type = content_type
        self._warn_render = RateLimitedLog(log, interval=300)
        self.scrapes = 0

    async def start(self) -> None:
        await super().start()
        log.info("metrics served at %s", url(self.host, self.port))

    def _answer(self, request: Request) -> Response:
        ans = answer(request.head)
        if not ans.render:
            return Response(ans.status, headers=[("Allow", ans.allow)] if ans.allow else [])
        try:
            body = self._render()  # on the loop: the scrape reads the state between two of the loop's steps
        except Exception as exc:  # a bug in a collector costs that scrape, not the program
            self._warn_render.error(("render",), "rendering the metrics failed: %s: %s", type(exc).__name__, exc,
                                    reason="metrics_failed")
            return Response(500)
        self.scrapes += 1
        return Response(200, body, self._content_type)
