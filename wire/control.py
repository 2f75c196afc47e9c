"""The control plane's shared contract: operator certificates, the operator revocation list, operator-signed
commands and configurations, and the gateway's reports. Pure: bytes and times in, values or ControlRefused out.

Who holds what (docs/control.md, docs/security.md "Downlink"):

- the operator CA's Ed25519 private key: whoever runs `edge-collector operators init|add|revoke`, kept off the
  collector service (the service never loads it). Every gateway holds the CA's public key, given at enrollment
  and never changed by a pushed configuration.
- an operator's Ed25519 private key: the operator only. Their certificate (name, role, scope, validity) is signed
  by the CA and travels with every signature they make.
- the collector: relays signed documents and the current revocation list; it can neither make nor alter one.

A gateway accepts a command or a configuration only if it verifies here, itself: CA signature on each
certificate, the certificate not revoked by a revocation list that is itself current (next_update not passed)
and not older than one the gateway has seen, the validity period, the role (may this operator do this kind of
thing), the scope (this gateway, this device, this point), the document's own gateway id (bound to the
gateway) and deadline, and for a `critical` point two different operators. Replays of an accepted command are
refused by the agent's store of executed command ids, kept until their deadline has passed; a configuration
carries a version that must exceed the one the gateway runs.

Encoding: msgpack (msgspec) maps; every signature covers a domain-separation context followed by the exact
bytes of the document it signs, so the signed bytes never need re-encoding and a signature made for one
purpose is never valid for another.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import fnmatch
import hashlib
import re
from typing import Annotated, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from wire.schema import GatewayId, Name

# --- contexts (domain separation) --------------------------------------------------------------------------------
_CTX_CERT = b"citynerve operator certificate v1\0"
_CTX_CRL = b"citynerve operator revocation list v1\0"
_CTX_DOC = {"command": b"citynerve operator command v1\0", "config": b"citynerve operator config v1\0"}

KIND = "control"  # the downlink leaf: <prefix>/<gateway>/down/control (inside the confidential downlink 0x04)
REPORT = "report"  # the uplink leaf: <prefix>/<gateway>/report (sealed like the uplink)

# What each role may sign. A viewer signs nothing (it exists so that read-only people have a certificate that
# the fleet page can accept, issue 12); poll-now is a command.
ROLES: dict[str, frozenset[str]] = {
    "viewer": frozenset(),
    "operator": frozenset({"command"}),
    "engineer": frozenset({"command", "config"}),
}
Role = Literal["viewer", "operator", "engineer"]

MAX_COMMAND_LIFETIME_MS = 24 * 3600 * 1000  # deadline - issued: bounds how long a gateway keeps executed ids
MAX_CONFIG_LIFETIME_MS = 30 * 24 * 3600 * 1000
CLOCK_SKEW_MS = 5 * 60 * 1000  # a document issued this far in the gateway's future is still accepted
MAX_DOCUMENT_BYTES = 1024 * 1024  # a configuration is a TOML file: 1 MiB is generous
MAX_APPROVALS = 4
KID_LEN = 8

# An operator's name: a person's login or a system's name (no spaces: it appears in reports, tags and file names)
OPERATOR_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z"

Ms = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Serial = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Pattern = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
CommandId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}\Z")]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
Value = bool | int | float


class ControlReason(enum.StrEnum):
    """Why a gateway refused a control document: report reason codes (docs/control.md)."""

    MALFORMED = "malformed"  # not decodable, or not the expected shape
    UNKNOWN_CA = "unknown_ca"  # a certificate or list from another operator CA
    BAD_CERTIFICATE = "bad_certificate"  # the CA's signature on a certificate does not verify
    BAD_SIGNATURE = "bad_signature"  # an operator's signature on the document does not verify (modified?)
    NOT_YET_VALID = "not_yet_valid"  # certificate before not_before, or a document issued in the future
    CERT_EXPIRED = "cert_expired"  # certificate after not_after
    REVOKED = "revoked"  # certificate serial on the current revocation list
    NO_CRL = "no_crl"  # the gateway holds no current revocation list (none yet, or next_update passed)
    CRL_ROLLBACK = "crl_rollback"  # a revocation list older than one already seen (ignored, not an error)
    ROLE = "role"  # the operator's role may not sign this kind of document
    OUT_OF_SCOPE = "out_of_scope"  # gateway, device or point outside the certificate's scope
    WRONG_GATEWAY = "wrong_gateway"  # the document names another gateway
    EXPIRED = "expired"  # the document's deadline has passed
    TOO_LONG = "too_long"  # deadline too far after issue (MAX_*_LIFETIME_MS)
    TWO_PERSON = "two_person"  # a critical point needs two different operators' signatures
    REPLAYED = "replayed"  # a command id already executed, or a configuration version not above the running one
    # the agent's own refusals, after verification (edge_agent): listed here so that reason codes have one owner
    NOT_WRITABLE = "not_writable"  # the point is not writable, or the device did not opt in to it
    OUT_OF_RANGE = "out_of_range"  # value outside the point's range, or not on its step
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_POINT = "unknown_point"
    PROTECTED_KEY = "protected_key"  # a pushed configuration may not change gateway.id, state_dir, [security]
    INVALID_CONFIG = "invalid_config"  # fails `edge-agent check`; detail is that one line
    BUSY = "busy"  # a configuration is still being confirmed


class CommandFailure(enum.StrEnum):
    """Why a command that was verified and accepted did not end `done` (report state `failed`), or what went
    wrong after a write that did (`done` with reason readback_failed): the agent's bus (edge_agent)."""

    NO_ANSWER = "no_answer"  # the device did not answer the write: it may or may not have been written
    REJECTED_ANSWER = "rejected_answer"  # an answer that does not match the write (echo, CRC, ...): may or may not
    BUS_DOWN = "bus_down"  # the bus could not be opened, or was lost during the write
    POLL_FAILED = "poll_failed"  # poll_now: the device gave no reading
    QUEUE_FULL = "queue_full"  # too many commands waiting for the bus or the gateway
    INTERRUPTED = "interrupted"  # the agent stopped between starting and finishing it: read the point
    STORE_FAILED = "store_failed"  # the gateway could not record the command before running it: not run
    READBACK_FAILED = "readback_failed"  # (state done) the device confirmed the write, reading it back failed
    ERROR = "error"  # an internal error of the agent (a bug), logged there
    # and "modbus_exception_N": the device answered the write with exception code N (modbus_exception())


