"""The collector's async shell: MQTT in, admission, the pure ingest pipeline, batched InfluxDB writes,
acknowledgements out.

The path of a message, and who owns each step:

    paho's network thread   _on_message: counts the message against the hand-over bound and hands it to the
                            loop; while the bound is full it waits for room (at most _HANDOFF_WAIT), so that
                            paho stops reading and TCP flow control keeps the rest queued at the broker.
    event loop              _admit: collector/admission.py decides, from the topic's gateway alone, whether it
                            is queued (per gateway, bounded, rate limited) or declined at once.
    event loop (workers)    round robin over gateways: collector/ingest.py opens, checks (collector/guard.py)
                            and encodes it in slices, then the writer takes its lines.
    "influx-write" thread   collector/influx/batcher.py: one HTTP request at a time; a refused batch is split
                            so that only the puts whose own lines were refused are refused.
    event loop              _on_written: PUBACK, and the seq acknowledged end to end (wire/ack.py) when stored
                            or refused for the gateway's own content.
    "quarantine" thread     rejected payloads, from a bounded queue (collector/quarantine.py QuarantineSink).
    "registry" thread       the gateway registry re-read once a second (and re-opened on SIGHUP).
    "inventory" thread      the fleet inventory file (collector/inventory.py): what changed, within a second;
                            health and last-seen times every inventory.flush_interval.

An uplink message is acknowledged to the broker (manual PUBACK) once its fate is decided: stored, refused for
its content, or declined (then not end to end, so the gateway sends it again). The bounds in code are the
hand-over bound, the admission queues, the writer's max_pending_lines and the quarantine queue: memory stays
bounded whatever the broker sends (mosquitto 2.0.11 was seen to exceed a client's Receive Maximum by
thousands). A status heartbeat becomes health points (collector/health.py) written the same way, without an
end-to-end ack, and updates the fleet inventory, as every authentic uplink does (last seen).

On the clustered broker tier ([nats]) the input is collector/natsin.py instead of paho: the same messages come from
one durable JetStream consumer, handed to _on_message on the loop itself, and the "PUBACK" is JetStream's
acknowledgement (collector/inputs.py: the surface used here).

SIGHUP reloads collector.toml: what can change safely takes effect at once, the rest is named as waiting for a
restart (collector/reload.py), and the registry is re-opened. systemd hears READY once the broker acknowledged
the subscriptions, STATUS, RELOADING, STOPPING and the watchdog's pings (wire/systemd.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho

from collector import reload as reloading
from collector.admission import FairQueue
from collector.config import CollectorConfig, FieldTypes, ValidationSection
from collector.config import load as load_config
from collector.control_relay import ControlLines, ControlRelay
from collector.guard import SCHEMA_QUERY, Guard, learn_from_show_keys
from collector.health import health_lines, info_lines, point_time
from collector.influx.backends import WriteFailure, make_backend
from collector.influx.batcher import BatchResult, BatchWriter, WriterClosed
from collector.ingest import PRECISIONS, SLICE, Ingest, TimePolicy
from collector.inputs import make_input
from collector.inventory import InventorySink
from collector.pki import load_private_keys
from collector.quarantine import QuarantineSink
from collector.reasons import RETRY_LATER, Reason
from collector.registry import GatewayRegistry
from wire import ack, topics
from wire.cli import run_tasks_until
from wire.config import ConfigError
from wire.envelope import Rejection, WireError
from wire.logs import RateLimitedLog, setup_logging
from wire.seal import Opener, SealError
from wire.status import StatusError, decode_status
from wire.systemd import Service

log = logging.getLogger("citynerve.collector")

# HTTP statuses with which InfluxDB refuses the content itself (a bad line, a field type conflict, a point
# outside the retention, a body too large for one message): sending the message again cannot help, so it is
# acknowledged end to end and quarantined. The writer splits a refused batch, so such a refusal is always
# about this message's own lines. Other refusals (401/403/404) are this side's configuration: the gateway
# keeps the data and sends it again, so fixing the configuration recovers it.
_CONTENT_REFUSED = frozenset({400, 413, 422})
# InfluxDB 1.x's words for a refusal by a limit of the whole database (tsdb/index): not any one message's fault.
_STORE_LIMITS = ("max-values-per-tag limit exceeded", "max-series-per-database limit exceeded")
# On shutdown, how long to wait for the broker's PUBACK of the last acknowledgements before disconnecting.
_FINAL_ACKS_TIMEOUT = 2.0
# Gateways idle this long lose their admission state (their token buckets are full again by then anyway).
_IDLE_GATEWAY = 600.0
# How long paho's thread waits for room under the hand-over bound before it declines a message instead. While it
# waits it reads nothing more, so the broker keeps the rest queued (its queue is the buffer for a collector that
# is merely behind); the bound on the wait keeps paho's keepalive going (mosquitto drops a client silent for
# 1.5 x keepalive, MQTT 5 §3.1.2.10) and a stuck loop from holding the broker's messages for ever.
_HANDOFF_WAIT = 5.0
# Acknowledgements wait (merged per gateway) while paho holds this many packets it has not yet written: the bound
# on what the collector queues in paho when the broker reads slowly.
_MAX_UNWRITTEN_PACKETS = 10_000


@dataclass(frozen=True)
class _Delivery:
    """What to acknowledge once a message's lines are written: its PUBACK, and its seq end to end."""

    mid: int
    qos: int
    gateway: str
    seq: int | None  # None: nothing to acknowledge end to end (a status, or readings held back for a budget)
    session_id: bytes | None = None  # the sealed session it came in; None for plain
    lines: int = 0
    topic: str = ""
    payload: bytes = b""  # kept only for a message InfluxDB may refuse: its quarantine entry
    size: int = 0  # bytes held until the write: its lines and the payload (admission bounds them)


