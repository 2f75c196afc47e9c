"""The agent's control plane: operators' signed documents from <prefix>/<gw>/down/control, verified on the
gateway itself, commands run on the bus that owns the device, reports sent on <prefix>/<gw>/report
(docs/control.md "Commands to devices"; the contract is wire/control.py).

One downlink (`ControlPlane.received`, on the event loop), in this order:

1. open the confidential downlink (wire/seal.py format 0x04: sealed by a collector to this gateway's session
   and to this topic; the broker can neither read nor forge it);
2. decode `ControlDown`; offer its revocation list to `Trust` (a newer one is kept, and persisted in the state
   directory so that a restart cannot roll revocations back);
3. a configuration: verified and handed to `on_config` (remote configuration), refused while there is none;
4. a command: the command store first - an id seen before never runs again, its stored report is sent again;
   then the signatures (`Trust.verify`, two different operators for a point marked critical), then the agent's
   own rules (device known, point writable in its profile and opted in by the device, value in range and on
   step); then it is recorded as started, durably, BEFORE the bus is touched, runs on the bus engine (one
   transaction ahead of the next poll, then the point is read back), and its report is recorded and sent.
   An id found started but never finished at start-up (the agent was killed meanwhile) is reported
   `failed: interrupted` and never run again: the write may or may not have happened.

Refused and invalid downlinks are counted (`stats`) and logged, rate-limited; none of them ends the agent.
Threads: the event loop decides; every SQLite call and file write runs on the "commands" thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.modbus.bus import BusCommand, BusEngine, CommandResult, PolledDevice
from edge_agent.modbus.write import WritePoint
from wire.cli import iso_ns
from wire.control import (
    Command,
    CommandFailure,
    ConfigDoc,
    ControlReason,
    ControlRefused,
    OperatorCert,
    Report,
    SignedDoc,
    Trust,
    decode_down,
    decode_report,
    encode,
    read_doc,
)
from wire.files import SQLITE_COMPANIONS, private_sqlite, write_private
from wire.logs import RateLimitedLog
from wire.seal import GatewaySealer, SealError

log = logging.getLogger("citynerve.control")

STORE_FILE = "commands.sqlite3"
CRL_FILE = "operator.crl"  # the newest operator revocation list seen (msgpack SignedCrl, wire/control.py)
# Executed ids are kept this long after their deadline: Trust.verify refuses a command past its deadline, so an
# id forgotten later cannot run again - unless the gateway's clock is stepped back by more than this.
KEEP_AFTER_DEADLINE_MS = 3600 * 1000
MAX_STORED_COMMANDS = 100_000  # beyond, new commands are refused (queue_full) until old ids expire
MAX_COMMANDS_IN_FLIGHT = 64  # verified or waiting for the store or a bus, on this gateway
MAX_DETAIL = 2000  # Report.detail holds 2048 characters

_T = TypeVar("_T")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the command store (SQLite, the "commands" thread) -----------------------------------------------------------


class CommandStore:
    """Command ids this gateway started, with their final report once there is one. Every method runs on the
    ControlPlane's "commands" thread; each write is committed (WAL, synchronous=FULL) before it returns, so
    "started" is on disk before the bus is touched.

    A damaged file is moved aside and a new one started; since the ids it held are lost, commands issued before
    that moment are refused from then on (`not_before_ms`): they might have run already."""

    def __init__(self, path: Path, now: int) -> None:
        self.path = path
        self.not_before_ms = 0
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            moved = path.with_name(f"{path.name}.damaged-{now}")
            for suffix in ("", *SQLITE_COMPANIONS):
                if os.path.lexists(f"{path}{suffix}"):
                    os.replace(f"{path}{suffix}", f"{moved}{suffix}")
            log.error("command store %s is damaged (%s): moved to %s; commands issued before now are refused, "
                      "since they may have run already", path, exc, moved)
            self._conn = self._open()
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('not_before_ms', ?)", (now,))
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'not_before_ms'").fetchone()
        self.not_before_ms = int(row[0]) if row else 0

    def _open(self) -> sqlite3.Connection:
        private_sqlite(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None)  # autocommit: every statement is a transaction
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            conn.execute("CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY, doc_sha256 TEXT NOT NULL, "
                         "deadline_ms INTEGER NOT NULL, started_ms INTEGER NOT NULL, report BLOB)")
            conn.execute("CREATE INDEX IF NOT EXISTS commands_deadline ON commands (deadline_ms)")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        except BaseException:
            conn.close()
            raise
        return conn

    def interrupted(self, now: int) -> list[Report]:
        """Ids started and never finished (the agent stopped in between): they end `failed: interrupted`, now."""
        reports = []
        for command_id, started in self._conn.execute(
                "SELECT id, started_ms FROM commands WHERE report IS NULL ORDER BY started_ms").fetchall():
            report = Report(kind="command", id=command_id, state="failed", at_ms=now,
                            reason=CommandFailure.INTERRUPTED,
                            detail=f"the agent stopped while running it (started {_iso(started)}); it was not run "
                                   f"again: the write may or may not have happened, read the point")
            self._conn.execute("UPDATE commands SET report = ? WHERE id = ?", (encode(report), command_id))
            reports.append(report)
        return reports

    def lookup(self, command_id: str) -> tuple[str, bytes | None] | None:
        row = self._conn.execute("SELECT doc_sha256, report FROM commands WHERE id = ?", (command_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def start(self, command_id: str, doc_sha256: str, deadline_ms: int, now: int) -> bool:
        """Record the id as started; False when the store is full (nothing recorded: do not run it)."""
        self._conn.execute("DELETE FROM commands WHERE deadline_ms < ? AND report IS NOT NULL",
                           (now - KEEP_AFTER_DEADLINE_MS,))
        if self._conn.execute("SELECT count(*) FROM commands").fetchone()[0] >= MAX_STORED_COMMANDS:
            return False
        self._conn.execute("INSERT INTO commands VALUES (?, ?, ?, ?, NULL)", (command_id, doc_sha256, deadline_ms, now))
        return True

    def finish(self, command_id: str, report: bytes) -> None:
        self._conn.execute("UPDATE commands SET report = ? WHERE id = ?", (report, command_id))

    def close(self) -> None:
        self._conn.close()


# --- the agent's own rules (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What a verified command does: write `words` to `point` of `device` on `engine`, or poll it (point None)."""

    engine: BusEngine
    device: PolledDevice
    point: WritePoint | None = None
    words: tuple[int, ...] = ()


