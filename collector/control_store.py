"""The control store: what operators asked of gateways and what the gateways said about it (docs/control.md).

One SQLite file (WAL, 0600), written by the `edge-collector config|command` CLI and by the running collector(s)
on their "control" thread; SQLite's own locking orders them (every read-modify-write is one BEGIN IMMEDIATE
transaction, so two processes never both take version 7 or both release a command).

    configs   per gateway and version: the desired configuration's text, its signed document, who signed it,
              and its state on that gateway: pending -> sent -> received -> applied -> confirmed | running,
              or refused | rolled_back | expired | superseded (a newer version was pushed before it was final)
    commands  per command id: gateway, device, point, value, the signed document and its approvals, and its
              state: awaiting_approval -> pending -> sent -> running -> done | refused | expired | failed
    running   per gateway: the configuration version and hash it last said it runs (reports, heartbeats)
    events    every change above, in order, until the running collector has written it to the audit log and
              InfluxDB (drain_events): the CLI never writes to either, so there is one writer of each

A report can only ever change its own gateway's rows: every update below is keyed by (gateway, id) where the
gateway is the one whose sealed report it was, never a name taken from the report's content.

The state transitions are pure functions (command_transition, config_transition), tested without SQLite.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from wire.control import Command, ConfigDoc, Report, SignedDoc, encode
from wire.files import private_sqlite

# -- states ---------------------------------------------------------------------------------------------------

COMMAND_OPEN = ("awaiting_approval", "pending", "sent", "running")
COMMAND_FINAL = ("done", "refused", "expired", "failed")
CONFIG_OPEN = ("pending", "sent", "received", "applied")
CONFIG_FINAL = ("confirmed", "running", "refused", "rolled_back", "expired", "superseded")
# How far along a configuration is; a report never moves it back (a re-sent version is reported received again).
_CONFIG_RANK = {"pending": 0, "sent": 1, "superseded": 1, "expired": 1, "received": 2, "applied": 3,
                "confirmed": 4, "running": 4, "refused": 4, "rolled_back": 4}


def command_transition(current: str, reported: str) -> str | None:
    """The command's new state after its gateway reported `reported`, or None for no change.

    An expiry the collector decided (deadline passed without a final report) gives way to the gateway's own
    final word, which may have been delayed; any other final state is final (a redelivered report)."""
    if current == "awaiting_approval":
        return None  # never sent: nothing the gateway can report on
    if current in ("pending", "sent", "running"):
        return None if reported == current else reported
    if current == "expired" and reported in ("done", "refused", "failed"):
        return reported
    return None


def config_transition(current: str, reported: str) -> str | None:
    """A configuration version's new state on its gateway after a report on that version, or None."""
    if current in ("confirmed", "running", "refused", "rolled_back"):
        return None
    if reported == current or _CONFIG_RANK.get(reported, -1) < _CONFIG_RANK[current]:
        return None
    return reported


# -- rows -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigRow:
    gateway: str
    version: int
    sha256: str
    toml: str
    signed: bytes
    operators: str
    created_ms: int
    deadline_ms: int
    confirm_timeout_s: float
    state: str
    reason: str
    detail: str
    updated_ms: int
    sent_ms: int
    sends: int


@dataclass(frozen=True)
class CommandRow:
    id: str
    gateway: str
    device: str
    action: str
    point: str | None
    value: Any
    signed: bytes
    operators: str
    approvals_needed: int
    created_ms: int
    deadline_ms: int
    state: str
    reason: str
    detail: str
    readback: Any
    updated_ms: int
    sent_ms: int
    sends: int

    @property
    def final(self) -> bool:
        return self.state in COMMAND_FINAL


@dataclass(frozen=True)
class Running:
    gateway: str
    version: int
    sha256: str
    at_ms: int
    source: str  # "report" | "status"


@dataclass(frozen=True)
class GatewayConfigStatus:
    gateway: str
    desired: ConfigRow | None
    running: Running | None

    @property
    def in_sync(self) -> bool:
        return (self.desired is not None and self.running is not None
                and self.running.version == self.desired.version and self.running.sha256 == self.desired.sha256)


