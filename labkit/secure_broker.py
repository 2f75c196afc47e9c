"""mosquitto started from the SHIPPED deploy/mosquitto/citynerve.conf and deploy/mosquitto/acl.

`render()` rewrites only what must differ in the lab - the production paths, the two listeners' ports and the
log destination - and refuses a configuration holding a production path it does not know, so the tests always
run the shipped ACL and settings, never a copy that could drift. The ACL file is used in place.

    device CA (edge-collector ca init in a temp dir)     -> the gateways' listener (port):  cafile, crlfile
    collector CA (a second ca init)                      -> the collectors' listener (collector_port)
    LabCA (labkit/pki.py)                                -> the broker's server certificate
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from labkit.mosquitto import MOSQUITTO
from labkit.pki import LabCA
from labkit.process import LabServer, ServerProcess, free_port, port_is_open

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "deploy" / "mosquitto" / "citynerve.conf"
SHIPPED_ACL = REPO / "deploy" / "mosquitto" / "acl"
GATEWAYS_LISTENER = "8883"
COLLECTORS_LISTENER = "8884"

# Production path -> the lab's file, by name in `LabPaths`.
_PATH_KEYS = {
    "/etc/mosquitto/citynerve/acl": "acl_file",
    "/etc/mosquitto/citynerve/device-ca.crt": "cafile",
    "/etc/mosquitto/citynerve/device-ca.crl": "crlfile",
    "/etc/mosquitto/citynerve/server.crt": "certfile",
    "/etc/mosquitto/citynerve/server.key": "keyfile",
    "/var/lib/mosquitto/": "persistence_location",
    "/etc/mosquitto/citynerve/collector-ca.crt": "collector_cafile",
    "/etc/mosquitto/citynerve/collector-ca.crl": "collector_crlfile",
    "/usr/lib/mosquitto/citynerve_ratelimit.so": "plugin",
}
_PRODUCTION_ROOTS = ("/etc/", "/var/", "/run/", "/usr/")
RATELIMIT_DIR = REPO / "deploy" / "mosquitto" / "ratelimit"


def ratelimit_plugin() -> Path:
    """The per-client rate-limit plugin (deploy/mosquitto/ratelimit), built with its Makefile when missing or
    older than its source: the lab runs the same C file production installs."""
    built = RATELIMIT_DIR / "citynerve_ratelimit.so"
    source = RATELIMIT_DIR / "citynerve_ratelimit.c"
    if not built.exists() or built.stat().st_mtime < source.stat().st_mtime:
        import subprocess

        result = subprocess.run(["make", "-s", "-C", str(RATELIMIT_DIR)], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"cannot build {built.name} (needs gcc, libmosquitto-dev and mosquitto-dev: "
                               f"make deps installs them): {result.stderr.strip()[-500:]}")
    return built


@dataclass(frozen=True)
class LabPaths:
    acl_file: Path
    cafile: Path
    crlfile: Path
    certfile: Path
    keyfile: Path
    persistence_location: Path
    collector_cafile: Path
    collector_crlfile: Path
    plugin: Path


def listener_settings(config: str, listener: str) -> dict[str, str]:
    """The settings of one listener (`listener 8883` up to the next listener) of a mosquitto configuration."""
    settings: dict[str, str] = {}
    inside = False
    for line in config.splitlines():
        words = line.split(maxsplit=1)
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            inside = len(words) > 1 and words[1].split()[0] == listener  # listener PORT [ADDRESS]
        elif inside:
            settings[words[0]] = words[1] if len(words) > 1 else ""
    return settings


def render(config: str, paths: LabPaths, port: int, *, collector_port: int, log_file: Path,
           user: str | None = None, debug: bool = True) -> str:
    """The shipped configuration with lab paths, the gateways' listener on `port` and the collectors' on
    `collector_port` (loopback), its log in `log_file`."""
    ports = {GATEWAYS_LISTENER: port, COLLECTORS_LISTENER: collector_port}
    out: list[str] = []
    listeners: list[str] = []
    for number, line in enumerate(config.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            out.append(line)
            continue
        key = words[0]
        if key == "user":
            line = f"user {user or getpass.getuser()}"
        elif key == "pid_file":
            line = f"# (lab) {line}"
        elif key == "log_dest":
            line = f"log_dest file {log_file}"  # flushed per line, unlike stdout into a file
        elif key == "listener":
            if len(words) != 2 or words[1] not in ports or words[1] in listeners:
                raise ValueError(f"line {number}: expected 'listener 8883' or 'listener 8884' once each, got {line!r}")
            listeners.append(words[1])
            line = f"listener {ports[words[1]]} 127.0.0.1"
        elif len(words) == 2 and words[1] in _PATH_KEYS:
            target = getattr(paths, _PATH_KEYS[words[1]])
            line = f"{key} {target}/" if words[1].endswith("/") else f"{key} {target}"
        if not line.startswith("#") and any(root in w for w in line.split()[1:] for root in _PRODUCTION_ROOTS):
            raise ValueError(f"line {number}: production path the lab cannot map: {line!r}")
        out.append(line)
    if sorted(listeners) != sorted(ports):
        raise ValueError(f"expected the listeners 8883 (gateways) and 8884 (collectors) in the shipped "
                         f"configuration, found {listeners}")
    if debug:
        out.append("# (lab) Denied PUBLISH lines and subscription details are logged at debug level")
        out.append("log_type debug")
    return "\n".join(out) + "\n"


class SecureBroker(LabServer):
    """The shipped broker configuration on free loopback ports: `port` for the gateways, `collector_port` for
    the collectors.

    `device_ca_dir` holds ca.crt and ca.crl (collector.pki.DeviceCA) for the gateways' certificates,
    `collector_ca_dir` the same for the collectors' (a CA made in the broker's directory if not given: then no
    collector can connect); `server_ca` issues the broker's server certificate (clients trust
    `server_ca.cert_path`).
    """

    name = "mosquitto"

    def __init__(self, directory: Path | None, *, device_ca_dir: Path, server_ca: LabCA,
                 collector_ca_dir: Path | None = None, config: Path = SHIPPED_CONFIG,
                 acl: Path = SHIPPED_ACL) -> None:
        super().__init__(directory)
        self.server_ca = server_ca
        server = server_ca.issue("localhost", server=True, file_stem=f"secure-broker-{id(self)}")
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        if collector_ca_dir is None:
            from collector.pki import DeviceCA

            collector_ca_dir = self.directory / "collector-ca"
            if not (collector_ca_dir / "ca.crt").exists():
                DeviceCA.init(collector_ca_dir, name="citynerve collector CA (lab, unused)")
        self.paths = LabPaths(
            acl_file=acl, cafile=Path(device_ca_dir) / "ca.crt", crlfile=Path(device_ca_dir) / "ca.crl",
            certfile=server.cert, keyfile=server.key, persistence_location=data,
            collector_cafile=Path(collector_ca_dir) / "ca.crt", collector_crlfile=Path(collector_ca_dir) / "ca.crl",
            plugin=ratelimit_plugin())
        self.shipped_config = config
        self.config_path = self.directory / "mosquitto.conf"
        self.broker_log = self.directory / "broker.log"  # mosquitto's own log; log_path gets its stdout/stderr
        self.collector_port = 0

    @property
    def ca_file(self) -> str:
        """What a client trusts to verify the broker."""
        return str(self.server_ca.cert_path)

    @property
    def gateway_mount(self) -> str:
        """The gateways' listener's mount point in the shipped configuration ("" for none): the collectors see
        the gateways' topics under it (collector.toml mqtt.gateway_mount)."""
        return listener_settings(self.shipped_config.read_text(), GATEWAYS_LISTENER).get("mount_point", "")

    def gateway_mqtt(self, cert: Path | str, key: Path | str, **extra: Any) -> dict[str, Any]:
        """agent.toml [mqtt] for a gateway certificate: the gateways' listener."""
        return {"host": "127.0.0.1", "port": self.port, "ca_file": self.ca_file, "cert_file": str(cert),
                "key_file": str(key), **extra}

    def collector_mqtt(self, cert: Path | str, key: Path | str, **extra: Any) -> dict[str, Any]:
        """collector.toml [mqtt] for a collector certificate: the collectors' listener and the gateways' mount."""
        return {"host": "127.0.0.1", "port": self.collector_port, "ca_file": self.ca_file, "cert_file": str(cert),
                "key_file": str(key), "gateway_mount": self.gateway_mount, **extra}

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.collector_port = free_port()

    def _new_process(self) -> ServerProcess:
        self.config_path.write_text(render(self.shipped_config.read_text(), self.paths, self.port,
                                           collector_port=self.collector_port, log_file=self.broker_log))
        return ServerProcess(
            "mosquitto", [MOSQUITTO, "-c", str(self.config_path)], self.log_path,
            ready=lambda: port_is_open(self.port) and port_is_open(self.collector_port),
            start_timeout=self.start_timeout,
        )

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload mosquitto` does."""
        assert self._process is not None and self._process.proc is not None
        os.kill(self._process.proc.pid, signal.SIGHUP)

    def log_text(self) -> str:
        try:
            return self.broker_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail_log(self, lines: int = 20) -> str:
        return "\n".join((self.log_text() or super().tail_log(lines)).splitlines()[-lines:])


# --- a client that shows what the broker answered ---------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class TestClient:
    """A paho MQTT 5 client over TLS that records messages, SUBACK reason codes and PUBACK reason codes.

    `connect()` returns "connected" or a description of why the broker would not have it.
    """

    port: int
    ca_file: str
    cert: Path | None = None
    key: Path | None = None
    client_id: str = ""
    messages: list[Received] = field(default_factory=list)
    suback: list[int] = field(default_factory=list)
    pubacks: dict[int, int] = field(default_factory=dict)  # mid -> PUBACK reason code
    protocol: int = paho.MQTTv5  # paho.MQTTv311 for a broker without MQTT 5 (NATS 2.9, labkit/nats.py)

    __test__ = False  # not a pytest class

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._gone = threading.Event()
        self._subscribed = threading.Event()
        self.dropped = threading.Event()  # the broker closed the connection after accepting it
        self.outcome = ""
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self.protocol)
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        self.client.tls_set_context(ctx)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def will(self, topic: str, payload: bytes, retain: bool = True) -> TestClient:
        self.client.will_set(topic, payload, qos=1, retain=retain)
        return self

    def connect(self, timeout: float = 5.0) -> str:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            return f"refused during the TLS handshake: {exc}"
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected.is_set():
                return "connected"
            if self._gone.is_set():
                break
            time.sleep(0.02)
        self.client.loop_stop()
        return self.outcome or "no CONNACK (the connection was closed)"

    def subscribe(self, *filters: str, timeout: float = 5.0) -> list[int]:
        """Subscribe at QoS 1; the SUBACK's reason codes (1 = granted QoS 1, 0x80+ = refused)."""
        self._subscribed.clear()
        if self.protocol == paho.MQTTv5:
            self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        else:
            self.client.subscribe([(f, 1) for f in filters])
        if not self._subscribed.wait(timeout):
            raise TimeoutError(f"no SUBACK for {filters}")
        return list(self.suback)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 5.0) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code (0 = accepted, 0x87 = not authorized)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"no PUBACK for {topic}")
        return self.pubacks[info.mid]

    def wait_for(self, predicate, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met within {timeout}s; got {self.messages}")
                self._cond.wait(left)
            return list(self.messages)

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def vanish(self) -> None:
        """Drop the connection without a DISCONNECT, as a power cut would: the broker publishes the will."""
        sock = self.client.socket()
        self.client.loop_stop()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    # paho callbacks (network thread)

    def _on_publish(self, _c, _u, mid, reason, _props) -> None:
        self.pubacks[mid] = reason.value

    def _on_connect(self, _c, _u, _flags, reason, _props) -> None:
        if reason.value == 0:
            self._connected.set()
        else:
            self.outcome = f"CONNACK refused: {reason}"
            self._gone.set()

    def _on_disconnect(self, _c, _u, _flags, reason, _props) -> None:
        if not self._connected.is_set():
            self.outcome = self.outcome or f"disconnected before CONNACK: {reason}"
            self._gone.set()
        else:
            self.dropped.set()

    def _on_subscribe(self, _c, _u, _mid, reason_codes, _props) -> None:
        self.suback = [rc.value for rc in reason_codes]
        self._subscribed.set()

    def _on_message(self, _c, _u, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

