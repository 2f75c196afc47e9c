"""Enrollment end to end: edge-agent enroll -> CSR -> edge-collector ca sign -> the certificate works on the
shipped broker; the device CA's checks; one certificate per gateway id, bound to its identity key; the
collector's keys; the gateway registry and its reload on change; every user mistake is one line on stderr,
never a traceback."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collector import cli as collector_cli
from collector.pki import DeviceCA, PkiError, check_common_name, key_id, load_private_keys
from collector.registry import GatewayRegistry, RegistryError, parse_identity_key
from edge_agent import cli as agent_cli
from edge_agent.enroll import format_identity_key, make_csr
from wire.keys import IDENTITY_PROOF_OID, IDENTITY_URN_PREFIX, identity_fingerprint

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def csr_with_cn(cn: str, *, extra: list[x509.NameAttribute] | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False), *(extra or [])])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM)


def gateway_csr(cn: str, identity: ed25519.Ed25519PrivateKey | None = None) -> bytes:
    """A CSR as edge-agent enroll makes it: CN, TLS key, identity proof."""
    identity = identity or ed25519.Ed25519PrivateKey.generate()
    return make_csr(cn, identity, ec.generate_private_key(ec.SECP256R1())).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca(tmp_path: Path) -> DeviceCA:
    return DeviceCA.init(tmp_path / "device-ca")


# --- edge-agent enroll -----------------------------------------------------------------------------------------


def test_enroll_makes_private_keys_0600_a_csr_and_prints_the_public_key(tmp_path: Path, capsys) -> None:
    os.umask(0o022)
    d = tmp_path / "pki"
    assert agent_cli.main(["enroll", "--gateway-id", "gw-0001", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert mode(d) == 0o700
    assert mode(d / "identity.key") == 0o600 and mode(d / "tls.key") == 0o600

    identity = serialization.load_pem_private_key((d / "identity.key").read_bytes(), None)
    assert isinstance(identity, ed25519.Ed25519PrivateKey)
    public = format_identity_key(identity.public_key())
    assert f"identity public key: {public}\n" in out
    assert (d / "identity.pub").read_text() == public + "\n"
    assert public.startswith("ed25519:") and "=" not in public and len(public) == len("ed25519:") + 43
    assert parse_identity_key(public).public_bytes_raw() == identity.public_key().public_bytes_raw()

    tls_key = serialization.load_pem_private_key((d / "tls.key").read_bytes(), None)
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey) and tls_key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr((d / "tls.csr").read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=gw-0001"
    assert csr.public_key().public_numbers() == tls_key.public_key().public_numbers()
    assert "edge-collector gateways add gw-0001 ed25519:" in out and "ca sign" in out
    # No private key material in what is printed.
    assert "PRIVATE" not in out


def test_enroll_refuses_to_overwrite_keys_unless_forced(tmp_path: Path, capsys) -> None:
    d = tmp_path / "pki"
    assert agent_cli.main(["enroll", "--gateway-id", "gw-1", "--dir", str(d)]) == 0
    before = {n: (d / n).read_bytes() for n in ("identity.key", "tls.key", "tls.csr")}
    capsys.readouterr()
    assert agent_cli.main(["enroll", "--gateway-id", "gw-1", "--dir", str(d)]) == 2
    assert "refusing to overwrite" in one_line_error(capsys)
    assert {n: (d / n).read_bytes() for n in before} == before
    assert agent_cli.main(["enroll", "--gateway-id", "gw-1", "--dir", str(d), "--force"]) == 0
    after = {n: (d / n).read_bytes() for n in before}
    assert all(after[n] != before[n] for n in before)
    assert mode(d / "identity.key") == 0o600 and mode(d / "tls.key") == 0o600
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("bad", ["a/b", "a+b", "a#", "a\x00b", "a\x01b", "gw\n", "", " gw", "-gw", "x" * 65,
                                 "collector-1", "Collector"])
def test_enroll_rejects_gateway_ids_that_are_not_ids(tmp_path: Path, capsys, bad: str) -> None:
    assert agent_cli.main(["enroll", f"--gateway-id={bad}", "--dir", str(tmp_path / "pki")]) == 2
    assert "gateway id" in one_line_error(capsys)
    assert not (tmp_path / "pki").exists()


# --- the operator CA's public key reaches the gateway at enrollment ---------------------------------------------


def operator_ca_dir(tmp_path: Path, name: str = "operator-ca") -> Path:
    assert collector_cli.main(["operators", "init", "--dir", str(tmp_path / name)]) == 0
    return tmp_path / name


def test_enroll_installs_the_operator_ca_and_agent_toml_names_it(tmp_path: Path, capsys) -> None:
    from edge_agent import config as agent_config
    from wire import control
    from wire.config import ConfigError
    from wire.keys import collector_public_to_pem, public_identity_from_pem
    from wire.seal import CollectorKey

    ca = operator_ca_dir(tmp_path)
    kid = control.key_id(public_identity_from_pem((ca / "operator-ca.pub").read_bytes())).hex()
    capsys.readouterr()
    d = tmp_path / "pki"
    assert agent_cli.main(["enroll", "--gateway-id", "gw-0001", "--dir", str(d), "--operator-ca",
                           str(ca / "operator-ca.pub")]) == 0
    out = capsys.readouterr().out
    assert (d / "operator-ca.pub").read_bytes() == (ca / "operator-ca.pub").read_bytes()
    assert mode(d / "operator-ca.pub") == 0o600
    assert f"key id {kid}" in out and f'operator_ca = "{d / "operator-ca.pub"}"' in out
    # the configuration that names it loads; a file that is not the CA's key is refused by `check`
    (tmp_path / "collector.pub").write_bytes(collector_public_to_pem(CollectorKey.generate()))
    toml = tmp_path / "agent.toml"
    body = (f'[gateway]\nid = "gw-0001"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nhost = "127.0.0.1"\n'
            f'tls = false\n[security]\nidentity_key = "{d / "identity.key"}"\n'
            f'collector_key = "{tmp_path / "collector.pub"}"\n')
    toml.write_text(body + f'operator_ca = "{d / "operator-ca.pub"}"\n')
    cfg = agent_config.load(toml)
    assert control.key_id(public_identity_from_pem(Path(cfg.security.operator_ca).read_bytes())).hex() == kid
    toml.write_text(body)
    assert agent_config.load(toml).security.operator_ca == ""  # optional: such a gateway obeys no operator
    toml.write_text(body + f'operator_ca = "{tmp_path / "collector.pub"}"\n')
    with pytest.raises(ConfigError, match=r"security\.operator_ca"):
        agent_config.load(toml)
    toml.write_text(body + f'operator_ca = "{tmp_path / "missing.pub"}"\n')
    with pytest.raises(ConfigError, match=r"operator_ca.*does not exist"):
        agent_config.load(toml)


def test_enroll_operator_ca_alone_on_an_enrolled_gateway_and_never_replaced(tmp_path: Path, capsys) -> None:
    d = tmp_path / "pki"
    assert agent_cli.main(["enroll", "--gateway-id", "gw-1", "--dir", str(d)]) == 0
    assert "operator CA: none installed" in capsys.readouterr().out
    keys = {n: (d / n).read_bytes() for n in ("identity.key", "tls.key", "tls.csr")}
    ca, other = operator_ca_dir(tmp_path), operator_ca_dir(tmp_path, "other-ca")
    capsys.readouterr()
    assert agent_cli.main(["enroll", "--gateway-id", "gw-1", "--dir", str(d), "--operator-ca",
                           str(ca / "operator-ca.pub")]) == 0
    assert "already installed" not in capsys.readouterr().out
    assert {n: (d / n).read_bytes() for n in keys} == keys  # only the CA's key was added
    assert agent_cli.main(["enroll", "--gateway-id", "gw-1", "--dir", str(d), "--operator-ca",
                           str(ca / "operator-ca.pub")]) == 0
    assert "already installed" in capsys.readouterr().out
    installed = (d / "operator-ca.pub").read_bytes()
    for source, message in ((other / "operator-ca.pub", "already holds another operator CA"),
                            (ca / "operator-ca.key", "holds a private key"),
                            (d / "identity.pub", "not an Ed25519 public key"),
                            (tmp_path / "nope.pub", "no such file")):
        assert agent_cli.main(["enroll", "--gateway-id", "gw-1", "--dir", str(d), "--operator-ca", str(source)]) == 2
        assert message in one_line_error(capsys)
    assert (d / "operator-ca.pub").read_bytes() == installed
    # a refused CA file stops a new enrollment before any key is made
    fresh = tmp_path / "fresh"
    assert agent_cli.main(["enroll", "--gateway-id", "gw-2", "--dir", str(fresh), "--operator-ca",
                           str(ca / "operator-ca.key")]) == 2
    one_line_error(capsys)
    assert not (fresh / "identity.key").exists()


# --- the device CA ---------------------------------------------------------------------------------------------


def test_ca_init_key_0600_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    d = tmp_path / "ca"
    assert collector_cli.main(["ca", "init", "--dir", str(d)]) == 0
    assert mode(d / "ca.key") == 0o600 and mode(d) == 0o700
    cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days > 10 * 365
    crl = x509.load_pem_x509_crl((d / "ca.crl").read_bytes())
    assert crl.is_signature_valid(cert.public_key()) and len(crl) == 0
    key_before = (d / "ca.key").read_bytes()
    capsys.readouterr()
    assert collector_cli.main(["ca", "init", "--dir", str(d)]) == 2
    assert "refusing to overwrite" in one_line_error(capsys)
    assert (d / "ca.key").read_bytes() == key_before


def test_ca_sign_issues_a_client_certificate_for_the_csr(tmp_path: Path, ca: DeviceCA, capsys) -> None:
    agent_cli.main(["enroll", "--gateway-id", "gw-7", "--dir", str(tmp_path / "gw")])
    out_file = tmp_path / "out" / "gw-7.crt"
    out_file.parent.mkdir()
    capsys.readouterr()
    assert collector_cli.main(["ca", "sign", str(tmp_path / "gw" / "tls.csr"), "--dir", str(ca.directory),
                               "--days", "30", "--out", str(out_file)]) == 0
    assert f"written to {out_file}" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate(out_file.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=gw-7"
    assert cert.issuer == ca.cert.subject
    cert.verify_directly_issued_by(ca.cert)
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    csr = x509.load_pem_x509_csr((tmp_path / "gw" / "tls.csr").read_bytes())
    assert cert.public_key().public_numbers() == csr.public_key().public_numbers()
    # Default output: next to the CSR (a second certificate for gw-7: --replace).
    assert collector_cli.main(["ca", "sign", str(tmp_path / "gw" / "tls.csr"), "--dir", str(ca.directory),
                               "--replace"]) == 0
    assert (tmp_path / "gw" / "tls.crt").exists()


@pytest.mark.parametrize("bad", ["a/b", "a+b", "a#", "a\x00b", "a\x01b", "a\x7fb", "gw\n", "", " gw", "x" * 65,
                                 "collector", "collector-1", "gw\u00e9"])
@pytest.mark.filterwarnings("ignore:Attribute's length")
def test_ca_sign_rejects_common_names_that_are_not_gateway_ids(ca: DeviceCA, bad: str) -> None:
    with pytest.raises(PkiError):
        check_common_name(bad)
    with pytest.raises(PkiError, match="CN"):
        ca.sign(csr_with_cn(bad))
    assert ca.issued() == []


def test_ca_sign_checks_the_csr_itself(ca: DeviceCA) -> None:
    good = gateway_csr("gw-1")
    tampered = x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER)
    i = tampered.index(b"gw-1")
    tampered = tampered[:i] + b"gw-2" + tampered[i + 4:]  # same length: a valid structure, a wrong signature
    with pytest.raises(PkiError, match="signature"):
        ca.sign(tampered)
    with pytest.raises(PkiError, match="exactly one CN"):
        ca.sign(csr_with_cn("gw-1", extra=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]))
    with pytest.raises(PkiError, match="not a certificate signing request"):
        ca.sign(b"hello")
    with pytest.raises(PkiError, match="collector-<name>"):
        ca.sign(good, collector=True)  # --collector is only for collector-<name>
    cert = ca.sign(csr_with_cn("collector-1"), collector=True)
    assert cert.subject.rfc4514_string() == "CN=collector-1"
    assert ca.sign(good).subject.rfc4514_string() == "CN=gw-1"


def test_ca_revoke_lists_the_gateways_certificates_in_the_crl(ca: DeviceCA, capsys) -> None:
    first = ca.sign(gateway_csr("gw-1"))
    second = ca.sign(gateway_csr("gw-1"), replace=True)  # revokes the first
    other = ca.sign(gateway_csr("gw-2"))
    assert collector_cli.main(["ca", "revoke", "gw-1", "--dir", str(ca.directory)]) == 0
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    assert {r.serial_number for r in crl} == {first.serial_number, second.serial_number}
    assert crl.get_revoked_certificate_by_serial_number(other.serial_number) is None
    capsys.readouterr()
    assert collector_cli.main(["ca", "revoke", "gw-9", "--dir", str(ca.directory)]) == 2
    assert "no certificate" in one_line_error(capsys)
    # Re-signing keeps the list and moves the next update forward.
    assert collector_cli.main(["ca", "crl", "--dir", str(ca.directory), "--crl-days", "400"]) == 0
    crl2 = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert {r.serial_number for r in crl2} == {first.serial_number, second.serial_number}
    assert crl2.next_update_utc > crl.next_update_utc


# --- one certificate per gateway id, bound to its identity key -------------------------------------------------


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real command line, as a technician runs it."""
    module = "edge_agent.cli" if argv[0] == "enroll" else "collector.cli"
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=REPO, timeout=60)


