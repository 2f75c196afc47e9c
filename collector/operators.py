"""The operator CA: who may sign commands and configurations (docs/control.md "Operators and keys").

    edge-collector operators init   --dir DIR [--crl-days N] [--out FILE]
    edge-collector operators keygen NAME --out DIR                    (on the operator's own machine)
    edge-collector operators add    NAME --dir DIR [--public FILE] --role R --gateways P... [--devices P...]
                                         [--points P...] [--days N] [--out DIR]
    edge-collector operators list   --dir DIR [--json]
    edge-collector operators revoke NAME --dir DIR [--serial N] [--crl-days N] [--out FILE]
    edge-collector operators crl    --dir DIR [--days N] [--out FILE]

The CA directory (0700, every file 0600, wire/files.py):

    operator-ca.key   Ed25519 private key, PKCS#8 PEM: signs certificates and revocation lists. Never on the
                      collector service's user; offline or on an administration host.
    operator-ca.pub   its public key, SubjectPublicKeyInfo PEM: every gateway receives it at enrollment
                      (edge-agent enroll --operator-ca, agent.toml [security] operator_ca)
    operators.crl     the current revocation list, armoured "OPERATOR CRL": re-signed by revoke and crl, valid
                      for --days (default 7). A gateway refuses every document once the newest list it holds is
                      past its next update, so `crl` runs on a timer (systemd/edge-collector-operators-crl.*)
    index.json        every certificate issued (serial, name, role, scope, validity, key, revoked) and the last
                      list number. Derived data: rebuilt from issued/ and operators.crl when missing
    issued/<serial>.cert  a copy of every certificate issued (armoured "OPERATOR CERTIFICATE")

Certificates and lists are wire/control.py's (issue_cert, issue_crl); serials count up from 1 per CA, a name
issued again gets a new serial, and list numbers only go up (a gateway ignores a list not newer than its own).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from wire import control
from wire.files import DIR_MODE, FILE_MODE, flocked, private_dir, tighten, write_private
from wire.keys import identity_from_pem, identity_to_pem, public_identity_from_file, public_identity_to_pem

CA_KEY = "operator-ca.key"
CA_PUB = "operator-ca.pub"
CRL = "operators.crl"
INDEX = "index.json"
ISSUED = "issued"
LOCK = ".lock"

CERT_LABEL = "OPERATOR CERTIFICATE"
CRL_LABEL = "OPERATOR CRL"

DEFAULT_CERT_DAYS = 365
MAX_CERT_DAYS = 5 * 365
DEFAULT_CRL_DAYS = 7
MAX_CRL_DAYS = 366
MAX_PATTERNS = 64
_SKEW_MS = 5 * 60 * 1000  # a certificate is valid from 5 minutes before it was made: clocks differ

_NAME = re.compile(control.OPERATOR_NAME_PATTERN)


class OperatorsError(Exception):
    """A refused operation or a bad input: printed as one line (file, reason)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise OperatorsError(f"operator name {name!r}: expected 1-64 letters, digits, '.', '_', '@' or '-', "
                             "starting with a letter or digit")
    return name


