"""The shared MQTT link against a real mosquitto over TLS."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from labkit.mosquitto import MosquittoServer
from labkit.mqtt_probe import MqttProbe
from labkit.pki import LabCA
from labkit.process import relay
from tests.fixtures_mqtt import mqtt_settings
from wire.mqttlink import MqttLink, Will

pytestmark = pytest.mark.integration


def wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.02)


def test_tls_connect_sets_tcp_nodelay_and_publishes(mosquitto: MosquittoServer) -> None:
    probe = MqttProbe(mosquitto.port, str(mosquitto.ca.cert_path), ["t/nodelay/#"])
    link = MqttLink(mqtt_settings(mosquitto), "link-nodelay")
    link.start()
    try:
        assert link.connected.wait(10)
        assert link.protocol_name == "5"
        sock = link.client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        link.publish("t/nodelay/x", b"hello", qos=1).wait_for_publish(5)
        probe.wait_for(lambda m: any(s.payload == b"hello" for s in m))
    finally:
        link.stop()
        probe.close()


def test_server_certificate_from_another_ca_is_refused(mosquitto: MosquittoServer, tmp_path) -> None:
    other = LabCA(tmp_path / "other")
    link = MqttLink(mqtt_settings(mosquitto, ca_file=str(other.cert_path)), "link-wrong-ca")
    link.start()
    try:
        time.sleep(2)
        assert not link.connected.is_set()
    finally:
        link.stop()


def test_last_will_is_published_when_the_link_dies(mosquitto: MosquittoServer) -> None:
    probe = MqttProbe(mosquitto.port, str(mosquitto.ca.cert_path), ["t/will/#"])
    link = MqttLink(mqtt_settings(mosquitto, keepalive=5), "link-will", will=Will("t/will/status", b"offline"))
    link.start()
    try:
        assert link.connected.wait(10)
        # Cut the TCP connection under paho's feet, as a lost cellular link would: the broker sends the will.
        link.client.socket().shutdown(socket.SHUT_RDWR)
        probe.wait_for(lambda m: any(s.payload == b"offline" for s in m), timeout=15)
    finally:
        link.stop()
        probe.close()


def test_reconnects_after_broker_restart(tmp_path, lab_ca: LabCA) -> None:
    with MosquittoServer(tmp_path / "mq", lab_ca) as broker:
        link = MqttLink(mqtt_settings(broker), "link-restart")
        link.start()
        try:
            assert link.connected.wait(10)
            broker.restart()
            wait(lambda: not link.connected.is_set(), 5)
            assert link.connected.wait(15)
        finally:
            link.stop()


class OldBroker:
    """A TLS front that behaves like an MQTT 3.1.1-only broker: it refuses a v5 CONNECT with CONNACK rc=1
    (unacceptable protocol version), and relays 3.1.1 sessions to mosquitto's plain listener."""

    def __init__(self, ca: LabCA, upstream_port: int) -> None:
        files = ca.issue("localhost", server=True, file_stem="oldbroker")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(files.cert, files.key)
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.refused_v5 = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            head = conn.recv(1 << 16)
            # CONNECT: fixed header, remaining length (1 byte here), "\x00\x04MQTT", protocol level.
            level = head[head.index(b"MQTT") + 4]
            if level == 5:
                self.refused_v5 += 1
                conn.sendall(b"\x20\x02\x00\x01")
                conn.close()
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            up.sendall(head)
            threading.Thread(target=relay, args=(up, conn), daemon=True).start()
            relay(conn, up)
        except (OSError, ValueError, IndexError):
            raw.close()

    def close(self) -> None:
        self.server.close()


def test_falls_back_to_mqtt_311_when_v5_is_refused(tmp_path, lab_ca: LabCA) -> None:
    with MosquittoServer(tmp_path / "mq", lab_ca, plain_listener=True) as broker:
        old = OldBroker(lab_ca, broker.plain_port)
        probe = MqttProbe(broker.port, str(lab_ca.cert_path), ["t/old/#"])
        link = MqttLink(mqtt_settings(broker, port=old.port), "link-fallback")
        link.start()
        try:
            wait(lambda: link.protocol_name == "3.1.1" and link.connected.is_set(), 15)
            assert old.refused_v5 >= 1
            link.publish("t/old/x", b"via 3.1.1", qos=1).wait_for_publish(5)
            probe.wait_for(lambda m: any(s.payload == b"via 3.1.1" for s in m))
        finally:
            link.stop()
            probe.close()
            old.close()


def test_an_exception_in_a_callback_is_logged_once_and_the_network_thread_goes_on(mosquitto: MosquittoServer,
                                                                                   caplog) -> None:
    """paho-mqtt 2.x re-raises a callback's exception in its network thread, which ends it: the link would look
    alive and never receive again. MqttLink's guard logs it (once, rate-limited, naming the callback) and paho's
    thread goes on: the messages after the one whose handler raised still arrive."""
    topic = "t/raises/x"
    got: list[bytes] = []
    first, third = threading.Event(), threading.Event()

    def on_connected(_session_present: bool) -> None:
        link.subscribe([topic], qos=1)
        raise RuntimeError("a bug in on_connected")

    def on_message(msg) -> None:
        got.append(bytes(msg.payload))
        (first if len(got) == 1 else third if len(got) == 3 else threading.Event()).set()
        raise ValueError(f"a bug in the handler of {bytes(msg.payload)!r}")

    publisher = MqttLink(mqtt_settings(mosquitto), "link-raises-pub")
    link = MqttLink(mqtt_settings(mosquitto), "link-raises", on_connected=on_connected, on_message=on_message)
    publisher.start()
    try:
        assert publisher.connected.wait(10)
        publisher.publish(topic, b"m1", qos=1, retain=True).wait_for_publish(5)  # arrives whenever subscribed
        link.start()
        assert first.wait(10), "the subscription (made in a raising on_connected) did not happen"
        publisher.publish(topic, b"m2", qos=1).wait_for_publish(5)
        publisher.publish(topic, b"m3", qos=1).wait_for_publish(5)
        assert third.wait(10), f"paho's network thread stopped after the first exception: got {got}"
        assert got == [b"m1", b"m2", b"m3"] and link.client._thread.is_alive() and link.connected.is_set()
        assert link.callback_errors == {"on_connect": 1, "on_message": 3}
        lines = [r.getMessage() for r in caplog.records if "exception in MQTT callback" in r.getMessage()]
        assert len(lines) == 2, lines  # one per callback: the repeats are rate-limited
        assert "on_message" in lines[1] and "ValueError: a bug in the handler of b'm1'" in lines[1]
        assert "on_connect" in lines[0] and "test_mqttlink.py:" in lines[0]
    finally:
        publisher.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        link.stop()
        publisher.stop()
