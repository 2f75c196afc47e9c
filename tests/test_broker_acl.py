"""The shipped broker configuration (deploy/mosquitto/citynerve.conf + acl) on a real mosquitto.

Every client here holds a certificate from a device CA made by collector.pki (gateways: edge-agent enroll's
CSR signed by `ca sign`; collectors: `ca sign --collector`), and talks MQTT 5, so refusals show as reason
codes where mosquitto gives them. "Never reaches a subscriber" is proved with a sentinel: the same client
publishes something allowed afterwards, and once the sentinel has arrived the forbidden message, sent before
it on the same connection, would have too.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from collector.pki import DeviceCA
from edge_agent.enroll import enroll
from labkit.pki import LabCA
from labkit.secure_broker import SHIPPED_ACL, SHIPPED_CONFIG, LabPaths, SecureBroker, TestClient, render

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87
ACCEPTED = (0x00, 0x10)  # PUBACK success / "no matching subscribers" (also a success)
GRANTED_QOS1 = 1
P = "citynerve/v1"


@dataclass(frozen=True)
class Identity:
    name: str
    cert: Path
    key: Path


def gateway_identity(ca: DeviceCA, root: Path, gateway_id: str) -> Identity:
    e = enroll(gateway_id, root / gateway_id)
    cert_path = root / gateway_id / "tls.crt"
    cert_path.write_bytes(ca.sign(e.csr.read_bytes()).public_bytes(serialization.Encoding.PEM))
    return Identity(gateway_id, cert_path, e.tls_key)


def collector_identity(ca: DeviceCA, root: Path, name: str) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256()))
    cert = ca.sign(csr.public_bytes(serialization.Encoding.PEM), collector=True)
    (root / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Identity(name, root / f"{name}.crt", root / f"{name}.key")


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = DeviceCA.init(root / "device-ca")
        self.other_ca = LabCA(root / "lab-ca")  # the broker's server certificate, and "some other CA"
        self.ids = {g: gateway_identity(self.ca, root, g) for g in ("gw-a", "gw-b", "gw-c")}
        self.ids |= {c: collector_identity(self.ca, root, c) for c in ("collector-1", "collector-2")}
        self.broker = SecureBroker(root / "broker", device_ca_dir=root / "device-ca", server_ca=self.other_ca)
        self.clients: list[TestClient] = []

    def client(self, name: str, client_id: str = "") -> TestClient:
        ident = self.ids[name]
        c = TestClient(self.broker.port, self.broker.ca_file, ident.cert, ident.key, client_id=client_id or name)
        self.clients.append(c)
        return c

    def connected(self, name: str, client_id: str = "") -> TestClient:
        c = self.client(name, client_id)
        outcome = c.connect()
        assert outcome == "connected", f"{name}: {outcome}\n{self.broker.tail_log()}"
        return c

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    lab = Lab(tmp_path_factory.mktemp("secure-broker"))
    with lab.broker:
        yield lab


@pytest.fixture
def clients(lab: Lab):
    yield lab
    lab.close_clients()


def test_the_lab_runs_the_shipped_configuration(lab: Lab) -> None:
    """Only paths, the port and the log destination differ from deploy/mosquitto/citynerve.conf."""
    shipped = [line for line in SHIPPED_CONFIG.read_text().splitlines() if line and not line.startswith("#")]
    running = [line for line in lab.broker.config_path.read_text().splitlines() if line and not line.startswith("#")]
    changed = {line.split()[0] for line in shipped if line not in running}
    assert changed == {"user", "pid_file", "log_dest", "acl_file", "persistence_location", "listener",
                       "cafile", "crlfile", "certfile", "keyfile"}
    assert f"acl_file {SHIPPED_ACL}" in running  # the shipped ACL itself, not a copy
    for must in ("allow_anonymous false", "require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", "persistence true"):
        assert must in running


def test_render_refuses_a_production_path_it_does_not_know(tmp_path: Path) -> None:
    paths = LabPaths(*(tmp_path / n for n in ("acl", "ca", "crl", "crt", "key", "data")))
    with pytest.raises(ValueError, match="production path"):
        render(SHIPPED_CONFIG.read_text() + "password_file /etc/mosquitto/passwd\n", paths, 1883,
               log_file=tmp_path / "log")


def test_gateway_publishes_its_own_up_and_status_and_collectors_read_them(clients: Lab) -> None:
    c1, c2 = clients.connected("collector-1"), clients.connected("collector-2")
    assert c1.subscribe(f"{P}/+/status", f"$share/g/{P}/+/up") == [GRANTED_QOS1, GRANTED_QOS1]
    assert c2.subscribe(f"$share/g/{P}/+/up") == [GRANTED_QOS1]
    gw = clients.connected("gw-a")
    assert gw.publish(f"{P}/gw-a/status", b"a-online", retain=True) in ACCEPTED
    sent = [f"a-{i}".encode() for i in range(10)]
    for payload in sent:
        assert gw.publish(f"{P}/gw-a/up", payload) in ACCEPTED

    def shared(_msgs: object) -> list[bytes]:
        return [m.payload for c in (c1, c2) for m in c.messages if m.topic == f"{P}/gw-a/up"]

    c1.wait_for(lambda _m: len(shared(_m)) >= len(sent))
    time.sleep(0.2)
    assert sorted(shared(None)) == sorted(sent)  # each message to exactly one member of the group
    c1.wait_for(lambda msgs: any(m.topic == f"{P}/gw-a/status" and m.payload == b"a-online" for m in msgs))


def test_gateway_cannot_publish_as_another_gateway(clients: Lab) -> None:
    gw_b = clients.connected("gw-b")
    assert gw_b.publish(f"{P}/gw-b/status", b"b-online", retain=True) in ACCEPTED
    assert gw_b.subscribe(f"{P}/gw-b/down/#") == [GRANTED_QOS1]
    collector = clients.connected("collector-1")
    collector.subscribe(f"{P}/+/up", f"{P}/+/status")

    gw_a = clients.connected("gw-a")
    for topic, retain in [(f"{P}/gw-b/up", False), (f"{P}/gw-b/status", True), (f"{P}/gw-b/down/cmd", False),
                          (f"{P}/collector-1/up", False), (f"{P}/gw-a/down/cmd", False), ("elsewhere", False)]:
        assert gw_a.publish(topic, b"forged", retain=retain) == NOT_AUTHORIZED, topic
    assert gw_a.publish(f"{P}/gw-a/up", b"sentinel") in ACCEPTED
    collector.wait_for(lambda msgs: any(m.payload == b"sentinel" for m in msgs))
    time.sleep(0.2)
    assert not [m for m in collector.messages + gw_b.messages if m.payload == b"forged"]

    # The retained status is still gw-b's own: the forged retained publish was not stored.
    fresh = clients.connected("collector-2")
    fresh.subscribe(f"{P}/gw-b/status")
    msgs = fresh.wait_for(lambda m: len(m) >= 1)
    assert [(m.payload, m.retain) for m in msgs] == [(b"b-online", True)]


def test_gateway_cannot_read_other_gateways_or_uplinks(clients: Lab) -> None:
    gw_b = clients.connected("gw-b")
    gw_b.subscribe(f"{P}/gw-b/down/#")
    gw_b.publish(f"{P}/gw-b/status", b"b-online", retain=True)
    gw_a = clients.connected("gw-a")
    codes = gw_a.subscribe("#", f"{P}/+/up", f"{P}/+/status", f"{P}/gw-b/down/#", f"{P}/gw-a/down/#")
    # mosquitto 2.0.11 grants all of these (its ACL check does not look at SUBSCRIBE); a later version
    # refusing the foreign ones with 0x87 would be fine too. What matters is what gets delivered:
    assert all(code in (GRANTED_QOS1, NOT_AUTHORIZED) for code in codes), codes
    assert codes[-1] == GRANTED_QOS1

    collector = clients.connected("collector-1")
    assert gw_b.publish(f"{P}/gw-b/up", b"b-reading") in ACCEPTED
    assert collector.publish(f"{P}/gw-b/down/cmd", b"for-b") in ACCEPTED
    assert collector.publish(f"{P}/gw-a/down/cmd", b"for-a") in ACCEPTED
    gw_b.wait_for(lambda msgs: [m.payload for m in msgs] == [b"for-b"])
    gw_a.wait_for(lambda msgs: any(m.payload == b"for-a" for m in msgs))
    time.sleep(0.2)
    # Only its own downlink, once per matching subscription ('#' and down/#); nothing of gw-b's, not even
    # gw-b's retained status, which '#' and +/status would otherwise have delivered on subscribing.
    assert {(m.topic, m.payload) for m in gw_a.messages} == {(f"{P}/gw-a/down/cmd", b"for-a")}


def test_collector_writes_downlinks_but_cannot_forge_uplinks_or_read_downlinks(clients: Lab) -> None:
    gw_a = clients.connected("gw-a")
    gw_a.subscribe(f"{P}/gw-a/down/#")
    collector = clients.connected("collector-1")
    collector.subscribe(f"{P}/gw-a/down/#")
    assert collector.publish(f"{P}/gw-a/up", b"forged-by-collector") == NOT_AUTHORIZED
    assert collector.publish(f"{P}/gw-a/status", b"forged-by-collector", retain=True) == NOT_AUTHORIZED
    assert collector.publish(f"{P}/gw-a/down/config", b"cfg") in ACCEPTED
    gw_a.wait_for(lambda msgs: [m.payload for m in msgs] == [b"cfg"])
    time.sleep(0.2)
    assert collector.messages == []  # downlinks are write-only for the collector


def test_will_on_another_gateways_topic_is_never_published(clients: Lab) -> None:
    """A will is the broker publishing for the client when it vanishes: it must obey the same ACL."""
    mosquitto_sub = shutil.which("mosquitto_sub")
    if mosquitto_sub is None:
        pytest.skip("mosquitto_sub (mosquitto-clients) not installed")
    collector = clients.connected("collector-1")
    collector.subscribe(f"{P}/gw-b/status", f"{P}/gw-c/status")

    procs: list[subprocess.Popen[bytes]] = []

    def vanishing(name: str, will_topic: str, will: str) -> subprocess.Popen[bytes]:
        ident = clients.ids[name]
        proc = subprocess.Popen(
            [mosquitto_sub, "-V", "5", "-h", "127.0.0.1", "-p", str(clients.broker.port),
             "--cafile", clients.broker.ca_file, "--cert", str(ident.cert), "--key", str(ident.key),
             "-t", f"{P}/{name}/down/#", "--will-topic", will_topic, "--will-payload", will, "--will-qos", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 5
        while clients.broker.log_text().count(f"Sending CONNACK to {name} ") == before[name]:
            assert time.monotonic() < deadline and proc.poll() is None, f"{name} did not connect"
            time.sleep(0.05)
        return proc

    before = {n: clients.broker.log_text().count(f"Sending CONNACK to {n} ") for n in ("gw-a", "gw-c")}

    try:
        forged = vanishing("gw-a", f"{P}/gw-b/status", "forged-will")
        honest = vanishing("gw-c", f"{P}/gw-c/status", "honest-will")
        for proc in (forged, honest):  # no DISCONNECT: the broker must publish the wills
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    collector.wait_for(lambda msgs: any(m.payload == b"honest-will" for m in msgs))
    time.sleep(0.2)
    assert not [m for m in collector.messages if m.payload == b"forged-will"]


def test_no_client_can_take_over_another_clients_session(clients: Lab) -> None:
    """use_username_as_clientid: a gateway connecting with someone else's client id gets its own CN as id."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    collector = clients.client("collector-2", client_id="citynerve-collector-host")
    collector.client.connect("127.0.0.1", clients.broker.port, clean_start=False, properties=props)
    collector.client.loop_start()
    collector.subscribe(f"$share/takeover/{P}/+/up")
    collector.close()  # the session stays, with messages queued for it

    gw_b = clients.connected("gw-b")
    for i in range(3):
        assert gw_b.publish(f"{P}/gw-b/up", f"queued-{i}".encode()) in ACCEPTED
    # gw-a tries both client ids: the collector's (clean start would wipe its queue) and gw-b's (a kick).
    for stolen in ("collector-2", "citynerve-collector-host", "gw-b"):
        thief = clients.client("gw-a", client_id=stolen)
        assert thief.connect() == "connected"
        thief.close()
    time.sleep(0.2)
    assert gw_b.client.is_connected()

    back = clients.client("collector-2", client_id="whatever")
    back.client.connect("127.0.0.1", clients.broker.port, clean_start=False, properties=props)
    back.client.loop_start()
    msgs = back.wait_for(lambda m: len(m) >= 3)
    assert sorted(m.payload for m in msgs) == [b"queued-0", b"queued-1", b"queued-2"]


