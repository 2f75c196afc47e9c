"""The running collector's side of the control plane (docs/control.md): it relays, it does not decide.

    reports in     <mount><prefix>/+/report, admitted like uplinks (per gateway, bounded), opened with the same
                   Opener (a report is a sealed uplink on another leaf: a forged or unsealed one is rejected and
                   quarantined like an uplink), then the store updates the row of the gateway whose seal it
                   carries - never one named by the report's content.
    downlinks out  once per poll_interval (and at once after a report or on a wake-up): the store's due work
                   (collector/control_store.py due()) sealed with Opener.seal_confidential to the gateway's
                   newest verified session and published at QoS 1 on <mount><prefix>/<gw>/down/control as
                   ControlDown{crl, item}. A gateway with no session here yet waits until its next uplink.
    audit          every change in the store (events) is appended to the hash-chained audit log
                   (collector/audit.py) and written to InfluxDB as citynerve_command / citynerve_config points.

Everything that blocks (SQLite, the audit log's fsync, the revocation list file) runs on the "control" thread;
the Opener and MQTT are used on the event loop only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from collector.config import ControlSection
from collector.control_store import ControlStore, Due, Event
from collector.influx.lineproto import LineProtocolError, encode_line
from wire import control, topics
from wire.envelope import Rejection, WireError
from wire.logs import RateLimitedLog
from wire.seal import FORMAT_SEALED, Opener, SealError

log = logging.getLogger("citynerve.collector.control")

COMMAND_MEASUREMENT = "citynerve_command"
CONFIG_MEASUREMENT = "citynerve_config"
MAX_REPORT_BYTES = 16 * 1024  # a Report is a few hundred bytes; its detail at most 2 KiB
_EVENTS_PER_POLL = 500  # audit entries and points per poll: a backlog drains over a few seconds, bounded
_UNWRITTEN_AFTER_MS = 60_000  # audited events whose points InfluxDB has not confirmed by then are written again


@dataclass(frozen=True)
class ControlLines:
    """The writer's token for control points: the events to forget once InfluxDB stored them."""

    seqs: tuple[int, ...]


def event_line(event: Event) -> bytes | None:
    """An event as one InfluxDB point. Tags are few-valued (gateway, device, point, operator names, state,
    reason code, action); the command id, values, version and hash are fields, so the series stay bounded.
    The time is the event's, plus its sequence number in nanoseconds: two events of one millisecond are two
    points, and writing an event again (unwritten) writes the same point."""
    time_ns = event.at_ms * 1_000_000 + event.seq % 1_000_000
    fields: dict[str, Any] = {}
    if event.kind == "command":
        tags = {"gateway": event.gateway, "device": event.device, "point": event.point, "operator": event.operators,
                "state": event.state, "reason": event.reason, "action": event.action}
        fields["id"] = event.ref
        for name in ("value", "readback"):
            number = getattr(event, name)
            if isinstance(number, bool | int | float):
                fields[name] = float(number)  # one type for every point (a coil's true is 1.0)
        measurement = COMMAND_MEASUREMENT
    else:
        tags = {"gateway": event.gateway, "operator": event.operators, "state": event.state, "reason": event.reason}
        fields["version"] = int(event.ref)
        if event.sha256:
            fields["sha256"] = event.sha256
        measurement = CONFIG_MEASUREMENT
    if event.detail:
        fields["detail"] = event.detail
    try:
        return encode_line(measurement, tags, fields, time_ns)
    except LineProtocolError:
        return None


def audit_entry(event: Event) -> dict[str, Any]:
    """An event as an audit log entry: who, what, on which target, with which result, when."""
    entry: dict[str, Any] = {
        "at": dt.datetime.fromtimestamp(event.at_ms / 1000, dt.UTC).isoformat(timespec="milliseconds"),
        "kind": event.kind, "gateway": event.gateway,
        ("id" if event.kind == "command" else "version"): event.ref if event.kind == "command" else int(event.ref),
        "state": event.state, "operators": event.operators.split("+") if event.operators else [],
    }
    for key in ("device", "point", "action", "reason", "detail", "sha256"):
        if value := getattr(event, key):
            entry[key] = value
    if event.value is not None:
        entry["value"] = event.value
    if event.readback is not None:
        entry["readback"] = event.readback
    return entry


