"""The central side of enrollment: the device CA and the collector's own X25519 key pair.

    edge-collector ca init   --dir DIR                       device CA: ca.key, ca.crt, ca.crl, index.json
    edge-collector ca sign   CSR --dir DIR [--days N] [--out FILE] [--collector] [--replace] [--registry FILE]
    edge-collector ca revoke ID --dir DIR                    adds ID's certificates to ca.crl
    edge-collector ca crl    --dir DIR                       re-signs ca.crl (it must not expire)
    edge-collector keys init --dir DIR [--next]              collector.key (0600) + collector.pub (SPKI PEM)
                                                             (or collector-next.*), prints the key id
    edge-collector keys show --dir DIR
    edge-collector keys promote --dir DIR                    next becomes current, current is retired

The device CA signs only client certificates whose CN is a gateway id (wire.schema.GATEWAY_ID_PATTERN: no
'+', '#', '/', NUL or control characters - the CN becomes the MQTT username and, through the broker's ACL
patterns, a topic level), or, with --collector, a collector instance's name collector-<name>.
One valid (unexpired, unrevoked) certificate per CN: a second one needs --replace, which revokes the first.
A gateway's CSR must carry its identity proof (wire/keys.py), and the certificate records the identity key's
fingerprint, so a certificate belongs to one identity key. Every file written here is 0600 in a 0700
directory (wire/files.py). docs/enrollment.md has the procedures.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wire.files import DIR_MODE, FILE_MODE, flocked, private_dir, sync_batch, tighten, write_private
from wire.keys import IDENTITY_PROOF_OID, IDENTITY_URN_PREFIX, identity_fingerprint, verify_identity_proof
from wire.schema import GATEWAY_ID_PATTERN

# Collector instances have certificate CNs collector-<name> (collector-1, collector-2, ...): the broker makes
# the CN both the username and the client id (deploy/mosquitto/citynerve.conf), and the ACL names each one in a
# "user collector-<name>" block (deploy/mosquitto/acl). Gateway ids may not start with "collector".
COLLECTOR_PREFIX = "collector"
_COLLECTOR_CN = re.compile(r"collector-[A-Za-z0-9][A-Za-z0-9._-]{0,53}")

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_CRL = "ca.crl"
CA_INDEX = "index.json"
CA_LOCK = ".lock"
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


def _write(path: Path, data: bytes, *, overwrite: bool = True, durable: bool = True) -> None:
    # Every file the CA and key commands write is 0600, public halves too: they live in 0700 directories and
    # are copied out on purpose (install -m 0644 ...), so there is one rule to check, not a list of exceptions.
    try:
        write_private(path, data, overwrite=overwrite, durable=durable)
    except FileExistsError:
        raise PkiError(f"{path} already exists") from None


def _read_private(path: Path) -> bytes:
    tighten(path, FILE_MODE)  # a key file made looser by hand (or an older version) is private again
    return path.read_bytes()


# --- the index of issued certificates ---------------------------------------------------------------------------


@dataclass
class IssuedCert:
    """One line of the CA's index: what `ca sign` issued, to whom, bound to which identity key."""

    serial: int
    cn: str
    not_after: dt.datetime
    identity: str | None  # SHA-256 hex of the identity key; None for collectors and pre-index certificates
    revoked_at: dt.datetime | None = None

    def valid(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and self.not_after > now

    def to_json(self) -> dict[str, object]:
        return {"serial": f"{self.serial:x}", "cn": self.cn, "not_after": _iso(self.not_after),
                "identity": self.identity, "revoked_at": _iso(self.revoked_at) if self.revoked_at else None}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> IssuedCert:
        revoked = doc.get("revoked_at")
        return cls(int(str(doc["serial"]), 16), str(doc["cn"]), _parse_iso(str(doc["not_after"])),
                   None if doc.get("identity") is None else str(doc["identity"]),
                   _parse_iso(str(revoked)) if revoked else None)

    @classmethod
    def from_cert(cls, cert: x509.Certificate) -> IssuedCert:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else ""
        return cls(cert.serial_number, cn if isinstance(cn, str) else cn.decode("utf-8", "replace"),
                   cert.not_valid_after_utc, certificate_identity(cert))


def certificate_identity(cert: x509.Certificate) -> str | None:
    """The identity-key fingerprint a certificate is bound to (its urn:citynerve:identity: SAN URI), or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(IDENTITY_URN_PREFIX):
            return uri[len(IDENTITY_URN_PREFIX):]
    return None


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


class CertIndex:
    """index.json in a CA directory: every certificate issued (serial, CN, not-after, identity fingerprint,
    revoked). Readable without the CA key, so `gateways add --ca DIR` can check against it.

    The index is derived data kept for quick answers: on every load, certificates in issued/ missing from it
    (a CA made before the index, or a crash between writing the certificate and the index) are added from the
    certificates themselves, and every serial in ca.crl counts as revoked. Deleting index.json rebuilds it.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CA_INDEX
        self.entries: dict[int, IssuedCert] = {}
        if not (self.directory / CA_CERT).is_file():
            raise PkiError(f"{self.directory} is not a device CA (no {CA_CERT}; run: edge-collector ca init --dir DIR)")
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = {e.serial: e for e in map(IssuedCert.from_json, doc["certificates"])}
        except FileNotFoundError:
            pass
        except PermissionError:
            raise PkiError(f"{self.path}: permission denied") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise PkiError(f"{self.path}: not a certificate index ({exc}); delete it to rebuild it from "
                           f"{ISSUED}/ and {CA_CRL}") from None
        self._reconcile()

    def _reconcile(self) -> None:
        issued = self.directory / ISSUED
        known = {f"{s:x}" for s in self.entries}
        if issued.is_dir():
            for path in sorted(issued.glob("*.crt")):
                if path.stem not in known:
                    try:
                        entry = IssuedCert.from_cert(x509.load_pem_x509_certificate(path.read_bytes()))
                    except ValueError as exc:
                        raise PkiError(f"{path}: not a PEM certificate ({exc})") from None
                    self.entries[entry.serial] = entry
        try:
            crl = x509.load_pem_x509_crl((self.directory / CA_CRL).read_bytes())
        except FileNotFoundError:
            return
        except ValueError as exc:
            raise PkiError(f"{self.directory / CA_CRL}: not a PEM CRL ({exc})") from None
        for revoked in crl:
            entry = self.entries.get(revoked.serial_number)
            if entry is not None and entry.revoked_at is None:
                entry.revoked_at = revoked.revocation_date_utc

    def of(self, cn: str) -> list[IssuedCert]:
        return [e for e in self.entries.values() if e.cn == cn]

    def valid(self, cn: str, now: dt.datetime | None = None) -> list[IssuedCert]:
        """The certificates of `cn` that are neither expired nor revoked (normally none or one)."""
        now = now or _now()
        return sorted((e for e in self.of(cn) if e.valid(now)), key=lambda e: e.not_after)

    def revoked(self) -> dict[int, dt.datetime]:
        return {e.serial: e.revoked_at for e in self.entries.values() if e.revoked_at is not None}

    def save(self) -> None:
        entries = sorted(self.entries.values(), key=lambda e: (e.cn, e.not_after, e.serial))
        lines = ",\n".join("  " + json.dumps(e.to_json(), sort_keys=True) for e in entries)
        text = '{"version": 1, "certificates": [\n' + lines + ("\n" if lines else "") + "]}\n"
        _write(self.path, text.encode("utf-8"))


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    replaced: list[int]  # serials revoked because this certificate replaces them (sign --replace)
    identity: str | None  # the identity-key fingerprint written into the certificate


# --- the device CA ----------------------------------------------------------------------------------------------


class DeviceCA:
    """A CA directory: ca.key, ca.crt, ca.crl, issued/<serial>.crt (every certificate it signed) and index.json."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.key_path = self.directory / CA_KEY
        self.cert_path = self.directory / CA_CERT
        self.crl_path = self.directory / CA_CRL
        self.issued_dir = self.directory / ISSUED
        self.index_path = self.directory / CA_INDEX
        tighten(self.directory, DIR_MODE)
        try:
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(_read_private(self.key_path), password=None)
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
        private_dir(directory)
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
        _write(directory / CA_KEY, _pem_private(key), overwrite=False)
        _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
        private_dir(directory / ISSUED)
        ca = cls(directory)
        with ca._locked():
            index = ca.index()
            index.save()
            ca._write_crl(index.revoked(), DEFAULT_CRL_DAYS)
        return ca

    # -- signing ---------------------------------------------------------------------------------------------

    def sign(self, csr_pem: bytes, *, days: int = DEFAULT_CERT_DAYS, collector: bool = False,
             replace: bool = False, registry: Path | str | None = None) -> x509.Certificate:
        """Verify a CSR and issue a TLS client certificate (EKU clientAuth, CN = the CSR's CN). See issue()."""
        return self.issue(csr_pem, days=days, collector=collector, replace=replace, registry=registry).cert

    def issue(self, csr_pem: bytes, *, days: int = DEFAULT_CERT_DAYS, collector: bool = False,
              replace: bool = False, registry: Path | str | None = None,
              crl_days: int = DEFAULT_CRL_DAYS) -> Issued:
        """Verify a CSR and issue a TLS client certificate (EKU clientAuth, CN = the CSR's CN).

        A gateway's CSR must carry a valid identity proof (wire/keys.py); the certificate then carries the
        identity key's fingerprint (SAN URI urn:citynerve:identity:<sha256 hex>). With `registry`, the identity
        key must be the one the registry holds, active, for that gateway id. A CN that already has a valid
        certificate is refused unless `replace`: the old certificates are then revoked (and ca.crl re-signed)
        in the same operation, under the CA directory's lock.
        """
        result = self.issue_many([csr_pem], days=days, collector=collector, replace=replace, registry=registry,
                                 crl_days=crl_days)[0]
        if isinstance(result, PkiError):
            raise result
        return result

    def issue_many(self, csr_pems: list[bytes], *, days: int = DEFAULT_CERT_DAYS, collector: bool = False,
                   replace: bool = False, registry: Path | str | None = None,
                   crl_days: int = DEFAULT_CRL_DAYS) -> list[Issued | PkiError]:
        """issue() for many CSRs at once (bulk enrollment): each verified on its own (a bad one is its PkiError
        in the result, the others are issued), then all signed under one lock with one read and one write of
        the index and at most one new CRL - what makes 10,000 gateways a matter of seconds, not of an O(n)
        index rewrite per certificate. Two CSRs for one CN in one batch: the second is refused."""
        if days < 1:
            raise PkiError(f"--days must be at least 1, got {days}")
        now = _now()
        if now + dt.timedelta(days=days) > self.cert.not_valid_after_utc:
            raise PkiError(f"--days {days} reaches beyond the CA's own expiry ({self.cert.not_valid_after_utc:%Y-%m-%d})")
        reg = None
        if registry is not None:
            if collector:
                raise PkiError("--registry checks gateways' identity keys; a --collector certificate has none")
            from collector.registry import GatewayRegistry, RegistryError

            try:
                reg = GatewayRegistry(registry)
            except RegistryError as exc:
                raise PkiError(str(exc)) from None
        prepared: list[tuple[str, x509.CertificateBuilder, str | None] | PkiError] = []
        try:
            for pem in csr_pems:
                try:
                    prepared.append(self._prepare(pem, now, days, collector, reg, registry))
                except PkiError as exc:
                    prepared.append(exc)
        finally:
            if reg is not None:
                reg.close()
        results: list[Issued | PkiError] = []
        with self._locked():
            # Checked under the lock: two `ca sign` runs for one gateway cannot both see "no valid certificate".
            index = self.index()
            valid_by_cn: dict[str, list[IssuedCert]] = {}
            for entry in index.entries.values():
                if entry.valid(now):
                    valid_by_cn.setdefault(entry.cn, []).append(entry)
            in_batch: set[str] = set()
            replaced_any = False
            private_dir(self.issued_dir)
            for item in prepared:
                if isinstance(item, PkiError):
                    results.append(item)
                    continue
                cn, builder, identity = item
                if cn in in_batch:
                    results.append(PkiError(f"{cn}: a second CSR for it in the same batch"))
                    continue
                current = sorted(valid_by_cn.get(cn, []), key=lambda e: e.not_after)
                if current and not replace:
                    old = current[-1]
                    results.append(PkiError(f"{cn} already has a valid certificate (serial {old.serial:x}, valid "
                                            f"until {old.not_after:%Y-%m-%d}); --replace revokes it and issues the "
                                            "new one"))
                    continue
                in_batch.add(cn)
                cert = builder.sign(self.key, hashes.SHA256())
                # Order: the certificates, then the CRL, then the index. A crash in between leaves nothing the
                # next load does not repair (the index is rebuilt from issued/ and ca.crl), and a replaced
                # certificate is never left valid while the new one exists without being recorded.
                # a new serial's file never exists: written in place (O_EXCL), no temporary file and rename
                _write(self.issued_dir / f"{cert.serial_number:x}.crt", cert.public_bytes(serialization.Encoding.PEM),
                       overwrite=False, durable=len(prepared) == 1)
                for old in current:
                    old.revoked_at = now
                    replaced_any = True
                # what from_cert would read back out of the certificate, known already (0.5 ms saved per cert)
                index.entries[cert.serial_number] = IssuedCert(cert.serial_number, cn, cert.not_valid_after_utc,
                                                               identity)
                results.append(Issued(cert, [old.serial for old in current], identity))
            if len(prepared) > 1:
                sync_batch(self.issued_dir)  # the certificates durable before the CRL and index name them
            if replaced_any:
                self._write_crl(index.revoked() | self.revoked_serials(), crl_days)
            index.save()
        return results

    def _prepare(self, csr_pem: bytes, now: dt.datetime, days: int, collector: bool, reg: object,
                 registry: Path | str | None) -> tuple[str, x509.CertificateBuilder, str | None]:
        """Everything about one CSR that needs no lock: parse, verify, check, build (not yet signed)."""
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
        identity: str | None = None
        if not collector:
            identity_key = _identity_from_csr(csr, cn)
            identity = identity_fingerprint(identity_key)
            if reg is not None:
                _check_registry(reg, Path(registry or ""), cn, identity_key)  # type: ignore[arg-type]
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
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
        )
        if identity is not None:
            # A SAN URI rather than a private extension: openssl x509 -text and every TLS library show it.
            # mosquitto ignores it (the CN is the username), so it changes nothing on the broker.
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(IDENTITY_URN_PREFIX + identity)]), critical=False)
        return cn, builder, identity

    @staticmethod
    def _single_cn(subject: x509.Name) -> str:
        attrs = list(subject)
        cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or len(attrs) != 1:
            raise PkiError(f"the CSR's subject must be exactly one CN (the gateway id), got {subject.rfc4514_string()!r}")
        value = cns[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")

    def index(self) -> CertIndex:
        return CertIndex(self.directory)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The CA directory's lock (an flock on .lock): one signing or revoking at a time, across processes."""
        with flocked(self.directory / CA_LOCK):
            yield

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
        with self._locked():
            index = self.index()
            if not index.of(common_name):
                raise PkiError(f"this CA has issued no certificate to {common_name!r}")
            now = _now()
            new = [e for e in index.of(common_name) if e.valid(now)]
            for entry in new:
                entry.revoked_at = now
            self._write_crl(index.revoked() | self.revoked_serials(), crl_days)
            index.save()
        return sorted(e.serial for e in new)

    def write_crl(self, revoked: dict[int, dt.datetime] | None = None, *, days: int = DEFAULT_CRL_DAYS) -> Path:
        """(Re-)sign the CRL. mosquitto refuses every client once the CRL's next update has passed."""
        with self._locked():
            if revoked is None:
                revoked = self.index().revoked() | self.revoked_serials()
            return self._write_crl(revoked, days)

    def _write_crl(self, revoked: dict[int, dt.datetime], days: int) -> Path:
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
        _write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path


def _identity_from_csr(csr: x509.CertificateSigningRequest, cn: str) -> Ed25519PublicKey:
    """The identity key whose proof the CSR carries, verified against the CSR's own CN and TLS key."""
    try:
        ext = csr.extensions.get_extension_for_oid(x509.ObjectIdentifier(IDENTITY_PROOF_OID))
    except x509.ExtensionNotFound:
        raise PkiError(f"the CSR for {cn} carries no identity proof (it was not made by edge-agent enroll, or by "
                       "an older one: on the gateway, edge-agent enroll --new-csr makes one from its keys)") from None
    except ValueError as exc:
        raise PkiError(f"the CSR for {cn} has unreadable extensions ({exc})") from None
    value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    try:
        return verify_identity_proof(value, cn, csr.public_key())
    except ValueError as exc:
        raise PkiError(f"the CSR's identity proof for {cn} {exc} (altered or assembled from another "
                       "gateway's files)") from None


def _check_registry(reg: object, path: Path, gateway_id: str, identity_key: Ed25519PublicKey) -> None:
    """With --registry: the CSR's identity key must be the one registered, active, for this gateway id. One row
    read (GatewayRegistry.get), whatever the registry's size."""
    from collector.registry import GatewayRegistry, format_identity_key

    assert isinstance(reg, GatewayRegistry)
    entry = reg.get(gateway_id)
    if entry is None:
        raise PkiError(f"{gateway_id} is not in the registry {path}: register its identity key first "
                       f"(edge-collector gateways add {gateway_id} ...)")
    if entry.status == "revoked":
        raise PkiError(f"{gateway_id} is revoked in the registry {path}: a re-enrolment registers the new key "
                       "first (gateways add ID KEY --replace)")
    if entry.raw_key != identity_key.public_bytes_raw():
        raise PkiError(f"the CSR's identity key {format_identity_key(identity_key)} is not the one the registry "
                       f"{path} holds for {gateway_id} ({entry.public_text}): refusing to certify it")


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
    private_dir(directory)
    key = x25519.X25519PrivateKey.generate()
    _write(directory / key_name, _pem_private(key), overwrite=False)
    # SubjectPublicKeyInfo PEM: what wire.keys.collector_key_from_pem reads on the agent side.
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write(directory / pub_name, pem)
    public = format_x25519(key.public_key())
    return CollectorKey(key_id(key.public_key()), public, "next" if next_key else "current", directory / key_name)


def _load_x25519(path: Path) -> x25519.X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_private(path), password=None)
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
    retired = private_dir(directory / RETIRED)
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
    p.add_argument("--replace", action="store_true",
                   help="the CN already has a valid certificate: revoke it (ca.crl re-signed) and issue this one")
    p.add_argument("--registry", metavar="FILE",
                   help="the gateway registry: refuse a CSR whose identity key is not the one registered for the id")
    p.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS,
                   help="validity of the CRL re-signed by --replace (default %(default)s)")
    p = ca_sub.add_parser("sign-bulk", help="bulk enrollment: sign every *.csr in a directory in one batch")
    p.add_argument("csr_dir", metavar="CSR_DIR", help="a directory of gateways' CSRs (<anything>.csr)")
    p.add_argument("--dir", required=True, metavar="DIR", help="the device CA directory")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="where <gateway id>.crt files go")
    p.add_argument("--days", type=int, default=DEFAULT_CERT_DAYS, help="validity (default %(default)s)")
    p.add_argument("--replace", action="store_true", help="revoke and replace existing valid certificates")
    p.add_argument("--registry", metavar="FILE",
                   help="the gateway registry: refuse a CSR whose identity key is not the one registered for the id")
    p.add_argument("--crl-days", type=int, default=DEFAULT_CRL_DAYS, help="CRL validity (default %(default)s)")
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
        out = Path(args.out) if args.out else csr_path.with_suffix(".crt")
        if not out.parent.is_dir():  # before issuing: an issued certificate nobody received still counts
            raise PkiError(f"{out.parent}: no such directory (for --out {out})")
        issued = ca.issue(csr_path.read_bytes(), days=args.days, collector=args.collector, replace=args.replace,
                          registry=args.registry, crl_days=args.crl_days)
        cert = issued.cert
        try:
            _write(out, cert.public_bytes(serialization.Encoding.PEM))
        except OSError as exc:
            copy = ca.issued_dir / f"{cert.serial_number:x}.crt"
            raise PkiError(f"{out}: {exc.strerror or exc}; the certificate was issued (serial "
                           f"{cert.serial_number:x}): a copy is in {copy}") from None
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        bound = f"; identity key sha256 {issued.identity}" if issued.identity else ""
        print(f"certificate for {cn} written to {out} (serial {cert.serial_number:x}, valid until "
              f"{cert.not_valid_after_utc:%Y-%m-%d}{bound})")
        if issued.replaced:
            print(f"revoked the certificate(s) it replaces: {', '.join(f'{s:x}' for s in issued.replaced)}")
            print(f"CRL written to {ca.crl_path}: install it as the broker's crlfile and reload mosquitto")
        return 0
    if args.ca_command == "sign-bulk":
        return _sign_bulk(ca, args)
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


