"""`[web]` of collector.toml: the fleet page (docs/dashboards.md "The fleet page"). Off unless the section is there.

    [web]
    listen = "127.0.0.1:8080"          # loopback by default; another address needs allow_remote and TLS
    token = { file = "/etc/citynerve/web.token" }   # the operators' access token (or client_ca, or both)
    tls_cert = "/etc/citynerve/web.crt"
    tls_key = "/etc/citynerve/web.key"
    client_ca = "/etc/citynerve/operators-ca.crt"   # only browsers with a certificate from this CA connect
    tiles = "https://tiles.city.example/{z}/{x}/{y}.png"   # none: a plain grid of coordinates

The page shows every gateway, its location and its readings: it is never served without authentication, and
never in clear text beyond this machine.
"""

from __future__ import annotations

import os
import re
from typing import Annotated

import msgspec

from wire.config import Duration, Secret, invalid
from wire.http import is_loopback, parse_listen, url

# The shortest token accepted: 128 bits as the hex of `openssl rand -hex 16`, or base64 of as many.
MIN_TOKEN_CHARS = 22
_TILES = re.compile(r"^https?://[^\s\"'<>]+$")


class WebSettings(msgspec.Struct, forbid_unknown_fields=True):
    listen: Annotated[str | int, msgspec.Meta(extra={"expect": 'an address such as "127.0.0.1:8080" or a port'})] = (
        "127.0.0.1:8080")
    allow_remote: bool = False
    token: Secret | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None
    # A tile server's URL template (the operator's own, e.g. the city's): {z}/{x}/{y} of the Web Mercator tiles.
    tiles: str | None = None
    tiles_max_zoom: Annotated[int, msgspec.Meta(ge=1, le=22)] = 18
    attribution: Annotated[str, msgspec.Meta(max_length=200)] = ""
    # A gateway's state (collector/web/views.py): not heard for stale_after; backlog older than backlog_after;
    # a device's errors grew within errors_window; heartbeats and GPS fixes older than window are not read (a
    # gateway silent for longer is listed as not heard, without a place on the map).
    stale_after: Duration = Duration(300)
    backlog_after: Duration = Duration(120)
    errors_window: Duration = Duration(900)
    window: Duration = Duration(3600)

    def __post_init__(self) -> None:
        host, _ = self.address
        if self.token is None and self.client_ca is None:
            raise invalid("token", "the fleet page needs authentication: set token (e.g. token = { file = "
                          '"/etc/citynerve/web.token" }) or client_ca, or both')
        if self.token is not None and len(self.token.value.strip()) < MIN_TOKEN_CHARS:
            raise invalid("token", f"expected at least {MIN_TOKEN_CHARS} characters (openssl rand -hex 16 makes one), "
                          f"got {len(self.token.value.strip())}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise invalid("tls_key" if self.tls_key is None else "tls_cert", "tls_cert and tls_key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise invalid("client_ca", "client certificates need TLS: set tls_cert and tls_key too")
        for key in ("tls_cert", "tls_key", "client_ca"):
            path = getattr(self, key)
            if path is not None and not os.access(path, os.R_OK):
                raise invalid(key, f"{path} {'is not readable' if os.path.exists(path) else 'does not exist'}")
        if not is_loopback(host):
            if not self.allow_remote:
                raise invalid("listen", f"{host or 'every address'} is not a loopback address: the page shows the "
                              "whole fleet; set allow_remote = true (with tls_cert and tls_key) to serve it beyond "
                              "this machine")
            if self.tls_cert is None:
                raise invalid("tls_cert", "serving beyond this machine (allow_remote) needs TLS: a token or the "
                              "fleet's data must not cross the network in clear text")
        if self.tiles is not None and not (_TILES.match(self.tiles) and all(f"{{{k}}}" in self.tiles for k in "zxy")):
            raise invalid("tiles", 'expected an http(s) URL with {z}, {x} and {y}, e.g. '
                          f'"https://tiles.example/{{z}}/{{x}}/{{y}}.png", got "{self.tiles}"')
        for key in ("stale_after", "backlog_after", "errors_window", "window"):
            if not getattr(self, key) > 0:
                raise invalid(key, "expected a duration greater than 0")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to bind; the host without brackets."""
        return parse_listen(self.listen)

    @property
    def url(self) -> str:
        return url(*self.address, "/", self.tls_cert is not None)
