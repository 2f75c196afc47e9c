"""The agent's async shell: poll devices on their aligned schedules, commit each cycle to the durable outbox, send,
and delete what a collector acknowledged as stored. No protocol logic here: the outbox (edge_agent/outbox.py),
the delivery rules (edge_agent/delivery.py) and the wire formats (wire/) are pure or thin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edge_agent.config import AgentConfig
from edge_agent.delivery import Delivery
from edge_agent.modbus.bus import BusEngine, PolledDevice, PollOutcome
from edge_agent.modbus.devices import bus_engines
from edge_agent.outbox import NewMessage, Outbox
from edge_agent.schedule import next_aligned
from edge_agent.sequence import PersistentSequence
from edge_agent.serial.port import PortError
from edge_agent.serial.source import SerialSource
from edge_agent.uplink import UplinkBuffer
from wire import ack, topics
from wire.cli import iso_ns, run_tasks_until
from wire.envelope import frame_plain
from wire.files import private_dir
from wire.keys import collector_key_from_pem, identity_from_pem
from wire.logs import RateLimitedLog
from wire.mqttlink import MqttLink, Will
from wire.schema import Batch, encode_batch
from wire.seal import GatewaySealer, SealError
from wire.status import OFFLINE, ONLINE, encode_status

log = logging.getLogger("citynerve.agent")

AGENT_VERSION = "0.2.0"

# Per-device counters that mean "this poll (or part of it) failed".
_POLL_ERRORS = ("no_answer", "rejected", "decode_errors", "open_failures", "lost")


@dataclass
class AgentStats:
    published_messages: int = 0
    acked_messages: int = 0  # covered by an end-to-end acknowledgement
    bad_acks: int = 0
    commit_failures: int = 0
    last_publish_ns: int | None = None
    last_ack_ns: int | None = None


class Agent:
    INFLIGHT_WINDOW = 20  # messages handed to paho and not yet PUBACKed: keeps paho's RAM queue short

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.gateway_id = cfg.gateway.id
        self.stats = AgentStats()
        up = cfg.uplink
        self.buffer = UplinkBuffer(up.max_buffered_readings, up.max_message_readings)
        state_dir = Path(cfg.gateway.state_dir)
        private_dir(state_dir)  # 0700 whatever the umask or the service manager's StateDirectoryMode
        self.outbox = Outbox(cfg.outbox_path, int(cfg.outbox.max_size), float(cfg.outbox.max_age))
        self.sequence = PersistentSequence(state_dir / "sequence")
        if self.outbox.backlog.newest_seq is not None:  # a sequence file lost or restored from an old image
            self.sequence.at_least(self.outbox.backlog.newest_seq + 1)
        self.delivery = Delivery(up.max_unacked_messages, float(up.ack_timeout), float(up.ack_timeout_max))
        self.buses = bus_engines(cfg)
        self.serial_sources = [SerialSource(d) for d in cfg.serial_devices]
        self.sealer = make_sealer(cfg)
        prefix = cfg.mqtt.topic_prefix
        self.up_topic = topics.up(prefix, self.gateway_id)
        self.status_topic = topics.status(prefix, self.gateway_id)
        self.ack_topic = topics.down(prefix, self.gateway_id, ack.KIND)
        self._errors = RateLimitedLog(log, interval=300)
        self._db = ThreadPoolExecutor(1, thread_name_prefix="outbox")
        self._live_bodies: dict[int, bytes] = {}
        self._inflight: set[int] = set()
        self._inflight_changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_ns = time.time_ns()
        self.link = MqttLink(
            cfg.mqtt,
            cfg.mqtt.client_id or f"citynerve-agent-{self.gateway_id}",
            will=Will(self.status_topic, encode_status(OFFLINE, gateway=self.gateway_id)),
            clean_start=True,
            on_connected=self._on_connected,
            on_published=self._on_published,
            on_message=self._on_message,
            max_inflight=self.INFLIGHT_WINDOW,
        )

    # -- MQTT callbacks (paho's thread) -------------------------------------------------------------------------

    def _on_connected(self, _session_present: bool) -> None:
        self.link.subscribe([self.ack_topic], qos=1)
        self.link.publish(self.status_topic, self.status(), qos=1, retain=True)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _on_published(self, mid: int) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._pubacked, mid)

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._downlink, msg.topic, bytes(msg.payload))

    # -- event loop: acknowledgements -----------------------------------------------------------------------------

    def _pubacked(self, mid: int) -> None:
        if mid in self._inflight:
            self._inflight.discard(mid)
            self._inflight_changed.set()

    def _downlink(self, topic: str, payload: bytes) -> None:
        if topic != self.ack_topic:
            return
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
        self.stats.acked_messages += self.delivery.acked(ranges, time.monotonic())
        self.stats.last_ack_ns = time.time_ns()
        self._wake.set()

    # -- tasks --------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        b = self.outbox.backlog
        log.info(
            "agent %s starting: %d device(s) on %d bus(es), uplink %s:%d; outbox %s holds %d message(s), "
            "%d reading(s)%s", self.gateway_id, len(self.cfg.devices), len(self.buses), self.cfg.mqtt.host,
            self.cfg.mqtt.port, self.outbox.path, b.messages, b.readings,
            f" since {iso_ns(b.oldest_ns)}" if b.oldest_ns else "",
        )
        self.link.start()
        tasks = [asyncio.create_task(bus.run(self._enqueue), name=f"bus:{bus.bus.id}") for bus in self.buses]
        tasks += [asyncio.create_task(src.run(self._enqueue), name=f"serial:{src.device.id}")
                  for src in self.serial_sources]
        tasks += [asyncio.create_task(self._cycle_loop(), name="cycle"),
                  asyncio.create_task(self._send_loop(), name="send"),
                  asyncio.create_task(self._heartbeat_loop(), name="heartbeat")]
        try:
            await run_tasks_until(stop, tasks)
        finally:
            with contextlib.suppress(Exception):
                await self._commit_cycle()  # a clean stop loses nothing
            await asyncio.get_running_loop().run_in_executor(self._db, self.outbox.close)
            self._db.shutdown(wait=True)
            self.link.stop(final_message=(self.status_topic, encode_status(OFFLINE, gateway=self.gateway_id), 1, True))
            b = self.outbox.backlog
            log.info(
                "agent stopped: %d messages published (%d sent again), %d acknowledged; %d message(s) with %d "
                "reading(s) wait in the outbox", self.stats.published_messages, self.delivery.resent,
                self.stats.acked_messages, b.messages, b.readings,
            )

    def _enqueue(self, readings: list) -> None:
        dropped = self.buffer.add(readings)
        if dropped:
            self._errors.warning(
                "drop", "cycle buffer full (%d readings, the outbox is not taking commits): dropped the %d oldest, "
                "%d dropped so far", self.buffer.max_readings, dropped, self.buffer.dropped_total,
                reason="buffer_full",
            )

    async def _cycle_loop(self) -> None:
        interval = float(self.cfg.uplink.publish_interval)
        while True:
            await asyncio.sleep(max(0.0, next_aligned(time.time(), interval) - time.time()))
            await self._commit_cycle()

    async def _commit_cycle(self) -> None:
        """The cycle's readings become messages, committed with the deletions acknowledged since the last cycle in
        one transaction; then they are live and sent at once."""
        created_ns = time.time_ns()
        messages: list[NewMessage] = []
        taken = []
        while len(self.buffer):
            readings = self.buffer.take()
            taken.append(readings)
            seq = self.sequence.next()
            # One nanosecond apart: the collector's per-message record is stamped with this time, so the
            # messages of one cycle must not share it (they would overwrite each other's record).
            made_ns = created_ns + len(messages)
            body = encode_batch(Batch(gateway=self.gateway_id, seq=seq, sent_ns=made_ns, readings=readings))
            messages.append(NewMessage(seq, made_ns, len(readings), body))
        acked = self.delivery.take_acked()
        if not messages and not acked:
            return
        loop = asyncio.get_running_loop()
        try:
            dropped = await loop.run_in_executor(self._db, self.outbox.commit, messages, acked)
        except Exception as exc:  # disk full, read-only file system: keep the readings for the next cycle
            for readings in reversed(taken):
                self.buffer.put_back(readings)
            self.stats.commit_failures += 1
            self._errors.error("commit", "outbox commit failed (%s); %d reading(s) kept in RAM for the next cycle",
                               exc, len(self.buffer), reason="commit_failed")
            return
        self.delivery.acked_deleted(acked)
        if dropped.messages:
            self.delivery.forget_ranges(dropped.seqs)
            self._errors.warning(
                "outbox_full", "outbox bound reached: dropped the %d oldest message(s) (%d readings; %d by age, "
                "%d by size), %d readings dropped since the outbox was created", dropped.messages, dropped.readings,
                dropped.by_age, dropped.by_size, self.outbox.dropped_readings_total, reason="outbox_dropped",
            )
        if messages and self.link.connected.is_set():
            # Offline, they are simply backlog: not kept in RAM, read back from the outbox when the link is up.
            for m in messages:
                self._live_bodies[m.seq] = m.body
            self.delivery.committed(m.seq for m in messages)
        self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            self._wake.clear()
            if self.link.connected.is_set():
                await self._send_due()
            else:  # offline, live messages are backlog like the others: read back from the outbox when sent
                self._live_bodies.clear()
                self.delivery.unsent(self.delivery.take_live())
            delay = 1.0
            expiry = self.delivery.next_expiry()
            if expiry is not None:
                delay = min(delay, max(0.01, expiry - time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _send_due(self) -> None:
        d = self.delivery
        d.expire(time.monotonic())
        bodies, self._live_bodies = self._live_bodies, {}
        live = [(seq, bodies[seq]) for seq in d.take_live() if seq in bodies]  # none while probing
        if not await self._publish(live):
            self._live_bodies.clear()
            return
        budget = d.budget
        if not budget:
            return
        loop = asyncio.get_running_loop()
        scan = budget + min(d.skippable, 50_000) + 16  # the seqs the scan passes over must not use it up
        backlog = await loop.run_in_executor(self._db, self.outbox.seqs_after, d.cursor, scan)
        chosen = d.choose(backlog, budget)
        if not chosen:
            return
        # Read back a few at a time: the window may be 200 messages of megabytes each, RAM holds a slice.
        for start in range(0, len(chosen), self.INFLIGHT_WINDOW):
            some = chosen[start:start + self.INFLIGHT_WINDOW]
            found = await loop.run_in_executor(self._db, self.outbox.bodies, some)
            if len(found) < len(some):
                d.forget(set(some) - {seq for seq, _ in found})
            if not await self._publish(found):
                d.unsent(chosen[start + len(some):])
                return
        if len(chosen) == budget:
            self._wake.set()  # more may be due as soon as acknowledgements free the window

    async def _publish(self, messages: list[tuple[int, bytes]]) -> bool:
        """Hand messages to the broker, at most INFLIGHT_WINDOW awaiting PUBACK; False if the link went down
        (what was not handed over is due again)."""
        for index, (seq, body) in enumerate(messages):
            while len(self._inflight) >= self.INFLIGHT_WINDOW:
                if not self.link.connected.is_set():
                    self._inflight.clear()  # no PUBACK will come on a dead connection
                    self.delivery.unsent(s for s, _ in messages[index:])
                    return False
                self._inflight_changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._inflight_changed.wait(), 1.0)
            payload = self.sealer.seal(self.up_topic, body) if self.sealer else frame_plain(body)
            info = self.link.publish(self.up_topic, payload, qos=1)
            self._inflight.add(info.mid)
            self.delivery.sent((seq,), time.monotonic())
            self.stats.published_messages += 1
            self.stats.last_publish_ns = time.time_ns()
        return True

    async def _heartbeat_loop(self) -> None:
        interval = float(self.cfg.uplink.heartbeat_interval)
        while True:
            await asyncio.sleep(max(0.0, next_aligned(time.time(), interval) - time.time()))
            if self.link.connected.is_set():
                self.link.publish(self.status_topic, self.status(), qos=1, retain=True)

    # -- health -------------------------------------------------------------------------------------------------

    def status(self) -> bytes:
        """The retained status with the health fields of wire/status.py."""
        b = self.outbox.backlog
        return encode_status(
            ONLINE, gateway=self.gateway_id, version=AGENT_VERSION, since_ns=self.started_ns, time_ns=time.time_ns(),
            mqtt=self.link.protocol_name, backlog_messages=b.messages, backlog_readings=b.readings,
            backlog_bytes=b.bytes, backlog_oldest_ns=b.oldest_ns, oldest_unacked_seq=b.oldest_seq,
            next_seq=self.sequence.peek, last_publish_ns=self.stats.last_publish_ns,
            last_ack_ns=self.stats.last_ack_ns,
            dropped_readings=self.outbox.dropped_readings_total + self.buffer.dropped_total,
            resent_messages=self.delivery.resent, outbox_resets=self.outbox.resets, devices=self.device_health(),
        )

    def device_health(self) -> dict[str, dict[str, Any]]:
        health: dict[str, dict[str, Any]] = {}
        for engine in self.buses:
            for device in engine.devices:
                health[device.id] = _health(device.stats, device.stats["polls"], device.last_error)
        for source in self.serial_sources:
            health[source.device.id] = _health(source.stats, source.stats["samples"], source.last_error)
        return health


def _health(stats: Any, polls: int, last_error: str) -> dict[str, Any]:
    errors = sum(n for key, n in stats.items() if key in _POLL_ERRORS or key.startswith(("exception_", "rejected")))
    return {"polls": polls, "errors": errors, "last_error": last_error[:200]}


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