def one_line_failure(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def enrolled_gateway(tmp_path: Path, gateway_id: str) -> Path:
    d = tmp_path / gateway_id
    assert cli("enroll", "--gateway-id", gateway_id, "--dir", str(d)).returncode == 0
    return d


def identity_of(gw_dir: Path) -> ed25519.Ed25519PublicKey:
    return serialization.load_pem_private_key((gw_dir / "identity.key").read_bytes(), None).public_key()


def serial_in(stdout: str) -> int:
    return int(stdout.split("(serial ")[1].split(",")[0], 16)


def test_second_certificate_for_a_gateway_is_refused_and_replace_revokes_the_first(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert cli("ca", "init", "--dir", str(ca_dir)).returncode == 0
    gw = enrolled_gateway(tmp_path, "gw-0001")
    first = cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca_dir), "--out", str(tmp_path / "1.crt"))
    assert first.returncode == 0, first.stderr
    first_serial = serial_in(first.stdout)

    # The same CSR again (or any other CSR for gw-0001): refused, naming the gateway and the valid serial.
    err = one_line_failure(cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca_dir), "--out", str(tmp_path / "2.crt")))
    assert f"gw-0001 already has a valid certificate (serial {first_serial:x}," in err and "--replace" in err
    assert not (tmp_path / "2.crt").exists()
    assert len(DeviceCA(ca_dir).issued()) == 1

    # --replace: the new certificate, the old one revoked and in the re-signed CRL, in one command.
    second = cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca_dir), "--out", str(tmp_path / "2.crt"), "--replace")
    assert second.returncode == 0, second.stderr
    second_serial = serial_in(second.stdout)
    assert f"revoked the certificate(s) it replaces: {first_serial:x}" in second.stdout
    ca = DeviceCA(ca_dir)
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())
    assert {r.serial_number for r in crl} == {first_serial}
    index = ca.index()
    assert index.entries[first_serial].revoked_at is not None
    assert [e.serial for e in index.valid("gw-0001")] == [second_serial]

    # The index is derived data: deleted, it is rebuilt from issued/ and ca.crl, and the rule still holds.
    (ca_dir / "index.json").unlink()
    err = one_line_failure(cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca_dir)))
    assert f"(serial {second_serial:x}," in err

    # Once the gateway's certificates are revoked (ca revoke), a new one needs no --replace.
    assert cli("ca", "revoke", "gw-0001", "--dir", str(ca_dir)).returncode == 0
    third = cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca_dir), "--out", str(tmp_path / "3.crt"))
    assert third.returncode == 0, third.stderr
    assert "revoked the certificate" not in third.stdout


