"""End-to-end acknowledgements and the health heartbeat, with the real collector (a process), mosquitto and influxd.

A gateway here is this test: it seals (or not) its uplinks with the real wire code, and an ack probe subscribed
to <prefix>/+/down/ack checks, the moment each acknowledgement arrives, what InfluxDB holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.pki import init_collector_key
from collector.registry import GatewayRegistry
from labkit import stack
from labkit.influxd import InfluxdServer, InfluxError, quote_string
from labkit.mosquitto import MosquittoServer
from labkit.mqtt_probe import MqttProbe
from labkit.process import ServerProcess
from tests.fixtures_mqtt import mqtt_settings
from tests.test_e2e import wait_until
from wire import ack
from wire.envelope import seal_plain
from wire.keys import collector_key_from_pem
from wire.mqttlink import MqttLink
from wire.schema import Batch, Reading, encode_batch
from wire.seal import GatewaySealer, SealError, SealReason
from wire.status import encode_status

pytestmark = pytest.mark.integration

# Each collector here has a topic prefix of its own: a collector subscribed to the same uplinks would store and
# acknowledge them too (as several collector instances would, correctly, but not what a test expects).
LAB_PREFIX = "acklab/v1"
MEASUREMENT = "acktest"
SEALED_GATEWAYS = ["gw-ack-sealed"]


def up(prefix: str, gateway: str) -> str:
    return f"{prefix}/{gateway}/up"


def ack_topic(prefix: str, gateway: str) -> str:
    return f"{prefix}/{gateway}/down/ack"


def batch(gateway: str, seq: int, now: int, measurement: str = MEASUREMENT) -> Batch:
    # One reading per message, its value the seq: what InfluxDB holds says which messages are stored. Each message
    # its own sent time, as from an agent: the ingest record of a message is stored at it.
    return Batch(gateway, seq, now + seq, [Reading("m", measurement, now + seq, {"v": seq})])


def stored_seqs(influx: InfluxdServer, db: str, gateway: str) -> set[int]:
    """Seqs of which every line (the reading and the ingest record) is queryable."""
    where = f"WHERE gateway = {quote_string(gateway)}"
    try:
        readings = {int(r["v"]) for r in influx.query(f"SELECT v FROM {MEASUREMENT} {where}", db)}
        ingest = {r["seq"] for r in influx.query(f"SELECT seq FROM citynerve_ingest {where}", db)}
    except (OSError, InfluxError):  # influxd stopped, or the database not there yet, on purpose
        return set()
    return readings & ingest


class AckProbe(MqttProbe):
    """Records every acknowledgement with what InfluxDB held for its gateway when it arrived."""

    def __init__(self, broker: MosquittoServer, prefix: str, stored: Callable[[str], set[int]]) -> None:
        self.prefix = prefix
        self._stored = stored
        self.stored_at_arrival: list[set[int]] = []
        super().__init__(broker.port, str(broker.ca.cert_path), [f"{prefix}/+/down/ack"])

    def _on_message(self, c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        stored = self._stored(msg.topic.split("/")[-3])  # queried before the message is visible to wait_for
        with self._cond:  # an RLock: the base class takes it again
            self.stored_at_arrival.append(stored)
            super()._on_message(c, u, msg)

    def of(self, gateway: str) -> list[tuple[bytes, set[int]]]:
        with self._cond:
            return [(m.payload, s) for m, s in zip(self.messages, self.stored_at_arrival, strict=True)
                    if m.topic == ack_topic(self.prefix, gateway)]

    def wait_acked(self, gateway: str, seqs: set[int], decode: Callable[[bytes], list[ack.Range]],
                   timeout: float = 10) -> list[list[ack.Range]]:
        def acked(_: object) -> bool:
            return seqs <= {s for p, _ in self.of(gateway) for s in covered(decode(p))}

        self.wait_for(acked, timeout)
        return [decode(p) for p, _ in self.of(gateway)]


def covered(ranges: list[ack.Range]) -> set[int]:
    return {seq for first, last in ranges for seq in range(first, last + 1)}


def plain_body(payload: bytes) -> list[ack.Range]:
    assert payload[0] == ack.PLAIN_ACK, payload[:1]
    return ack.decode_ack(payload[1:])


def publish_all(link: MqttLink, messages: list[tuple[str, bytes]]) -> None:
    infos = [link.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(10)


def assert_acked_after_storage(probe: AckProbe, gateway: str, decode: Callable[[bytes], list[ack.Range]]) -> None:
    for payload, stored in probe.of(gateway):
        missing = covered(decode(payload)) - stored
        assert not missing, f"seqs {sorted(missing)} acknowledged before InfluxDB held them"


@dataclass
class Lab:
    """One collector (sealed payloads, plain ones accepted too) for the tests that need no fault of their own."""

    collector: ServerProcess
    influx: InfluxdServer
    db: str
    probe: AckProbe
    link: MqttLink
    sealers: dict[str, GatewaySealer]

    def stored(self, gateway: str) -> set[int]:
        return stored_seqs(self.influx, self.db, gateway)


def collector_config(path: Path, broker: MosquittoServer, prefix: str, influx: dict[str, Any],
                     **sections: Any) -> Path:
    mqtt = stack.mqtt_section(broker, client_id=f"collector-{prefix.replace('/', '-')}", topic_prefix=prefix)
    return stack.write_collector_config(path, mqtt, influx, log={"stats_interval": "1s"}, **sections)


def publisher(broker: MosquittoServer, client_id: str) -> MqttLink:
    link = MqttLink(mqtt_settings(broker), client_id, max_inflight=100)
    link.start()
    assert link.connected.wait(10)
    return link


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoServer, influxd: InfluxdServer) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("acks")
    keys_dir, registry = root / "keys", root / "gateways.db"
    init_collector_key(keys_dir)
    collector_key = collector_key_from_pem((keys_dir / "collector.pub").read_bytes())
    sealers = {}
    with GatewayRegistry(registry, create=True) as gateways:  # before the collector starts: no wait for a re-read
        for gateway in SEALED_GATEWAYS:
            identity = Ed25519PrivateKey.generate()
            gateways.add(gateway, identity.public_key())
            sealers[gateway] = GatewaySealer(gateway, identity, collector_key)
    db = "acks_lab"
    influxd.create_database(db)
    collector = stack.collector_process(collector_config(
        root / "collector.toml", mosquitto, LAB_PREFIX, {"api": "v1", "url": influxd.url, "database": db},
        security={"keys_dir": str(keys_dir), "registry": str(registry), "accept_plain": True},
    )).start()
    probe = AckProbe(mosquitto, LAB_PREFIX, lambda gateway: stored_seqs(influxd, db, gateway))
    link = publisher(mosquitto, "acks-publisher")
    try:
        yield Lab(collector, influxd, db, probe, link, sealers)
    finally:
        link.stop()
        probe.close()
        collector.stop()
        influxd.drop_database(db)
    log = collector.log_path.read_text()
    assert "Traceback" not in log, log


def test_sealed_acks_follow_the_write_batched_exact_and_authenticated(lab: Lab) -> None:
    gateway = "gw-ack-sealed"
    sealer = lab.sealers[gateway]
    topic = up(LAB_PREFIX, gateway)
    seqs = list(range(1000, 1040)) + [1100 + 2 * i for i in range(10)]  # a run and ten gaps: 50 messages
    now = time.time_ns()
    payloads = {seq: sealer.seal(topic, encode_batch(batch(gateway, seq, now))) for seq in seqs}
    publish_all(lab.link, [(topic, payloads[seq]) for seq in seqs])

    opened: dict[bytes, list[ack.Range]] = {}

    def verified(payload: bytes) -> list[ack.Range]:
        # once per message: the agent's side refuses a second arrival of the same downlink as a replay
        if payload not in opened:
            opened[payload] = ack.decode_ack(sealer.open_downlink(ack_topic(LAB_PREFIX, gateway), payload))
        return opened[payload]

    acks = lab.probe.wait_acked(gateway, set(seqs), verified)
    assert_acked_after_storage(lab.probe, gateway, verified)
    assert sorted(s for ranges in acks for s in covered(ranges)) == seqs  # each seq once, nothing else
    assert len(acks) <= 3, acks  # batched per interval, not one per message
    assert sum(map(len, acks)) <= 11 + len(acks) - 1  # as ranges: the run is one pair (or split once per message)
    seen = [m for m in lab.probe.messages if m.topic == ack_topic(LAB_PREFIX, gateway)]
    assert all(m.qos == 0 and not m.retain for m in seen)  # QoS 0: collector/app.py _publish_acks says why

    # Authenticated for this gateway's session and this topic: any change, or another topic, fails.
    payload = seen[0].payload
    where = {0: SealReason.MALFORMED_HEADER, 1: SealReason.UNKNOWN_SESSION, 20: SealReason.BAD_TAG,
             26: SealReason.BAD_TAG, len(payload) - 1: SealReason.BAD_TAG}  # format, session, time, body, MAC
    for i, reason in where.items():
        flipped = bytearray(payload)
        flipped[i] ^= 0x04
        with pytest.raises(SealError) as exc:
            sealer.open_downlink(ack_topic(LAB_PREFIX, gateway), bytes(flipped))
        assert exc.value.reason == reason, i
    with pytest.raises(SealError) as exc:
        sealer.open_downlink(ack_topic(LAB_PREFIX, "gw-ack-other"), payload)
    assert exc.value.reason == SealReason.BAD_TAG

    # A message sent again (the agent's re-send after a lost ack) is stored again and acknowledged again.
    before = len(seen)
    publish_all(lab.link, [(topic, payloads[1005])])
    lab.probe.wait_for(lambda m: sum(x.topic == ack_topic(LAB_PREFIX, gateway) for x in m) > before)
    assert verified(lab.probe.of(gateway)[-1][0]) == [(1005, 1005)]
    assert len(lab.influx.query(f"SELECT v FROM {MEASUREMENT} WHERE v = 1005", lab.db)) == 1  # same point
    log = wait_until(lambda: (t := lab.collector.log_path.read_text()) and "acked_seqs=51" in t and t, 5,
                     "the acknowledgement counters in the stats line")
    assert "duplicates=1" in log and "acks_sent=" in log


def test_plain_gateway_gets_plain_acks_and_a_resent_seq_again(lab: Lab) -> None:
    gateway = "gw-ack-plain"
    now = time.time_ns()
    publish_all(lab.link, [(up(LAB_PREFIX, gateway), seal_plain(batch(gateway, seq, now))) for seq in (1, 2, 3, 5)])
    acks = lab.probe.wait_acked(gateway, {1, 2, 3, 5}, plain_body)
    assert_acked_after_storage(lab.probe, gateway, plain_body)
    assert [r for ranges in acks for r in ranges] == [(1, 3), (5, 5)]

    publish_all(lab.link, [(up(LAB_PREFIX, gateway), seal_plain(batch(gateway, 2, now)))])
    lab.probe.wait_for(lambda m: sum(x.topic == ack_topic(LAB_PREFIX, gateway) for x in m) > len(acks))
    assert plain_body(lab.probe.of(gateway)[-1][0]) == [(2, 2)]
    rows = lab.influx.query(f"SELECT v FROM {MEASUREMENT} WHERE gateway = {quote_string(gateway)}", lab.db)
    assert sorted(r["v"] for r in rows) == [1, 2, 3, 5]  # rewritten, not doubled


def test_refused_content_is_acknowledged_a_rejected_message_is_not(lab: Lab) -> None:
    gateway = "gw-ack-conflict"
    now = time.time_ns()
    # A field type conflict: InfluxDB refuses the line for good (HTTP 400), so sending it again cannot help.
    lab.influx.write(f'acktype,device=m,gateway={gateway} v="text" {now - 10**9}', lab.db)
    publish_all(lab.link, [(up(LAB_PREFIX, gateway), seal_plain(batch(gateway, 7, now, "acktype"))),
                           (up(LAB_PREFIX, gateway), b"\x01\xc1 not msgpack")])  # rejected: its seq is unknown
    # The type was set by another writer after this collector read the store's types: the message followed what
    # was known, so the refusal is not its gateway's fault. Not acknowledged; the collector learns the type.
    wait_until(lambda: "learnt the store's type" in lab.collector.log_path.read_text(), 10, "the type learnt")
    log = lab.collector.log_path.read_text()
    assert "HTTP 400" in log and "field type conflict" in log
    assert not lab.probe.of(gateway)
    # Sent again (as the agent does for what is not acknowledged), the conflicting field is left out at ingest
    # (the guard now knows the store's type): its message is acknowledged and quarantined.
    publish_all(lab.link, [(up(LAB_PREFIX, gateway), seal_plain(batch(gateway, 7, now, "acktype")))])
    acks = lab.probe.wait_acked(gateway, {7}, plain_body)
    assert [r for ranges in acks for r in ranges] == [(7, 7)]
    wait_until(lambda: "field_type_conflict x1: acktype.v: integer value, the store holds string"
               in lab.collector.log_path.read_text(), 10, "the conflict declined at ingest")


def test_heartbeat_becomes_gateway_and_device_health(lab: Lab) -> None:
    gateway = "gw-health"
    sent_ns = time.time_ns() - 2 * 10**9

    def heartbeat_of(**overrides: object) -> bytes:
        doc = dict(
            gateway=gateway, time_ns=sent_ns, version="0.2.0", since_ns=sent_ns - 60 * 10**9,
            mqtt="5", backlog_messages=3, backlog_readings=30, backlog_bytes=4096, backlog_oldest_ns=sent_ns - 10**9,
            oldest_unacked_seq=17, next_seq=20, last_publish_ns=sent_ns - 10**8, last_ack_ns=None, dropped_readings=0,
            resent_messages=2, outbox_resets=0,
            devices={"meter-1": {"polls": 120, "errors": 3, "last_error": "timeout\nafter 1s"},
                     "meter 2": {"polls": 5, "errors": 0, "last_error": ""},
                     "bad\x00name": {"polls": 1, "errors": 0, "last_error": ""}},
        )
        return encode_status("online", **{**doc, **overrides})

    # A gateway speaks only for itself, and only in the schema: both refused whole, with their reason codes.
    publish_all(lab.link, [(f"{LAB_PREFIX}/{gateway}/status", heartbeat_of(gateway="gw-spoofed")),
                           (f"{LAB_PREFIX}/{gateway}/status", heartbeat_of(devices={"meter-3": "not an object"}))])
    wait_until(lambda: "reason=status_mismatch" in (t := lab.collector.log_path.read_text()) and "reason=bad_status" in t,
               10, "the spoofed and the malformed status refused")
    heartbeat = heartbeat_of()
    before_will = time.time_ns()
    publish_all(lab.link, [(f"{LAB_PREFIX}/{gateway}/status", heartbeat)])
    where = f"WHERE gateway = {quote_string(gateway)}"
    expected = {
        "time": sent_ns, "gateway": gateway, "online": 1, "since_ns": sent_ns - 60 * 10**9, "backlog_messages": 3,
        "backlog_readings": 30, "backlog_bytes": 4096, "backlog_oldest_ns": sent_ns - 10**9, "oldest_unacked_seq": 17,
        "next_seq": 20, "last_publish_ns": sent_ns - 10**8, "dropped_readings": 0,
        "resent_messages": 2, "outbox_resets": 0, "backlog_age_s": 1.0,
    }

    def whole_points() -> list[dict]:
        # (columns of other gateways' fields come back as None.) Until every field of the point is there: influxd
        # writes a point's fields into its cache one key at a time, and a query at that moment was seen to return
        # part of them (CI, once).
        rows = [{k: v for k, v in row.items() if v is not None}
                for row in lab.influx.query(f"SELECT * FROM citynerve_gateway_health {where}", lab.db)]
        return rows if rows and all(set(row) >= set(expected) for row in rows) else []

    assert wait_until(whole_points, 10, "the gateway health point") == [expected]
    def whole_devices() -> list[dict]:
        rows = lab.influx.query(f"SELECT * FROM citynerve_device_health {where} GROUP BY device", lab.db)
        whole = [d for d in rows if None not in (d.get("polls"), d.get("errors"), d.get("last_error"))]
        return whole if len(whole) == 2 else []

    devices = wait_until(whole_devices, 10, "both device health points, whole")
    assert sorted((d["device"], d["time"], d["polls"], d["errors"], d["last_error"]) for d in devices) == [
        ("meter 2", sent_ns, 5, 0, ""), ("meter-1", sent_ns, 120, 3, "timeout after 1s")]

    # The last will has no time: stored when it arrived, offline.
    publish_all(lab.link, [(f"{LAB_PREFIX}/{gateway}/status", encode_status("offline", gateway=gateway))])
    offline = wait_until(lambda: lab.influx.query(
        f"SELECT online FROM citynerve_gateway_health {where} AND online = 0", lab.db), 10, "the offline point")
    assert len(offline) == 1 and before_will <= offline[0]["time"] <= time.time_ns()
    assert not lab.probe.of(gateway)  # a status is not acknowledged end to end
    log = lab.collector.log_path.read_text()
    assert f"gateway {gateway} is online" in log and f"gateway {gateway} is offline" in log
    assert "1 device entries left out" in log


def test_no_ack_while_influxdb_is_down_then_all(tmp_path: Path, mosquitto: MosquittoServer,
                                                influxd_factory: Callable[..., InfluxdServer]) -> None:
    server = influxd_factory()
    server.create_database("db")
    gateway = "gw-ack-outage"
    collector = stack.collector_process(collector_config(
        tmp_path / "collector.toml", mosquitto, "ackoutage/v1",
        {"api": "v1", "url": server.url, "database": "db", "retry_initial": "100ms", "retry_max": "300ms"},
        acks={"interval": "200ms"},
    )).start()
    probe = AckProbe(mosquitto, "ackoutage/v1", lambda gw: stored_seqs(server, "db", gw))
    link = publisher(mosquitto, "acks-outage-publisher")
    try:
        server.stop()
        now = time.time_ns()
        publish_all(link, [(up("ackoutage/v1", gateway), seal_plain(batch(gateway, seq, now))) for seq in range(1, 21)])
        time.sleep(2.0)  # ten ack intervals, many write retries
        assert not probe.of(gateway)
        server.restart()
        acks = probe.wait_acked(gateway, set(range(1, 21)), plain_body)
        assert_acked_after_storage(probe, gateway, plain_body)
        assert covered([r for ranges in acks for r in ranges]) == set(range(1, 21))
    finally:
        link.stop()
        probe.close()
        collector.stop()
    assert "Traceback" not in collector.log_path.read_text()


def test_pending_acks_go_out_on_shutdown_and_refused_writes_are_not_acked(
        tmp_path: Path, mosquitto: MosquittoServer, influxd: InfluxdServer) -> None:
    """Acks every minute, so the only acks are those of the shutdown. The database is missing at first: a 404 is
    this side's configuration, so those messages are not acknowledged and the gateway will send them again."""
    db, gateway = "acks_shutdown", "gw-ack-shutdown"
    collector = stack.collector_process(collector_config(
        tmp_path / "collector.toml", mosquitto, "ackshutdown/v1",
        {"api": "v1", "url": influxd.url, "database": db}, acks={"interval": "60s"},
    )).start()
    probe = AckProbe(mosquitto, "ackshutdown/v1", lambda gw: stored_seqs(influxd, db, gw))
    link = publisher(mosquitto, "acks-shutdown-publisher")
    try:
        now = time.time_ns()
        publish_all(link, [(up("ackshutdown/v1", gateway), seal_plain(batch(gateway, seq, now))) for seq in (1, 2, 3)])
        wait_until(lambda: "HTTP 404" in collector.log_path.read_text(), 10, "the write refused for the missing db")
        influxd.create_database(db)
        publish_all(link, [(up("ackshutdown/v1", gateway), seal_plain(batch(gateway, seq, now))) for seq in (4, 5, 6)])
        wait_until(lambda: stored_seqs(influxd, db, gateway) == {4, 5, 6}, 10, "seqs 4-6 stored")
        assert not probe.of(gateway)
        collector.stop()
        acks = probe.wait_acked(gateway, {4, 5, 6}, plain_body, timeout=5)
        assert [r for ranges in acks for r in ranges] == [(4, 6)]  # 1-3 never stored: not acknowledged
        log = collector.log_path.read_text()
        assert "the gateway sends it again until the configuration is fixed" in log
        [summary] = [line for line in log.splitlines() if "collector stopped:" in line]
        assert "acked_seqs=3 acks_sent=1" in summary
    finally:
        link.stop()
        probe.close()
        collector.stop()  # again is harmless
        influxd.drop_database(db)


