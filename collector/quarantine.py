"""Rejected payloads kept for inspection: bounded by count and bytes, oldest dropped first.

An operator sees a rejection counter rise and a log line naming the gateway and the reason; the raw payload
is here, for `edge-collector quarantine list | show ID`. SQLite in WAL mode, so several collector
processes on one host may share the file and the CLI can read while the collector writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from wire.files import private_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ns INTEGER NOT NULL,
    gateway TEXT NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class Entry:
    id: int
    received_ns: int
    gateway: str
    topic: str
    reason: str
    detail: str
    size: int
    payload: bytes = b""


class Quarantine:
    def __init__(self, path: Path | str, max_entries: int = 1000, max_bytes: int = 16 * 1024 * 1024,
                 max_payload: int = 64 * 1024) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_payload = max_payload  # a huge payload is kept truncated: the start is what tells
        private_sqlite(self.path)  # rejected payloads are meter data too: 0600, and so its -wal and -shm
        self._db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def add(self, gateway: str, topic: str, reason: str, detail: str, payload: bytes,
            received_ns: int | None = None) -> None:
        kept = bytes(payload[: self.max_payload])
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO quarantine (received_ns, gateway, topic, reason, detail, size, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (received_ns or time.time_ns(), gateway, topic, reason, detail[:1000], len(payload), kept),
            )
            self._trim()

    def add_many(self, entries: list[tuple[str, str, str, str, bytes, int]]) -> None:
        """(gateway, topic, reason, detail, payload, received_ns) rows in one transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO quarantine (received_ns, gateway, topic, reason, detail, size, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(received_ns, gateway, topic, reason, detail[:1000], len(payload), bytes(payload[: self.max_payload]))
                 for gateway, topic, reason, detail, payload, received_ns in entries],
            )
            self._trim()

    def _trim(self) -> None:
        """Oldest first, in as few statements as it takes (one per bound): several collectors may share the
        file, so the counts are read, not remembered; length() reads a row's header, not its payload."""
        count, total = self._db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM quarantine").fetchone()
        if count > self.max_entries:
            over = count - self.max_entries
            gone = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM "
                "(SELECT payload FROM quarantine ORDER BY id LIMIT ?)", (over,)).fetchone()
            self._db.execute("DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine ORDER BY id LIMIT ?)",
                             (over,))
            total -= gone[1]
        while total > self.max_bytes:
            rows = self._db.execute("SELECT id, length(payload) FROM quarantine ORDER BY id LIMIT 64").fetchall()
            if not rows:
                return
            last = rows[-1][0]
            for row_id, size in rows:
                total -= size
                if total <= self.max_bytes:
                    last = row_id
                    break
            self._db.execute("DELETE FROM quarantine WHERE id <= ?", (last,))

    def size(self) -> tuple[int, int]:
        """(entries, payload bytes) in the file, every collector's that shares it."""
        count, total = self._db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM quarantine").fetchone()
        return count, total

    def list(self, limit: int = 50, gateway: str | None = None, reason: str | None = None) -> list[Entry]:
        query = "SELECT id, received_ns, gateway, topic, reason, detail, size FROM quarantine"
        where, args = [], []
        if gateway:
            where.append("gateway = ?")
            args.append(gateway)
        if reason:
            where.append("reason = ?")
            args.append(reason)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY id DESC LIMIT ?"
        return [Entry(*row) for row in self._db.execute(query, (*args, limit))]

    def by_reason(self, limit: int = 200) -> list[tuple[str, str, int, int, str]]:
        """(reason, gateway, entries, newest received_ns, newest detail) per reason and gateway, newest first."""
        return list(self._db.execute(
            "SELECT reason, gateway, count(*), max(received_ns), "
            "(SELECT detail FROM quarantine AS newest WHERE newest.reason = q.reason AND newest.gateway = q.gateway "
            "ORDER BY id DESC LIMIT 1) FROM quarantine AS q GROUP BY reason, gateway "
            "ORDER BY max(received_ns) DESC LIMIT ?", (limit,)))

    def get(self, entry_id: int) -> Entry | None:
        row = self._db.execute(
            "SELECT id, received_ns, gateway, topic, reason, detail, size, payload FROM quarantine WHERE id = ?",
            (entry_id,),
        ).fetchone()
        return Entry(*row) if row else None

    def close(self) -> None:
        self._db.close()