def test_certificate_carries_the_identity_key_fingerprint(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    DeviceCA.init(ca_dir)
    gw = enrolled_gateway(tmp_path, "gw-fp")
    proc = cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca_dir), "--out", str(tmp_path / "gw.crt"))
    assert proc.returncode == 0, proc.stderr
    fingerprint = hashlib.sha256(identity_of(gw).public_bytes_raw()).hexdigest()
    assert f"identity key sha256 {fingerprint}" in proc.stdout
    cert = x509.load_pem_x509_certificate((tmp_path / "gw.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [IDENTITY_URN_PREFIX + fingerprint]
    # openssl shows it to anyone looking at the certificate.
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "gw.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert f"URI:urn:citynerve:identity:{fingerprint}" in text
    # The CSR carries the proof as a non-critical extension under the project's OID.
    csr = x509.load_pem_x509_csr((gw / "tls.csr").read_bytes())
    ext = csr.extensions.get_extension_for_oid(x509.ObjectIdentifier(IDENTITY_PROOF_OID))
    assert not ext.critical and ext.value.value[4:36] == identity_of(gw).public_bytes_raw()
    assert DeviceCA(ca_dir).index().valid("gw-fp")[0].identity == fingerprint
    # A collector certificate has no identity key, and no SAN.
    collector = DeviceCA(ca_dir).sign(csr_with_cn("collector-1"), collector=True)
    with pytest.raises(x509.ExtensionNotFound):
        collector.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def csr_with_proof_from(proof_csr: bytes, cn: str) -> bytes:
    """A CSR for a new TLS key, carrying the identity proof copied out of another CSR."""
    ext = x509.load_pem_x509_csr(proof_csr).extensions.get_extension_for_oid(x509.ObjectIdentifier(IDENTITY_PROOF_OID))
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .add_extension(ext.value, critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_csr_without_or_with_a_wrong_identity_proof_is_refused(tmp_path: Path, ca: DeviceCA) -> None:
    gw = enrolled_gateway(tmp_path, "gw-1")
    # Made by hand with openssl from the gateway's own TLS key: no proof.
    subprocess.run(["openssl", "req", "-new", "-key", str(gw / "tls.key"), "-subj", "/CN=gw-1",
                    "-out", str(tmp_path / "openssl.csr")], check=True, capture_output=True)
    err = one_line_failure(cli("ca", "sign", str(tmp_path / "openssl.csr"), "--dir", str(ca.directory)))
    assert "carries no identity proof" in err and "edge-agent enroll --new-csr" in err

    # The proof of gw-1's CSR copied into a CSR for another TLS key: the identity key never signed that key.
    (tmp_path / "stolen.csr").write_bytes(csr_with_proof_from((gw / "tls.csr").read_bytes(), "gw-1"))
    err = one_line_failure(cli("ca", "sign", str(tmp_path / "stolen.csr"), "--dir", str(ca.directory)))
    assert "identity proof for gw-1 does not verify" in err

    # A proof made for gw-a, in a CSR for gw-b with the same TLS key: the proof names the gateway id too.
    identity, tls_key = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    proof = make_csr("gw-a", identity, tls_key).extensions.get_extension_for_oid(
        x509.ObjectIdentifier(IDENTITY_PROOF_OID)).value
    moved = (x509.CertificateSigningRequestBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-b")]))
             .add_extension(proof, critical=False).sign(tls_key, hashes.SHA256()))
    with pytest.raises(PkiError, match="does not verify"):
        ca.sign(moved.public_bytes(serialization.Encoding.PEM))

    # Malformed: the right OID, the wrong shape.
    junk = (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-c")]))
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(IDENTITY_PROOF_OID), b"\x30\x00"),
                           critical=False)
            .sign(tls_key, hashes.SHA256()))
    with pytest.raises(PkiError, match="malformed"):
        ca.sign(junk.public_bytes(serialization.Encoding.PEM))
    assert ca.issued() == []


def test_enroll_new_csr_gives_an_older_gateway_a_csr_with_its_proof(tmp_path: Path, ca: DeviceCA) -> None:
    gw = enrolled_gateway(tmp_path, "gw-old")
    keys = {n: (gw / n).read_bytes() for n in ("identity.key", "tls.key")}
    # What an enrollment before identity proofs left behind: a CSR without one.
    subprocess.run(["openssl", "req", "-new", "-key", str(gw / "tls.key"), "-subj", "/CN=gw-old",
                    "-out", str(gw / "tls.csr")], check=True, capture_output=True)
    one_line_failure(cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca.directory)))
    proc = cli("enroll", "--gateway-id", "gw-old", "--dir", str(gw), "--new-csr")
    assert proc.returncode == 0, proc.stderr
    assert "--replace" in proc.stdout and "PRIVATE" not in proc.stdout
    assert {n: (gw / n).read_bytes() for n in keys} == keys  # the keys are the gateway's, unchanged
    assert mode(gw / "tls.csr") == 0o600
    assert cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca.directory)).returncode == 0
    cert = x509.load_pem_x509_certificate((gw / "tls.crt").read_bytes())
    assert cert.public_key().public_numbers() == serialization.load_pem_private_key(
        keys["tls.key"], None).public_key().public_numbers()
    assert DeviceCA(ca.directory).index().valid("gw-old")[0].identity == identity_fingerprint(identity_of(gw))
    # Without keys there is nothing to make a CSR from.
    err = one_line_failure(cli("enroll", "--gateway-id", "gw-new", "--dir", str(tmp_path / "empty"), "--new-csr"))
    assert "identity.key does not exist" in err


