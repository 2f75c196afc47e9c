"""What both programs share to be scraped by Prometheus: the `[metrics]` section, a histogram the pure cores can
keep without a metrics library, and a small HTTP/1.1 server for `/metrics` that runs on the program's own event
loop.

One concurrency boundary (docs/architecture.md "Threads and loops"): prometheus_client's own server
(`start_http_server`) answers from a thread of its own, which would read the loop's state while the loop changes
it. Here the request is read, the text rendered (`render()`, which calls prometheus_client.generate_latest with
collectors that read the programs' counters) and the answer written, all on the loop: a scrape sees the state
between two of the loop's steps, never half of one.

The server is deliberately small (RFC 9112 message syntax, the subset a scraper uses): GET or HEAD of `/metrics`,
one request per connection (`Connection: close`). Everything a client could stretch is bounded in code: the
request head (MAX_HEAD bytes; 431 beyond it), the time to send it (REQUEST_TIMEOUT; 408), the time to take the
answer (WRITE_TIMEOUT; the connection is dropped), connections at once (MAX_CONNECTIONS; 503 to the next, and
beyond four times as many, dropped without an answer). Other paths are 404, other methods on /metrics 405 with
`Allow` (RFC 9110 §15.5.6), a malformed request line 400 (RFC 9112 §3), another protocol version 505. A request
body is never parsed: the connection closes after the answer, so nothing a client sends after its head is taken
as a next request; what it still sends is read and discarded (at most LINGER_BYTES for LINGER seconds) so that
the close does not reset the connection under the answer. No compression: a collector's scrape is ~1 MB at
10,000 gateways, which a LAN carries in milliseconds.

    settings = MetricsSettings(listen="127.0.0.1:9108")
    server = MetricsServer(settings, render=lambda: generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
    await server.start()                 # binds now: a port in use is a one-line error (MetricsError)
    task = asyncio.create_task(server.serve(), name="metrics")
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec

from wire.config import invalid
from wire.logs import RateLimitedLog

log = logging.getLogger("citynerve.metrics")

PATH = "/metrics"
MAX_HEAD = 8 * 1024  # bytes of request line + headers; a scraper sends a few hundred
REQUEST_TIMEOUT = 5.0  # seconds for the whole request head to arrive
WRITE_TIMEOUT = 10.0  # seconds for the client to take the answer
MAX_CONNECTIONS = 4  # at once; Prometheus opens one per scrape (two when an HA pair scrapes); 503 beyond
LINGER = 1.0  # seconds, and bytes, of a client's input discarded after the answer (see MetricsServer._close)
LINGER_BYTES = 64 * 1024

_LISTEN = re.compile(r"^(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):)?(?P<port>\d{1,5})$")


class MetricsError(Exception):
    """The metrics endpoint cannot be served (the port is taken, the address is not this machine's): one line."""


class MetricsSettings(msgspec.Struct, forbid_unknown_fields=True):
    """`[metrics]`: serve Prometheus metrics at http://<listen>/metrics. The section's presence turns it on.

    listen: "host:port", "[v6]:port", or a port alone (then 127.0.0.1). Metrics name devices and gateways and
    the endpoint has no authentication, so an address beyond this machine needs `allow_remote = true` (and a
    firewall that lets only the Prometheus server in).
    """

    listen: Annotated[str | int, msgspec.Meta(extra={"expect": 'an address such as "127.0.0.1:9108" or a port'})]
    allow_remote: bool = False

    def __post_init__(self) -> None:
        host, port = self.address
        if not 1 <= port <= 65535:
            raise invalid("listen", f"expected a port 1..65535, got {port}")
        if not self.allow_remote and not is_loopback(host):
            raise invalid("listen", f"{host or 'every address'} is not a loopback address: metrics have no "
                          "authentication; set allow_remote = true to serve them beyond this machine")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to bind; the host without brackets. Raises the config error for a malformed value."""
        if isinstance(self.listen, int) and not isinstance(self.listen, bool):
            return "127.0.0.1", self.listen
        match = _LISTEN.match(str(self.listen).strip())
        if match is None:
            raise invalid("listen", f'expected "host:port", "[v6]:port" or a port, got "{self.listen}"')
        host = match["host"]
        if host is None:
            host = "127.0.0.1"
        return host.strip("[]"), int(match["port"])

    @property
    def url(self) -> str:
        return url(*self.address)


def url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
    return f"http://{shown}:{port}{PATH}"


def is_loopback(host: str) -> bool:
    """True for an address of this machine only: 127.0.0.0/8, ::1, "localhost". An empty host is every address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything


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


def response_head(ans: Answer, content_type: str, length: int) -> bytes:
    lines = [f"HTTP/1.1 {ans.status} {ans.reason}", f"Content-Type: {content_type}", f"Content-Length: {length}",
             "Connection: close"]
    if ans.allow:
        lines.append(f"Allow: {ans.allow}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


# -- HTTP: the shell ---------------------------------------------------------------------------------------------


class MetricsServer:
    def __init__(self, settings: MetricsSettings, render: Callable[[], bytes], content_type: str,
                 *, max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self.settings = settings
        self._render = render
        self._content_type = content_type
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._write_timeout = write_timeout
        self._server: asyncio.Server | None = None
        self._active = 0
        self._refusing = 0  # connections being answered 503, at most 4 x max_connections (then dropped)
        self._warn = RateLimitedLog(log, interval=300)
        self.scrapes = 0
        self.refused = 0  # connections answered 503 (too many at once)

    @property
    def active(self) -> int:
        """Connections being served now."""
        return self._active

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        host, port = self.settings.address
        try:
            self._server = await asyncio.start_server(self._handle, host or None, port, limit=MAX_HEAD)
        except OSError as exc:  # asyncio rewrites the message; the errno tells it plainly
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise MetricsError(f"metrics.listen: cannot listen on {self.settings.listen}: {why}") from None
        log.info("metrics served at %s", url(host, self.port))

    async def serve(self) -> None:
        """The task: serves until cancelled, then closes the listening socket."""
        assert self._server is not None, "start() first"
        try:
            await self._server.serve_forever()
        finally:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= self._max_connections:
            self.refused += 1
            if self._refusing >= 4 * self._max_connections:
                writer.transport.abort()  # a flood: not even an answer
                return
            self._refusing += 1
            try:
                writer.write(response_head(BUSY, "text/plain", 0))
                await self._close(reader, writer)
            finally:
                self._refusing -= 1
            return
        self._active += 1  # until closed, lingering included: the bound holds for every connection held
        try:
            try:
                await self._exchange(reader, writer)
            finally:
                await self._close(reader, writer)
        finally:
            self._active -= 1

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self._request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            ans = TOO_LARGE
        except TimeoutError:
            ans = TIMEOUT
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client went away before it asked anything
        else:
            ans = answer(head)
        body = b""
        if ans.render:
            try:
                body = self._render()  # on the loop: the scrape reads the state between two of the loop's steps
                self.scrapes += 1
            except Exception as exc:  # a bug in a collector costs that scrape, not the program
                self._warn.error(("render",), "rendering the metrics failed: %s: %s", type(exc).__name__, exc,
                                 reason="metrics_failed")
                ans, body = SERVER_ERROR, b""
        content_type = self._content_type if ans.status == 200 else "text/plain; charset=utf-8"
        writer.write(response_head(ans, content_type, len(body)) + (body if ans.body else b""))
        try:
            async with asyncio.timeout(self._write_timeout):
                await writer.drain()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()  # a client that does not read: its buffer is dropped, not kept

    @staticmethod
    async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends (a body, the rest of a head too large) until it
        closes, at most LINGER_BYTES for LINGER seconds: closing a socket with unread input sends a reset, which
        can destroy the answer before the client read it (RFC 9112 §9.6)."""
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(LINGER):
                left = LINGER_BYTES
                while left > 0 and (chunk := await reader.read(min(left, 4096))):
                    left -= len(chunk)
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
