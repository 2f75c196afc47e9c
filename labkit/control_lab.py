"""The control plane in the lab: an operator CA with operators, and a stand-in for the collector's control side.

`OperatorPki` makes what `edge-collector operators init|add|revoke` will make, with wire/control.py's own
functions: the operator CA (its public key as the PEM file a gateway's [security] operator_ca names), operator
certificates with any role, scope and validity, and revocation lists.

`ControlLab` acts as a collector for the agent's control plane, on the broker's collectors' listener with a
collector certificate: it opens the gateway's sealed uplinks with a real `wire.seal.Opener` (the collector's
private key and the gateway's enrolled identity key) to learn its session, seals `ControlDown` documents to that
session with `seal_confidential`, publishes them on down/control, and opens the gateway's reports. No relay,
no re-sending, no audit: that is the collector's business (edge-collector command).

    pki = OperatorPki(tmp_path / "operators")
    alice = pki.operator("alice")
    lab = ControlLab(broker, deployment, "gw-1")
    lab.send(alice.sign(command("gw-1", "meter", "setpoint", 21.5)), pki.crl())
    report = lab.wait_report(command_id)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from collector.registry import read_identity_key
from labkit.enrolled import Deployment
from labkit.secure_broker import SecureBroker, TestClient
from wire import control, topics
from wire.control import Command, Crl, OperatorCert, Report, Scope, SignedCert, SignedCrl, SignedDoc
from wire.keys import collector_key_from_pem, operator_ca_to_pem
from wire.seal import Opener, SealError

HOUR_MS = 3600 * 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Operator:
    name: str
    key: Ed25519PrivateKey
    cert: SignedCert

    @property
    def serial(self) -> int:
        return control.read_cert(self.cert).serial

    def sign(self, doc: Command | control.ConfigDoc) -> SignedDoc:
        return control.sign("command" if isinstance(doc, Command) else "config", doc, self.key, self.cert)

    def cosign(self, signed: SignedDoc) -> SignedDoc:
        return control.cosign(signed, self.key, self.cert)

    def write(self, directory: Path) -> Path:
        """<name>.key and <name>.cert in `directory`, as `edge-collector operators add` leaves them for the
        operator: the key file is what `edge-collector command|config --operator` takes."""
        from wire.files import write_private
        from wire.keys import identity_to_pem

        directory.mkdir(parents=True, exist_ok=True)
        key = directory / f"{self.name}.key"
        write_private(key, identity_to_pem(self.key))
        (directory / f"{self.name}.cert").write_text(control.armour("OPERATOR CERTIFICATE", control.encode(self.cert)))
        return key


@dataclass
class OperatorPki:
    directory: Path
    ca: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    revoked: list[int] = field(default_factory=list)
    _serial: int = 0
    _crl_number: int = 0

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_pub = self.directory / "operator-ca.pub"
        self.ca_pub.write_bytes(operator_ca_to_pem(self.ca.public_key()))

    @property
    def kid(self) -> bytes:
        return control.key_id(self.ca.public_key())

    def operator(self, name: str, role: control.Role = "operator", scope: Scope | None = None, *,
                 not_before_ms: int | None = None, not_after_ms: int | None = None,
                 issuer: Ed25519PrivateKey | None = None, claim_ca: bool = True) -> Operator:
        """An operator certificate signed by this CA, or by `issuer` (a key that is not the CA's: it then names
        this CA's key id if `claim_ca`, else its own)."""
        self._serial += 1
        key = Ed25519PrivateKey.generate()
        signer = issuer or self.ca
        cert = OperatorCert(
            serial=self._serial, name=name, role=role, key=key.public_key().public_bytes_raw(),
            scope=scope or Scope(), not_before_ms=now_ms() - HOUR_MS if not_before_ms is None else not_before_ms,
            not_after_ms=now_ms() + HOUR_MS if not_after_ms is None else not_after_ms,
            ca=self.kid if claim_ca else control.key_id(signer.public_key()))
        if signer is self.ca or not claim_ca:
            signed = control.issue_cert(signer, cert)
        else:  # a forgery: the CA's key id, another key's signature
            body = control.encode(cert)
            signed = SignedCert(body, signer.sign(control._CTX_CERT + body))  # the context the CA signs under
        return Operator(name, key, signed)

    def revoke(self, operator: Operator) -> None:
        self.revoked.append(operator.serial)

    @property
    def crl_path(self) -> Path:
        return self.directory / "operators.crl"

    def write_crl(self, next_update_ms: int | None = None) -> Path:
        """A new list (crl()) in <directory>/operators.crl, armoured as `operators revoke|crl` write it: the file
        collector.toml [control] crl names."""
        signed = self.crl(next_update_ms)
        self.crl_path.write_text(control.armour("OPERATOR CRL", control.encode(signed)))
        return self.crl_path

    def crl(self, next_update_ms: int | None = None) -> SignedCrl:
        """A new revocation list (the next number) revoking what revoke() named."""
        self._crl_number += 1
        return control.issue_crl(self.ca, Crl(
            number=self._crl_number, issued_ms=now_ms(),
            next_update_ms=now_ms() + 24 * HOUR_MS if next_update_ms is None else next_update_ms,
            revoked=list(self.revoked), ca=self.kid))


def command(gateway: str, device: str, point: str | None = None, value: control.Value | None = None, *,
            action: str = "write", lifetime_s: float = 60, issued_ms: int | None = None) -> Command:
    issued = now_ms() if issued_ms is None else issued_ms
    return Command(id=control.new_command_id(), gateway=gateway, device=device, action=action,  # type: ignore[arg-type]
                   issued_ms=issued, deadline_ms=issued + int(lifetime_s * 1000), point=point, value=value)


class ControlLab:
    """The collector's control side for one gateway, for tests (see the module docstring)."""

    def __init__(self, broker: SecureBroker, deployment: Deployment, gateway: str,
                 prefix: str = topics.DEFAULT_PREFIX) -> None:
        self.gateway = gateway
        self.prefix = prefix
        self.mount = broker.gateway_mount
        key = collector_key_from_pem((deployment.keys_dir / "collector.key").read_bytes())
        identity = read_identity_key((deployment.gateways[gateway].dir / "identity.pub").read_text().strip())
        self.opener = Opener([key], lambda gw: identity if gw == gateway else None)
        self.client = TestClient(broker.collector_port, broker.ca_file, deployment.collector_cert,
                                 deployment.collector_key, client_id="collector-1")
        outcome = self.client.connect()
        if outcome != "connected":
            raise RuntimeError(f"control lab: {outcome}")
        self.client.subscribe(self.mount + topics.up(prefix, gateway), self.mount + topics.report(prefix, gateway))
        self.reports: list[Report] = []
        self.opened = 0  # messages of self.client.messages looked at
        self.bad: list[str] = []  # uplinks that did not open (should stay empty)

    def close(self) -> None:
        self.client.close()

    # -- uplink: learn the session, read reports

    def _open_new(self) -> None:
        with self.client._cond:
            messages = self.client.messages[self.opened:]
        self.opened += len(messages)
        for message in messages:
            own = topics.unmount(self.mount, message.topic) if self.mount else message.topic
            try:
                opened = self.opener.open(self.gateway, own or message.topic, message.payload)
            except SealError as exc:
                self.bad.append(f"{message.topic}: {exc}")
                continue
            if own == topics.report(self.prefix, self.gateway):
                self.reports.append(control.decode_report(opened.plaintext))

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._open_new()
            if predicate():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} not within {timeout}s (reports so far: {self.reports}; unopened: "
                                   f"{self.bad})")
            with self.client._cond:  # until the next message arrives
                if len(self.client.messages) == self.opened:
                    self.client._cond.wait(min(left, 0.5))

    def session(self, timeout: float = 20) -> bytes:
        """The gateway's newest session: the one to seal a downlink for (waits for an uplink of it)."""
        self._wait(lambda: self.opener.newest_session(self.gateway) is not None, timeout, "an uplink of the gateway")
        sid = self.opener.newest_session(self.gateway)
        assert sid is not None
        return sid

    def wait_report(self, command_id: str, timeout: float = 10, count: int = 1) -> Report:
        """The `count`-th report for `command_id` (1: the first)."""
        self._wait(lambda: len(self.reports_for(command_id)) >= count, timeout, f"report #{count} of {command_id}")
        return self.reports_for(command_id)[count - 1]

    def reports_for(self, doc_id: str) -> list[Report]:
        self._open_new()
        return [r for r in self.reports if r.id == doc_id]

    # -- downlink

    def down_topic(self) -> str:
        return topics.down(self.prefix, self.gateway, control.KIND)

    def seal(self, item: SignedDoc | None, crl: SignedCrl, session: bytes | None = None) -> bytes:
        plaintext = control.encode(control.ControlDown(crl=crl, item=item))
        return self.opener.seal_confidential(self.gateway, session or self.session(), self.down_topic(), plaintext)

    def send(self, item: SignedDoc | None, crl: SignedCrl, session: bytes | None = None) -> None:
        """Seal a ControlDown for the gateway's newest session and publish it (QoS 1) on its down/control."""
        self.publish(self.seal(item, crl, session))

    def publish(self, payload: bytes) -> None:
        rc = self.client.publish(self.mount + self.down_topic(), payload)
        if rc != 0:
            raise RuntimeError(f"the broker refused the downlink: PUBACK reason {rc}")
