"""A real mosquitto broker on a free loopback port with a TLS listener, in a temp dir."""

from __future__ import annotations

import getpass
import shutil
from pathlib import Path

from labkit.pki import LabCA
from labkit.process import LabServer, ServerProcess, free_port, port_is_open

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class MosquittoServer(LabServer):
    """mosquitto 2.x with one TLS listener (server cert from `ca`) and, optionally, a plain one.

    `require_certificate` makes clients present a certificate signed by the same CA and uses the
    certificate's CN as the username (use_identity_as_username), as the deployment configuration does.
    """

    name = "mosquitto"

    def __init__(
        self,
        directory: Path | None,
        ca: LabCA,
        *,
        require_certificate: bool = False,
        plain_listener: bool = False,
        extra_config: str = "",
    ) -> None:
        super().__init__(directory)
        self.ca = ca
        self.require_certificate = require_certificate
        self.want_plain_listener = plain_listener
        self.extra_config = extra_config
        self.plain_port: int | None = None
        self.server_cert = ca.issue("localhost", server=True, file_stem=f"broker-{id(self)}")
        self.config_path = self.directory / "mosquitto.conf"
        (self.directory / "data").mkdir(exist_ok=True)

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.plain_port = free_port() if self.want_plain_listener else None

    def _new_process(self) -> ServerProcess:
        lines = [
            f"user {getpass.getuser()}",
            "persistence true",
            f"persistence_location {self.directory / 'data'}/",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "per_listener_settings false",
            "allow_anonymous true",
            f"listener {self.port} 127.0.0.1",
            f"cafile {self.ca.cert_path}",
            f"certfile {self.server_cert.cert}",
            f"keyfile {self.server_cert.key}",
            "tls_version tlsv1.2",
        ]
        if self.require_certificate:
            lines += ["require_certificate true", "use_identity_as_username true"]
        if self.plain_port:
            lines += [f"listener {self.plain_port} 127.0.0.1"]
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config + "\n")
        return ServerProcess(
            "mosquitto", [MOSQUITTO, "-c", str(self.config_path)], self.log_path,
            ready=lambda: port_is_open(self.port), start_timeout=self.start_timeout,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
