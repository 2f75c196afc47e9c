"""Operator-signed commands end to end: the shipped mosquitto configuration (labkit.secure_broker), a gateway
enrolled with the real CLIs, a real `edge-agent run` process, a pymodbus simulator, and labkit.control_lab as
the collector's control side (opens the agent's sealed uplink to learn its session, seals ControlDown to it,
reads the agent's sealed reports). One agent process for every case; the verification rules in detail are
in tests/test_control.py, without processes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from labkit import enrolled, stack
from labkit.control_lab import ControlLab, Operator, OperatorPki, command, now_ms
from labkit.meter_sim import LAB_COILS, LAB_HOLDING, MeterSimulator, meter_in_thread
from labkit.pki import LabCA
from labkit.process import ServerProcess
from labkit.secure_broker import SecureBroker
from wire.control import ConfigDoc, Scope, SignedCrl, SignedDoc, config_sha256

pytestmark = pytest.mark.integration

GW = "gw-ctl-1"
LAB_PROFILE = Path(__file__).resolve().parent.parent / "labkit" / "profiles" / "lab_meter.toml"


@dataclass
class Stack:
    root: Path
    deployment: enrolled.Deployment
    broker: SecureBroker
    sim: MeterSimulator
    pki: OperatorPki
    config: Path
    agent: ServerProcess
    lab: ControlLab
    alice: Operator
    bob: Operator
    crl: SignedCrl  # the current revocation list, sent with every document as the collector does

    def run(self, signed: SignedDoc, crl: SignedCrl | None = None, timeout: float = 10):
        """Send one document (with a new revocation list, which becomes the current one) and return the
        gateway's report on it."""
        doc_id = _doc_id(signed)
        before = len(self.lab.reports_for(doc_id))
        self.crl = crl or self.crl
        self.lab.send(signed, self.crl)
        return self.lab.wait_report(doc_id, timeout, count=before + 1)


def _doc_id(signed: SignedDoc) -> str:
    from wire.control import Command, read_doc

    doc = read_doc(signed)
    return doc.id if isinstance(doc, Command) else str(doc.version)


@pytest.fixture(scope="module")
def lab_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("control")
    deployment = enrolled.create(root / "deployment", [GW])
    pki = OperatorPki(root / "operators")
    with SecureBroker(root / "broker", device_ca_dir=deployment.ca_dir, collector_ca_dir=deployment.collector_ca_dir,
                      server_ca=LabCA(root / "server-ca")) as broker, \
            meter_in_thread(seed=11, update_interval=0.05) as sim:
        gw = deployment.gateways[GW]
        config = stack.write_agent_config(
            root / "agent.toml", GW, broker.gateway_mqtt(gw.tls_cert, gw.tls_key, reconnect_max="1s"),
            [stack.modbus_tcp_device("meter", sim.port, interval="1s", profile=str(LAB_PROFILE), timeout="5s",
                                     writable=["setpoint", "relay_1", "system_type", "demand_period"])],
            security={"identity_key": str(gw.identity_key), "collector_key": str(deployment.collector_pub),
                      "operator_ca": str(pki.ca_pub)},
        )
        agent = stack.agent_process(config).start()
        lab = ControlLab(broker, deployment, GW)
        current = Stack(root, deployment, broker, sim, pki, config, agent, lab, pki.operator("alice"),
                        pki.operator("bob"), pki.crl())
        try:
            yield current
        finally:
            lab.close()
            current.agent.stop()  # a test may have restarted it: the one running now (it outlived the tests before)


def writes_to(sim: MeterSimulator, table: str, address: int) -> list[tuple[int, ...]]:
    return [w.values for w in sim.writes if (w.table, w.address) == (table, address)]


def test_writes_land_in_the_device_and_are_read_back(lab_stack: Stack) -> None:
    s, setpoint = lab_stack, LAB_HOLDING["setpoint"]
    signed = s.alice.sign(command(GW, "meter", "setpoint", 21.5))
    report = s.run(signed)
    assert (report.kind, report.state, report.value, report.reason) == ("command", "done", 21.5, "")
    assert writes_to(s.sim, "holding", setpoint) == [(215,)]  # int16, 0.1 degC: FC 6 of register 215
    # the read-back was a read of the device's register (FC 3) after the write, served as (215,)
    write_ns = s.sim.writes[-1].time_ns
    assert any(e.table == "holding" and e.address == setpoint and e.registers == (215,) and e.time_ns > write_ns
               for e in list(s.sim.served))

    report = s.run(s.alice.sign(command(GW, "meter", "relay_1", True)))
    assert (report.state, report.value) == ("done", True)
    assert writes_to(s.sim, "coil", LAB_COILS["relay_1"]) == [(1,)]

    report = s.run(s.alice.sign(command(GW, "meter", "demand_period", 30)))  # float32 over FC 16
    assert (report.state, report.value) == ("done", 30.0)
    assert writes_to(s.sim, "holding", 0x02) == [(0x41F0, 0x0000)]

    # a replay (the collector re-sends, or anyone replays the sealed document): runs once, the report again
    again = s.run(signed)
    assert again == s.lab.reports_for(_doc_id(signed))[0]  # the stored report, byte for byte
    assert writes_to(s.sim, "holding", setpoint) == [(215,)]

    report = s.run(s.alice.sign(command(GW, "meter", action="poll_now")))
    assert (report.state, report.value) == ("done", None)
    assert s.lab.bad == []  # every uplink opened: the gateway sealed to the collector's key, for its topics


