"""The collector's async shell: MQTT in, the pure ingest pipeline, batched InfluxDB writes, acknowledgements out.

An uplink message is acknowledged to the broker (manual PUBACK) only after InfluxDB confirmed the batch that
holds its lines, or after it was rejected for good (invalid, or refused by InfluxDB with a 4xx). The broker's
MQTT 5 receive maximum bounds how many unacknowledged messages this process holds, so RAM stays bounded when
InfluxDB is down: the broker keeps the rest.

Its seq is then acknowledged end to end to the gateway (wire/ack.py), which deletes the message from its outbox
only then: every `acks.interval`, one message per gateway names the seqs stored since the last one. A status
heartbeat becomes health points (collector/health.py) written the same way, without an end-to-end ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass

import paho.mqtt.client as paho

from collector.config import CollectorConfig, default_client_id
from collector.health import health_lines
from collector.influx.backends import make_backend
from collector.influx.batcher import BatchResult, BatchWriter, WriterClosed
from collector.ingest import Ingest, TimePolicy
from collector.pki import load_private_keys
from collector.quarantine import Quarantine
from collector.registry import GatewayRegistry
from wire import ack, topics
from wire.cli import run_tasks_until
from wire.envelope import WireError
from wire.logs import RateLimitedLog
from wire.mqttlink import MqttLink
from wire.seal import Opener, SealError
from wire.status import decode_status

log = logging.getLogger("citynerve.collector")

# HTTP statuses with which InfluxDB refuses the content itself (a bad line, a field type conflict, a point
# outside the retention): sending the message again cannot help, so it is acknowledged end to end like a stored
# one. Other refusals (401/403 credentials, 404 database, 413 size) are this side's configuration: the gateway
# keeps the data and sends it again, so fixing the configuration recovers it.
_CONTENT_REFUSED = frozenset({400, 422})
# On shutdown, how long to wait for the broker's PUBACK of the last acknowledgements before disconnecting.
_FINAL_ACKS_TIMEOUT = 2.0


@dataclass(frozen=True)
class _Delivery:
    """What to acknowledge once a message's lines are written: its PUBACK, and its seq end to end."""

    mid: int
    qos: int
    gateway: str
    seq: int | None  # None: a status message (health points), acknowledged to the broker only
    session_id: bytes | None = None  # the sealed session it came in; None for plain