def _write(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    try:
        write_private(path, data, overwrite=overwrite)
    except FileExistsError:
        raise OperatorsError(f"{path} already exists; refusing to overwrite it") from None


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    tighten(path, FILE_MODE)  # a key file made looser by hand is private again
    try:
        return identity_from_pem(path.read_bytes())
    except FileNotFoundError:
        raise OperatorsError(f"{path}: no such file") from None
    except PermissionError:
        raise OperatorsError(f"{path}: permission denied") from None
    except (ValueError, TypeError) as exc:
        raise OperatorsError(f"{path}: not an Ed25519 private key ({exc})") from None


def read_public_key(path: Path | str) -> Ed25519PublicKey:
    """An operator's (or the CA's) Ed25519 public key from a PEM file, with a clear refusal of anything else."""
    try:
        return public_identity_from_file(path)
    except ValueError as exc:
        hint = (": only the public key (NAME.pub from operators keygen) leaves the operator's machine"
                if "private key" in str(exc) else "")
        raise OperatorsError(f"{exc}{hint}") from None


def format_key(key: Ed25519PublicKey) -> str:
    return "ed25519:" + key.public_bytes_raw().hex()


# --- the index ----------------------------------------------------------------------------------------------


@dataclass
class Issued:
    """One certificate the CA issued, as the index keeps it."""

    serial: int
    name: str
    role: str
    scope: control.Scope
    not_before_ms: int
    not_after_ms: int
    key: str  # ed25519:<hex>
    revoked_ms: int | None = None

    def status(self, now_ms: int) -> str:
        if self.revoked_ms is not None:
            return "revoked"
        if now_ms > self.not_after_ms:
            return "expired"
        if now_ms < self.not_before_ms:
            return "not yet valid"
        return "valid"

    def to_json(self) -> dict[str, Any]:
        return {"serial": self.serial, "name": self.name, "role": self.role, "scope": msgspec.to_builtins(self.scope),
                "not_before": _iso(self.not_before_ms), "not_after": _iso(self.not_after_ms),
                "not_before_ms": self.not_before_ms, "not_after_ms": self.not_after_ms, "key": self.key,
                "revoked": self.revoked_ms is not None,
                "revoked_at": _iso(self.revoked_ms) if self.revoked_ms is not None else None,
                "revoked_ms": self.revoked_ms}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Issued:
        return cls(int(doc["serial"]), str(doc["name"]), str(doc["role"]), msgspec.convert(doc["scope"], control.Scope),
                   int(doc["not_before_ms"]), int(doc["not_after_ms"]), str(doc["key"]),
                   None if doc.get("revoked_ms") is None else int(doc["revoked_ms"]))

    @classmethod
    def from_cert(cls, cert: control.OperatorCert) -> Issued:
        return cls(cert.serial, cert.name, cert.role, cert.scope, cert.not_before_ms, cert.not_after_ms,
                   format_key(Ed25519PublicKey.from_public_bytes(cert.key)))


class OperatorCA:
    """A CA directory. Reading (list) needs no private key; issuing and revoking load it."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.key_path = self.directory / CA_KEY
        self.pub_path = self.directory / CA_PUB
        self.crl_path = self.directory / CRL
        self.index_path = self.directory / INDEX
        self.issued_dir = self.directory / ISSUED
        tighten(self.directory, DIR_MODE)  # a CA directory made looser by hand is private again
        if not self.pub_path.is_file():
            raise OperatorsError(f"{self.directory} is not an operator CA (no {CA_PUB}; run: edge-collector "
                                 "operators init --dir DIR)")
        self.public = read_public_key(self.pub_path)
        self.kid = control.key_id(self.public)
        self.entries: dict[int, Issued] = {}
        self.crl_number = 0
        self._load_index()

    # -- creating ------------------------------------------------------------------------------------------

    @classmethod
    def init(cls, directory: Path | str, *, crl_days: int = DEFAULT_CRL_DAYS) -> tuple[OperatorCA, control.Crl]:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise OperatorsError(f"{directory} is not a directory")
        for existing in (CA_KEY, CA_PUB):
            if (directory / existing).exists():
                raise OperatorsError(f"{directory / existing} already exists; refusing to overwrite an operator CA "
                                     "(every operator certificate and every gateway's trust depend on it)")
        _check_days("--crl-days", crl_days, MAX_CRL_DAYS)
        private_dir(directory)
        key = Ed25519PrivateKey.generate()
        _write(directory / CA_KEY, identity_to_pem(key), overwrite=False)
        _write(directory / CA_PUB, public_identity_to_pem(key.public_key()))
        private_dir(directory / ISSUED)
        ca = cls(directory)
        with ca._locked():
            crl = ca._sign_crl(key, crl_days)
        return ca, crl

    # -- the index -----------------------------------------------------------------------------------------

    def _load_index(self) -> None:
        try:
            doc = json.loads(self.index_path.read_text(encoding="utf-8"))
            self.entries = {e.serial: e for e in map(Issued.from_json, doc["certificates"])}
            self.crl_number = int(doc.get("crl_number", 0))
        except FileNotFoundError:
            pass
        except PermissionError:
            raise OperatorsError(f"{self.index_path}: permission denied") from None
        except (ValueError, KeyError, TypeError, msgspec.ValidationError) as exc:
            raise OperatorsError(f"{self.index_path}: not an operator index ({exc}); delete it to rebuild it from "
                                 f"{ISSUED}/ and {CRL}") from None
        # Derived data: a certificate in issued/ that the index lacks (a crash between the two writes, a deleted
        # index) is added from the certificate itself; every serial on the current list counts as revoked.
        if self.issued_dir.is_dir():
            for path in sorted(self.issued_dir.glob("*.cert")):
                if path.stem.isdigit() and int(path.stem) not in self.entries:
                    cert = self._read_cert_file(path)
                    self.entries[cert.serial] = Issued.from_cert(cert)
        crl = self.current_crl()
        if crl is not None:
            self.crl_number = max(self.crl_number, crl.number)
            for serial in crl.revoked:
                entry = self.entries.get(serial)
                if entry is not None and entry.revoked_ms is None:
                    entry.revoked_ms = crl.issued_ms

    def _read_cert_file(self, path: Path) -> control.OperatorCert:
        try:
            signed = control.decode_signed_cert(control.unarmour(CERT_LABEL, path.read_text(encoding="ascii")))
            return control.verify_cert_signature(self.public, signed)
        except (ValueError, control.ControlRefused) as exc:
            raise OperatorsError(f"{path}: not an operator certificate of this CA ({exc})") from None

    def current_crl(self) -> control.Crl | None:
        """The list in operators.crl, verified against this CA; None if there is none."""
        try:
            text = self.crl_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, PermissionError) as exc:
            raise OperatorsError(f"{self.crl_path}: unreadable ({exc})") from None
        try:
            signed = control.decode_signed_crl(control.unarmour(CRL_LABEL, text))
            trust = control.Trust(self.public)
            trust.offer_crl(signed, None)
        except (ValueError, control.ControlRefused) as exc:
            raise OperatorsError(f"{self.crl_path}: not a revocation list of this CA ({exc})") from None
        assert trust.crl is not None
        return trust.crl

    def _save_index(self) -> None:
        entries = sorted(self.entries.values(), key=lambda e: e.serial)
        lines = ",\n".join("  " + json.dumps(e.to_json(), sort_keys=True) for e in entries)
        text = (f'{{"version": 1, "crl_number": {self.crl_number}, "certificates": [\n' + lines
                + ("\n" if lines else "") + "]}\n")
        _write(self.index_path, text.encode("utf-8"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One issuing or revoking at a time across processes (flock on DIR/.lock); the index is re-read under it."""
        with flocked(self.directory / LOCK):
            self.entries, self.crl_number = {}, 0
            self._load_index()
            yield

    def _key(self) -> Ed25519PrivateKey:
        key = _read_private_key(self.key_path)
        if key.public_key().public_bytes_raw() != self.public.public_bytes_raw():
            raise OperatorsError(f"{self.key_path} does not belong to {self.pub_path}")
        return key

    def of(self, name: str) -> list[Issued]:
        return sorted((e for e in self.entries.values() if e.name == name), key=lambda e: e.serial)

    # -- issuing -------------------------------------------------------------------------------------------

    def issue(self, name: str, public: Ed25519PublicKey, role: str, scope: control.Scope, *,
              days: int = DEFAULT_CERT_DAYS) -> tuple[control.SignedCert, control.OperatorCert]:
        check_name(name)
        if role not in control.ROLES:
            raise OperatorsError(f"role {role!r}: expected one of {', '.join(control.ROLES)}")
        _check_days("--days", days, MAX_CERT_DAYS)
        _check_scope(scope)
        raw = public.public_bytes_raw()
        key = self._key()
        with self._locked():
            now = _now_ms()
            for other in self.entries.values():
                if other.key == format_key(public) and other.name != name and other.status(now) == "valid":
                    raise OperatorsError(f"this key is already certified for {other.name!r} (serial {other.serial}):"
                                         " one key, one operator (the two-person rule counts keys and names)")
            serial = max(self.entries, default=0) + 1
            cert = control.OperatorCert(serial, name, role, raw, scope, now - _SKEW_MS, now + days * 86_400_000,
                                        self.kid)
            signed = control.issue_cert(key, cert)
            cert = control.read_cert(signed)  # decoding validates every field (msgspec checks constraints there)
            private_dir(self.issued_dir)
            _write(self.issued_dir / f"{serial}.cert", cert_text(signed).encode("ascii"), overwrite=False)
            self.entries[serial] = Issued.from_cert(cert)
            self._save_index()
        return signed, cert

    # -- revoking and the list -----------------------------------------------------------------------------

    def revoke(self, name: str, *, serial: int | None = None, crl_days: int = DEFAULT_CRL_DAYS) -> tuple[
            list[int], control.Crl]:
        """Revoke every certificate of `name` (or one serial of it) and re-sign the list: the serials newly revoked."""
        _check_days("--crl-days", crl_days, MAX_CRL_DAYS)
        key = self._key()
        with self._locked():
            mine = self.of(name)
            if not mine:
                raise OperatorsError(f"this CA has issued no certificate to {name!r}")
            if serial is not None:
                mine = [e for e in mine if e.serial == serial]
                if not mine:
                    raise OperatorsError(f"serial {serial} is not a certificate of {name!r} (see operators list)")
            now = _now_ms()
            new = [e for e in mine if e.revoked_ms is None]
            for entry in new:
                entry.revoked_ms = now
            crl = self._sign_crl(key, crl_days)
        return [e.serial for e in new], crl

    def sign_crl(self, days: int = DEFAULT_CRL_DAYS) -> control.Crl:
        _check_days("--days", days, MAX_CRL_DAYS)
        key = self._key()
        with self._locked():
            return self._sign_crl(key, days)

    def _sign_crl(self, key: Ed25519PrivateKey, days: int) -> control.Crl:
        """Under the lock: a new list (number + 1) of every revoked serial, written to operators.crl, then the
        index (which records the number)."""
        now = _now_ms()
        revoked = sorted(e.serial for e in self.entries.values() if e.revoked_ms is not None)
        self.crl_number += 1
        crl = control.Crl(self.crl_number, now, now + days * 86_400_000, revoked, self.kid)
        signed = control.issue_crl(key, crl)
        _write(self.crl_path, crl_text(signed).encode("ascii"))
        self._save_index()
        return crl

    def copy_crl(self, out: Path | str) -> Path:
        """An extra copy of operators.crl (e.g. where collector.toml [control] crl names it)."""
        out = Path(out)
        if not out.parent.is_dir():
            raise OperatorsError(f"{out.parent}: no such directory (for --out {out})")
        _write(out, self.crl_path.read_bytes())
        return out


def cert_text(signed: control.SignedCert) -> str:
    """The armoured certificate with a readable summary above it (unarmour skips text around the block)."""
    cert = control.read_cert(signed)
    s = cert.scope
    return (f"# operator {cert.name}, role {cert.role}, serial {cert.serial}\n"
            f"# valid {_iso(cert.not_before_ms)} .. {_iso(cert.not_after_ms)}\n"
            f"# scope: gateways {' '.join(s.gateways)}; devices {' '.join(s.devices)}; points {' '.join(s.points)}\n"
            f"# issued by operator CA {cert.ca.hex()}\n" + control.armour(CERT_LABEL, control.encode(signed)))


def crl_text(signed: control.SignedCrl) -> str:
    crl = control.read_crl(signed)
    return (f"# operator revocation list {crl.number} of CA {crl.ca.hex()}, issued {_iso(crl.issued_ms)}, next "
            f"update {_iso(crl.next_update_ms)}\n# revoked serials: {' '.join(map(str, crl.revoked)) or 'none'}\n"
            + control.armour(CRL_LABEL, control.encode(signed)))


def _check_days(option: str, days: int, maximum: int) -> None:
    if not 1 <= days <= maximum:
        raise OperatorsError(f"{option} must be 1..{maximum}, got {days}")


def _check_scope(scope: control.Scope) -> None:
    for what in ("gateways", "devices", "points"):
        patterns = getattr(scope, what)
        if not patterns:
            raise OperatorsError(f"--{what}: at least one pattern")
        if len(patterns) > MAX_PATTERNS:
            raise OperatorsError(f"--{what}: at most {MAX_PATTERNS} patterns, got {len(patterns)}")
        for p in patterns:
            if not 1 <= len(p) <= 128 or any(ord(c) < 0x20 for c in p):
                raise OperatorsError(f"--{what} {p!r}: a pattern is 1-128 printable characters")


def keygen(name: str, out: Path | str) -> tuple[Path, Path]:
    """An operator's key pair, made on their own machine: NAME.key (0600) and NAME.pub (what the CA needs)."""
    check_name(name)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OperatorsError(f"{out} is not a directory")
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise OperatorsError(f"{path} already exists; refusing to overwrite an operator's key")
    private_dir(out, tighten_existing=False)
    key = Ed25519PrivateKey.generate()
    _write(key_path, identity_to_pem(key), overwrite=False)
    _write(pub_path, public_identity_to_pem(key.public_key()), overwrite=False)
    return key_path, pub_path


# --- command line (wired into collector/cli.py) ---------------------------------------------------------------

COMMAND = "operators"


def register_subcommands(sub: argparse._SubParsersAction) -> None:
    ops = sub.add_parser("operators", help="the operator CA: who may sign commands and configurations")
    ops_sub = ops.add_subparsers(dest="operators_command", required=True, metavar="ACTION")
    p = ops_sub.add_parser("init", help="create an operator CA (Ed25519) and its first revocation list in DIR")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS, help="list validity (default %(default)s)")
    p.add_argument("--out", metavar="FILE", help="also write the revocation list here")
    p = ops_sub.add_parser("keygen", help="an operator's key pair, on the operator's own machine")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--out", required=True, metavar="DIR", help="where NAME.key (private, 0600) and NAME.pub go")
    p = ops_sub.add_parser("add", help="issue an operator certificate (NAME.cert)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--dir", required=True, metavar="DIR", help="the operator CA directory")
    p.add_argument("--public", metavar="FILE",
                   help="the operator's NAME.pub (operators keygen); without it a key pair is made here")
    p.add_argument("--role", required=True, choices=list(control.ROLES))
    p.add_argument("--gateways", required=True, nargs="+", metavar="PATTERN",
                   help="gateway ids the operator may act on (shell patterns, e.g. 'gw-north-*'; '*' for all)")
    p.add_argument("--devices", nargs="+", default=["*"], metavar="PATTERN", help="device ids (default: all)")
    p.add_argument("--points", nargs="+", default=["*"], metavar="PATTERN", help="writable points (default: all)")
    p.add_argument("--days", type=int, default=DEFAULT_CERT_DAYS, help="validity (default %(default)s)")
    p.add_argument("--out", metavar="DIR",
                   help="where NAME.cert (and a made key pair) go; default: next to --public, else the current "
                        "directory")
    p = ops_sub.add_parser("list", help="every certificate issued: name, role, scope, validity, serial, revoked")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p = ops_sub.add_parser("revoke", help="revoke an operator's certificates and re-sign the revocation list")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--serial", type=int, metavar="N", help="only this certificate of NAME")
    p.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS, help="list validity (default %(default)s)")
    p.add_argument("--out", metavar="FILE", help="also write the revocation list here")
    p = ops_sub.add_parser("crl", help="re-sign the revocation list with a fresh next update (run it on a timer)")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--days", type=int, default=DEFAULT_CRL_DAYS, help="list validity (default %(default)s)")
    p.add_argument("--out", metavar="FILE", help="also write the revocation list here")