Devices = dict[str, tuple[BusEngine, PolledDevice]]


def devices_of(engines: Iterable[BusEngine]) -> Devices:
    return {device.id: (engine, device) for engine in engines for device in engine.devices}


def approvals_needed(command: Command, devices: Devices) -> int:
    """Distinct operators that must have signed: 2 for a write to a point its profile marks critical."""
    entry = devices.get(command.device)
    if entry is not None and command.action == "write" and command.point is not None:
        point = entry[1].writes.get(command.point)
        if point is not None and point.critical:
            return 2
    return 1


def plan_command(command: Command, devices: Devices, serial_ids: frozenset[str] = frozenset()) -> Job:
    """The job of a command whose signatures verified, or ControlRefused with the agent's reason: the device
    must be a device on a bus of this gateway (a DL/T 645, CJ/T 188 or M-Bus meter can only be polled now); a
    write needs a point its profile declares writable AND the device opted in to (agent.toml `writable`), and a
    value in range and on step."""
    entry = devices.get(command.device)
    if entry is None:
        if command.device in serial_ids:
            raise ControlRefused(ControlReason.UNKNOWN_DEVICE, f"{command.device} is a serial device: commands reach "
                                                               f"the devices of [[buses]] only")
        raise ControlRefused(ControlReason.UNKNOWN_DEVICE, f"no device {command.device!r} on the buses of this gateway")
    engine, device = entry
    if command.action == "poll_now":
        return Job(engine, device)
    if device.meter is not None:
        raise ControlRefused(ControlReason.NOT_WRITABLE, f"{command.device} is a {device.meter.describe()}: read "
                                                         f"only (it can be polled now)")
    if command.point is None or command.value is None:
        raise ControlRefused(ControlReason.MALFORMED, "a write names a point and a value")
    point = device.writes.get(command.point)
    if point is None:
        if command.point in device.profile_writable:
            raise ControlRefused(ControlReason.NOT_WRITABLE, f"{command.device}/{command.point} is writable in its "
                                                             f"profile, but the device does not opt in to it "
                                                             f"(agent.toml devices[].writable)")
        if command.point in device.points:
            raise ControlRefused(ControlReason.NOT_WRITABLE, f"{command.device}/{command.point} is not writable")
        raise ControlRefused(ControlReason.UNKNOWN_POINT, f"device {command.device} has no point {command.point!r}")
    return Job(engine, device, point, tuple(point.registers_for(command.value)))


# --- the shell ----------------------------------------------------------------------------------------------------


