"""The agent's control plane without processes: the agent's own rules (plan_command, approvals_needed), the
durable command store, the opt-in in agent.toml, and edge_agent/control.py ControlPlane on the event loop with
the real sealing (wire/seal.py: the collector's Opener seals, the gateway's sealer opens), the real Trust and a
real bus engine on a pymodbus simulator. The same cases through real processes: tests/test_control_e2e.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import config as agent_config
from edge_agent.control import (
    CRL_FILE,
    STORE_FILE,
    CommandStore,
    ControlPlane,
    approvals_needed,
    devices_of,
    plan_command,
)
from edge_agent.modbus.bus import BusEngine
from edge_agent.modbus.config import ModbusBus, ModbusTcpDevice
from edge_agent.modbus.devices import polled_device
from edge_agent.profiles import load_profile
from labkit.control_lab import OperatorPki, command, now_ms
from labkit.meter_sim import LAB_HOLDING, MeterSimulator, meter_in_thread
from wire import control, topics
from wire.config import ConfigError
from wire.control import ConfigDoc, ControlRefused, Report, SignedDoc, config_sha256
from wire.seal import CollectorKey, GatewaySealer, Opener

GW = "gw-c"
LAB_PROFILE = str(Path(__file__).resolve().parent.parent / "labkit" / "profiles" / "lab_meter.toml")
SETPOINT = LAB_HOLDING["setpoint"]


def lab_device(port: int = 502, **kwargs: Any) -> ModbusTcpDevice:
    defaults: dict[str, Any] = {"id": "meter", "profile": LAB_PROFILE, "host": "127.0.0.1", "interval": 60.0,
                                "writable": ["setpoint", "relay_1", "system_type"]}
    return ModbusTcpDevice(port=port, **{**defaults, **kwargs})


def lab_engine(port: int = 502, timeout: float = 1.0, **kwargs: Any) -> BusEngine:
    device = lab_device(port, **kwargs)
    bus = ModbusBus(id="bus-1", target=f"tcp://127.0.0.1:{port}", timeout=timeout)
    return BusEngine(bus, [polled_device(device, load_profile(LAB_PROFILE))])


# --- the agent's own rules -----------------------------------------------------------------------------------------


def refusal(fn: Any, *args: Any) -> tuple[str, str]:
    with pytest.raises(ControlRefused) as caught:
        fn(*args)
    return caught.value.reason, caught.value.detail


def test_plan_command_follows_the_profile_and_the_opt_in() -> None:
    devices = devices_of([lab_engine()])
    job = plan_command(command(GW, "meter", "setpoint", -2.5), devices)
    assert (job.point.name, job.words) == ("setpoint", (0xFFE7,))  # type: ignore[union-attr]
    assert plan_command(command(GW, "meter", action="poll_now"), devices).point is None
    assert refusal(plan_command, command(GW, "meter", "relay_2", True), devices) == (
        "not_writable", "meter/relay_2 is writable in its profile, but the device does not opt in to it "
                        "(agent.toml devices[].writable)")
    assert refusal(plan_command, command(GW, "meter", "voltage_l1", 230), devices) == (
        "not_writable", "meter/voltage_l1 is not writable")
    assert refusal(plan_command, command(GW, "meter", "nope", 1), devices) == (
        "unknown_point", "device meter has no point 'nope'")
    assert refusal(plan_command, command(GW, "p1", "x", 1), devices, frozenset({"p1"})) == (
        "unknown_device", "p1 is a serial device: commands reach the devices of [[buses]] only")
    assert refusal(plan_command, command(GW, "meter", "setpoint", None), devices)[0] == "malformed"
    assert refusal(plan_command, command(GW, "meter", "setpoint", 40.5), devices) == (
        "out_of_range", "40.5 °C is outside setpoint's range -10..40")


def test_a_meter_on_a_bus_can_be_polled_now_and_not_written() -> None:
    from edge_agent.meters.config import Dlt645Device
    from edge_agent.modbus.devices import polled_meter

    bus = ModbusBus(id="rs485", target="/dev/ttyUSB0", baud=2400, parity="E")
    meter = polled_meter(Dlt645Device(id="flat-1", bus="rs485", address="000102030425"), bus)
    engine = BusEngine(bus, [meter])
    devices = devices_of([engine])
    assert plan_command(command(GW, "flat-1", action="poll_now"), devices).device is meter
    assert refusal(plan_command, command(GW, "flat-1", "energy_import", 1.0), devices) == (
        "not_writable", "flat-1 is a DL/T 645-2007 meter 000102030425: read only (it can be polled now)")


def test_a_critical_point_needs_two_operators_only_where_it_can_be_written() -> None:
    devices = devices_of([lab_engine()])
    assert approvals_needed(command(GW, "meter", "system_type", 1), devices) == 2
    assert approvals_needed(command(GW, "meter", "setpoint", 1), devices) == 1
    # not opted in: refused as not_writable after the signatures, whatever the profile says
    assert approvals_needed(command(GW, "meter", "system_type", 1), devices_of([lab_engine(writable=[])])) == 1
    assert approvals_needed(command(GW, "elsewhere", "system_type", 1), devices) == 1


def test_by_default_a_device_writes_nothing() -> None:
    engine = lab_engine(writable=[])
    assert engine.devices[0].writes == {}
    assert refusal(plan_command, command(GW, "meter", "setpoint", 20), devices_of([engine]))[0] == "not_writable"


# --- opting in: edge-agent check -------------------------------------------------------------------------------


AGENT = """
[gateway]
id = "gw-c"
state_dir = "{state}"