def dispatch(args: argparse.Namespace) -> int | None:
    """Run `operators ...` and return its exit code; None for any other command."""
    if args.command != COMMAND:
        return None
    from wire.cli import fail

    try:
        return _run(args)
    except OperatorsError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 1)


def _crl_line(ca: OperatorCA, crl: control.Crl, out: str | None) -> str:
    copy = f" and {ca.copy_crl(out)}" if out else ""
    return (f"revocation list {crl.number} written to {ca.crl_path}{copy} ({len(crl.revoked)} revoked, next update "
            f"{_iso(crl.next_update_ms)}): the collector relays it ([control] crl); re-sign it before then "
            f"(operators crl, on a timer)")


def _run(args: argparse.Namespace) -> int:
    action = args.operators_command
    if action == "init":
        ca, crl = OperatorCA.init(args.dir, crl_days=args.crl_days)
        print(f"operator CA created in {ca.directory} (key id {ca.kid.hex()})")
        print(f"  private key {ca.key_path} (mode 0600; keep it off the collector service, back it up offline)")
        print(f"  public key  {ca.pub_path}: give it to every gateway at enrollment (edge-agent enroll "
              f"--operator-ca), agent.toml [security] operator_ca")
        print(f"  {_crl_line(ca, crl, args.out)}")
        return 0
    if action == "keygen":
        key_path, pub_path = keygen(args.name, args.out)
        print(f"operator key for {args.name}: {key_path} (mode 0600; stays on this machine)")
        print(f"public key: {pub_path}: send it to the operator CA's holder (edge-collector operators add "
              f"{args.name} --public {pub_path.name} ...)")
        return 0
    ca = OperatorCA(args.dir)
    if action == "add":
        return _add(ca, args)
    if action == "list":
        now = _now_ms()
        entries = sorted(ca.entries.values(), key=lambda e: (e.name, e.serial))
        if args.json:
            print(json.dumps([e.to_json() | {"status": e.status(now)} for e in entries], indent=1))
            return 0
        if not entries:
            print(f"no operator certificates in {ca.directory}")
        for e in entries:
            s = e.scope
            print(f"{e.name:<20} {e.role:<9} serial {e.serial:<5} {e.status(now):<13} "
                  f"{_iso(e.not_before_ms)[:10]}..{_iso(e.not_after_ms)[:10]}  gateways {','.join(s.gateways)} "
                  f"devices {','.join(s.devices)} points {','.join(s.points)}")
        return 0
    if action == "revoke":
        serials, crl = ca.revoke(args.name, serial=args.serial, crl_days=args.crl_days)
        if serials:
            print(f"revoked {len(serials)} certificate(s) of {args.name}: serial {', '.join(map(str, serials))}")
        else:
            print(f"{args.name} had no certificate left to revoke; the list was re-signed")
        print(_crl_line(ca, crl, args.out))
        return 0
    crl = ca.sign_crl(args.days)
    print(_crl_line(ca, crl, args.out))
    return 0