def test_what_the_gateway_refuses(lab_stack: Stack) -> None:
    s, pki = lab_stack, lab_stack.pki
    writes_before = len(s.sim.writes)

    def refused(signed: SignedDoc, crl=None) -> tuple[str, str]:
        report = s.run(signed, crl)
        return report.state, report.reason

    setpoint = lambda value: command(GW, "meter", "setpoint", value)  # noqa: E731
    assert refused(s.alice.sign(command(GW, "meter", "relay_2", True))) == ("refused", "not_writable")  # not opted in
    assert refused(s.alice.sign(setpoint(45))) == ("refused", "out_of_range")
    assert refused(s.alice.sign(setpoint(21.3))) == ("refused", "out_of_range")  # not on the step of 0.5
    assert refused(s.alice.sign(command(GW, "pump", "setpoint", 1))) == ("refused", "unknown_device")

    expired = pki.operator("carol", not_before_ms=now_ms() - 7200_000, not_after_ms=now_ms() - 3600_000)
    assert refused(expired.sign(setpoint(20))) == ("refused", "cert_expired")
    dave = pki.operator("dave")
    before_revocation = pki.crl()
    pki.revoke(dave)
    assert refused(dave.sign(setpoint(20)), pki.crl()) == ("refused", "revoked")
    # an older list (a collector or the broker replaying it): ignored, revocations cannot be rolled back
    assert refused(dave.sign(setpoint(20)), before_revocation) == ("refused", "revoked")
    eve = pki.operator("eve", scope=Scope(devices=["boiler-*"]))
    assert refused(eve.sign(setpoint(20))) == ("refused", "out_of_scope")
    viewer = pki.operator("vic", role="viewer")
    assert refused(viewer.sign(setpoint(20))) == ("refused", "role")

    # whoever holds no CA key - the collector, the broker - cannot make an operator
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    own_ca = Ed25519PrivateKey.generate()
    assert refused(pki.operator("mallory", issuer=own_ca, claim_ca=False).sign(setpoint(20))) == ("refused", "unknown_ca")
    assert refused(pki.operator("mallory", issuer=own_ca).sign(setpoint(20))) == ("refused", "bad_certificate")

    # a signed command with its value changed
    signed = s.alice.sign(setpoint(20))
    from wire.control import decode_signed_doc, encode, read_doc

    doc = read_doc(signed)
    forged = SignedDoc(signed.kind, encode(type(doc)(**{**{f: getattr(doc, f) for f in doc.__struct_fields__},
                                                         "value": 39.5})), signed.approvals)
    assert decode_signed_doc(encode(forged)).approvals == signed.approvals
    assert refused(forged) == ("refused", "bad_signature")

    # past its deadline: issued two minutes ago, valid for one
    report = s.run(s.alice.sign(command(GW, "meter", "setpoint", 20, issued_ms=now_ms() - 120_000, lifetime_s=60)))
    assert (report.state, report.reason) == ("expired", "expired")

    # critical: two different operators
    critical = s.alice.sign(command(GW, "meter", "system_type", 1))
    assert refused(critical) == ("refused", "two_person")
    assert refused(s.alice.cosign(critical)) == ("refused", "two_person")  # the same person twice
    assert writes_before == len(s.sim.writes)  # nothing refused reached the device
    report = s.run(s.bob.cosign(critical))
    assert (report.state, report.value) == ("done", 1.0)
    assert writes_to(s.sim, "holding", 0x0A)[-1] == (0x3F80, 0x0000)

    config = ConfigDoc(gateway=GW, version=1, toml="", sha256=config_sha256(""), issued_ms=now_ms(),
                       deadline_ms=now_ms() + 60_000)
    # a configuration goes to the remote configuration (edge_agent/remote_config.py): received, then checked as
    # `edge-agent check` does - an empty file is refused with the line it prints
    report = s.run(pki.operator("erin", role="engineer").sign(config))
    assert (report.kind, report.id, report.state) == ("config", "1", "received")
    report = s.lab.wait_report("1", 10, count=2)
    assert (report.state, report.reason) == ("refused", "invalid_config")
    assert report.detail == "error: config version 1: gateway: required key is missing: expected a table"
    log = s.agent.log_path.read_text()
    assert "refused command" in log and "Traceback" not in log


def test_a_command_interrupted_by_kill_9_never_runs_again(lab_stack: Stack) -> None:
    s, setpoint = lab_stack, LAB_HOLDING["setpoint"]
    s.sim.write_delay[("holding", setpoint)] = 4.0  # a slow device: the agent waits for the answer (timeout 5 s)
    signed = s.alice.sign(command(GW, "meter", "setpoint", 33.0))
    s.lab.send(signed, s.crl)
    s.sim.wait_for_write(lambda writes: any(w.values == (330,) for w in writes))  # on the device's line now
    s.agent.kill()
    s.sim.write_delay.clear()

    # the same configuration and state directory, a new log (readiness is read from it)
    config = s.config.with_name("agent-restarted.toml")
    shutil.copy(s.config, config)
    s.agent = stack.agent_process(config).start()
    doc_id = _doc_id(signed)
    report = s.lab.wait_report(doc_id, timeout=20)  # sent at start-up, on the new session
    assert (report.state, report.reason) == ("failed", "interrupted")
    again = s.run(signed)  # the collector re-sends it, sealed to the new session
    assert again == report
    assert writes_to(s.sim, "holding", setpoint).count((330,)) == 1
    assert f"command {doc_id} was interrupted" in config.with_suffix(".log").read_text()