def modbus_exception(code: int) -> str:
    """The failure reason for a write the device answered with Modbus exception `code` (1.1b §7)."""
    return f"modbus_exception_{code}"


class ControlRefused(Exception):
    def __init__(self, reason: ControlReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


# --- documents ----------------------------------------------------------------------------------------------------


class Scope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """fnmatch patterns (case-sensitive); an operator acts on a gateway/device/point matching any of them.
    A configuration changes a whole gateway, so pushing one needs devices == points == ["*"]."""

    gateways: list[Pattern] = msgspec.field(default_factory=lambda: ["*"])
    devices: list[Pattern] = msgspec.field(default_factory=lambda: ["*"])
    points: list[Pattern] = msgspec.field(default_factory=lambda: ["*"])

    def allows(self, gateway: str, device: str | None = None, point: str | None = None) -> bool:
        def match(name: str | None, patterns: list[str]) -> bool:
            return name is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)
        return match(gateway, self.gateways) and match(device, self.devices) and match(point, self.points)

    @property
    def whole_gateway(self) -> bool:
        return self.devices == ["*"] and self.points == ["*"]


class OperatorCert(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    serial: Serial
    name: Annotated[str, msgspec.Meta(pattern=OPERATOR_NAME_PATTERN)]
    role: Role
    key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]  # raw Ed25519 public key
    scope: Scope
    not_before_ms: Ms
    not_after_ms: Ms
    ca: Annotated[bytes, msgspec.Meta(min_length=KID_LEN, max_length=KID_LEN)]  # key id of the issuing CA


