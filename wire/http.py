"""A small, bounded HTTP/1.1 server on the program's own event loop: /metrics of both programs (wire/metrics.py,
where it was written for /metrics alone) and the collector's fleet page (collector/web/) are served by it.

One concurrency boundary (docs/architecture.md "Threads and loops"): the request is read, the handler run and the
answer written, all on the loop, so a handler reads the program's state between two of the loop's steps, never
half of one; a handler with blocking work awaits it on an executor of its own.

Deliberately small (RFC 9112 message syntax, the subset a scraper and a browser use): one request per connection
(`Connection: close`). Everything a client could stretch is bounded in code: the request head (MAX_HEAD bytes;
431 beyond it), the time to send it (REQUEST_TIMEOUT; 408), a body (read only by a server given `max_body`: at
most that many bytes with a Content-Length, 413 beyond, 411 without; elsewhere never read), the time to take the
answer (WRITE_TIMEOUT; the connection is dropped), connections at once (MAX_CONNECTIONS; 503 to the next, and
beyond four times as many, dropped without an answer). A malformed request line or header is 400 (RFC 9112 §3,
§5), another protocol version 505. After the answer the connection closes, so nothing a client sends after its
request is taken as a next one; what it still sends is read and discarded (at most LINGER_BYTES for LINGER
seconds) so that the close does not reset the connection under the answer (RFC 9112 §9.6).

With an `ssl` context the connections are TLS (the handshake bounded by REQUEST_TIMEOUT); a context that requires
client certificates makes the handshake refuse a client without one, and a request says it came with one.

    server = HttpServer("127.0.0.1", 8080, handler, name="web")   # handler(Request) -> Response (or awaitable)
    await server.start()                 # binds now: a port in use is a one-line error (HttpError)
    task = asyncio.create_task(server.serve(), name="web")
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from wire.config import invalid
from wire.logs import RateLimitedLog

log = logging.getLogger("citynerve.http")

MAX_HEAD = 8 * 1024  # bytes of request line + headers; a scraper sends a few hundred, a browser ~1 KiB
REQUEST_TIMEOUT = 5.0  # seconds for the TLS handshake and the whole request head (and body) to arrive
WRITE_TIMEOUT = 10.0  # seconds for the client to take the answer
MAX_CONNECTIONS = 4  # at once; 503 beyond
LINGER = 1.0  # seconds, and bytes, of a client's input discarded after the answer (see HttpServer._close)
LINGER_BYTES = 64 * 1024
MAX_HEADERS = 100

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 §5.6.2 tchar
REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


_LISTEN = re.compile(r"^(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):)?(?P<port>\d{1,5})$")


class HttpError(Exception):
    """The server cannot serve (the port is taken, the address is not this machine's): one line."""


def parse_listen(listen: str | int) -> tuple[str, int]:
    """A configuration's `listen`: "host:port", "[v6]:port", or a port alone (then 127.0.0.1) -> (host without
    brackets, port). Raises the config error (wire.config.invalid) for a malformed value or port."""
    if isinstance(listen, int) and not isinstance(listen, bool):
        host, port = "127.0.0.1", listen
    else:
        match = _LISTEN.match(str(listen).strip())
        if match is None:
            raise invalid("listen", f'expected "host:port", "[v6]:port" or a port, got "{listen}"')
        host = "127.0.0.1" if match["host"] is None else match["host"].strip("[]")
        port = int(match["port"])
    if not 1 <= port <= 65535:
        raise invalid("listen", f"expected a port 1..65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    """True for an address of this machine only: 127.0.0.0/8, ::1, "localhost". An empty host is every address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything


def url(host: str, port: int, path: str = "/", tls: bool = False) -> str:
    shown = f"[{host}]" if ":" in host else host or "0.0.0.0"
    return f"{'https' if tls else 'http'}://{shown}:{port}{path}"


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case; a repeated header's values joined with ", "
    head: bytes = b""  # the request line and headers as received
    body: bytes = b""
    client_certificate: bool = False  # the TLS handshake verified one


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    send_body: bool = True  # False for HEAD: the headers (Content-Length included) without the body

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Status')}", f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}", "Connection: close",
                 *(f"{name}: {value}" for name, value in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (self.body if self.send_body else b"")


def parse_request(head: bytes) -> Request | Response:
    """A request head (request line and headers, up to the empty line) -> the Request, or the error Response.
    Sans-IO: no socket."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        return Response(400, b"bad request line\n")
    method, target, version = parts
    if not re.fullmatch(rb"HTTP/\d\.\d", version):
        return Response(400, b"bad request line\n")
    if not version.startswith(b"HTTP/1."):
        return Response(505, b"HTTP/1.x only\n")
    if target.startswith((b"http://", b"https://")):  # absolute-form (RFC 9112 §3.2.2)
        target = b"/" + target.split(b"/", 3)[-1] if target.count(b"/") >= 3 else b"/"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name) or len(headers) >= MAX_HEADERS:
            return Response(400, b"bad header\n")
        key = name.decode("ascii").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    text_target = target.decode("latin-1")
    path, _, query = text_target.partition("?")
    return Request(method.decode("ascii"), text_target, urllib.parse.unquote(path),
                   dict(urllib.parse.parse_qsl(query, max_num_fields=20)), headers, head)


Handler = Callable[[Request], "Response | Awaitable[Response]"]


class HttpServer:
    def __init__(self, host: str, port: int, handler: Handler, *, name: str, ssl_context: ssl.SSLContext | None = None,
                 max_body: int = 0, max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                 write_timeout: float = WRITE_TIMEOUT, listen_text: str | None = None) -> None:
        self.host, self.requested_port = host, port
        self.name = name  # the configuration section: "metrics", "web" (errors say "<name>.listen: ...")
        self._handler = handler
        self._ssl = ssl_context
        self._max_body = max_body
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._write_timeout = write_timeout
        self._listen_text = listen_text or f"{host}:{port}"
        self._server: asyncio.Server | None = None
        self._active = 0
        self._refusing = 0  # connections being answered 503, at most 4 x max_connections (then dropped)
        self._warn = RateLimitedLog(log, interval=300)
        self.refused = 0  # connections answered 503 (too many at once)

    @property
    def active(self) -> int:
        """Connections being served now."""
        return self._active

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return url(self.host, self.port, "", self._ssl is not None)

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._handle, self.host or None, self.requested_port, limit=MAX_HEAD, ssl=self._ssl,
                ssl_handshake_timeout=self._request_timeout if self._ssl else None)
        except OSError as exc:  # asyncio rewrites the message; the errno tells it plainly
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise HttpError(f"{self.name}.listen: cannot listen on {self._listen_text}: {why}") from None

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
                writer.write(Response(503).encode())
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

    async def _read(self, reader: asyncio.StreamReader, client_certificate: bool) -> Request | Response | None:
        async with asyncio.timeout(self._request_timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            request = parse_request(head)
            if isinstance(request, Response):
                return request
            length = request.headers.get("content-length")
            if not self._max_body:  # a server that takes no body never reads one (discarded at the close)
                body = b""
            elif length is None:
                if request.method == "POST" or "transfer-encoding" in request.headers:
                    return Response(411, b"a body needs a Content-Length\n")
                body = b""
            elif not length.isdigit():
                return Response(400, b"bad Content-Length\n")
            elif int(length) > self._max_body:
                return Response(413, b"body too large\n")
            else:
                body = await reader.readexactly(int(length))
        return Request(request.method, request.target, request.path, request.query, request.headers, head, body,
                       client_certificate)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client_certificate = bool(writer.get_extra_info("peercert")) if self._ssl else False
        try:
            request = await self._read(reader, client_certificate)
        except asyncio.LimitOverrunError:
            request = Response(431)
        except TimeoutError:
            request = Response(408)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return  # the client went away before it asked anything
        if isinstance(request, Request):
            try:
                response = self._handler(request)
                if inspect.isawaitable(response):
                    response = await response
            except Exception as exc:  # a bug in a handler costs that request, not the program
                self._warn.error(("handler", self.name), "%s: answering %s %s failed: %s: %s", self.name,
                                 request.method, request.path, type(exc).__name__, exc, reason=f"{self.name}_failed")
                response = Response(500)
            if request.method == "HEAD":
                response.send_body = False
        else:
            response = request
        writer.write(response.encode())
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
