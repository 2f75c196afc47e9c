"""The agent's async shell: poll devices on their aligned schedules, batch, publish. No protocol logic here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_agent.modbus.poller import ModbusTcpPoller, PollError
from edge_agent.profiles import load_profile
from edge_agent.schedule import next_aligned, skipped_deadlines
from edge_agent.sequence import PersistentSequence
from edge_agent.uplink import UplinkBuffer
from wire import topics
from wire.cli import run_tasks_until
from wire.envelope import seal_plain
from wire.logs import RateLimitedLog
from wire.mqttlink import MqttLink, Will
from wire.schema import Batch, Reading
from wire.status import OFFLINE, ONLINE, encode_status

log = logging.getLogger("citynerve.agent")

AGENT_VERSION = "0.1.0"


@dataclass
class DeviceStats:
    polls: int = 0
    errors: int = 0
    overruns: int = 0
    last_error: str = ""


@dataclass
class AgentStats:
    published_messages: int = 0
    published_readings: int = 0
    acked_messages: int = 0
    dropped_readings: int = 0
    devices: dict[str, DeviceStats] = field(default_factory=dict)


def make_pollers(cfg: AgentConfig) -> list[ModbusTcpPoller]:
    return [ModbusTcpPoller(device, load_profile(device.profile)) for device in cfg.devices]


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.gateway_id = cfg.gateway.id
        self.stats = AgentStats()
        self.buffer = UplinkBuffer(cfg.uplink.max_buffered_readings, cfg.uplink.max_message_readings)
        state_dir = Path(cfg.gateway.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.sequence = PersistentSequence(state_dir / "sequence")
        self.pollers = make_pollers(cfg)
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
            devices=len(self.pollers), mqtt=self.link.protocol_name,
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
            "agent %s starting: %d device(s), uplink %s:%d", self.gateway_id, len(self.pollers),
            self.cfg.mqtt.host, self.cfg.mqtt.port,
        )
        self.link.start()
        tasks = [asyncio.create_task(self._poll_loop(p), name=f"poll:{p.device.id}") for p in self.pollers]
        tasks.append(asyncio.create_task(self._publish_loop(), name="publish"))
        try:
            await run_tasks_until(stop, tasks)
        finally:
            await self._flush_on_exit()
            for poller in self.pollers:
                with contextlib.suppress(Exception):
                    await poller.close()
            self.link.stop(final_message=(self.status_topic, encode_status(OFFLINE, gateway=self.gateway_id), 1, True))
            log.info(
                "agent stopped: %d messages published, %d readings, %d dropped",
                self.stats.published_messages, self.stats.published_readings, self.stats.dropped_readings,
            )

    async def _poll_loop(self, poller: ModbusTcpPoller) -> None:
        device = poller.device
        stats = self.stats.devices.setdefault(device.id, DeviceStats())
        interval = float(device.interval)
        deadline = next_aligned(time.time(), interval)
        while True:
            await asyncio.sleep(max(0.0, deadline - time.time()))
            try:
                readings = await poller.poll()
            except PollError as exc:
                stats.errors += 1
                stats.last_error = str(exc)
                self._errors.warning(("poll", device.id), "poll of device %s failed: %s", device.id, exc.message,
                                     device=device.id)
                readings = []
            except Exception:  # a bug in decoding must not stop this device or any other
                stats.errors += 1
                log.exception("unexpected error polling device %s", device.id, extra={"device": device.id})
                readings = []
            stats.polls += 1
            if readings:
                self._enqueue(readings)
            now = time.time()
            skipped = skipped_deadlines(deadline, now, interval)
            if skipped:
                stats.overruns += skipped
                self._errors.warning(
                    ("overrun", device.id), "device %s cannot keep its %.3gs interval: poll took %.2fs",
                    device.id, interval, now - deadline, device=device.id,
                )
            deadline = next_aligned(now, interval)

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
        info = self.link.publish(self.up_topic, seal_plain(batch), qos=1)
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


async def poll_once(cfg: AgentConfig) -> list[tuple[str, list[Reading] | PollError]]:
    """Poll every device once, concurrently; for `edge-agent poll-once`."""
    pollers = make_pollers(cfg)

    async def one(poller: ModbusTcpPoller) -> tuple[str, list[Reading] | PollError]:
        try:
            return poller.device.id, await poller.poll()
        except PollError as exc:
            return poller.device.id, exc
        finally:
            with contextlib.suppress(Exception):
                await poller.close()

    return list(await asyncio.gather(*(one(p) for p in pollers)))


def state_dir_problem(path: str) -> str | None:
    """Why the agent could not keep its state in `path`, or None."""
    p = Path(path)
    probe = p if p.exists() else p.parent
    if not os.access(probe, os.W_OK):
        return f"{path} is not writable by this user"
    return None