class SignedCert(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cert: bytes  # msgpack of OperatorCert, exactly as signed
    sig: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


class Crl(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    number: Serial  # strictly increasing per CA
    issued_ms: Ms
    next_update_ms: Ms
    revoked: list[Serial]
    ca: Annotated[bytes, msgspec.Meta(min_length=KID_LEN, max_length=KID_LEN)]


class SignedCrl(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    crl: bytes
    sig: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


class Command(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A command for one device of one gateway. action "write": point = value; "poll_now": poll it at once."""

    id: CommandId  # random 128 bits, hex: a redelivery has the same id and never runs twice
    gateway: GatewayId
    device: Name
    action: Literal["write", "poll_now"]
    issued_ms: Ms
    deadline_ms: Ms  # not run after this (gateway clock); refused as expired
    point: Name | None = None
    value: Value | None = None


class ConfigDoc(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A desired configuration for one gateway: the whole agent.toml, as text."""

    gateway: GatewayId
    version: Serial  # per gateway, strictly increasing: the collector's history numbers them
    toml: str
    sha256: Sha256Hex  # of toml as UTF-8: the "hash" shown as desired/running
    issued_ms: Ms
    deadline_ms: Ms
    confirm_timeout_s: Annotated[float, msgspec.Meta(ge=10, le=3600)] = 120.0


class Approval(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cert: SignedCert
    sig: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]  # over _CTX_DOC[kind] + doc


class SignedDoc(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["command", "config"]
    doc: Annotated[bytes, msgspec.Meta(max_length=MAX_DOCUMENT_BYTES)]  # msgpack of Command / ConfigDoc
    approvals: Annotated[list[Approval], msgspec.Meta(min_length=1, max_length=MAX_APPROVALS)]


class ControlDown(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The plaintext of one confidential downlink on down/control: the current revocation list (always, so
    that a gateway always verifies against the newest one the collector holds) and at most one document."""

    crl: SignedCrl
    item: SignedDoc | None = None


class Report(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A gateway's report on <prefix>/<gateway>/report (sealed uplink). For a command: id = command id, state
    done|refused|expired|failed|running. For a configuration: id = str(version), state
    received|refused|applied|confirmed|rolled_back|running (running: the report the agent sends after start and
    on request, naming what it runs)."""

    kind: Literal["command", "config"]
    id: Annotated[str, msgspec.Meta(max_length=64)]
    state: Literal["received", "running", "done", "refused", "expired", "failed", "applied", "confirmed",
                   "rolled_back"]
    at_ms: Ms
    reason: Annotated[str, msgspec.Meta(max_length=64)] = ""
    detail: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    value: Value | None = None  # command done: the value read back from the device
    config_version: Annotated[int, msgspec.Meta(ge=0)] = 0  # the configuration the gateway runs now (0: local)
    config_sha256: str = ""


_enc = msgspec.msgpack.Encoder()
_dec_cert = msgspec.msgpack.Decoder(OperatorCert)
_dec_signed_cert = msgspec.msgpack.Decoder(SignedCert)
_dec_crl = msgspec.msgpack.Decoder(Crl)
_dec_signed_crl = msgspec.msgpack.Decoder(SignedCrl)
_dec_command = msgspec.msgpack.Decoder(Command)
_dec_config = msgspec.msgpack.Decoder(ConfigDoc)
_dec_down = msgspec.msgpack.Decoder(ControlDown)
_dec_report = msgspec.msgpack.Decoder(Report)
_dec_signed_doc = msgspec.msgpack.Decoder(SignedDoc)


def encode(value: msgspec.Struct) -> bytes:
    return _enc.encode(value)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes, what: str):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ControlRefused(ControlReason.MALFORMED, f"{what}: {exc}") from None
    except UnicodeDecodeError:  # msgspec raises it as such for invalid UTF-8 in a msgpack string
        raise ControlRefused(ControlReason.MALFORMED, f"{what}: a string is not valid UTF-8") from None


def decode_down(data: bytes) -> ControlDown:
    return _decode(_dec_down, data, "control downlink")


def decode_report(data: bytes) -> Report:
    return _decode(_dec_report, data, "report")


def decode_signed_doc(data: bytes) -> SignedDoc:
    return _decode(_dec_signed_doc, data, "signed document")


def decode_signed_crl(data: bytes) -> SignedCrl:
    return _decode(_dec_signed_crl, data, "revocation list")


def decode_signed_cert(data: bytes) -> SignedCert:
    return _decode(_dec_signed_cert, data, "operator certificate")


def read_cert(signed: SignedCert) -> OperatorCert:
    """The certificate's content, unverified (for display and for choosing what to verify)."""
    return _decode(_dec_cert, signed.cert, "operator certificate")


def read_crl(signed: SignedCrl) -> Crl:
    return _decode(_dec_crl, signed.crl, "revocation list")


def read_doc(signed: SignedDoc) -> Command | ConfigDoc:
    """The document's content, unverified: the agent needs the device and point to know what to verify."""
    return _decode(_dec_command if signed.kind == "command" else _dec_config, signed.doc, signed.kind)


def key_id(public: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(public.public_bytes_raw()).digest()[:KID_LEN]


def config_sha256(toml_text: str) -> str:
    return hashlib.sha256(toml_text.encode("utf-8")).hexdigest()


def new_command_id() -> str:
    import os
    return os.urandom(16).hex()


# --- the CA's side (edge-collector operators) ---------------------------------------------------------------------


def issue_cert(ca: Ed25519PrivateKey, cert: OperatorCert) -> SignedCert:
    if cert.ca != key_id(ca.public_key()):
        raise ValueError("the certificate names another CA key id")
    body = encode(cert)
    return SignedCert(body, ca.sign(_CTX_CERT + body))


def issue_crl(ca: Ed25519PrivateKey, crl: Crl) -> SignedCrl:
    if crl.ca != key_id(ca.public_key()):
        raise ValueError("the revocation list names another CA key id")
    body = encode(crl)
    return SignedCrl(body, ca.sign(_CTX_CRL + body))


def verify_cert_signature(ca: Ed25519PublicKey, signed: SignedCert) -> OperatorCert:
    """The certificate, once the CA's signature on it verified (nothing else: validity and revocation are
    Trust.verify_cert's). Raises ControlRefused: malformed, unknown_ca, bad_certificate."""
    cert = read_cert(signed)
    if cert.ca != key_id(ca):
        raise ControlRefused(ControlReason.UNKNOWN_CA, f"certificate of {cert.name!r} from CA {cert.ca.hex()}")
    try:
        ca.verify(signed.sig, _CTX_CERT + signed.cert)
    except InvalidSignature:
        raise ControlRefused(ControlReason.BAD_CERTIFICATE, f"certificate of {cert.name!r} does not verify") from None
    return cert


# --- the operator's side -----------------------------------------------------------------------------------------


def sign(kind: Literal["command", "config"], doc: Command | ConfigDoc, key: Ed25519PrivateKey,
         cert: SignedCert) -> SignedDoc:
    """A new signed document with the first approval."""
    body = encode(doc)
    return SignedDoc(kind, body, [approve(kind, body, key, cert)])


def approve(kind: str, body: bytes, key: Ed25519PrivateKey, cert: SignedCert) -> Approval:
    if read_cert(cert).key != key.public_key().public_bytes_raw():
        raise ValueError("this key is not the one the certificate is for")
    return Approval(cert, key.sign(_CTX_DOC[kind] + body))


def cosign(signed: SignedDoc, key: Ed25519PrivateKey, cert: SignedCert) -> SignedDoc:
    """The same document with one more operator's approval (a second person for a critical point)."""
    return SignedDoc(signed.kind, signed.doc, [*signed.approvals, approve(signed.kind, signed.doc, key, cert)])


# --- the gateway's side ------------------------------------------------------------------------------------------


class Trust:
    """What a gateway trusts: the operator CA's public key, and the newest revocation list it has seen.

    Pure and in memory; the agent persists `crl_bytes()` and gives it back at start (`Trust(ca, saved)`), so a
    restart cannot be used to roll the list back."""

    def __init__(self, ca: Ed25519PublicKey, saved_crl: bytes | None = None) -> None:
        self.ca = ca
        self.ca_kid = key_id(ca)
        self._crl: Crl | None = None
        self._crl_signed: SignedCrl | None = None
        if saved_crl:
            with contextlib.suppress(ControlRefused):  # a damaged saved list: wait for the next one
                self.offer_crl(decode_signed_crl(saved_crl), now_ms=None)

    @property
    def crl(self) -> Crl | None:
        return self._crl

    def crl_bytes(self) -> bytes | None:
        return encode(self._crl_signed) if self._crl_signed is not None else None

    def offer_crl(self, signed: SignedCrl, now_ms: int | None) -> bool:
        """Take a revocation list if it is the CA's and newer than the one held: True if taken (persist it).
        An older one is ignored (False): a collector or broker cannot roll revocations back. Raises
        ControlRefused for a list that is not the CA's."""
        crl = read_crl(signed)
        if crl.ca != self.ca_kid:
            raise ControlRefused(ControlReason.UNKNOWN_CA, f"revocation list of CA {crl.ca.hex()}, trusted: "
                                                           f"{self.ca_kid.hex()}")
        try:
            self.ca.verify(signed.sig, _CTX_CRL + signed.crl)
        except InvalidSignature:
            raise ControlRefused(ControlReason.BAD_CERTIFICATE, "revocation list signature does not verify") from None
        if self._crl is not None and crl.number <= self._crl.number:
            return False
        self._crl, self._crl_signed = crl, signed
        return True

    def verify_cert(self, signed: SignedCert, now_ms: int) -> OperatorCert:
        cert = verify_cert_signature(self.ca, signed)
        if now_ms < cert.not_before_ms:
            raise ControlRefused(ControlReason.NOT_YET_VALID, f"certificate of {cert.name!r} not valid before "
                                                              f"{_iso(cert.not_before_ms)}")
        if now_ms > cert.not_after_ms:
            raise ControlRefused(ControlReason.CERT_EXPIRED, f"certificate of {cert.name!r} expired "
                                                             f"{_iso(cert.not_after_ms)}")
        crl = self._crl
        if crl is None or now_ms > crl.next_update_ms:
            raise ControlRefused(ControlReason.NO_CRL, "no current operator revocation list" + (
                f" (the newest, number {crl.number}, expired {_iso(crl.next_update_ms)})" if crl else ""))
        if cert.serial in crl.revoked:
            raise ControlRefused(ControlReason.REVOKED, f"certificate {cert.serial} of {cert.name!r} is revoked "
                                                        f"(revocation list {crl.number})")
        return cert

    def verify(self, signed: SignedDoc, *, gateway: str, now_ms: int, required: int = 1) -> tuple[
            Command | ConfigDoc, list[OperatorCert]]:
        """The document and the operators who approved it, once everything but replay and the device's own
        rules (writable, range: the agent's) is checked. `required`: distinct operators needed (2 for a point
        marked critical). Raises ControlRefused with the first reason found."""
        doc = read_doc(signed)
        if isinstance(doc, Command) and doc.action == "write" and (doc.point is None or doc.value is None):
            # A write without a point would pass every point scope (Scope.allows treats "no point" as "any").
            raise ControlRefused(ControlReason.MALFORMED, "a write command names a point and a value")
        if isinstance(doc, ConfigDoc) and doc.sha256 != config_sha256(doc.toml):
            # The hash is what desired/running are compared by: it must be the hash of what is applied.
            raise ControlRefused(ControlReason.MALFORMED, "the configuration's sha256 is not the hash of its text")
        if doc.gateway != gateway:
            raise ControlRefused(ControlReason.WRONG_GATEWAY, f"for gateway {doc.gateway!r}, this is {gateway!r}")
        lifetime = MAX_COMMAND_LIFETIME_MS if signed.kind == "command" else MAX_CONFIG_LIFETIME_MS
        if doc.deadline_ms - doc.issued_ms > lifetime:
            raise ControlRefused(ControlReason.TOO_LONG, f"deadline {(doc.deadline_ms - doc.issued_ms) / 1000:.0f} s "
                                                         f"after issue (limit {lifetime / 1000:.0f} s)")
        if doc.issued_ms > now_ms + CLOCK_SKEW_MS:
            raise ControlRefused(ControlReason.NOT_YET_VALID, f"issued {_iso(doc.issued_ms)}, in this gateway's "
                                                              f"future (its clock says {_iso(now_ms)})")
        if now_ms > doc.deadline_ms:
            raise ControlRefused(ControlReason.EXPIRED, f"deadline {_iso(doc.deadline_ms)} passed")
        operators: list[OperatorCert] = []
        first_problem: ControlRefused | None = None
        for approval in signed.approvals:
            try:
                cert = self.verify_cert(approval.cert, now_ms)
                try:
                    Ed25519PublicKey.from_public_bytes(cert.key).verify(approval.sig, _CTX_DOC[signed.kind] + signed.doc)
                except InvalidSignature:
                    raise ControlRefused(ControlReason.BAD_SIGNATURE,
                                         f"{cert.name!r}'s signature does not verify: the document was modified "
                                         f"or signed by another key") from None
                if signed.kind not in ROLES[cert.role]:
                    raise ControlRefused(ControlReason.ROLE, f"{cert.name!r} is a {cert.role}, who may not sign "
                                                             f"a {signed.kind}")
                if isinstance(doc, Command):
                    if not cert.scope.allows(gateway, doc.device, doc.point):
                        raise ControlRefused(ControlReason.OUT_OF_SCOPE,
                                             f"{cert.name!r} may not act on {gateway}/{doc.device}"
                                             + (f"/{doc.point}" if doc.point else ""))
                elif not (cert.scope.allows(gateway) and cert.scope.whole_gateway):
                    raise ControlRefused(ControlReason.OUT_OF_SCOPE,
                                         f"{cert.name!r} may not configure {gateway} (a configuration needs a scope "
                                         f"of the whole gateway)")
            except ControlRefused as exc:
                first_problem = first_problem or exc
                continue
            if all(o.key != cert.key and o.name != cert.name for o in operators):
                operators.append(cert)
        if first_problem is not None:
            # Every approval must hold: a document carrying a bad approval is not what its operators signed as a
            # whole (and reporting it names the problem instead of silently counting fewer signatures).
            raise first_problem
        if len(operators) < required:
            raise ControlRefused(ControlReason.TWO_PERSON, f"needs {required} different operators' approvals, has "
                                                           f"{len(operators)} ({', '.join(o.name for o in operators)})")
        return doc, operators


# --- armour: certificates and lists as text files -----------------------------------------------------------------

_ARMOUR = re.compile(r"-----BEGIN CITYNERVE ([A-Z ]+)-----\s*(.*?)\s*-----END CITYNERVE \1-----", re.S)


def armour(label: str, data: bytes) -> str:
    """PEM-like text ("OPERATOR CERTIFICATE", "OPERATOR CRL", "SIGNED COMMAND", "SIGNED CONFIG")."""
    body = base64.b64encode(data).decode("ascii")
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CITYNERVE {label}-----\n{lines}\n-----END CITYNERVE {label}-----\n"


def unarmour(label: str, text: str) -> bytes:
    """The bytes of the first block labelled `label` in `text` (other blocks and text around it are skipped:
    an operator's certificate may sit in one file with other material)."""
    m = next((m for m in _ARMOUR.finditer(text) if m.group(1) == label), None)
    if m is None:
        raise ValueError(f"expected a '-----BEGIN CITYNERVE {label}-----' block")
    try:
        return base64.b64decode("".join(m.group(2).split()), validate=True)
    except ValueError as exc:
        raise ValueError(f"{label}: invalid base64 ({exc})") from None


def _iso(ms: int) -> str:
    import datetime as dt
    try:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms"