[[devices]]
kind = "modbus-tcp"
id = "climate-1"
host = "192.0.2.7"
profile = "xy_md02"
writable = {writable}
"""


def write_agent(tmp_path: Path, writable: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT.format(state=tmp_path / "state", writable=writable))
    return path


def test_opting_in_to_a_writable_point(tmp_path: Path) -> None:
    cfg = agent_config.load(write_agent(tmp_path, '["temperature_correction"]'))
    assert cfg.devices[0].writable == ["temperature_correction"]


@pytest.mark.parametrize(("writable", "message"), [
    ('["temperature"]', 'devices[0].writable[0]: device "climate-1": profile xy_md02 does not declare writable the '
                        'point "temperature" (writable points: temperature_correction, humidity_correction)'),
    ('["temperature_correction", "setpoint"]', 'devices[0].writable[1]: device "climate-1": profile xy_md02 has no '
                                               'point "setpoint"'),
    ('["humidity_correction", "humidity_correction"]', 'devices[0].writable[1]: "humidity_correction" is listed '
                                                       'already'),
])
def test_check_refuses_an_opt_in_the_profile_does_not_allow(tmp_path: Path, writable: str, message: str) -> None:
    path = write_agent(tmp_path, writable)
    with pytest.raises(ConfigError) as caught:
        agent_config.load(path)
    assert str(caught.value).startswith(f"{path}: {message}"), str(caught.value)


def test_check_prints_the_error_as_one_line(tmp_path: Path) -> None:
    path = write_agent(tmp_path, '["temperature"]')
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f'error: {path}: devices[0].writable[0]: device "climate-1": profile xy_md02 does not declare writable the '
        f'point "temperature" (writable points: temperature_correction, humidity_correction)']
    ok = write_agent(tmp_path, '["temperature_correction"]')
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check", str(ok)], capture_output=True,
                            text=True, timeout=60)
    assert "operators may write temperature_correction" in result.stdout
    assert "commands: none accepted (no [security] operator_ca)" in result.stdout


def test_a_sunspec_device_cannot_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AGENT.format(state=tmp_path, writable='["W"]').replace('"xy_md02"', '"sunspec"'))
    with pytest.raises(ConfigError, match=r"devices\[0\].writable\[0\]: device \"climate-1\": a SunSpec device"):
        agent_config.load(path)


def test_the_operator_ca_must_be_an_ed25519_public_key(tmp_path: Path) -> None:
    from wire.keys import collector_key_to_pem, collector_public_to_pem, identity_to_pem, operator_ca_from_pem

    identity, collector = tmp_path / "identity.key", tmp_path / "collector.pub"
    identity.write_bytes(identity_to_pem(Ed25519PrivateKey.generate()))
    collector.write_bytes(collector_key_to_pem(CollectorKey.generate()))
    ca = tmp_path / "ca.key"
    ca.write_bytes(identity_to_pem(Ed25519PrivateKey.generate()))  # the CA's PRIVATE key, by mistake
    path = tmp_path / "agent.toml"
    path.write_text(f'[gateway]\nid = "gw-c"\nstate_dir = "{tmp_path}"\n[security]\nidentity_key = "{identity}"\n'
                    f'collector_key = "{collector}"\noperator_ca = "{ca}"\n')
    with pytest.raises(ConfigError, match=r"security\.operator_ca: not a usable key file: this is a private key"):
        agent_config.load(path)
    with pytest.raises(ValueError, match="expected the operator CA's Ed25519 public key, got X25519PublicKey"):
        operator_ca_from_pem(collector_public_to_pem(CollectorKey.generate()))  # the collector's key, by mistake


# --- the command store ---------------------------------------------------------------------------------------------


def test_the_store_keeps_ids_until_after_their_deadline(tmp_path: Path) -> None:
    store = CommandStore(tmp_path / STORE_FILE, 1_000)
    assert store.lookup("a" * 32) is None
    assert store.start("a" * 32, "sha-a", deadline_ms=2_000, now=1_000)
    report = control.encode(Report(kind="command", id="a" * 32, state="done", at_ms=1_500, value=1))
    store.finish("a" * 32, report)
    assert store.lookup("a" * 32) == ("sha-a", report)
    store.start("b" * 32, "sha-b", deadline_ms=10_000_000, now=2_000)  # started, never finished
    store.close()

    store = CommandStore(tmp_path / STORE_FILE, 5_000)  # the agent comes back
    (interrupted,) = store.interrupted(5_000)
    assert (interrupted.id, interrupted.state, interrupted.reason) == ("b" * 32, "failed", "interrupted")
    assert store.lookup("b" * 32) == ("sha-b", control.encode(interrupted))
    assert store.interrupted(6_000) == []  # reported once
    # an hour after a's deadline the next start forgets it: Trust.verify refuses it as expired from then on
    store.start("c" * 32, "sha-c", deadline_ms=10_000_000, now=2_001 + 3600_000)
    assert store.lookup("a" * 32) is None and store.lookup("b" * 32) is not None
    store.close()
    assert (tmp_path / STORE_FILE).stat().st_mode & 0o077 == 0  # a private file


def test_a_damaged_store_is_moved_aside_and_older_commands_refused(tmp_path: Path) -> None:
    (tmp_path / STORE_FILE).write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    store = CommandStore(tmp_path / STORE_FILE, 7_000)
    assert store.not_before_ms == 7_000
    assert [p.name for p in tmp_path.iterdir() if ".damaged-" in p.name] == [f"{STORE_FILE}.damaged-7000"]
    store.close()
    assert CommandStore(tmp_path / STORE_FILE, 9_000).not_before_ms == 7_000  # remembered


# --- the control plane on the event loop ------------------------------------------------------------------------


class Harness:
    """One gateway's ControlPlane with the collector's Opener beside it and a bus engine on the simulator."""

    def __init__(self, tmp_path: Path, sim: MeterSimulator, pki: OperatorPki | None, **engine: Any) -> None:
        self.tmp_path, self.sim, self.pki = tmp_path, sim, pki
        self.collector = CollectorKey.generate()
        self.identity = Ed25519PrivateKey.generate()
        self.sealer = GatewaySealer(GW, self.identity, self.collector.public_only())
        self.opener = Opener([self.collector], lambda gw: self.identity.public_key() if gw == GW else None)
        self.topic = topics.down(topics.DEFAULT_PREFIX, GW, control.KIND)
        up = topics.up(topics.DEFAULT_PREFIX, GW)
        self.opener.open(GW, up, self.sealer.seal(up, b"hello"))  # the collector learns the session
        self.engine = lab_engine(sim.port, **engine)
        self.reports: list[Report] = []
        self.readings: list[Any] = []
        self.plane: ControlPlane | None = None
        self.crl = pki.crl() if pki else None

    def new_plane(self) -> ControlPlane:
        self.plane = ControlPlane(
            gateway=GW, topic=self.topic, sealer=self.sealer,
            operator_ca=self.pki.ca.public_key() if self.pki else None, engines=[self.engine], serial_ids=[],
            state_dir=self.tmp_path, send_report=self._report)
        return self.plane

    def _report(self, report: Report) -> None:
        self.reports.append(report)
        self._changed.set()

    async def __aenter__(self) -> Harness:
        self._changed = asyncio.Event()
        self._bus = asyncio.create_task(self.engine.run(self.readings.extend))
        await self.new_plane().open()
        self.plane.link_up()  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.plane is not None
        await self.plane.close()
        self._bus.cancel()
        await asyncio.gather(self._bus, return_exceptions=True)

    def seal(self, item: SignedDoc | None, crl: control.SignedCrl | None = None, topic: str | None = None) -> bytes:
        down = control.ControlDown(crl=crl or self.crl, item=item)  # type: ignore[arg-type]
        sid = self.opener.newest_session(GW)
        assert sid is not None
        return self.opener.seal_confidential(GW, sid, topic or self.topic, control.encode(down))

    def deliver(self, item: SignedDoc | None, crl: control.SignedCrl | None = None) -> None:
        assert self.plane is not None
        self.plane.received(self.seal(item, crl))

    async def report(self, doc_id: str, count: int = 1, timeout: float = 5.0) -> Report:
        deadline = time.monotonic() + timeout
        while len(found := [r for r in self.reports if r.id == doc_id]) < count:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
        return found[count - 1]

    async def run(self, item: SignedDoc, crl: control.SignedCrl | None = None) -> Report:
        doc = control.read_doc(item)
        doc_id = doc.id if isinstance(doc, control.Command) else str(doc.version)
        before = len([r for r in self.reports if r.id == doc_id])
        self.deliver(item, crl)
        return await self.report(doc_id, before + 1)


@pytest.fixture
def sim() -> Iterator[MeterSimulator]:
    with meter_in_thread(seed=3, update_interval=0.05) as s:
        yield s


@pytest.fixture
def pki(tmp_path: Path) -> OperatorPki:
    return OperatorPki(tmp_path / "operators")


def test_without_an_operator_ca_nothing_is_accepted(tmp_path: Path, sim: MeterSimulator, pki: OperatorPki,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    alice = pki.operator("alice")

    async def main() -> None:
        harness = Harness(tmp_path, sim, None)
        harness.crl = pki.crl()
        async with harness as h:
            signed = alice.sign(command(GW, "meter", "setpoint", 20))
            report = await h.run(signed)
            assert (report.state, report.reason) == ("refused", "unknown_ca")
            assert "accepts no control documents" in report.detail

    asyncio.run(main())
    assert sim.writes == []
    assert [r.message for r in caplog.records].count(
        "no operator CA ([security] operator_ca): this gateway accepts no commands and no configurations "
        "(docs/control.md)") == 1


def test_what_cannot_be_opened_is_counted_and_never_answered(tmp_path: Path, sim: MeterSimulator,
                                                             pki: OperatorPki) -> None:
    alice = pki.operator("alice")

    async def main() -> None:
        async with Harness(tmp_path, sim, pki) as h:
            plane = h.plane
            assert plane is not None
            signed = alice.sign(command(GW, "meter", "setpoint", 20))
            plane.received(b"\x04" + b"\0" * 60)  # not a session of ours
            plane.received(b"garbage")
            plane.received(h.seal(signed, topic=topics.down(topics.DEFAULT_PREFIX, GW, "ack")))  # another topic
            plane.received(h.opener.seal_confidential(GW, h.opener.newest_session(GW), h.topic, b"\x93\x01"))
            payload = h.seal(signed)
            plane.received(payload)
            await h.report(control.read_doc(signed).id)  # type: ignore[union-attr]
            plane.received(payload)  # the same sealed bytes again (a replay inside the age window)
            assert plane.stats["seal_unknown_session"] == 1 and plane.stats["seal_malformed_header"] == 1
            assert plane.stats["seal_bad_tag"] == 1 and plane.stats["malformed"] == 1
            assert plane.stats["seal_duplicate"] == 1
            assert len(h.reports) == 1

    asyncio.run(main())
    assert len(sim.writes) == 1


def test_revocations_cannot_be_rolled_back_even_across_a_restart(tmp_path: Path, sim: MeterSimulator,
                                                                 pki: OperatorPki) -> None:
    dave = pki.operator("dave")
    old = pki.crl()
    pki.revoke(dave)
    new = pki.crl()

    async def main() -> None:
        harness = Harness(tmp_path, sim, pki)
        async with harness as h:
            report = await h.run(dave.sign(command(GW, "meter", "setpoint", 20)), new)
            assert report.reason == "revoked"
            report = await h.run(dave.sign(command(GW, "meter", "setpoint", 20)), old)  # older: ignored
            assert report.reason == "revoked"
        assert (tmp_path / CRL_FILE).read_bytes() == control.encode(new)
        async with harness as h:  # the agent restarts: the list it kept is loaded
            report = await h.run(dave.sign(command(GW, "meter", "setpoint", 20)), old)
            assert report.reason == "revoked"

    asyncio.run(main())
    assert sim.writes == []


def test_a_command_id_never_runs_twice_across_restarts(tmp_path: Path, sim: MeterSimulator, pki: OperatorPki) -> None:
    alice = pki.operator("alice")
    signed = alice.sign(command(GW, "meter", "setpoint", 22))

    async def main() -> None:
        harness = Harness(tmp_path, sim, pki)
        async with harness as h:
            first = await h.run(signed)
            assert (first.state, first.value) == ("done", 22.0)
        async with harness as h:
            assert await h.run(signed) == first  # the stored report, sent again
            # the same id in another document (re-signed with another value): not run either
            doc = control.read_doc(signed)
            other = alice.sign(control.Command(**{**{f: getattr(doc, f) for f in doc.__struct_fields__}, "value": 25}))
            assert await h.run(other) == first

    asyncio.run(main())
    assert [w.values for w in sim.writes] == [(220,)]


def test_a_redelivery_while_the_command_runs_is_not_run(tmp_path: Path, sim: MeterSimulator,
                                                        pki: OperatorPki) -> None:
    alice = pki.operator("alice")
    sim.write_delay[("holding", SETPOINT)] = 0.3
    signed = alice.sign(command(GW, "meter", "setpoint", 23))

    async def main() -> None:
        async with Harness(tmp_path, sim, pki) as h:
            h.deliver(signed)
            h.deliver(signed)  # sealed again by the collector: the seal is new, the id is not
            report = await h.report(control.read_doc(signed).id)  # type: ignore[union-attr]
            assert report.state == "done"
            assert h.plane.stats["redelivered_running"] == 1  # type: ignore[union-attr]

    asyncio.run(main())
    assert [w.values for w in sim.writes] == [(230,)]


def test_failures_on_the_bus_are_reported(tmp_path: Path, sim: MeterSimulator, pki: OperatorPki) -> None:
    alice = pki.operator("alice")
    sim.write_exceptions[("holding", SETPOINT)] = 3  # illegal data value

    async def main() -> None:
        async with Harness(tmp_path, sim, pki, timeout=0.3) as h:
            report = await h.run(alice.sign(command(GW, "meter", "setpoint", 21)))
            assert (report.state, report.reason) == ("failed", "modbus_exception_3")
            assert "exception 3 (illegal data value)" in report.detail
            sim.write_exceptions.clear()
            sim.write_delay[("holding", SETPOINT)] = 1.0  # longer than the bus timeout
            slow = alice.sign(command(GW, "meter", "setpoint", 22))
            h.deliver(slow)
            # queued behind the slow write, with a deadline that passes meanwhile
            late = alice.sign(command(GW, "meter", "relay_1", True, lifetime_s=0.15))
            h.deliver(late)
            report = await h.report(control.read_doc(slow).id)  # type: ignore[union-attr]
            assert (report.state, report.reason) == ("failed", "no_answer")
            assert "it may or may not have been written" in report.detail
            report = await h.report(control.read_doc(late).id)  # type: ignore[union-attr]
            assert (report.state, report.reason) == ("expired", "expired")
            assert "before the bus was free" in report.detail

    asyncio.run(main())
    assert [w.values for w in sim.writes] == [(220,)]  # the expired one never reached the device


def test_an_interrupted_command_is_reported_at_start(tmp_path: Path, sim: MeterSimulator, pki: OperatorPki) -> None:
    store = CommandStore(tmp_path / STORE_FILE, now_ms())
    store.start("d" * 32, "sha", now_ms() + 60_000, now_ms())
    store.close()

    async def main() -> None:
        async with Harness(tmp_path, sim, pki) as h:
            (report,) = h.reports  # sent when the link came up
            assert (report.id, report.state, report.reason) == ("d" * 32, "failed", "interrupted")

    asyncio.run(main())


def test_after_a_store_reset_older_commands_are_refused(tmp_path: Path, sim: MeterSimulator,
                                                        pki: OperatorPki) -> None:
    alice = pki.operator("alice")
    before = alice.sign(command(GW, "meter", "setpoint", 20, issued_ms=now_ms() - 1000))
    (tmp_path / STORE_FILE).write_bytes(b"not a database at all" * 100)

    async def main() -> None:
        async with Harness(tmp_path, sim, pki) as h:
            report = await h.run(before)
            assert (report.state, report.reason) == ("refused", "replayed")
            report = await h.run(alice.sign(command(GW, "meter", "setpoint", 20, issued_ms=now_ms() + 10)))
            assert report.state == "done"

    asyncio.run(main())


def test_configurations_go_to_the_hook_once_verified(tmp_path: Path, sim: MeterSimulator, pki: OperatorPki) -> None:
    erin, otto = pki.operator("erin", role="engineer"), pki.operator("otto", role="operator")
    got: list[tuple[ConfigDoc, list[str]]] = []

    def config(version: int) -> ConfigDoc:
        return ConfigDoc(gateway=GW, version=version, toml="x = 1\n", sha256=config_sha256("x = 1\n"),
                         issued_ms=now_ms(), deadline_ms=now_ms() + 60_000)

    async def main() -> None:
        async with Harness(tmp_path, sim, pki) as h:
            assert h.plane is not None
            h.plane.on_config = lambda doc, operators: got.append((doc, [o.name for o in operators]))
            h.deliver(erin.sign(config(7)))
            report = await h.run(otto.sign(config(8)))  # an operator may sign commands, not configurations
            assert (report.kind, report.id, report.state, report.reason) == ("config", "8", "refused", "role")

    asyncio.run(main())
    assert [(doc.version, names) for doc, names in got] == [(7, ["erin"])]


def test_bus_commands_wake_the_run_loop_and_are_bounded(sim: MeterSimulator) -> None:
    from edge_agent.modbus.bus import MAX_QUEUED_COMMANDS, BusCommand

    async def main() -> None:
        engine = lab_engine(sim.port)  # polled every 60 s: a command must not wait for that
        readings: list[Any] = []
        task = asyncio.create_task(engine.run(readings.extend))
        await asyncio.sleep(0)
        device = engine.devices[0]
        point = device.writes["setpoint"]
        started = time.monotonic()
        write = BusCommand(device, now_ms() + 5000, point, point.registers_for(12.5), 12.5)
        assert engine.submit(write)
        result = await write.result
        assert (result.state, result.value) == ("done", 12.5) and time.monotonic() - started < 1.0
        poll = BusCommand(device, now_ms() + 5000)
        assert engine.submit(poll)
        assert (await poll.result).state == "done"
        assert {r.measurement for r in readings} == {"electricity", "meter_setup"}  # emitted as a poll's
        assert next(r for r in readings if r.measurement == "meter_setup").fields["setpoint"] == 12.5
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        idle = lab_engine(sim.port)  # not running: the queue fills up to its bound
        assert all(idle.submit(BusCommand(idle.devices[0], 0)) for _ in range(MAX_QUEUED_COMMANDS))
        assert not idle.submit(BusCommand(idle.devices[0], 0))

    asyncio.run(main())


def test_a_failing_store_never_runs_a_command(tmp_path: Path, sim: MeterSimulator, pki: OperatorPki) -> None:
    alice = pki.operator("alice")

    async def main() -> None:
        async with Harness(tmp_path, sim, pki) as h:
            plane = h.plane
            assert plane is not None and plane._store is not None
            await asyncio.get_running_loop().run_in_executor(  # on the store's own thread: it fails from now on
                plane._executor, plane._store._conn.execute, "DROP TABLE commands")
            report = await h.run(alice.sign(command(GW, "meter", "setpoint", 20)))
            assert (report.state, report.reason) == ("failed", "store_failed")
            assert report.detail.startswith("not run: the command store failed")

    asyncio.run(main())
    assert sim.writes == []


def test_a_bus_stopped_while_it_writes_reports_the_command_interrupted(sim: MeterSimulator) -> None:
    """A live reconfiguration retires a bus (edge_agent/app.py Agent.reconfigure): a write in progress on it ends
    `failed: interrupted` (it may or may not have reached the device) instead of leaving its waiter for ever."""
    from edge_agent.modbus.bus import BusCommand

    async def main() -> None:
        engine = lab_engine(sim.port, timeout=5.0)
        task = asyncio.create_task(engine.run(lambda readings: None))
        device = engine.devices[0]
        point = device.writes["setpoint"]
        sim.write_delay[("holding", SETPOINT)] = 2.0  # the device takes its time to answer the write
        write = BusCommand(device, now_ms() + 10_000, point, point.registers_for(7.5), 7.5)
        assert engine.submit(write)
        while not sim.writes:  # the write reached the device: the bus is inside the transaction
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        result = await asyncio.wait_for(write.result, 1)
        assert (result.state, result.reason) == ("failed", "interrupted")
        assert "may or may not have happened" in result.detail

    try:
        asyncio.run(main())
    finally:
        sim.write_delay.clear()
