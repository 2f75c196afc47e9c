"""wire/control.py: operator certificates, revocation lists, signed documents and the gateway's Trust check.

Pure: every time is an argument. Each ControlReason that Trust.verify / offer_crl can give has a case here that
reaches it, and the same document with the one thing fixed is accepted (so a refusal is for that reason only).
"""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import control
from wire.control import (
    Approval,
    Command,
    ConfigDoc,
    ControlDown,
    ControlReason,
    ControlRefused,
    Crl,
    OperatorCert,
    Report,
    Scope,
    SignedCert,
    SignedCrl,
    SignedDoc,
    Trust,
)

T0 = 1_700_000_000_000  # ms
DAY = 86_400_000
GW = "gw-0001"


@dataclasses.dataclass
class Operator:
    name: str
    key: Ed25519PrivateKey
    cert: SignedCert

    @property
    def serial(self) -> int:
        return control.read_cert(self.cert).serial


class Authority:
    """An operator CA as `edge-collector operators` keeps it, in memory."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.kid = control.key_id(self.key.public_key())
        self.serial = 0
        self.crl_number = 0

    def operator(self, name: str = "alice", role: str = "engineer", scope: Scope | None = None, *,
                 not_before: int = T0 - DAY, not_after: int = T0 + 365 * DAY,
                 key: Ed25519PrivateKey | None = None) -> Operator:
        self.serial += 1
        key = key or Ed25519PrivateKey.generate()
        cert = OperatorCert(self.serial, name, role, key.public_key().public_bytes_raw(), scope or Scope(),
                            not_before, not_after, self.kid)
        return Operator(name, key, control.issue_cert(self.key, cert))

    def crl(self, revoked: list[int] = (), *, issued: int = T0 - 3_600_000, valid: int = 7 * DAY,
            number: int | None = None) -> SignedCrl:
        self.crl_number = number if number is not None else self.crl_number + 1
        return control.issue_crl(self.key, Crl(self.crl_number, issued, issued + valid, list(revoked), self.kid))

    def trust(self, revoked: list[int] = ()) -> Trust:
        trust = Trust(self.key.public_key())
        assert trust.offer_crl(self.crl(revoked), T0)
        return trust


def command(gateway: str = GW, device: str = "meter-1", point: str | None = "setpoint", value=21.5, *,
            issued: int = T0, deadline: int = T0 + 60_000, action: str = "write") -> Command:
    return Command(control.new_command_id(), gateway, device, action, issued, deadline, point, value)


def config(gateway: str = GW, toml: str = '[gateway]\nid = "gw-0001"\n', *, version: int = 2,
           issued: int = T0, deadline: int = T0 + DAY) -> ConfigDoc:
    return ConfigDoc(gateway, version, toml, control.config_sha256(toml), issued, deadline)


def refused(fn, *args, **kw) -> ControlReason:
    with pytest.raises(ControlRefused) as info:
        fn(*args, **kw)
    assert info.value.detail  # every refusal says what, not only a code
    return info.value.reason


@pytest.fixture
def ca() -> Authority:
    return Authority()


# ------------------------------------------------------------------------------------------------- accepted


def test_a_signed_command_and_configuration_verify(ca):
    alice = ca.operator()
    trust = ca.trust()
    cmd = command()
    doc, operators = trust.verify(control.sign("command", cmd, alice.key, alice.cert), gateway=GW, now_ms=T0)
    assert doc == cmd and [o.name for o in operators] == ["alice"]
    cfg = config()
    doc, operators = trust.verify(control.sign("config", cfg, alice.key, alice.cert), gateway=GW, now_ms=T0)
    assert doc == cfg and operators[0].role == "engineer"


def test_the_whole_downlink_round_trips_through_msgpack(ca):
    alice = ca.operator()
    signed = control.sign("command", command(), alice.key, alice.cert)
    down = ControlDown(ca.crl(), signed)
    again = control.decode_down(control.encode(down))
    assert again == down
    trust = Trust(ca.key.public_key())
    assert trust.offer_crl(again.crl, T0)
    assert trust.verify(again.item, gateway=GW, now_ms=T0)[0] == control.read_doc(signed)
    report = Report("command", control.read_doc(signed).id, "done", T0, value=21.5)
    assert control.decode_report(control.encode(report)) == report


# ------------------------------------------------------------------------------------------- the document


def test_modified_document_is_a_bad_signature(ca):
    alice = ca.operator()
    trust = ca.trust()
    signed = control.sign("command", command(value=21.5), alice.key, alice.cert)
    changed = control.encode(msgspec.structs.replace(control.read_doc(signed), value=99.0))
    assert refused(trust.verify, SignedDoc("command", changed, signed.approvals), gateway=GW,
                   now_ms=T0) == ControlReason.BAD_SIGNATURE
    # every single byte of the document changed: refused, never accepted (most as bad_signature)
    seen = set()
    for i in range(len(signed.doc)):
        body = bytearray(signed.doc)
        body[i] ^= 0x01
        seen.add(refused(trust.verify, SignedDoc("command", bytes(body), signed.approvals), gateway=GW, now_ms=T0))
    assert ControlReason.BAD_SIGNATURE in seen
    assert seen <= {ControlReason.BAD_SIGNATURE, ControlReason.MALFORMED, ControlReason.WRONG_GATEWAY,
                    ControlReason.EXPIRED, ControlReason.NOT_YET_VALID, ControlReason.TOO_LONG}
    assert trust.verify(signed, gateway=GW, now_ms=T0)


def test_a_signature_for_a_command_is_not_one_for_a_configuration(ca):
    """Domain separation: the same bytes signed as a command do not verify as a configuration."""
    alice = ca.operator()
    trust = ca.trust()
    cfg = config()
    as_command = control.approve("command", control.encode(cfg), alice.key, alice.cert)
    assert refused(trust.verify, SignedDoc("config", control.encode(cfg), [as_command]), gateway=GW,
                   now_ms=T0) == ControlReason.BAD_SIGNATURE
    # and a configuration's bytes labelled as a command do not even decode as one
    signed = control.sign("config", cfg, alice.key, alice.cert)
    assert refused(trust.verify, SignedDoc("command", signed.doc, signed.approvals), gateway=GW,
                   now_ms=T0) == ControlReason.MALFORMED


def test_wrong_gateway(ca):
    alice = ca.operator()
    trust = ca.trust()
    signed = control.sign("command", command(gateway="gw-0002"), alice.key, alice.cert)
    assert refused(trust.verify, signed, gateway=GW, now_ms=T0) == ControlReason.WRONG_GATEWAY
    assert trust.verify(signed, gateway="gw-0002", now_ms=T0)
    signed = control.sign("config", config(gateway="gw-0002"), alice.key, alice.cert)
    assert refused(trust.verify, signed, gateway=GW, now_ms=T0) == ControlReason.WRONG_GATEWAY


def test_deadline_passed_issued_in_the_future_and_too_long(ca):
    alice = ca.operator()
    trust = ca.trust()
    signed = control.sign("command", command(deadline=T0 + 60_000), alice.key, alice.cert)
    assert trust.verify(signed, gateway=GW, now_ms=T0 + 60_000)  # the deadline itself is still in time
    assert refused(trust.verify, signed, gateway=GW, now_ms=T0 + 60_001) == ControlReason.EXPIRED
    # issued ahead of the gateway's clock: up to CLOCK_SKEW_MS is tolerated
    ahead = control.sign("command", command(issued=T0 + control.CLOCK_SKEW_MS + 1, deadline=T0 + 3_600_000),
                         alice.key, alice.cert)
    assert refused(trust.verify, ahead, gateway=GW, now_ms=T0) == ControlReason.NOT_YET_VALID
    assert trust.verify(ahead, gateway=GW, now_ms=T0 + 1)
    long = control.sign("command", command(deadline=T0 + control.MAX_COMMAND_LIFETIME_MS + 1), alice.key,
                        alice.cert)
    assert refused(trust.verify, long, gateway=GW, now_ms=T0) == ControlReason.TOO_LONG
    fine = control.sign("command", command(deadline=T0 + control.MAX_COMMAND_LIFETIME_MS), alice.key, alice.cert)
    assert trust.verify(fine, gateway=GW, now_ms=T0)
    cfg = control.sign("config", config(deadline=T0 + control.MAX_CONFIG_LIFETIME_MS + 1), alice.key, alice.cert)
    assert refused(trust.verify, cfg, gateway=GW, now_ms=T0) == ControlReason.TOO_LONG


def test_a_write_must_name_a_point_and_a_value(ca):
    """Without a point, a write would pass any point scope (Scope.allows: no point = any point)."""
    alice = ca.operator(scope=Scope(points=["setpoint"]), role="operator")
    trust = ca.trust()
    for cmd in (command(point=None), command(value=None)):
        signed = control.sign("command", cmd, alice.key, alice.cert)
        assert refused(trust.verify, signed, gateway=GW, now_ms=T0) == ControlReason.MALFORMED
    poll = control.sign("command", command(action="poll_now", point=None, value=None), alice.key, alice.cert)
    assert trust.verify(poll, gateway=GW, now_ms=T0)


def test_a_configuration_whose_hash_is_not_its_text_is_refused(ca):
    alice = ca.operator()
    trust = ca.trust()
    cfg = msgspec.structs.replace(config(), sha256=control.config_sha256("something else"))
    signed = control.sign("config", cfg, alice.key, alice.cert)
    assert refused(trust.verify, signed, gateway=GW, now_ms=T0) == ControlReason.MALFORMED


# ------------------------------------------------------------------------------------------ the certificate


def test_certificate_not_yet_valid_and_expired(ca):
    trust = ca.trust()
    early = ca.operator("early", not_before=T0 + 1000)
    signed = control.sign("command", command(), early.key, early.cert)
    assert refused(trust.verify, signed, gateway=GW, now_ms=T0) == ControlReason.NOT_YET_VALID
    assert trust.verify(signed, gateway=GW, now_ms=T0 + 1000)
    late = ca.operator("late", not_after=T0 - 1)
    signed = control.sign("command", command(), late.key, late.cert)
    assert refused(trust.verify, signed, gateway=GW, now_ms=T0) == ControlReason.CERT_EXPIRED
    assert trust.verify(signed, gateway=GW, now_ms=T0 - 1)


def test_revoked_certificate(ca):
    alice, bob = ca.operator("alice"), ca.operator("bob")
    trust = ca.trust(revoked=[alice.serial])
    assert refused(trust.verify, control.sign("command", command(), alice.key, alice.cert), gateway=GW,
                   now_ms=T0) == ControlReason.REVOKED
    assert trust.verify(control.sign("command", command(), bob.key, bob.cert), gateway=GW, now_ms=T0)
    # a name re-issued gets a new serial: the new certificate works, the revoked one stays revoked
    alice2 = ca.operator("alice", key=alice.key)
    assert alice2.serial != alice.serial
    assert trust.verify(control.sign("command", command(), alice2.key, alice2.cert), gateway=GW, now_ms=T0)


def test_the_collectors_key_alone_cannot_sign(ca):
    """A command signed by the collector (or anyone without an operator key and a CA-signed certificate)."""
    alice = ca.operator()
    trust = ca.trust()
    collector = Ed25519PrivateKey.generate()
    cmd = command()
    body = control.encode(cmd)
    # 1. the collector's signature with a real operator's certificate: the signature is not that operator's
    forged = SignedDoc("command", body, [Approval(alice.cert, collector.sign(control._CTX_DOC["command"] + body))])
    assert refused(trust.verify, forged, gateway=GW, now_ms=T0) == ControlReason.BAD_SIGNATURE
    # 2. a certificate for the collector's key, naming the CA, signed by the collector itself
    fake = OperatorCert(99, "collector", "engineer", collector.public_key().public_bytes_raw(), Scope(), T0 - DAY,
                        T0 + DAY, ca.kid)
    body_cert = control.encode(fake)
    self_signed = SignedCert(body_cert, collector.sign(control._CTX_CERT + body_cert))
    assert refused(trust.verify, SignedDoc("command", body, [control.approve("command", body, collector, self_signed)]),
                   gateway=GW, now_ms=T0) == ControlReason.BAD_CERTIFICATE
    # 3. a CA of the collector's own making: not the CA the gateway was given at enrollment
    other = Authority()
    mallory = other.operator("mallory")
    assert refused(trust.verify, control.sign("command", cmd, mallory.key, mallory.cert), gateway=GW,
                   now_ms=T0) == ControlReason.UNKNOWN_CA
    # 4. a real certificate whose signed body was edited (role, scope, key): the CA's signature fails
    cert = control.read_cert(alice.cert)
    edited = SignedCert(control.encode(msgspec.structs.replace(cert, key=collector.public_key().public_bytes_raw())),
                        alice.cert.sig)
    assert refused(trust.verify, SignedDoc("command", body, [control.approve("command", body, collector, edited)]),
                   gateway=GW, now_ms=T0) == ControlReason.BAD_CERTIFICATE
    # and the honest way works
    assert trust.verify(control.sign("command", cmd, alice.key, alice.cert), gateway=GW, now_ms=T0)


def test_approve_refuses_a_key_that_is_not_the_certificates(ca):
    alice = ca.operator()
    with pytest.raises(ValueError, match="not the one the certificate is for"):
        control.sign("command", command(), Ed25519PrivateKey.generate(), alice.cert)
    with pytest.raises(ValueError, match="another CA"):
        control.issue_cert(Ed25519PrivateKey.generate(), control.read_cert(alice.cert))
    with pytest.raises(ValueError, match="another CA"):
        control.issue_crl(Ed25519PrivateKey.generate(), control.read_crl(ca.crl()))


# -------------------------------------------------------------------------------------- the revocation list


def test_no_crl_yet(ca):
    alice = ca.operator()
    trust = Trust(ca.key.public_key())
    signed = control.sign("command", command(), alice.key, alice.cert)
    assert refused(trust.verify, signed, gateway=GW, now_ms=T0) == ControlReason.NO_CRL
    assert trust.offer_crl(ca.crl(), T0)
    assert trust.verify(signed, gateway=GW, now_ms=T0)


def test_stale_crl_refuses_everything(ca):
    alice = ca.operator()
    trust = Trust(ca.key.public_key())
    crl = ca.crl(issued=T0 - 8 * DAY, valid=7 * DAY)  # next update passed a day ago
    assert trust.offer_crl(crl, T0)  # held (it is the newest), but not current
    signed = control.sign("command", command(), alice.key, alice.cert)
    with pytest.raises(ControlRefused) as info:
        trust.verify(signed, gateway=GW, now_ms=T0)
    assert info.value.reason == ControlReason.NO_CRL and "expired" in info.value.detail
    assert trust.offer_crl(ca.crl(), T0)  # a fresh one, as the timer re-signs it
    assert trust.verify(signed, gateway=GW, now_ms=T0)


def test_crl_rollback_is_ignored(ca):
    alice = ca.operator()
    old = ca.crl()
    new = ca.crl(revoked=[alice.serial])
    trust = Trust(ca.key.public_key())
    assert trust.offer_crl(new, T0)
    assert trust.offer_crl(old, T0) is False  # an older list (a collector or broker replaying it) changes nothing
    same_number = ca.crl(number=control.read_crl(new).number)  # the same number, without the revocation
    assert trust.offer_crl(same_number, T0) is False
    assert trust.crl.number == control.read_crl(new).number
    assert refused(trust.verify, control.sign("command", command(), alice.key, alice.cert), gateway=GW,
                   now_ms=T0) == ControlReason.REVOKED


def test_a_restart_cannot_roll_the_crl_back(ca):
    alice = ca.operator()
    trust = Trust(ca.key.public_key())
    trust.offer_crl(ca.crl(), T0)
    assert trust.offer_crl(ca.crl(revoked=[alice.serial]), T0)
    saved = trust.crl_bytes()
    restarted = Trust(ca.key.public_key(), saved)
    assert restarted.crl == trust.crl
    assert restarted.offer_crl(ca.crl(number=1), T0) is False
    # a damaged saved list is dropped: the gateway then waits for the next one (NO_CRL meanwhile)
    damaged = Trust(ca.key.public_key(), saved[:-3] + b"xyz")
    assert damaged.crl is None
    assert refused(damaged.verify, control.sign("command", command(), alice.key, alice.cert), gateway=GW,
                   now_ms=T0) == ControlReason.NO_CRL


def test_crl_of_another_ca_or_altered(ca):
    trust = Trust(ca.key.public_key())
    assert refused(trust.offer_crl, Authority().crl(), T0) == ControlReason.UNKNOWN_CA
    crl = ca.crl(revoked=[5])
    body = control.read_crl(crl)
    altered = SignedCrl(control.encode(msgspec.structs.replace(body, revoked=[])), crl.sig)
    assert refused(trust.offer_crl, altered, T0) == ControlReason.BAD_CERTIFICATE
    assert refused(trust.offer_crl, SignedCrl(b"\x93\x01\x02", crl.sig), T0) == ControlReason.MALFORMED
    assert trust.crl is None
    assert trust.offer_crl(crl, T0)


# --------------------------------------------------------------------------------------------- role, scope


def test_roles(ca):
    trust = ca.trust()
    viewer, operator, engineer = ca.operator("v", "viewer"), ca.operator("o", "operator"), ca.operator("e", "engineer")
    assert refused(trust.verify, control.sign("command", command(), viewer.key, viewer.cert), gateway=GW,
                   now_ms=T0) == ControlReason.ROLE
    assert trust.verify(control.sign("command", command(), operator.key, operator.cert), gateway=GW, now_ms=T0)
    assert refused(trust.verify, control.sign("config", config(), operator.key, operator.cert), gateway=GW,
                   now_ms=T0) == ControlReason.ROLE
    assert trust.verify(control.sign("config", config(), engineer.key, engineer.cert), gateway=GW, now_ms=T0)


@pytest.mark.parametrize(("scope", "target", "allowed"), [
    (Scope(gateways=["gw-00*"]), (GW, "meter-1", "setpoint"), True),
    (Scope(gateways=["gw-01*"]), (GW, "meter-1", "setpoint"), False),
    (Scope(devices=["meter-*"]), (GW, "meter-1", "setpoint"), True),
    (Scope(devices=["pump-*"]), (GW, "meter-1", "setpoint"), False),
    (Scope(points=["setpoint", "mode"]), (GW, "meter-1", "setpoint"), True),
    (Scope(points=["mode"]), (GW, "meter-1", "setpoint"), False),
    (Scope(devices=["Meter-1"]), (GW, "meter-1", "setpoint"), False),  # case-sensitive
])
def test_command_scope(ca, scope, target, allowed):
    alice = ca.operator(role="operator", scope=scope)
    trust = ca.trust()
    gw, device, point = target
    signed = control.sign("command", command(gw, device, point), alice.key, alice.cert)
    if allowed:
        assert trust.verify(signed, gateway=gw, now_ms=T0)
    else:
        assert refused(trust.verify, signed, gateway=gw, now_ms=T0) == ControlReason.OUT_OF_SCOPE


def test_a_configuration_needs_the_whole_gateway_in_scope(ca):
    trust = ca.trust()
    for scope in (Scope(devices=["meter-*"]), Scope(points=["setpoint"]), Scope(gateways=["gw-9*"])):
        eng = ca.operator("eng", scope=scope)
        assert refused(trust.verify, control.sign("config", config(), eng.key, eng.cert), gateway=GW,
                       now_ms=T0) == ControlReason.OUT_OF_SCOPE
    whole = ca.operator("eng", scope=Scope(gateways=["gw-000*"]))
    assert trust.verify(control.sign("config", config(), whole.key, whole.cert), gateway=GW, now_ms=T0)


# ---------------------------------------------------------------------------------------------- two persons


def test_two_person_rule(ca):
    alice, bob = ca.operator("alice", "operator"), ca.operator("bob", "operator")
    trust = ca.trust()
    one = control.sign("command", command(), alice.key, alice.cert)
    assert refused(trust.verify, one, gateway=GW, now_ms=T0, required=2) == ControlReason.TWO_PERSON
    # the same operator twice is one person
    twice = control.cosign(one, alice.key, alice.cert)
    assert len(twice.approvals) == 2
    assert refused(trust.verify, twice, gateway=GW, now_ms=T0, required=2) == ControlReason.TWO_PERSON
    # ... also with a second certificate (re-issued name, another key): one name is one person
    alice_again = ca.operator("alice", "operator")
    assert refused(trust.verify, control.cosign(one, alice_again.key, alice_again.cert), gateway=GW, now_ms=T0,
                   required=2) == ControlReason.TWO_PERSON
    # ... and one key under two names is one person too
    alias = ca.operator("alice-alias", "operator", key=alice.key)
    assert refused(trust.verify, control.cosign(one, alias.key, alias.cert), gateway=GW, now_ms=T0,
                   required=2) == ControlReason.TWO_PERSON
    _, operators = trust.verify(control.cosign(one, bob.key, bob.cert), gateway=GW, now_ms=T0, required=2)
    assert sorted(o.name for o in operators) == ["alice", "bob"]


def test_every_approval_must_hold(ca):
    """A second signature that fails (revoked, out of scope, a viewer) refuses the document: nothing counts
    silently fewer signatures."""
    alice, bob = ca.operator("alice", "operator"), ca.operator("bob", "operator")
    viewer = ca.operator("vic", "viewer")
    narrow = ca.operator("nora", "operator", scope=Scope(devices=["pump-*"]))
    trust = ca.trust(revoked=[bob.serial])
    one = control.sign("command", command(), alice.key, alice.cert)
    assert refused(trust.verify, control.cosign(one, bob.key, bob.cert), gateway=GW, now_ms=T0) == \
        ControlReason.REVOKED
    assert refused(trust.verify, control.cosign(one, viewer.key, viewer.cert), gateway=GW, now_ms=T0) == \
        ControlReason.ROLE
    assert refused(trust.verify, control.cosign(one, narrow.key, narrow.cert), gateway=GW, now_ms=T0) == \
        ControlReason.OUT_OF_SCOPE


def test_approvals_are_bounded(ca):
    alice = ca.operator()
    signed = control.sign("command", command(), alice.key, alice.cert)
    for _ in range(control.MAX_APPROVALS - 1):
        signed = control.cosign(signed, alice.key, alice.cert)
    assert control.decode_signed_doc(control.encode(signed)) == signed
    too_many = control.cosign(signed, alice.key, alice.cert)
    assert refused(control.decode_signed_doc, control.encode(too_many)) == ControlReason.MALFORMED


# ------------------------------------------------------------------------------------------ malformed bytes


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff" * 40, b"\x82\xa3crl\xc0", control.encode(Report(
    "command", "x", "done", T0))])
def test_malformed_bytes_are_refused_as_malformed(data):
    for decode in (control.decode_down, control.decode_signed_doc, control.decode_signed_crl,
                   control.decode_signed_cert, control.decode_report):
        try:
            decode(data)
        except ControlRefused as exc:
            assert exc.reason == ControlReason.MALFORMED
    assert refused(control.decode_down, data) == ControlReason.MALFORMED


def test_every_truncation_of_a_downlink_is_malformed(ca):
    alice = ca.operator()
    data = control.encode(ControlDown(ca.crl(), control.sign("command", command(), alice.key, alice.cert)))
    for n in range(len(data)):
        assert refused(control.decode_down, data[:n]) == ControlReason.MALFORMED


_FUZZ_CA = Authority()
_FUZZ_ALICE = _FUZZ_CA.operator()
_FUZZ_DOWN = control.encode(ControlDown(_FUZZ_CA.crl(), control.sign("command", command(), _FUZZ_ALICE.key,
                                                                        _FUZZ_ALICE.cert)))


def _open(data: bytes):
    """What an agent does with a down/control plaintext: decode, take the list, verify the document."""
    down = control.decode_down(data)
    trust = Trust(_FUZZ_CA.key.public_key())
    trust.offer_crl(down.crl, T0)
    return trust.verify(down.item, gateway=GW, now_ms=T0) if down.item else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_DOWN) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_random_edits_of_a_downlink_are_refused_or_change_nothing(edits):
    data = bytearray(_FUZZ_DOWN)
    for pos, xor in edits:
        data[pos] ^= xor
    original = _open(_FUZZ_DOWN)
    try:
        result = _open(bytes(data))
    except ControlRefused:
        return
    assert result == original  # only an edit of nothing that is signed may pass (e.g. none at all)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_are_refused_as_malformed(data):
    try:
        _open(data)
    except ControlRefused as exc:
        assert exc.reason in (ControlReason.MALFORMED, ControlReason.UNKNOWN_CA, ControlReason.BAD_CERTIFICATE,
                              ControlReason.NO_CRL)
    else:
        pytest.fail("random bytes verified")


def test_unknown_fields_and_bad_values_are_malformed(ca):
    alice = ca.operator()
    cmd = msgspec.to_builtins(command())
    for bad in ({**cmd, "extra": 1}, {**cmd, "id": "not-hex"}, {**cmd, "gateway": "gw/1"},
                {**cmd, "action": "reboot"}, {**cmd, "issued_ms": -1}):
        body = msgspec.msgpack.encode(bad)
        signed = SignedDoc("command", body, [control.approve("command", body, alice.key, alice.cert)])
        assert refused(ca.trust().verify, signed, gateway=GW, now_ms=T0) == ControlReason.MALFORMED
    cert = msgspec.to_builtins(control.read_cert(alice.cert))
    body = msgspec.msgpack.encode({**cert, "role": "root"})
    assert refused(control.read_cert, SignedCert(body, alice.cert.sig)) == ControlReason.MALFORMED


# ------------------------------------------------------------------------------------------------- armour


def test_armour_round_trip(ca):
    alice = ca.operator()
    data = control.encode(alice.cert)
    text = control.armour("OPERATOR CERTIFICATE", data)
    assert text.startswith("-----BEGIN CITYNERVE OPERATOR CERTIFICATE-----\n")
    assert all(len(line) <= 64 for line in text.splitlines())
    assert control.unarmour("OPERATOR CERTIFICATE", text) == data
    # CRLF line ends, text around it, and another block first (a bundle of files): still found
    bundle = ("comment\r\n" + control.armour("OPERATOR CRL", b"crl") + text.replace("\n", "\r\n") + "trailer")
    assert control.unarmour("OPERATOR CERTIFICATE", bundle) == data
    assert control.unarmour("OPERATOR CRL", bundle) == b"crl"
    assert control.decode_signed_cert(control.unarmour("OPERATOR CERTIFICATE", bundle)) == alice.cert
    for empty in (b"", b"\x00"):
        assert control.unarmour("X", control.armour("X", empty)) == empty


def test_unarmour_errors():
    text = control.armour("OPERATOR CRL", b"abc")
    with pytest.raises(ValueError, match="OPERATOR CERTIFICATE"):
        control.unarmour("OPERATOR CERTIFICATE", text)
    with pytest.raises(ValueError, match="base64"):
        control.unarmour("OPERATOR CRL", text.replace("YWJj", "YW!j"))
    with pytest.raises(ValueError):
        control.unarmour("OPERATOR CRL", text.replace("-----END CITYNERVE OPERATOR CRL-----", ""))
    with pytest.raises(ValueError):  # begin and end labels differ
        control.unarmour("OPERATOR CRL", text.replace("END CITYNERVE OPERATOR CRL", "END CITYNERVE OPERATOR CERT"))