def _add(ca: OperatorCA, args: argparse.Namespace) -> int:
    check_name(args.name)
    out = Path(args.out) if args.out else (Path(args.public).parent if args.public else Path("."))
    if not out.is_dir():
        raise OperatorsError(f"{out}: no such directory (for --out)")
    cert_path = out / f"{args.name}.cert"
    made: tuple[Path, Path] | None = None
    if args.public:
        public = read_public_key(args.public)
    else:
        # Checked before the key is made, so that a refused add leaves nothing behind.
        if cert_path.exists():
            raise OperatorsError(f"{cert_path} already exists; refusing to overwrite it")
        made = keygen(args.name, out)
        public = read_public_key(made[1])
    scope = control.Scope(list(args.gateways), list(args.devices), list(args.points))
    signed, cert = ca.issue(args.name, public, args.role, scope, days=args.days)
    try:
        _write(cert_path, cert_text(signed).encode("ascii"))
    except OSError as exc:
        raise OperatorsError(f"{cert_path}: {exc.strerror or exc}; the certificate was issued (serial "
                             f"{cert.serial}): a copy is in {ca.issued_dir / f'{cert.serial}.cert'}") from None
    print(f"certificate for {cert.name} written to {cert_path} (serial {cert.serial}, role {cert.role}, valid until "
          f"{_iso(cert.not_after_ms)[:10]}; gateways {' '.join(scope.gateways)}, devices {' '.join(scope.devices)}, "
          f"points {' '.join(scope.points)})")
    if made is not None:
        print(f"the key pair was made HERE: {made[0]} (private, 0600) and {made[1]}; hand the private key to "
              f"{cert.name} over a secure channel and delete it from this host (operators keygen on the operator's "
              "own machine avoids this)")
    return 0