class CrlFile:
    """The current operator revocation list, read again when the file changes (its mtime or size)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.signed: control.SignedCrl | None = None
        self.error = ""
        self._stamp: tuple[int, int] | None = None

    def refresh(self) -> bool:
        """True if the list changed. On a missing or unreadable file the last good list is kept."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror}"
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            with open(self.path, encoding="ascii") as fh:
                signed = control.decode_signed_crl(control.unarmour("OPERATOR CRL", fh.read()))
            control.read_crl(signed)
        except (OSError, ValueError, control.ControlRefused) as exc:
            self.error = f"{self.path}: {exc}"
            return False
        self.signed, self.error = signed, ""
        return True


@dataclass
class _Poll:
    lines: list[bytes]
    seqs: tuple[int, ...]
    due: list[Due]
    crl: control.SignedCrl | None
    crl_changed: bool


class ControlRelay:
    def __init__(self, cfg: ControlSection, prefix: str, mount: str, opener: Opener,
                 publish: Callable[[str, bytes], object],
                 write: Callable[[list[bytes], ControlLines], Awaitable[None]], counters: Counter[str],
                 warn: RateLimitedLog) -> None:
        self.cfg = cfg
        self.prefix = prefix
        self.mount = mount
        self.opener = opener
        self._publish = publish
        self._write = write
        self.counters = counters
        self._warn = warn
        self._exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="control")
        self.store: ControlStore | None = None
        self._audit: Any = None
        self.crl = CrlFile(cfg.crl)
        self._wake = asyncio.Event()
        # what each gateway's heartbeat last said it runs: the store is written only when that changes
        self._running: dict[str, tuple[int, str]] = {}

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def start(self) -> None:
        def open_() -> None:
            from collector.audit import AuditLog

            self.store = ControlStore(self.cfg.store)
            self._audit = AuditLog(self.cfg.audit_log)

        await self._call(open_)
        log.info("control: store %s, audit log %s, operator revocation list %s", self.cfg.store, self.cfg.audit_log,
                 self.cfg.crl)

    async def close(self) -> None:
        if self.store is not None:
            await self._call(self.store.close)
        self._exec.shutdown(wait=False)

    def wake(self) -> None:
        self._wake.set()

    # -- reports ------------------------------------------------------------------------------------------------

    def open_report(self, topic: str, payload: bytes) -> control.Report:
        """An authentic report of the topic's gateway; WireError (a Rejection or SealReason) otherwise."""
        if len(payload) > MAX_REPORT_BYTES:
            raise WireError(Rejection.TOO_LARGE, f"{len(payload)} bytes > limit {MAX_REPORT_BYTES} for a report")
        parsed = topics.parse(self.prefix, topic)
        if parsed is None or parsed[1] != topics.REPORT:
            raise WireError(Rejection.BAD_TOPIC, f"not a report topic under {self.prefix}/: {topic!r}")
        if payload[:1] != bytes((FORMAT_SEALED,)):
            fmt = f"0x{payload[0]:02x}" if payload else "empty"
            raise WireError(Rejection.UNSEALED, f"format {fmt}: a report must be sealed (0x02)")
        try:
            opened = self.opener.open(parsed[0], topic, payload)
        except SealError as exc:
            raise WireError(exc.reason, exc.detail) from None
        try:
            return control.decode_report(opened.plaintext)
        except control.ControlRefused as exc:
            raise WireError(Rejection.MALFORMED, exc.detail) from None

    async def report(self, gateway: str, report: control.Report) -> str | None:
        """Apply a report of `gateway` (the gateway whose seal it carries); the row's new state or None."""
        assert self.store is not None
        state = await self._call(self.store.apply_report, gateway, report, _now_ms())
        self.counters["control_reports"] += 1
        if state is not None:
            log.info("gateway %s reports %s %s: %s%s", gateway, report.kind, report.id, state,
                     f" ({report.reason}: {report.detail})" if report.reason else "", extra={"gateway": gateway})
            self._wake.set()  # its audit entry and point now, not at the next tick
        if report.config_version:
            self._running[gateway] = (report.config_version, report.config_sha256)
        return state

    async def observe_running(self, gateway: str, version: int, sha256: str) -> None:
        """What a status heartbeat says the gateway runs; written when it changed."""
        if self.store is None or self._running.get(gateway) == (version, sha256):
            return
        await self._call(self.store.observe_running, gateway, version, sha256, "status", _now_ms())
        self._running[gateway] = (version, sha256)

    # -- the poll loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        interval = float(self.cfg.poll_interval)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            try:
                work: _Poll = await self._call(self._poll, _now_ms())
            except Exception as exc:  # a locked or damaged store, an audit log that cannot be written: say so, retry
                self._warn.error(("control",), "control store %s or audit log %s: %s", self.cfg.store,
                                 self.cfg.audit_log, exc, reason="control_store")
                continue
            if work.crl_changed:
                log.info("operator revocation list %s: number %d", self.cfg.crl,
                         control.read_crl(work.crl).number if work.crl else 0)
            if work.lines:
                await self._write(work.lines, ControlLines(work.seqs))
            if work.due:
                sent = self._send(work.due, work.crl)
                if sent:
                    await self._call(self.store.mark_sent, sent, _now_ms())  # type: ignore[union-attr]
                    self._wake.set()  # their "sent" events into the audit log now, not at the next tick

    def _poll(self, now_ms: int) -> _Poll:
        """On the control thread: the revocation list, expiry, audit, the points to write and the work due."""
        store = self.store
        assert store is not None
        changed = self.crl.refresh()
        store.expire(now_ms)
        events = store.drain_events(_EVENTS_PER_POLL, now_ms, self._append_audit)
        events += store.unwritten(now_ms - _UNWRITTEN_AFTER_MS, now_ms, _EVENTS_PER_POLL)
        lines = [line for line in map(event_line, events) if line is not None]
        due: list[Due] = []
        if self.crl.signed is not None:
            due = store.due(now_ms, resend_ms=int(float(self.cfg.resend_interval) * 1000),
                            max_inflight=self.cfg.max_inflight, limit=self.cfg.max_sends)
        elif store.due(now_ms, resend_ms=0, max_inflight=1, limit=1):
            self._warn.error(("control_crl",), "nothing can be sent to gateways: no operator revocation list (%s); "
                             "run edge-collector operators crl", self.crl.error or self.cfg.crl, reason="no_crl")
        return _Poll(lines, tuple(e.seq for e in events), due, self.crl.signed, changed)

    def _append_audit(self, events: list[Event]) -> None:
        for event in events:
            self._audit.append(audit_entry(event))
        self.counters["control_audit_entries"] += len(events)

    async def written(self, token: ControlLines) -> None:
        if self.store is not None:
            await self._call(self.store.written, list(token.seqs))

    def _send(self, due: list[Due], crl: control.SignedCrl | None) -> list[Due]:
        """On the loop (the Opener's thread): seal and publish; what went out."""
        assert crl is not None
        sent = []
        for item in due:
            topic = topics.down(self.prefix, item.gateway, control.KIND)
            session = self.opener.newest_session(item.gateway)
            if session is None:
                self.counters["control_waiting_for_session"] += 1
                self._warn.log(logging.INFO, ("control_session", item.gateway), "gateway %s: %s %s waits for the "
                               "gateway's next uplink (no verified session here to seal it to)", item.gateway,
                               item.kind, item.ref, gateway=item.gateway, reason="no_session")
                continue
            plaintext = control.encode(control.ControlDown(crl, control.decode_signed_doc(item.signed)))
            try:
                payload = self.opener.seal_confidential(item.gateway, session, topic, plaintext)
            except SealError as exc:  # evicted or revoked meanwhile
                self._warn.warning(("control_seal", item.gateway), "cannot send to gateway %s: %s", item.gateway, exc,
                                   gateway=item.gateway, reason=str(exc.reason))
                continue
            # Sealed for the gateway's own topic; published where the broker mounts it, as acks are.
            self._publish(topics.mount(self.mount, topic), payload)
            self.counters[f"control_sent.{item.kind}"] += 1
            log.info("sent %s %s to gateway %s", item.kind, item.ref, item.gateway, extra={"gateway": item.gateway})
            sent.append(item)
        return sent


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