def test_a_retained_last_will_is_written_when_it_happens_not_at_every_start(
        tmp_path: Path, mosquitto: MosquittoServer, influxd: InfluxdServer, influx_db: str) -> None:
    prefix, gateway = "willlab/v1", "gw-will"
    topic = f"{prefix}/{gateway}/status"
    config = collector_config(tmp_path / "collector.toml", mosquitto, prefix,
                              {"api": "v1", "url": influxd.url, "database": influx_db})
    link = publisher(mosquitto, "will-publisher")
    query = "SELECT online FROM citynerve_gateway_health"
    collector = stack.collector_process(config)
    try:
        link.publish(topic, encode_status("offline", gateway=gateway), qos=1, retain=True).wait_for_publish(10)
        collector.start()
        time.sleep(2)  # the retained will is replayed to the new subscription: not news, not written
        assert influxd.query(query, influx_db) == []
        link.publish(topic, encode_status("offline", gateway=gateway), qos=1, retain=True).wait_for_publish(10)
        wait_until(lambda: influxd.query(query, influx_db), 10, "the live will written")
        collector.stop()
        collector = stack.collector_process(config).start()
        time.sleep(2)
    finally:
        collector.stop()
        link.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear the retained message
        link.stop()
    assert [row["online"] for row in influxd.query(query, influx_db)] == [0]
