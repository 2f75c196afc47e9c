"""The gateway registry: which gateway ids may send, and the Ed25519 key their messages are signed with.

One SQLite file in WAL mode (a reader never blocks the CLI's writes and vice versa), written by

    edge-collector gateways add ID ed25519:<base64url> --registry FILE [--replace] [--ca DIR]
    edge-collector gateways list   [-c collector.toml] [--registry FILE] [--json]   (collector/fleet.py)
    edge-collector gateways show ID [-c collector.toml] [--registry FILE] [--json]
    edge-collector gateways revoke ID --registry FILE

and read by the collector, which keeps the whole table in memory and re-reads it when it changed:

    reg = GatewayRegistry(path)
    reg.refresh_if_changed()      # cheap (one PRAGMA data_version); call it before looking up, e.g. per message
    reg.lookup("gw-0001")         # Ed25519PublicKey, or None for an unknown or revoked gateway

A revoke made by any process is seen by every reader at its next refresh_if_changed(): no restart.

Fleet size (docs/scaling.md): every write stamps its rows with a number from a counter (schema version 2), so a
reader's refresh reads only the rows changed since its last one, and the CLI, which writes, never reads the whole
table: adding a gateway costs the same at 100,000 entries as at 10. Key objects are made on first lookup, not at
load. `gateways import FILE` registers thousands in one transaction.
The directory holding the file must be writable by every user of it (SQLite's -wal and -shm files); the file
and its -wal and -shm are 0600 (wire/files.py).

`gateways add --ca DIR` also checks the key against the device CA's index: a key that differs from the one a
valid certificate of that gateway is bound to is refused. Without --ca (the CA usually lives on another host)
that check is not made; `ca sign --registry FILE` makes the same check from the CA's side.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from wire.files import private_sqlite
from wire.schema import GATEWAY_ID_PATTERN

IDENTITY_KEY_PREFIX = "ed25519:"  # as edge_agent.enroll writes it
RESERVED_PREFIX = "collector"  # collector instances' broker usernames (collector.pki.is_reserved)
_GATEWAY_ID = re.compile(GATEWAY_ID_PATTERN)
_SCHEMA_VERSION = 2

Status = Literal["active", "revoked", "unknown"]


class RegistryError(Exception):
    """A refused operation or a bad input: printed as one line."""


def parse_identity_key(text: str) -> ed25519.Ed25519PublicKey:
    """'ed25519:<base64url of the 32 raw bytes>' (what edge-agent enroll prints) -> the public key."""
    text = text.strip()
    if not text.startswith(IDENTITY_KEY_PREFIX):
        raise RegistryError(f"expected the gateway's identity key as printed by edge-agent enroll, "
                            f"{IDENTITY_KEY_PREFIX}<base64url>, got {text[:20]!r}")
    body = text[len(IDENTITY_KEY_PREFIX):]
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", body):
        raise RegistryError("the identity key is not valid base64url")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    if len(raw) != 32:
        raise RegistryError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def read_identity_key(value: str) -> ed25519.Ed25519PublicKey:
    """The CLI's PUBKEY: 'ed25519:...' itself, or a file holding it (identity.pub) or an SPKI PEM public key."""
    if value.startswith(IDENTITY_KEY_PREFIX) or not os.path.isfile(value):
        return parse_identity_key(value)
    data = Path(value).read_bytes()
    if b"-----BEGIN PUBLIC KEY-----" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise RegistryError(f"{value}: not a PEM public key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise RegistryError(f"{value}: expected an Ed25519 public key, got {type(key).__name__}")
        return key
    return parse_identity_key(data.decode("ascii", "replace"))


def format_identity_key(key: ed25519.Ed25519PublicKey) -> str:
    return IDENTITY_KEY_PREFIX + base64.urlsafe_b64encode(_raw(key)).rstrip(b"=").decode("ascii")


def check_gateway_id(gateway_id: str) -> str:
    # fullmatch: the pattern's "$" alone would also accept a trailing newline.
    if not isinstance(gateway_id, str) or not _GATEWAY_ID.fullmatch(gateway_id):
        raise RegistryError(f"invalid gateway id {gateway_id!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    if gateway_id.lower().startswith(RESERVED_PREFIX):
        raise RegistryError(f"{gateway_id!r}: names starting with {RESERVED_PREFIX!r} are reserved for collector "
                            "instances and cannot be gateway ids")
    return gateway_id


def _raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class GatewayEntry:
    gateway_id: str
    raw_key: bytes  # the 32 raw bytes of the Ed25519 public key
    status: Literal["active", "revoked"]
    added_at: str  # RFC 3339 UTC
    revoked_at: str | None

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return _key_of(self.raw_key)

    @property
    def public_text(self) -> str:
        return IDENTITY_KEY_PREFIX + base64.urlsafe_b64encode(self.raw_key).rstrip(b"=").decode("ascii")


def _key_of(raw: bytes) -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


class GatewayRegistry:
    """The registry file, cached in memory. Safe to share between threads; one instance per process is enough."""

    def __init__(self, path: Path | str, *, create: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        # The in-memory copy, loaded on first use (a reader's); the CLI's writes do not need it.
        self._entries: dict[str, GatewayEntry] | None = None
        self._keys: dict[str, ed25519.Ed25519PublicKey] = {}  # made on first lookup, dropped when the row changes
        self._conn: sqlite3.Connection | None = None
        self._data_version = -1
        self._seen_change = 0  # the highest row stamp read into _entries
        self._open(create)

    # -- reading (the collector's side) ----------------------------------------------------------------------

    def lookup(self, gateway_id: str) -> ed25519.Ed25519PublicKey | None:
        """The gateway's identity key; None when the gateway is unknown or revoked. Reads the in-memory copy.
        The same key object is returned for a gateway until its row changes (the Opener keys its cache on it)."""
        entry = self._cache().get(gateway_id)
        if entry is None or entry.status != "active":
            return None
        key = self._keys.get(gateway_id)
        if key is None:
            key = self._keys[gateway_id] = entry.public_key
        return key

    def status(self, gateway_id: str) -> Status:
        entry = self._cache().get(gateway_id)
        return entry.status if entry is not None else "unknown"

    def list(self) -> list[GatewayEntry]:
        return sorted(self._cache().values(), key=lambda e: e.gateway_id)

    def count(self) -> int:
        return len(self._cache())

    def get(self, gateway_id: str) -> GatewayEntry | None:
        """One row, read from the file (not the cache): what the CLI needs without loading the table."""
        with self._lock:
            row = self._conn_or_raise().execute(
                "SELECT id, public_key, status, added_at, revoked_at FROM gateways WHERE id = ?", (gateway_id,)
            ).fetchone()
        return None if row is None else GatewayEntry(row[0], bytes(row[1]), row[2], row[3], row[4])

    def refresh_if_changed(self) -> bool:
        """Read what another connection (any process) committed since the last read: only the rows stamped
        since then.

        Costs one `PRAGMA data_version` when nothing changed. True when rows were read.
        Change the file only through SQLite (this class, the CLI, or `sqlite3 FILE ".restore BACKUP"`): a file
        copied or moved over a live WAL database is not seen, and mixed with the old -wal file it is corrupt.
        """
        with self._lock:
            if self._entries is None:
                self._load()  # the first read: nothing "changed" since this instance was opened
                return False
            version = self._conn_or_raise().execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return False
            self._read_changes(version)
            return True

    # -- writing (the CLI's side) ----------------------------------------------------------------------------

    def add(self, gateway_id: str, public_key: ed25519.Ed25519PublicKey | str, *, replace: bool = False) -> None:
        """Register a gateway as active. An existing id (active or revoked) needs `replace` (a re-enrolment)."""
        check_gateway_id(gateway_id)
        key = parse_identity_key(public_key) if isinstance(public_key, str) else public_key
        self.add_many([(gateway_id, key)], replace=replace)

    def add_many(self, entries: list[tuple[str, ed25519.Ed25519PublicKey | bytes]], *, replace: bool = False) -> int:
        """Register many gateways in one transaction (bulk enrollment): all or none. Ids already registered are
        refused unless `replace`, naming the first ones. Returns how many rows were written."""
        rows = []
        for gateway_id, key in entries:
            check_gateway_id(gateway_id)
            rows.append((gateway_id, key if isinstance(key, bytes) else _raw(key)))
        ids = [gid for gid, _ in rows]
        if len(set(ids)) != len(ids):
            dup = next(gid for i, gid in enumerate(ids) if gid in ids[:i])
            raise RegistryError(f"gateway {dup} appears twice in one enrollment")
        now = _now()
        with self._lock, self._write() as conn:
            if not replace:
                existing = []
                for start in range(0, len(ids), 500):  # SQLite's bound on host parameters per statement
                    chunk = ids[start:start + 500]
                    existing += conn.execute(
                        f"SELECT id, status FROM gateways WHERE id IN ({','.join('?' * len(chunk))})", chunk
                    ).fetchall()
                if existing:
                    shown = ", ".join(f"{gid} ({status})" for gid, status in sorted(existing)[:5])
                    more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
                    raise RegistryError(f"already registered: {shown}{more}; --replace gives them new keys and "
                                        "makes them active")
            stamp = self._next_stamp(conn)
            conn.executemany(
                "INSERT INTO gateways (id, public_key, status, added_at, revoked_at, changed) "
                "VALUES (?, ?, 'active', ?, NULL, ?) "
                "ON CONFLICT (id) DO UPDATE SET public_key = excluded.public_key, status = 'active', "
                "added_at = excluded.added_at, revoked_at = NULL, changed = excluded.changed",
                [(gid, raw, now, stamp) for gid, raw in rows],
            )
        self._reload_own_write()
        return len(rows)

    def revoke(self, gateway_id: str) -> bool:
        """Mark a gateway revoked (its messages are refused from the collector's next refresh). False if it was."""
        with self._lock, self._write() as conn:
            row = conn.execute("SELECT status FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
            if row is None:
                raise RegistryError(f"gateway {gateway_id!r} is not registered")
            if row[0] == "revoked":
                return False
            conn.execute("UPDATE gateways SET status = 'revoked', revoked_at = ?, changed = ? WHERE id = ?",
                         (_now(), self._next_stamp(conn), gateway_id))
        self._reload_own_write()
        return True

    def reopen(self) -> None:
        """Open the file again and read it whole (the collector's SIGHUP): unlike refresh_if_changed() this also
        sees a registry deleted and made anew (the old connection keeps reading the old file). On failure
        (RegistryError) what was read before stays. A gateway whose key did not change keeps its key object, so
        the Opener's sessions of it stay (wire/seal.py keys its state on that object)."""
        with self._lock:
            old_conn, old_entries, old_keys = self._conn, self._entries, self._keys
            self._open(create=False)  # the connection is replaced only once the new file opened as a registry
            try:
                self._load()
            except sqlite3.DatabaseError as exc:
                if self._conn is not None:
                    self._conn.close()
                self._conn, self._entries, self._keys = old_conn, old_entries, old_keys
                raise RegistryError(f"{self.path}: not a gateway registry ({exc})") from None
            if old_entries is not None and self._entries is not None:
                new = self._entries
                self._keys = {gid: key for gid, key in old_keys.items()
                              if gid in new and gid in old_entries and new[gid].raw_key == old_entries[gid].raw_key}
            if old_conn is not None:
                old_conn.close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def __enter__(self) -> GatewayRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------------------

    def _open(self, create: bool) -> None:
        if not create and not self.path.exists():
            raise RegistryError(f"{self.path}: no gateway registry here (gateways add creates it)")
        if self.path.exists() and not self.path.is_file():
            raise RegistryError(f"{self.path} is not a file")
        # Who may send as which gateway: 0600 (SQLite gives -wal and -shm the same), whatever the umask.
        private_sqlite(self.path, create=create)
        try:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise RegistryError(f"{self.path}: cannot open ({exc})") from None
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS gateways ("
                    " id TEXT PRIMARY KEY,"
                    " public_key BLOB NOT NULL CHECK (length(public_key) = 32),"
                    " status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),"
                    " added_at TEXT NOT NULL,"
                    " revoked_at TEXT)"
                )
                version = 1
            if version == 1:
                # v2: each row carries the stamp of the write that last changed it, so a reader refreshes by
                # reading only what changed; the counter lives in its own one-row table.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    if conn.execute("PRAGMA user_version").fetchone()[0] < 2:  # another process may have done it
                        conn.execute("ALTER TABLE gateways ADD COLUMN changed INTEGER NOT NULL DEFAULT 0")
                        conn.execute("CREATE INDEX IF NOT EXISTS gateways_changed ON gateways (changed)")
                        conn.execute("CREATE TABLE IF NOT EXISTS stamp (n INTEGER NOT NULL)")
                        conn.execute("INSERT INTO stamp (n) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM stamp)")
                        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                version = _SCHEMA_VERSION
            if version != _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version}, this program knows {_SCHEMA_VERSION}")
            conn.execute("SELECT count(*) FROM stamp").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RegistryError(f"{self.path}: not a gateway registry ({exc})") from None
        self._conn = conn

    def _cache(self) -> dict[str, GatewayEntry]:
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    self._load()
        assert self._entries is not None
        return self._entries

    def _load(self) -> None:
        conn = self._conn_or_raise()
        # data_version first: a commit landing between the two reads shows at the next refresh.
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        rows = conn.execute("SELECT id, public_key, status, added_at, revoked_at, changed FROM gateways").fetchall()
        self._entries = {gid: GatewayEntry(gid, bytes(raw), status, added, revoked)
                         for gid, raw, status, added, revoked, _ in rows}
        self._keys = {}
        self._seen_change = max((row[5] for row in rows), default=0)
        self._data_version = version

    def _read_changes(self, version: int) -> None:
        assert self._entries is not None
        conn = self._conn_or_raise()
        if conn.execute("SELECT n FROM stamp").fetchone()[0] < self._seen_change:
            self._load()  # the file was restored from an older copy: the stamps went back, read it all
            return
        rows = conn.execute(
            "SELECT id, public_key, status, added_at, revoked_at, changed FROM gateways WHERE changed > ?",
            (self._seen_change,)).fetchall()
        for gid, raw, status, added, revoked, changed in rows:
            self._entries[gid] = GatewayEntry(gid, bytes(raw), status, added, revoked)
            self._keys.pop(gid, None)
            self._seen_change = max(self._seen_change, changed)
        self._data_version = version

    @staticmethod
    def _next_stamp(conn: sqlite3.Connection) -> int:
        """(inside a write transaction) The stamp of this write: one more than any before, across processes."""
        conn.execute("UPDATE stamp SET n = n + 1")
        return conn.execute("SELECT n FROM stamp").fetchone()[0]

    def _reload_own_write(self) -> None:
        # data_version does not change for this connection's own commits: read the changed rows explicitly
        # (only if this instance keeps the table in memory at all: the CLI does not).
        with self._lock:
            if self._entries is not None:
                self._read_changes(self._data_version)

    def _write(self):
        conn = self._conn_or_raise()

        class _Tx:
            def __enter__(self) -> sqlite3.Connection:
                conn.execute("BEGIN IMMEDIATE")
                return conn

            def __exit__(self, exc_type: object, *_: object) -> None:
                conn.execute("COMMIT" if exc_type is None else "ROLLBACK")

        return _Tx()

    def _conn_or_raise(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError(f"{self.path}: registry is closed")
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- command line (registered through collector.pki.register_subcommands) -------------------------------------


def register_subcommands(sub: argparse._SubParsersAction) -> None:
    from collector import fleet

    gw = sub.add_parser("gateways", help="the gateway registry and the fleet: add, list, show, revoke")
    gw_sub = gw.add_subparsers(dest="gateways_command", required=True, metavar="ACTION")
    p = gw_sub.add_parser("add", help="register a gateway and its identity public key")
    p.add_argument("gateway_id", metavar="ID")
    p.add_argument("public_key", metavar="PUBKEY",
                   help="ed25519:<base64url> as edge-agent enroll printed it, or a file holding it (identity.pub)")
    p.add_argument("--registry", required=True, metavar="FILE")
    p.add_argument("--replace", action="store_true", help="re-enrolment: new key, active again")
    p.add_argument("--ca", metavar="DIR",
                   help="the device CA directory: refuse a key other than the one the gateway's valid certificate "
                        "is bound to")
    p = gw_sub.add_parser("import", help="bulk enrollment: register many gateways from a CSV or JSON file")
    p.add_argument("file", metavar="FILE",
                   help="CSV with a header 'id,public_key' or JSON [{\"id\": ..., \"public_key\": ...}, ...]; "
                        "public_key as edge-agent enroll prints it (ed25519:...)")
    p.add_argument("--registry", required=True, metavar="FILE")
    p.add_argument("--replace", action="store_true", help="re-enrolment: new keys for ids already registered")
    p = gw_sub.add_parser("list", help="the fleet at a glance: state, last seen, backlog, devices, versions")
    fleet.add_arguments(p)
    p = gw_sub.add_parser("show", help="everything about one gateway: its devices, identification and health")
    p.add_argument("gateway_id", metavar="ID")
    fleet.add_arguments(p)
    p = gw_sub.add_parser("revoke", help="refuse a gateway's messages from now on")
    p.add_argument("gateway_id", metavar="ID")
    p.add_argument("--registry", required=True, metavar="FILE")


def check_certificates(ca_dir: Path | str, gateway_id: str, key: ed25519.Ed25519PublicKey) -> None:
    """Refuse `key` for `gateway_id` if a valid certificate of that gateway (in the CA's index) is bound to
    another identity key: the registry and the broker would then trust two different devices as one gateway."""
    from collector.pki import CertIndex
    from wire.keys import identity_fingerprint

    fingerprint = identity_fingerprint(key)
    for cert in CertIndex(ca_dir).valid(gateway_id):
        if cert.identity is not None and cert.identity != fingerprint:
            raise RegistryError(
                f"gateway {gateway_id} has a valid certificate (serial {cert.serial:x}) bound to another identity "
                f"key (sha256 {cert.identity}); register the key it was issued for, or revoke it first: "
                f"edge-collector ca revoke {gateway_id} --dir {ca_dir}")


def read_import(path: Path | str) -> list[tuple[str, ed25519.Ed25519PublicKey]]:
    """The rows of a bulk enrollment file, every one checked before anything is written; RegistryError names the
    file, the line (CSV) or index (JSON), and what is wrong."""
    import csv
    import json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read ({exc})") from None
    rows: list[tuple[str, str, str]] = []  # (where, id, key text)
    if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}: line {exc.lineno} column {exc.colno}: not JSON ({exc.msg})") from None
        if not isinstance(doc, list):
            raise RegistryError(f"{path}: expected a JSON list of {{\"id\": ..., \"public_key\": ...}}")
        for i, item in enumerate(doc):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) or \
                    not isinstance(item.get("public_key"), str):
                raise RegistryError(f"{path}: [{i}]: expected {{\"id\": \"...\", \"public_key\": \"ed25519:...\"}}")
            rows.append((f"[{i}]", item["id"], item["public_key"]))
    else:
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or not {"id", "public_key"} <= set(reader.fieldnames):
            raise RegistryError(f"{path}: line 1: expected a header with the columns id,public_key, got "
                                f"{','.join(reader.fieldnames or [])!r}")
        for record in reader:
            rows.append((f"line {reader.line_num}", (record["id"] or "").strip(), (record["public_key"] or "").strip()))
    if not rows:
        raise RegistryError(f"{path}: no gateways in it")
    out = []
    for where, gateway_id, key_text in rows:
        try:
            out.append((check_gateway_id(gateway_id), parse_identity_key(key_text)))
        except RegistryError as exc:
            raise RegistryError(f"{path}: {where}: {exc}") from None
    return out


def dispatch(args: argparse.Namespace) -> int:
    action = args.gateways_command
    if action in ("list", "show"):
        from collector import fleet
        from wire.cli import fail

        try:
            return fleet.list_command(args) if action == "list" else fleet.show_command(args)
        except fleet.FleetError as exc:
            return fail(str(exc))
    key = None
    if action == "import":
        rows = read_import(args.file)  # all checked before the registry is created or touched
        with GatewayRegistry(args.registry, create=True) as reg:
            n = reg.add_many(rows, replace=args.replace)  # type: ignore[arg-type]
        print(f"{n} gateway(s) registered (active) in {args.registry}")
        return 0
    if action == "add":
        # Everything checked before the registry is opened: `add` creates the file, and a refused key
        # should leave no trace.
        check_gateway_id(args.gateway_id)
        key = read_identity_key(args.public_key)
        if args.ca:
            check_certificates(args.ca, args.gateway_id, key)
    with GatewayRegistry(args.registry, create=(action == "add")) as reg:
        if key is not None:
            reg.add(args.gateway_id, key, replace=args.replace)
            print(f"gateway {args.gateway_id} registered (active) in {reg.path}")
            return 0
        if reg.revoke(args.gateway_id):
            print(f"gateway {args.gateway_id} revoked: collectors refuse its messages from their next refresh; "
                  "end its broker session with: edge-collector ca revoke "
                  f"{args.gateway_id} --dir DIR (CRL) and a mosquitto restart")
        else:
            print(f"gateway {args.gateway_id} was already revoked")
        return 0
