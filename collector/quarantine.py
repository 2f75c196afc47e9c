"""Rejected payloads kept for inspection: bounded by count and bytes, oldest dropped first.

An operator sees a rejection counter rise and a log line naming the gateway and the reason; the raw payload
is here, for `edge-collector quarantine list | show ID`. SQLite in WAL mode, so several collector
processes on one host may share the file and the CLI can read while the collector writes.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
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

    def _trim(self) -> None:
        count, total = self._db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM quarantine").fetchone()
        while count > self.max_entries or total > self.max_bytes:
            oldest = self._db.execute("SELECT id, length(payload) FROM quarantine ORDER BY id LIMIT 1").fetchone()
            if oldest is None:
                return
            self._db.execute("DELETE FROM quarantine WHERE id = ?", (oldest[0],))
            count, total = count - 1, total - oldest[1]

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

    def get(self, entry_id: int) -> Entry | None:
        row = self._db.execute(
            "SELECT id, received_ns, gateway, topic, reason, detail, size, payload FROM quarantine WHERE id = ?",
            (entry_id,),
        ).fetchone()
        return Entry(*row) if row else None

    def close(self) -> None:
        self._db.close()


def hexdump(data: bytes, width: int = 16) -> str:
    """Offsets, hex and printable ASCII: how a technician reads a payload byte by byte."""
    lines = []
    for offset in range(0, len(data), width):
        chunk = data[offset : offset + width]
        hexpart = " ".join(f"{b:02x}" for b in chunk).ljust(width * 3 - 1)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexpart}  {text}")
    return "\n".join(lines)
