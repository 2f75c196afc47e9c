"""A real mosquitto broker on a free loopback port with a TLS listener, in a temp dir."""

from __future__ import annotations

import getpass
import shutil
from pathlib import Path

from labkit.pki import LabCA
from labkit.process import ServerProcess, free_port, port_is_open

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class MosquittoServer:
    """mosquitto 2.x with one TLS listener (server cert from `ca`) and, optionally, a plain one.

    `require_certificate` makes clients present a certificate signed by the same CA and uses the
    certificate's CN as the username (use_identity_as_username), as the deployment configuration does.
    """

    def __init__(
        self,
        directory: Path,
        ca: LabCA,
        *,
        require_certificate: bool = False,
        plain_listener: bool = False,
        extra_config: str = "",
    ) -> None:
        self.directory = directory
        self.ca = ca
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.plain_port = free_port() if plain_listener else None
        server = ca.issue("localhost", server=True, file_stem="broker")
        (directory / "data").mkdir(exist_ok=True)
        lines = [
            f"user {getpass.getuser()}",
            "persistence true",
            f"persistence_location {directory / 'data'}/",
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
            f"cafile {ca.cert_path}",
            f"certfile {server.cert}",
            f"keyfile {server.key}",
            "tls_version tlsv1.2",
        ]
        if require_certificate:
            lines += ["require_certificate true", "use_identity_as_username true"]
        if self.plain_port:
            lines += [f"listener {self.plain_port} 127.0.0.1"]
        self.config_path = directory / "mosquitto.conf"
        self.config_path.write_text("\n".join(lines) + "\n" + extra_config + "\n")
        self._process = self._new_process()

    def _new_process(self) -> ServerProcess:
        return ServerProcess(
            "mosquitto",
            [MOSQUITTO, "-c", str(self.config_path)],
            self.directory / "mosquitto.log",
            ready=lambda: port_is_open(self.port),
        )

    def start(self) -> MosquittoServer:
        self._process.start()
        return self

    def stop(self) -> None:
        self._process.stop()

    def kill(self) -> None:
        self._process.kill()

    def restart(self) -> None:
        self.stop()
        self._process = self._new_process()
        self._process.start()

    def log_text(self) -> str:
        return (self.directory / "mosquitto.log").read_text(errors="replace")

    def __enter__(self) -> MosquittoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
