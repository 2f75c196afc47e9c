"""The fleet page's requests: authentication, routes, and the reads behind them.

Runs on the collector's event loop (one concurrency boundary, docs/architecture.md "Threads and loops"): the
collector's own counters (rejections) are read there, between two of the loop's steps; every blocking read -
InfluxQL over HTTP, the quarantine file - runs on the "web" thread (one single-thread executor, so at most one
read at a time), awaited. Read-only: nothing here writes to the store, the quarantine or the collector's state;
the only POST is the sign-in, which sets a cookie.

    GET  /                   the page (the sign-in form without a valid session)
    GET  /static/app.js|css|icon.svg  the page's code, style and icon (no data: served without a session)
    POST /login              token=... -> the session cookie
    GET  /logout             forgets it
    GET  /api/fleet          every gateway: state, last heartbeat, backlog, failing devices, location
    GET  /api/gateway?id=    one gateway: devices, latest values with units, last-hour series, poll errors
    GET  /api/rejections     refused messages by reason code (this collector), the quarantine by reason

Authentication (collector/web/config.py): with `token`, a request needs the session cookie (set by the form) or
`Authorization: Bearer <token>`; with `client_ca`, the TLS handshake already demanded a client certificate of
that CA; with both, both. Answers carry a Content-Security-Policy that allows nothing from elsewhere but the
operator's tile server: the page works in an offline control room.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import hmac
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from collector.quarantine import Quarantine
from collector.web import views
from collector.web.config import WebSettings
from collector.web.units import unit_of
from wire.http import Request, Response
from wire.logs import RateLimitedLog
from wire.schema import GATEWAY_ID_PATTERN

log = logging.getLogger("citynerve.collector.web")

COOKIE = "citynerve_fleet"
CACHE_SECONDS = 2.0  # several screens polling the same view share one read
MAX_CACHED_GATEWAYS = 32
MAX_LOGIN_BODY = 1024
FAILED_LOGIN_DELAY = 0.5  # seconds before the answer to a wrong token: a guess costs the guesser time
_GATEWAY_ID = re.compile(GATEWAY_ID_PATTERN)
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}


def _asset(name: str) -> bytes:
    return resources.files("collector.web").joinpath("static", name).read_bytes()


def session_value(token: str) -> str:
    """The cookie's value: derived from the token (the token itself never sits in a cookie jar)."""
    return hmac.new(token.encode(), b"citynerve fleet page session", hashlib.sha256).hexdigest()


def parse_cookies(header: str) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            cookies.setdefault(name, value)
    return cookies


def authorized(request: Request, settings: WebSettings) -> bool:
    """Pure: does this request carry what [web] demands?"""
    if settings.client_ca is not None and not request.client_certificate:
        return False
    if settings.token is None:
        return True
    token = settings.token.value.strip()
    bearer = request.headers.get("authorization", "")
    if bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:].strip().encode(), token.encode()):
        return True
    cookie = parse_cookies(request.headers.get("cookie", "")).get(COOKIE, "")
    return hmac.compare_digest(cookie.encode(), session_value(token).encode())


