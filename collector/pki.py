"""The central side of enrollment: the device CA and the collector's own X25519 key pair.

    edge-collector ca init   --dir DIR                       device CA: ca.key (0600), ca.crt, ca.crl
    edge-collector ca sign   CSR --dir DIR [--days N] [--out FILE] [--collector]
    edge-collector ca revoke ID --dir DIR                    adds ID's certificates to ca.crl
    edge-collector ca crl    --dir DIR                       re-signs ca.crl (it must not expire)
    edge-collector keys init --dir DIR [--next]              collector.key (0600) + collector.pub (SPKI PEM)
                                                             (or collector-next.*), prints the key id
    edge-collector keys show --dir DIR
    edge-collector keys promote --dir DIR                    next becomes current, current is retired

The device CA signs only client certificates whose CN is a gateway id (wire.schema.GATEWAY_ID_PATTERN: no
'+', '#', '/', NUL or control characters - the CN becomes the MQTT username and, through the broker's ACL
patterns, a topic level), or, with --collector, a collector instance's name collector-<name>.
docs/enrollment.md has the procedures.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.enroll import EnrollError, write_private
from wire.schema import GATEWAY_ID_PATTERN

# Collector instances have certificate CNs collector-<name> (collector-1, collector-2, ...): the broker makes
# the CN both the username and the client id (deploy/mosquitto/citynerve.conf), and the ACL names each one in a
# "user collector-<name>" block (deploy/mosquitto/acl). Gateway ids may not start with "collector".
COLLECTOR_PREFIX = "collector"
_COLLECTOR_CN = re.compile(r"collector-[A-Za-z0-9][A-Za-z0-9._-]{0,53}")

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_CRL = "ca.crl"
ISSUED = "issued"

DEFAULT_CA_DAYS = 20 * 365
DEFAULT_CERT_DAYS = 5 * 365
DEFAULT_CRL_DAYS = 365

_GATEWAY_ID = re.compile(GATEWAY_ID_PATTERN)


class PkiError(Exception):
    """A refused operation or a bad input: printed as one line."""


def is_reserved(name: str) -> bool:
    """Names no gateway may have: they belong to collector instances (and would get their ACL)."""
    return name.lower().startswith(COLLECTOR_PREFIX)


def check_common_name(cn: str, *, collector: bool = False) -> str:
    """The CN a certificate may carry: a gateway id (not a reserved name), or collector-<name> with --collector."""
    if collector:
        if not isinstance(cn, str) or not _COLLECTOR_CN.fullmatch(cn):
            raise PkiError(f"a collector certificate must have CN collector-<name> (e.g. collector-1), got {cn!r}")
        return cn
    # fullmatch, not match: the pattern's "$" alone would let a trailing newline through.
    if not isinstance(cn, str) or not _GATEWAY_ID.fullmatch(cn):
        raise PkiError(f"CN {cn!r} is not a gateway id (1-64 letters, digits, '.', '_' or '-', starting with a "
                       "letter or digit; no '+', '#', '/', NUL or control characters)")
    if is_reserved(cn):
        raise PkiError(f"CN {cn!r}: names starting with {COLLECTOR_PREFIX!r} are reserved for collector "
                       "instances (sign those with --collector)")
    return cn


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_private(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _private(path: Path, data: bytes) -> None:
    try:
        write_private(path, data, overwrite=False)
    except EnrollError as exc:
        raise PkiError(str(exc)) from None


# --- the device CA ----------------------------------------------------------------------------------------------


class DeviceCA:
    """A CA directory: ca.key, ca.crt, ca.crl and issued/<serial>.crt (every certificate it signed)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.key_path = self.directory / CA_KEY
        self.cert_path = self.directory / CA_CERT
        self.crl_path = self.directory / CA_CRL
        self.issued_dir = self.directory / ISSUED
        try:
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise PkiError(f"{self.directory} is not a device CA ({Path(exc.filename).name} missing; "
                           "run: edge-collector ca init --dir DIR)") from None
        except PermissionError as exc:
            raise PkiError(f"{exc.filename}: permission denied") from None
        except ValueError as exc:
            raise PkiError(f"{self.directory}: unreadable CA files: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.key_path}: expected an EC private key")
        self.key = key

    @classmethod
    def init(cls, directory: Path | str, *, name: str = "citynerve device CA",
             days: int = DEFAULT_CA_DAYS) -> DeviceCA:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise PkiError(f"{directory} is not a directory")
        for existing in (CA_KEY, CA_CERT):
            if (directory / existing).exists():
                raise PkiError(f"{directory / existing} already exists; refusing to overwrite a CA "
                               "(every certificate it signed would stop working)")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _private(directory / CA_KEY, _pem_private(key))
        _write_public(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
        (directory / ISSUED).mkdir(mode=0o700, exist_ok=True)
        ca = cls(directory)
        ca.write_crl()
        return ca

    # -- signing ---------------------------------------------------------------------------------------------

    def sign(self, csr_pem: bytes, *, days: int = DEFAULT_CERT_DAYS, collector: bool = False) -> x509.Certificate:
        """Verify a CSR and issue a TLS client certificate (EKU clientAuth, CN = the CSR's CN)."""
        if days < 1:
            raise PkiError(f"--days must be at least 1, got {days}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            try:
                csr = x509.load_der_x509_csr(csr_pem)
            except ValueError:
                raise PkiError("not a certificate signing request (PEM or DER)") from None
        if not csr.is_signature_valid:
            raise PkiError("the CSR's signature does not verify (corrupted or tampered with)")
        cn = self._single_cn(csr.subject)
        check_common_name(cn, collector=collector)
        public_key = csr.public_key()
        _check_key(public_key)
        now = _now()
        if now + dt.timedelta(days=days) > self.cert.not_valid_after_utc:
            raise PkiError(f"--days {days} reaches beyond the CA's own expiry ({self.cert.not_valid_after_utc:%Y-%m-%d})")
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=False,
                              crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.issued_dir.mkdir(mode=0o700, exist_ok=True)
        _write_public(self.issued_dir / f"{cert.serial_number:x}.crt", cert.public_bytes(serialization.Encoding.PEM))
        return cert

    @staticmethod
    def _single_cn(subject: x509.Name) -> str:
        attrs = list(subject)
        cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or len(attrs) != 1:
            raise PkiError(f"the CSR's subject must be exactly one CN (the gateway id), got {subject.rfc4514_string()!r}")
        value = cns[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")

    # -- revocation ------------------------------------------------------------------------------------------

    def issued(self) -> list[x509.Certificate]:
        if not self.issued_dir.is_dir():
            return []
        return [x509.load_pem_x509_certificate(p.read_bytes()) for p in sorted(self.issued_dir.glob("*.crt"))]

    def revoked_serials(self) -> dict[int, dt.datetime]:
        crl = self.load_crl()
        return {} if crl is None else {r.serial_number: r.revocation_date_utc for r in crl}

    def load_crl(self) -> x509.CertificateRevocationList | None:
        try:
            return x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except FileNotFoundError:
            return None

    def revoke(self, common_name: str, *, crl_days: int = DEFAULT_CRL_DAYS) -> list[int]:
        """Add every unexpired certificate issued to `common_name` to the CRL; the serials newly revoked."""
        revoked = self.revoked_serials()
        now = _now()
        matching = [c for c in self.issued()
                    if [a.value for a in c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [common_name]]
        if not matching:
            raise PkiError(f"this CA has issued no certificate to {common_name!r}")
        new = [c.serial_number for c in matching
               if c.serial_number not in revoked and c.not_valid_after_utc > now]
        for serial in new:
            revoked[serial] = now
        self.write_crl(revoked, days=crl_days)
        return new

    def write_crl(self, revoked: dict[int, dt.datetime] | None = None, *, days: int = DEFAULT_CRL_DAYS) -> Path:
        """(Re-)sign the CRL. mosquitto refuses every client once the CRL's next update has passed."""
        if revoked is None:
            revoked = self.revoked_serials()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path


def _check_key(public_key: object) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise PkiError(f"the CSR's EC key is on {public_key.curve.name}; expected P-256 or P-384")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise PkiError(f"the CSR's RSA key has {public_key.key_size} bits; expected at least 2048")
        return
    raise PkiError(f"the CSR's key type {type(public_key).__name__} is not accepted (EC P-256/P-384 or RSA)")


# --- the collector's X25519 key pair ---------------------------------------------------------------------------

COLLECTOR_KEY = "collector.key"
COLLECTOR_PUB = "collector.pub"
NEXT_KEY = "collector-next.key"
NEXT_PUB = "collector-next.pub"
RETIRED = "retired"
X25519_PREFIX = "x25519:"


@dataclass(frozen=True)
class CollectorKey:
    kid: str  # first 8 bytes of SHA-256 of the raw public key, hex (as wire.seal.CollectorKey.kid)
    public: str  # "x25519:<base64url>"
    role: str  # "current" | "next" | "retired"
    path: Path


def key_id(public_key: x25519.X25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8].hex()


def format_x25519(public_key: x25519.X25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return X25519_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def parse_x25519(text: str) -> x25519.X25519PublicKey:
    text = text.strip()
    if not text.startswith(X25519_PREFIX):
        raise PkiError(f"expected an X25519 public key written {X25519_PREFIX}<base64url>")
    body = text[len(X25519_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise PkiError("the X25519 public key is not valid base64url") from None
    if len(raw) != 32:
        raise PkiError(f"an X25519 public key has 32 bytes, got {len(raw)}")
    return x25519.X25519PublicKey.from_public_bytes(raw)


def init_collector_key(directory: Path | str, *, next_key: bool = False) -> CollectorKey:
    """Make collector.key/.pub (or, with next_key, collector-next.key/.pub for a rotation)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} is not a directory")
    key_name, pub_name = (NEXT_KEY, NEXT_PUB) if next_key else (COLLECTOR_KEY, COLLECTOR_PUB)
    if next_key and not (directory / COLLECTOR_KEY).exists():
        raise PkiError(f"{directory / COLLECTOR_KEY} does not exist; run keys init without --next first")
    if (directory / key_name).exists():
        hint = ("a rotation is already under way (keys promote finishes it)" if next_key
                else "keys init --next makes the rotation key")
        raise PkiError(f"{directory / key_name} already exists; refusing to overwrite ({hint})")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = x25519.X25519PrivateKey.generate()
    _private(directory / key_name, _pem_private(key))
    # SubjectPublicKeyInfo PEM: what wire.keys.collector_key_from_pem reads on the agent side.
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_public(directory / pub_name, pem)
    public = format_x25519(key.public_key())
    return CollectorKey(key_id(key.public_key()), public, "next" if next_key else "current", directory / key_name)


def _load_x25519(path: Path) -> x25519.X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except PermissionError:
        raise PkiError(f"{path}: permission denied") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, x25519.X25519PrivateKey):
        raise PkiError(f"{path}: expected an X25519 private key")
    return key


def collector_keys(directory: Path | str) -> list[CollectorKey]:
    """current, next (if any) and retired keys, in that order."""
    directory = Path(directory)
    found = [(directory / COLLECTOR_KEY, "current"), (directory / NEXT_KEY, "next")]
    found += [(p, "retired") for p in sorted((directory / RETIRED).glob("*.key"))]
    out = []
    for path, role in found:
        if path.exists():
            pub = _load_x25519(path).public_key()
            out.append(CollectorKey(key_id(pub), format_x25519(pub), role, path))
    return out


def load_private_keys(directory: Path | str) -> dict[str, x25519.X25519PrivateKey]:
    """kid -> private key, for every key the collector may still receive messages for (current, next, retired)."""
    keys = {k.kid: _load_x25519(k.path) for k in collector_keys(directory)}
    if not keys:
        raise PkiError(f"no collector key in {directory} (run: edge-collector keys init --dir {directory})")
    return keys


def promote_next(directory: Path | str) -> tuple[CollectorKey, CollectorKey]:
    """collector-next.* becomes collector.*; the old current key moves to retired/<kid>.key (still decrypting)."""
    directory = Path(directory)
    keys = {k.role: k for k in collector_keys(directory)}
    if "next" not in keys or "current" not in keys:
        raise PkiError(f"no rotation under way in {directory} (keys init --next starts one)")
    old, new = keys["current"], keys["next"]
    retired = directory / RETIRED
    retired.mkdir(mode=0o700, exist_ok=True)
    os.replace(directory / COLLECTOR_KEY, retired / f"{old.kid}.key")
    os.replace(directory / COLLECTOR_PUB, retired / f"{old.kid}.pub")
    os.replace(directory / NEXT_KEY, directory / COLLECTOR_KEY)
    os.replace(directory / NEXT_PUB, directory / COLLECTOR_PUB)
    return old, new


# --- command line (wired into collector/cli.py) ---------------------------------------------------------------

COMMANDS = ("ca", "keys", "gateways")


def register_subcommands(sub: argparse._SubParsersAction) -> None:
    from collector import registry

    ca = sub.add_parser("ca", help="the device CA: init, sign a gateway's CSR, revoke, refresh the CRL")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    p = ca_sub.add_parser("init", help="create a device CA (EC P-256) in DIR")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--days", type=int, default=DEFAULT_CA_DAYS, help="CA validity (default %(default)s)")
    p = ca_sub.add_parser("sign", help="verify a CSR and issue a TLS client certificate")
    p.add_argument("csr", metavar="CSR", help="the gateway's tls.csr")
    p.add_argument("--dir", required=True, metavar="DIR", help="the device CA directory")
    p.add_argument("--days", type=int, default=DEFAULT_CERT_DAYS, help="validity (default %(default)s)")
    p.add_argument("--out", metavar="FILE", help="where the certificate goes (default: CSR with .crt)")
    p.add_argument("--collector", action="store_true", help="sign a collector instance's CSR (CN collector-<name>)")
    p = ca_sub.add_parser("revoke", help="revoke every certificate issued to a gateway (updates ca.crl)")
    p.add_argument("gateway_id", metavar="ID")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS, help="CRL validity (default %(default)s)")
    p = ca_sub.add_parser("crl", help="re-sign ca.crl with a fresh next-update date")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS, help="CRL validity (default %(default)s)")

    keys = sub.add_parser("keys", help="the collector's X25519 key pair: init, show, promote")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = keys_sub.add_parser("init", help="create collector.key/.pub (or, with --next, the rotation key)")
    p.add_argument("--dir", required=True, metavar="DIR")
    p.add_argument("--next", action="store_true", help="make the next key of a rotation")
    p = keys_sub.add_parser("show", help="list the keys with their ids")
    p.add_argument("--dir", required=True, metavar="DIR")
    p = keys_sub.add_parser("promote", help="the next key becomes current; the current one is retired")
    p.add_argument("--dir", required=True, metavar="DIR")

    registry.register_subcommands(sub)


def dispatch(args: argparse.Namespace) -> int | None:
    """Run ca / keys / gateways and return the exit code; None for any other command."""
    if args.command not in COMMANDS:
        return None
    from collector import registry
    from wire.cli import fail

    try:
        if args.command == "ca":
            return _ca(args)
        if args.command == "keys":
            return _keys(args)
        return registry.dispatch(args)
    except (PkiError, registry.RegistryError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 1)


def _ca(args: argparse.Namespace) -> int:
    if args.ca_command == "init":
        ca = DeviceCA.init(args.dir, days=args.days)
        print(f"device CA created in {ca.directory}")
        print(f"  certificate {ca.cert_path} (give it to the broker as cafile; valid until "
              f"{ca.cert.not_valid_after_utc:%Y-%m-%d})")
        print(f"  private key {ca.key_path} (mode 0600; keep it off the broker, back it up offline)")
        print(f"  CRL         {ca.crl_path} (the broker's crlfile; re-sign before {_crl_expiry(ca)} with ca crl)")
        return 0
    ca = DeviceCA(args.dir)
    if args.ca_command == "sign":
        csr_path = Path(args.csr)
        cert = ca.sign(csr_path.read_bytes(), days=args.days, collector=args.collector)
        out = Path(args.out) if args.out else csr_path.with_suffix(".crt")
        _write_public(out, cert.public_bytes(serialization.Encoding.PEM))
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        print(f"certificate for {cn} written to {out} (serial {cert.serial_number:x}, valid until "
              f"{cert.not_valid_after_utc:%Y-%m-%d})")
        return 0
    if args.ca_command == "revoke":
        serials = ca.revoke(args.gateway_id, crl_days=args.crl_days)
        if serials:
            print(f"revoked {len(serials)} certificate(s) of {args.gateway_id}: "
                  + ", ".join(f"{s:x}" for s in serials))
        else:
            print(f"{args.gateway_id} has no unrevoked, unexpired certificate; CRL re-signed")
        print(f"CRL written to {ca.crl_path}: install it as the broker's crlfile and restart mosquitto")
        return 0
    path = ca.write_crl(days=args.crl_days)
    print(f"CRL re-signed: {path} ({len(ca.revoked_serials())} revoked, next update {_crl_expiry(ca)})")
    return 0


def _crl_expiry(ca: DeviceCA) -> str:
    crl = ca.load_crl()
    return "?" if crl is None or crl.next_update_utc is None else f"{crl.next_update_utc:%Y-%m-%d}"


def _keys(args: argparse.Namespace) -> int:
    if args.keys_command == "init":
        k = init_collector_key(args.dir, next_key=args.next)
        print(f"{k.role} collector key: {k.path} (mode 0600)")
        print(f"public key: {k.public}")
        print(f"key id: {k.kid}")
        if args.next:
            print("next: give every agent this public key and key id as the next key, then run keys promote")
        return 0
    if args.keys_command == "show":
        keys = collector_keys(args.dir)
        if not keys:
            raise PkiError(f"no collector key in {args.dir}")
        for k in keys:
            print(f"{k.role:<8} {k.kid}  {k.public}")
        return 0
    old, new = promote_next(args.dir)
    print(f"current key is now {new.kid}; {old.kid} retired to {Path(args.dir) / RETIRED} "
          "(still decrypts until you delete it)")
    return 0
