"""A three-node NATS JetStream cluster started from the SHIPPED deploy/nats/ files, on loopback with TLS.

`render()` rewrites only what must differ in the lab - the production paths, the ports (4222 collectors, 8883
gateways' MQTT, 6222 routes, 8222 monitoring: free loopback ports per node) and the nodes' host names in the routes
- and refuses a configuration holding a production path it does not know, so the tests run the shipped settings,
never a copy that could drift (as labkit/secure_broker.py does for mosquitto).

    device CA (edge-collector ca init)      -> the MQTT port's ca_file (gateways)
    collector CA (a second ca init)         -> the client port's ca_file (collectors)
    LabCA (labkit/pki.py)                   -> the nodes' certificate (server and client usage) and the routes' CA
    users.conf                              -> made by the caller (`edge-collector nats users`), shared by the nodes

Gateways reach the cluster through `MqttBalancer`, a TCP pass-through on one port in front of the three MQTT
ports (what a DNS name with three addresses or an L4 load balancer gives in production): a connection goes to the
next node that accepts it, so an agent whose node dies reconnects to another one. TLS stays end to end.

    cluster = NatsCluster(tmp / "nats", device_ca_dir=..., collector_ca_dir=..., server_ca=LabCA(...),
                          users=tmp / "users.conf").start()
    cluster.servers          # ["tls://127.0.0.1:p1", ...] for collector.toml [nats] servers
    cluster.balancer.port    # for agent.toml [mqtt] port
    cluster.nodes[1].kill(); cluster.nodes[1].restart()
    cluster.close()
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.pki import LabCA
from labkit.process import LabServer, ServerProcess, free_port, port_is_open, relay

REPO = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO / "deploy" / "nats"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
NODES = 3

# Production path -> the lab's file, by name in `LabPaths` (the store directory is per node).
_PATH_KEYS = {
    "/etc/nats/citynerve/server.crt": "server_cert",
    "/etc/nats/citynerve/server.key": "server_key",
    "/etc/nats/citynerve/collector-ca.crt": "collector_ca",
    "/etc/nats/citynerve/device-ca.crt": "device_ca",
    "/etc/nats/citynerve/server-ca.crt": "server_ca",
    "/var/lib/nats/citynerve": "store_dir",
}
_PRODUCTION_ROOTS = ("/etc/", "/var/", "/run/", "/usr/")
_ROUTE = re.compile(r"nats-route://nats-(\d+)\.citynerve\.internal:6222")


@dataclass(frozen=True)
class LabPaths:
    server_cert: Path
    server_key: Path
    collector_ca: Path
    device_ca: Path
    server_ca: Path
    store_dir: Path


@dataclass(frozen=True)
class NodePorts:
    client: int
    mqtt: int
    route: int
    monitor: int


def render(config: str, paths: LabPaths, ports: NodePorts, route_ports: dict[int, int]) -> str:
    """The shipped citynerve.conf for one lab node: lab paths, its ports on loopback, the routes to the others."""
    listen = {"0.0.0.0:4222": f"127.0.0.1:{ports.client}", "0.0.0.0:8883": f"127.0.0.1:{ports.mqtt}",
              "0.0.0.0:6222": f"127.0.0.1:{ports.route}", "127.0.0.1:8222": f"127.0.0.1:{ports.monitor}"}
    out: list[str] = []
    for number, line in enumerate(config.splitlines(), 1):
        if line.strip().startswith("#") or not line.strip():
            out.append(line)
            continue
        for production, key in _PATH_KEYS.items():
            line = line.replace(f'"{production}"', f'"{getattr(paths, key)}"')
        for production, lab in listen.items():
            line = line.replace(production, lab)
        for node in map(int, _ROUTE.findall(line)):
            if node not in route_ports:
                raise ValueError(f"line {number}: a route to node {node}, the lab has {sorted(route_ports)}")
        line = _ROUTE.sub(lambda m: f"nats-route://127.0.0.1:{route_ports[int(m.group(1))]}", line)
        if any(root in word for word in line.split() for root in _PRODUCTION_ROOTS):
            raise ValueError(f"line {number}: production path the lab cannot map: {line.strip()!r}")
        if re.search(r"\b(4222|8883|6222|8222)\b", line):
            raise ValueError(f"line {number}: a port the lab cannot map: {line.strip()!r}")
        out.append(line)
    return "\n".join(out) + "\n"


class NatsNode(LabServer):
    """One node: node-N.conf and citynerve.conf rendered into its own directory, users.conf linked there."""

    name = "nats"

    def __init__(self, directory: Path, number: int, cluster: NatsCluster) -> None:
        super().__init__(directory)
        self.number = number
        self.cluster = cluster
        self.server_name = f"nats-{number}"
        self.ports = NodePorts(0, 0, 0, 0)

    def _choose_ports(self) -> None:  # chosen by the cluster, all at once (the routes need every node's)
        pass

    @property
    def mqtt_port(self) -> int:
        return self.ports.mqtt

    @property
    def client_url(self) -> str:
        return f"tls://127.0.0.1:{self.ports.client}"

    def _new_process(self) -> ServerProcess:
        paths = self.cluster.paths(self.directory / "jetstream")
        shipped = (SHIPPED_DIR / "citynerve.conf").read_text()
        (self.directory / "citynerve.conf").write_text(render(shipped, paths, self.ports, self.cluster.route_ports))
        node = (SHIPPED_DIR / f"node-{self.number}.conf").read_text()
        (self.directory / "node.conf").write_text(node)
        users = self.directory / "users.conf"
        if not users.is_symlink():
            users.symlink_to(self.cluster.users)
        return ServerProcess(
            self.server_name, [NATS_SERVER, "-c", str(self.directory / "node.conf")], self.log_path,
            ready=lambda: port_is_open(self.ports.client) and port_is_open(self.ports.mqtt),
            start_timeout=self.start_timeout,
        )

    def start(self) -> NatsNode:
        self._start_process()
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None and self._process.proc is not None
        return self._process.proc.pid

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload nats-server` does: users.conf read again."""
        os.kill(self.pid, signal.SIGHUP)

    def monitor(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.monitor}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def healthy(self) -> bool:
        """JetStream up and current on this node (its /healthz)."""
        try:
            return self.monitor("/healthz").get("status") == "ok"
        except (OSError, ValueError):
            return False


