"""The gateway registry: which gateway ids may send, and the Ed25519 key their messages are signed with.

One SQLite file in WAL mode (a reader never blocks the CLI's writes and vice versa), written by

    edge-collector gateways add ID ed25519:<base64url> --registry FILE [--replace] [--ca DIR]
    edge-collector gateways list   --registry FILE
    edge-collector gateways revoke ID --registry FILE

and read by the collector, which keeps the whole table in memory and re-reads it when it changed:

    reg = GatewayRegistry(path)
    reg.refresh_if_changed()      # cheap (one PRAGMA data_version); call it before looking up, e.g. per message
    reg.lookup("gw-0001")         # Ed25519PublicKey, or None for an unknown or revoked gateway

A revoke made by any process is seen by every reader at its next refresh_if_changed(): no restart.
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
_SCHEMA_VERSION = 1

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
    public_key: ed25519.Ed25519PublicKey
    status: Literal["active", "revoked"]
    added_at: str  # RFC 3339 UTC
    revoked_at: str | None

    @property
    def public_text(self) -> str:
        return format_identity_key(self.public_key)


class GatewayRegistry:
    """The registry file, cached in memory. Safe to share between threads; one instance per process is enough."""

    def __init__(self, path: Path | str, *, create: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._entries: dict[str, GatewayEntry] = {}
        self._conn: sqlite3.Connection | None = None
        self._data_version = -1
        self._open(create)

    # -- reading (the collector's side) ----------------------------------------------------------------------

    def lookup(self, gateway_id: str) -> ed25519.Ed25519PublicKey | None:
        """The gateway's identity key; None when the gateway is unknown or revoked. Reads the in-memory copy."""
        entry = self._entries.get(gateway_id)
        return entry.public_key if entry is not None and entry.status == "active" else None

    def status(self, gateway_id: str) -> Status:
        entry = self._entries.get(gateway_id)
        return entry.status if entry is not None else "unknown"

    def list(self) -> list[GatewayEntry]:
        return sorted(self._entries.values(), key=lambda e: e.gateway_id)

    def refresh_if_changed(self) -> bool:
        """Re-read the table if another connection (any process) committed since the last read.

        Costs one `PRAGMA data_version` when nothing changed. True when the table was re-read.
        Change the file only through SQLite (this class, the CLI, or `sqlite3 FILE ".restore BACKUP"`): a file
        copied or moved over a live WAL database is not seen, and mixed with the old -wal file it is corrupt.
        """
        with self._lock:
            version = self._conn_or_raise().execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return False
            self._load()
            return True

    # -- writing (the CLI's side) ----------------------------------------------------------------------------

    def add(self, gateway_id: str, public_key: ed25519.Ed25519PublicKey | str, *, replace: bool = False) -> None:
        """Register a gateway as active. An existing id (active or revoked) needs `replace` (a re-enrolment)."""
        check_gateway_id(gateway_id)
        key = parse_identity_key(public_key) if isinstance(public_key, str) else public_key
        with self._lock, self._write() as conn:
            row = conn.execute("SELECT status FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
            if row is not None and not replace:
                raise RegistryError(f"gateway {gateway_id} is already registered ({row[0]}); "
                                    "--replace gives it a new key and makes it active")
            conn.execute(
                "INSERT INTO gateways (id, public_key, status, added_at, revoked_at) VALUES (?, ?, 'active', ?, NULL) "
                "ON CONFLICT (id) DO UPDATE SET public_key = excluded.public_key, status = 'active', "
                "added_at = excluded.added_at, revoked_at = NULL",
                (gateway_id, _raw(key), _now()),
            )
        self._reload_own_write()

    def revoke(self, gateway_id: str) -> bool:
        """Mark a gateway revoked (its messages are refused from the collector's next refresh). False if it was."""
        with self._lock, self._write() as conn:
            row = conn.execute("SELECT status FROM gateways WHERE id = ?", (gateway_id,)).fetchone()
            if row is None:
                raise RegistryError(f"gateway {gateway_id!r} is not registered")
            if row[0] == "revoked":
                return False
            conn.execute("UPDATE gateways SET status = 'revoked', revoked_at = ? WHERE id = ?", (_now(), gateway_id))
        self._reload_own_write()
        return True

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
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version}, this program knows {_SCHEMA_VERSION}")
            entries, data_version = self._read(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RegistryError(f"{self.path}: not a gateway registry ({exc})") from None
        self._conn = conn
        self._entries, self._data_version = entries, data_version

    def _load(self) -> None:
        self._entries, self._data_version = self._read(self._conn_or_raise())

    @staticmethod
    def _read(conn: sqlite3.Connection) -> tuple[dict[str, GatewayEntry], int]:
        # data_version first: a commit landing between the two reads shows at the next refresh.
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        rows = conn.execute("SELECT id, public_key, status, added_at, revoked_at FROM gateways").fetchall()
        entries = {
            gid: GatewayEntry(gid, ed25519.Ed25519PublicKey.from_public_bytes(bytes(raw)), status, added, revoked)
            for gid, raw, status, added, revoked in rows
        }
        return entries, version

    def _reload_own_write(self) -> None:
        # data_version does not change for this connection's own commits: re-read explicitly.
        with self._lock:
            self._load()

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
    gw = sub.add_parser("gateways", help="the gateway registry: add, list, revoke")
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
    p = gw_sub.add_parser("list", help="list registered gateways")
    p.add_argument("--registry", required=True, metavar="FILE")
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


def dispatch(args: argparse.Namespace) -> int:
    action = args.gateways_command
    key = None
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
        if action == "list":
            for e in reg.list():
                when = f"revoked {e.revoked_at}" if e.revoked_at else f"added {e.added_at}"
                print(f"{e.gateway_id:<24} {e.status:<8} {e.public_text}  {when}")
            return 0
        if reg.revoke(args.gateway_id):
            print(f"gateway {args.gateway_id} revoked: collectors refuse its messages from their next refresh; "
                  "end its broker session with: edge-collector ca revoke "
                  f"{args.gateway_id} --dir DIR (CRL) and a mosquitto restart")
        else:
            print(f"gateway {args.gateway_id} was already revoked")
        return 0
