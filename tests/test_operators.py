"""edge-collector operators: the operator CA, operators' keys and certificates, revocation and its list.

What the commands write is checked with what a gateway runs (wire.control.Trust with operator-ca.pub): an
operator's key from `keygen` with the certificate from `add` signs a command the gateway accepts, and after
`revoke` the list refuses it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector import cli as collector_cli
from wire import control
from wire.keys import identity_from_pem, public_identity_from_pem

REPO = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real command line, as an administrator runs it."""
    return subprocess.run([sys.executable, "-m", "collector.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def ok(capsys, *argv: str) -> str:
    code = collector_cli.main(["operators", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def refused(capsys, *argv: str, code: int = 2) -> str:
    assert collector_cli.main(["operators", *argv]) == code
    _, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def read_cert(path: Path) -> control.SignedCert:
    return control.decode_signed_cert(control.unarmour("OPERATOR CERTIFICATE", path.read_text()))


def read_crl(path: Path) -> control.SignedCrl:
    return control.decode_signed_crl(control.unarmour("OPERATOR CRL", path.read_text()))


def gateway_trust(ca: Path) -> control.Trust:
    """What a gateway holds: the CA's public key from enrollment and the list the collector relays."""
    trust = control.Trust(public_identity_from_pem((ca / "operator-ca.pub").read_bytes()))
    assert trust.offer_crl(read_crl(ca / "operators.crl"), None)
    return trust


def signed_command(key_file: Path, cert_file: Path, gateway: str = "gw-0001", point: str = "setpoint"):
    now = int(time.time() * 1000)
    cmd = control.Command(control.new_command_id(), gateway, "pump-1", "write", now, now + 60_000, point, 21.0)
    return control.sign("command", cmd, identity_from_pem(key_file.read_bytes()), read_cert(cert_file))


@pytest.fixture
def ca(tmp_path: Path, capsys) -> Path:
    d = tmp_path / "operator-ca"
    out = ok(capsys, "init", "--dir", str(d))
    kid = control.key_id(public_identity_from_pem((d / "operator-ca.pub").read_bytes())).hex()
    assert f"key id {kid}" in out and "operators.crl" in out
    return d


def test_init_makes_the_ca_and_refuses_to_overwrite_it(ca, capsys):
    assert {p.name for p in ca.iterdir()} >= {"operator-ca.key", "operator-ca.pub", "operators.crl", "index.json",
                                             "issued"}
    key = identity_from_pem((ca / "operator-ca.key").read_bytes())
    trust = gateway_trust(ca)
    assert trust.crl.number == 1 and trust.crl.revoked == [] and trust.ca_kid == control.key_id(key.public_key())
    assert 6.9 * DAY_MS < trust.crl.next_update_ms - trust.crl.issued_ms <= 7 * DAY_MS  # default: 7 days
    before = (ca / "operator-ca.key").read_bytes()
    assert "refusing to overwrite an operator CA" in refused(capsys, "init", "--dir", str(ca))
    assert (ca / "operator-ca.key").read_bytes() == before


def test_keygen_add_sign_verify_on_the_gateway(ca, tmp_path, capsys):
    home = tmp_path / "alice-home"
    out = ok(capsys, "keygen", "alice", "--out", str(home))
    assert "alice.key" in out and "alice.pub" in out
    assert "refusing to overwrite" in refused(capsys, "keygen", "alice", "--out", str(home))
    out = ok(capsys, "add", "alice", "--dir", str(ca), "--public", str(home / "alice.pub"), "--role", "operator",
             "--gateways", "gw-00*", "--devices", "pump-*", "--points", "setpoint", "mode", "--days", "30")
    assert "serial 1" in out and "made HERE" not in out
    cert_file = home / "alice.cert"  # next to the public key by default
    cert = control.verify_cert_signature(gateway_trust(ca).ca, read_cert(cert_file))
    assert (cert.name, cert.role, cert.serial) == ("alice", "operator", 1)
    assert cert.scope == control.Scope(["gw-00*"], ["pump-*"], ["setpoint", "mode"])
    assert 29.9 * DAY_MS < cert.not_after_ms - cert.not_before_ms <= 30 * DAY_MS + 10 * 60_000
    assert cert.key == public_identity_from_pem((home / "alice.pub").read_bytes()).public_bytes_raw()
    assert (ca / "issued" / "1.cert").read_text() == cert_file.read_text()
    # the gateway accepts alice's command in her scope and refuses it outside
    trust, now = gateway_trust(ca), int(time.time() * 1000)
    assert trust.verify(signed_command(home / "alice.key", cert_file), gateway="gw-0001", now_ms=now)
    with pytest.raises(control.ControlRefused) as info:
        trust.verify(signed_command(home / "alice.key", cert_file, point="limit"), gateway="gw-0001", now_ms=now)
    assert info.value.reason == control.ControlReason.OUT_OF_SCOPE


def test_add_without_a_public_key_makes_the_pair_and_says_so(ca, tmp_path, capsys):
    out_dir = tmp_path / "handover"
    out_dir.mkdir()
    out = ok(capsys, "add", "bob", "--dir", str(ca), "--role", "engineer", "--gateways", "*", "--out", str(out_dir))
    assert "made HERE" in out and "delete it from this host" in out
    assert {p.name for p in out_dir.iterdir()} == {"bob.key", "bob.pub", "bob.cert"}
    cert = control.read_cert(read_cert(out_dir / "bob.cert"))
    assert cert.key == identity_from_pem((out_dir / "bob.key").read_bytes()).public_key().public_bytes_raw()
    assert cert.scope == control.Scope(["*"], ["*"], ["*"])
    trust = gateway_trust(ca)
    now = int(time.time() * 1000)
    cfg_text = '[gateway]\nid = "gw-0001"\n'
    doc = control.ConfigDoc("gw-0001", 2, cfg_text, control.config_sha256(cfg_text), now, now + DAY_MS)
    signed = control.sign("config", doc, identity_from_pem((out_dir / "bob.key").read_bytes()),
                          read_cert(out_dir / "bob.cert"))
    assert trust.verify(signed, gateway="gw-0001", now_ms=now)


def test_serials_are_unique_and_a_reissued_name_gets_a_new_one(ca, tmp_path, capsys):
    for name, out in (("alice", "a1"), ("bob", "b"), ("alice", "a2")):
        (tmp_path / out).mkdir()
        ok(capsys, "add", name, "--dir", str(ca), "--role", "operator", "--gateways", "*", "--out", str(tmp_path / out))
    serials = [control.read_cert(read_cert(tmp_path / d / f"{n}.cert")).serial
               for n, d in (("alice", "a1"), ("bob", "b"), ("alice", "a2"))]
    assert serials == [1, 2, 3]
    listed = json.loads(ok(capsys, "list", "--dir", str(ca), "--json"))
    assert [(e["name"], e["serial"], e["status"], e["revoked"]) for e in listed] == [
        ("alice", 1, "valid", False), ("alice", 3, "valid", False), ("bob", 2, "valid", False)]
    assert listed[0]["scope"] == {"gateways": ["*"], "devices": ["*"], "points": ["*"]}
    assert listed[0]["role"] == "operator" and listed[0]["not_after"].endswith("Z")


def test_add_refusals_are_one_line(ca, tmp_path, capsys):
    ok(capsys, "keygen", "carol", "--out", str(tmp_path))
    pub = str(tmp_path / "carol.pub")
    assert "private key" in refused(capsys, "add", "carol", "--dir", str(ca), "--public", str(tmp_path / "carol.key"),
                                    "--role", "operator", "--gateways", "*")
    assert "operator name" in refused(capsys, "add", "carol smith", "--dir", str(ca), "--public", pub, "--role",
                                      "operator", "--gateways", "*")
    assert "--days must be" in refused(capsys, "add", "carol", "--dir", str(ca), "--public", pub, "--role",
                                       "operator", "--gateways", "*", "--days", "0")
    assert "not an operator CA" in refused(capsys, "add", "carol", "--dir", str(tmp_path / "nope"), "--public", pub,
                                           "--role", "operator", "--gateways", "*")
    assert "no such file" in refused(capsys, "add", "carol", "--dir", str(ca), "--public", str(tmp_path / "x.pub"),
                                     "--role", "operator", "--gateways", "*")
    (tmp_path / "junk.pub").write_text("hello")
    assert "not an Ed25519 public key" in refused(capsys, "add", "carol", "--dir", str(ca), "--public",
                                                  str(tmp_path / "junk.pub"), "--role", "operator", "--gateways", "*")
    ok(capsys, "add", "carol", "--dir", str(ca), "--public", pub, "--role", "operator", "--gateways", "*")
    # one key is one operator: the same key under another name is refused (the two-person rule counts people)
    out_dir = tmp_path / "other"
    out_dir.mkdir()
    assert "already certified for 'carol'" in refused(capsys, "add", "dave", "--dir", str(ca), "--public", pub,
                                                      "--role", "operator", "--gateways", "*", "--out", str(out_dir))
    # nothing of the refused attempts was issued
    assert [e["name"] for e in json.loads(ok(capsys, "list", "--dir", str(ca), "--json"))] == ["carol"]
    with pytest.raises(SystemExit):  # argparse: a role that does not exist
        collector_cli.main(["operators", "add", "x", "--dir", str(ca), "--role", "root", "--gateways", "*"])
    capsys.readouterr()


def test_revoke_and_the_gateway_refuses(ca, tmp_path, capsys):
    for name in ("alice", "bob"):
        d = tmp_path / name
        d.mkdir()
        ok(capsys, "add", name, "--dir", str(ca), "--role", "operator", "--gateways", "*", "--out", str(d))
    (tmp_path / "alice2").mkdir()
    ok(capsys, "add", "alice", "--dir", str(ca), "--role", "operator", "--gateways", "*", "--out",
       str(tmp_path / "alice2"))
    old_list = read_crl(ca / "operators.crl")
    out = ok(capsys, "revoke", "alice", "--dir", str(ca))
    assert "revoked 2 certificate(s) of alice: serial 1, 3" in out and "revocation list 2" in out
    trust, now = gateway_trust(ca), int(time.time() * 1000)
    assert trust.crl.number == 2 and trust.crl.revoked == [1, 3]
    for d in ("alice", "alice2"):
        with pytest.raises(control.ControlRefused) as info:
            trust.verify(signed_command(tmp_path / d / "alice.key", tmp_path / d / "alice.cert"), gateway="gw-0001",
                         now_ms=now)
        assert info.value.reason == control.ControlReason.REVOKED
    assert trust.verify(signed_command(tmp_path / "bob" / "bob.key", tmp_path / "bob" / "bob.cert"),
                        gateway="gw-0001", now_ms=now)
    assert trust.offer_crl(old_list, now) is False  # the older list cannot undo it
    listed = {e["serial"]: e for e in json.loads(ok(capsys, "list", "--dir", str(ca), "--json"))}
    assert listed[1]["status"] == listed[3]["status"] == "revoked" and listed[2]["status"] == "valid"
    text = ok(capsys, "list", "--dir", str(ca))
    assert "revoked" in text and "bob" in text
    # one serial only; errors name the problem
    assert "serial 1 is not a certificate of 'bob'" in refused(capsys, "revoke", "bob", "--dir", str(ca), "--serial",
                                                                "1")
    assert "no certificate to 'eve'" in refused(capsys, "revoke", "eve", "--dir", str(ca))
    out = ok(capsys, "revoke", "bob", "--dir", str(ca), "--serial", "2")
    assert "serial 2" in out
    assert gateway_trust(ca).crl.revoked == [1, 2, 3]
    assert "no certificate left to revoke" in ok(capsys, "revoke", "bob", "--dir", str(ca))


def test_crl_re_signs_with_a_higher_number_and_its_validity(ca, tmp_path, capsys):
    out_file = tmp_path / "published.crl"
    out = ok(capsys, "crl", "--dir", str(ca), "--days", "2", "--out", str(out_file))
    assert "revocation list 2" in out
    assert out_file.read_text() == (ca / "operators.crl").read_text()
    crl = control.read_crl(read_crl(out_file))
    assert crl.number == 2 and 1.99 * DAY_MS < crl.next_update_ms - crl.issued_ms <= 2 * DAY_MS
    # a gateway holding it refuses everything once it is past its next update (hence the timer)
    ok(capsys, "add", "alice", "--dir", str(ca), "--role", "operator", "--gateways", "*", "--out", str(tmp_path))
    trust = gateway_trust(ca)
    cert = read_cert(tmp_path / "alice.cert")
    assert trust.verify_cert(cert, crl.next_update_ms - 1).name == "alice"
    with pytest.raises(control.ControlRefused) as info:
        trust.verify_cert(cert, crl.next_update_ms + 1)
    assert info.value.reason == control.ControlReason.NO_CRL
    assert "--days must be 1..366" in refused(capsys, "crl", "--dir", str(ca), "--days", "0")
    assert "no such directory" in refused(capsys, "crl", "--dir", str(ca), "--out", str(tmp_path / "no" / "x.crl"))


def test_the_index_is_rebuilt_from_issued_and_the_list(ca, tmp_path, capsys):
    for name in ("alice", "bob"):
        d = tmp_path / name
        d.mkdir()
        ok(capsys, "add", name, "--dir", str(ca), "--role", "operator", "--gateways", "*", "--out", str(d))
    ok(capsys, "revoke", "alice", "--dir", str(ca))
    before = json.loads(ok(capsys, "list", "--dir", str(ca), "--json"))
    (ca / "index.json").unlink()
    after = json.loads(ok(capsys, "list", "--dir", str(ca), "--json"))
    assert [(e["serial"], e["name"], e["status"]) for e in after] == [(e["serial"], e["name"], e["status"])
                                                                       for e in before]
    ok(capsys, "crl", "--dir", str(ca))  # the list number still goes up (read from operators.crl)
    assert control.read_crl(read_crl(ca / "operators.crl")).number == 3
    (ca / "index.json").write_text("{broken")
    assert "index.json: not an operator index" in refused(capsys, "list", "--dir", str(ca))


def test_the_real_command_line_gives_one_line_errors(tmp_path):
    proc = cli("operators", "list", "--dir", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "not an operator CA" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("operators", "init", "--dir", str(tmp_path / "ca"))
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "ca" / "operator-ca.key").write_text("not a key")
    proc = cli("operators", "crl", "--dir", str(tmp_path / "ca"))
    assert proc.returncode == 2 and "operator-ca.key: not an Ed25519 private key" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
