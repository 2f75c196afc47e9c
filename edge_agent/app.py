"""The agent's async shell: poll devices on their aligned schedules, commit each cycle to the durable outbox, send,
and delete what a collector acknowledged as stored. No protocol logic here: the outbox (edge_agent/outbox.py),
the send loop's state machine (edge_agent/delivery.py `Sender`) and the wire formats (wire/) are pure or thin.

One concurrency boundary (docs/architecture.md "Threads and loops"): everything here runs on the one event loop,
except
- paho's network thread: the MQTT callbacks below only hand the event to the loop (`_hand_over`);
- the "outbox" thread (a single-thread executor): every SQLite call, the encoding of a cycle's messages and the
  assignment of their sequence numbers, the one-time migration of the old sequence file; the loop keeps a copy
  of what it needs to know (`OutboxView`), taken on that thread after each call;
- the "commands" thread (edge_agent/control.py): the command store and the operator revocation list's file;
- the "mqtt-stop" thread, for the blocking disconnect at the end.
The tasks run under wire/supervise.py: one that dies ends the process (after the clean-shutdown commit).

`reconfigure(cfg)` applies a new configuration live (SIGHUP, a pushed remote configuration: edge_agent/
remote_config.py): what edge_agent/reconfig.py `plan` names is stopped and started, the rest keeps running, and
the outbox is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edge_agent import clock as clocks
from edge_agent import inventory, reconfig
from edge_agent.clock import ClockCorrection, Offset, boot_stamp, corrected, decode_held, encode_held, uncorrectable
from edge_agent.config import AgentConfig, LogSection
from edge_agent.control import ControlPlane
from edge_agent.delivery import Publish, ReadBodies, ScanBacklog, Sender
from edge_agent.modbus.bus import BusEngine, PolledDevice, PollOutcome
from edge_agent.modbus.devices import SUNSPEC_DISCOVERY, bus_engines
from edge_agent.outbox import Backlog, Dropped, Held, HeldGroup, NewMessage, Outbox
from edge_agent.profiles import load_profile
from edge_agent.schedule import next_aligned, phase
from edge_agent.sequence import migrate_legacy
from edge_agent.serial.port import PortError
from edge_agent.serial.source import SerialSource
from edge_agent.uplink import UplinkBuffer
from wire import ack, control, topics
from wire.cli import iso_ns, run_tasks_until
from wire.config import ConfigError
from wire.envelope import frame_plain
from wire.files import private_dir
from wire.keys import collector_key_from_pem, identity_from_pem, operator_ca_from_pem
from wire.logs import RateLimitedLog
from wire.mqttlink import MqttLink, Will
from wire.schema import Batch, Reading, encode_batch
from wire.seal import GatewaySealer, SealError
from wire.status import MAX_STATUS_BYTES, OFFLINE, ONLINE, encode_status
from wire.supervise import TaskSet
from wire.systemd import Service
from wire.version import VERSION

log = logging.getLogger("citynerve.agent")

AGENT_VERSION = VERSION  # the status heartbeat's `version`: the installed distribution's (wire/version.py)

# Per-device counters that mean "this poll (or part of it) failed".
_POLL_ERRORS = ("no_answer", "rejected", "decode_errors", "open_failures", "lost", "answer_errors")


@dataclass
class AgentStats:
    published_messages: int = 0
    acked_messages: int = 0  # covered by an end-to-end acknowledgement
    bad_acks: int = 0
    commit_failures: int = 0
    last_publish_ns: int | None = None
    last_ack_ns: int | None = None


@dataclass(frozen=True)
class OutboxView:
    """What the event loop knows of the outbox: a copy taken on the outbox's thread after each call."""

    backlog: Backlog = field(default_factory=Backlog)
    dropped_readings_total: int = 0
    resets: int = 0
    next_seq: int = 0
    held: Held = field(default_factory=Held)

    @classmethod
    def of(cls, outbox: Outbox) -> OutboxView:
        return cls(replace(outbox.backlog), outbox.dropped_readings_total, outbox.resets, outbox.next_seq,
                   replace(outbox.held))


def _profile_content(profile: str) -> Any:
    """What a device's profile is, for comparing configurations (edge_agent/reconfig.py `shape`)."""
    return None if profile == SUNSPEC_DISCOVERY else load_profile(profile)