class ControlPlane:
    """Receives down/control, decides, runs, reports. `on_config` is the hook for remote configuration: called
    (on the event loop) with a verified configuration and its operators; None refuses configurations."""

    def __init__(self, *, gateway: str, topic: str, sealer: GatewaySealer, operator_ca: Ed25519PublicKey | None,
                 engines: Iterable[BusEngine], serial_ids: Iterable[str], state_dir: Path,
                 send_report: Callable[[Report], None]) -> None:
        self.gateway = gateway
        self.topic = topic  # as subscribed: what the collector sealed for
        self.sealer = sealer
        self.operator_ca = operator_ca
        self.devices = devices_of(engines)
        self.serial_ids = frozenset(serial_ids)
        self.state_dir = state_dir
        self.send_report = send_report
        self.on_config: Callable[[ConfigDoc, list[OperatorCert]], None] | None = None
        self.trust: Trust | None = None
        self.stats: Counter[str] = Counter()
        self._store: CommandStore | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="commands")
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_reports: list[Report] = []  # interrupted commands found at start, sent once the link is up
        self._log = RateLimitedLog(log, interval=60)

    def devices_changed(self, engines: Iterable[BusEngine], serial_ids: Iterable[str]) -> None:
        """A live reconfiguration (edge_agent/app.py `Agent.reconfigure`) rebuilt buses: commands from now on go
        to the engines that run. One running on a stopped bus ends `failed: interrupted` (BusEngine)."""
        self.devices = devices_of(engines)
        self.serial_ids = frozenset(serial_ids)

    # -- life cycle -------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the command store (ids started and never finished become `failed: interrupted`) and load the
        newest revocation list seen before."""

        def job() -> tuple[CommandStore, bytes | None, list[Report]]:
            now = now_ms()
            store = CommandStore(self.state_dir / STORE_FILE, now)
            try:
                saved = (self.state_dir / CRL_FILE).read_bytes()
            except FileNotFoundError:
                saved = None
            return store, saved, store.interrupted(now)

        self._store, saved_crl, interrupted = await self._call(job)
        if self.operator_ca is None:
            log.warning("no operator CA ([security] operator_ca): this gateway accepts no commands and no "
                        "configurations (docs/control.md)")
        else:
            self.trust = Trust(self.operator_ca, saved_crl)
            crl = self.trust.crl
            log.info("commands: operator CA %s, revocation list %s; %d device(s) with writable points",
                     self.trust.ca_kid.hex(), f"number {crl.number}" if crl else "none yet",
                     sum(1 for _, d in self.devices.values() if d.writes))
        for report in interrupted:
            log.warning("command %s was interrupted by the agent's stop: reported failed, not run again", report.id,
                        extra={"command": report.id})
        self._start_reports = interrupted

    def link_up(self) -> None:
        """The uplink is connected: send what start-up found."""
        reports, self._start_reports = self._start_reports, []
        for report in reports:
            self.send_report(report)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            if self._store is not None:
                await self._call(self._store.close)
        finally:
            self._store = None
            self._executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- one downlink (event loop) ----------------------------------------------------------------------------

    def received(self, payload: bytes) -> None:
        """A message on down/control. Never raises: what is wrong with it is counted and logged."""
        self.stats["received"] += 1
        now = now_ms()
        try:
            down = decode_down(self.sealer.open_confidential(self.topic, payload))
        except SealError as exc:
            self._invalid(f"seal_{exc.reason}", "ignored a control downlink: %s (%s)", exc.reason, exc.detail)
            return
        except ControlRefused as exc:
            self._invalid("malformed", "ignored a control downlink: %s", exc.detail)
            return
        item = down.item
        doc: Command | ConfigDoc | None = None
        if item is not None:
            try:
                doc = read_doc(item)
            except ControlRefused as exc:  # no id to report on
                self._invalid("malformed", "ignored a %s: %s", item.kind, exc.detail)
                item = None
        if self.trust is None:
            if doc is not None:
                self._refused(doc, ControlRefused(ControlReason.UNKNOWN_CA, "this gateway has no operator CA "
                                                  "([security] operator_ca): it accepts no control documents"))
            return
        try:
            if self.trust.offer_crl(down.crl, now):
                self._persist_crl()
        except ControlRefused as exc:
            self._invalid(f"crl_{exc.reason}", "ignored the revocation list of a control downlink: %s: %s",
                          exc.reason, exc.detail)
        if item is None or doc is None:
            return
        if isinstance(doc, ConfigDoc):
            self._configuration(item, doc, now)
        else:
            self._command(item, doc, now)

    def _invalid(self, counter: str, msg: str, *args: Any) -> None:
        self.stats[counter] += 1
        self._log.warning(counter, msg + " (%d so far)", *args, self.stats[counter], reason=counter)

    def _persist_crl(self) -> None:
        assert self.trust is not None
        data = self.trust.crl_bytes()
        assert data is not None
        crl = self.trust.crl
        log.info("operator revocation list number %d taken (%d revoked)", crl.number if crl else 0,
                 len(crl.revoked) if crl else 0)
        # Not a task: it must not be cancelled at shutdown. The thread runs jobs in order: the newest list wins.
        done = asyncio.get_running_loop().run_in_executor(self._executor, write_private, self.state_dir / CRL_FILE,
                                                          data)
        done.add_done_callback(self._crl_persisted)

    def _crl_persisted(self, done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is not None:
            self._log.error("persist_crl", "could not keep the operator revocation list in %s: %s (a restart "
                            "would wait for the next one)", self.state_dir / CRL_FILE, done.exception())

    def _refused(self, doc: Command | ConfigDoc, refused: ControlRefused) -> None:
        kind, doc_id = ("command", doc.id) if isinstance(doc, Command) else ("config", str(doc.version))
        reason = str(refused.reason)
        self.stats[f"refused_{reason}"] += 1
        what = (f"{doc.action} {doc.device}" + (f"/{doc.point} = {doc.value!r}" if doc.point else "")
                if isinstance(doc, Command) else f"configuration version {doc_id}")
        self._log.warning(("refused", reason), "refused %s %s (%s): %s: %s", kind, doc_id, what, reason,
                          refused.detail, reason=reason, document=doc_id)
        state = "expired" if refused.reason == ControlReason.EXPIRED else "refused"
        self.send_report(Report(kind=kind, id=doc_id, state=state, at_ms=now_ms(), reason=reason,  # type: ignore[arg-type]
                                detail=refused.detail[:MAX_DETAIL]))

    # -- configurations ----------------------------------------------------------------------------------------

    def _configuration(self, item: SignedDoc, doc: ConfigDoc, now: int) -> None:
        assert self.trust is not None
        if self.on_config is None:
            self._refused(doc, ControlRefused(ControlReason.MALFORMED, "this agent does not take configurations yet"))
            return
        try:
            verified, operators = self.trust.verify(item, gateway=self.gateway, now_ms=now)
        except ControlRefused as exc:
            self._refused(doc, exc)
            return
        assert isinstance(verified, ConfigDoc)
        try:
            self.on_config(verified, operators)
        except Exception:  # the hook's bug must not end the agent
            self.stats["errors"] += 1
            log.exception("configuration version %d: the configuration hook failed", verified.version)

    # -- commands ----------------------------------------------------------------------------------------------

    def _command(self, item: SignedDoc, doc: Command, now: int) -> None:
        if doc.id in self._inflight:  # a redelivery while it runs: its report follows
            self.stats["redelivered_running"] += 1
            return
        if len(self._inflight) >= MAX_COMMANDS_IN_FLIGHT:
            self._finished(doc, Report(kind="command", id=doc.id, state="failed", at_ms=now_ms(),
                                       reason=CommandFailure.QUEUE_FULL,
                                       detail=f"{MAX_COMMANDS_IN_FLIGHT} commands are in progress on this gateway"))
            return
        self._inflight.add(doc.id)
        self._spawn(self._run(item, doc, now), f"command:{doc.id}")

    async def _run(self, item: SignedDoc, doc: Command, now: int) -> None:
        try:
            await self._decide_and_run(item, doc, now)
        finally:
            self._inflight.discard(doc.id)

    async def _decide_and_run(self, item: SignedDoc, doc: Command, now: int) -> None:
        assert self.trust is not None and self._store is not None
        store = self._store
        sha = hashlib.sha256(item.doc).hexdigest()
        try:
            known = await self._call(store.lookup, doc.id)
        except (sqlite3.Error, OSError) as exc:
            self._finished(doc, Report(kind="command", id=doc.id, state="failed", at_ms=now_ms(),
                                       reason=CommandFailure.STORE_FAILED,
                                       detail=f"not run: the command store failed ({exc})"))
            return
        if known is not None:
            self._again(doc, sha, *known)
            return
        if doc.issued_ms < store.not_before_ms:
            self._refused(doc, ControlRefused(ControlReason.REPLAYED, (
                f"issued {_iso(doc.issued_ms)}, before this gateway's command store was reset "
                f"({_iso(store.not_before_ms)}): it may have run already")))
            return
        try:
            doc_verified, operators = self.trust.verify(item, gateway=self.gateway, now_ms=now,
                                                        required=approvals_needed(doc, self.devices))
            assert isinstance(doc_verified, Command)
            job = plan_command(doc_verified, self.devices, self.serial_ids)
        except ControlRefused as exc:
            self._refused(doc, exc)
            return
        names = ", ".join(o.name for o in operators)
        try:
            started = await self._call(store.start, doc.id, sha, doc.deadline_ms, now_ms())
        except (sqlite3.Error, OSError) as exc:
            self._finished(doc, Report(kind="command", id=doc.id, state="failed", at_ms=now_ms(),
                                       reason=CommandFailure.STORE_FAILED,
                                       detail=f"not run: the command store failed ({exc})"))
            return
        if not started:
            self._finished(doc, Report(kind="command", id=doc.id, state="failed", at_ms=now_ms(),
                                       reason=CommandFailure.QUEUE_FULL,
                                       detail=f"not run: {MAX_STORED_COMMANDS} command ids are kept already"))
            return
        log.info("command %s by %s: %s %s%s", doc.id, names, doc.action, doc.device,
                 f"/{doc.point} = {doc.value!r}" if doc.point else "", extra={"command": doc.id, "device": doc.device})
        result = await self._execute(job, doc)
        report = Report(kind="command", id=doc.id, state=result.state, at_ms=now_ms(), reason=str(result.reason),
                        detail=result.detail[:MAX_DETAIL], value=result.value)
        await self._finished_async(doc, report)

    async def _execute(self, job: Job, doc: Command) -> CommandResult:
        command = BusCommand(job.device, doc.deadline_ms, job.point, list(job.words), doc.value)
        if not job.engine.submit(command):
            return CommandResult("failed", reason=CommandFailure.QUEUE_FULL,
                                 detail=f"bus {job.engine.bus.id} has too many commands waiting")
        try:
            return await command.result
        except asyncio.CancelledError:
            if not command.result.cancelled():
                raise  # this task is being cancelled (the agent stops): the store keeps it "started"
            return CommandResult("failed", reason=CommandFailure.INTERRUPTED, detail="the bus stopped before it ran")

    def _again(self, doc: Command, sha: str, stored_sha: str, stored: bytes | None) -> None:
        """A command id seen before: never run again. Its report is sent again (the first may have been lost)."""
        self.stats["redelivered"] += 1
        if sha != stored_sha:
            self._log.warning(("reused", doc.id), "command id %s came again with another document: not run; "
                              "its first document's report is sent again", doc.id, command=doc.id)
        if stored is None:  # started, never finished, and not running here: a failed store write after the bus
            report = Report(kind="command", id=doc.id, state="failed", at_ms=now_ms(),
                            reason=CommandFailure.INTERRUPTED, detail="its result was never recorded; not run again")
        else:
            report = decode_report(stored)
        log.info("command %s came again: not run again, its report (%s) sent again", doc.id, report.state,
                 extra={"command": doc.id})
        self.send_report(report)

    def _finished(self, doc: Command, report: Report) -> None:
        """A final report that is not recorded: the command never reached the store, so it never ran."""
        self.stats[report.state] += 1
        log.warning("command %s %s (%s): %s", doc.id, report.state, report.reason, report.detail,
                    extra={"command": doc.id})
        self.send_report(report)

    async def _finished_async(self, doc: Command, report: Report) -> None:
        assert self._store is not None
        self.stats[report.state] += 1
        try:
            await self._call(self._store.finish, doc.id, encode(report))
        except (sqlite3.Error, OSError) as exc:
            self._log.error("store_finish", "command %s: its report could not be recorded (%s); it will not run "
                            "again", doc.id, exc, command=doc.id)
        level = logging.INFO if report.state == "done" else logging.WARNING
        log.log(level, "command %s %s%s%s", doc.id, report.state,
                f" ({report.reason})" if report.reason else "",
                f": {doc.point} reads back {report.value!r}" if report.value is not None else
                (f": {report.detail}" if report.detail else ""), extra={"command": doc.id})
        self.send_report(report)

    # -- tasks ----------------------------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug: logged, counted; the agent goes on
            self.stats["errors"] += 1
            self._log.log(logging.ERROR, ("task", task.get_name()), "control task %s failed: %r", task.get_name(),
                          exc)


def _iso(ms: int) -> str:
    return iso_ns(ms * 1_000_000)