def security_headers(settings: WebSettings) -> list[tuple[str, str]]:
    images = "'self'"
    if settings.tiles:
        parts = urllib.parse.urlsplit(settings.tiles.replace("{z}", "0").replace("{x}", "0").replace("{y}", "0"))
        images += f" {parts.scheme}://{parts.netloc}"
    policy = (f"default-src 'none'; script-src 'self'; style-src 'self'; img-src {images}; connect-src 'self'; "
              "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    headers = [("Content-Security-Policy", policy), ("X-Content-Type-Options", "nosniff"),
               ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"), ("X-Frame-Options", "DENY")]
    if settings.tls_cert:
        headers.append(("Strict-Transport-Security", "max-age=31536000"))
    return headers


def _json(doc: Any, status: int = 200) -> Response:
    return Response(status, msgspec.json.encode(doc), "application/json")


class FleetPage:
    """Answers the page's requests. `query(q) -> InfluxDB's JSON answer` (blocking) and the quarantine file
    (`quarantine`, None when none is kept) are read on the "web" thread; `rejections() -> (messages refused,
    readings declined)` by reason code reads the collector's counters on the loop."""

    def __init__(self, settings: WebSettings, query: Callable[[str], dict[str, Any]],
                 rejections: Callable[[], tuple[Mapping[str, int], Mapping[str, int]]],
                 quarantine: Path | None, clock: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings
        self.view = views.ViewSettings(window_s=float(settings.window), stale_after_s=float(settings.stale_after),
                                       backlog_after_s=float(settings.backlog_after),
                                       errors_window_s=float(settings.errors_window))
        self._query = query
        self._rejections = rejections
        self._quarantine_path = quarantine
        self._quarantine: Quarantine | None = None  # opened, used and closed on the "web" thread only
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="web")
        self._cache: collections.OrderedDict[str, tuple[float, Response]] = collections.OrderedDict()
        self._pending: dict[str, asyncio.Future[Response]] = {}
        self._headers = security_headers(settings)
        # read once, before serving: no file is read on the loop while it answers
        self._assets = {name: _asset(name) for name in (*STATIC, "index.html", "login.html")}
        self._warn = RateLimitedLog(log, interval=60)
        self.failed_logins = 0

    async def close(self) -> None:
        await self._read(self._close_quarantine)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _close_quarantine(self) -> None:
        if self._quarantine is not None:
            self._quarantine.close()
            self._quarantine = None

    def _quarantine_rows(self) -> list[tuple[str, str, int, int, str]]:
        """(the "web" thread) The quarantine by reason and gateway; the file is the collector's (it may not exist
        before the first rejection: then it is empty)."""
        assert self._quarantine_path is not None
        if self._quarantine is None:
            if not self._quarantine_path.exists():
                return []
            self._quarantine = Quarantine(self._quarantine_path)
        return self._quarantine.by_reason()

    async def handle(self, request: Request) -> Response:
        response = await self._route(request)
        # a fresh Response each time: the routes' may be cached and shared (the server changes it for HEAD)
        return Response(response.status, response.body, response.content_type, [*self._headers, *response.headers])

    async def _route(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/static/") and path[8:] in STATIC:
            if request.method not in ("GET", "HEAD"):
                return Response(405, b"only GET\n", headers=[("Allow", "GET, HEAD")])
            return Response(200, self._assets[path[8:]], STATIC[path[8:]])
        if path == "/login":
            if request.method != "POST":
                return Response(405, b"only POST\n", headers=[("Allow", "POST")])
            return await self._login(request)
        if request.method not in ("GET", "HEAD"):  # read-only (HEAD: the GET's headers, wire/http.py)
            return Response(405, b"read-only: GET\n", headers=[("Allow", "GET, HEAD")])
        if path == "/logout":
            return Response(303, b"", headers=[("Location", "/"), ("Set-Cookie", self._cookie(""))])
        if not authorized(request, self.settings):
            if path == "/":
                return self._login_page("")
            return _json({"error": "not signed in"}, 401)
        if path == "/":
            return Response(200, self._assets["index.html"], "text/html; charset=utf-8")
        try:
            if path == "/api/fleet":
                return await self._cached("fleet", self._fleet)
            if path == "/api/gateway":
                gateway = request.query.get("id", "")
                if not _GATEWAY_ID.match(gateway):
                    return _json({"error": "expected ?id=<gateway id>"}, 400)
                return await self._cached(f"gateway/{gateway}", lambda: self._gateway(gateway))
            if path == "/api/rejections":
                return await self._rejections_doc()
        except views.InfluxQLError as exc:
            self._warn.error(("influxql",), "fleet page: InfluxDB refused a query: %s", exc, reason="web_query")
            return _json({"error": f"InfluxDB refused the page's query: {exc}"}, 502)
        except Exception as exc:  # InfluxDB away, a timeout: the page says so and tries again
            self._warn.warning(("read", type(exc).__name__), "fleet page: reading InfluxDB failed: %s", exc,
                               reason="web_read")
            return _json({"error": f"reading InfluxDB failed: {exc}"}, 503)
        return Response(404, b"not found\n")

    # -- sign-in -----------------------------------------------------------------------------------------------

    def _cookie(self, value: str) -> str:
        attributes = "; HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if self.settings.tls_cert else "")
        return f"{COOKIE}={value}{attributes}" + ("" if value else "; Max-Age=0")

    def _login_page(self, message: str, status: int = 200) -> Response:
        body = self._assets["login.html"].replace(b"{message}", message.encode())
        return Response(status, body, "text/html; charset=utf-8")

    async def _login(self, request: Request) -> Response:
        token = self.settings.token
        if token is None:  # client certificates only: nothing to sign in with
            return Response(303, b"", headers=[("Location", "/")])
        if self.settings.client_ca is not None and not request.client_certificate:
            return Response(403, b"a client certificate is required\n")
        form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"), max_num_fields=4)
        given = (form.get("token") or [""])[0].strip()
        if not hmac.compare_digest(given.encode(), token.value.strip().encode()):
            self.failed_logins += 1
            self._warn.warning(("login",), "fleet page: a sign-in with a wrong token (%d so far)", self.failed_logins,
                               reason="web_login_failed")
            await asyncio.sleep(FAILED_LOGIN_DELAY)
            return self._login_page("Wrong token.", 401)
        return Response(303, b"", headers=[("Location", "/"),
                                           ("Set-Cookie", self._cookie(session_value(token.value.strip())))])

    # -- reads -------------------------------------------------------------------------------------------------

    async def _cached(self, key: str, make: Callable[[], Any]) -> Response:
        """One read per key at a time and per CACHE_SECONDS, whoever asks; at most MAX_CACHED_GATEWAYS + 1 kept."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            response = _json(await make())
            future.set_result(response)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody is warned of a lost exception
            raise
        finally:
            del self._pending[key]
        self._cache[key] = (time.monotonic() + CACHE_SECONDS, response)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED_GATEWAYS + 1:
            self._cache.popitem(last=False)
        return response

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _fleet(self) -> dict[str, Any]:
        answer = await self._read(self._query, views.fleet_query(self.view))
        doc = views.fleet_view(answer, self._clock(), self.view)
        doc["settings"].update(tiles=self.settings.tiles, tiles_max_zoom=self.settings.tiles_max_zoom,
                               attribution=self.settings.attribution)
        return doc

    async def _gateway(self, gateway: str) -> dict[str, Any]:
        answer = await self._read(self._query, views.gateway_query(gateway, self.view))
        measurements = views.measurements_of(answer)
        values = await self._read(self._query, views.values_query(gateway, measurements)) if measurements else None
        return views.gateway_view(gateway, answer, measurements, values, self._clock(), self.view, unit_of)

    async def _rejections_doc(self) -> Response:
        rejected, declined = self._rejections()  # the loop's counters, read on the loop
        rejected, declined = dict(rejected), dict(declined)
        rows = await self._read(self._quarantine_rows) if self._quarantine_path is not None else []
        return _json({
            "rejected": rejected,
            "declined": declined,
            "quarantine_enabled": self._quarantine_path is not None,
            "quarantine": [{"reason": r, "gateway": g, "entries": n, "newest_ns": t, "detail": d}
                           for r, g, n, t, d in rows],
        })