class Collector:
    def __init__(self, cfg: CollectorConfig, config_path: str | None = None,
                 log_override: tuple[str | None, str | None] = (None, None)) -> None:
        """`config_path`: the file SIGHUP reloads (None: no reload); `log_override`: --log-format and --log-level,
        which win over the file at a reload as at the start."""
        self.cfg = cfg
        self.config_path = config_path
        self.log_override = log_override
        self.service = Service.from_env()  # READY, STATUS, RELOADING, STOPPING and the watchdog (wire/systemd.py)
        self._subscribed = False
        self._subscribing: tuple[list[str], bool] = ([], False)
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._stopping = False
        self.prefix = cfg.topic_prefix
        v = cfg.validation
        lim = cfg.limits
        self.registry, opener = _security(cfg)
        self.opener = opener
        self.guard = Guard(lim.guard())
        for measurement, fields in cfg.schema.declared().items():
            for name, kind in fields.items():
                self.guard.declare(measurement, name, kind)
        self.ingest = Ingest(
            self.prefix,
            v.max_payload_bytes,
            _time_policy(v),
            v.suspect_measurement,
            opener,
            accept_plain=cfg.security is None or cfg.security.accept_plain,
            guard=self.guard,
            precision_ns=PRECISIONS[cfg.influx.precision],
        )
        self.admission = FairQueue(lim.admission())
        q = cfg.quarantine
        self.quarantine = QuarantineSink(q.path, q.max_entries, q.max_bytes) if q.max_entries else None
        inv = cfg.inventory
        self.inventory = InventorySink(inv.path, float(inv.flush_interval), info_interval=float(inv.info_interval),
                                       max_gateways=inv.max_gateways, health_interval=float(inv.health_interval))
        self.counters: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self._warn = RateLimitedLog(log, interval=60)
        self._loop: asyncio.AbstractEventLoop | None = None
        # The hand-over bound (paho's thread -> the loop): guarded by a lock, the only state both threads touch.
        self._handoff_lock = threading.Lock()
        self._handoff_room = threading.Condition(self._handoff_lock)
        self._handoff_messages = 0
        self._handoff_bytes = 0
        self._handoff_declined = 0
        self._handoff_waited = 0.0  # seconds paho's thread waited for room (back-pressure to the broker)
        self._closing = False
        self._work = asyncio.Event()
        self._housekeeping_beat: Callable[[], None] = _nothing  # the watchdog's beacon, from run() on
        self._files = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="registry")
        self.gateway_state: dict[str, str] = {}
        # gateway -> the newest time (ns) it was heard from: an authentic uplink's or a heartbeat's receive time (a
        # retained heartbeat, replayed at subscription: its own time, at most its receive time). One entry per
        # gateway that delivered; read by the metrics (collector/metrics.py).
        self.last_seen: dict[str, int] = {}
        self.acks = ack.PendingAcks()
        # per gateway with pending acks: the session of its most recently stored message, whose downlink key
        # the agent still holds (None: plain, acknowledged in plain)
        self._ack_session: dict[str, bytes | None] = {}
        self.backend = make_backend(cfg.influx)
        # One mosquitto ([mqtt]) or the clustered tier ([nats]): collector/inputs.py, the surface used below.
        self.link = make_input(cfg, on_connected=self._on_connected, on_message=self._on_message,
                               on_subscribed=self._on_subscribed, counters=self.counters)
        self.mount = self.link.mount
        self.writer = BatchWriter(
            self.backend,
            batch_size=cfg.influx.batch_size,
            flush_interval=float(cfg.influx.flush_interval),
            retry_initial=float(cfg.influx.retry_initial),
            retry_max=float(cfg.influx.retry_max),
            max_pending_lines=cfg.influx.max_pending_lines,
            on_result=self._on_written,
            log=log,
            max_batch_puts=max(1, self.link.window // 2),
        )
        self.control = None
        self._control_tasks: set[asyncio.Future] = set()
        if cfg.control is not None and opener is not None:
            self.control = ControlRelay(
                cfg.control, self.prefix, self.mount, opener,
                lambda topic, payload: self.link.publish(topic, payload, qos=1, retain=False),
                lambda lines, token: self.writer.put(lines, token=token, group="control"),
                self.counters, self._warn)

    @property
    def _leaves(self) -> tuple[str, ...]:
        """The gateways' leaves this collector takes: reports only when it relays control documents."""
        return (topics.UP, topics.STATUS, topics.REPORT) if self.control else (topics.UP, topics.STATUS)

    # -- paho's thread: count, hand over (waiting for room while the collector is behind) ---------------------------

    def _on_connected(self, session_present: bool) -> None:
        # The gateways' topics as the broker's gateways' listener mounts them (gw/citynerve/v1/+/up).
        subs = [topics.mount(self.mount, topics.subscription(self.prefix, leaf))
                for leaf in self._leaves]
        if self.cfg.nats is None and self.cfg.mqtt.shared_group:
            subs = [f"$share/{self.cfg.mqtt.shared_group}/{t}" for t in subs]
        self._subscribing = (subs, session_present)  # logged when the broker acknowledges (_subscribed_now)
        self.link.subscribe(subs, qos=1)

    def _on_subscribed(self, codes: list[int]) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed under a late callback
                loop.call_soon_threadsafe(self._subscribed_now, codes)

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        receive_ns = time.time_ns()
        size = len(msg.payload)
        lim = self.cfg.limits
        with self._handoff_room:
            full = self._handoff_messages >= lim.max_messages or self._handoff_bytes + size > lim.max_bytes
            if full and not self._closing and not _on_a_loop():
                # The collector is behind: hold paho here instead of declining. A message leaves the hand-over
                # count when a worker takes it (or it is declined at admission), so this is the collector's
                # whole intake queue; waiting here is what makes overload show as latency at the broker rather
                # than as declined messages that every gateway sends again. (On NATS messages come from the loop
                # itself, whose pull the consumer's max_inflight bounds: never waited for there.)
                began = time.monotonic()
                deadline = began + _HANDOFF_WAIT
                while full and not self._closing and (left := deadline - time.monotonic()) > 0:
                    self._handoff_room.wait(left)
                    full = self._handoff_messages >= lim.max_messages or self._handoff_bytes + size > lim.max_bytes
                self._handoff_waited += time.monotonic() - began
            if full and not self._closing:
                self._handoff_declined += 1
            elif not full:
                self._handoff_messages += 1
                self._handoff_bytes += size
        if full:
            # Still no room after _HANDOFF_WAIT: decline it here, where it already is, rather than grow the queue
            # this bound exists to stop. Acknowledged to the broker, not end to end: the gateway sends it again.
            # Counted, and reported by the loop (Reason.OVERLOAD). Shutting down: not acknowledged at all, the
            # broker delivers it again to the collectors' session.
            if msg.qos > 0 and not self._closing:
                self.link.ack(msg.mid, msg.qos)
            return
        # From here on the topic is the gateway's own (citynerve/v1/<id>/up), the one its sealed payload is bound
        # to. (A topic outside the mount point stays as it is: the shipped ACL lets no one write one nor a collector
        # read one.)
        own = topics.unmount(self.mount, msg.topic)
        if own is not None:
            msg.topic = own.encode()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._admit, msg, receive_ns, size)

    # -- event loop: admission ------------------------------------------------------------------------------------

    def _subscribed_now(self, codes: list[int]) -> None:
        refused = [code for code in codes if code >= 0x80]
        if refused:  # e.g. 0x87 not authorized: the broker's ACL does not let this collector read the gateways
            log.error("the broker refused the subscription (reason codes %s): nothing will arrive; check the "
                      "broker's ACL for this collector's certificate", ", ".join(f"0x{c:02x}" for c in refused),
                      extra={"reason": "subscribe_refused"})
            return
        subs, session_present = self._subscribing
        log.info("subscribed to %s (session present: %s)", ", ".join(subs), session_present)
        if not self._subscribed:
            self._subscribed = True
            self.service.ready(self.service_status())

    def _admit(self, msg: paho.MQTTMessage, receive_ns: int, size: int) -> None:
        parsed = topics.parse(self.prefix, msg.topic)
        if parsed is None or parsed[1] not in self._leaves:
            self._handed_on(size)
            self._reject("?", msg, Rejection.BAD_TOPIC, f"not an uplink, status or report topic under "
                         f"{self.prefix}/: {msg.topic!r}", receive_ns)
            return
        gateway, kind = parsed
        reason = self.admission.offer(gateway, (msg, receive_ns, kind, size), size, time.monotonic())
        if reason is not None:
            self._handed_on(size)
            self._decline(gateway, msg, reason)
            return
        self._work.set()

    def _handed_on(self, size: int) -> None:
        """A message left the collector's intake (taken by a worker, or declined or rejected at the door): room
        under the hand-over bound, which paho's thread may be waiting for."""
        with self._handoff_room:
            self._handoff_messages -= 1
            self._handoff_bytes -= size
            self._handoff_room.notify()

    def _decline(self, gateway: str, msg: paho.MQTTMessage, reason: Reason) -> None:
        """Not now: acknowledged to the broker (out of everyone's way), not end to end (the gateway keeps it)."""
        self.rejections[reason] += 1
        self._warn.warning(
            ("decline", reason, gateway), "declined messages from gateway %s: %s (%d so far); it sends them again",
            gateway, reason, self.admission.declined(gateway), gateway=gateway, reason=str(reason),
        )
        self._ack(msg.mid, msg.qos)

    def _reject(self, gateway: str, msg: paho.MQTTMessage, reason: object, detail: str, receive_ns: int) -> None:
        """Not at all: counted, logged once a minute per gateway and reason, quarantined, acknowledged to the
        broker. Not acknowledged end to end: an undecodable message has no seq to acknowledge."""
        self.rejections[str(reason)] += 1
        self._warn.warning(
            ("reject", gateway, str(reason)), "rejected message from gateway %s on %s: %s: %s",
            gateway, msg.topic, reason, detail, gateway=gateway, reason=str(reason),
        )
        self._quarantine(gateway, msg.topic, str(reason), detail, msg.payload, receive_ns)
        self._ack(msg.mid, msg.qos)

    def _quarantine(self, gateway: str, topic: str, reason: str, detail: str, payload: bytes,
                    receive_ns: int) -> None:
        if self.quarantine is not None:
            self.quarantine.add(gateway, topic, reason, detail, payload, receive_ns)

    # -- event loop: workers ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        metrics = None
        if self.cfg.metrics is not None:  # bound first: a port in use is a one-line error before anything starts
            from collector.metrics import server

            metrics = server(self)
            await metrics.start()
        web = None
        if self.cfg.web is not None:  # the same for the fleet page
            from collector.web.server import fleet_page

            web, page = fleet_page(self)
            await web.start()
            log.info("fleet page at %s/", web.url)
        await self.writer.start()
        log.info("collector starting: %s, InfluxDB %s API at %s", self.link.describe(), self.cfg.influx.api,
                 self.backend)
        await self._learn_schema()
        await self.inventory.open()
        await self.link.open()
        tasks = [asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(self.cfg.limits.workers)]
        tasks += self.link.tasks()
        tasks += [asyncio.create_task(self._send_acks(), name="acks"),
                  asyncio.create_task(self._housekeeping(), name="housekeeping"),
                  asyncio.create_task(self._schema_refresh(), name="schema")]
        if float(self.cfg.log.stats_interval) > 0:
            tasks.append(asyncio.create_task(self._report(), name="stats"))
        if self.quarantine is not None:
            tasks.append(asyncio.create_task(self.quarantine.run(), name="quarantine"))
        if metrics is not None:
            tasks.append(asyncio.create_task(metrics.serve(), name="metrics"))
        if web is not None:
            tasks.append(asyncio.create_task(web.serve(), name="web"))
        if self.control is not None:
            await self.control.start()
            tasks.append(asyncio.create_task(self.control.run(), name="control"))
        # The watchdog's pings stop if the registry thread does not answer for a minute or the housekeeping
        # round (once a second, through that thread) misses a minute.
        self.service.watch_executor("registry thread", self._files, allowed=60.0)
        self._housekeeping_beat = self.service.beacon("housekeeping", allowed=60.0)
        tasks += self.service.tasks(self.service_status)
        try:
            await run_tasks_until(stop, tasks)
        finally:
            self.service.stopping("stopping: writing what is pending, acknowledging what is stored")
            self._stopping = True  # a SIGHUP from now on is ignored
            if self._reload_task is not None:
                self._reload_task.cancel()
                await asyncio.gather(self._reload_task, return_exceptions=True)
            if web is not None:
                with contextlib.suppress(Exception):
                    await page.close()
            with self._handoff_room:  # paho's thread stops waiting for room that will not come
                self._closing = True
                self._handoff_room.notify_all()
            # Messages still queued are not acknowledged: they stay with the broker's session and come again.
            self.admission.drain()
            # Acknowledge only what is stored: drain the writer, then leave.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.close(drain=True), timeout=15)
            # What the drain stored is acknowledged now, not left to the agent's re-send timeout.
            with contextlib.suppress(Exception):
                await self._final_acks()
            self.backend.close()
            if self.control is not None:
                with contextlib.suppress(Exception):
                    await self.control.close()
            if self.quarantine is not None:
                with contextlib.suppress(Exception):
                    await self.quarantine.close()
            with contextlib.suppress(Exception):
                await self.inventory.close()
            if self.registry is not None:
                await self._loop.run_in_executor(self._files, self.registry.close)
            self._files.shutdown(wait=False)
            await self.link.close()
            log.info("collector stopped: %s", self._summary())

    async def _learn_schema(self, first: bool = True) -> None:
        """The field types and tag keys the store already holds, so that no gateway can claim another type for
        them (collector/guard.py): at start-up, then every schema.refresh (what other collectors' gateways
        wrote). InfluxDB 1.x API only; through the v2 API the guard learns from writes and declarations."""
        query = getattr(self.backend, "query", None)
        if query is None:
            return
        try:
            doc = await asyncio.get_running_loop().run_in_executor(self._files, query, SCHEMA_QUERY)
        except WriteFailure as exc:
            self._warn.warning(("schema",), "could not read the field types InfluxDB holds (%s); they are learnt "
                               "from writes and refusals meanwhile", exc, reason="schema_unknown")
            return
        fields, tags = learn_from_show_keys(self.guard, doc)
        if first or fields:
            log.info("InfluxDB holds %d field type(s) and %d tag key(s) in %s new to this collector: fixed for "
                     "every gateway", fields, tags, self.cfg.influx.database)

    async def _schema_refresh(self) -> None:
        while True:
            await asyncio.sleep(float(self.cfg.schema.refresh))  # read each round: a reload may change it
            await self._learn_schema(first=False)

    async def _worker(self) -> None:
        while True:
            job = self.admission.take()
            if job is None:
                self._work.clear()
                await self._work.wait()
                continue
            gateway, (msg, receive_ns, kind, size) = job
            self._handed_on(size)
            try:
                await self._process(gateway, msg, receive_ns, kind)
            except WriterClosed:
                return  # shutting down: not acknowledged, so the broker delivers it again
            finally:
                self.admission.done(gateway)
                self._work.set()  # its next message, or another worker's wait, may go now

    async def _process(self, gateway: str, msg: paho.MQTTMessage, receive_ns: int, kind: str) -> None:
        """One admitted message; `kind` is its topic's (topics.UP or topics.STATUS), parsed once at admission."""
        try:
            if kind == topics.STATUS:
                await self._status(gateway, msg, receive_ns)
            elif kind == topics.REPORT:
                await self._control_report(gateway, msg)
            else:
                await self._uplink(gateway, msg, receive_ns)
        except WriterClosed:
            raise
        except WireError as exc:
            self._reject(gateway, msg, exc.reason, exc.detail, receive_ns)
        except Exception as exc:  # a bug costs one message, one log line a minute: never the collector
            self.counters["internal_errors"] += 1
            log.debug("unexpected error handling a message on %s", msg.topic, exc_info=True)
            self._reject(gateway, msg, Reason.INTERNAL, f"{type(exc).__name__}: {exc}", receive_ns)

    async def _uplink(self, gateway: str, msg: paho.MQTTMessage, receive_ns: int) -> None:
        opened = self.ingest.open(msg.topic, msg.payload)
        self._seen(gateway, receive_ns, uplink=True)  # authentic (and, sealed, from that gateway)
        accepted = self.ingest.start(opened)
        now = time.monotonic()
        for start in range(0, len(opened.batch.readings), SLICE):
            if start:
                await asyncio.sleep(0)  # a large message does not hold the loop: others' work runs between slices
            self.ingest.encode(opened, accepted, start, start + SLICE, receive_ns, now)
        self.ingest.finish(opened, accepted, receive_ns)
        self.counters["messages"] += 1
        self.counters["readings"] += accepted.readings
        if accepted.duplicate:
            self.counters["duplicates"] += 1  # counted, not alarmed: the same points are written again
        if accepted.suspect:
            self.counters["suspect_time"] += accepted.suspect
            self._warn.warning(
                ("suspect", gateway), "gateway %s sent %d reading(s) with an implausible sample time "
                "(clock not set?); stored aside in %s", gateway, accepted.suspect,
                self.cfg.validation.suspect_measurement, gateway=gateway, reason="suspect_time",
            )
        if accepted.skipped:
            self.counters["skipped_readings"] += accepted.skipped
        if accepted.declined:
            for reason, count in accepted.declined.items():
                self.counters[f"declined.{reason}"] += count
            summary = "; ".join(f"{reason} x{accepted.declined[reason]}: {detail}"
                                for reason, detail in accepted.details.items())
            held = accepted.held
            self._warn.warning(
                ("declined", gateway, *sorted(accepted.details)), "gateway %s seq %d: %s%s", gateway, accepted.seq,
                summary,
                " (held back: not acknowledged, the gateway sends it again)" if held else "",
                gateway=gateway, reason=next(iter(accepted.details)),
            )
            content = [r for r in accepted.details if r not in RETRY_LATER]
            if content:
                self._quarantine(gateway, msg.topic, content[0], summary, msg.payload, receive_ns)
        size = sum(map(len, accepted.lines)) + len(msg.payload)
        token = _Delivery(msg.mid, msg.qos, gateway, None if accepted.held else accepted.seq, accepted.session_id,
                          len(accepted.lines), msg.topic, msg.payload, size)
        await self._put(gateway, accepted.lines, token)

    async def _put(self, gateway: str, lines: list[bytes], token: _Delivery) -> None:
        self.admission.lines_pending(gateway, token.lines, token.size)
        try:
            await self.writer.put(lines, token=token, group=gateway)
        except BaseException:
            self.admission.lines_pending(gateway, -token.lines, -token.size)
            raise

    async def _status(self, gateway: str, msg: paho.MQTTMessage, receive_ns: int) -> None:
        try:
            doc = decode_status(msg.payload)
        except StatusError as exc:
            raise WireError(Reason.BAD_STATUS, str(exc)) from None
        if doc.gateway is not None and doc.gateway != gateway:
            raise WireError(Reason.STATUS_MISMATCH,
                            f"status says gateway {doc.gateway!r} but arrived on the topic of {gateway!r}")
        if doc.time_ns is not None:  # a heartbeat; a last will (no time) is the broker speaking, not the gateway
            self._seen(gateway, min(doc.time_ns, receive_ns) if msg.retain else receive_ns)
        if self.gateway_state.get(gateway) != doc.state:
            self.gateway_state[gateway] = doc.state
            log.info("gateway %s is %s", gateway, doc.state, extra={"gateway": gateway})
        version = getattr(doc, "config_version", None)  # the running configuration, once heartbeats carry it
        if self.control is not None and isinstance(version, int):
            await self.control.observe_running(gateway, version, str(getattr(doc, "config_sha256", "") or ""))
        if msg.retain and doc.time_ns is None:
            # A retained last will, replayed at each subscription: it carries no time of its own, and writing it
            # at every collector start would add an "offline" point each time. Its live delivery was written. It
            # is still the gateway's current state, for the inventory.
            self.inventory.core.status(gateway, doc, receive_ns)
            self._ack(msg.mid, msg.qos)
            return
        devices = {**(doc.inventory or {}), **(doc.devices or {})}
        allowed, over = self.guard.check_devices(gateway, devices, time.monotonic())
        # Keyed by the topic's gateway, never the document's (checked equal above): only its own record changes.
        change = self.inventory.core.status(gateway, doc, receive_ns, allowed)
        health = health_lines(doc, gateway, receive_ns, self.ingest.time_policy, allowed)
        if health.skipped_devices or over:
            self._warn.warning(("health", gateway), "status from gateway %s: %d device entries left out (a name "
                               "line protocol cannot carry, or over the gateway's device budget)", gateway,
                               health.skipped_devices, gateway=gateway, reason="bad_device_health")
        write_health = self.inventory.core.health_due(gateway, doc, receive_ns)
        lines = health.lines if write_health else []
        if change.write_info:
            lines = lines + info_lines(doc, gateway, point_time(doc, receive_ns, self.ingest.time_policy), allowed)
        self.counters["status_messages"] += 1
        if not lines:  # nothing new to store (collector/health.py health_mark): the heartbeat's work is done
            self.counters["status_unchanged"] += 1
            self._ack(msg.mid, msg.qos)
            return
        # Through the writer like readings: the PUBACK comes after the write, so a heartbeat is not lost when
        # InfluxDB is down.
        await self._put(gateway, lines, _Delivery(msg.mid, msg.qos, gateway, None, None, len(lines),
                                                  size=sum(map(len, lines))))

    def _seen(self, gateway: str, time_ns: int, *, uplink: bool = False) -> None:
        """Heard from `gateway` itself at `time_ns`: for the metrics and the fleet inventory alike."""
        if time_ns > self.last_seen.get(gateway, 0):
            self.last_seen[gateway] = time_ns
        self.inventory.core.seen(gateway, time_ns, uplink=uplink)

    async def _control_report(self, gateway: str, msg: paho.MQTTMessage) -> None:
        """A gateway's report on a command or configuration: acknowledged to the broker once the control store
        has it (its audit entry and InfluxDB point follow from the store)."""
        assert self.control is not None
        report = self.control.open_report(msg.topic, msg.payload)
        await self.control.report(gateway, report)
        self._ack(msg.mid, msg.qos)

    def _on_written(self, result: BatchResult) -> None:
        for token in result.stored:
            if self.control is not None and isinstance(token, ControlLines):
                self._control_task(self.control.written(token))
            if not isinstance(token, _Delivery):
                continue
            self.counters["lines_written"] += token.lines
            self._settle(token, ack_end_to_end=True)
        for refused in result.refused:
            token = refused.token
            if isinstance(token, ControlLines):
                # Not retried from here: the events stay in the control store and are written again (unwritten).
                self._warn.error(("influx_refused", "control"), "InfluxDB refused %d control audit point(s) "
                                 "(HTTP %s): %s", len(token.seqs), refused.status, refused.reason,
                                 reason=str(Reason.INFLUX_REFUSED))
                continue
            if not isinstance(token, _Delivery):
                continue
            content = refused.status in _CONTENT_REFUSED
            self.counters["lines_rejected_by_influx"] += token.lines
            self.rejections[Reason.INFLUX_REFUSED] += 1
            acked = False  # sent again by the gateway, unless the refusal is this message's own fault
            if content and any(text in refused.reason for text in _STORE_LIMITS):
                # A store-wide limit (max-values-per-tag, max-series-per-database) is everyone's, not this
                # message's fault: nothing the gateway sent is wrong. It comes again until the limit is raised.
                self.counters["store_limit_refusals"] += 1
                outcome = ("a limit of the whole store: raise it in influxdb.conf or lower the collectors' [limits] "
                           "budgets (docs/operations.md#limits); the gateway sends it again")
            elif content and self.guard.learn_from_refusal(refused.reason):
                # A type conflict the guard did not foresee: the store holds a type some other writer set first
                # (another collector's gateway, in a new shard). The message followed what was known, so it is
                # not its fault; sent again, the guard leaves out the conflicting field and the rest is stored.
                self.counters["types_learnt_from_refusals"] += 1
                outcome = "learnt the store's type; the gateway sends it again"
            elif content:
                self._quarantine(token.gateway, token.topic, Reason.INFLUX_REFUSED,
                                 f"HTTP {refused.status}: {refused.reason}", token.payload, time.time_ns())
                outcome, acked = "quarantined, not retried", True
            else:
                outcome = "the gateway sends it again until the configuration is fixed"
            self._warn.error(
                ("influx_refused", token.gateway, content), "InfluxDB refused the %d lines of a message from gateway "
                "%s (HTTP %s): %s; %s", token.lines, token.gateway, refused.status, refused.reason, outcome,
                gateway=token.gateway, reason=str(Reason.INFLUX_REFUSED),
            )
            self._settle(token, ack_end_to_end=acked)
        self._work.set()  # gateways waiting for their lines to be written may go on

    def _control_task(self, coro) -> None:  # type: ignore[no-untyped-def]
        """Control-store work started from a callback; kept referenced until done, failures logged."""
        task = asyncio.ensure_future(coro)
        self._control_tasks.add(task)

        def done(t: asyncio.Future) -> None:
            self._control_tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._warn.error(("control_written",), "control store: %s", t.exception(), reason="control_store")

        task.add_done_callback(done)

    def _settle(self, token: _Delivery, *, ack_end_to_end: bool) -> None:
        self._ack(token.mid, token.qos)
        self.admission.lines_pending(token.gateway, -token.lines, -token.size)
        if ack_end_to_end and token.seq is not None:
            self.acks.add(token.gateway, token.seq)
            self._ack_session[token.gateway] = token.session_id

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.link.ack(mid, qos)

    # -- end-to-end acknowledgements ---------------------------------------------------------------------------

    async def _send_acks(self) -> None:
        while True:
            await asyncio.sleep(float(self.cfg.acks.interval))  # read each round: a reload may change it
            if self.acks:
                self._publish_acks()

    def _publish_acks(self) -> list[paho.MQTTMessageInfo]:
        """What was stored since the last call: one message per gateway (more beyond ack.MAX_RANGES ranges).

        Not retained, at the input's ack_qos: 0 on MQTT. A lost acknowledgement costs a re-send by the agent,
        whose rewrite is idempotent, so nothing here is kept for a retry, and QoS 1 would buy nothing the gateway
        could use: an agent has no persistent session (clean start), so the broker drops an acknowledgement for
        a gateway that is not connected at either QoS. What QoS 1 cost on mosquitto was measured (issue 14): a
        window of PUBACKs that, with paho's 20 in flight, capped acknowledgements near 55/s at the ~360 ms broker
        round trip seen under load, and with 1000 in flight still at ~100/s once the collector was behind, its
        PUBACKs queued at the broker behind the uplink messages it had not read yet - against ~1,000/s that
        10,000 gateways need.

        They wait (merged per gateway, nothing lost) while the link is down, and while the input holds more than
        _MAX_UNWRITTEN_PACKETS downlinks it has not written: the bound on what the collector queues there.
        """
        sent: list[paho.MQTTMessageInfo] = []
        if not self.link.connected.is_set() or self.link.unsent() > _MAX_UNWRITTEN_PACKETS:
            return sent
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
                # Sealed for the gateway's own topic; published where the broker mounts it (gw/citynerve/v1/...).
                sent.append(self.link.publish(topics.mount(self.mount, topic), payload, qos=self.link.ack_qos,
                                              retain=False))
                self.counters["acks_sent"] += 1
                self.counters["acked_seqs"] += sum(last - first + 1 for first, last in ranges)
        return sent

    async def _final_acks(self) -> None:
        # The input disconnects at once when closed: wait (briefly) until the broker has them.
        await self.link.flush(self._publish_acks(), _FINAL_ACKS_TIMEOUT)

    # -- housekeeping and reports -------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Once a second: the registry re-read off the loop (adding or revoking a gateway takes effect within a
        second, without a restart), the inventory written when due, hand-over declines reported, idle gateways'
        admission state dropped."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            if self.registry is not None:
                try:
                    changed = await loop.run_in_executor(self._files, self.registry.refresh_if_changed)
                except Exception as exc:  # a locked or vanished file: keep the registry we have, say so
                    self._warn.error(("registry",), "cannot re-read the gateway registry %s: %s", self.registry.path,
                                     exc, reason="registry_unreadable")
                else:
                    if changed:
                        log.info("gateway registry changed: %d gateway(s) enrolled", len(self.registry.list()))
            with self._handoff_lock:
                declined, self._handoff_declined = self._handoff_declined, 0
                waited, self._handoff_waited = self._handoff_waited, 0.0
            if waited:
                # paho's thread held back the broker's deliveries this long: the collector is behind, the broker
                # keeps the rest queued (latency, not declined messages)
                self.counters["intake_wait_ms"] += round(waited * 1000)
            if declined:
                self.rejections[Reason.OVERLOAD] += declined
                self._warn.warning(("overload",), "the collector fell behind the broker: declined %d message(s) at "
                                   "the hand-over bound (the gateways send them again)", declined,
                                   reason=str(Reason.OVERLOAD))
            self.admission.forget_idle(time.monotonic(), _IDLE_GATEWAY)
            await self.inventory.flush(time.monotonic())
            self._housekeeping_beat()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(float(self.cfg.log.stats_interval))  # read each round: a reload may change it
            log.info("stats: %s", self._summary())

    # -- systemd and SIGHUP -------------------------------------------------------------------------------------

    def service_status(self) -> str:
        """The line `systemctl status` shows (systemd STATUS=)."""
        online = sum(1 for state in self.gateway_state.values() if state == "online")
        link = "subscribed" if self._subscribed and self.link.connected.is_set() else "not connected to the broker"
        return (f"{link}; {self.counters['messages']} message(s), {self.counters['readings']} reading(s) so far; "
                f"{online} gateway(s) online; {self.writer.stats.pending_lines} line(s) waiting for InfluxDB")

    def request_reload(self) -> None:
        """SIGHUP (wire/cli.py run_until_signal's on_hangup, on the loop): one reload at a time; a SIGHUP during one
        makes one more afterwards."""
        if self._stopping or self._loop is None or self.config_path is None:
            log.info("SIGHUP ignored: %s", "stopping" if self._stopping else "nothing to reload")
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.get_running_loop().create_task(self.reload(), name="reload")

    async def reload(self) -> None:
        """Re-read collector.toml and apply what can change safely (collector/reload.py); re-open the registry.
        A file that does not load leaves everything as it was, and says why in one line. systemd hears RELOADING,
        then READY whatever happened (until READY it shows the unit as reloading)."""
        while True:
            self._reload_again = False
            self.service.reloading(f"reloading {self.config_path}")
            try:
                await self._reload_once()
            except Exception as exc:  # a bug: one line (the traceback at debug level); the collector goes on as it was
                log.error("reload failed: %s: %s", type(exc).__name__, exc, extra={"reason": "internal"})
                log.debug("the traceback of the failed reload", exc_info=True)
            finally:
                self.service.ready(self.service_status())
            if not self._reload_again:
                return

    async def _reload_once(self) -> None:
        assert self.config_path is not None
        loop = asyncio.get_running_loop()
        try:
            new, declared = await loop.run_in_executor(self._files, _load_for_reload, self.config_path)
        except ConfigError as exc:
            log.error("reload refused, carrying on as before: %s", exc, extra={"reason": "config_invalid"})
        else:
            self._apply(reloading.plan(self.cfg, new), declared)
        if self.registry is not None:
            try:
                await loop.run_in_executor(self._files, self.registry.reopen)
            except Exception as exc:  # a file that cannot be opened now: the registry read before stays
                log.error("reload: cannot re-open the gateway registry %s (%s); the one read before stays",
                          self.registry.path, exc, extra={"reason": "registry_unreadable"})
            else:
                log.info("reload: gateway registry %s re-read, %d gateway(s) enrolled", self.registry.path,
                         len(self.registry.list()))

    def _apply(self, plan: reloading.ReloadPlan, declared: FieldTypes) -> None:
        cfg = plan.config
        self.cfg = cfg  # one attribute: paho's thread sees the old or the new limits, never a mix
        self.admission.set_limits(cfg.limits.admission(), time.monotonic())
        self.guard.limits = cfg.limits.guard()
        for measurement, fields in declared.items():
            for name, kind in fields.items():
                self.guard.declare(measurement, name, kind)
        v = cfg.validation
        self.ingest.max_payload_bytes = v.max_payload_bytes
        self.ingest.time_policy = _time_policy(v)
        self.ingest.suspect_measurement = v.suspect_measurement
        self.ingest.accept_plain = cfg.security is None or cfg.security.accept_plain
        inv = cfg.inventory
        self.inventory.set_intervals(float(inv.flush_interval), float(inv.info_interval), float(inv.health_interval))
        fmt, level = self.log_override
        setup_logging(fmt or cfg.log.format, level or cfg.log.level)
        log.info("reloaded %s: %s%s", self.config_path,
                 f"applied {', '.join(plan.applied)}" if plan.applied else "no change to apply",
                 f"; changed but waiting for a restart: {', '.join(plan.restart)}" if plan.restart else "",
                 extra={"applied": len(plan.applied), "restart": len(plan.restart)})

    def _summary(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.counters.items())]
        parts += [f"rejected.{k}={v}" for k, v in sorted(self.rejections.items())]
        if self.quarantine is not None:
            if self.quarantine.dropped:
                parts.append(f"quarantine_dropped={self.quarantine.dropped}")
            if self.quarantine.sampled_out:
                parts.append(f"quarantine_sampled_out={self.quarantine.sampled_out}")
        return " ".join(parts) or "no messages"


def _load_for_reload(path: str) -> tuple[CollectorConfig, FieldTypes]:
    """(the registry thread) The file and the field types it declares: both read off the loop."""
    cfg = load_config(path)
    return cfg, cfg.schema.declared()


def _time_policy(v: ValidationSection) -> TimePolicy:
    return TimePolicy(int(v.max_future * 1e9), int(v.min_time.timestamp()) * 1_000_000_000, int(v.max_past * 1e9))


def _nothing() -> None:
    return None


def _on_a_loop() -> bool:
    """Whether this thread runs an asyncio event loop (the collector's: then it must never block)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


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
