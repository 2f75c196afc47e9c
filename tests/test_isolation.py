"""A stolen gateway harms only itself: real parts, one hostile gateway, one honest one, exact accounting.

The shipped mosquitto configuration (mutual TLS, per-gateway ACL), two real `edge-collector` processes on a
shared subscription, influxd with a small max-values-per-tag, and two enrolled gateways: gw-good is a real
`edge-agent` polling a counter field whose every reading is known; gw-evil is a hostile client holding gw-evil's
own certificate and identity key (a stolen gateway), which seals what it sends, so every message is authentic.
It poisons a field's type, tries to exhaust the device tag's values, sends fields named like the tags, spoofs
another gateway's health, joins the collectors' shared group, writes into far shards and floods, while gw-good
runs. Then every reading gw-good's field produced must be in InfluxDB exactly once, at its sample time, none
of its messages declined or sent again, and gw-good's series visible to a query by its gateway tag.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from labkit import enrolled, stack
from labkit.counter_field import PROFILE, CounterField
from labkit.influxd import InfluxdServer
from labkit.pki import LabCA
from labkit.secure_broker import SecureBroker
from tests.test_e2e import wait_until
from wire.keys import collector_key_from_pem, identity_from_pem
from wire.mqttlink import set_tcp_nodelay
from wire.schema import Batch, Reading, encode_batch
from wire.seal import GatewaySealer
from wire.status import encode_status

pytestmark = pytest.mark.integration

DB = "isolation"
MAX_VALUES_PER_TAG = 300  # influxd's limit here
DEVICE_BUDGET = 100  # per gateway and collector: two collectors x 100 + gw-good's own devices < 300
UNITS = 3


class Hostile:
    """gw-evil: its own certificate and identity key, a paho client of its own, sealing like an agent."""

    def __init__(self, broker: SecureBroker, deployment: enrolled.Deployment, gateway: str) -> None:
        gw = deployment.gateways[gateway]
        self.gateway = gateway
        self.up = f"citynerve/v1/{gateway}/up"
        self.sealer = GatewaySealer(gateway, identity_from_pem(gw.identity_key.read_bytes()),
                                    collector_key_from_pem(deployment.collector_pub.read_bytes()))
        self.seq = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=gateway, protocol=paho.MQTTv5)
        context = ssl.create_default_context(cafile=broker.ca_file)
        context.load_cert_chain(str(gw.tls_cert), str(gw.tls_key))
        self.client.tls_set_context(context)
        self.client.on_socket_open = lambda _c, _u, sock: set_tcp_nodelay(sock)
        self.client.max_inflight_messages_set(1000)
        self.received: list[paho.MQTTMessage] = []
        self.client.on_message = lambda _c, _u, msg: self.received.append(msg)
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert connected.wait(10), "the hostile gateway could not connect"

    def send(self, readings: list[Reading], sent_ns: int | None = None, wait: bool = False) -> None:
        self.seq += 1
        body = encode_batch(Batch(self.gateway, self.seq, sent_ns or time.time_ns(), readings))
        info = self.client.publish(self.up, self.sealer.seal(self.up, body), qos=1)
        if wait:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stored(influx: InfluxdServer) -> dict[str, list[tuple[int, int]]]:
    rows = influx.query("SELECT \"n\" FROM \"counter\" WHERE \"gateway\" = 'gw-good' GROUP BY \"device\"", db=DB)
    out: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        out.setdefault(row["device"], []).append((int(row["n"]), int(row["time"])))
    return {k: sorted(v) for k, v in out.items()}


def test_a_stolen_gateway_cannot_touch_another_gateways_readings(tmp_path: Path) -> None:
    influx = InfluxdServer(tmp_path / "influxd", settings={"data": {"max-values-per-tag": MAX_VALUES_PER_TAG}})
    influx.start()
    influx.create_database(DB)
    deployment = enrolled.create(tmp_path / "deployment", ["gw-good", "gw-evil"])
    good = deployment.gateways["gw-good"]
    cert2, key2 = enrolled.collector_certificate(deployment.root, deployment.collector_ca_dir, "collector-2")
    broker = SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir,
                          collector_ca_dir=deployment.collector_ca_dir, server_ca=LabCA(tmp_path / "server-ca")).start()
    field = CounterField(UNITS).start()
    types = tmp_path / "field-types.toml"
    types.write_text('[counter]\nn = "integer"\n')  # declared: no gateway can claim another type for it
    processes = []
    evil: Hostile | None = None

    def collector(name: str, cert: Path, key: Path):
        config = stack.write_collector_config(
            tmp_path / f"{name}.toml",
            broker.collector_mqtt(cert, key, shared_group="citynerve", client_id=name, reconnect_max="2s"),
            {"api": "v1", "url": influx.url, "database": DB},
            security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
            # Each collector enforces its own budgets: with two on the shared subscription a gateway gets up to
            # twice the device budget, which must stay under max-values-per-tag (docs/operations.md#limits).
            schema={"field_types": str(types)}, limits={"new_devices": DEVICE_BUDGET},
            log={"stats_interval": "1s"},
        )
        proc = stack.collector_process(config).start()
        processes.append(proc)
        return proc

    try:
        c1 = collector("collector-1", deployment.collector_cert, deployment.collector_key)
        c2 = collector("collector-2", cert2, key2)
        evil = Hostile(broker, deployment, "gw-evil")
        now = time.time_ns()

        # 1. Join the collectors' shared group, every spelling: messages picked for it would vanish for everyone.
        evil.client.subscribe([(t, 1) for t in ("$share/citynerve/citynerve/v1/+/up", "$share/citynerve/#",
                                                "$share/citynerve/citynerve/v1/+/status")])
        # 2. Claim the type of a field before its owner ever writes it (declared: refused), and a reading
        #    in a shard three years back and one a century ahead (set aside at the receive time instead).
        evil.send([Reading("counter-1", "counter", now, {"n": "poisoned"}),
                   Reading("x", "counter", now - 3 * 365 * 86400 * 10**9, {"old": 1.0}),
                   Reading("x", "counter", now + 100 * 365 * 86400 * 10**9, {"future": 1.0})],
                  sent_ns=now + 50 * 365 * 86400 * 10**9, wait=True)
        # 3. Fields named like the tags, which would hide real series from WHERE gateway = '...'.
        evil.send([Reading("counter-1", "counter", now, {"gateway": "gw-good", "device": "counter-1", "n": 1})],
                  wait=True)
        # 4. Exhaust the device tag's values (influxd refuses new ones past max-values-per-tag for everyone).
        for chunk in range(0, 1000, 100):
            evil.send([Reading(f"fake-{i}", "counter", now, {"junk": 1.0}) for i in range(chunk, chunk + 100)],
                      wait=True)
        # 5. Speak for another gateway in its own status (its ACL allows only its own topic).
        evil.client.publish("citynerve/v1/gw-evil/status", encode_status(
            "online", gateway="gw-good", time_ns=now, backlog_messages=10**9), qos=1, retain=True).wait_for_publish(10)
        evil.client.publish("citynerve/v1/gw-good/status", encode_status(
            "offline", gateway="gw-good", time_ns=now), qos=1, retain=True).wait_for_publish(10)

        agent_config = stack.write_agent_config(
            tmp_path / "agent.toml", "gw-good", broker.gateway_mqtt(good.tls_cert, good.tls_key, reconnect_max="2s"),
            [stack.modbus_tcp_device(f"counter-{u}", field.port, unit=u, interval="0.5s", profile=str(PROFILE))
             for u in field.units],
            publish_interval="0.5s", uplink={"heartbeat_interval": "2s"},
            security={"identity_key": str(good.identity_key), "collector_key": str(deployment.collector_pub)},
        )
        agent = stack.agent_process(agent_config).start()
        processes.append(agent)
        wait_until(lambda: stored(influx), 20, "gw-good's first readings")

        # 6. Flood: garbage and large valid batches as fast as the connection takes them, for 8 s.
        end = time.monotonic() + 8
        big = [Reading(f"flood-{i % 50}", "flood", 0, {"v": float(i)}) for i in range(2000)]
        sent = 0
        while time.monotonic() < end:
            evil.client.publish(evil.up, os.urandom(512), qos=1)
            stamp = time.time_ns()
            evil.send([Reading(r.device, r.measurement, stamp + i, r.fields) for i, r in enumerate(big)])
            sent += 2
        assert sent > 100

        time.sleep(1.5)
        agent.stop()  # a clean stop commits the last cycle: from here on every produced reading must be stored
        first_run_log = agent.log_path.read_text()
        produced = {f"counter-{u}": [n for n, _ in field.served[u]] for u in field.units}
        field.stop()  # no more readings: the agent, started again, only delivers what its outbox holds
        agent = stack.agent_process(agent_config).start()
        processes.append(agent)
        def delivered() -> bool:
            got = {d: [n for n, _ in v] for d, v in stored(influx).items()}
            # A poll in flight when the agent stopped was served by the field but never received: at most the
            # last number of each unit may be missing, nothing else.
            return all(got.get(d) in (ns, ns[:-1]) for d, ns in produced.items())

        try:
            wait_until(delivered, 60, "every reading gw-good received stored")
        except AssertionError:
            got = {d: [n for n, _ in v] for d, v in stored(influx).items()}
            missing = {d: sorted(set(ns) - set(got.get(d, []))) for d, ns in produced.items()}
            raise AssertionError(f"missing from InfluxDB: {missing}") from None
        result = stored(influx)
        # exactly once, at its sample time (within the poll's round trip of when the field served it)
        for u in field.units:
            rows = result[f"counter-{u}"]
            assert len(rows) == len({n for n, _ in rows}) >= len(field.served[u]) - 1
            for (n, t), (served_n, served_t) in zip(rows, field.served[u], strict=False):
                assert n == served_n and 0 <= t - served_t < 2 * 10**9

        # Nothing of gw-good's was declined or delayed into a re-send: its messages were never lost in the
        # shared group, never behind the flood's queue.
        resent = re.search(r"\((\d+) sent again\)", first_run_log)
        assert resent and resent.group(1) == "0", first_run_log[-2000:]
        logs = c1.log_path.read_text() + c2.log_path.read_text()
        assert "declined messages from gateway gw-good" not in logs
        assert not re.search(r"rejected message from gateway gw-good", logs)

        # The field kept its declared type; nothing of gw-evil's hides gw-good's series.
        kinds = {row["fieldKey"]: row["fieldType"] for row in influx.query("SHOW FIELD KEYS FROM counter", DB)}
        assert kinds["n"] == "integer" and "gateway" not in kinds and "device" not in kinds
        # The device tag kept room: gw-evil got at most its budget of device ids, gw-good all of its own.
        devices = influx.query("SHOW TAG VALUES FROM counter WITH KEY = \"device\"", DB)
        evil_devices = influx.query("SHOW TAG VALUES FROM counter WITH KEY = \"device\" WHERE gateway = 'gw-evil'", DB)
        assert len(evil_devices) <= 2 * DEVICE_BUDGET < MAX_VALUES_PER_TAG - UNITS
        assert {f"counter-{u}" for u in field.units} <= {row["value"] for row in devices}
        # Nothing was written into a shard years away: the far readings went to the suspect measurement.
        for row in influx.query("SELECT * FROM counter WHERE time < now() - 30d OR time > now() + 1d", DB):
            raise AssertionError(f"a point in a far shard: {row}")
        suspect = influx.query("SELECT count(*) FROM citynerve_suspect_time WHERE gateway = 'gw-evil'", DB)
        assert suspect and suspect[0]["count_old"] == 1 and suspect[0]["count_future"] == 1
        # gw-good's health is its own: gw-evil's document speaking for it was refused, its publication on
        # gw-good's topic never reached a collector.
        health = influx.query("SELECT * FROM citynerve_gateway_health WHERE gateway = 'gw-good'", DB)
        assert health and all(row.get("backlog_messages") != 10**9 for row in health)
        assert "reason=status_mismatch" in logs
        # gw-evil got nothing through its shared-group subscriptions: neither gw-good's uplink nor status.
        assert not [m for m in evil.received if not m.topic.startswith("citynerve/v1/gw-evil/")]
        # And each of its tricks left a reason code.
        for reason in ("field_type_conflict", "device_limit", "reserved_name", "status_mismatch"):
            assert f"{reason}" in logs, reason
        print(json.dumps({"flood_messages": sent, "evil_devices": len(evil_devices)}))
    finally:
        if evil is not None:
            evil.close()
        for proc in reversed(processes):
            proc.stop()
        field.stop()
        broker.close()
        influx.close()