class NatsCluster:
    """Three nodes of the shipped configuration; `users` is the users file every node includes."""

    def __init__(self, directory: Path | None, *, device_ca_dir: Path, collector_ca_dir: Path, server_ca: LabCA,
                 users: Path) -> None:
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="nats-")) if directory is None else Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.server_ca = server_ca
        self.users = Path(users).resolve()
        self._cert = server_ca.issue("localhost", server=True, client_too=True, file_stem=f"nats-node-{id(self)}")
        self._device_ca = Path(device_ca_dir) / "ca.crt"
        self._collector_ca = Path(collector_ca_dir) / "ca.crt"
        self.nodes = {n: NatsNode(self.directory / f"node-{n}", n, self) for n in range(1, NODES + 1)}
        # Every port chosen now, so that the clients' configurations can be written before the cluster starts.
        taken: set[int] = set()

        def port() -> int:
            while (p := free_port()) in taken:
                pass
            taken.add(p)
            return p

        for node in self.nodes.values():
            node.ports = NodePorts(port(), port(), port(), port())
        self.route_ports = {n: node.ports.route for n, node in self.nodes.items()}
        self.balancer = MqttBalancer([node.ports.mqtt for node in self.nodes.values()])

    def paths(self, store_dir: Path) -> LabPaths:
        return LabPaths(self._cert.cert, self._cert.key, self._collector_ca, self._device_ca,
                        self.server_ca.cert_path, store_dir)

    @property
    def ca_file(self) -> str:
        """What clients trust to verify the nodes."""
        return str(self.server_ca.cert_path)

    @property
    def servers(self) -> list[str]:
        return [node.client_url for node in self.nodes.values()]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        try:
            self.balancer.start()
            for node in self.nodes.values():
                node.start()
            self.wait_healthy(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_healthy(self, timeout: float = 30.0, nodes: list[int] | None = None) -> None:
        """Until every (given) node reports JetStream healthy: a meta leader elected, its streams current."""
        deadline = time.monotonic() + timeout
        wanted = [self.nodes[n] for n in (nodes or self.nodes)]
        while not all(node.healthy() for node in wanted):
            if time.monotonic() > deadline:
                sick = [n.server_name for n in wanted if not n.healthy()]
                raise RuntimeError(f"NATS nodes not healthy after {timeout}s: {sick}: "
                                   f"{wanted[0].tail_log()}")
            time.sleep(0.1)

    def lagging_replicas(self, stream: str, consumer: str | None = None) -> list[str] | None:
        """Which replicas of `stream` (and of its `consumer`) the leaders do not report current, as
        "stream:nats-N" / "consumer:nats-N"; None while no running node leads them. Asked of every running node:
        a raft group's leader is the one that knows its followers' state (/jsz cluster.replicas)."""
        lagging: list[str] = []
        stream_led = consumer_led = False
        for node, detail in self._stream_details(stream, "consumers=true"):
            cluster = detail.get("cluster") or {}
            if cluster.get("leader") == node.server_name:
                stream_led = True
                lagging += [f"stream:{r.get('name')}" for r in cluster.get("replicas") or [] if not r.get("current")]
            for c in detail.get("consumer_detail") or []:
                ccluster = c.get("cluster") or {}
                if c.get("name") == consumer and ccluster.get("leader") == node.server_name:
                    consumer_led = True
                    lagging += [f"consumer:{r.get('name')}" for r in ccluster.get("replicas") or []
                                if not r.get("current")]
        if not stream_led or (consumer is not None and not consumer_led):
            return None
        return lagging

    def wait_current(self, stream: str, consumer: str | None = None, timeout: float = 60.0) -> None:
        """Until `stream` and `consumer` have a leader and every replica is current again: what a node that
        rejoined must reach before another node may die without the stream losing its quorum. Not /healthz,
        which also waits for nats-server's own MQTT assets ($MQTT_rmsgs, the retained messages' consumer of
        each node), which citynerve's data path does not depend on and which nats-server 2.9 was seen to
        leave "not current" for over 30 s after a restart."""
        deadline = time.monotonic() + timeout
        while (lagging := self.lagging_replicas(stream, consumer)) != []:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{stream}/{consumer} not current after {timeout}s: "
                                   f"{'no leader' if lagging is None else lagging}")
            time.sleep(0.1)

    def collector_nats(self, cert: Path | str, key: Path | str, **extra: Any) -> dict[str, Any]:
        """collector.toml [nats] for a collector certificate: every node of the cluster."""
        return {"servers": self.servers, "ca_file": self.ca_file, "cert_file": str(cert), "key_file": str(key),
                "reconnect_wait": "500ms", **extra}

    def gateway_mqtt(self, cert: Path | str, key: Path | str, **extra: Any) -> dict[str, Any]:
        """agent.toml [mqtt] for a gateway certificate: the balancer in front of the nodes' MQTT ports."""
        return {"host": "127.0.0.1", "port": self.balancer.port, "ca_file": self.ca_file, "cert_file": str(cert),
                "key_file": str(key), **extra}

    def _stream_details(self, stream: str, query: str,
                        nodes: list[NatsNode] | None = None) -> Iterator[tuple[NatsNode, dict[str, Any]]]:
        """(node, its /jsz?<query> detail of `stream`) from each running node that answers (every node's by
        default, or the given ones'); a node that does not answer is left out."""
        for node in self.nodes.values() if nodes is None else nodes:
            if not node.running:
                continue
            try:
                doc = node.monitor(f"/jsz?{query}")
            except (OSError, ValueError):
                continue
            for account in doc.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        yield node, detail

    def stream_leader(self, stream: str) -> int | None:
        """The node leading `stream` (its replicas elect one), from the nodes' monitoring endpoints."""
        for _node, detail in self._stream_details(stream, "streams=true"):
            if leader := (detail.get("cluster") or {}).get("leader"):
                return int(leader.rsplit("-", 1)[1])
        return None

    def stream_state(self, stream: str, consumer: str | None = None) -> dict[str, int] | None:
        """The stream's message count and, for `consumer`, its num_pending (not yet delivered) and num_ack_pending
        (delivered, not acknowledged), as the stream's leader reports them (None: no leader answers)."""
        leader = self.stream_leader(stream)
        if leader is None:
            return None
        for _node, detail in self._stream_details(stream, "consumers=true", [self.nodes[leader]]):
            out = {"messages": int(detail["state"]["messages"])}
            for c in detail.get("consumer_detail") or []:
                if c.get("name") == consumer:
                    out["num_pending"] = int(c.get("num_pending", 0))
                    out["num_ack_pending"] = int(c.get("num_ack_pending", 0))
            return out
        return None

    def reload(self) -> None:
        for node in self.nodes.values():
            if node.running:
                node.reload()

    def close(self) -> None:
        self.balancer.close()
        for node in self.nodes.values():
            node.close()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class MqttBalancer:
    """A TCP pass-through on one loopback port in front of the nodes' MQTT ports: each connection goes to the next
    node (round robin) that accepts it. Two threads per connection: for a handful of agents, not for a fleet."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.port = 0
        self._next = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.placed: list[int] = []  # the backend port of each accepted connection, in order

        # Bound now (its port goes into the agents' configurations); accepting from start().
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]

    def start(self) -> MqttBalancer:
        assert self._listener is not None
        self._listener.listen(64)
        threading.Thread(target=self._accept, name="mqtt-balancer", daemon=True).start()
        return self

    def _upstream(self) -> socket.socket | None:
        for _ in range(len(self.backends)):
            with self._lock:
                port = self.backends[self._next % len(self.backends)]
                self._next += 1
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                sock.settimeout(None)
                self.placed.append(port)
                return sock
        return None

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = self._upstream()
            if upstream is None:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [client, upstream]
            # One side gone (a node killed, an agent stopped): relay closes both.
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=relay, args=(src, dst), name="mqtt-balancer-pipe", daemon=True).start()

    def drop_connections(self) -> int:
        """Close every connection passed through so far (as a network cut would), keep accepting new ones."""
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        return len(conns) // 2

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            for sock in self._conns:
                with contextlib.suppress(OSError):
                    sock.close()
            self._conns.clear()