def _sign_bulk(ca: DeviceCA, args: argparse.Namespace) -> int:
    """Every CSR of a directory in one batch; one line per refused CSR (file: reason), a summary, exit 1 if any
    was refused (the others are issued all the same)."""
    csr_dir, out_dir = Path(args.csr_dir), Path(args.out)
    if not csr_dir.is_dir():
        raise PkiError(f"{csr_dir}: not a directory of CSRs")
    if not out_dir.is_dir():
        raise PkiError(f"{out_dir}: no such directory (for --out)")
    paths = sorted(csr_dir.glob("*.csr"))
    if not paths:
        raise PkiError(f"{csr_dir}: no *.csr files")
    results = ca.issue_many([p.read_bytes() for p in paths], days=args.days, replace=args.replace,
                            registry=args.registry, crl_days=args.crl_days)
    refused = 0
    replaced = 0
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, PkiError):
            refused += 1
            print(f"{path}: refused: {result}", file=sys.stderr)
            continue
        cn = result.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        _write(out_dir / f"{cn}.crt", result.cert.public_bytes(serialization.Encoding.PEM), durable=False)
        replaced += len(result.replaced)
    sync_batch(out_dir)
    print(f"{len(paths) - refused} certificate(s) issued into {out_dir}, {refused} CSR(s) refused"
          + (f", {replaced} replaced certificate(s) revoked: install {ca.crl_path} as the broker's crlfile"
             if replaced else ""))
    return 1 if refused else 0


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