def test_ca_sign_with_registry_refuses_an_identity_key_the_registry_does_not_hold(tmp_path: Path, ca: DeviceCA) -> None:
    reg = str(tmp_path / "gateways.db")
    gw = enrolled_gateway(tmp_path, "gw-r")
    sign = ("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca.directory), "--registry", reg)
    GatewayRegistry(reg, create=True).close()
    err = one_line_failure(cli(*sign))
    assert "gw-r is not in the registry" in err and "gateways add" in err

    # Registered with another key (someone else's, or the gateway's before a --force re-enrolment).
    _, other = identity_text()
    assert cli("gateways", "add", "gw-r", other, "--registry", reg).returncode == 0
    err = one_line_failure(cli(*sign))
    mine = (gw / "identity.pub").read_text().strip()
    assert f"the CSR's identity key {mine} is not the one the registry" in err and other in err

    assert cli("gateways", "add", "gw-r", str(gw / "identity.pub"), "--registry", reg, "--replace").returncode == 0
    assert cli("gateways", "revoke", "gw-r", "--registry", reg).returncode == 0
    assert "revoked in the registry" in one_line_failure(cli(*sign))

    assert cli("gateways", "add", "gw-r", str(gw / "identity.pub"), "--registry", reg, "--replace").returncode == 0
    proc = cli(*sign)
    assert proc.returncode == 0, proc.stderr
    assert ca.index().valid("gw-r")[0].identity == identity_fingerprint(identity_of(gw))
    # --registry is about gateways' identity keys; a collector certificate has none.
    (tmp_path / "c.csr").write_bytes(csr_with_cn("collector-9"))
    assert "--collector" in one_line_failure(cli("ca", "sign", str(tmp_path / "c.csr"), "--dir", str(ca.directory),
                                                 "--collector", "--registry", reg))


def test_gateways_add_with_ca_refuses_a_key_other_than_the_certified_one(tmp_path: Path, ca: DeviceCA) -> None:
    reg = str(tmp_path / "gateways.db")
    gw = enrolled_gateway(tmp_path, "gw-c")
    assert cli("ca", "sign", str(gw / "tls.csr"), "--dir", str(ca.directory)).returncode == 0
    serial = ca.index().valid("gw-c")[0].serial
    _, other = identity_text()
    err = one_line_failure(cli("gateways", "add", "gw-c", other, "--registry", reg, "--ca", str(ca.directory)))
    assert f"gateway gw-c has a valid certificate (serial {serial:x}) bound to another identity key" in err
    assert f"edge-collector ca revoke gw-c --dir {ca.directory}" in err
    assert not Path(reg).exists()  # a refused add leaves no registry behind
    # The certified key is accepted; so is another one once the certificate is revoked (re-enrolment).
    assert cli("gateways", "add", "gw-c", str(gw / "identity.pub"), "--registry", reg,
               "--ca", str(ca.directory)).returncode == 0
    assert cli("ca", "revoke", "gw-c", "--dir", str(ca.directory)).returncode == 0
    proc = cli("gateways", "add", "gw-c", other, "--registry", reg, "--ca", str(ca.directory), "--replace")
    assert proc.returncode == 0, proc.stderr
    # --ca must be a device CA.
    assert "is not a device CA" in one_line_failure(
        cli("gateways", "add", "gw-d", other, "--registry", reg, "--ca", str(tmp_path)))


def test_labkit_deployment_still_enrolls_with_the_real_commands(tmp_path: Path) -> None:
    from labkit import enrolled

    dep = enrolled.create(tmp_path / "dep", ["gw-lab-1", "gw-lab-2"])
    index = DeviceCA(dep.ca_dir).index()
    for gw in dep.gateways.values():
        cert = x509.load_pem_x509_certificate(gw.tls_cert.read_bytes())
        fingerprint = identity_fingerprint(identity_of(gw.dir))
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier) == [IDENTITY_URN_PREFIX + fingerprint]
        assert index.valid(gw.id)[0].identity == fingerprint