@dataclass(frozen=True)
class Event:
    """One change, for the audit log and InfluxDB (collector/control_relay.py)."""

    seq: int
    at_ms: int
    kind: str  # "command" | "config"
    ref: str  # command id | configuration version
    gateway: str
    device: str
    point: str
    action: str
    operators: str
    state: str
    reason: str
    detail: str
    value: Any
    readback: Any
    sha256: str


@dataclass(frozen=True)
class Due:
    """A document to (re-)send now: at most one per ControlDown."""

    kind: str
    gateway: str
    ref: str
    signed: bytes  # msgpack of the SignedDoc


class StoreError(Exception):
    """An operator's request the store cannot take (a version taken meanwhile, a command already final)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS configs (
    gateway TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, toml TEXT NOT NULL,
    signed BLOB NOT NULL, operators TEXT NOT NULL, created_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL,
    confirm_timeout_s REAL NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '', updated_ms INTEGER NOT NULL, sent_ms INTEGER NOT NULL DEFAULT 0,
    sends INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (gateway, version)
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, gateway TEXT NOT NULL, device TEXT NOT NULL, action TEXT NOT NULL, point TEXT,
    value TEXT NOT NULL, signed BLOB NOT NULL, operators TEXT NOT NULL, approvals_needed INTEGER NOT NULL,
    created_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL, state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '', readback TEXT NOT NULL DEFAULT 'null',
    updated_ms INTEGER NOT NULL, sent_ms INTEGER NOT NULL DEFAULT 0, sends INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS commands_by_state ON commands (state, gateway);
CREATE INDEX IF NOT EXISTS commands_by_gateway ON commands (gateway, created_ms);
CREATE TABLE IF NOT EXISTS running (
    gateway TEXT PRIMARY KEY, version INTEGER NOT NULL, sha256 TEXT NOT NULL, at_ms INTEGER NOT NULL,
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, kind TEXT NOT NULL, ref TEXT NOT NULL,
    gateway TEXT NOT NULL, device TEXT NOT NULL DEFAULT '', point TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL DEFAULT '', operators TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '', value TEXT NOT NULL DEFAULT 'null',
    readback TEXT NOT NULL DEFAULT 'null', sha256 TEXT NOT NULL DEFAULT '',
    audited_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_by_audit ON events (audited_ms, seq);
"""

_CONFIG_COLUMNS = ("gateway, version, sha256, toml, signed, operators, created_ms, deadline_ms, confirm_timeout_s, "
                   "state, reason, detail, updated_ms, sent_ms, sends")
_COMMAND_COLUMNS = ("id, gateway, device, action, point, value, signed, operators, approvals_needed, created_ms, "
                    "deadline_ms, state, reason, detail, readback, updated_ms, sent_ms, sends")
_json_enc = msgspec.json.Encoder()


def _json(value: Any) -> str:
    return _json_enc.encode(value).decode()


def _unjson(text: str) -> Any:
    return msgspec.json.decode(text)


def _config(row: tuple) -> ConfigRow:
    return ConfigRow(*row)


def _command(row: tuple) -> CommandRow:
    values = list(row)
    values[5] = _unjson(values[5])
    values[14] = _unjson(values[14])
    return CommandRow(*values)


def operator_names(signed: SignedDoc) -> str:
    """Who approved a document, for display and the audit's operator tag: names joined by '+'."""
    from wire.control import read_cert

    return "+".join(read_cert(a.cert).name for a in signed.approvals)


