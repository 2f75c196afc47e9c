"""The collector's input from the clustered broker tier (deploy/nats, docs/scaling.md "Clustered broker tier").

Gateways speak MQTT to a NATS JetStream cluster. nats-server turns each gateway's PUBLISH on
citynerve/v1/<id>/up (status, report) into a message on the subject citynerve.v1.<id>.up, which one stream
(`[nats] stream`, replicated on `replicas` nodes) keeps until a collector acknowledges it. Every collector instance
takes messages from the same durable pull consumer (`[nats] consumer`): JetStream hands each message to one of
them, and gives it to another when it is not acknowledged within `ack_wait` (a collector that died).

What the collector's pipeline (collector/app.py) sees is the same as on MQTT: a message with a topic, a payload and
a delivery id (`mid`) handed to `on_message`, and `ack(mid)` once its fate is decided - for a reading, once InfluxDB
stored it. Here that acknowledgement is JetStream's (+ACK on the message's reply subject), the equivalent of the
manual PUBACK: a message not acknowledged stays in the stream and comes again.

Everything runs on the collector's event loop (nats-py is asyncio): `on_message` is called from the pull task,
acknowledgements and downlinks are queued by the loop's code and sent by the "nats-out" task. Bounds in code: the
messages taken and not yet acknowledged to JetStream (`max_inflight`: in the pipeline, or their acknowledgement
waiting to be sent; the consumer is asked for no more), the downlinks waiting
to be sent (MAX_QUEUED_DOWNLINKS, beyond it dropped and counted: an acknowledgement lost costs a re-send by the
gateway), and what nats-py buffers while reconnecting (its pending_size).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from collector.config import CollectorNats
from wire import topics
from wire.logs import RateLimitedLog

log = logging.getLogger("citynerve.nats")

# Acknowledgements and downlinks waiting for the "nats-out" task: a bound in code, whatever the loop queues.
MAX_QUEUED_DOWNLINKS = 65_536
# How long one pull request waits on the server for messages before it is renewed (JetStream's "expires").
FETCH_EXPIRES = 5.0
# Dead-connection detection: a node that vanished without closing the socket is noticed after about
# PING_INTERVAL * MAX_OUTSTANDING_PINGS seconds (nats-py's default would take 4 minutes).
PING_INTERVAL = 10
MAX_OUTSTANDING_PINGS = 3
# Waiting between attempts when the cluster cannot be reached or answers "no responders" (an election going on).
RETRY_INITIAL, RETRY_MAX = 0.5, 10.0
# nats-server's error code for "stream name already in use with a different configuration" (server/errors.json
# JSStreamNameExistErr).
_STREAM_NAME_EXISTS = 10058


class NatsSetupError(Exception):
    """The stream or consumer cannot be used as configured: the operator must act (the collector exits)."""


class NatsMessage:
    """An uplink message as collector/app.py reads it: the attributes of paho's MQTTMessage it uses."""

    __slots__ = ("_topic", "mid", "payload", "qos", "retain")

    def __init__(self, topic: str, payload: bytes, mid: int) -> None:
        self._topic = topic
        self.payload = payload
        self.mid = mid
        self.qos = 1  # acknowledged like a QoS 1 message: ack(mid) settles it
        self.retain = False  # the stream keeps every status; nothing is replayed from a retained store

    @property
    def topic(self) -> str:
        return self._topic

    @topic.setter
    def topic(self, value: str | bytes) -> None:  # paho's setter takes bytes (collector/app.py unmounts so)
        self._topic = value.decode() if isinstance(value, bytes) else value


def stream_config(settings: CollectorNats) -> StreamConfig:
    """The uplink stream: every gateway's up, status and report subjects, kept until a collector acknowledges.

    WorkQueue retention: a message is removed once acknowledged, and the stream allows one consumer only - the one
    all collectors share. No deduplication: MQTT publishers cannot set Nats-Msg-Id, so a gateway's re-send is
    another message; it lands on the same points in the store (measurement + tags + sample time)."""
    prefix = settings.topic_prefix
    subjects = [topics.to_nats_subject(topics.subscription(prefix, leaf))
                for leaf in (topics.UP, topics.STATUS, topics.REPORT)]
    return StreamConfig(
        name=settings.stream, subjects=subjects, retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
        num_replicas=settings.replicas, max_age=float(settings.max_age), max_bytes=int(settings.max_bytes),
        max_msgs_per_subject=settings.max_msgs_per_gateway, discard=DiscardPolicy.OLD,
    )


