"""End-to-end security with real parts: the SHIPPED mosquitto configuration (mutual TLS, per-gateway ACL),
gateways enrolled with the real CLIs, sealed payloads, an eavesdropper with read access to every uplink,
and revocation taking effect without a restart."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.profiles import load_profile
from labkit import enrolled, stack
from labkit.influxd import InfluxdServer
from labkit.meter_sim import MeterSimulator, decode_served
from labkit.mqtt_probe import MqttProbe
from labkit.pki import CertFiles, LabCA
from labkit.secure_broker import SecureBroker
from tests.test_e2e import served_for, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def deployment(tmp_path: Path) -> enrolled.Deployment:
    return enrolled.create(tmp_path / "deployment", ["gw-sec-1"])


@pytest.fixture
def broker(tmp_path: Path, deployment: enrolled.Deployment):
    with SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir, collector_ca_dir=deployment.collector_ca_dir,
                      server_ca=LabCA(tmp_path / "server-ca")) as b:
        yield b


def test_sealed_readings_through_the_shipped_broker_config(tmp_path: Path, deployment, broker, influxd: InfluxdServer,
                                                           influx_db: str, meter_sim: MeterSimulator) -> None:
    gw = deployment.gateways["gw-sec-1"]
    spy_cert, spy_key = enrolled.collector_certificate(deployment.root, deployment.collector_ca_dir, "collector-2")
    spy = MqttProbe(broker.collector_port, broker.ca_file, [broker.gateway_mount + "citynerve/v1/+/up"],
                    client=CertFiles(spy_cert, spy_key), client_id="collector-2")
    collector = stack.collector_process(stack.write_collector_config(
        tmp_path / "collector.toml",
        broker.collector_mqtt(deployment.collector_cert, deployment.collector_key, reconnect_max="2s"),
        {"api": "v1", "url": influxd.url, "database": influx_db},
        security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
        log={"stats_interval": "1s"},
    )).start()
    agent = stack.agent_process(stack.write_agent_config(
        tmp_path / "agent.toml", gw.id, broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_max="2s"),
        [stack.modbus_tcp_device("meter-sec", meter_sim.port, interval="1s")],
        security={"identity_key": str(gw.identity_key), "collector_key": str(deployment.collector_pub)},
    )).start()
    try:
        rows = wait_until(lambda: (r := influxd.query('SELECT * FROM "electricity" GROUP BY *', influx_db))
                          and len(r) >= 3 and r, 20, "3 sealed readings stored")
        profile = load_profile("eastron_sdm630")
        for row in rows:
            served = decode_served(served_for(row["time"], list(meter_sim.served)), profile)["electricity"]
            assert {k: row[k] for k in served} == served
            assert row["gateway"] == "gw-sec-1" and row["device"] == "meter-sec"

        # The eavesdropper (a collector certificate: read access to every uplink) sees only sealed bytes.
        seen = spy.wait_for(lambda m: len(m) >= 3)
        secrets = [b"meter-sec", b"electricity", b"voltage_l1", b"SDM630", b"model"]
        secrets += [struct.pack(">d", row["voltage_l1"]) for row in rows]
        secrets += [struct.pack(">f", row["voltage_l1"]) for row in rows]
        for message in seen:
            assert message.payload[0] == 0x02
            for secret in secrets:
                assert secret not in message.payload, secret

        # Revocation: the registry changes, the running collector rejects the gateway's next messages.
        deployment.revoke("gw-sec-1")
        revoked_at = time.time_ns()
        log = wait_until(lambda: (t := collector.log_path.read_text()) and "reason=revoked" in t and t, 10,
                         "the revoked gateway's messages rejected")
        assert "rejected message from gateway gw-sec-1" in log
        time.sleep(2.5)
        late = influxd.query(f'SELECT count(voltage_l1) FROM "electricity" WHERE time > {revoked_at + 1_500_000_000}',
                             influx_db)
        assert not late, late  # nothing stored from a revoked gateway once the registry was re-read
        listing = subprocess.run([sys.executable, "-m", "collector.cli", "quarantine", "list",
                                  str(tmp_path / "collector.toml"), "--reason", "revoked"],
                                 capture_output=True, text=True, timeout=30)
        assert "gw-sec-1" in listing.stdout
    finally:
        agent.stop()
        collector.stop()
        spy.close()
    assert "uplink is NOT sealed" not in agent.log_path.read_text()
