"""The durable outbox: every message the gateway made, kept until a collector acknowledges it stored.

SQLite in WAL mode with synchronous=FULL, in the agent's state directory. One transaction per cycle inserts the
cycle's messages, deletes what was acknowledged since the last cycle and enforces the bounds, so a cycle costs
one WAL fdatasync (plus, every 1000 WAL pages, a checkpoint: three more). Counted and explained in
docs/operations.md; measured by bench/outbox_fsync.py.

Why these choices:
- WAL + FULL: a committed cycle survives kill -9 and a power cut; an uncommitted one is rolled back whole.
  synchronous=NORMAL would lose the last commits on a power cut.
- Messages are stored as the plaintext msgpack Batch with its sequence number and creation time, and sealed
  only when sent: a re-send is the same points (idempotent in InfluxDB) under the sealer's current session.
- Nothing is written when a message is sent or re-sent (delivery state is in RAM, wear on an SD card is per
  cycle, not per send); after a restart every row is simply unsent.
- A database that SQLite cannot read is moved aside (with its -wal and -shm) and a new one is started, so a
  damaged SD card sector costs the backlog it held, never the gateway's polling.
- The outbox is the one source of truth for the gateway's sequence numbers: the `counter` row `next_seq` is
  written in the same transaction that inserts a cycle's messages, so it is as durable as they are (kill -9,
  power cut) and costs no fsync of its own. Messages must come with seq >= `next_seq` (ValueError otherwise):
  numbers are strictly increasing across restarts, even after every message was acknowledged and deleted.
  A cycle whose commit fails is rolled back whole, `next_seq` with it, and its numbers are used again by the
  next cycle: they were never published (a cycle is sent only once committed), so nothing can confuse them.
  A damaged database moved aside passes its `next_seq` on to the new one (what this process knew, and what
  can still be read from the damaged file).

Not thread-safe: the agent runs every call on one worker thread, off the event loop (an fsync on an SD card
can take 10-100 ms).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from wire.files import private_sqlite

log = logging.getLogger("citynerve.agent.outbox")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    seq        INTEGER PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    readings   INTEGER NOT NULL,
    body       BLOB    NOT NULL
);
-- Readings of a gateway without RTC stamped while its clock was not synchronised, with their boottime, until
-- the offset of their boot is known (edge_agent/clock.py); body: edge_agent.clock.encode_held.
CREATE TABLE IF NOT EXISTS held (
    id       INTEGER PRIMARY KEY,
    boot_id  TEXT    NOT NULL,
    readings INTEGER NOT NULL,
    body     BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


# SQLite's primary result codes that mean the file itself is bad. Anything else (SQLITE_FULL, SQLITE_IOERR,
# SQLITE_READONLY, SQLITE_BUSY ...) is about the disk or the moment, and moving the file aside would throw away a
# good backlog.
_DAMAGE_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or (code & 0xFF) in _DAMAGE_CODES  # None: our own checks (quick_check, schema version)


@dataclass(frozen=True)
class NewMessage:
    seq: int
    created_ns: int
    readings: int
    body: bytes


@dataclass
class Backlog:
    """What the outbox holds: kept current by every transaction, without scanning the table."""

    messages: int = 0
    readings: int = 0
    bytes: int = 0
    oldest_seq: int | None = None
    oldest_ns: int | None = None
    newest_seq: int | None = None


@dataclass
class Held:
    """What the `held` table holds (readings waiting for their boot's clock offset)."""

    rows: int = 0
    readings: int = 0
    bytes: int = 0
    boots: frozenset[str] = frozenset()


@dataclass(frozen=True)
class HeldGroup:
    boot_id: str
    readings: int
    body: bytes


@dataclass
class Dropped:
    """Messages removed by the bounds in one transaction (oldest first); the totals are persistent."""

    messages: int = 0
    readings: int = 0
    by_age: int = 0
    by_size: int = 0
    held_readings: int = 0  # held readings dropped for the size bound (the `held` table)
    seqs: list[tuple[int, int]] = field(default_factory=list)  # (first, last) dropped this time


class Outbox:
    def __init__(self, path: Path, max_bytes: int, max_age_s: float, clock=time.time_ns) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_ns = int(max_age_s * 1e9)
        self._clock = clock
        self.backlog = Backlog()
        self.held = Held()
        self.dropped_readings_total = 0
        self.dropped_messages_total = 0
        self.resets = 0  # damaged databases moved aside by this process
        self.commits = 0
        self.next_seq = 0  # the sequence number the next message gets: the counter row, committed with the messages
        self._db: sqlite3.Connection | None = None
        self._open()

    # -- opening, and surviving a damaged file ------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self._db = self._connect()
            self._load()
        except sqlite3.DatabaseError as exc:
            self._move_aside(exc)
            self._db = self._connect()
            self._load()

    def _connect(self) -> sqlite3.Connection:
        # The backlog is the site's meter data: 0600 (and so its -wal and -shm), whatever the umask.
        private_sqlite(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            db.execute("PRAGMA synchronous=FULL")
            # After a checkpoint the WAL is truncated back to this size instead of staying at its peak.
            db.execute("PRAGMA journal_size_limit=4194304")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, this agent knows {SCHEMA_VERSION}")
            # quick_check reads every page once: a few seconds for 100 MB on a Pi, once per start, and it is
            # what finds a damaged page before a send or a delete trips over it.
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {problem}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _load(self) -> None:
        db = self._require()
        count, readings, size, oldest, newest = db.execute(
            "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(length(body)), 0), min(seq), max(seq) "
            "FROM message").fetchone()
        oldest_ns = None
        if oldest is not None:
            oldest_ns = db.execute("SELECT created_ns FROM message WHERE seq = ?", (oldest,)).fetchone()[0]
        self.backlog = Backlog(count, readings, size, oldest, oldest_ns, newest)
        self._load_held(db)
        counters = dict(db.execute("SELECT name, value FROM counter").fetchall())
        self.dropped_readings_total = counters.get("dropped_readings", 0)
        self.dropped_messages_total = counters.get("dropped_messages", 0)
        # max(): an outbox written before the counter existed has only its messages; a fresh one after a damaged
        # one was moved aside starts from what this object carried over.
        self.next_seq = max(self.next_seq, counters.get("next_seq", 0), newest + 1 if newest is not None else 0)

    def _load_held(self, db: sqlite3.Connection) -> None:
        rows, readings, size = db.execute(
            "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(length(body)), 0) FROM held").fetchone()
        boots = frozenset(b for (b,) in db.execute("SELECT DISTINCT boot_id FROM held"))
        self.held = Held(rows, readings, size, boots)

    def _move_aside(self, exc: BaseException) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self.next_seq = max(self.next_seq, _salvage_next_seq(self.path))
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        self.resets += 1
        log.error(
            "outbox %s is unreadable (%s): moved aside to %s, starting an empty outbox; the messages it held "
            "are not sent (recover them with sqlite3 .recover if they matter). Polling goes on.",
            self.path, exc, aside, extra={"reason": "outbox_damaged"},
        )

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("outbox is closed")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- the one write path ---------------------------------------------------------------------------------------

    def set_bounds(self, max_bytes: int, max_age_s: float) -> None:
        """New bounds (a live reconfiguration); applied at the next commit, like every bound."""
        self.max_bytes = max_bytes
        self.max_age_ns = int(max_age_s * 1e9)

    def commit(self, messages: list[NewMessage], acked: Iterable[tuple[int, int]] = (),
               hold: Iterable[HeldGroup] = (), release: Iterable[int] = ()) -> Dropped:
        """One transaction: insert this cycle's messages, advance `next_seq` past them, delete acknowledged
        ranges, hold readings (`hold`), delete the held rows `release` (converted into `messages`), apply the
        bounds.

        A damaged database is moved aside and the cycle is committed to a fresh one."""
        acked, hold, release = list(acked), list(hold), list(release)
        if messages and min(m.seq for m in messages) < self.next_seq:
            raise ValueError(f"sequence number {min(m.seq for m in messages)} is below the outbox's next_seq "
                             f"{self.next_seq}: numbers are never used twice")
        try:
            return self._commit(messages, acked, hold, release)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise  # disk full, I/O error, read-only: the file is fine, the agent retries the cycle later
            self._move_aside(exc)
            self._open()
            return self._commit(messages, [], hold, [])

    def _commit(self, messages: list[NewMessage], acked: list[tuple[int, int]], hold: list[HeldGroup],
                release: list[int]) -> Dropped:
        db = self._require()
        b = self.backlog
        dropped = Dropped()
        db.execute("BEGIN IMMEDIATE")
        try:
            for first, last in acked:
                for count, readings, size in db.execute(
                        "DELETE FROM message WHERE seq BETWEEN ? AND ? RETURNING 1, readings, length(body)",
                        (first, last)).fetchall():
                    b.messages -= count
                    b.readings -= readings
                    b.bytes -= size
            db.executemany("INSERT INTO message (seq, created_ns, readings, body) VALUES (?, ?, ?, ?)",
                           [(m.seq, m.created_ns, m.readings, m.body) for m in messages])
            for m in messages:
                b.messages += 1
                b.readings += m.readings
                b.bytes += len(m.body)
            if hold or release:
                self._hold(db, hold, release)
            next_seq = max([self.next_seq, *(m.seq + 1 for m in messages)])
            if next_seq != self.next_seq:
                db.execute("INSERT OR REPLACE INTO counter (name, value) VALUES ('next_seq', ?)", (next_seq,))
            self._apply_bounds(db, dropped)
            if self.held.rows:
                self._apply_held_bounds(db, dropped)
            if dropped.messages or dropped.held_readings:
                self.dropped_messages_total += dropped.messages
                self.dropped_readings_total += dropped.readings + dropped.held_readings
                db.executemany("INSERT OR REPLACE INTO counter (name, value) VALUES (?, ?)",
                               [("dropped_messages", self.dropped_messages_total),
                                ("dropped_readings", self.dropped_readings_total)])
            self._refresh_ends(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._load()  # the RAM summary follows the database, not the half-applied changes
            raise
        self.next_seq = next_seq
        self.commits += 1
        return dropped

    def _hold(self, db: sqlite3.Connection, hold: list[HeldGroup], release: list[int]) -> None:
        for i in range(0, len(release), 500):
            chunk = release[i:i + 500]
            db.execute(f"DELETE FROM held WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        db.executemany("INSERT INTO held (boot_id, readings, body) VALUES (?, ?, ?)",
                       [(g.boot_id, g.readings, g.body) for g in hold])
        self._load_held(db)

    def _apply_held_bounds(self, db: sqlite3.Connection, dropped: Dropped) -> None:
        """Held readings count against the outbox's size bound with its messages; the oldest held rows go first.
        (The age bound does not apply: their wall stamps are what is wrong.)"""
        h = self.held
        while h.rows and h.bytes + self.backlog.bytes > self.max_bytes:
            row_id, readings, size = db.execute(
                "SELECT id, readings, length(body) FROM held ORDER BY id LIMIT 1").fetchone()
            db.execute("DELETE FROM held WHERE id = ?", (row_id,))
            h.rows -= 1
            h.readings -= readings
            h.bytes -= size
            dropped.held_readings += readings
        if dropped.held_readings:
            self._load_held(db)

    def held_groups(self, boots: Iterable[str]) -> list[tuple[int, str, bytes]]:
        """(id, boot id, body) of the held rows of these boots, oldest first."""
        boots = list(boots)
        if not boots:
            return []
        return self._require().execute(
            f"SELECT id, boot_id, body FROM held WHERE boot_id IN ({','.join('?' * len(boots))}) ORDER BY id",
            boots).fetchall()

    def raise_next_seq(self, value: int) -> None:
        """Never give out a number below `value` from now on (committed at once): for the one-time migration of
        the sequence file older agents kept (edge_agent/sequence.py)."""
        if value <= self.next_seq:
            return
        db = self._require()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO counter (name, value) VALUES ('next_seq', ?)", (value,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.next_seq = value

    def _apply_bounds(self, db: sqlite3.Connection, dropped: Dropped) -> None:
        b = self.backlog
        cutoff = self._clock() - self.max_age_ns
        while b.messages:
            seq, created_ns, readings, size = db.execute(
                "SELECT seq, created_ns, readings, length(body) FROM message ORDER BY seq LIMIT 1").fetchone()
            too_old = created_ns < cutoff
            if not too_old and b.bytes <= self.max_bytes:
                return
            db.execute("DELETE FROM message WHERE seq = ?", (seq,))
            b.messages -= 1
            b.readings -= readings
            b.bytes -= size
            dropped.messages += 1
            dropped.readings += readings
            if too_old:
                dropped.by_age += 1
            else:
                dropped.by_size += 1
            if dropped.seqs and dropped.seqs[-1][1] == seq - 1:
                dropped.seqs[-1] = (dropped.seqs[-1][0], seq)
            else:
                dropped.seqs.append((seq, seq))

    def _refresh_ends(self, db: sqlite3.Connection) -> None:
        b = self.backlog
        row = db.execute("SELECT seq, created_ns FROM message ORDER BY seq LIMIT 1").fetchone()
        b.oldest_seq, b.oldest_ns = row if row else (None, None)
        row = db.execute("SELECT max(seq) FROM message").fetchone()
        b.newest_seq = row[0]

    # -- reads for the sender --------------------------------------------------------------------------------------

    def _read_failed(self, exc: sqlite3.DatabaseError) -> None:
        if is_damage(exc):
            self._move_aside(exc)
            self._open()
        else:
            log.warning("outbox read failed (%s); trying again later", exc)

    def seqs_after(self, after: int, limit: int) -> list[int]:
        """Up to `limit` sequence numbers greater than `after`, ascending."""
        try:
            return [seq for (seq,) in self._require().execute(
                "SELECT seq FROM message WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))]
        except sqlite3.DatabaseError as exc:
            self._read_failed(exc)
            return []

    def bodies(self, seqs: list[int]) -> list[tuple[int, bytes]]:
        """(seq, body) of those of `seqs` still held, in seq order."""
        if not seqs:
            return []
        out: list[tuple[int, bytes]] = []
        try:
            db = self._require()
            for i in range(0, len(seqs), 500):
                chunk = seqs[i:i + 500]
                out += db.execute(f"SELECT seq, body FROM message WHERE seq IN ({','.join('?' * len(chunk))})",
                                  chunk).fetchall()
        except sqlite3.DatabaseError as exc:
            self._read_failed(exc)
            return []
        out.sort()
        return out


def _salvage_next_seq(path: Path) -> int:
    """What a damaged database still tells of its sequence numbers (its counter row, its highest message), so
    that the outbox started in its place does not give them out again; 0 if nothing can be read."""
    found = 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return 0
    try:
        for query in ("SELECT value FROM counter WHERE name = 'next_seq'", "SELECT max(seq) + 1 FROM message"):
            with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
                row = db.execute(query).fetchone()
                if row and row[0] is not None:
                    found = max(found, int(row[0]))
    finally:
        db.close()
    return found


def summary(path: Path) -> dict[str, int | None]:
    """A read-only summary for `edge-agent outbox` (safe while the agent runs: WAL readers never block it)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        count, readings, size, oldest, newest, oldest_ns = db.execute(
            "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(length(body)), 0), min(seq), max(seq), "
            "min(created_ns) FROM message").fetchone()
        counters = dict(db.execute("SELECT name, value FROM counter").fetchall())
        try:
            held = db.execute("SELECT coalesce(sum(readings), 0) FROM held").fetchone()[0]
        except sqlite3.OperationalError:  # an outbox of an agent before the `held` table
            held = 0
    finally:
        db.close()
    return {"messages": count, "readings": readings, "bytes": size, "oldest_seq": oldest, "newest_seq": newest,
            "oldest_ns": oldest_ns, "held_readings": held, "dropped_messages": counters.get("dropped_messages", 0),
            "dropped_readings": counters.get("dropped_readings", 0),
            "next_seq": max(counters.get("next_seq", 0), newest + 1 if newest is not None else 0)}
