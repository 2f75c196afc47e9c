"""Pieces of the fleet benchmark and of what it changed (issue 14): the lean MQTT 5 client (labkit/lean_mqtt.py)
on bytes and against the shipped broker, the agents' reconnect jitter, the broker's listen backlog."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from labkit import enrolled
from labkit.flood_lab import QuietSecureBroker
from labkit.lean_mqtt import (
    CONNACK,
    PUBLISH,
    LeanConnection,
    PacketReader,
    ProtocolError,
    client_context,
    connect,
    encode_connect,
    encode_publish,
    encode_subscribe,
    varint,
)
from labkit.pki import LabCA
from labkit.secure_broker import TestClient
from wire import topics
from wire.mqttlink import reconnect_delay

# -- the codec (pure) -----------------------------------------------------------------------------------------------


def test_variable_byte_integers_at_their_boundaries() -> None:
    # MQTT 5 §1.5.5, the table of sizes
    assert [varint(n) for n in (0, 127, 128, 16383, 16384, 268_435_455)] == [
        b"\x00", b"\x7f", b"\x80\x01", b"\xff\x7f", b"\x80\x80\x01", b"\xff\xff\xff\x7f"]
    with pytest.raises(ValueError):
        varint(268_435_456)


def test_publish_connect_and_subscribe_bytes() -> None:
    # §3.3: fixed header 0x32 (QoS 1), topic, packet id, empty properties, payload
    assert encode_publish("a/b", b"xy", 10) == b"\x32\x0a\x00\x03a/b\x00\x0a\x00xy"
    assert encode_publish("a/b", b"xy", 10, retain=True, dup=True)[0] == 0x3B
    # §3.1: "MQTT", level 5, clean start, keepalive 30, empty properties, client id
    assert encode_connect("gw", 30) == b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x1e\x00\x00\x02gw"
    # §3.8: reserved flags 0010, packet id, empty properties, filter, options (QoS 1)
    assert encode_subscribe(7, ["x/#"]) == b"\x82\x09\x00\x07\x00\x00\x03x/#\x01"


def test_the_reader_takes_packets_split_anywhere_and_reads_connack_properties() -> None:
    connack = b"\x20\x09\x00\x00\x06\x21\x03\xe8\x13\x00\x3c"  # Receive Maximum 1000, Server Keep Alive 60
    puback = b"\x40\x03\x00\x05\x87"  # §3.4.2.1: 0x87 Not authorized
    inbound = encode_publish("gw/citynerve/v1/g/down/ack", b"\x01\x02", 3)
    stream = connack + puback + inbound
    for cut in range(1, len(stream)):
        reader = PacketReader()
        packets = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [p.kind for p in packets] == [CONNACK, 4, PUBLISH]
        assert (packets[0].reason, packets[0].receive_maximum, packets[0].server_keepalive) == (0, 1000, 60)
        assert (packets[1].packet_id, packets[1].reason) == (5, 0x87)
        assert (packets[2].topic, packets[2].payload, packets[2].qos, packets[2].packet_id) == (
            "gw/citynerve/v1/g/down/ack", b"\x01\x02", 1, 3)


def test_malformed_input_is_a_protocol_error_naming_where() -> None:
    with pytest.raises(ProtocolError, match="Variable Byte Integer"):
        PacketReader().feed(b"\x20\xff\xff\xff\xff\x01")
    with pytest.raises(ProtocolError, match="unknown property 0x7f"):
        PacketReader().feed(b"\x20\x05\x00\x00\x02\x7f\x00")
    with pytest.raises(ProtocolError, match="unexpected packet type 1"):
        PacketReader().feed(encode_connect("x", 1))


# -- reconnect jitter (pure) ---------------------------------------------------------------------------------------


def test_reconnect_delay_is_a_full_jitter_draw_within_the_doubling_window() -> None:
    """The window doubles per failed attempt up to the maximum; the draw is uniform in it, so a fleet that lost
    the broker at one instant comes back spread over the window, not at one instant."""
    assert [reconnect_delay(a, 1.0, 60.0, lambda: 0.5) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert reconnect_delay(0, 1.0, 60.0, lambda: 0.0) == 0.0
    assert reconnect_delay(10_000, 1.0, 60.0, lambda: 0.999) < 60.0
    rng = random.Random(1)
    first = sorted(reconnect_delay(0, 1.0, 60.0, rng.random) for _ in range(10_000))
    # 10,000 gateways after a broker restart: about a tenth of them per tenth of a second, none at once
    assert 900 < sum(1 for d in first if d < 0.1) < 1100 and first[-1] < 1.0


# -- against the shipped broker ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet_lab(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fleet-pieces")
    dep = enrolled.create(root / "deployment", [])
    dep.enroll_many(["gw-lean-1", "gw-lean-2"])
    with QuietSecureBroker(root / "broker", device_ca_dir=dep.ca_dir, collector_ca_dir=dep.collector_ca_dir,
                           server_ca=LabCA(root / "server-ca")) as broker:
        yield dep, broker


def test_the_lean_client_speaks_mqtt5_with_the_shipped_broker(fleet_lab) -> None:
    """Mutual TLS with an enrolled gateway's certificate (bulk-enrolled: registry add_many + CA issue_many);
    CONNACK with the broker's Receive Maximum; its own uplink PUBACKed, another gateway's refused (0x87, the
    ACL); a collector receives the uplink under the gateways' mount point and the downlink it publishes on the
    gateway's down/ack reaches the lean client (at QoS 1, acknowledged by it)."""
    dep, broker = fleet_lab
    gw = dep.gateways["gw-lean-1"]
    collector = TestClient(broker.collector_port, broker.ca_file, dep.collector_cert, dep.collector_key, "collector-1")
    assert collector.connect() == "connected"
    collector.subscribe("gw/citynerve/v1/+/up")

    async def scenario() -> dict:
        loop = asyncio.get_running_loop()
        got: dict = {"pubacks": {}, "messages": []}
        connack = loop.create_future()
        suback = loop.create_future()
        down = loop.create_future()

        def on_message(topic: str, payload: bytes) -> None:
            got["messages"].append((topic, payload))
            if not down.done():
                down.set_result(True)

        conn = LeanConnection("gw-lean-1", keepalive=30, on_connack=lambda p: connack.set_result(p),
                              on_puback=lambda pid, rc: got["pubacks"].__setitem__(pid, rc), on_message=on_message,
                              on_suback=lambda _pid, codes: suback.set_result(codes))
        await connect("127.0.0.1", broker.port, client_context(broker.ca_file, str(gw.tls_cert), str(gw.tls_key)),
                      conn, 10)
        packet = await asyncio.wait_for(connack, 10)
        got["connack"] = (packet.reason, packet.receive_maximum)
        conn.subscribe([topics.down(topics.DEFAULT_PREFIX, "gw-lean-1", "ack")])
        got["suback"] = await asyncio.wait_for(suback, 10)
        own = conn.publish(topics.up(topics.DEFAULT_PREFIX, "gw-lean-1"), b"sealed bytes")
        other = conn.publish(topics.up(topics.DEFAULT_PREFIX, "gw-lean-2"), b"forged")
        while len(got["pubacks"]) < 2:
            await asyncio.sleep(0.02)
        got["own"], got["other"] = got["pubacks"][own], got["pubacks"][other]
        await loop.run_in_executor(None, lambda: collector.wait_for(lambda m: len(m) >= 1, 10))
        await loop.run_in_executor(None, collector.publish, "gw/citynerve/v1/gw-lean-1/down/ack", b"\x01ack")
        await asyncio.wait_for(down, 10)
        conn.close()
        return got

    try:
        got = asyncio.run(scenario())
    finally:
        collector.close()
    assert got["connack"][0] == 0 and got["connack"][1] == 1000  # max_inflight_messages in citynerve.conf
    assert got["suback"] == [1]
    assert (got["own"], got["other"]) == (0, 0x87)
    assert [(m.topic, m.payload) for m in collector.messages] == [("gw/citynerve/v1/gw-lean-1/up", b"sealed bytes")]
    # mosquitto 2.0.11 leaves the listener's mount point on what it delivers (deploy/mosquitto/citynerve.conf)
    assert got["messages"] == [("gw/citynerve/v1/gw-lean-1/down/ack", b"\x01ack")]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_shipped_broker_listens_with_a_backlog_of_4096(fleet_lab) -> None:
    """mosquitto 2.0.11 hard-codes listen(sock, 100); the rate-limit plugin raises both listeners' backlog
    (plugin_opt_listen_backlog in deploy/mosquitto/citynerve.conf) at the broker's first tick. `ss -ltn` shows a
    listening socket's backlog as its Send-Q."""
    _dep, broker = fleet_lab
    deadline = time.monotonic() + 10
    while "listen backlog 4096 on 2 listening socket(s)" not in broker.log_text():
        assert time.monotonic() < deadline, broker.tail_log()
        time.sleep(0.05)
    expected = min(4096, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    for port in (broker.port, broker.collector_port):
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
        assert out.split()[2] == str(expected), out
