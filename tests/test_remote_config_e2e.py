"""Remote configuration, commit confirmed, with real parts: the SHIPPED mosquitto configuration, an enrolled
gateway running `edge-agent run` with two pymodbus meters on two TCP endpoints, `edge-collector run` storing in
InfluxDB and sending the end-to-end acknowledgements that confirm a configuration, and signed configuration
documents delivered by labkit.control_lab.ControlLab (sealed to the gateway's session with a real Opener, as the
collector's relay does; its reports opened the same way). docs/control.md "Remote configuration".

- a good configuration is applied and confirmed while the unchanged meter keeps its one-second schedule (no
  gap in the sample times InfluxDB holds); a redelivery is answered with the same report;
- one that fails `edge-agent check` is refused with its error line; one that changes a protected key too; an
  older version is a replay;
- one that breaks the uplink (a wrong broker port) is rolled back within its confirm timeout, the uplink comes
  back, and what was read meanwhile arrives from the outbox;
- the agent killed with -9 in the middle of a trial comes back on the confirmed configuration and reports the
  trial rolled back, reason "interrupted".
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from labkit import enrolled, stack
from labkit.control_lab import ControlLab, OperatorPki, now_ms
from labkit.influxd import InfluxdServer
from labkit.meter_sim import meter_in_thread
from labkit.pki import LabCA
from labkit.process import ServerProcess, free_port
from labkit.secure_broker import SecureBroker
from tests.test_e2e import wait_until
from wire.control import ConfigDoc, Report, config_sha256

pytestmark = pytest.mark.integration

GW = "gw-conf-1"


class ConfigPusher:
    """What the collector's relay does for configurations, for one gateway: sign a file as an engineer, seal it to
    the gateway's session, publish it; read the gateway's reports."""

    def __init__(self, tmp_path: Path, broker: SecureBroker, deployment: enrolled.Deployment, gateway: str) -> None:
        self.pki = OperatorPki(tmp_path / "operators")
        self.engineer = self.pki.operator("erin", role="engineer")
        self.crl = self.pki.crl()
        self.gateway = gateway
        self.lab = ControlLab(broker, deployment, gateway)
        self.version = 0

    def push(self, path: Path, *, confirm_timeout: float = 120.0, version: int | None = None) -> int:
        text = path.read_text()
        self.version = version if version is not None else self.version + 1
        doc = ConfigDoc(gateway=self.gateway, version=self.version, toml=text, sha256=config_sha256(text),
                        issued_ms=now_ms(), deadline_ms=now_ms() + 600_000, confirm_timeout_s=confirm_timeout)
        self.lab.send(self.engineer.sign(doc), self.crl)
        return self.version

    def report(self, version: int, state: str, timeout: float) -> Report:
        def found() -> Report | None:
            return next((r for r in self.lab.reports_for(str(version)) if r.state == state), None)

        return wait_until(found, timeout, f"a report '{state}' on configuration version {version}")

    def states(self, version: int) -> list[str]:
        return [r.state for r in self.lab.reports_for(str(version))]


class Lab:
    def __init__(self, tmp_path: Path, influxd: InfluxdServer, db: str, deployment: enrolled.Deployment,
                 broker: SecureBroker, steady_port: int, changing_port: int) -> None:
        self.tmp, self.influxd, self.db = tmp_path, influxd, db
        gw = deployment.gateways[GW]
        # The collector that stores and acknowledges; the pusher connects with the deployment's own collector
        # certificate (collector-1), so this one has another (collector-2).
        cert, key = enrolled.collector_certificate(deployment.root, deployment.collector_ca_dir, "collector-2")
        self.collector = stack.collector_process(stack.write_collector_config(
            tmp_path / "collector.toml", broker.collector_mqtt(cert, key, client_id="collector-2", reconnect_max="2s"),
            {"api": "v1", "url": influxd.url, "database": db},
            security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
        )).start()
        self.pusher = ConfigPusher(tmp_path, broker, deployment, GW)
        self.mqtt = broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_min="1s", reconnect_max="2s")
        self.security = {"identity_key": str(gw.identity_key), "collector_key": str(deployment.collector_pub),
                         "operator_ca": str(self.pusher.pki.ca_pub)}
        self.devices = [stack.modbus_tcp_device("steady", steady_port, interval="1s"),
                        stack.modbus_tcp_device("changing", changing_port, interval="1s", tags={"phase": "local"})]
        self.local = self.agent_toml("agent.toml")
        self.state = tmp_path / f"{GW}-state" / "config"
        self.agent = self.start_agent()

    def agent_toml(self, name: str, mqtt: dict[str, Any] | None = None, devices: list[dict[str, Any]] | None = None,
                   **sections: Any) -> Path:
        return stack.write_agent_config(self.tmp / name, GW, {**self.mqtt, **(mqtt or {})}, devices or self.devices,
                                        security=self.security, **sections)

    def start_agent(self) -> ServerProcess:
        return stack.agent_process(self.local).start()

    def times(self, device: str, after_ns: int = 0) -> list[int]:
        rows = self.influxd.query(f"SELECT voltage_l1 FROM electricity WHERE device = '{device}' AND "
                                  f"time > {after_ns}", self.db)
        return sorted(int(r["time"]) for r in rows)

    def close(self) -> None:
        self.pusher.lab.close()
        self.agent.stop()
        self.collector.stop()


def largest_gap_s(times: list[int]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=0) / 1e9


@pytest.fixture
def lab(tmp_path: Path, influxd: InfluxdServer, influx_db: str):
    deployment = enrolled.create(tmp_path / "deployment", [GW])
    with SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir, collector_ca_dir=deployment.collector_ca_dir,
                      server_ca=LabCA(tmp_path / "server-ca")) as broker, \
            meter_in_thread(unit=1, seed=1, update_interval=0.05) as steady, \
            meter_in_thread(unit=1, seed=2, update_interval=0.05) as changing:
        lab = Lab(tmp_path, influxd, influx_db, deployment, broker, steady.port, changing.port)
        try:
            wait_until(lambda: len(lab.times("steady")) >= 2, 30, "the first readings")
            yield lab
        finally:
            lab.close()
    assert "Traceback" not in lab.agent.log_path.read_text()


def test_applied_and_confirmed_without_a_gap_and_bad_ones_refused(lab: Lab) -> None:
    pusher = lab.pusher
    # once connected, the agent says what it runs: the local file, version 0
    running = pusher.report(0, "running", 15)
    assert running.config_version == 0 and running.config_sha256 == config_sha256(lab.local.read_text())

    # 1. a good configuration: the second meter's tags and the MQTT keepalive change (its bus and the link are
    #    rebuilt), the first meter's do not
    devices = [lab.devices[0], {**lab.devices[1], "tags": {"phase": "pushed"}}]
    good = lab.agent_toml("v1.toml", mqtt={"keepalive": "20s"}, devices=devices)
    pushed_at = time.time_ns()
    v1 = pusher.push(good, confirm_timeout=30)
    applied = pusher.report(v1, "applied", 15)
    assert applied.detail.startswith(f"buses: kept tcp://127.0.0.1:{lab.devices[0]['port']}; rebuilt tcp://")
    assert applied.detail.endswith("MQTT link restarted")
    confirmed = pusher.report(v1, "confirmed", 30)
    assert (confirmed.config_version, confirmed.config_sha256) == (v1, config_sha256(good.read_text()))
    assert pusher.states(v1) == ["received", "applied", "confirmed"]
    file = lab.state / "confirmed.toml"
    assert file.read_text() == (f"# citynerve remote configuration version {v1} sha256 {config_sha256(good.read_text())}"
                                f"\n# approved by erin (engineer); written by the agent, do not edit (edge-agent config "
                                f"reset goes back to the local file)\n{good.read_text()}")
    wait_until(lambda: lab.influxd.query(f"SELECT voltage_l1 FROM electricity WHERE phase = 'pushed' AND "
                                         f"time > {pushed_at}", lab.db), 15, "readings with the pushed tags")
    wait_until(lambda: len(lab.times("steady", pushed_at)) >= 4, 15, "the unchanged meter's readings go on")
    pusher.push(good, version=v1)  # a redelivery (the collector re-sends until it has a final report)
    wait_until(lambda: pusher.states(v1).count("confirmed") == 2, 10, "the same final report again")

    # 2. fails the check: refused with the line `edge-agent check` prints
    broken = lab.agent_toml("broken.toml", devices=devices)
    broken.write_text(broken.read_text().replace('id = "steady"', 'id = "steady"\nprot = 502'))
    v2 = pusher.push(broken)
    refused = pusher.report(v2, "refused", 15)
    assert refused.reason == "invalid_config"
    assert refused.detail == f'error: config version {v2}: devices[0].prot: unknown key (did you mean "port"?)'

    # 3. a key a push may not change
    moved = lab.agent_toml("moved.toml", devices=devices, outbox={"path": str(lab.tmp / "elsewhere.sqlite3")})
    v3 = pusher.push(moved)
    refused = pusher.report(v3, "refused", 15)
    assert refused.reason == "protected_key" and refused.detail.startswith("outbox.path: a pushed configuration")
    assert refused.config_version == v1  # what runs

    # 4. not above the newest version run or tried: a replay (here the confirmed version with other content)
    pusher.push(lab.agent_toml("old.toml"), version=v1)
    refused = pusher.report(v1, "refused", 10)
    assert refused.reason == "replayed" and refused.detail.startswith(f"version {v1} is not above {v1}")

    steady = lab.times("steady")
    assert largest_gap_s(steady) < 1.5, steady  # one sample per second throughout


def test_a_configuration_that_cuts_the_uplink_is_rolled_back_within_its_confirm_timeout(lab: Lab) -> None:
    pusher = lab.pusher
    pusher.report(0, "running", 15)
    dead_port = free_port()
    v1 = pusher.push(lab.agent_toml("v1.toml", mqtt={"port": dead_port}), confirm_timeout=10)
    wait_until(lambda: f"applying configuration version {v1}" in lab.agent.log_path.read_text(), 15, "the trial")
    applied_at = time.monotonic()
    rolled_back = pusher.report(v1, "rolled_back", 30)
    assert time.monotonic() - applied_at < 10 + 8  # the timeout, then back on the old link to say so
    assert rolled_back.reason == "no_ack" and rolled_back.config_version == 0
    assert rolled_back.detail.startswith(f"no end-to-end acknowledgement within 10 s after applying version {v1}: "
                                         f"MQTT broker 127.0.0.1:{dead_port}: connection failed: "), rolled_back.detail
    assert "Connection refused" in rolled_back.detail
    # held while the link was down, the reports of the trial come in order once the old link is back
    assert pusher.states(v1) == ["received", "applied", "rolled_back"]
    assert not (lab.state / "pending.toml").exists() and not (lab.state / "confirmed.toml").exists()
    assert json.loads((lab.state / "state.json").read_text()) == {"floor": v1, "trying": None}
    # the uplink is back, and what was read while it was cut arrives from the outbox: no gap
    back = time.time_ns()
    wait_until(lambda: len(lab.times("steady", back)) >= 2, 20, "readings after the rollback")
    steady = lab.times("steady")
    assert largest_gap_s(steady) < 1.5, steady


def test_killed_during_a_trial_the_agent_comes_back_on_the_confirmed_configuration(lab: Lab) -> None:
    pusher = lab.pusher
    devices = [lab.devices[0], {**lab.devices[1], "tags": {"phase": "v1"}}]
    v1 = pusher.push(lab.agent_toml("v1.toml", devices=devices))
    pusher.report(v1, "confirmed", 30)
    # v2 cuts the uplink and would be rolled back after 60 s: the agent is killed in the middle of it
    v2 = pusher.push(lab.agent_toml("v2.toml", mqtt={"port": free_port()}, devices=devices), confirm_timeout=60)
    wait_until(lambda: f"applying configuration version {v2}" in lab.agent.log_path.read_text(), 15, "the trial")
    assert json.loads((lab.state / "state.json").read_text())["trying"] == v2
    assert (lab.state / "pending.toml").exists()
    lab.agent.kill()
    lab.agent = lab.start_agent()
    rolled_back = pusher.report(v2, "rolled_back", 30)
    assert (rolled_back.reason, rolled_back.config_version) == ("interrupted", v1)
    running = wait_until(lambda: [r for r in pusher.lab.reports_for(str(v1)) if r.state == "running"], 15,
                         "the restarted agent's running report")
    assert running[-1].config_version == v1
    log = lab.agent.log_path.read_text()
    assert f"configuration version {v2} was being tried when the agent stopped" in log
    assert f"running remote configuration version {v1}" in log
    assert not (lab.state / "pending.toml").exists()
    restarted = time.time_ns()
    wait_until(lambda: lab.influxd.query(f"SELECT voltage_l1 FROM electricity WHERE phase = 'v1' AND "
                                         f"time > {restarted}", lab.db), 20, "the confirmed configuration running")


def test_pushed_with_edge_collector_config_push_through_the_real_relay(tmp_path: Path, influxd: InfluxdServer,
                                                                      influx_db: str) -> None:
    """The operator's way: `edge-collector operators` makes the CA and an engineer, `edge-collector config push`
    stores a version, the running collector's relay sends (and re-sends) it, the agent's reports come back, and
    `config status` shows running = desired - or the rollback and its cause."""
    from tests.test_control_relay import add_operator, cli, operators

    deployment = enrolled.create(tmp_path / "deployment", [GW])
    ca = tmp_path / "operator-ca"
    operators(ca, "init", "--dir", str(ca))
    erin = add_operator(ca, "erin")
    gw = deployment.gateways[GW]
    with SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir, collector_ca_dir=deployment.collector_ca_dir,
                      server_ca=LabCA(tmp_path / "server-ca")) as broker, \
            meter_in_thread(unit=1, seed=4, update_interval=0.05) as meter:
        config = stack.write_collector_config(
            tmp_path / "collector.toml",
            broker.collector_mqtt(deployment.collector_cert, deployment.collector_key, reconnect_max="2s"),
            {"api": "v1", "url": influxd.url, "database": influx_db},
            security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
            control={"store": str(tmp_path / "control.db"), "audit_log": str(tmp_path / "audit.log"),
                     "crl": str(ca / "operators.crl"), "operator_ca": str(ca / "operator-ca.pub"),
                     "resend_interval": "2s", "poll_interval": "250ms"},
        )
        mqtt = broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_min="1s", reconnect_max="2s")
        security = {"identity_key": str(gw.identity_key), "collector_key": str(deployment.collector_pub),
                    "operator_ca": str(ca / "operator-ca.pub")}

        def agent_toml(name: str, **mqtt_extra: Any) -> Path:
            return stack.write_agent_config(tmp_path / name, GW, {**mqtt, **mqtt_extra},
                                            [stack.modbus_tcp_device("meter", meter.port, interval="1s")],
                                            security=security)

        def status() -> dict[str, Any]:
            return json.loads(cli(config, "config", "status", GW, "--json").stdout)[0]

        collector = stack.collector_process(config).start()
        agent = stack.agent_process(agent_toml("agent.toml")).start()
        try:
            good = agent_toml("v1.toml", keepalive="20s")
            assert cli(config, "config", "push", GW, str(good), operator=erin).returncode == 0
            synced = wait_until(lambda: (s := status())["in_sync"] and s["desired"]["state"] == "confirmed" and s, 40,
                                "version 1 confirmed and running")
            assert synced["running"]["version"] == 1 and synced["running"]["sha256"] == config_sha256(good.read_text())

            cut = agent_toml("v2.toml", port=free_port())
            pushed = cli(config, "config", "push", GW, str(cut), "--confirm-timeout", "10s", operator=erin)
            assert pushed.returncode == 0, pushed.stderr
            back = wait_until(lambda: (s := status())["desired"]["state"] == "rolled_back" and s, 40,
                              "version 2 rolled back")
            assert back["desired"]["reason"] == "no_ack" and "Connection refused" in back["desired"]["detail"]
            assert back["running"]["version"] == 1
        finally:
            agent.stop()
            collector.stop()
    assert "Traceback" not in agent.log_path.read_text()