def consumer_config(settings: CollectorNats) -> ConsumerConfig:
    """The one durable pull consumer every collector instance takes from. max_deliver -1: the broker never gives
    a message up; one the collector cannot use is refused by the collector (quarantined) and acknowledged."""
    return ConsumerConfig(
        name=settings.consumer, durable_name=settings.consumer, ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL, ack_wait=float(settings.ack_wait), max_ack_pending=settings.max_ack_pending,
        max_deliver=-1,
    )


def tls_context(settings: CollectorNats) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


class NatsInput:
    """The collector's input and output on the NATS tier; the same surface as collector/inputs.py MqttInput."""

    mount = ""  # nats-server names the gateways' topics as they publish them
    ack_qos = 1  # what downlink_qos allows (publish() takes the lower)

    def __init__(self, settings: CollectorNats, client_name: str, *, on_connected: Callable[[bool], None],
                 on_message: Callable[[Any], None], on_subscribed: Callable[[list[int]], None] | None = None,
                 counters: Counter[str] | None = None) -> None:
        self.settings = settings
        self.client_name = client_name
        self.window = settings.max_inflight
        self.connected = threading.Event()  # read by the metrics, as MqttLink.connected
        # nats_taken, nats_redelivered (taken again: not acknowledged in time, or a node lost the acknowledgement),
        # nats_acked, nats_acks_lost, nats_marked_in_progress, nats_fetch_errors, nats_downlinks_dropped: in the
        # collector's own counters (its stats line) when it passes them
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._nc: Any = None  # nats.aio.client.Client once connected
        self._sub: Any = None  # the pull subscription bound to the consumer
        self._mids = itertools.count(1)
        self._inflight: dict[int, tuple[Msg, float]] = {}  # mid -> (message, taken or last marked in progress)
        self._acks: deque[Msg] = deque()
        self._downlinks: deque[tuple[str, bytes, dict[str, str] | None]] = deque()
        self._out = asyncio.Event()
        self._room = asyncio.Event()
        self._warn = RateLimitedLog(log, interval=60)
        self._closing = False

    def describe(self) -> str:
        s = self.settings
        return f"NATS {', '.join(s.servers)} stream {s.stream} consumer {s.consumer}"

    # -- life cycle (collector/app.py) ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Nothing to wait for: connecting (and retrying while the cluster is away) is the pull task's job, as
        paho's connect_async is for MQTT."""

    def tasks(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._pull(), name="nats-pull"),
                asyncio.create_task(self._send(), name="nats-out"),
                asyncio.create_task(self._keep_taken(), name="nats-in-progress")]

    async def flush(self, _sent: list[Any], timeout: float) -> None:
        """Send what is queued (the tasks may be stopped already) and wait until the server has it."""
        await self._send_queued()
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await self._nc.flush(timeout=max(1, int(timeout)))

    async def close(self) -> None:
        """Send what is queued, then close. Messages taken and not acknowledged go to another collector after
        ack_wait (or to this one when it is back)."""
        self._closing = True
        self.connected.clear()
        if self._nc is None:
            return
        with contextlib.suppress(Exception):
            await self._send_queued()
        with contextlib.suppress(Exception):
            await self._nc.close()

    # -- what collector/app.py calls --------------------------------------------------------------------------

    def subscribe(self, subs: list[str], qos: int = 1) -> None:
        """The pipeline names the MQTT filters it takes; on NATS the stream's subjects decide what comes."""
        del qos
        subjects = set(stream_config(self.settings).subjects or [])
        extra = [t for t in subs if topics.to_nats_subject(t) not in subjects]
        if extra:
            log.warning("the stream %s does not take %s: messages there are not collected", self.settings.stream,
                        ", ".join(extra))
        if self._on_subscribed is not None:  # bound to the consumer already (_pull calls on_connected after)
            self._on_subscribed([0x80 if t in extra else 1 for t in subs])

    def ack(self, mid: int, qos: int = 1) -> None:
        del qos
        taken = self._inflight.pop(mid, None)
        if taken is None:
            return
        self._acks.append(taken[0])
        self._out.set()

    def unsent(self) -> int:
        return len(self._downlinks)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """A downlink to a gateway's MQTT session (an acknowledgement, a control document). Not retained (the
        collector publishes nothing retained). Queued; dropped and counted beyond MAX_QUEUED_DOWNLINKS."""
        del retain
        if len(self._downlinks) >= MAX_QUEUED_DOWNLINKS:
            self.counters["nats_downlinks_dropped"] += 1
            self._warn.warning(("downlinks_dropped",), "NATS downlink queue full (%d): dropped a message on %s "
                               "(%d so far)", MAX_QUEUED_DOWNLINKS, topic, self.counters["nats_downlinks_dropped"],
                               reason="downlink_dropped")
            return
        subject = topics.to_nats_subject(topic)
        qos = min(qos, self.settings.downlink_qos)
        if qos:
            self._downlinks.append((topics.NATS_QOS1_PREFIX + subject, payload, {topics.NATS_QOS_HEADER: "1"}))
        else:
            self._downlinks.append((subject, payload, None))
        self._out.set()

    # -- tasks ----------------------------------------------------------------------------------------------------

    async def _pull(self) -> None:
        await self._connect()
        await self._bind()
        self.connected.set()
        self._on_connected(True)
        s = self.settings
        delay = RETRY_INITIAL
        while True:
            # Acknowledgements not yet sent count too: the window bounds everything taken and not yet settled.
            room = self.window - len(self._inflight) - len(self._acks)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await self._sub.fetch(min(room, s.fetch_batch), timeout=FETCH_EXPIRES)
            except TimeoutError:  # nothing came within FETCH_EXPIRES (nats-py's timeouts derive from it)
                delay = RETRY_INITIAL
                continue
            except nats.js.errors.NotFoundError:
                # The consumer is gone (deleted by an operator, or its stream recreated): make it again.
                self._warn.warning(("consumer_gone",), "consumer %s of stream %s not found; setting it up again",
                                   s.consumer, s.stream, reason="nats_consumer_gone")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                await self._bind()
                continue
            except (nats.errors.Error, OSError) as exc:
                # Reconnecting, a node gone, a leader being elected (503 / no responders): nats-py reconnects by
                # itself; ask again with backoff.
                self.counters["nats_fetch_errors"] += 1
                self._warn.warning(("fetch",), "cannot take messages from consumer %s: %s: %s; retrying",
                                   s.consumer, type(exc).__name__, exc or "", reason="nats_fetch")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_INITIAL
            now = time.monotonic()
            for m in msgs:
                mid = next(self._mids)
                self._inflight[mid] = (m, now)
                self.counters["nats_taken"] += 1
                if m.metadata.num_delivered > 1:
                    self.counters["nats_redelivered"] += 1
                self._on_message(NatsMessage(topics.from_nats_subject(m.subject), m.data, mid))

    async def _send(self) -> None:
        while True:
            await self._out.wait()
            self._out.clear()
            await self._send_queued()
            self._room.set()  # the acknowledgements sent free the window

    async def _send_queued(self) -> None:
        nc = self._nc
        if nc is None:
            return
        while self._acks:
            m = self._acks.popleft()
            try:
                await m.ack()
                self.counters["nats_acked"] += 1
            except (nats.errors.Error, OSError) as exc:
                # Not acknowledged: JetStream gives the message again after ack_wait; its points are written again
                # onto themselves and the gateway is acknowledged again. Costs a duplicate, loses nothing.
                self.counters["nats_acks_lost"] += 1
                self._warn.warning(("ack",), "could not acknowledge a message to JetStream (%s); it comes again",
                                   type(exc).__name__, reason="nats_ack")
        while self._downlinks:
            subject, payload, headers = self._downlinks.popleft()
            try:
                await nc.publish(subject, payload, headers=headers)
            except (nats.errors.Error, OSError) as exc:
                self.counters["nats_downlinks_dropped"] += 1
                self._warn.warning(("downlink",), "could not publish a downlink on %s (%s)", subject,
                                   type(exc).__name__, reason="downlink_dropped")

    async def _keep_taken(self) -> None:
        """Messages held longer than a third of ack_wait (InfluxDB slow or down) are marked in progress, so that
        JetStream does not give them to another collector while this one still works on them."""
        period = float(self.settings.ack_wait) / 3
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for mid, (m, since) in list(self._inflight.items()):
                if now - since < period or mid not in self._inflight:
                    continue
                with contextlib.suppress(nats.errors.Error, OSError):
                    await m.in_progress()
                    self.counters["nats_marked_in_progress"] += 1
                if mid in self._inflight:
                    self._inflight[mid] = (m, now)

    # -- connecting and setting up ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        s = self.settings
        delay = RETRY_INITIAL
        while True:
            try:
                self._nc = await nats.connect(
                    servers=list(s.servers), tls=tls_context(s), name=self.client_name,
                    connect_timeout=max(1, int(s.connect_timeout)), reconnect_time_wait=float(s.reconnect_wait),
                    max_reconnect_attempts=-1, allow_reconnect=True, ping_interval=PING_INTERVAL,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS, error_cb=self._error, disconnected_cb=self._down,
                    reconnected_cb=self._up,
                )
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                self._warn.warning(("connect",), "cannot connect to NATS %s: %s: %s; retrying with backoff up to %gs",
                                   ", ".join(s.servers), type(exc).__name__, exc or "", RETRY_MAX,
                                   reason="nats_connect")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            log.info("connected to NATS %s (server %s)", self._nc.connected_url.netloc if self._nc.connected_url
                     else "?", self._nc.connected_server_version)
            return

    async def _bind(self) -> None:
        """The stream and consumer set up (when `manage`) or found, and the pull subscription bound to it; retried
        while the cluster cannot answer (an election, a node starting)."""
        s = self.settings
        js = self._nc.jetstream()
        delay = RETRY_INITIAL
        while True:
            try:
                if s.manage:
                    await self._ensure(js)
                else:
                    await js.stream_info(s.stream)
                    await js.consumer_info(s.stream, s.consumer)
                self._sub = await js.pull_subscribe_bind(durable=s.consumer, stream=s.stream)
                return
            except nats.js.errors.NotFoundError as exc:
                if s.manage:
                    raise
                raise NatsSetupError(f"stream {s.stream} or its consumer {s.consumer} does not exist and [nats] "
                                     f"manage = false: create them (deploy/nats/README.md): {exc.description}") from None
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                    nats.js.errors.ServerError, nats.errors.ConnectionReconnectingError) as exc:
                self._warn.warning(("setup",), "NATS JetStream not ready for stream %s: %s; retrying", s.stream,
                                   type(exc).__name__, reason="nats_setup")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _ensure(self, js: Any) -> None:
        s = self.settings
        wanted = stream_config(s)
        try:
            await js.add_stream(wanted)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_EXISTS:
                raise NatsSetupError(f"cannot create stream {s.stream}: {exc.description}") from None
            try:
                await js.update_stream(wanted)
            except nats.js.errors.BadRequestError as exc2:
                raise NatsSetupError(
                    f"stream {s.stream} exists with settings this collector cannot change ({exc2.description}): "
                    "make [nats] match it, or move it aside (deploy/nats/README.md)") from None
            log.info("stream %s updated to [nats]: replicas %d, max_age %gs, max_bytes %d, max_msgs_per_gateway %d",
                     s.stream, s.replicas, float(s.max_age), int(s.max_bytes), s.max_msgs_per_gateway)
        try:
            await js.add_consumer(s.stream, consumer_config(s))
        except nats.js.errors.BadRequestError as exc:
            raise NatsSetupError(f"cannot create or update consumer {s.consumer} of stream {s.stream}: "
                                 f"{exc.description}") from None

    # -- nats-py callbacks (on the loop) ---------------------------------------------------------------------------

    async def _error(self, exc: Exception) -> None:
        self._warn.warning(("error", type(exc).__name__), "NATS: %s: %s", type(exc).__name__, exc or "",
                           reason="nats_error")

    async def _down(self) -> None:
        self.connected.clear()
        if not self._closing:
            log.warning("disconnected from NATS; reconnecting")

    async def _up(self) -> None:
        self.connected.set()
        url = self._nc.connected_url if self._nc is not None else None
        log.info("reconnected to NATS %s", url.netloc if url else "?")