class Collector:
    def __init__(self, cfg: CollectorConfig) -> None:
        self.cfg = cfg
        self.prefix = cfg.mqtt.topic_prefix
        v = cfg.validation
        self.registry, opener = _security(cfg)
        self.opener = opener
        self._registry_checked = 0.0
        self.ingest = Ingest(
            self.prefix,
            v.max_payload_bytes,
            TimePolicy(int(v.max_future * 1e9), int(v.min_time.timestamp()) * 1_000_000_000),
            v.suspect_measurement,
            opener,
            accept_plain=cfg.security is None or cfg.security.accept_plain,
        )
        q = cfg.quarantine
        self.quarantine = Quarantine(q.path, q.max_entries, q.max_bytes) if q.max_entries else None
        self.counters: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self._warn = RateLimitedLog(log, interval=60)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[paho.MQTTMessage | tuple[paho.MQTTMessage, int]] = asyncio.Queue()
        self._unacked = 0
        self.gateway_state: dict[str, str] = {}
        self.acks = ack.PendingAcks()
        # per gateway with pending acks: the session of its most recently stored message, whose downlink key
        # the agent still holds (None: plain, acknowledged in plain)
        self._ack_session: dict[str, bytes | None] = {}
        self.backend = make_backend(cfg.influx)
        self.writer = BatchWriter(
            self.backend,
            batch_size=cfg.influx.batch_size,
            flush_interval=float(cfg.influx.flush_interval),
            retry_initial=float(cfg.influx.retry_initial),
            retry_max=float(cfg.influx.retry_max),
            max_pending_lines=cfg.influx.max_pending_lines,
            on_result=self._on_written,
            log=log,
            max_batch_puts=max(1, cfg.mqtt.receive_maximum // 2),
        )
        self.link = MqttLink(
            cfg.mqtt,
            cfg.mqtt.client_id or default_client_id(),
            clean_start=False,
            session_expiry=float(cfg.mqtt.session_expiry),
            receive_maximum=cfg.mqtt.receive_maximum,
            manual_ack=True,
            on_connected=self._on_connected,
            on_message=self._on_message,
        )

    # -- paho's thread: hand over, never block --------------------------------------------------------------------

    def _on_connected(self, session_present: bool) -> None:
        subs = [topics.subscription(self.prefix, topics.UP), topics.subscription(self.prefix, topics.STATUS)]
        if self.cfg.mqtt.shared_group:
            subs = [f"$share/{self.cfg.mqtt.shared_group}/{t}" for t in subs]
        self.link.subscribe(subs, qos=1)
        log.info("subscribed to %s (session present: %s)", ", ".join(subs), session_present)

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        receive_ns = time.time_ns()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (msg, receive_ns))

    # -- event loop ---------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        await self.writer.start()
        log.info(
            "collector starting: MQTT %s:%d, InfluxDB %s API at %s", self.cfg.mqtt.host, self.cfg.mqtt.port,
            self.cfg.influx.api, self.cfg.influx.url,
        )
        self.link.start()
        tasks = [asyncio.create_task(self._consume(), name="consume"),
                 asyncio.create_task(self._send_acks(), name="acks"),
                 asyncio.create_task(self._report(), name="stats")]
        try:
            await run_tasks_until(stop, tasks)
        finally:
            # Acknowledge only what is stored: drain the writer, then leave. Messages still unacknowledged
            # stay with the broker's session and come again.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.close(drain=True), timeout=15)
            # What the drain stored is acknowledged now, not left to the agent's re-send timeout.
            with contextlib.suppress(Exception):
                await self._final_acks()
            self.backend.close()
            if self.quarantine is not None:
                self.quarantine.close()
            if self.registry is not None:
                self.registry.close()
            self.link.stop()
            log.info("collector stopped: %s", self._summary())

    async def _consume(self) -> None:
        while True:
            msg, receive_ns = await self._queue.get()
            try:
                await self._handle(msg, receive_ns)
            except WriterClosed:
                return  # shutting down: not acknowledged, so the broker delivers it again
            except Exception:  # a bug must cost one message, never the collector
                log.exception("unexpected error handling a message on %s", msg.topic)
                self._ack(msg.mid, msg.qos)

    def _refresh_registry(self) -> None:
        """Adding or revoking a gateway takes effect within a second, without a restart."""
        now = time.monotonic()
        if self.registry is None or now - self._registry_checked < 1.0:
            return
        self._registry_checked = now
        if self.registry.refresh_if_changed():
            log.info("gateway registry changed: %d gateway(s) enrolled", len(self.registry.list()))

    async def _handle(self, msg: paho.MQTTMessage, receive_ns: int) -> None:
        self._refresh_registry()
        topic = msg.topic
        parsed = topics.parse(self.prefix, topic)
        if parsed is not None and parsed[1] == topics.STATUS:
            await self._status(parsed[0], msg, receive_ns)
            return
        try:
            accepted = self.ingest.uplink(topic, msg.payload, receive_ns)
        except WireError as exc:
            gateway = parsed[0] if parsed else "?"
            self.rejections[exc.reason] += 1
            self._warn.warning(
                ("reject", gateway, exc.reason), "rejected message from gateway %s on %s: %s",
                gateway, topic, exc, gateway=gateway, reason=str(exc.reason),
            )
            if self.quarantine is not None:
                self.quarantine.add(gateway, topic, str(exc.reason), exc.detail, msg.payload, receive_ns)
            self._ack(msg.mid, msg.qos)
            return
        self.counters["messages"] += 1
        self.counters["readings"] += accepted.readings
        if accepted.duplicate:
            self.counters["duplicates"] += 1  # counted, not alarmed: the same points are written again
        if accepted.suspect:
            self.counters["suspect_time"] += accepted.suspect
            self._warn.warning(
                ("suspect", accepted.gateway), "gateway %s sent %d reading(s) with an implausible sample time "
                "(clock not set?); stored aside in %s", accepted.gateway, accepted.suspect,
                self.cfg.validation.suspect_measurement, gateway=accepted.gateway, reason="suspect_time",
            )
        if accepted.skipped:
            self.counters["skipped_readings"] += accepted.skipped
        self._unacked += 1
        token = _Delivery(msg.mid, msg.qos, accepted.gateway, accepted.seq, accepted.session_id)
        await self.writer.put(accepted.lines, token=token)

    async def _status(self, gateway: str, msg: paho.MQTTMessage, receive_ns: int) -> None:
        try:
            doc = decode_status(msg.payload)
        except ValueError as exc:
            self._warn.warning(("status", gateway), "unreadable status from gateway %s: %s", gateway, exc,
                               gateway=gateway, reason="bad_status")
            self._ack(msg.mid, msg.qos)
            return
        state = doc["state"]
        if self.gateway_state.get(gateway) != state:
            self.gateway_state[gateway] = state
            log.info("gateway %s is %s", gateway, state, extra={"gateway": gateway})
        if msg.retain and not isinstance(doc.get("time_ns"), int):
            # A retained last will, replayed at each subscription: it carries no time of its own, and writing it
            # at every collector start would add an "offline" point each time. Its live delivery was written.
            self._ack(msg.mid, msg.qos)
            return
        health = health_lines(doc, gateway, receive_ns, self.ingest.time_policy)
        if health.skipped_devices:
            self._warn.warning(("health", gateway), "status from gateway %s: %d device entries left out (invalid, "
                               "or more than the limit)", gateway, health.skipped_devices, gateway=gateway,
                               reason="bad_device_health")
        self.counters["status_messages"] += 1
        self._unacked += 1
        # Through the writer like readings: the PUBACK comes after the write, so a heartbeat is not lost when
        # InfluxDB is down.
        await self.writer.put(health.lines, token=_Delivery(msg.mid, msg.qos, gateway, None))

    def _on_written(self, result: BatchResult) -> None:
        final = result.ok or result.status in _CONTENT_REFUSED  # acknowledged end to end
        if result.ok:
            self.counters["lines_written"] += result.lines
        else:
            self.counters["lines_rejected_by_influx"] += result.lines
            gateways = sorted({t.gateway for t in result.tokens if isinstance(t, _Delivery)})
            log.error(
                "InfluxDB refused a batch of %d lines from gateway(s) %s (HTTP %s): %s; not retried%s",
                result.lines, ", ".join(gateways), result.status, result.reason,
                "" if final else ", the gateways send it again until the configuration is fixed",
                extra={"reason": "influx_rejected"},
            )
        for token in result.tokens:
            if isinstance(token, _Delivery):
                self._ack(token.mid, token.qos)
                self._unacked -= 1
                if final and token.seq is not None:
                    self.acks.add(token.gateway, token.seq)
                    self._ack_session[token.gateway] = token.session_id

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.link.ack(mid, qos)

    # -- end-to-end acknowledgements ---------------------------------------------------------------------------

    async def _send_acks(self) -> None:
        interval = float(self.cfg.acks.interval)
        while True:
            await asyncio.sleep(interval)
            if self.acks:
                self._publish_acks()

    def _publish_acks(self) -> list[paho.MQTTMessageInfo]:
        """Everything stored since the last call: one message per gateway (more beyond ack.MAX_RANGES ranges).

        Not retained, QoS 1. A lost acknowledgement costs a re-send by the agent, whose rewrite is idempotent,
        so nothing here is kept for a retry.
        """
        sent: list[paho.MQTTMessageInfo] = []
        for gateway, messages in self.acks.take().items():
            session_id = self._ack_session.pop(gateway, None)
            topic = topics.down(self.prefix, gateway, ack.KIND)
            for ranges in messages:
                body = ack.encode_ack(ranges)
                if session_id is None:
                    payload = bytes((ack.PLAIN_ACK,)) + body
                else:
                    assert self.opener is not None  # a session id comes only from the opener
                    try:
                        payload = self.opener.seal_downlink(gateway, session_id, topic, body)
                    except SealError as exc:  # the session was evicted (or the gateway revoked) meanwhile
                        self.counters["acks_dropped"] += 1
                        self._warn.warning(
                            ("ack", gateway), "cannot acknowledge to gateway %s: %s; it will send those messages "
                            "again", gateway, exc, gateway=gateway, reason=str(exc.reason),
                        )
                        continue
                sent.append(self.link.publish(topic, payload, qos=1, retain=False))
                self.counters["acks_sent"] += 1
                self.counters["acked_seqs"] += sum(last - first + 1 for first, last in ranges)
        return sent

    async def _final_acks(self) -> None:
        sent = self._publish_acks()
        if sent and self.link.connected.is_set():
            # MqttLink.stop() disconnects at once: wait (briefly) until the broker has them.
            await asyncio.to_thread(_wait_published, sent, _FINAL_ACKS_TIMEOUT)

    async def _report(self) -> None:
        interval = float(self.cfg.log.stats_interval)
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            log.info("stats: %s", self._summary())

    def _summary(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.counters.items())]
        parts += [f"rejected.{k}={v}" for k, v in sorted(self.rejections.items())]
        return " ".join(parts) or "no messages"


def _wait_published(sent: list[paho.MQTTMessageInfo], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for info in sent:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        with contextlib.suppress(RuntimeError, ValueError):  # not queued (disconnected): nothing to wait for
            info.wait_for_publish(timeout=left)


def _security(cfg: CollectorConfig) -> tuple[GatewayRegistry | None, Opener | None]:
    """The registry and the opener of sealed payloads, when [security] is configured."""
    sec = cfg.security
    if sec is None:
        return None, None
    from wire.seal import CollectorKey

    keys = [CollectorKey.from_private(k) for k in load_private_keys(sec.keys_dir).values()]
    registry = GatewayRegistry(sec.registry)
    opener = Opener(keys, registry.lookup, grace_seconds=float(sec.session_grace), replay_window=sec.replay_window)
    log.info("sealed payloads: collector key(s) %s, %d gateway(s) enrolled, plain payloads %s",
             ", ".join(k.kid.hex() for k in keys), len(registry.list()),
             "accepted" if sec.accept_plain else "refused")
    return registry, opener
