"""The fleet inventory: per gateway what its status heartbeats, its last will and its uplinks tell - online
state, last seen, backlog, agent version, running configuration, location, devices with their identification
and health. `edge-collector gateways list | show` reads it (collector/fleet.py).

    inventory = Inventory()                                  # pure: no clock, no I/O
    change = inventory.status(gateway, doc, receive_ns)      # a status document (wire/status.py StatusDoc)
    inventory.seen(gateway, time_ns, uplink=True)            # heard from: an authentic uplink, or a heartbeat
    inventory.urgent, inventory.dirty                        # what the shell must write, and how soon
    store = InventoryStore(path)                             # SQLite, on the collector's "inventory" thread
    store.save(inventory.take_dirty())

Only ever the gateway's own data: a record is keyed by the gateway of the topic the message came on (the broker's
ACL lets a gateway publish only its own topics), never by what a document says; a status naming another gateway
is refused before it gets here (Reason.STATUS_MISMATCH). A status replaces what the gateway said before (its
devices included), so a gateway's record is bounded by the status schema (MAX_DEVICES devices, bounded texts),
and at most `max_gateways` records are kept.

Writes are rare: a change of state, agent version, configuration, location (beyond ~100 m) or of a device's
identity makes the record "urgent" (the shell writes it within a second); health, backlog and last-seen times
are written every `[inventory] flush_interval` (60 s). The file is SQLite in WAL mode: the CLI reads while the
collector writes, and several collector instances on one host may share it - each writes what it saw, the row
keeps the record of the newest status and the latest last-seen time of all.

InfluxDB gets the inventory too (collector/health.py info_lines: citynerve_gateway_info, citynerve_device_info),
when it changed and otherwise every `info_interval`, so that versions, configurations and locations can be
charted without a point per heartbeat. The health points (collector/health.py health_lines) likewise: when their
`health_mark` changed, with every heartbeat while the gateway has a backlog, else every `health_interval`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from collector.health import health_mark
from wire.files import private_sqlite
from wire.logs import RateLimitedLog
from wire.status import ONLINE, DeviceHealth, DeviceInfo, Location, StatusDoc

log = logging.getLogger("citynerve.collector")

MAX_GATEWAYS = 100_000
# A location that moved less than this (degrees, ~100 m of latitude) is not a change worth an urgent write:
# a GPS fix wanders by metres from heartbeat to heartbeat.
LOCATION_EPSILON = 0.001

ONLINE_STATE, OFFLINE_STATE, UNKNOWN_STATE = "online", "offline", "unknown"


class DeviceRecord(msgspec.Struct, omit_defaults=True):
    info: DeviceInfo | None = None  # from the status's inventory
    health: DeviceHealth | None = None  # from the status's devices


class GatewayRecord(msgspec.Struct, omit_defaults=True):
    gateway: str
    first_seen_ns: int  # when this inventory first recorded it
    # when a collector last heard from the gateway itself (an authentic uplink, a heartbeat; not its last will,
    # which the broker sends): the rule of collector/app.py Collector._seen, shared with the metrics
    last_seen_ns: int | None = None
    state: str = UNKNOWN_STATE  # "online" | "offline" | "unknown" (seen through uplinks only, so far)
    state_since_ns: int | None = None  # when this collector learnt the state (receive time)
    last_uplink_ns: int | None = None
    last_status_ns: int | None = None  # receive time of the status this record reflects
    heartbeat_ns: int | None = None  # that status's own time (gateway clock)
    version: str | None = None
    mqtt: str | None = None
    since_ns: int | None = None  # agent process start
    config_version: int | None = None
    config_sha256: str | None = None
    location: Location | None = None
    location_source: str | None = None
    backlog_messages: int | None = None
    backlog_readings: int | None = None
    backlog_bytes: int | None = None
    backlog_oldest_ns: int | None = None
    last_ack_ns: int | None = None
    dropped_readings: int | None = None
    devices: dict[str, DeviceRecord] = {}

    def failing_devices(self) -> int:
        return sum(1 for d in self.devices.values() if d.health is not None and d.health.failing)


# The fields a status document and a record share, copied as they are.
_COPIED = ("version", "mqtt", "since_ns", "config_version", "config_sha256", "location", "location_source",
           "backlog_messages", "backlog_readings", "backlog_bytes", "backlog_oldest_ns", "last_ack_ns",
           "dropped_readings")
# Those whose change is worth writing at once (and a citynerve_gateway_info point).
_SIGNIFICANT = ("version", "config_version", "config_sha256", "location_source")


@dataclass(frozen=True)
class Change:
    """What one status changed: `significant` (state, version, configuration, location, devices' identity:
    written to the inventory file at once), `write_info` (the citynerve_*_info points are due)."""

    significant: bool
    write_info: bool
    recorded: bool = True  # False: over max_gateways, not kept


class Inventory:
    """The pure core (see the module docstring). Times are passed in; nothing here reads a clock."""

    def __init__(self, *, max_gateways: int = MAX_GATEWAYS, info_interval_ns: int = 3600 * 10**9,
                 health_interval_ns: int = 0) -> None:
        self.max_gateways = max_gateways
        self.info_interval_ns = info_interval_ns
        self.health_interval_ns = health_interval_ns  # 0: a health point with every heartbeat
        self._health_written: dict[str, tuple[int, tuple]] = {}  # gateway -> (receive time, health_mark) written
        self.gateways: dict[str, GatewayRecord] = {}
        self.dirty: set[str] = set()
        self.urgent = False
        self.full = 0  # statuses and uplinks of gateways not recorded: max_gateways reached
        self._info_written: dict[str, int] = {}

    def load(self, records: Iterable[GatewayRecord]) -> None:
        """What the store held at start-up (not dirty: it is written already)."""
        for record in records:
            if len(self.gateways) < self.max_gateways or record.gateway in self.gateways:
                self.gateways[record.gateway] = record

    def _record(self, gateway: str, receive_ns: int) -> GatewayRecord | None:
        record = self.gateways.get(gateway)
        if record is None:
            if len(self.gateways) >= self.max_gateways:
                self.full += 1
                return None
            record = self.gateways[gateway] = GatewayRecord(gateway, receive_ns)
            self.urgent = True  # a gateway new to the inventory is worth writing at once
        self.dirty.add(gateway)
        return record

    def seen(self, gateway: str, time_ns: int, *, uplink: bool = False) -> None:
        """The collector heard from `gateway` at `time_ns` (collector/app.py Collector._seen decides when that
        is); `uplink`: an authentic uplink message, which says nothing of the state (a message the broker kept
        for a collector may arrive long after its gateway went away)."""
        record = self._record(gateway, time_ns)
        if record is None:
            return
        record.last_seen_ns = max(record.last_seen_ns or 0, time_ns)
        if uplink:
            record.last_uplink_ns = max(record.last_uplink_ns or 0, time_ns)

    def status(self, gateway: str, doc: StatusDoc, receive_ns: int,
               devices_allowed: Collection[str] | None = None) -> Change:
        """A status document received on the status topic of `gateway` (already checked: schema, and that it
        does not speak for another gateway). `devices_allowed`: the device ids within the gateway's device
        budget (collector/guard.py), None for all."""
        record = self._record(gateway, receive_ns)
        if record is None:
            return Change(False, False, recorded=False)
        significant = False
        state = ONLINE_STATE if doc.state == ONLINE else OFFLINE_STATE
        if record.state != state:
            record.state, record.state_since_ns = state, receive_ns
            significant = True
        record.last_status_ns = receive_ns
        if state == OFFLINE_STATE:
            # The last will (or a clean stop) says only that: what the gateway said before still describes it.
            self.urgent = self.urgent or significant
            return Change(significant, False)
        info_changed = any(getattr(record, name) != getattr(doc, name) for name in _SIGNIFICANT)
        info_changed = info_changed or _moved(record.location, doc.location)
        for name in _COPIED:
            setattr(record, name, getattr(doc, name))
        record.heartbeat_ns = doc.time_ns
        devices, devices_changed = _devices(record.devices, doc, devices_allowed)
        record.devices = devices
        info_changed = info_changed or devices_changed
        significant = significant or info_changed
        self.urgent = self.urgent or significant
        last_info = self._info_written.get(gateway)
        write_info = info_changed or last_info is None or receive_ns - last_info >= self.info_interval_ns
        if write_info:
            self._info_written[gateway] = receive_ns
        return Change(significant, write_info)

    def health_due(self, gateway: str, doc: StatusDoc, receive_ns: int) -> bool:
        """Whether the health points of this status are to be written (and then they count as written): its
        health_mark differs from the last written, the gateway has a backlog (watched as it drains), or
        `health_interval` passed since the last written. Kept for the gateways the inventory records (bounded
        by max_gateways, as the records are); beyond them every heartbeat is written."""
        if gateway not in self.gateways:
            return True
        mark = health_mark(doc)
        last = self._health_written.get(gateway)
        due = (last is None or last[1] != mark or bool(doc.backlog_messages)
               or receive_ns - last[0] >= self.health_interval_ns)
        if due:
            self._health_written[gateway] = (receive_ns, mark)
        return due

    def take_dirty(self) -> list[GatewayRecord]:
        """The records to write now (copies: the loop may change the originals while they are written)."""
        records = [msgspec.structs.replace(self.gateways[g], devices=dict(self.gateways[g].devices))
                   for g in sorted(self.dirty) if g in self.gateways]
        self.dirty.clear()
        self.urgent = False
        return records

    def put_back(self, records: Iterable[GatewayRecord]) -> None:
        """A write failed: these are dirty again (newer changes made meanwhile are in memory anyway)."""
        self.dirty.update(r.gateway for r in records)


def _moved(before: Location | None, after: Location | None) -> bool:
    if before is None or after is None:
        return before is not after
    return abs(before.lat - after.lat) > LOCATION_EPSILON or abs(before.lon - after.lon) > LOCATION_EPSILON


def _devices(before: dict[str, DeviceRecord], doc: StatusDoc,
             allowed: Collection[str] | None) -> tuple[dict[str, DeviceRecord], bool]:
    """The device records a status gives (its inventory and its health, the ids within the budget), and
    whether the set or any device's identity changed. An older agent sends health only: then only that."""
    info = doc.inventory or {}
    health = doc.devices or {}
    ids = [d for d in dict.fromkeys([*info, *health]) if allowed is None or d in allowed]
    after = {d: DeviceRecord(info.get(d), health.get(d)) for d in ids}
    changed = after.keys() != before.keys() or any(after[d].info != before[d].info for d in after)
    return after, changed


