"""The fleet inventory end to end, real parts only: the shipped mosquitto configuration, gateways enrolled with the
real CLIs, two pymodbus meters (one answers Read Device Identification, FC 43/14, one refuses it), a real
`edge-agent` with a configured location, a real `edge-collector` writing to a real influxd, and the operator's
`edge-collector gateways list | show` reading what the collector keeps.

The agent runs first, while no collector listens: its readings are not acknowledged, so its retained status
reports a backlog, which the collector reads when it subscribes. A hostile client holding another gateway's
certificate then tries to put devices into the honest gateway's inventory; and the agent is killed with -9,
so that the broker publishes its last will.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import enrolled, stack
from labkit.influxd import InfluxdServer, quote_string
from labkit.meter_sim import SIMULATOR_IDENTITY, meter_in_thread
from labkit.pki import LabCA
from labkit.secure_broker import SecureBroker, TestClient
from tests.test_e2e import wait_until
from wire.status import decode_status, encode_status

pytestmark = pytest.mark.integration

GW, EVIL = "gw-inv", "gw-evil"
NOT_AUTHORIZED = 0x87


def gateways(config: Path, *args: str) -> object:
    proc = subprocess.run([sys.executable, "-m", "collector.cli", "gateways", *args, "-c", str(config), "--json"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def row(config: Path, gateway: str) -> dict:
    return next((r for r in gateways(config, "list") if r["gateway"] == gateway), {})


def test_the_fleet_inventory_end_to_end(tmp_path: Path, influxd: InfluxdServer, influx_db: str) -> None:
    deployment = enrolled.create(tmp_path / "deployment", [GW, EVIL])
    probe_cert, probe_key = enrolled.collector_certificate(deployment.root, deployment.collector_ca_dir, "collector-2")
    gw = deployment.gateways[GW]
    broker = SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir,
                          collector_ca_dir=deployment.collector_ca_dir, server_ca=LabCA(tmp_path / "server-ca")).start()
    processes = []
    with meter_in_thread(seed=1) as meter, meter_in_thread(seed=2, identity=None) as plain:
        try:
            # 1. The agent alone: nothing acknowledges its readings; its retained status says so.
            probe = TestClient(broker.collector_port, broker.ca_file, probe_cert, probe_key, client_id="collector-2")
            assert probe.connect() == "connected"
            probe.subscribe(f"{broker.gateway_mount}citynerve/v1/{GW}/status")
            agent = stack.agent_process(stack.write_agent_config(
                tmp_path / "agent.toml", GW, broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_max="2s"),
                [stack.modbus_tcp_device("meter-id", meter.port, interval="0.5s"),
                 stack.modbus_tcp_device("meter-plain", plain.port, interval="0.5s")],
                publish_interval="0.5s", uplink={"heartbeat_interval": "1s", "ack_timeout": "60s"},
                security={"identity_key": str(gw.identity_key), "collector_key": str(deployment.collector_pub)},
                location={"lat": 52.3676, "lon": 4.9041, "alt": 2.5},
            )).start()
            processes.append(agent)

            def identified_with_backlog(messages) -> bool:
                docs = [decode_status(m.payload) for m in messages]
                return any(d.backlog_messages and d.inventory and d.inventory["meter-id"].modbus_id.state == "read"
                           and d.inventory["meter-plain"].modbus_id.state == "not_offered" for d in docs)

            probe.wait_for(identified_with_backlog, timeout=20)
            probe.close()

            # 2. The collector starts, reads the retained status, keeps the inventory.
            config = stack.write_collector_config(
                tmp_path / "collector.toml",
                broker.collector_mqtt(deployment.collector_cert, deployment.collector_key, reconnect_max="2s"),
                {"api": "v1", "url": influxd.url, "database": influx_db},
                security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
                inventory={"path": str(tmp_path / "inventory.db"), "flush_interval": "1s"},
            )
            collector = stack.collector_process(config).start()
            processes.append(collector)
            first = wait_until(lambda: row(config, GW).get("state") == "online" and row(config, GW), 15,
                               "gw-inv online in the inventory")
            assert first["backlog_messages"] > 0  # what the agent could not deliver while no collector listened
            assert (first["devices"], first["devices_ok"], first["devices_failing"]) == (2, 2, 0)
            assert (first["version"], first["config_version"], first["location_source"]) == ("0.2.0", 0, "config")
            assert first["location"] == {"lat": 52.3676, "lon": 4.9041, "alt": 2.5}
            assert row(config, EVIL)["state"] == "never seen"  # registered, nothing received

            detail = gateways(config, "show", GW)
            assert detail["registry"]["status"] == "active"
            meter_id = detail["devices"]["meter-id"]["info"]
            assert meter_id["kind"] == "modbus-tcp" and meter_id["unit"] == 1 and meter_id["model"] == "SDM630"
            assert meter_id["bus"] == f"tcp://127.0.0.1:{meter.port}" and meter_id["profile"] == "eastron_sdm630"
            assert meter_id["modbus_id"] == {"state": "read", "conformity": 0x83, "vendor_name": SIMULATOR_IDENTITY[0],
                                             "product_code": SIMULATOR_IDENTITY[1], "revision": SIMULATOR_IDENTITY[2],
                                             "product_name": SIMULATOR_IDENTITY[4], "model_name": SIMULATOR_IDENTITY[5]}
            assert detail["devices"]["meter-plain"]["info"]["modbus_id"] == {"state": "not_offered"}
            assert detail["devices"]["meter-id"]["health"]["polls"] > 0
            text = subprocess.run([sys.executable, "-m", "collector.cli", "gateways", "show", GW, "-c", str(config)],
                                  capture_output=True, text=True, timeout=30).stdout
            assert "Modbus identification (FC 43/14): read conformity 0x83: vendor_name 'citynerve lab'" in text

            # 3. The same in InfluxDB, to be charted.
            where = f"WHERE gateway = {quote_string(GW)}"
            info = wait_until(lambda: influxd.query(f"SELECT * FROM citynerve_gateway_info {where}", influx_db), 10,
                              "citynerve_gateway_info")
            assert {(r["version"], r["config_version"], r["latitude"], r["longitude"], r["devices"]) for r in info} == {
                ("0.2.0", 0, 52.3676, 4.9041, 2)}
            devices = {r["device"]: r for r in influxd.query(
                f"SELECT * FROM citynerve_device_info {where} GROUP BY device", influx_db)}
            assert devices["meter-id"]["modbus_vendor_name"] == "citynerve lab"
            assert devices["meter-id"]["modbus_conformity"] == 0x83 and devices["meter-id"]["unit"] == 1
            assert devices["meter-plain"]["modbus_id"] == "not_offered"

            # 4. A stolen gateway's certificate: its own status lands in its own record, never in gw-inv's.
            evil = TestClient(broker.port, broker.ca_file, deployment.gateways[EVIL].tls_cert,
                              deployment.gateways[EVIL].tls_key, client_id=EVIL)
            assert evil.connect() == "connected"
            fake = {"meter-id": {"kind": "modbus-tcp", "serial": "FAKE"}, "planted": {"kind": "serial"}}
            assert evil.publish(f"citynerve/v1/{GW}/status", encode_status(
                "online", gateway=GW, inventory=fake), retain=True) == NOT_AUTHORIZED  # the broker's ACL
            assert evil.publish(f"citynerve/v1/{EVIL}/status", encode_status(
                "online", gateway=GW, inventory=fake)) == 0  # accepted by the broker, refused by the collector
            assert evil.publish(f"citynerve/v1/{EVIL}/status", encode_status(
                "online", gateway=EVIL, version="6.6.6", inventory=fake)) == 0
            evil.close()
            wait_until(lambda: row(config, EVIL).get("version") == "6.6.6", 10, "gw-evil's own status recorded")
            wait_until(lambda: "reason=status_mismatch" in collector.log_path.read_text(), 10,
                       "the status speaking for gw-inv refused")
            detail = gateways(config, "show", GW)
            assert sorted(detail["devices"]) == ["meter-id", "meter-plain"]
            assert "serial" not in detail["devices"]["meter-id"]["info"] and detail["version"] == "0.2.0"
            assert sorted(gateways(config, "show", EVIL)["devices"]) == ["meter-id", "planted"]
            assert not influxd.query(f"SELECT * FROM citynerve_device_info {where} AND serial = 'FAKE'", influx_db)
            assert not influxd.query(f"SELECT * FROM citynerve_device_info WHERE device = 'planted' AND gateway = "
                                     f"{quote_string(GW)}", influx_db)

            # 5. The agent dies: the broker publishes its last will, the inventory says offline.
            agent.kill()
            gone = wait_until(lambda: row(config, GW).get("state") == "offline" and row(config, GW), 15,
                              "gw-inv offline after kill -9")
            assert gone["devices"] == 2 and gone["version"] == "0.2.0"  # what it said before still describes it
            table = subprocess.run([sys.executable, "-m", "collector.cli", "gateways", "list", "-c", str(config)],
                                   capture_output=True, text=True, timeout=30).stdout.splitlines()
            assert table[0].split()[:2] == ["GATEWAY", "STATE"]
            assert next(line for line in table if line.startswith(GW)).split()[1] == "offline"
        finally:
            for proc in reversed(processes):
                proc.stop()
            broker.close()
