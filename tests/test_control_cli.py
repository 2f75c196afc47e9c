"""edge-collector config push|history|diff|status and command ...: what the operator types, what is stored, and
the early refusals (the same wire.control.Trust check and reason codes a gateway applies). No broker: the relay
and the gateways are tests/test_control_relay.py's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from collector.cli import main
from collector.control_cli import gateway_text, parse_value
from collector.control_store import ControlStore
from labkit.control_lab import OperatorPki
from labkit.stack import to_toml
from wire import control


class Operators:
    """The operator CA's files as the CLI reads them (labkit.control_lab.OperatorPki writes them): its public
    key, the current revocation list, and <name>.key/<name>.cert per operator."""

    def __init__(self, directory: Path) -> None:
        self.pki = OperatorPki(directory)
        self.pub = self.pki.ca_pub
        self.crl = self.pki.write_crl()
        self.operators: dict = {}

    def add(self, name: str, role: str = "engineer", scope: control.Scope | None = None, **validity: int) -> Path:
        operator = self.pki.operator(name, role, scope, **validity)  # type: ignore[arg-type]
        self.operators[name] = operator
        return operator.write(self.pki.directory)

    def revoke(self, name: str) -> None:
        self.pki.revoke(self.operators[name])
        self.pki.write_crl()


AGENT_TOML = '[gateway]\nid = "gw-1"\nstate_dir = "/var/lib/citynerve"\n\n[uplink]\npublish_interval = "5s"\n'


@pytest.fixture
def setup(tmp_path: Path):
    ca = Operators(tmp_path / "operators")
    (tmp_path / "keys").mkdir()
    (tmp_path / "gateways.db").write_bytes(b"")
    config = tmp_path / "collector.toml"
    config.write_text(to_toml({
        "security": {"keys_dir": str(tmp_path / "keys"), "registry": str(tmp_path / "gateways.db")},
        "control": {"store": str(tmp_path / "control.db"), "audit_log": str(tmp_path / "audit.log"),
                    "crl": str(ca.crl), "operator_ca": str(ca.pub)},
    }))
    agent = tmp_path / "agent.toml"
    agent.write_text(AGENT_TOML)
    return ca, config, agent, tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_push_history_diff_status(setup, capsys) -> None:
    ca, config, agent, tmp = setup
    alice = ca.add("alice")
    code, out, err = run(capsys, "config", "push", "gw-1", str(agent), "-c", str(config), "--operator", str(alice))
    assert code == 0, err
    assert "gw-1: version 1" in out
    agent.write_text(AGENT_TOML.replace("5s", "10s"))
    assert run(capsys, "config", "push", "gw-1", str(agent), "-c", str(config), "--operator", str(alice),
               "--confirm-timeout", "30s")[0] == 0
    store = ControlStore(tmp / "control.db")
    v1, v2 = store.config_history("gw-1")
    assert (v1.version, v1.state, v2.version, v2.state) == (1, "superseded", 2, "pending")
    signed = control.decode_signed_doc(v2.signed)
    doc = control.read_doc(signed)
    assert doc.toml == agent.read_text() and doc.sha256 == control.config_sha256(doc.toml)
    assert doc.confirm_timeout_s == 30 and v2.operators == "alice"

    code, out, _ = run(capsys, "config", "diff", "gw-1", "-c", str(config))
    assert code == 0
    assert '-publish_interval = "5s"\n+publish_interval = "10s"' in out and "gw-1 version 1" in out
    code, out, _ = run(capsys, "config", "history", "gw-1", "-c", str(config))
    assert code == 0 and "superseded" in out and "pending" in out
    code, out, _ = run(capsys, "config", "status", "-c", str(config), "--json")
    (status,) = json.loads(out)
    assert status["desired"]["version"] == 2 and status["running"] is None and status["in_sync"] is False
    store.close()


def test_group_push_gives_each_gateway_its_own_id(setup, capsys) -> None:
    ca, config, agent, tmp = setup
    alice = ca.add("alice")
    code, _, err = run(capsys, "config", "push", "gw-1", str(agent), "--group", "gw-2", "gw-3", "-c", str(config),
                         "--operator", str(alice))
    assert code == 0, err
    store = ControlStore(tmp / "control.db")
    for gw in ("gw-1", "gw-2", "gw-3"):
        (row,) = store.config_history(gw)
        assert row.toml == AGENT_TOML.replace("gw-1", gw)
    store.close()
    # without --group, a file naming another gateway is refused: a push may not change gateway.id
    code, _, err = run(capsys, "config", "push", "gw-9", str(agent), "-c", str(config), "--operator", str(alice))
    assert code == 2 and "gateway.id: is 'gw-1', pushing to 'gw-9'" in err
    assert gateway_text("[gateway]\nid = 'a' # x\n[mqtt]\nid = 'z'\n", "b", allow_rewrite=True, source="f") == \
        '[gateway]\nid = "b" # x\n[mqtt]\nid = \'z\'\n'


def test_bad_files_are_one_line(setup, capsys) -> None:
    ca, config, agent, tmp = setup
    alice = ca.add("alice")
    agent.write_text('[gateway\nid = "gw-1"\n')
    code, _, err = run(capsys, "config", "push", "gw-1", str(agent), "-c", str(config), "--operator", str(alice))
    assert code == 2 and err.startswith(f"error: {agent}: not valid TOML") and "line 1" in err
    agent.write_text(AGENT_TOML)
    code, _, err = run(capsys, "config", "push", "gw-1", str(agent), "-c", str(config))
    assert code == 2 and "give --operator KEYFILE or set CITYNERVE_OPERATOR" in err
    bob = ca.add("bob")
    (tmp / "operators" / "bob.cert").write_text((tmp / "operators" / "alice.cert").read_text())
    code, _, err = run(capsys, "config", "push", "gw-1", str(agent), "-c", str(config), "--operator", str(bob))
    assert code == 2 and "not the key of the certificate" in err
    code, _, err = run(capsys, "command", "gw-1", "meter-1", "setpoint=abc", "-c", str(config), "--operator", str(alice))
    assert code == 2 and "expected a number, true or false" in err
    config.write_text("[mqtt]\n")
    code, _, err = run(capsys, "config", "status", "-c", str(config))
    assert code == 2 and "no [control] section" in err
    assert (parse_value("true"), parse_value("7"), parse_value("-2.5")) == (True, 7, -2.5)


@pytest.mark.parametrize("case, reason", [
    ("viewer", "role"), ("operator pushes a configuration", "role"), ("out of scope", "out_of_scope"),
    ("point out of scope", "out_of_scope"), ("revoked", "revoked"), ("expired", "cert_expired"),
    ("other CA", "unknown_ca"), ("deadline too long", "too_long"),
])
def test_early_refusals_name_the_gateways_reason(setup, capsys, case: str, reason: str) -> None:
    ca, config, agent, tmp = setup
    now = int(time.time() * 1000)
    argv = ["command", "gw-1", "meter-1", "setpoint=20"]
    if case == "viewer":
        key = ca.add("vic", role="viewer")
    elif case == "operator pushes a configuration":
        key = ca.add("olga", role="operator")
        argv = ["config", "push", "gw-1", str(agent)]
    elif case == "out of scope":
        key = ca.add("sam", scope=control.Scope(gateways=["north-*"]))
    elif case == "point out of scope":
        key = ca.add("pat", scope=control.Scope(points=["mode"]))
    elif case == "revoked":
        key = ca.add("rex")
        ca.revoke("rex")
    elif case == "expired":
        key = ca.add("old", not_after_ms=now - 1000)
    elif case == "other CA":
        key = Operators(tmp / "other").add("eve")
    else:
        key = ca.add("dan")
        argv += ["--deadline", "2d"]
    code, out, err = run(capsys, *argv, "-c", str(config), "--operator", str(key))
    assert code == 2, out
    assert err.startswith(f"error: refused: {reason}: ") and "nothing stored" in err
    store = ControlStore(tmp / "control.db")
    assert store.commands() == [] and store.config_history("gw-1") == []
    store.close()


def test_command_two_person_rule_and_listing(setup, capsys) -> None:
    ca, config, _, tmp = setup
    alice, bob = ca.add("alice", role="operator"), ca.add("bob", role="operator")
    code, out, err = run(capsys, "command", "gw-1", "pump-1", "run=true", "--critical", "--deadline", "1h",
                         "-c", str(config), "--operator", str(alice))
    assert code == 0, err
    cmd_id = out.split()[1].rstrip(":")
    assert "awaiting_approval" in out and f"command approve {cmd_id}" in out
    _, out, _ = run(capsys, "command", "list", "--pending", "-c", str(config))
    assert cmd_id in out and "gw-1/pump-1/run=true" in out
    code, _, err = run(capsys, "command", "approve", cmd_id, "-c", str(config), "--operator", str(alice))
    assert code == 2 and "a second, different operator approves" in err
    code, out, err = run(capsys, "command", "approve", cmd_id, "-c", str(config), "--operator", str(bob))
    assert code == 0 and "approved by bob, pending" in out, err
    code, out, _ = run(capsys, "command", "show", cmd_id, "-c", str(config))
    assert "alice+bob (2 of 2 approvals)" in out and "state      pending" in out
    assert run(capsys, "command", "list", "--pending", "-c", str(config))[1] == ""
    code, _, err = run(capsys, "command", "approve", cmd_id, "-c", str(config), "--operator", str(bob))
    assert code == 1 and "is pending, not awaiting approval" in err
    store = ControlStore(tmp / "control.db")
    signed = control.decode_signed_doc(store.command(cmd_id).signed)
    trust = control.Trust(ca.pki.ca.public_key(), control.encode(control.decode_signed_crl(
        control.unarmour("OPERATOR CRL", ca.crl.read_text()))))
    doc, operators = trust.verify(signed, gateway="gw-1", now_ms=int(time.time() * 1000), required=2)
    assert [o.name for o in operators] == ["alice", "bob"] and doc.value is True
    # poll-now, both spellings
    assert run(capsys, "poll-now", "gw-1", "pump-1", "-c", str(config), "--operator", str(alice))[0] == 0
    assert run(capsys, "command", "gw-1", "pump-1", "--poll-now", "-c", str(config), "--operator", str(alice))[0] == 0
    assert [c.action for c in store.commands(gateway="gw-1")].count("poll_now") == 2
    store.close()


def test_wait_reports_the_final_state(setup, capsys, monkeypatch) -> None:
    ca, config, _, tmp = setup
    alice = ca.add("alice")
    store = ControlStore(tmp / "control.db")
    real_command = ControlStore.command
    # The gateway's report arrives while the CLI waits: applied to the store by "the collector" (this test)
    # after the CLI's first look.
    looks = {"n": 0}

    def command(self, command_id):  # type: ignore[no-untyped-def]
        looks["n"] += 1
        if looks["n"] == 2:
            store.mark_sent(store.due(int(time.time() * 1000), resend_ms=0, max_inflight=4, limit=10),
                            int(time.time() * 1000))
            store.apply_report("gw-1", control.Report("command", command_id, "refused", 0, "out_of_range",
                                                      "setpoint: 99 above max 30"), int(time.time() * 1000))
        return real_command(self, command_id)

    monkeypatch.setattr(ControlStore, "command", command)
    code, out, _ = run(capsys, "command", "gw-1", "meter-1", "setpoint=99", "--wait", "10s", "-c", str(config),
                       "--operator", str(alice))
    assert code == 1
    assert out.splitlines()[-1] == "refused: out_of_range (setpoint: 99 above max 30)"
    store.close()