@pytest.mark.parametrize("how", ["no certificate", "another CA, gateway CN", "another CA, collector CN"])
def test_clients_without_a_device_ca_certificate_are_refused(clients: Lab, how: str) -> None:
    if how == "no certificate":
        client = TestClient(clients.broker.port, clients.broker.ca_file)
        expected_log = "peer did not return a certificate"
    else:
        files = clients.other_ca.issue("gw-a" if "gateway" in how else "collector-1", file_stem=how.replace(" ", "_"))
        client = TestClient(clients.broker.port, clients.broker.ca_file, files.cert, files.key)
        expected_log = "certificate verify failed"
    before = clients.broker.log_text().count(expected_log)
    assert client.connect() != "connected"
    deadline = time.monotonic() + 3
    while clients.broker.log_text().count(expected_log) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert clients.broker.log_text().count(expected_log) > before


def test_revoked_certificate_is_refused_after_reload_and_its_session_ends_on_restart(tmp_path: Path) -> None:
    ca = DeviceCA.init(tmp_path / "device-ca")
    server_ca = LabCA(tmp_path / "lab-ca")
    revoked, kept = gateway_identity(ca, tmp_path, "gw-r"), gateway_identity(ca, tmp_path, "gw-k")

    def client(ident: Identity) -> TestClient:
        return TestClient(broker.port, broker.ca_file, ident.cert, ident.key, client_id=ident.name)

    with SecureBroker(tmp_path / "broker", device_ca_dir=tmp_path / "device-ca", server_ca=server_ca) as broker:
        live = client(revoked)
        assert live.connect() == "connected"
        assert ca.revoke("gw-r")  # writes device-ca/ca.crl, the broker's crlfile
        broker.reload()  # systemctl reload mosquitto
        time.sleep(0.3)
        # mosquitto 2.0.11 re-reads the CRL on SIGHUP: new connections with the certificate are refused...
        assert client(revoked).connect() != "connected"
        assert "certificate verify failed" in broker.log_text()
        # ...but a session that is already open survives the reload,
        assert live.publish(f"{P}/gw-r/up", b"still-here") in ACCEPTED
        # until the broker restarts; the gateway's reconnects are then refused.
        broker.restart()
        deadline = time.monotonic() + 5
        while live.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not live.client.is_connected()
        live.close()
        assert client(revoked).connect() != "connected"
        other = client(kept)
        assert other.connect() == "connected"
        other.close()
