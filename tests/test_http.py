"""wire/http.py beyond what /metrics uses (tests/test_metrics.py covers the bounds both share): request bodies and
their bounds, handlers (plain and async, a failing one), HEAD, and TLS with client certificates - real sockets,
a real TLS handshake with the lab CA's certificates."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from labkit.pki import LabCA
from wire.http import HttpError, HttpServer, Request, Response, parse_request


def test_parse_request_line_headers_and_query() -> None:
    request = parse_request(b"GET /api/gateway?id=gw.north-1&x=%2F HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\n"
                            b"cookie: b=2\r\n\r\n")
    assert isinstance(request, Request)
    assert (request.method, request.path, request.query) == ("GET", "/api/gateway", {"id": "gw.north-1", "x": "/"})
    assert request.headers == {"host": "a", "cookie": "a=1, b=2"}
    for head, status in [(b"GET /\r\n\r\n", 400), (b"GET / HTTP/2.0\r\n\r\n", 505), (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
                         (b"G\x00T / HTTP/1.1\r\n\r\n", 400)]:
        answer = parse_request(head)
        assert isinstance(answer, Response) and answer.status == status, head


async def _exchange(port: int, data: bytes, context: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="localhost" if context else None)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def _handler(seen: list[Request]):
    async def handle(request: Request) -> Response:
        seen.append(request)
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return Response(200, b"body:" + request.body, headers=[("X-Cert", str(request.client_certificate))])
    return handle


def test_bodies_are_bounded_and_need_a_length() -> None:
    async def main() -> None:
        seen: list[Request] = []
        server = HttpServer("127.0.0.1", 0, _handler(seen), name="web", max_body=16)
        await server.start()
        task = asyncio.create_task(server.serve())
        try:
            ok = await _exchange(server.port, b"POST /login HTTP/1.1\r\nContent-Length: 7\r\n\r\ntoken=x")
            assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"body:token=x")
            big = await _exchange(server.port, b"POST /login HTTP/1.1\r\nContent-Length: 17\r\n\r\n" + b"x" * 17)
            assert big.startswith(b"HTTP/1.1 413 ")
            assert (await _exchange(server.port, b"POST /login HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 411 ")
            assert (await _exchange(server.port, b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            head = await _exchange(server.port, b"HEAD / HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 5\r\n" in head and head.endswith(b"\r\n\r\n")
            assert (await _exchange(server.port, b"GET /boom HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500 ")
            assert [r.path for r in seen] == ["/login", "/", "/boom"]  # refused requests never reach the handler
        finally:
            task.cancel()
    asyncio.run(main())


def test_a_port_in_use_is_one_line_naming_the_section() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = HttpServer("127.0.0.1", taken.getsockname()[1], _handler([]), name="web",
                                listen_text=f"127.0.0.1:{taken.getsockname()[1]}")
            with pytest.raises(HttpError, match=r"^web\.listen: cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
                await server.start()
    asyncio.run(main())


def test_client_certificates_are_demanded_by_the_handshake(tmp_path: Path) -> None:
    ca = LabCA(tmp_path / "ca")
    other = LabCA(tmp_path / "other", name="another CA")
    server_cert = ca.issue("localhost", server=True)
    operator = ca.issue("operator-1")
    stranger = other.issue("stranger")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert.cert, server_cert.key)
    context.load_verify_locations(cafile=ca.cert_path)
    context.verify_mode = ssl.CERT_REQUIRED

    def client(cert=None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=ca.cert_path)
        if cert is not None:
            ctx.load_cert_chain(cert.cert, cert.key)
        return ctx

    async def main() -> None:
        seen: list[Request] = []
        server = HttpServer("127.0.0.1", 0, _handler(seen), name="web", ssl_context=context)
        await server.start()
        task = asyncio.create_task(server.serve())
        try:
            answer = await _exchange(server.port, b"GET / HTTP/1.1\r\n\r\n", client(operator))
            assert answer.startswith(b"HTTP/1.1 200 ") and b"X-Cert: True" in answer
            for refused in (client(), client(stranger)):  # no certificate; one of another CA
                with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                    answer = await _exchange(server.port, b"GET / HTTP/1.1\r\n\r\n", refused)
                    assert not answer, answer  # TLS 1.3: the refusal may come as the connection's end
                    raise ConnectionError("closed without an answer")
            assert len(seen) == 1
        finally:
            task.cancel()
    asyncio.run(main())
