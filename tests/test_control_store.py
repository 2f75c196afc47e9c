"""The control store (collector/control_store.py): pure state transitions, and the SQLite store as the CLI and the
relay use it - versions, supersession, what is due when, in-flight bounds, expiry, reports bound to their own
gateway, events for the audit log and InfluxDB. The relay's points and audit entries (collector/control_relay.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from collector.control_relay import audit_entry, event_line
from collector.control_store import ControlStore, StoreError, command_transition, config_transition
from labkit.control_lab import OperatorPki
from wire import control

RESEND = 30_000


@pytest.fixture
def ca(tmp_path: Path) -> OperatorPki:
    return OperatorPki(tmp_path / "operators")


@pytest.fixture
def store(tmp_path: Path):
    s = ControlStore(tmp_path / "control.db")
    yield s
    s.close()


def _signer(ca: OperatorPki, name: str = "alice"):
    operator = ca.operator(name, "engineer")
    return operator.key, operator.cert


def _command(ca, gateway="gw-1", now=None, point="setpoint", value=21.5, deadline_s=300, signer=None):
    now = now or int(time.time() * 1000)
    cmd = control.Command(control.new_command_id(), gateway, "meter-1", "write", now, now + deadline_s * 1000, point,
                          value)
    key, cert = signer or _signer(ca)
    return cmd, control.sign("command", cmd, key, cert)


def _config(ca, gateway="gw-1", version=1, now=None, signer=None, text=None):
    now = now or int(time.time() * 1000)
    text = text or f'[gateway]\nid = "{gateway}"\n# v{version}\n'
    doc = control.ConfigDoc(gateway, version, text, control.config_sha256(text), now, now + 86400_000, 60.0)
    key, cert = signer or _signer(ca)
    return doc, control.sign("config", doc, key, cert)


def test_command_transitions() -> None:
    assert command_transition("sent", "done") == "done"
    assert command_transition("pending", "running") == "running"  # sent and reported before marked sent
    assert command_transition("running", "running") is None
    assert command_transition("done", "failed") is None  # final is final (a redelivered report)
    assert command_transition("refused", "done") is None
    assert command_transition("expired", "done") == "done"  # the gateway's late word beats the collector's expiry
    assert command_transition("expired", "expired") is None
    assert command_transition("awaiting_approval", "done") is None  # never sent


def test_config_transitions() -> None:
    assert config_transition("sent", "received") == "received"
    assert config_transition("applied", "received") is None  # a re-send reported received again: not backwards
    assert config_transition("applied", "confirmed") == "confirmed"
    assert config_transition("applied", "rolled_back") == "rolled_back"
    assert config_transition("sent", "running") == "running"
    assert config_transition("confirmed", "running") is None
    assert config_transition("rolled_back", "confirmed") is None
    assert config_transition("superseded", "applied") == "applied"  # the gateway did get it
    assert config_transition("expired", "confirmed") == "confirmed"


def test_config_versions_supersede_and_due(store: ControlStore, ca: OperatorPki) -> None:
    signer = _signer(ca)
    now = int(time.time() * 1000)
    doc1, s1 = _config(ca, version=1, signer=signer)
    store.add_config(doc1, s1, now)
    with pytest.raises(StoreError, match="version 1 is taken; the next one is 2"):
        store.add_config(doc1, s1, now)
    due = store.due(now, resend_ms=RESEND, max_inflight=4, limit=10)
    assert [(d.kind, d.ref) for d in due] == [("config", "1")]
    store.mark_sent(due, now)
    assert store.config("gw-1", 1).state == "sent"
    assert store.due(now + 1000, resend_ms=RESEND, max_inflight=4, limit=10) == []
    assert [d.ref for d in store.due(now + RESEND, resend_ms=RESEND, max_inflight=4, limit=10)] == ["1"]

    doc2, s2 = _config(ca, version=2, signer=signer)
    store.add_config(doc2, s2, now + 2000)
    assert store.config("gw-1", 1).state == "superseded"
    assert [d.ref for d in store.due(now + RESEND, resend_ms=RESEND, max_inflight=4, limit=10)] == ["2"]

    # received: being tried; not sent again before its confirm timeout (60 s) plus the re-send interval
    assert store.apply_report("gw-1", control.Report("config", "2", "received", now, config_version=1,
                                                     config_sha256=doc1.sha256), now + 3000) == "received"
    assert store.due(now + 3000 + RESEND, resend_ms=RESEND, max_inflight=4, limit=10) == []
    assert [d.ref for d in store.due(now + 3000 + RESEND + 60_000, resend_ms=RESEND, max_inflight=4, limit=10)] == ["2"]
    # confirmed: the gateway runs it, nothing due, status in sync
    assert store.apply_report("gw-1", control.Report("config", "2", "confirmed", now, config_version=2,
                                                     config_sha256=doc2.sha256), now + 4000) == "confirmed"
    assert store.due(now + 10 * RESEND, resend_ms=RESEND, max_inflight=4, limit=10) == []
    (status,) = store.config_status("gw-1")
    assert status.in_sync and status.desired.version == 2 and status.running.source == "report"
    assert [r.state for r in store.config_history("gw-1")] == ["superseded", "confirmed"]


def test_a_refused_or_rolled_back_configuration_is_not_sent_again(store: ControlStore, ca: OperatorPki) -> None:
    now = int(time.time() * 1000)
    doc, signed = _config(ca)
    store.add_config(doc, signed, now)
    store.mark_sent(store.due(now, resend_ms=RESEND, max_inflight=4, limit=10), now)
    store.apply_report("gw-1", control.Report("config", "1", "rolled_back", now, "confirm_timeout", "no ack in 60 s"),
                       now)
    assert store.due(now + 100 * RESEND, resend_ms=RESEND, max_inflight=4, limit=10) == []
    (status,) = store.config_status()
    assert status.desired.state == "rolled_back" and status.desired.reason == "confirm_timeout"
    assert not status.in_sync


def test_commands_in_flight_bound_and_resend(store: ControlStore, ca: OperatorPki) -> None:
    signer = _signer(ca)
    now = int(time.time() * 1000)
    ids = []
    for i in range(5):
        cmd, signed = _command(ca, now=now + i, signer=signer)
        assert store.add_command(cmd, signed, 1, now + i) == "pending"
        ids.append(cmd.id)
    due = store.due(now + 10, resend_ms=RESEND, max_inflight=2, limit=10)
    assert [d.ref for d in due] == ids[:2]  # two in flight at most, oldest first
    store.mark_sent(due, now + 10)
    assert store.due(now + 20, resend_ms=RESEND, max_inflight=2, limit=10) == []
    store.apply_report("gw-1", control.Report("command", ids[0], "done", now, value=21.5), now + 30)
    assert [d.ref for d in store.due(now + 40, resend_ms=RESEND, max_inflight=2, limit=10)] == [ids[2]]
    # re-send of the one still in flight after the interval, alongside a new one
    later = store.due(now + 10 + RESEND, resend_ms=RESEND, max_inflight=2, limit=10)
    assert [d.ref for d in later] == [ids[1], ids[2]]
    row = store.command(ids[0])
    assert (row.state, row.readback, row.final) == ("done", 21.5, True)


def test_a_report_changes_only_its_own_gateways_rows(store: ControlStore, ca: OperatorPki) -> None:
    now = int(time.time() * 1000)
    cmd, signed = _command(ca, gateway="gw-good", now=now)
    store.add_command(cmd, signed, 1, now)
    store.mark_sent(store.due(now, resend_ms=RESEND, max_inflight=4, limit=10), now)
    doc, csigned = _config(ca, gateway="gw-good", now=now)
    store.add_config(doc, csigned, now)
    # gw-evil's sealed reports name gw-good's command id and configuration version
    assert store.apply_report("gw-evil", control.Report("command", cmd.id, "done", now, value=0), now) is None
    assert store.apply_report("gw-evil", control.Report("config", "1", "confirmed", now, config_version=1,
                                                        config_sha256=doc.sha256), now) is None
    assert store.command(cmd.id).state == "sent"
    assert store.config("gw-good", 1).state == "pending"
    statuses = {s.gateway: s for s in store.config_status()}
    assert statuses["gw-good"].running is None  # what gw-evil says it runs is gw-evil's row
    assert statuses["gw-evil"].running.version == 1 and statuses["gw-evil"].desired is None


def test_expiry_and_approval(store: ControlStore, ca: OperatorPki) -> None:
    now = int(time.time() * 1000)
    alice, bob = _signer(ca, "alice"), _signer(ca, "bob")
    cmd, signed = _command(ca, now=now, deadline_s=10, signer=alice)
    assert store.add_command(cmd, signed, 2, now) == "awaiting_approval"
    assert store.due(now, resend_ms=RESEND, max_inflight=4, limit=10) == []  # held until approved
    assert store.commands(states=("awaiting_approval",))[0].id == cmd.id
    both = control.cosign(signed, *bob)
    assert store.approve_command(cmd.id, both, now + 1) == "pending"
    with pytest.raises(StoreError, match="pending, not awaiting approval"):
        store.approve_command(cmd.id, both, now + 2)
    assert store.command(cmd.id).operators == "alice+bob"
    assert store.expire(now + 5_000) == 0
    assert store.expire(now + 11_000) == 1
    row = store.command(cmd.id)
    assert (row.state, row.reason) == ("expired", "deadline")
    assert store.due(now + 11_000, resend_ms=0, max_inflight=4, limit=10) == []
    # the gateway's late final report still counts
    assert store.apply_report("gw-1", control.Report("command", cmd.id, "done", now, value=21.5), now + 12_000) == "done"


def test_events_feed_audit_then_influx_exactly_once(store: ControlStore, ca: OperatorPki) -> None:
    now = int(time.time() * 1000)
    cmd, signed = _command(ca, now=now, value=True, point="relay")
    store.add_command(cmd, signed, 1, now)
    store.mark_sent(store.due(now, resend_ms=RESEND, max_inflight=4, limit=10), now)
    store.apply_report("gw-1", control.Report("command", cmd.id, "refused", now, "out_of_range", "max 1"), now)
    audited: list = []
    events = store.drain_events(100, now, audited.extend)
    assert [e.state for e in events] == ["pending", "sent", "refused"] and audited == events
    assert store.drain_events(100, now, audited.extend) == []  # audited once
    assert store.unwritten(now - 1, now + 1, 100) == []  # not yet overdue for InfluxDB
    again = store.unwritten(now + 1, now + 2, 100)  # InfluxDB did not confirm in time: the same points again
    assert [e.seq for e in again] == [e.seq for e in events]
    store.written([e.seq for e in events])
    assert store.unwritten(now + 10**9, now + 10**9, 100) == []

    refused = events[-1]
    line = event_line(refused).decode()
    assert line.startswith("citynerve_command,")
    for tag in ("gateway=gw-1", "device=meter-1", "point=relay", "operator=alice", "state=refused",
                "reason=out_of_range", "action=write"):
        assert tag in line
    assert f'id="{cmd.id}"' in line and "value=1.0" in line and ",id=" not in line.split(" ")[0]
    entry = audit_entry(refused)
    assert entry["id"] == cmd.id and entry["operators"] == ["alice"] and entry["value"] is True
    assert entry["reason"] == "out_of_range" and entry["detail"] == "max 1"


def test_a_failing_audit_append_keeps_the_events(store: ControlStore, ca: OperatorPki) -> None:
    now = int(time.time() * 1000)
    doc, signed = _config(ca)
    store.add_config(doc, signed, now)

    def broken(_events: list) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.drain_events(100, now, broken)
    events = store.drain_events(100, now, lambda _e: None)
    assert [(e.kind, e.ref, e.state) for e in events] == [("config", "1", "pending")]
    assert b"version=1i" in event_line(events[0])