MAX_HELD_REPORTS = 16  # reports made while the link is down, sent when it is back (the oldest dropped beyond)
MAX_SENT_TRACKED = 4096  # first-send boottimes kept for an acknowledgement's round trip (edge_agent/clock.py)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.gateway_id = cfg.gateway.id
        # The configuration that runs (docs/control.md "Remote configuration"): 0 = the local file. Set by
        # edge_agent/remote_config.py `RemoteConfig`, which owns every change of configuration.
        self.running_config_version = 0
        self.running_config_sha256 = ""
        self.config_control: Any = None  # the RemoteConfig, if any: told of acknowledgements and the link
        self.on_log_settings: Callable[[LogSection], None] | None = None  # the CLI's, honouring its overrides
        self.stats = AgentStats()
        up = cfg.uplink
        self.buffer = UplinkBuffer(up.max_buffered_readings, up.max_message_readings)
        state_dir = Path(cfg.gateway.state_dir)
        private_dir(state_dir)  # 0700 whatever the umask or the service manager's StateDirectoryMode
        self.state_dir = state_dir
        self.outbox: Outbox | None = None  # opened by run() on the outbox thread (its quick_check reads every page)
        self.box = OutboxView()  # the loop's copy of what the outbox holds
        self.sender = Sender(up.max_unacked_messages, float(up.ack_timeout), float(up.ack_timeout_max))
        self.shape = reconfig.shape(cfg, _profile_content)  # what runs, for the next reconfigure's plan
        self.buses = bus_engines(cfg)
        self.serial_sources = [SerialSource(d) for d in cfg.serial_devices]
        self.sealer = make_sealer(cfg)
        # Time without an RTC (edge_agent/clock.py): the clock's reads (replaced by labkit/fake_clock.py in tests)
        # and the pure decisions; readings held in RAM until the cycle's commit writes them to the outbox.
        self.clock = clocks.system
        c = cfg.clock
        self.correction = ClockCorrection(self.clock.boot_id(), hold=not c.rtc,
                                          from_acks=c.correct_from_acks and self.sealer is not None,
                                          max_ack_error_ns=int(float(c.max_ack_error) * 1e9))
        self.held_buffer: list[tuple[int, Reading]] = []  # bound: uplink.max_buffered_readings
        self._first_sent: dict[int, int] = {}  # seq -> boottime of its first send; bound: MAX_SENT_TRACKED
        self.control: ControlPlane | None = None
        self._set_topics(cfg)
        # Commands and configurations travel only sealed (the confidential downlink needs the gateway's session)
        self.control = make_control(cfg, self) if self.sealer is not None else None
        self._errors = RateLimitedLog(log, interval=300)
        self._db = ThreadPoolExecutor(1, thread_name_prefix="outbox")
        self._wake = asyncio.Event()  # set by every event the sender must see
        self.service = Service.from_env()  # READY, STATUS, STOPPING and the watchdog (wire/systemd.py)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cycle_beat: Callable[[], None] = _nothing
        self.started_ns = time.time_ns()
        self.started = time.monotonic()
        self.tasks = TaskSet()  # supervised (wire/supervise.py); buses and sources come and go with reconfigure
        self._source_tasks: dict[str, asyncio.Task[Any]] = {}  # "bus:<id>" / "serial:<id>" -> its task
        self._reconfiguring = asyncio.Lock()
        self._probe_wanted = False  # commit a message at the next cycle even without readings (edge_agent/confirm.py)
        self._connections = 0
        self._held_reports: list[control.Report] = []  # bound: MAX_HELD_REPORTS
        self.link = self._make_link(cfg)

    def _set_topics(self, cfg: AgentConfig) -> None:
        prefix = cfg.mqtt.topic_prefix
        self.up_topic = topics.up(prefix, self.gateway_id)
        self.status_topic = topics.status(prefix, self.gateway_id)
        self.ack_topic = topics.down(prefix, self.gateway_id, ack.KIND)
        self.report_topic = topics.report(prefix, self.gateway_id)
        self.control_topic = topics.down(prefix, self.gateway_id, control.KIND)
        if self.control is not None:
            self.control.topic = self.control_topic  # a new topic prefix (live reconfiguration)

    def _make_link(self, cfg: AgentConfig) -> MqttLink:
        """A link whose events reach the loop tagged with it: after a reconfiguration replaced it, a late event
        of the old one (paho's thread does not stop at once) is ignored."""
        link: MqttLink | None = None

        def on_connected(_session_present: bool) -> None:
            assert link is not None
            self._hand_over(self._link_up, link, link.broker_receive_maximum)

        def on_disconnected(_reason: str) -> None:
            self._hand_over(self._link_down, link)

        def on_published(mid: int) -> None:
            self._hand_over(self._pubacked, link, mid)

        def on_message(msg: paho.MQTTMessage) -> None:
            self._hand_over(self._message, link, msg.topic, bytes(msg.payload))

        link = MqttLink(
            cfg.mqtt,
            cfg.mqtt.client_id or f"citynerve-agent-{self.gateway_id}",
            will=Will(self.status_topic, encode_status(OFFLINE, gateway=self.gateway_id)),
            clean_start=True,
            on_connected=on_connected,
            on_disconnected=on_disconnected,
            on_published=on_published,
            on_message=on_message,
            max_inflight=0,  # no limit in paho: the sender paces the hand-over (edge_agent/delivery.py)
        )
        return link

    # -- MQTT callbacks (paho's thread): hand the event to the loop, nothing else ---------------------------------

    def _hand_over(self, handler: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return  # not running yet (or any more)
        with contextlib.suppress(RuntimeError):  # the loop closed under a late callback: nothing left to tell
            loop.call_soon_threadsafe(handler, *args)

    # -- event loop: the link and acknowledgements ----------------------------------------------------------------

    def _link_up(self, link: MqttLink, receive_maximum: int | None) -> None:
        if link is not self.link:
            return  # a link replaced by reconfigure
        self.link.subscribe([self.ack_topic] + ([self.control_topic] if self.control else []), qos=1)
        self.sender.link_changed(True, receive_maximum)
        self._publish_status()
        self._connections += 1
        held, self._held_reports = self._held_reports, []
        for report in held:
            self._publish_report(report)
        if self.control is not None:
            self.control.link_up()
        if self.config_control is not None:
            self.config_control.link_up(self._connections == 1)
        self._wake.set()

    def _link_down(self, link: MqttLink) -> None:
        if link is not self.link:
            return
        self.sender.link_changed(False)
        self._wake.set()

    def _pubacked(self, link: MqttLink, mid: int) -> None:
        if link is not self.link:
            return
        self.sender.pubacked(mid)
        self._wake.set()

    def _message(self, link: MqttLink, topic: str, payload: bytes) -> None:
        if link is self.link:
            self._downlink(topic, payload)

    def _downlink(self, topic: str, payload: bytes) -> None:
        if self.control is not None and topics.is_own_topic(self.control_topic, topic):
            self.control.received(payload)  # sealed for the topic as subscribed, whatever mount is in front
            return
        if not topics.is_own_topic(self.ack_topic, topic):
            return
        topic = self.ack_topic  # sealed for this one; mosquitto 2.0.11 leaves the listener's mount point in front
        try:
            if self.sealer is not None:
                # Age is not checked: replaying an acknowledgement deletes nothing that is not already deleted,
                # and a gateway clock that is off must not stop the outbox from draining.
                body = self.sealer.open_downlink(topic, payload, check_age=False)
            elif payload[:1] == bytes((ack.PLAIN_ACK,)):
                body = payload[1:]
            else:
                raise ack.AckError(f"format byte {payload[:1].hex() or 'missing'} at offset 0, expected "
                                   f"{ack.PLAIN_ACK:02x} (this gateway does not seal)")
            ranges = ack.decode_ack(body)
        except (SealError, ack.AckError) as exc:
            self.stats.bad_acks += 1
            self._errors.warning("bad_ack", "ignored an acknowledgement on %s: %s (%d so far)", topic, exc,
                                 self.stats.bad_acks, reason="bad_ack")
            return
        if self._first_sent:
            self._ack_offset(ranges)
        self.stats.acked_messages += self.sender.acked(ranges, time.monotonic())
        self.stats.last_ack_ns = time.time_ns()
        if self.config_control is not None:
            self.config_control.acked(ranges)
        self._wake.set()

    def _ack_offset(self, ranges: list[tuple[int, int]]) -> None:
        """The clock offset an authentic acknowledgement tells (edge_agent/clock.py): the collector's time when it
        sealed it (the sealer's clock-offset attribute, last_downlink_age), bounded by the round trip from the
        first send of the newest message it covers."""
        sent = [boot for seq, boot in self._first_sent.items() if any(a <= seq <= b for a, b in ranges)]
        for seq in [seq for seq in self._first_sent if any(a <= seq <= b for a, b in ranges)]:
            del self._first_sent[seq]
        age = self.sealer.last_downlink_age if self.sealer is not None else None
        if not sent or age is None:
            return
        now = self.clock.now()
        before = self.correction.offset
        offset = self.correction.acked(now.wall_ns - round(age * 1e9), max(sent), now.boot_ns)
        if offset is not None and before is None:
            log.info("clock offset learned from an acknowledgement: wall - boottime = %.3f s, +-%.0f ms (the "
                     "kernel clock is not synchronised)", offset.offset_ns / 1e9, offset.error_ns / 1e6)

    # -- time without an RTC (edge_agent/clock.py) -----------------------------------------------------------

    def _stamp(self, readings: list[Reading]) -> list[Reading]:
        """Readings to send now; those stamped while the clock is not synchronised are held (with their boottime)
        or restamped with this boot's known offset."""
        decision = self.correction.stamped(self.clock.synchronised())
        if decision is True:
            return readings
        now = self.clock.now()
        pairs = [(boot_stamp(r.time_ns, now), r) for r in readings]
        if isinstance(decision, Offset):
            return corrected(pairs, decision)
        self.held_buffer.extend(pairs)
        overflow = len(self.held_buffer) - self.buffer.max_readings
        if overflow > 0:
            del self.held_buffer[:overflow]
            self.buffer.dropped_total += overflow
        return []

    def _clock_cycle(self, batches: list[list[Reading]]) -> tuple[list[HeldGroup], dict[str, Offset | bool]]:
        """At a commit: learn the offset from the kernel if it is synchronised now; convert this cycle's held
        readings if the offset is known (into `batches`) or write them to the outbox; which held boots to release
        (converted, or sent as uncorrectable: an earlier boot's)."""
        c = self.correction
        if self.clock.synchronised():
            before = c.offset
            offset = c.synchronised(self.clock.now())
            if before is None or before.source != "ntp":
                log.info("the kernel clock is synchronised: wall - boottime = %.3f s; held readings of this boot "
                         "are converted", offset.offset_ns / 1e9)
        held, self.held_buffer = self.held_buffer, []
        hold: list[HeldGroup] = []
        mine = c.release(c.boot_id)
        if held and isinstance(mine, Offset):
            converted = corrected(held, mine)
            size = self.buffer.max_message_readings
            batches += [converted[i:i + size] for i in range(0, len(converted), size)]
            log.info("%d held reading(s) converted with the offset from %s", len(converted), mine.source)
        elif held:
            hold.append(HeldGroup(c.boot_id, len(held), encode_held(held)))
        release = {boot: what for boot in self.box.held.boots if (what := c.release(boot)) is not False}
        if c.from_acks and c.offset is None and (hold or self.box.held.rows):
            self._probe_wanted = True  # a message to acknowledge: its acknowledgement carries the collector's time
        return hold, release

    # -- reports (docs/control.md "Messages") ---------------------------------------------------------------------

    def send_report(self, report: control.Report) -> None:
        """A report on a command or configuration (wire/control.py), sealed like the uplink and published at QoS 1
        on <prefix>/<gw>/report. On the event loop. Made while the link is down, it is held (the newest
        MAX_HELD_REPORTS) and sent when the link is back - not left to paho, whose queue goes with a link that a
        live reconfiguration replaces; a report lost with the process is sent again when its document comes
        again."""
        if self.sender.link_up:
            self._publish_report(report)
            return
        self._held_reports.append(report)
        del self._held_reports[:-MAX_HELD_REPORTS]

    def _publish_report(self, report: control.Report) -> None:
        body = control.encode(report)
        payload = self.sealer.seal(self.report_topic, body) if self.sealer else frame_plain(body)
        info = self.link.publish(self.report_topic, payload, qos=1)
        mid = info.mid if info.rc == paho.MQTT_ERR_SUCCESS else None
        self.sender.published(None, mid, len(payload), time.monotonic())

    # -- tasks --------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        metrics = None
        if self.cfg.metrics is not None:  # bound first: a port in use is a one-line error before anything starts
            from edge_agent.metrics import server

            metrics = server(self)
            await metrics.start()
        await self._open_outbox()
        if self.control is not None:
            await self.control.open()
        b = self.box.backlog
        log.info(
            "agent %s starting: %d device(s) on %d bus(es), uplink %s:%d; outbox %s holds %d message(s), "
            "%d reading(s)%s", self.gateway_id, len(self.cfg.devices), len(self.buses), self.cfg.mqtt.host,
            self.cfg.mqtt.port, self.cfg.outbox_path, b.messages, b.readings,
            f" since {iso_ns(b.oldest_ns)}" if b.oldest_ns else "",
        )
        self.link.start()
        for bus in self.buses:
            self._start_source(f"bus:{bus.bus.id}", bus.run(self._enqueue))
        for src in self.serial_sources:
            self._start_source(f"serial:{src.device.id}", src.run(self._enqueue))
        self.tasks.add(self._cycle_loop(), "cycle")
        self.tasks.add(self._send_loop(), "send")
        self.tasks.add(self._heartbeat_loop(), "heartbeat")
        if self.config_control is not None:
            self.tasks.add(self.config_control.run(), "config")
        if metrics is not None:
            self.tasks.add(metrics.serve(), "metrics")
        # Ready: the outbox is open and every bus and serial source polls; connected or not (wire/systemd.py).
        # The watchdog's pings stop if the outbox thread does not answer for 2 minutes (an SD card that hangs
        # in fsync), or the cycle misses 3 rounds.
        self.service.watch_executor("outbox thread", self._db, allowed=120.0)
        self._cycle_beat = self.service.beacon("cycle", allowed=max(60.0, 3 * float(self.cfg.uplink.publish_interval)))
        if self.service.active:
            self.tasks.add(self.service.run(self.service_status), "systemd")
        self.service.ready(self.service_status())
        try:
            await run_tasks_until(stop, self.tasks)
        finally:
            self.service.stopping("stopping: committing what the cycle holds to the outbox")
            await self._shut_down()

    def _start_source(self, name: str, coro: Any) -> None:
        self._source_tasks[name] = self.tasks.add(coro, name)

    # -- live reconfiguration -----------------------------------------------------------------------------------

    async def reconfigure(self, new: AgentConfig) -> reconfig.Plan:
        """Apply `new` while running, without touching the outbox (edge_agent/reconfig.py decides what changes).

        Buses and serial sources whose configuration is unchanged keep running untouched; changed and removed
        ones are stopped (their transport closed) before new ones start; changed MQTT settings restart the link
        (the outbox and the send window stay; what was unacknowledged is sent again as after a reconnect);
        bounds are applied. Everything new is built before anything running is touched: ReconfigureFailed means
        nothing changed. Keys in reconfig.FIXED_KEYS need a restart (ReconfigureFailed)."""
        async with self._reconfiguring:
            key = reconfig.fixed_change(self.cfg, new)
            if key is not None:
                raise reconfig.ReconfigureFailed(f"{key}: changing it needs a restart of the agent")
            try:
                wanted = reconfig.shape(new, _profile_content)
                plan = reconfig.plan(self.shape, wanted)
                new_buses = bus_engines(new, only=set(plan.start_buses))
                new_sources = [SerialSource(d) for d in new.serial_devices if d.id in set(plan.start_serial)]
                link = self._make_link(new) if plan.restart_link else None
            except (ConfigError, LookupError, ValueError, OSError) as exc:
                raise reconfig.ReconfigureFailed(str(exc)) from None
            # From here on nothing is expected to fail; what does is a bug and ends the process (the supervisor),
            # which then starts on the last confirmed configuration.
            stop_buses, stop_serial = set(plan.stop_buses), set(plan.stop_serial)
            for engine in [e for e in self.buses if e.bus.id in stop_buses]:
                await self.tasks.retire(self._source_tasks.pop(f"bus:{engine.bus.id}"))  # closes its transport
            for source in [s for s in self.serial_sources if s.device.id in stop_serial]:
                await self.tasks.retire(self._source_tasks.pop(f"serial:{source.device.id}"))
                await source.stream.aclose()  # the port is really closed before another may open it
            self.buses = [e for e in self.buses if e.bus.id not in stop_buses]
            self.serial_sources = [s for s in self.serial_sources if s.device.id not in stop_serial]
            if link is not None:
                await self._replace_link(link, new)
            if plan.uplink:
                up = new.uplink
                self.buffer.max_readings, self.buffer.max_message_readings = (up.max_buffered_readings,
                                                                              up.max_message_readings)
                self.sender.set_limits(up.max_unacked_messages, float(up.ack_timeout), float(up.ack_timeout_max))
            if plan.outbox_bounds and self.outbox is not None:
                await self._db_call(self.outbox.set_bounds, int(new.outbox.max_size), float(new.outbox.max_age))
            if plan.log and self.on_log_settings is not None:
                self.on_log_settings(new.log)
            self.cfg, self.shape = new, wanted
            for engine in new_buses:
                self.buses.append(engine)
                self._start_source(f"bus:{engine.bus.id}", engine.run(self._enqueue))
            for source in new_sources:
                self.serial_sources.append(source)
                self._start_source(f"serial:{source.device.id}", source.run(self._enqueue))
            if self.control is not None:
                self.control.devices_changed(self.buses, [s.device.id for s in self.serial_sources])
            if self.sender.link_up:
                self._publish_status()  # the device list may have changed
            self._wake.set()
            log.info("configuration applied live: %s", plan.describe())
            return plan

    async def _replace_link(self, link: MqttLink, cfg: AgentConfig) -> None:
        """The old connection ends cleanly (its status says offline); the new one starts. Sequence numbers,
        outbox and window are the sender's and stay; paho's in-flight messages are sent again from the outbox."""
        old, old_status = self.link, self.status_topic
        self.link = link  # from now on the old link's events are ignored
        self._set_topics(cfg)
        self.sender.link_changed(False)
        await self._stop_link(old, (old_status, encode_status(OFFLINE, gateway=self.gateway_id), 1, True))
        link.start()
        log.info("MQTT link restarted for the new settings: %s:%d", cfg.mqtt.host, cfg.mqtt.port)

    async def _stop_link(self, link: MqttLink, final: tuple[str, bytes, int, bool] | None) -> None:
        stopper = ThreadPoolExecutor(1, thread_name_prefix="mqtt-stop")  # a blocking disconnect (≤ 2 s)
        try:
            await asyncio.get_running_loop().run_in_executor(stopper, functools.partial(link.stop, final_message=final))
        finally:
            stopper.shutdown(wait=False)

    def fresh_seq(self) -> int:
        """The sequence number of the next message committed: an acknowledgement of it or a later one proves the
        uplink as configured now (edge_agent/confirm.py)."""
        return self.box.next_seq

    def request_probe(self) -> None:
        """Commit a message at the next cycle even if no device delivered anything (an empty batch, which the
        collector stores as its per-message record and acknowledges): confirming a configuration must not
        depend on a device answering."""
        self._probe_wanted = True

    def uplink_problem(self) -> str:
        """Why nothing is acknowledged, as far as the agent can tell (for a rollback's report)."""
        m = self.cfg.mqtt
        if not self.link.connected.is_set():
            return f"MQTT broker {m.host}:{m.port}: {self.link.last_error or 'not connected'}"
        return (f"connected to MQTT broker {m.host}:{m.port}, but no collector acknowledged (collector, its "
                f"InfluxDB or the gateway's registration?)")

    async def _open_outbox(self) -> None:
        def open_outbox() -> Outbox:  # the outbox thread
            outbox = Outbox(self.cfg.outbox_path, int(self.cfg.outbox.max_size), float(self.cfg.outbox.max_age))
            try:
                before = outbox.next_seq
                migrated = migrate_legacy(self.state_dir, outbox)
            except BaseException:
                outbox.close()
                raise
            if migrated is not None:
                log.info("sequence file of an older agent folded into the outbox: the next message gets %d (the "
                         "file said %d, the outbox %d); the file is gone", outbox.next_seq, migrated, before)
            self.outbox = outbox  # before _db_call takes the loop's first view of it, on this thread
            return outbox

        self.outbox = await self._db_call(open_outbox)

    async def _shut_down(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.control is not None:
                with contextlib.suppress(Exception):
                    await self.control.close()
            if self.outbox is not None:
                with contextlib.suppress(Exception):
                    await self._commit_cycle()  # a clean stop loses nothing
                await loop.run_in_executor(self._db, self.outbox.close)
        finally:
            self._db.shutdown(wait=False)  # idle by now: its thread ends by itself
            if self.config_control is not None:
                self.config_control.close()
            await self._stop_link(self.link, (self.status_topic, encode_status(OFFLINE, gateway=self.gateway_id),
                                              1, True))
            self._loop = None
            b = self.box.backlog
            log.info(
                "agent stopped: %d messages published (%d sent again), %d acknowledged; %d message(s) with %d "
                "reading(s) wait in the outbox", self.stats.published_messages, self.sender.resent,
                self.stats.acked_messages, b.messages, b.readings,
            )

    async def _db_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the outbox thread; the loop's OutboxView is refreshed there, after the call, whatever
        its outcome (a failed commit is rolled back, a damaged file moved aside)."""

        def call() -> tuple[Any, BaseException | None, OutboxView | None]:
            try:
                result = fn(*args)
            except Exception as exc:
                return None, exc, self._view()
            return result, None, self._view()

        result, exc, view = await asyncio.get_running_loop().run_in_executor(self._db, call)
        if view is not None:
            self.box = view
        if exc is not None:
            raise exc
        return result

    def _view(self) -> OutboxView | None:  # the outbox thread
        return OutboxView.of(self.outbox) if self.outbox is not None else None

    def _enqueue(self, readings: list) -> None:
        if self.correction.hold:
            readings = self._stamp(readings)
            if not readings:
                return
        dropped = self.buffer.add(readings)
        if dropped:
            self._errors.warning(
                "drop", "cycle buffer full (%d readings, the outbox is not taking commits): dropped the %d oldest, "
                "%d dropped so far", self.buffer.max_readings, dropped, self.buffer.dropped_total,
                reason="buffer_full",
            )

    async def _cycle_loop(self) -> None:
        while True:
            interval = float(self.cfg.uplink.publish_interval)  # read each time: reconfigure may change it
            await asyncio.sleep(max(0.0, next_aligned(time.time(), interval, self._publish_phase()) - time.time()))
            await self._commit_cycle()
            self._cycle_beat()

    def _publish_phase(self) -> float:
        """Where in each interval this gateway publishes (edge_agent/schedule.py; read each time: reconfigure may
        turn the spread off or on)."""
        return phase(self.cfg.gateway.id) if self.cfg.uplink.publish_spread else 0.0

    async def _commit_cycle(self) -> None:
        """The cycle's readings become messages, committed with the deletions acknowledged since the last cycle in
        one transaction; then they are live and sent at once. Their sequence numbers are given on the outbox
        thread from the outbox's own counter, in the job that commits them (edge_agent/outbox.py)."""
        assert self.outbox is not None
        batches: list[list[Reading]] = []
        while len(self.buffer):
            batches.append(self.buffer.take())
        acked = self.sender.take_acked()
        hold: list[HeldGroup] = []
        release: dict[str, Offset | bool] = {}
        if self.correction.hold:
            hold, release = self._clock_cycle(batches)
        if not batches and self._probe_wanted:
            batches.append([])
        if not batches and not acked and not hold and not release:
            return
        try:
            messages, dropped, released = await self._db_call(
                _commit_job, self.outbox, self.gateway_id, batches, time.time_ns(), acked,
                hold, release, self.buffer.max_message_readings)
        except (sqlite3.DatabaseError, OSError) as exc:  # disk full, I/O error, read-only: retried next cycle
            for readings in reversed(batches):
                self.buffer.put_back(readings)
            for group in hold:  # (converted ones are in batches)
                self.held_buffer[:0] = decode_held(group.body)
            self.stats.commit_failures += 1
            self._errors.error("commit", "outbox commit failed (%s); %d reading(s) kept in RAM for the next cycle",
                               exc, len(self.buffer), reason="commit_failed")
            return
        except Exception:  # anything else is a bug: the task dies (wire/supervise.py), the readings stay for the
            for readings in reversed(batches):  # clean-shutdown commit
                self.buffer.put_back(readings)
            for group in hold:
                self.held_buffer[:0] = decode_held(group.body)
            raise
        for what, n in released.items():
            log.info("%d held reading(s) %s", n, what)
        if batches:
            self._probe_wanted = False
        self.sender.deleted(acked, dropped.seqs)
        if dropped.messages:
            self._errors.warning(
                "outbox_full", "outbox bound reached: dropped the %d oldest message(s) (%d readings; %d by age, "
                "%d by size), %d readings dropped since the outbox was created", dropped.messages, dropped.readings,
                dropped.by_age, dropped.by_size, self.box.dropped_readings_total, reason="outbox_dropped",
            )
        self.sender.committed([(m.seq, m.body) for m in messages])
        self._wake.set()

    async def _send_loop(self) -> None:
        """The shell of edge_agent/delivery.py `Sender`: perform the action it names, report the result."""
        sender = self.sender
        while True:
            self._wake.clear()  # before asking: an event from now on wakes the Wait below
            action = sender.next_action(time.monotonic())
            if isinstance(action, Publish):
                self._publish(action.seq, action.body)
                await asyncio.sleep(0)  # one message at a time: the loop serves the others in between
            elif isinstance(action, ScanBacklog):
                seqs = await self._db_call(self._outbox().seqs_after, action.after, action.limit)
                sender.scanned(seqs, action.limit)
            elif isinstance(action, ReadBodies):
                examined, found = await self._db_call(_read_bodies, self._outbox(), action.seqs, action.max_bytes)
                sender.bodies_read(examined, found)
            else:
                timeout = None if action.deadline is None else max(0.0, action.deadline - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    def _outbox(self) -> Outbox:
        assert self.outbox is not None
        return self.outbox

    def _publish(self, seq: int, body: bytes) -> None:
        if self.correction.from_acks and self.correction.offset is None:
            self._first_sent.setdefault(seq, self.clock.now().boot_ns)  # the round trip of its acknowledgement
            if len(self._first_sent) > MAX_SENT_TRACKED:
                del self._first_sent[next(iter(self._first_sent))]
        payload = self.sealer.seal(self.up_topic, body) if self.sealer else frame_plain(body)
        info = self.link.publish(self.up_topic, payload, qos=1)
        # Not handed over on this connection (it just went down): paho sends it at the next one.
        mid = info.mid if info.rc == paho.MQTT_ERR_SUCCESS else None
        self.sender.published(seq, mid, len(payload), time.monotonic())
        self.stats.published_messages += 1
        self.stats.last_publish_ns = time.time_ns()

    def _publish_status(self) -> None:
        payload = self.status()
        info = self.link.publish(self.status_topic, payload, qos=1, retain=True)
        mid = info.mid if info.rc == paho.MQTT_ERR_SUCCESS else None
        self.sender.published(None, mid, len(payload), time.monotonic())

    async def _heartbeat_loop(self) -> None:
        while True:
            interval = float(self.cfg.uplink.heartbeat_interval)
            await asyncio.sleep(max(0.0, next_aligned(time.time(), interval, self._publish_phase()) - time.time()))
            if self.sender.link_up:
                self._publish_status()

    # -- health -------------------------------------------------------------------------------------------------

    def service_status(self) -> str:
        """The line `systemctl status` shows (systemd STATUS=)."""
        b = self.box.backlog
        devices = sum(len(engine.devices) for engine in self.buses) + len(self.serial_sources)
        why = f" ({self.link.last_error})" if self.link.last_error else ""
        uplink = "connected" if self.sender.link_up else f"not connected{why}"
        return (f"polling {devices} device(s); uplink {uplink}; outbox: {b.messages} message(s) waiting for "
                f"an acknowledgement")

    def status(self) -> bytes:
        """The retained status with the health and inventory fields of wire/status.py (event loop: from the
        loop's own state)."""
        b = self.box.backlog
        details: dict[str, Any] = dict(
            gateway=self.gateway_id, version=AGENT_VERSION, since_ns=self.started_ns, time_ns=time.time_ns(),
            mqtt=self.link.protocol_name, backlog_messages=b.messages, backlog_readings=b.readings,
            backlog_bytes=b.bytes, backlog_oldest_ns=b.oldest_ns, oldest_unacked_seq=b.oldest_seq,
            next_seq=self.box.next_seq, last_publish_ns=self.stats.last_publish_ns,
            last_ack_ns=self.stats.last_ack_ns,
            dropped_readings=self.box.dropped_readings_total + self.buffer.dropped_total,
            resent_messages=self.sender.resent, outbox_resets=self.box.resets, devices=self.device_health(),
        )
        # The configuration it runs (remote configuration, docs/control.md): 0 and no hash for the local file.
        details["config_version"] = self.running_config_version
        if self.running_config_sha256:
            details["config_sha256"] = self.running_config_sha256
        where, source = inventory.location(self.cfg, self.serial_sources)
        if where is not None:
            details.update(location=where, location_source=source)
        details["inventory"] = inventory.devices(self.cfg, self.buses, self.serial_sources)
        payload = encode_status(ONLINE, **details)
        if len(payload) > MAX_STATUS_BYTES:
            # Thousands of devices: the collector would refuse the whole heartbeat. The inventory goes, the health
            # stays.
            del details["inventory"]
            self._errors.warning("status_size", "status of %d bytes is over the %d a collector takes: sent "
                                 "without the device inventory", len(payload), MAX_STATUS_BYTES,
                                 reason="status_too_large")
            payload = encode_status(ONLINE, **details)
        return payload

    def device_health(self) -> dict[str, dict[str, Any]]:
        health: dict[str, dict[str, Any]] = {}
        for engine in self.buses:
            for device in engine.devices:
                health[device.id] = _health(device.stats, device.stats["polls"], device.last_error,
                                            device.failures > 0)
        now = time.monotonic()
        for source in self.serial_sources:
            health[source.device.id] = _health(source.stats, source.stats["samples"], source.last_error,
                                               inventory.serial_failing(source, now, self.started))
        return health


def _nothing() -> None:
    return None


# Held readings released (converted or sent as uncorrectable) per commit at most: the rest at the next ones.
MAX_RELEASED_READINGS = 50_000


def _commit_job(outbox: Outbox, gateway: str, batches: list[list[Reading]], created_ns: int,
                acked: list[tuple[int, int]], hold: list[HeldGroup], release: dict[str, Offset | bool],
                max_message_readings: int) -> tuple[list[NewMessage], Dropped, dict[str, int]]:
    """(the outbox thread) Number the cycle's messages from the outbox's counter and commit them with the
    acknowledged deletions, the readings to hold and the held ones released (converted with their boot's offset,
    or flagged uncorrectable: edge_agent/clock.py), in one transaction. A failed commit advances nothing: the
    next cycle uses the same numbers (never published, since a cycle is sent only once committed)."""
    batches = list(batches)
    released_ids: list[int] = []
    released: dict[str, int] = {}
    count = 0
    for row_id, boot, body in outbox.held_groups(release):
        if count >= MAX_RELEASED_READINGS:
            break
        pairs = decode_held(body)
        what = release[boot]
        if isinstance(what, Offset):
            out, how = corrected(pairs, what), f"converted with the offset from {what.source}"
        else:
            out, how = uncorrectable(pairs), f"of the earlier boot {boot} sent as uncorrectable"
        batches += [out[i:i + max_message_readings] for i in range(0, len(out), max_message_readings)]
        released_ids.append(row_id)
        released[how] = released.get(how, 0) + len(pairs)
        count += len(pairs)
    messages: list[NewMessage] = []
    for i, readings in enumerate(batches):
        seq = outbox.next_seq + i
        # One nanosecond apart: the collector's per-message record is stamped with this time, so the
        # messages of one cycle must not share it (they would overwrite each other's record).
        made_ns = created_ns + i
        body = encode_batch(Batch(gateway=gateway, seq=seq, sent_ns=made_ns, readings=readings))
        messages.append(NewMessage(seq, made_ns, len(readings), body))
    return messages, outbox.commit(messages, acked, hold, released_ids), released


def _read_bodies(outbox: Outbox, seqs: tuple[int, ...], max_bytes: int) -> tuple[list[int], list[tuple[int, bytes]]]:
    """(the outbox thread) Bodies of `seqs` in order until `max_bytes` are read: (seqs examined, (seq, body) of
    those still held). One message at a time, so RAM holds at most max_bytes plus one message."""
    examined: list[int] = []
    found: list[tuple[int, bytes]] = []
    size = 0
    for seq in seqs:
        if examined and size >= max_bytes:
            break
        examined.append(seq)
        for got in outbox.bodies([seq]):
            found.append(got)
            size += len(got[1])
    return examined, found


def poll_errors(stats: Any) -> dict[str, int]:
    """A device's counters that mean a poll (or part of it) failed, by kind (the heartbeat and the metrics)."""
    return {key: n for key, n in stats.items()
            if n and (key in _POLL_ERRORS or key.startswith(("exception_", "rejected")))}


def _health(stats: Any, polls: int, last_error: str, failing: bool = False) -> dict[str, Any]:
    return {"polls": polls, "errors": sum(poll_errors(stats).values()), "last_error": last_error[:200],
            "failing": failing}


def make_sealer(cfg: AgentConfig) -> GatewaySealer | None:
    sec = cfg.security
    if sec is None:
        log.warning("uplink is NOT sealed: add a [security] section (docs/enrollment.md) so that the broker "
                    "and networks can neither read nor forge readings")
        return None
    return GatewaySealer(
        cfg.gateway.id,
        identity_from_pem(Path(sec.identity_key).read_bytes()),
        collector_key_from_pem(Path(sec.collector_key).read_bytes()),
        rotate_after_messages=sec.rotate_after_messages,
        rotate_after_seconds=float(sec.rotate_after),
    )


def make_control(cfg: AgentConfig, agent: Agent) -> ControlPlane:
    sec = cfg.security
    assert sec is not None and agent.sealer is not None
    return ControlPlane(
        gateway=agent.gateway_id, topic=agent.control_topic, sealer=agent.sealer,
        operator_ca=operator_ca_from_pem(Path(sec.operator_ca).read_bytes()) if sec.operator_ca else None,
        engines=agent.buses, serial_ids=[d.id for d in cfg.serial_devices], state_dir=agent.state_dir,
        send_report=agent.send_report,
    )


async def poll_once(cfg: AgentConfig) -> list[PollOutcome]:
    """Poll every device once, buses concurrently, devices on one bus one after the other."""

    async def one_bus(engine: BusEngine) -> list[PollOutcome]:
        try:
            if not await engine.open_once():
                return [PollOutcome(d, [], engine.last_open_error) for d in engine.devices]
            return [await engine.poll(device) for device in engine.devices]
        finally:
            await engine.transport.close()

    async def one_serial(source: SerialSource) -> list[PollOutcome]:
        device = PolledDevice(source.device.id, 0, float(source.device.interval), [], {})
        try:
            readings = await source.once(timeout=max(5.0, 2 * float(source.device.interval)))
        except PortError as exc:
            return [PollOutcome(device, [], str(exc))]
        return [PollOutcome(device, readings, "" if readings else
                            f"no complete {source.info.name} frame from {source.device.port} "
                            f"({', '.join(f'{k}={v}' for k, v in source.stats.items()) or 'nothing received'})")]

    results = await asyncio.gather(*(one_bus(engine) for engine in bus_engines(cfg)),
                                   *(one_serial(SerialSource(d)) for d in cfg.serial_devices))
    return [outcome for per_bus in results for outcome in per_bus]


def state_dir_problem(path: str) -> str | None:
    """Why the agent could not keep its state in `path`, or None."""
    p = Path(path)
    probe = p if p.exists() else p.parent
    if not os.access(probe, os.W_OK):
        return f"{path} is not writable by this user"
    return None