class QuarantineSink:
    """Quarantine writes off the event loop, bounded: the ingest path only appends to a queue.

    A flood of bad messages must not slow the ingest of good ones, nor grow memory: entries wait in a queue of
    at most `max_rows` rows and `max_bytes` bytes (payloads truncated to the quarantine's own `max_payload`),
    and are written in batches (one transaction each) by one named worker thread, which alone opens and uses
    the SQLite connection. When the queue is full, new entries are dropped and counted (`dropped`): the reason
    counter and the log line still tell of them; only the payload copy is lost.
    """

    def __init__(self, path: Path | str, max_entries: int, max_db_bytes: int, *, max_rows: int = 1000,
                 max_bytes: int = 4 * 1024 * 1024, max_payload: int = 64 * 1024) -> None:
        self._args = (path, max_entries, max_db_bytes, max_payload)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_payload = max_payload
        self._queue: deque[tuple[str, str, str, str, bytes, int]] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="quarantine")
        self._db: Quarantine | None = None
        self.dropped = 0
        self.sampled_out = 0  # counted, not kept: over the per-gateway-and-reason sample
        self._samples: dict[tuple[str, str], list[float]] = {}  # (gateway, reason) -> [window start, kept]
        self.written = 0
        self.failures = 0
        self.last_error = ""
        # what the file holds, read on the quarantine thread after opening it and after each write (metrics)
        self.stored_entries = 0
        self.stored_bytes = 0

    # A flood of one kind from one gateway needs a few examples, not every copy: per gateway and reason at most
    # SAMPLE entries per SAMPLE_WINDOW seconds are kept (the counters and log lines still count every one).
    SAMPLE = 20
    SAMPLE_WINDOW = 60.0

    def add(self, gateway: str, topic: str, reason: str, detail: str, payload: bytes, received_ns: int) -> bool:
        """Queue one entry (never blocks); False when it was not kept (sampled out, or the queue is full)."""
        now = received_ns / 1e9
        key = (gateway, reason)
        sample = self._samples.get(key)
        if sample is None or now - sample[0] >= self.SAMPLE_WINDOW:
            if len(self._samples) >= 10_000:
                self._samples.clear()
            sample = self._samples[key] = [now, 0]
        if sample[1] >= self.SAMPLE:
            self.sampled_out += 1
            return False
        sample[1] += 1
        kept = bytes(payload[: self.max_payload])
        size = len(kept) + len(detail) + len(topic) + 64
        if len(self._queue) >= self.max_rows or self._queued_bytes + size > self.max_bytes:
            self.dropped += 1
            return False
        self._queue.append((gateway, topic, reason, detail[:1000], kept, received_ns))
        self._queued_bytes += size
        self._wake.set()
        return True

    def _open(self) -> tuple[int, int]:
        path, max_entries, max_db_bytes, max_payload = self._args
        self._db = Quarantine(path, max_entries, max_db_bytes, max_payload)
        return self._db.size()

    def _write(self, rows: list[tuple[str, str, str, str, bytes, int]]) -> tuple[int, int]:
        if self._db is None:
            self._open()
        assert self._db is not None
        self._db.add_many(rows)
        return self._db.size()

    async def run(self) -> None:
        """The drain task: runs until cancelled; a write error costs that batch, counted, never the task."""
        loop = asyncio.get_running_loop()
        self.stored_entries, self.stored_bytes = await loop.run_in_executor(self._executor, self._open)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                rows = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                try:
                    self.stored_entries, self.stored_bytes = await loop.run_in_executor(self._executor, self._write, rows)
                    self.written += len(rows)
                except Exception as exc:  # disk full, locked file: the entries are lost, the ingest is not
                    self.failures += 1
                    self.dropped += len(rows)
                    self.last_error = f"{type(exc).__name__}: {exc}"

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        """Write what is queued, then close the database on its own thread."""
        loop = asyncio.get_running_loop()
        rows = list(self._queue)
        self._queue.clear()
        try:
            if rows:
                await loop.run_in_executor(self._executor, self._write, rows)
            if self._db is not None:
                await loop.run_in_executor(self._executor, self._db.close)
        finally:
            self._executor.shutdown(wait=False)


def hexdump(data: bytes, width: int = 16) -> str:
    """Offsets, hex and printable ASCII: how a technician reads a payload byte by byte."""
    lines = []
    for offset in range(0, len(data), width):
        chunk = data[offset : offset + width]
        hexpart = " ".join(f"{b:02x}" for b in chunk).ljust(width * 3 - 1)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexpart}  {text}")
    return "\n".join(lines)
