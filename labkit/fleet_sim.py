"""Simulated enrolled gateways for the fleet benchmark (bench/fleet.py): many on one asyncio loop, each what an
edge-agent is on the wire.

Each `SimGateway` has
- its own mutual-TLS MQTT 5 connection (labkit.lean_mqtt: CONNECT, SUBSCRIBE to its down/ack, PUBLISH QoS 1),
  reconnecting after a loss with the agent's jittered backoff (wire.mqttlink.reconnect_delay) and the agent's
  connect timeout;
- its own sealing session (wire.seal.GatewaySealer, built from its enrolled identity key as the agent does);
- the agent's own send loop: edge_agent.delivery.Sender decides what to publish, when to send again and how many
  may be outstanding; this shell performs its actions against an outbox in RAM (the agent's is SQLite);
- meter readings as the agent produces them: `devices` meters polled every `poll_interval` on wall-clock-
  aligned deadlines, each reading stamped when its poll's answer arrived (a fixed bus position per device plus
  a few ms of jitter, in ns), committed as one wire.schema.Batch per `publish_interval` at the gateway's
  deadline as edge_agent.schedule gives it to the agent (aligned, offset by the gateway's phase unless
  `publish_spread` is off);
- the retained status heartbeat (wire.status) at connect and every `heartbeat_interval`, at the same phase.

What it records per message: commit time, first publish, sends, the broker's PUBACK and the end-to-end
acknowledgement (opened with its sealer), in RAM, reported as JSON by `Fleet.report()`.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from edge_agent.config import UplinkSection
from edge_agent.delivery import Publish, ReadBodies, ScanBacklog, Sender, Wait
from edge_agent.modbus.decode import shortest
from edge_agent.schedule import next_aligned, phase
from labkit.lean_mqtt import LeanConnection, Packet, client_context, connect
from wire import ack, topics
from wire.keys import collector_key_from_pem, identity_from_pem
from wire.mqttlink import MqttSettings, reconnect_delay
from wire.schema import Batch, Reading, encode_batch
from wire.seal import GatewaySealer, SealError
from wire.status import ONLINE, encode_status

PREFIX = topics.DEFAULT_PREFIX
MEASUREMENT = "meter"
# Ten values of a three-phase energy meter, as an SDM630-class profile reads them (float32 registers).
FIELDS = ("voltage_l1", "voltage_l2", "voltage_l3", "current_l1", "current_l2", "current_l3", "power_total",
          "energy_import", "frequency", "power_factor")


_UPLINK = UplinkSection()  # the agent's defaults, which the simulated gateways keep unless told otherwise
_MQTT = {f.name: f.default for f in msgspec.structs.fields(MqttSettings)}


@dataclass(frozen=True)
class SimSpec:
    """How every simulated gateway behaves (the agent's defaults where it has one)."""

    host: str
    port: int
    ca_file: str
    collector_pub: str
    devices: int = 3
    poll_interval: float = 1.0
    publish_interval: float = 10.0
    heartbeat_interval: float = float(_UPLINK.heartbeat_interval)
    keepalive: int = int(_MQTT["keepalive"])
    connect_timeout: float = float(_MQTT["connect_timeout"])
    reconnect_min: float = float(_MQTT["reconnect_min"])
    reconnect_max: float = float(_MQTT["reconnect_max"])
    window: int = _UPLINK.max_unacked_messages
    ack_timeout: float = float(_UPLINK.ack_timeout)
    ack_timeout_max: float = float(_UPLINK.ack_timeout_max)
    jitter: bool = True  # False: paho's own backoff (min, 2 x min, ...), for the comparison
    # Each gateway publishes at its own phase within the interval (edge_agent.schedule, as the agent does by
    # default); False: every gateway at the aligned deadline, for the comparison.
    publish_spread: bool = _UPLINK.publish_spread


def _f32(value: float) -> float:
    """What the agent's register decoder makes of a float32 register holding `value`: the float32's shortest
    decimal (edge_agent.modbus.decode.shortest)."""
    return shortest(struct.unpack("<f", struct.pack("<f", value))[0], "f")


class Meters:
    """A gateway's meters as the agent reads them: `devices` meters polled every `poll_interval` on wall-clock-
    aligned deadlines, each reading stamped when its poll's answer arrived (the devices answer one after another
    on their bus, a few ms either way), ten float32 values each. Deterministic per `index`."""

    def __init__(self, index: int, devices: int = 3, poll_interval: float = 1.0,
                 publish_interval: float = 10.0) -> None:
        rng = random.Random(index)
        self.poll_interval = poll_interval
        self.publish_interval = publish_interval
        self.polls = 0
        # A meter's slowly moving values.
        self._base = [[230.0 + rng.uniform(-3, 3) for _ in range(3)] + [rng.uniform(2, 30) for _ in range(3)]
                      + [rng.uniform(1000, 15000), rng.uniform(1e4, 1e6), 50.0, rng.uniform(0.85, 0.99)]
                      for _ in range(devices)]
        self._rng = rng

    @property
    def devices(self) -> list[str]:
        return [f"meter-{d + 1}" for d in range(len(self._base))]

    def readings(self, cycle_end: float) -> list[Reading]:
        """The readings of the cycle ending at `cycle_end`: every device polled at each aligned poll deadline."""
        polls = max(1, round(self.publish_interval / self.poll_interval))
        rng = self._rng
        out = []
        start_ns = int((cycle_end - self.publish_interval) * 1e9)
        step_ns = int(self.poll_interval * 1e9)
        for k in range(polls):
            for d, base in enumerate(self._base):
                # The answer of device d arrives ~40 ms after the one before it on the bus, a few ms either way.
                t = start_ns + k * step_ns + (d + 1) * 40_000_000 + rng.randrange(5_000_000)
                base[7] += base[6] * self.poll_interval / 3600  # energy counts up with power
                values = [base[0] + rng.uniform(-0.5, 0.5), base[1] + rng.uniform(-0.5, 0.5),
                          base[2] + rng.uniform(-0.5, 0.5), base[3] * rng.uniform(0.97, 1.03),
                          base[4] * rng.uniform(0.97, 1.03), base[5] * rng.uniform(0.97, 1.03),
                          base[6] * rng.uniform(0.97, 1.03), base[7], 50.0 + rng.uniform(-0.02, 0.02), base[9]]
                out.append(Reading(f"meter-{d + 1}", MEASUREMENT, t,
                                   {name: _f32(v) for name, v in zip(FIELDS, values, strict=True)}))
        self.polls += polls
        return out


@dataclass
class MessageLog:
    committed: float  # wall clock (s) of the commit = the cycle's deadline (aligned, plus the gateway's phase)
    readings: int
    first_publish: float | None = None
    sends: int = 0
    puback: float | None = None
    acked: float | None = None


@dataclass
class GatewayStats:
    connects: int = 0
    connect_failures: int = 0
    losses: int = 0
    refused_pubacks: int = 0  # PUBACK reason >= 0x80 (the broker's rate limit: 0x87)
    bad_acks: int = 0
    dup_resends: int = 0  # un-PUBACKed publishes sent again after a reconnect (paho's DUP re-send)
    connected_at: list[float] = field(default_factory=list)  # wall clock of each CONNACK
    lost_at: list[float] = field(default_factory=list)


class SimGateway:
    def __init__(self, fleet: Fleet, gateway_id: str, directory: Path, index: int) -> None:
        self.fleet = fleet
        self.id = gateway_id
        self.index = index
        spec = fleet.spec
        self.sealer = GatewaySealer(gateway_id, identity_from_pem((directory / "identity.key").read_bytes()),
                                    fleet.collector_key)
        self.context: ssl.SSLContext = client_context(spec.ca_file, str(directory / "tls.crt"),
                                                      str(directory / "tls.key"))
        self.topic = topics.up(PREFIX, gateway_id)
        self.status_topic = topics.status(PREFIX, gateway_id)
        self.ack_topic = topics.down(PREFIX, gateway_id, ack.KIND)
        self.sender = Sender(spec.window, spec.ack_timeout, spec.ack_timeout_max)
        self.outbox: dict[int, bytes] = {}
        self.log: dict[int, MessageLog] = {}
        self.next_seq = 1
        self.conn: LeanConnection | None = None
        self.stats = GatewayStats()
        self._attempt = 0
        self._timer: asyncio.TimerHandle | None = None
        self._connecting = False
        self._mids: dict[int, int] = {}  # packet id -> seq (the latest publish of it)
        # What the current connection was given and the broker has not PUBACKed: paho sends it again (DUP) right
        # after the next CONNACK (client.py _messages_reconnect_reset_out), whatever the clean-start flag.
        self._unacked: dict[int, bytes] = {}  # packet id -> sealed payload
        self._resend: list[tuple[int, bytes]] = []  # (seq, payload) to send again at the next connection
        self.started_ns = time.time_ns()
        self.meters = Meters(index, spec.devices, spec.poll_interval, spec.publish_interval)
        self._rng = random.Random(-1 - index)  # reconnect jitter

    # -- readings -------------------------------------------------------------------------------------------------

    def commit(self, cycle_end: float) -> None:
        """One cycle: the batch into the outbox, live to the sender (as Agent._cycle_loop does). Its readings are
        those of the aligned polls before `cycle_end` (polls stay aligned when publishing is spread)."""
        poll = self.meters.poll_interval
        readings = self.meters.readings(math.floor(cycle_end / poll + 1e-9) * poll)
        seq = self.next_seq
        self.next_seq += 1
        body = encode_batch(Batch(self.id, seq, time.time_ns(), readings))
        self.outbox[seq] = body
        self.log[seq] = MessageLog(cycle_end, len(readings))
        self.sender.committed([(seq, body)])
        self.pump()

    def heartbeat(self) -> None:
        if self.conn is not None and self.conn.connected:
            self._publish_status()

    def _publish_status(self) -> None:
        assert self.conn is not None
        oldest = next(iter(self.outbox), None)
        status = encode_status(
            ONLINE, gateway=self.id, version="fleet-sim", since_ns=self.started_ns, time_ns=time.time_ns(),
            mqtt="MQTTv5", backlog_messages=len(self.outbox),
            backlog_readings=sum(self.log[s].readings for s in self.outbox if s in self.log),
            backlog_bytes=sum(map(len, self.outbox.values())),
            backlog_oldest_ns=int(self.log[oldest].committed * 1e9) if oldest in self.log else None,
            oldest_unacked_seq=oldest, next_seq=self.next_seq, last_publish_ns=None, last_ack_ns=None,
            dropped_readings=0, resent_messages=self.sender.resent, outbox_resets=0,
            devices={name: {"polls": self.meters.polls, "errors": 0} for name in self.meters.devices})
        mid = self.conn.publish(self.status_topic, status, qos=1, retain=True)
        self.sender.published(None, mid, len(status), self.fleet.now())

    # -- the send loop: edge_agent.delivery.Sender's actions performed on the in-RAM outbox ----------------------

    def pump(self) -> None:
        sender = self.sender
        now = self.fleet.now()
        while True:
            action = sender.next_action(now)
            if isinstance(action, Publish):
                conn = self.conn
                mid = None
                if conn is not None and conn.connected:
                    payload = self.sealer.seal(self.topic, action.body)
                    mid = conn.publish(self.topic, payload, qos=1)
                    size = len(payload)
                    if mid is not None:
                        self._unacked[mid] = payload
                else:
                    size = len(action.body)
                sender.published(action.seq, mid, size, now)
                entry = self.log.get(action.seq)
                if entry is not None:
                    entry.sends += 1
                    if entry.first_publish is None:
                        entry.first_publish = time.time()
                if mid is not None:
                    self._mids[mid] = action.seq
            elif isinstance(action, ScanBacklog):
                seqs = []
                for seq in self.outbox:  # ascending: seqs are committed in order
                    if seq > action.after:
                        seqs.append(seq)
                        if len(seqs) >= action.limit:
                            break
                sender.scanned(seqs, action.limit)
            elif isinstance(action, ReadBodies):
                examined, found, total = [], [], 0
                for seq in action.seqs:
                    examined.append(seq)
                    body = self.outbox.get(seq)
                    if body is not None:
                        found.append((seq, body))
                        total += len(body)
                        if total >= action.max_bytes:
                            break
                sender.bodies_read(examined, found)
            else:
                assert isinstance(action, Wait)
                self._arm(action.deadline)
                return

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.fleet.loop.call_at(max(deadline, self.fleet.now()), self.pump)

    # -- the connection --------------------------------------------------------------------------------------------

    def start_connecting(self, delay: float = 0.0) -> None:
        if self._connecting:
            return
        self._connecting = True
        self.fleet.spawn(self._connect(delay))

    async def _connect(self, delay: float) -> None:
        spec = self.fleet.spec
        loop = self.fleet.loop
        try:
            while not self.fleet.closing:
                if delay > 0:
                    await asyncio.sleep(delay)
                answered: asyncio.Future[Packet] = loop.create_future()

                conn = LeanConnection(self.id, keepalive=spec.keepalive, on_puback=self._puback,
                                      on_message=self._message)

                def on_connack(packet: Packet, answered: asyncio.Future[Packet] = answered) -> None:
                    if not answered.done():
                        answered.set_result(packet)

                def on_lost(reason: str, answered: asyncio.Future[Packet] = answered,
                            conn: LeanConnection = conn) -> None:
                    if not answered.done():
                        answered.set_exception(OSError(reason))
                    else:
                        self._lost(conn)

                conn.on_connack, conn.on_lost = on_connack, on_lost
                try:
                    started = loop.time()
                    await connect(spec.host, spec.port, self.context, conn, spec.connect_timeout)
                    packet = await asyncio.wait_for(answered, max(0.1, spec.connect_timeout - (loop.time() - started)))
                    if packet.reason != 0:
                        raise OSError(f"CONNACK reason 0x{packet.reason:02x}")
                    if conn.closed:
                        raise OSError("lost right after its CONNACK")
                except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors
                    self.stats.connect_failures += 1
                    conn.on_lost = None
                    conn.abort(f"connect failed: {exc!r}")
                    if answered.done() and not answered.cancelled():
                        answered.exception()  # retrieved: the failure is this one
                    delay = self._backoff()
                    continue
                self._attempt = 0
                self._up(conn, packet)
                return
        finally:
            self._connecting = False

    def _backoff(self) -> float:
        spec = self.fleet.spec
        if spec.jitter:
            delay = reconnect_delay(self._attempt, spec.reconnect_min, spec.reconnect_max, self._rng.random)
        else:  # paho 2.x's own: min, then doubling up to max, no jitter
            delay = min(spec.reconnect_max, spec.reconnect_min * 2.0 ** min(self._attempt, 32))
        self._attempt += 1
        return delay

    def _up(self, conn: LeanConnection, packet: Packet) -> None:
        self.stats.connects += 1
        self.stats.connected_at.append(time.time())
        conn.subscribe([self.ack_topic])
        self.conn = conn
        self.sender.link_changed(True, packet.receive_maximum)
        for seq, payload in self._resend:
            mid = conn.publish(self.topic, payload, qos=1, dup=True)
            if mid is not None:
                self._unacked[mid] = payload
                self._mids[mid] = seq
                self.stats.dup_resends += 1
        self._resend.clear()
        self._publish_status()  # the birth message
        self.pump()

    def _puback(self, packet_id: int, reason: int) -> None:
        if reason >= 0x80:
            self.stats.refused_pubacks += 1
        seq = self._mids.pop(packet_id, None)
        self._unacked.pop(packet_id, None)
        self.sender.pubacked(packet_id)
        if seq is not None:
            entry = self.log.get(seq)
            if entry is not None and entry.puback is None and reason < 0x80:
                entry.puback = time.time()
        self.pump()

    def _message(self, topic: str, payload: bytes) -> None:
        if not topics.is_own_topic(self.ack_topic, topic):
            return
        try:
            ranges = ack.decode_ack(self.sealer.open_downlink(self.ack_topic, payload, check_age=False))
        except (SealError, ack.AckError):
            self.stats.bad_acks += 1
            return
        now = time.time()
        for first, last in ranges:
            for seq in range(first, last + 1):
                entry = self.log.get(seq)
                if entry is not None and entry.acked is None:
                    entry.acked = now
        self.sender.acked(ranges, self.fleet.now())
        taken = self.sender.take_acked()
        for first, last in taken:
            for seq in [s for s in self.outbox if first <= s <= last]:
                del self.outbox[seq]
        self.sender.deleted(taken, [])
        self.pump()

    def _lost(self, conn: LeanConnection) -> None:
        if self.conn is not conn:
            return
        self.conn = None
        self._resend = [(self._mids[mid], payload) for mid, payload in self._unacked.items() if mid in self._mids]
        self._unacked.clear()
        self._mids.clear()
        self.stats.losses += 1
        self.stats.lost_at.append(time.time())
        self.sender.link_changed(False)
        self.pump()
        if not self.fleet.closing:
            self.start_connecting(self._backoff())


class Fleet:
    """The simulated gateways of one process, their cycles and heartbeats."""

    def __init__(self, spec: SimSpec, gateways: list[tuple[str, str]]) -> None:
        self.spec = spec
        self.collector_key = collector_key_from_pem(Path(spec.collector_pub).read_bytes())
        self.loop = asyncio.get_running_loop()
        self.closing = False
        self.producing = False
        self._tasks: set[asyncio.Task] = set()
        self.gateways = [SimGateway(self, gid, Path(d), i) for i, (gid, d) in enumerate(gateways)]

    def now(self) -> float:
        return self.loop.time()

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def connect_all(self, rate: float) -> float:
        """Connect every gateway, `rate` new connections per second (as a fleet comes up over time); returns the
        seconds until the last CONNACK."""
        t0 = time.time()
        for i, gw in enumerate(self.gateways):
            gw.start_connecting()
            if rate > 0 and (i + 1) % max(1, int(rate / 20)) == 0:
                await asyncio.sleep(max(1, int(rate / 20)) / rate)
        while not all(gw.conn is not None and gw.conn.connected for gw in self.gateways):
            await asyncio.sleep(0.1)
        return time.time() - t0

    def connected(self) -> int:
        return sum(1 for gw in self.gateways if gw.conn is not None and gw.conn.connected)

    async def run_cycles(self) -> None:
        """Commit a cycle on every gateway at each of its publish deadlines while `producing`, and its heartbeats
        at theirs: aligned, offset by the gateway's phase when spread (edge_agent.schedule, as the agent)."""
        spec = self.spec
        now = time.time()
        due: list[tuple[float, int, int]] = []  # (deadline, 0 cycle / 1 heartbeat, gateway index)
        for i, gw in enumerate(self.gateways):
            offset = phase(gw.id) if spec.publish_spread else 0.0
            due.append((next_aligned(now, spec.publish_interval, offset), 0, i))
            due.append((next_aligned(now, spec.heartbeat_interval, offset), 1, i))
        heapq.heapify(due)
        while not self.closing:
            await asyncio.sleep(max(0.0, due[0][0] - time.time()))
            now = time.time()
            while due[0][0] <= now:
                deadline, kind, i = heapq.heappop(due)
                if kind == 0:
                    if self.producing:
                        self.gateways[i].commit(deadline)
                    heapq.heappush(due, (deadline + spec.publish_interval, 0, i))
                else:
                    self.gateways[i].heartbeat()
                    heapq.heappush(due, (deadline + spec.heartbeat_interval, 1, i))

    def report(self) -> dict:
        messages = []
        for gw in self.gateways:
            for seq, m in gw.log.items():
                messages.append([gw.index, seq, m.committed, m.readings, m.first_publish, m.sends, m.puback, m.acked])
        stats = {k: sum(getattr(gw.stats, k) for gw in self.gateways)
                 for k in ("connects", "connect_failures", "losses", "refused_pubacks", "bad_acks", "dup_resends")}
        return {"messages": messages, "stats": stats,
                "resent": sum(gw.sender.resent for gw in self.gateways),
                "unacked": sum(len(gw.outbox) for gw in self.gateways),
                "connected": self.connected(),
                "connected_at": [gw.stats.connected_at[-1] if gw.stats.connected_at else None for gw in self.gateways],
                "lost_at": [gw.stats.lost_at[-1] if gw.stats.lost_at else None for gw in self.gateways]}

    async def close(self) -> None:
        self.closing = True
        for gw in self.gateways:
            if gw.conn is not None:
                gw.conn.close()
        for task in list(self._tasks):
            task.cancel()

