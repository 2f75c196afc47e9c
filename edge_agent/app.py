"""The agent's async shell: poll devices on their aligned schedules, batch, publish. No protocol logic here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_agent.modbus.bus import BusEngine, PolledDevice, PollOutcome
from edge_agent.modbus.devices import bus_engines
from edge_agent.schedule import next_aligned
from edge_agent.sequence import PersistentSequence
from edge_agent.serial.port import PortError
from edge_agent.serial.source import SerialSource
from edge_agent.uplink import UplinkBuffer
from wire import topics
from wire.cli import run_tasks_until
from wire.envelope import seal_plain
from wire.keys import collector_key_from_pem, identity_from_pem
from wire.logs import RateLimitedLog
from wire.mqttlink import MqttLink, Will
from wire.schema import Batch, Reading, encode_batch
from wire.seal import GatewaySealer
from wire.status import OFFLINE, ONLINE, encode_status

log = logging.getLogger("citynerve.agent")

AGENT_VERSION = "0.1.0"


@dataclass
class AgentStats:
    published_messages: int = 0
    published_readings: int = 0
    acked_messages: int = 0
    dropped_readings: int = 0


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.gateway_id = cfg.gateway.id
        self.stats = AgentStats()
        self.buffer = UplinkBuffer(cfg.uplink.max_buffered_readings, cfg.uplink.max_message_readings)
        state_dir = Path(cfg.gateway.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.sequence = PersistentSequence(state_dir / "sequence")
        self.buses = bus_engines(cfg)
        self.serial_sources = [SerialSource(d) for d in cfg.serial_devices]
        self.sealer = make_sealer(cfg)
        prefix = cfg.mqtt.topic_prefix
        self.up_topic = topics.up(prefix, self.gateway_id)
        self.status_topic = topics.status(prefix, self.gateway_id)
        self._errors = RateLimitedLog(log, interval=300)
        self._inflight: set[int] = set()
        self._inflight_changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started_ns = time.time_ns()
        self.link = MqttLink(
            cfg.mqtt,
            cfg.mqtt.client_id or f"citynerve-agent-{self.gateway_id}",
            will=Will(self.status_topic, encode_status(OFFLINE, gateway=self.gateway_id)),
            clean_start=True,
            on_connected=self._on_connected,
            on_published=self._on_published,
            max_inflight=self.INFLIGHT_WINDOW,
        )

    INFLIGHT_WINDOW = 20

    # -- MQTT callbacks (paho's thread) -------------------------------------------------------------------------

    def _on_connected(self, _session_present: bool) -> None:
        birth = encode_status(
            ONLINE, gateway=self.gateway_id, version=AGENT_VERSION, since_ns=self.started_ns,
            devices=len(self.cfg.devices), mqtt=self.link.protocol_name,
        )
        self.link.publish(self.status_topic, birth, qos=1, retain=True)

    def _on_published(self, mid: int) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._acked, mid)

    def _acked(self, mid: int) -> None:
        if mid in self._inflight:
            self._inflight.discard(mid)
            self.stats.acked_messages += 1
            self._inflight_changed.set()

    # -- tasks --------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        log.info(
            "agent %s starting: %d device(s) on %d bus(es), uplink %s:%d", self.gateway_id, len(self.cfg.devices),
            len(self.buses), self.cfg.mqtt.host, self.cfg.mqtt.port,
        )
        self.link.start()
        tasks = [asyncio.create_task(bus.run(self._enqueue), name=f"bus:{bus.bus.id}") for bus in self.buses]
        tasks += [asyncio.create_task(src.run(self._enqueue), name=f"serial:{src.device.id}")
                  for src in self.serial_sources]
        tasks.append(asyncio.create_task(self._publish_loop(), name="publish"))
        try:
            await run_tasks_until(stop, tasks)
        finally:
            await self._flush_on_exit()
            self.link.stop(final_message=(self.status_topic, encode_status(OFFLINE, gateway=self.gateway_id), 1, True))
            log.info(
                "agent stopped: %d messages published, %d readings, %d dropped",
                self.stats.published_messages, self.stats.published_readings, self.stats.dropped_readings,
            )

    def _enqueue(self, readings: list[Reading]) -> None:
        dropped = self.buffer.add(readings)
        if dropped:
            self.stats.dropped_readings += dropped
            self._errors.warning(
                "drop", "uplink buffer full (%d readings): dropped the %d oldest, %d dropped so far",
                self.buffer.max_readings, dropped, self.buffer.dropped_total,
            )

    async def _publish_loop(self) -> None:
        interval = float(self.cfg.uplink.publish_interval)
        while True:
            await asyncio.sleep(max(0.0, next_aligned(time.time(), interval) - time.time()))
            await self._drain()

    async def _drain(self) -> None:
        while len(self.buffer) and self.link.connected.is_set():
            while len(self._inflight) >= self.INFLIGHT_WINDOW:
                self._inflight_changed.clear()
                await self._inflight_changed.wait()
            readings = self.buffer.take()
            self._publish(readings)

    def _publish(self, readings: list[Reading]) -> None:
        batch = Batch(gateway=self.gateway_id, seq=self.sequence.next(), sent_ns=time.time_ns(), readings=readings)
        payload = self.sealer.seal(self.up_topic, encode_batch(batch)) if self.sealer else seal_plain(batch)
        info = self.link.publish(self.up_topic, payload, qos=1)
        self._inflight.add(info.mid)
        self.stats.published_messages += 1
        self.stats.published_readings += len(readings)

    async def _flush_on_exit(self, timeout: float = 3.0) -> None:
        """On a clean stop, hand what is buffered to the broker and wait briefly for its PUBACKs."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drain(), timeout)
        while self._inflight and time.monotonic() < deadline:
            self._inflight_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._inflight_changed.wait(), deadline - time.monotonic())
        if len(self.buffer) or self._inflight:
            log.warning(
                "stopping with %d readings not delivered (%d messages awaiting PUBACK)",
                len(self.buffer), len(self._inflight),
            )


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