# --- the collector's keys --------------------------------------------------------------------------------------


def test_collector_keys_init_next_and_promote(tmp_path: Path, capsys) -> None:
    d = tmp_path / "keys"
    assert collector_cli.main(["keys", "init", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert mode(d / "collector.key") == 0o600
    private = serialization.load_pem_private_key((d / "collector.key").read_bytes(), None)
    assert isinstance(private, x25519.X25519PrivateKey)
    public = serialization.load_pem_public_key((d / "collector.pub").read_bytes())  # SPKI PEM for the agents
    raw = private.public_key().public_bytes_raw()
    assert public.public_bytes_raw() == raw
    kid = hashlib.sha256(raw).digest()[:8].hex()
    assert key_id(private.public_key()) == kid and f"key id: {kid}\n" in out

    assert collector_cli.main(["keys", "init", "--dir", str(d)]) == 2
    assert "keys init --next" in one_line_error(capsys)
    assert collector_cli.main(["keys", "init", "--dir", str(d), "--next"]) == 0
    next_kid = capsys.readouterr().out.split("key id: ")[1].split()[0]
    assert mode(d / "collector-next.key") == 0o600
    assert collector_cli.main(["keys", "init", "--dir", str(d), "--next"]) == 2
    one_line_error(capsys)
    assert set(load_private_keys(d)) == {kid, next_kid}  # the collector decrypts for both during a rotation

    assert collector_cli.main(["keys", "promote", "--dir", str(d)]) == 0
    capsys.readouterr()
    assert collector_cli.main(["keys", "show", "--dir", str(d)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in shown] == [["current", next_kid], ["retired", kid]]
    assert set(load_private_keys(d)) == {kid, next_kid}  # retired keys still decrypt until deleted
    assert collector_cli.main(["keys", "promote", "--dir", str(d)]) == 2
    assert "no rotation" in one_line_error(capsys)


# --- the gateway registry --------------------------------------------------------------------------------------


def identity_text() -> tuple[ed25519.Ed25519PublicKey, str]:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key, format_identity_key(key)


def test_registry_add_list_revoke(tmp_path: Path, capsys) -> None:
    reg_path = str(tmp_path / "gateways.db")
    key_a, text_a = identity_text()
    _, text_b = identity_text()
    assert collector_cli.main(["gateways", "add", "gw-a", text_a, "--registry", reg_path]) == 0
    (tmp_path / "identity.pub").write_text(text_b + "\n")  # a file written by enroll works too
    assert collector_cli.main(["gateways", "add", "gw-b", str(tmp_path / "identity.pub"), "--registry", reg_path]) == 0
    assert collector_cli.main(["gateways", "revoke", "gw-b", "--registry", reg_path]) == 0
    capsys.readouterr()
    assert collector_cli.main(["gateways", "list", "--registry", reg_path]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert rows == [["gw-a", "active", text_a], ["gw-b", "revoked", text_b]]

    reg = GatewayRegistry(reg_path)
    assert reg.lookup("gw-a").public_bytes_raw() == key_a.public_bytes_raw()
    assert reg.lookup("gw-b") is None and reg.lookup("gw-x") is None
    assert [reg.status(g) for g in ("gw-a", "gw-b", "gw-x")] == ["active", "revoked", "unknown"]
    assert [e.gateway_id for e in reg.list()] == ["gw-a", "gw-b"]
    assert reg.revoke("gw-b") is False  # already revoked
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("gw-a", identity_text()[1])
    new_key, new_text = identity_text()
    reg.add("gw-b", new_text, replace=True)  # re-enrolment
    assert reg.status("gw-b") == "active" and reg.lookup("gw-b").public_bytes_raw() == new_key.public_bytes_raw()
    reg.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["gateways", "add", "gw/1", "KEY"], "invalid gateway id"),
    (["gateways", "add", "collector-1", "KEY"], "reserved"),
    (["gateways", "add", "gw-1", "ed25519:AAAA"], "32 bytes"),
    (["gateways", "add", "gw-1", "ssh-ed25519 AAAA"], "ed25519:"),
    (["gateways", "add", "gw-1", "ed25519:not*base64"], "base64url"),
    (["gateways", "revoke", "gw-unknown"], "not registered"),
])
def test_registry_cli_errors_are_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    reg_path = tmp_path / "gateways.db"
    GatewayRegistry(reg_path, create=True).close()
    argv = [identity_text()[1] if a == "KEY" else a for a in argv]
    assert collector_cli.main([*argv, "--registry", str(reg_path)]) == 2
    assert message in one_line_error(capsys)


def test_registry_that_does_not_exist_is_an_error_not_an_empty_registry(tmp_path: Path, capsys) -> None:
    assert collector_cli.main(["gateways", "list", "--registry", str(tmp_path / "typo.db")]) == 2
    assert "no gateway registry" in one_line_error(capsys)
    assert not (tmp_path / "typo.db").exists()
    with pytest.raises(RegistryError):
        GatewayRegistry(tmp_path / "typo.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RegistryError, match="not a gateway registry"):
        GatewayRegistry(tmp_path / "junk.db")


def test_a_reader_sees_adds_and_revokes_by_another_instance_after_refresh(tmp_path: Path) -> None:
    path = tmp_path / "gateways.db"
    writer = GatewayRegistry(path, create=True)
    reader = GatewayRegistry(path)
    assert reader.refresh_if_changed() is False
    key, text = identity_text()
    writer.add("gw-1", text)
    assert reader.lookup("gw-1") is None  # the in-memory copy until a refresh
    assert reader.refresh_if_changed() is True
    assert reader.lookup("gw-1").public_bytes_raw() == key.public_bytes_raw()
    assert reader.refresh_if_changed() is False
    writer.revoke("gw-1")
    assert reader.refresh_if_changed() is True
    assert reader.lookup("gw-1") is None and reader.status("gw-1") == "revoked"
    # Refreshing when nothing changed is cheap: no re-read, a stat and a pragma.
    t0 = time.perf_counter()
    for _ in range(1000):
        reader.refresh_if_changed()
    assert (time.perf_counter() - t0) / 1000 < 0.001
    writer.close()
    reader.close()


def test_a_reader_sees_a_revoke_by_another_process_and_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "gateways.db"
    reg = GatewayRegistry(path, create=True)
    reg.add("gw-1", identity_text()[1])
    reader = GatewayRegistry(path)
    assert reader.status("gw-1") == "active"
    proc = subprocess.run([sys.executable, "-m", "collector.cli", "gateways", "revoke", "gw-1", "--registry", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert reader.refresh_if_changed() is True and reader.status("gw-1") == "revoked"

    # A backup restored through SQLite (what `sqlite3 FILE ".restore BACKUP"` does) is picked up too.
    backup = GatewayRegistry(tmp_path / "backup.db", create=True)
    backup.add("gw-2", identity_text()[1])
    backup.close()
    with sqlite3.connect(tmp_path / "backup.db") as src, sqlite3.connect(path) as dst:
        src.backup(dst)
    assert reader.refresh_if_changed() is True
    assert reader.status("gw-2") == "active" and reader.status("gw-1") == "unknown"
    reader.close()
    reg.close()


def test_cli_errors_are_one_line_without_traceback_as_processes(tmp_path: Path) -> None:
    (tmp_path / "bad.csr").write_text("-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n")
    DeviceCA.init(tmp_path / "ca")
    cases = [
        ["collector.cli", "gateways", "list", "--registry", str(tmp_path / "missing.db")],
        ["collector.cli", "ca", "sign", str(tmp_path / "bad.csr"), "--dir", str(tmp_path / "ca")],
        ["collector.cli", "ca", "sign", str(tmp_path / "missing.csr"), "--dir", str(tmp_path / "ca")],
        ["collector.cli", "ca", "sign", str(tmp_path / "bad.csr"), "--dir", str(tmp_path / "not-a-ca")],
        ["collector.cli", "keys", "show", "--dir", str(tmp_path / "nokeys")],
        ["edge_agent.cli", "enroll", "--gateway-id", "a+b", "--dir", str(tmp_path / "gw")],
    ]
    for argv in cases:
        proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=REPO, timeout=30)
        assert proc.returncode != 0, argv
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr


# --- the certificate works on the shipped broker ---------------------------------------------------------------


@pytest.mark.integration
def test_enrolled_gateway_certificate_works_on_the_secure_broker(tmp_path: Path, capsys) -> None:
    from labkit.pki import LabCA
    from labkit.secure_broker import SecureBroker, TestClient

    ca_dir, collector_ca_dir, gw = tmp_path / "device-ca", tmp_path / "collector-ca", tmp_path / "gw"
    assert collector_cli.main(["ca", "init", "--dir", str(ca_dir)]) == 0
    assert collector_cli.main(["ca", "init", "--dir", str(collector_ca_dir)]) == 0
    assert agent_cli.main(["enroll", "--gateway-id", "gw-e2e", "--dir", str(gw)]) == 0
    assert collector_cli.main(["ca", "sign", str(gw / "tls.csr"), "--dir", str(ca_dir)]) == 0
    collector_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "collector.csr").write_bytes(
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "collector-1")]))
        .sign(collector_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "collector.key").write_bytes(collector_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert collector_cli.main(["ca", "sign", str(tmp_path / "collector.csr"), "--dir", str(collector_ca_dir),
                               "--collector"]) == 0

    with SecureBroker(tmp_path / "broker", device_ca_dir=ca_dir, collector_ca_dir=collector_ca_dir,
                      server_ca=LabCA(tmp_path / "lab")) as broker:
        collector = TestClient(broker.collector_port, broker.ca_file, tmp_path / "collector.crt",
                               tmp_path / "collector.key")
        assert collector.connect() == "connected"
        collector.subscribe(broker.gateway_mount + "citynerve/v1/+/up")
        gateway = TestClient(broker.port, broker.ca_file, gw / "tls.crt", gw / "tls.key", client_id="agent")
        assert gateway.connect() == "connected", broker.tail_log()
        assert gateway.publish("citynerve/v1/gw-e2e/up", b"hello") in (0, 0x10)
        collector.wait_for(lambda msgs: [(m.topic, m.payload) for m in msgs]
                           == [(broker.gateway_mount + "citynerve/v1/gw-e2e/up", b"hello")])
        assert "u'gw-e2e'" in broker.log_text()  # the CN became the username
        gateway.close()
        collector.close()
