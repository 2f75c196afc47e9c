"""The collector's control relay with real parts: the SHIPPED mosquitto configuration, a real `edge-collector run`
with [control], real influxd, the real `edge-collector operators|config|command|audit` CLIs, and gateways enrolled
with the real CLIs.

- the real `edge-agent run` with a pymodbus simulator: a command stored while the gateway is offline runs once
  when it comes online, --wait prints the read-back, a critical point waits for a second operator;
- labkit.control_gateway.ControlGateway where the real agent cannot be used: a downlink lost on purpose (re-sent),
  configurations (until the agent applies them), and a hostile gateway's reports."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector.audit import AuditLog
from collector.control_store import ControlStore
from labkit import enrolled, stack
from labkit.control_gateway import ControlGateway
from labkit.influxd import InfluxdServer
from labkit.pki import LabCA
from labkit.secure_broker import SecureBroker
from tests.test_e2e import wait_until
from wire import control

pytestmark = pytest.mark.integration

GW, EVIL = "gw-ctl-1", "gw-ctl-evil"


@pytest.fixture
def lab(tmp_path: Path, influxd: InfluxdServer, influx_db: str):
    deployment = enrolled.create(tmp_path / "deployment", [GW, EVIL])
    ca = tmp_path / "operator-ca"  # made by the operators' CLI, as docs/control.md tells the CA's holder
    operators(ca, "init", "--dir", str(ca))
    with SecureBroker(tmp_path / "broker", device_ca_dir=deployment.ca_dir,
                      collector_ca_dir=deployment.collector_ca_dir, server_ca=LabCA(tmp_path / "server-ca")) as broker:
        config = stack.write_collector_config(
            tmp_path / "collector.toml",
            broker.collector_mqtt(deployment.collector_cert, deployment.collector_key, reconnect_max="2s"),
            {"api": "v1", "url": influxd.url, "database": influx_db},
            security={"keys_dir": str(deployment.keys_dir), "registry": str(deployment.registry)},
            control={"store": str(tmp_path / "control.db"), "audit_log": str(tmp_path / "audit.log"),
                     "crl": str(ca / "operators.crl"), "operator_ca": str(ca / "operator-ca.pub"),
                     "resend_interval": "2s",
                     "poll_interval": "250ms"},
        )
        collector = stack.collector_process(config).start()
        try:
            yield deployment, ca, broker, config, collector
        finally:
            collector.stop()


def operators(_ca: Path, *argv: str) -> None:
    result = subprocess.run([sys.executable, "-m", "collector.cli", "operators", *argv], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def add_operator(ca: Path, name: str) -> Path:
    """An engineer for every gateway: <ca>/<name>.key and .cert (operators add makes the pair here)."""
    operators(ca, "add", name, "--dir", str(ca), "--role", "engineer", "--gateways", "*", "--out", str(ca))
    return ca / f"{name}.key"


def cli(config: Path, *argv: str, operator: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--operator", str(operator)] if operator else []
    return subprocess.run([sys.executable, "-m", "collector.cli", *argv, "-c", str(config), *extra],
                          capture_output=True, text=True, timeout=60)


def executor(reports: dict[str, list[str]]):
    """A gateway's answers: a write is done with the value read back; a configuration received, applied,
    confirmed. Counts every execution per command id (a redelivery must not run again)."""
    runs: dict[str, int] = {}

    def answer(doc, _operators):  # type: ignore[no-untyped-def]
        now = int(time.time() * 1000)
        if isinstance(doc, control.Command):
            runs[doc.id] = runs.get(doc.id, 0) + 1
            if runs[doc.id] > 1:
                return [control.Report("command", doc.id, "done", now, value=doc.value)]  # its stored report again
            reports.setdefault(doc.id, []).append("done")
            return [control.Report("command", doc.id, "done", now, value=doc.value)]
        version = str(doc.version)
        return [control.Report("config", version, state, now, config_version=doc.version if state == "confirmed" else 0,
                               config_sha256=doc.sha256 if state == "confirmed" else "")
                for state in ("received", "applied", "confirmed")]

    answer.runs = runs  # type: ignore[attr-defined]
    return answer


def test_command_and_config_through_the_relay(tmp_path: Path, lab, influxd: InfluxdServer, influx_db: str) -> None:
    deployment, ca, broker, config, collector = lab
    alice = add_operator(ca, "alice")
    # Stored while the gateway is offline: the collector holds it until the gateway's session exists.
    waiting = subprocess.Popen([sys.executable, "-m", "collector.cli", "command", GW, "meter-1", "setpoint=21.5",
                                "--wait", "30s", "-c", str(config), "--operator", str(alice)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = ControlStore(tmp_path / "control.db")
    wait_until(lambda: store.commands(gateway=GW), 15, "the command stored")
    (cmd,) = store.commands(gateway=GW)
    wait_until(lambda: "waits for the gateway's next uplink" in collector.log_path.read_text(), 10,
               "the collector holding the command: no session of the gateway yet")
    assert store.command(cmd.id).state == "pending" and store.command(cmd.id).sends == 0

    gateway = ControlGateway(broker, deployment, GW, ca / "operator-ca.pub")
    reports: dict[str, list[str]] = {}
    answer = executor(reports)
    try:
        gateway.uplink()  # its session: now the relay can seal to it
        # The first delivery is "lost" (not answered): the relay sends it again after resend_interval.
        wait_until(lambda: gateway.client.messages, 10, "the command delivered")
        gateway._handled = len(gateway.client.messages)
        first = time.monotonic()
        wait_until(lambda: gateway.pump(answer) and reports.get(cmd.id), 10, "the command sent again and run")
        assert time.monotonic() - first >= 1.0
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 0, (out, err)
        assert out.splitlines()[-1] == "done: setpoint = 21.5"
        row = store.command(cmd.id)
        assert (row.state, row.readback, row.sends >= 2) == ("done", 21.5, True)
        assert reports[cmd.id] == ["done"]  # ran once
        # the same id, the same signatures each time
        assert len({bytes(d.doc) for d in gateway.seen}) == 1 and control.read_doc(gateway.seen[0]).id == cmd.id

        # A configuration: pushed, received, applied, confirmed; status shows it running.
        agent_toml = tmp_path / "agent.toml"
        agent_toml.write_text(f'[gateway]\nid = "{GW}"\nstate_dir = "/var/lib/citynerve"\n')
        result = cli(config, "config", "push", GW, str(agent_toml), operator=alice)
        assert result.returncode == 0, result.stderr

        def in_sync():  # type: ignore[no-untyped-def]
            gateway.pump(answer)
            status = json.loads(cli(config, "config", "status", GW, "--json").stdout)
            return status[0]["in_sync"] and status[0]

        status = wait_until(in_sync, 15, "the configuration confirmed and running")
        assert status["desired"]["state"] == "confirmed" and status["running"]["version"] == 1
        assert status["running"]["sha256"] == control.config_sha256(agent_toml.read_text())

        # Audit: InfluxDB points and the hash-chained log.
        def points(measurement: str):  # type: ignore[no-untyped-def]
            return influxd.query(f'SELECT * FROM "{measurement}"', influx_db)

        commands = wait_until(lambda: (r := points("citynerve_command")) and any(p["state"] == "done" for p in r) and r,
                              10, "the command's points in InfluxDB")
        done = next(p for p in commands if p["state"] == "done")
        assert (done["gateway"], done["device"], done["point"], done["operator"], done["id"], done["readback"]) == \
            (GW, "meter-1", "setpoint", "alice", cmd.id, 21.5)
        assert [p["state"] for p in commands] == ["pending", "sent", "done"]
        configs = wait_until(lambda: (r := points("citynerve_config")) and len(r) >= 5 and r, 10, "config points")
        assert [p["state"] for p in configs] == ["pending", "sent", "received", "applied", "confirmed"]
        assert all(p["version"] == 1 and p["operator"] == "alice" for p in configs)
        tags = influxd.query('SHOW TAG KEYS FROM "citynerve_command"', influx_db)
        assert "id" not in {t["tagKey"] for t in tags}  # the id is a field: series stay bounded

        log = AuditLog(tmp_path / "audit.log")
        entries = wait_until(lambda: (e := log.entries()) and len(e) >= 8 and e, 10, "the audit entries")
        assert [(e["kind"], e["state"]) for e in entries] == [
            ("command", "pending"), ("command", "sent"), ("command", "done"), ("config", "pending"),
            ("config", "sent"), ("config", "received"), ("config", "applied"), ("config", "confirmed")]
        assert entries[2]["readback"] == 21.5 and entries[2]["operators"] == ["alice"]
        assert log.verify() == []
    finally:
        gateway.close()
        store.close()
        if waiting.poll() is None:
            waiting.kill()


def test_a_hostile_gateway_cannot_change_another_gateways_rows(tmp_path: Path, lab) -> None:
    deployment, ca, broker, config, _collector = lab
    alice = add_operator(ca, "alice")
    good = ControlGateway(broker, deployment, GW, ca / "operator-ca.pub")
    evil = ControlGateway(broker, deployment, EVIL, ca / "operator-ca.pub")
    store = ControlStore(tmp_path / "control.db")
    try:
        good.uplink()
        evil.uplink()
        result = cli(config, "command", GW, "meter-1", "setpoint=5", operator=alice)
        assert result.returncode == 0, result.stderr
        cmd_id = result.stdout.split()[1].rstrip(":")
        wait_until(lambda: store.command(cmd_id).state == "sent", 10, "the command sent to the good gateway")
        good.pump(lambda _d, _o: [])  # the good gateway is slow to answer
        assert good.seen and not evil.client.messages  # only the addressed gateway got it

        now = int(time.time() * 1000)
        # 1. evil's own sealed report naming the good gateway's command id
        assert evil.report(control.Report("command", cmd_id, "failed", now, "modbus_exception_4")) == 0
        assert evil.report(control.Report("config", "1", "confirmed", now, config_version=1,
                                          config_sha256="0" * 64)) == 0
        # 2. evil publishing on the good gateway's report topic: the shipped ACL refuses it
        assert evil.client.publish(good.report_topic, evil.sealer.seal(good.report_topic, control.encode(
            control.Report("command", cmd_id, "done", now, value=0)))) == 0x87
        # 3. unsealed and forged reports on its own topic: quarantined like uplinks
        plain = control.encode(control.Report("command", cmd_id, "done", now, value=0))
        assert evil.client.publish(evil.report_topic, plain) == 0
        assert evil.client.publish(evil.report_topic, b"\x02" + bytes(200)) == 0

        def quarantined() -> list[str]:
            out = subprocess.run([sys.executable, "-m", "collector.cli", "quarantine", "list", str(config)],
                                 capture_output=True, text=True, timeout=30).stdout
            return [line for line in out.splitlines() if EVIL in line]

        rows = wait_until(lambda: len(q := quarantined()) >= 2 and q, 10, "both bad reports quarantined")
        assert any("unsealed" in r for r in rows), rows
        assert not any(GW + " " in r for r in rows)
        # evil's authentic reports were applied to evil's rows only (there are none): the good row is untouched
        wait_until(lambda: any(s.gateway == EVIL for s in store.config_status()), 10, "evil's reports processed")
        row = store.command(cmd_id)
        assert (row.state, row.reason) == ("sent", "")
        statuses = {s.gateway: s for s in store.config_status()}
        assert statuses.get(GW) is None or statuses[GW].running is None
        # and the good gateway's own answer still lands
        assert good.report(control.Report("command", cmd_id, "done", int(time.time() * 1000), value=5)) == 0
        wait_until(lambda: store.command(cmd_id).state == "done", 10, "the good gateway's report applied")
        assert store.command(cmd_id).readback == 5
    finally:
        good.close()
        evil.close()
        store.close()


LAB_PROFILE = Path(__file__).resolve().parent.parent / "labkit" / "profiles" / "lab_meter.toml"


def test_the_real_agent_runs_a_command_stored_while_it_was_offline_once(tmp_path: Path, lab, influxd: InfluxdServer,
                                                                          influx_db: str) -> None:
    """The whole path with real processes: the CLI signs and stores while the gateway is offline; `edge-agent run`
    starts, its first uplink gives the collector a session, the relay sends, the agent writes the simulator's
    register once and reads it back, its sealed report reaches the store, --wait prints the read-back, and the
    points and audit entries follow. Then a critical point with the two-person rule: held until a second
    operator approves, run once."""
    from labkit.meter_sim import LAB_HOLDING, meter_in_thread

    deployment, ca, broker, config, _collector = lab
    alice, bob = add_operator(ca, "alice"), add_operator(ca, "bob")
    waiting = subprocess.Popen([sys.executable, "-m", "collector.cli", "command", GW, "meter", "setpoint=21.5",
                                "--wait", "40s", "-c", str(config), "--operator", str(alice)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = ControlStore(tmp_path / "control.db")
    agent = None
    try:
        with meter_in_thread(seed=5, update_interval=0.05) as sim:
            wait_until(lambda: store.commands(gateway=GW), 15, "the command stored")
            gw = deployment.gateways[GW]
            agent = stack.agent_process(stack.write_agent_config(
                tmp_path / "agent.toml", GW, broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_max="1s"),
                [stack.modbus_tcp_device("meter", sim.port, interval="1s", profile=str(LAB_PROFILE), timeout="5s",
                                         writable=["setpoint", "system_type"])],
                security={"identity_key": str(gw.identity_key), "collector_key": str(deployment.collector_pub),
                          "operator_ca": str(ca / "operator-ca.pub")},
            )).start()
            out, err = waiting.communicate(timeout=60)
            assert waiting.returncode == 0, (out, err, agent.tail_log())
            assert out.splitlines()[-1] == "done: setpoint = 21.5"
            setpoint = LAB_HOLDING["setpoint"]
            assert [w.values for w in sim.writes if (w.table, w.address) == ("holding", setpoint)] == [(215,)]

            # critical: alice alone is held back, bob's approval releases it, the agent accepts two signatures
            result = cli(config, "command", GW, "meter", "system_type=1", "--critical", "--deadline", "10m",
                         operator=alice)
            assert result.returncode == 0 and "awaiting_approval" in result.stdout, result.stderr
            critical_id = result.stdout.split()[1].rstrip(":")
            assert cli(config, "command", "list", "--pending").stdout.startswith(critical_id)
            result = cli(config, "command", "approve", critical_id, operator=bob)
            assert result.returncode == 0, result.stderr
            row = wait_until(lambda: (r := store.command(critical_id)).final and r, 20, "the critical command final")
            assert (row.state, row.readback, row.operators) == ("done", 1, "alice+bob"), (row, agent.tail_log())
            system_type = [w.values for w in sim.writes if (w.table, w.address) == ("holding", 0x000A)]
            assert system_type == [(0x3F80, 0x0000)]  # float32 1.0 over FC 16, once

            # audit: the real agent's read-back in InfluxDB, the chain intact
            def done_points():  # type: ignore[no-untyped-def]
                rows = influxd.query('SELECT * FROM "citynerve_command" WHERE "state" = \'done\'', influx_db)
                return len(rows) == 2 and rows

            points = wait_until(done_points, 10, "both commands' done points")
            assert sorted((p["point"], p["readback"], p["operator"]) for p in points) == [
                ("setpoint", 21.5, "alice"), ("system_type", 1.0, "alice+bob")]
            result = subprocess.run([sys.executable, "-m", "collector.cli", "audit", "verify", "-c", str(config)],
                                    capture_output=True, text=True, timeout=30)
            assert result.returncode == 0 and "chain intact" in result.stdout, result.stderr
    finally:
        if agent is not None:
            agent.stop()
        store.close()
        if waiting.poll() is None:
            waiting.kill()
