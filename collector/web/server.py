"""The fleet page's place in the collector: its FleetPage (collector/web/page.py) behind the shared bounded HTTP
server (wire/http.py), on the collector's event loop, TLS and client certificates as `[web]` says."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from collector.web.config import WebSettings
from collector.web.page import MAX_LOGIN_BODY, FleetPage
from wire.http import HttpError, HttpServer

if TYPE_CHECKING:
    from collector.app import Collector

# Connections at once: a control room's screens each load four files at a time and refresh every 10 s; the reads
# behind them are one at a time on the "web" thread whatever this is (collector/web/page.py).
MAX_CONNECTIONS = 16


def tls_context(settings: WebSettings) -> ssl.SSLContext | None:
    """HTTPS when tls_cert is set; with client_ca, the handshake demands a client certificate of that CA."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise HttpError(f"web.tls_cert: cannot use {settings.tls_cert} with {settings.tls_key}: {exc}") from None
    if settings.client_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise HttpError(f"web.client_ca: cannot use {settings.client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def fleet_page(collector: Collector) -> tuple[HttpServer, FleetPage]:
    cfg = collector.cfg
    settings = cfg.web
    assert settings is not None
    backend = collector.backend
    query = backend.query  # type: ignore[union-attr]  # [web] needs api = "v1" (collector/config.py)

    def rejections() -> tuple[dict[str, int], dict[str, int]]:
        declined = {key.removeprefix("declined."): n for key, n in collector.counters.items()
                    if key.startswith("declined.")}
        return dict(collector.rejections), declined

    page = FleetPage(settings, lambda q: query(q, epoch="ns"), rejections,
                     Path(cfg.quarantine.path) if cfg.quarantine.max_entries else None)
    host, port = settings.address
    server = HttpServer(host, port, page.handle, name="web", ssl_context=tls_context(settings),
                        max_body=MAX_LOGIN_BODY, max_connections=MAX_CONNECTIONS, listen_text=str(settings.listen))
    return server, page