class ControlStore:
    def __init__(self, path: Path | str, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        private_sqlite(self.path)  # signed documents and configurations (with their secrets): 0600
        # One thread uses a connection at a time (the collector's "control" thread, or the CLI's main thread);
        # check_same_thread off because the collector opens it on the loop's thread and uses it on the executor.
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _event(self, at_ms: int, kind: str, ref: str, gateway: str, state: str, *, device: str = "",
               point: str | None = "", action: str = "", operators: str = "", reason: str = "", detail: str = "",
               value: Any = None, readback: Any = None, sha256: str = "") -> None:
        self._db.execute(
            "INSERT INTO events (at_ms, kind, ref, gateway, device, point, action, operators, state, reason, detail,"
            " value, readback, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (at_ms, kind, ref, gateway, device, point or "", action, operators, state, reason, detail[:2048],
             _json(value), _json(readback), sha256))

    # -- configurations -------------------------------------------------------------------------------------

    def next_config_version(self, gateway: str) -> int:
        row = self._db.execute("SELECT max(version) FROM configs WHERE gateway = ?", (gateway,)).fetchone()
        return (row[0] or 0) + 1

    def add_config(self, doc: ConfigDoc, signed: SignedDoc, now_ms: int) -> None:
        """Record a new desired configuration; older versions not yet final are superseded. StoreError if the
        version is not the next one (another operator pushed meanwhile: sign again)."""
        operators = operator_names(signed)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            expected = self.next_config_version(doc.gateway)
            if doc.version != expected:
                raise StoreError(f"{doc.gateway}: version {doc.version} is taken; the next one is {expected} "
                                 "(someone pushed meanwhile: push again)")
            older = self._db.execute(
                f"SELECT version, operators FROM configs WHERE gateway = ? AND state IN ({_marks(CONFIG_OPEN)})",
                (doc.gateway, *CONFIG_OPEN)).fetchall()
            for version, who in older:
                self._db.execute("UPDATE configs SET state = 'superseded', updated_ms = ? WHERE gateway = ? AND "
                                 "version = ?", (now_ms, doc.gateway, version))
                self._event(now_ms, "config", str(version), doc.gateway, "superseded", operators=who,
                            detail=f"version {doc.version} pushed before it was final")
            self._db.execute(
                f"INSERT INTO configs ({_CONFIG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', '', '', ?, 0, 0)",
                (doc.gateway, doc.version, doc.sha256, doc.toml, encode(signed), operators, now_ms, doc.deadline_ms,
                 doc.confirm_timeout_s, now_ms))
            self._event(now_ms, "config", str(doc.version), doc.gateway, "pending", operators=operators,
                        sha256=doc.sha256, detail="pushed")

    def config(self, gateway: str, version: int) -> ConfigRow | None:
        row = self._db.execute(f"SELECT {_CONFIG_COLUMNS} FROM configs WHERE gateway = ? AND version = ?",
                               (gateway, version)).fetchone()
        return _config(row) if row else None

    def config_history(self, gateway: str) -> list[ConfigRow]:
        return [_config(r) for r in self._db.execute(
            f"SELECT {_CONFIG_COLUMNS} FROM configs WHERE gateway = ? ORDER BY version", (gateway,))]

    def config_status(self, gateway: str | None = None) -> list[GatewayConfigStatus]:
        """Desired (the newest version) against running, per gateway that has either."""
        names = [gateway] if gateway else sorted({r[0] for r in self._db.execute(
            "SELECT gateway FROM configs UNION SELECT gateway FROM running")})
        out = []
        for name in names:
            desired = self._db.execute(f"SELECT {_CONFIG_COLUMNS} FROM configs WHERE gateway = ? ORDER BY version "
                                       "DESC LIMIT 1", (name,)).fetchone()
            running = self._db.execute("SELECT gateway, version, sha256, at_ms, source FROM running WHERE gateway = ?",
                                       (name,)).fetchone()
            out.append(GatewayConfigStatus(name, _config(desired) if desired else None,
                                           Running(*running) if running else None))
        return out

    # -- commands -------------------------------------------------------------------------------------------

    def add_command(self, cmd: Command, signed: SignedDoc, approvals_needed: int, now_ms: int) -> str:
        """Record a signed command; its state: pending, or awaiting_approval while it has fewer approvals than
        needed (a critical point: two different operators)."""
        state = "pending" if len(signed.approvals) >= approvals_needed else "awaiting_approval"
        operators = operator_names(signed)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                f"INSERT INTO commands ({_COMMAND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', '', "
                "'null', ?, 0, 0)",
                (cmd.id, cmd.gateway, cmd.device, cmd.action, cmd.point, _json(cmd.value), encode(signed), operators,
                 approvals_needed, now_ms, cmd.deadline_ms, state, now_ms))
            self._event(now_ms, "command", cmd.id, cmd.gateway, state, device=cmd.device, point=cmd.point,
                        action=cmd.action, operators=operators, value=cmd.value)
        return state

    def approve_command(self, command_id: str, signed: SignedDoc, now_ms: int) -> str:
        """Replace an awaiting command's document with one carrying one more approval; released (pending) once
        it has as many as it needs. StoreError if it is not awaiting approval (any more)."""
        operators = operator_names(signed)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self.command(command_id)
            if row is None:
                raise StoreError(f"no command {command_id}")
            if row.state != "awaiting_approval":
                raise StoreError(f"command {command_id} is {row.state}, not awaiting approval")
            state = "pending" if len(signed.approvals) >= row.approvals_needed else "awaiting_approval"
            self._db.execute("UPDATE commands SET signed = ?, operators = ?, state = ?, updated_ms = ? WHERE id = ? "
                             "AND state = 'awaiting_approval'", (encode(signed), operators, state, now_ms, command_id))
            self._event(now_ms, "command", command_id, row.gateway, "approved" if state == "pending" else state,
                        device=row.device, point=row.point, action=row.action, operators=operators, value=row.value)
        return state

    def command(self, command_id: str) -> CommandRow | None:
        row = self._db.execute(f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
        return _command(row) if row else None

    def commands(self, *, gateway: str | None = None, states: tuple[str, ...] = (), limit: int = 50) -> list[CommandRow]:
        where, args = [], []
        if gateway:
            where.append("gateway = ?")
            args.append(gateway)
        if states:
            where.append(f"state IN ({_marks(states)})")
            args += states
        query = f"SELECT {_COMMAND_COLUMNS} FROM commands"
        if where:
            query += " WHERE " + " AND ".join(where)
        return [_command(r) for r in self._db.execute(query + " ORDER BY created_ms DESC, id LIMIT ?", (*args, limit))]

    # -- what the gateways say ------------------------------------------------------------------------------

    def apply_report(self, gateway: str, report: Report, now_ms: int) -> str | None:
        """A report from `gateway` (the gateway whose sealed report it was): the new state of the row it is
        about, or None if nothing changed (a redelivery, a row of another gateway, an unknown id)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._observe(gateway, report.config_version, report.config_sha256, "report", now_ms)
            if report.kind == "command":
                return self._command_report(gateway, report, now_ms)
            return self._config_report(gateway, report, now_ms)

    def _command_report(self, gateway: str, report: Report, now_ms: int) -> str | None:
        row = self._db.execute(f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE id = ? AND gateway = ?",
                               (report.id, gateway)).fetchone()
        if row is None:
            return None
        cmd = _command(row)
        state = command_transition(cmd.state, report.state)
        if state is None:
            return None
        self._db.execute("UPDATE commands SET state = ?, reason = ?, detail = ?, readback = ?, updated_ms = ? "
                         "WHERE id = ? AND gateway = ?",
                         (state, report.reason, report.detail, _json(report.value), now_ms, cmd.id, gateway))
        self._event(now_ms, "command", cmd.id, gateway, state, device=cmd.device, point=cmd.point, action=cmd.action,
                    operators=cmd.operators, reason=report.reason, detail=report.detail, value=cmd.value,
                    readback=report.value)
        return state

    def _config_report(self, gateway: str, report: Report, now_ms: int) -> str | None:
        if not report.id.isdigit():
            return None
        row = self.config(gateway, int(report.id))
        if row is None:
            return None
        state = config_transition(row.state, report.state)
        if state is None:
            return None
        self._db.execute("UPDATE configs SET state = ?, reason = ?, detail = ?, updated_ms = ? WHERE gateway = ? "
                         "AND version = ?", (state, report.reason, report.detail, now_ms, gateway, row.version))
        self._event(now_ms, "config", str(row.version), gateway, state, operators=row.operators,
                    reason=report.reason, detail=report.detail, sha256=row.sha256)
        return state

    def observe_running(self, gateway: str, version: int, sha256: str, source: str, now_ms: int) -> None:
        """What a gateway says it runs (a status heartbeat)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._observe(gateway, version, sha256, source, now_ms)

    def _observe(self, gateway: str, version: int, sha256: str, source: str, now_ms: int) -> None:
        self._db.execute("INSERT INTO running (gateway, version, sha256, at_ms, source) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (gateway) DO UPDATE SET version = excluded.version, sha256 = excluded.sha256, "
                         "at_ms = excluded.at_ms, source = excluded.source", (gateway, version, sha256, now_ms, source))

    # -- the relay's work -----------------------------------------------------------------------------------

    def expire(self, now_ms: int) -> int:
        """Commands and desired configurations whose deadline passed without a final report: expired (the
        gateway would refuse them now). A late final report from the gateway still replaces it."""
        n = 0
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for cmd in [_command(r) for r in self._db.execute(
                    f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE state IN ({_marks(COMMAND_OPEN)}) AND "
                    "deadline_ms < ?", (*COMMAND_OPEN, now_ms))]:
                detail = ("not approved before its deadline" if cmd.state == "awaiting_approval"
                          else "no final report from the gateway before its deadline")
                self._db.execute("UPDATE commands SET state = 'expired', reason = 'deadline', detail = ?, "
                                 "updated_ms = ? WHERE id = ?", (detail, now_ms, cmd.id))
                self._event(now_ms, "command", cmd.id, cmd.gateway, "expired", device=cmd.device, point=cmd.point,
                            action=cmd.action, operators=cmd.operators, reason="deadline", detail=detail,
                            value=cmd.value)
                n += 1
            for row in [_config(r) for r in self._db.execute(
                    f"SELECT {_CONFIG_COLUMNS} FROM configs WHERE state IN ({_marks(CONFIG_OPEN)}) AND deadline_ms < ?",
                    (*CONFIG_OPEN, now_ms))]:
                self._db.execute("UPDATE configs SET state = 'expired', reason = 'deadline', updated_ms = ? WHERE "
                                 "gateway = ? AND version = ?", (now_ms, row.gateway, row.version))
                self._event(now_ms, "config", str(row.version), row.gateway, "expired", operators=row.operators,
                            reason="deadline", detail="not confirmed before its deadline", sha256=row.sha256)
                n += 1
        return n

    def due(self, now_ms: int, *, resend_ms: int, max_inflight: int, limit: int) -> list[Due]:
        """What to send now, oldest first, at most `limit`: commands not final (first sends only while the
        gateway has fewer than `max_inflight` sent and not final), and each gateway's desired configuration
        while the version it runs differs. A document already sent waits `resend_ms` before it goes again; a
        configuration the gateway has received or applied waits its confirm timeout on top (it is being tried)."""
        out: list[Due] = []
        inflight: dict[str, int] = {}
        for gateway, count in self._db.execute(
                "SELECT gateway, count(*) FROM commands WHERE state IN ('sent', 'running') GROUP BY gateway"):
            inflight[gateway] = count
        for cmd_id, gateway, state, sends, sent_ms, signed in self._db.execute(
                "SELECT id, gateway, state, sends, sent_ms, signed FROM commands WHERE state IN "
                "('pending', 'sent', 'running') AND deadline_ms >= ? ORDER BY created_ms, id", (now_ms,)):
            if len(out) >= limit:
                return out
            if sends and sent_ms + resend_ms > now_ms:
                continue
            if state == "pending" and not sends:
                if inflight.get(gateway, 0) >= max_inflight:
                    continue
                inflight[gateway] = inflight.get(gateway, 0) + 1
            out.append(Due("command", gateway, cmd_id, signed))
        for row in [_config(r) for r in self._db.execute(
                f"SELECT {', '.join('c.' + c.strip() for c in _CONFIG_COLUMNS.split(','))} FROM configs c "
                "LEFT JOIN running r ON r.gateway = c.gateway "
                "WHERE c.version = (SELECT max(version) FROM configs WHERE gateway = c.gateway) "
                f"AND c.state IN ({_marks(CONFIG_OPEN)}) AND c.deadline_ms >= ? "
                "AND (r.version IS NULL OR r.version != c.version OR r.sha256 != c.sha256) "
                "ORDER BY c.created_ms", (*CONFIG_OPEN, now_ms))]:
            if len(out) >= limit:
                break
            wait = resend_ms
            if row.state in ("received", "applied"):
                wait += int(row.confirm_timeout_s * 1000)
                if row.updated_ms + wait > now_ms:
                    continue
            if row.sends and row.sent_ms + wait > now_ms:
                continue
            out.append(Due("config", row.gateway, str(row.version), row.signed))
        return out

    def mark_sent(self, items: list[Due], now_ms: int) -> None:
        """Published: counted, and its first send recorded as an event (state sent)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for item in items:
                if item.kind == "command":
                    row = self.command(item.ref)
                    if row is None or row.gateway != item.gateway:
                        continue
                    self._db.execute("UPDATE commands SET sends = sends + 1, sent_ms = ?, state = CASE state WHEN "
                                     "'pending' THEN 'sent' ELSE state END, updated_ms = CASE state WHEN 'pending' "
                                     "THEN ? ELSE updated_ms END WHERE id = ?", (now_ms, now_ms, item.ref))
                    if row.state == "pending":
                        self._event(now_ms, "command", row.id, row.gateway, "sent", device=row.device,
                                    point=row.point, action=row.action, operators=row.operators, value=row.value)
                else:
                    crow = self.config(item.gateway, int(item.ref))
                    if crow is None:
                        continue
                    self._db.execute("UPDATE configs SET sends = sends + 1, sent_ms = ?, state = CASE state WHEN "
                                     "'pending' THEN 'sent' ELSE state END, updated_ms = CASE state WHEN 'pending' "
                                     "THEN ? ELSE updated_ms END WHERE gateway = ? AND version = ?",
                                     (now_ms, now_ms, item.gateway, crow.version))
                    if crow.state == "pending":
                        self._event(now_ms, "config", item.ref, item.gateway, "sent", operators=crow.operators,
                                    sha256=crow.sha256)

    def drain_events(self, limit: int, now_ms: int, consume: Callable[[list[Event]], None]) -> list[Event]:
        """The oldest `limit` events not yet in the audit log, handed to `consume` (the audit log's append)
        inside the store's write lock, then marked audited: several collectors sharing the store never append
        the same event twice, and the audit log gets them in order. If `consume` raises, nothing is marked
        (they come again). An event stays in the store until InfluxDB has it too (written)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            events = self._events("audited_ms = 0 ORDER BY seq LIMIT ?", (limit,))
            if events:
                consume(events)
                self._db.execute("UPDATE events SET audited_ms = ? WHERE audited_ms = 0 AND seq <= ?",
                                 (now_ms, events[-1].seq))
        return events

    def unwritten(self, older_than_ms: int, now_ms: int, limit: int) -> list[Event]:
        """Audited events whose InfluxDB points were not confirmed in time (a collector stopped before its
        writer had them): their points again (the same time and tags: InfluxDB keeps one)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            events = self._events("audited_ms > 0 AND audited_ms < ? ORDER BY seq LIMIT ?", (older_than_ms, limit))
            if events:
                self._db.execute(f"UPDATE events SET audited_ms = ? WHERE seq IN ({_marks(tuple(events))})",
                                 (now_ms, *(e.seq for e in events)))
        return events

    def written(self, seqs: list[int]) -> None:
        """InfluxDB stored these events' points: they are done."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM events WHERE seq = ? AND audited_ms > 0", [(s,) for s in seqs])

    def _events(self, where: str, args: tuple) -> list[Event]:
        return [Event(seq, at, kind, ref, gw, dev, point, action, ops, state, reason, detail, _unjson(value),
                      _unjson(readback), sha)
                for seq, at, kind, ref, gw, dev, point, action, ops, state, reason, detail, value, readback, sha
                in self._db.execute(
                    "SELECT seq, at_ms, kind, ref, gateway, device, point, action, operators, state, reason, detail, "
                    "value, readback, sha256 FROM events WHERE " + where, args)]


def _marks(values: tuple) -> str:
    return ", ".join("?" * len(values))