# --- the file ----------------------------------------------------------------------------------------------------

_SCHEMA_VERSION = 1
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(GatewayRecord).decode


class InventoryError(Exception):
    """The inventory file cannot be used (printed as one line)."""


class InventoryStore:
    """One SQLite file, one row per gateway (its record as JSON). Used from one thread at a time: the
    collector's "inventory" thread, or the CLI."""

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, isolation_level=None)
            else:
                private_sqlite(self.path)  # where gateways are and what they run: 0600, and its -wal and -shm
                self._db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout = 10000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and not readonly:
                self._db.execute("CREATE TABLE IF NOT EXISTS gateways (id TEXT PRIMARY KEY, status_ns INTEGER NOT "
                                 "NULL, last_seen_ns INTEGER NOT NULL, record TEXT NOT NULL)")
                self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            elif version not in (0, _SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, this program knows {_SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise InventoryError(f"{self.path}: not a usable inventory ({exc})") from None

    def save(self, records: Iterable[GatewayRecord]) -> int:
        """Write records in one transaction. A row another collector wrote from a newer status keeps its record;
        the last-seen time is the latest of both."""
        rows = [(r.gateway, r.last_status_ns or 0, r.last_seen_ns or 0, _encode(r).decode()) for r in records]
        if not rows:
            return 0
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO gateways (id, status_ns, last_seen_ns, record) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET "
                " record = CASE WHEN excluded.status_ns >= gateways.status_ns THEN excluded.record ELSE gateways.record END,"
                " status_ns = max(excluded.status_ns, gateways.status_ns),"
                " last_seen_ns = max(excluded.last_seen_ns, gateways.last_seen_ns)", rows)
        return len(rows)

    def load(self) -> list[GatewayRecord]:
        """Every record; one that cannot be read (a newer collector's, damaged) is left out, never fatal."""
        if self._db.execute("PRAGMA user_version").fetchone()[0] == 0:
            return []  # an empty file (read-only: not created yet)
        records = []
        for gateway, last_seen_ns, text in self._db.execute(
                "SELECT id, last_seen_ns, record FROM gateways ORDER BY id"):
            try:
                record = _decode(text)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            if record.gateway != gateway:
                continue
            record.last_seen_ns = max(record.last_seen_ns or 0, last_seen_ns) or None
            records.append(record)
        return records

    def close(self) -> None:
        self._db.close()


def read_inventory(path: Path | str) -> dict[str, GatewayRecord]:
    """For the CLI: every record in the file at `path`, {} when there is none yet. Opens it read-only."""
    if not Path(path).exists():
        return {}
    store = InventoryStore(path, readonly=True)
    try:
        return {r.gateway: r for r in store.load()}
    except sqlite3.Error as exc:
        raise InventoryError(f"{path}: cannot read the inventory ({exc})") from None
    finally:
        store.close()


# --- the collector's shell ------------------------------------------------------------------------------------------


class InventorySink:
    """The inventory of a running collector: the core on the event loop, the file on a thread of its own
    ("inventory"). `flush()` from the collector's once-a-second housekeeping writes what is due; a file that
    cannot be opened or written costs a log line and is tried again at the next flush, never the collector."""

    def __init__(self, path: Path | str, flush_interval: float, *, info_interval: float = 3600.0,
                 max_gateways: int = MAX_GATEWAYS, health_interval: float = 0.0) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.core = Inventory(max_gateways=max_gateways, info_interval_ns=int(info_interval * 1e9),
                              health_interval_ns=int(health_interval * 1e9))
        self.store: InventoryStore | None = None
        self.written = 0
        self.failures = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inventory")
        self._last_flush = time.monotonic()
        self._warn = RateLimitedLog(log, interval=300)

    def set_intervals(self, flush_interval: float, info_interval: float, health_interval: float) -> None:
        """New `[inventory]` intervals (a reload): each next write is due by the new value, counted from the last
        one, so a shorter interval takes effect at once and a longer one needs no waiting for the old."""
        self.flush_interval = flush_interval
        self.core.info_interval_ns = int(info_interval * 1e9)
        self.core.health_interval_ns = int(health_interval * 1e9)

    def _open(self) -> list[GatewayRecord]:  # the inventory thread
        if self.store is None:
            self.store = InventoryStore(self.path)
            return self.store.load()
        return []

    async def open(self) -> None:
        """Open the file and load what it holds (before the first message)."""
        try:
            records = await asyncio.get_running_loop().run_in_executor(self._executor, self._open)
        except (InventoryError, sqlite3.Error, OSError) as exc:
            self.failures += 1
            self._warn.error(("inventory_open",), "fleet inventory: %s; kept in memory, tried again at the next "
                             "write", exc, reason="inventory_unwritable")
            return
        self.core.load(records)
        log.info("fleet inventory %s: %d gateway(s)", self.path, len(self.core.gateways))

    def _save(self, records: list[GatewayRecord]) -> int:  # the inventory thread
        self._open()
        assert self.store is not None
        return self.store.save(records)

    async def flush(self, now: float, *, force: bool = False) -> None:
        """Write the dirty records when urgent, when flush_interval has passed, or when forced (shutdown)."""
        core = self.core
        if not core.dirty or not (force or core.urgent or now - self._last_flush >= self.flush_interval):
            return
        self._last_flush = now
        records = core.take_dirty()
        try:
            self.written += await asyncio.get_running_loop().run_in_executor(self._executor, self._save, records)
        except (InventoryError, sqlite3.Error, OSError) as exc:
            core.put_back(records)
            self.failures += 1
            self._warn.error(("inventory_write",), "fleet inventory %s: cannot write (%s); kept in memory, tried "
                             "again in %gs", self.path, exc, self.flush_interval, reason="inventory_unwritable")

    async def close(self) -> None:
        try:
            await self.flush(time.monotonic(), force=True)
            if self.store is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        finally:
            self._executor.shutdown(wait=False)
