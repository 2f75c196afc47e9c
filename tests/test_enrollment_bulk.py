"""Enrollment at fleet size: `gateways import`, `ca sign-bulk`, and a registry whose readers refresh only what
changed (schema v2). The costs are measured in bench/enrollment.py, not here."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from collector import cli as collector_cli
from collector.pki import DeviceCA, PkiError
from collector.registry import GatewayRegistry, RegistryError
from edge_agent.enroll import format_identity_key, make_csr


def _gateway(gid: str) -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    identity = ed25519.Ed25519PrivateKey.generate()
    csr = make_csr(gid, identity, ec.generate_private_key(ec.SECP256R1()))
    return identity, csr.public_bytes(serialization.Encoding.PEM)


def test_import_csv_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = {f"gw-{i}": ed25519.Ed25519PrivateKey.generate().public_key() for i in range(5)}
    csv_file = tmp_path / "fleet.csv"
    csv_file.write_text("id,public_key,site\n" + "".join(f"{g},{format_identity_key(k)},north\n"
                                                          for g, k in list(keys.items())[:3]))
    json_file = tmp_path / "more.json"
    json_file.write_text(json.dumps([{"id": g, "public_key": format_identity_key(k)} for g, k in
                                     list(keys.items())[3:]]))
    reg = tmp_path / "gateways.db"
    assert collector_cli.main(["gateways", "import", str(csv_file), "--registry", str(reg)]) == 0
    assert collector_cli.main(["gateways", "import", str(json_file), "--registry", str(reg)]) == 0
    assert "2 gateway(s) registered" in capsys.readouterr().out
    with GatewayRegistry(reg) as r:
        assert {e.gateway_id for e in r.list()} == set(keys)
        assert r.lookup("gw-4").public_bytes_raw() == keys["gw-4"].public_bytes_raw()
    # again: refused as a whole, naming what exists; --replace re-enrolls them
    assert collector_cli.main(["gateways", "import", str(csv_file), "--registry", str(reg)]) == 2
    assert "already registered: gw-0 (active), gw-1 (active), gw-2 (active)" in capsys.readouterr().err
    assert collector_cli.main(["gateways", "import", str(csv_file), "--registry", str(reg), "--replace"]) == 0


@pytest.mark.parametrize(("content", "message"), [
    ("id,key\ngw-1,x\n", "line 1: expected a header with the columns id,public_key"),
    ("id,public_key\ngw-1,ed25519:AAAA\n", "line 2: an Ed25519 public key has 32 bytes, got 3"),
    ("id,public_key\nbad id,ed25519:x\n", "line 2: invalid gateway id 'bad id'"),
    ("id,public_key\ncollector-9,ed25519:x\n", "line 2: 'collector-9': names starting with 'collector' are reserved"),
    ('[{"id": "gw-1"}]', r'\[0\]: expected {"id": "...", "public_key": "ed25519:..."}'),
    ("[1,", "line 1 column 4: not JSON"),
    ("id,public_key\n", "no gateways in it"),
])
def test_import_errors_name_file_and_line_and_write_nothing(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / ("fleet.json" if content.startswith("[") else "fleet.csv")
    f.write_text(content)
    reg = tmp_path / "gateways.db"
    with pytest.raises(RegistryError, match=message):
        from collector.registry import read_import
        read_import(f)
    assert collector_cli.main(["gateways", "import", str(f), "--registry", str(reg)]) == 2
    assert not reg.exists()  # nothing created for a refused file


def test_a_batch_with_one_id_twice_is_refused_whole(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    with GatewayRegistry(tmp_path / "r.db", create=True) as reg:
        with pytest.raises(RegistryError, match="gw-1 appears twice"):
            reg.add_many([("gw-1", key), ("gw-2", key), ("gw-1", key)])
        assert reg.count() == 0


def test_sign_bulk_issues_the_good_and_names_the_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, csr_dir, out = tmp_path / "ca", tmp_path / "csrs", tmp_path / "certs"
    csr_dir.mkdir()
    out.mkdir()
    DeviceCA.init(ca_dir)
    registered = {}
    for i in range(6):
        identity, csr = _gateway(f"gw-{i}")
        (csr_dir / f"gw-{i}.csr").write_bytes(csr)
        registered[f"gw-{i}"] = identity.public_key()
    registered["gw-5"] = ed25519.Ed25519PrivateKey.generate().public_key()  # registry holds another key for gw-5
    (csr_dir / "junk.csr").write_bytes(b"not a csr")
    reg = tmp_path / "gateways.db"
    with GatewayRegistry(reg, create=True) as r:
        r.add_many(list(registered.items()))
    code = collector_cli.main(["ca", "sign-bulk", str(csr_dir), "--dir", str(ca_dir), "--out", str(out),
                               "--registry", str(reg)])
    captured = capsys.readouterr()
    assert code == 1
    assert "5 certificate(s) issued" in captured.out and "2 CSR(s) refused" in captured.out
    assert "gw-5.csr: refused: the CSR's identity key" in captured.err
    assert "junk.csr: refused: not a certificate signing request" in captured.err
    certs = sorted(p.stem for p in out.glob("*.crt"))
    assert certs == ["gw-0", "gw-1", "gw-2", "gw-3", "gw-4"]
    cert = x509.load_pem_x509_certificate((out / "gw-3.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=gw-3"
    index = DeviceCA(ca_dir).index()
    assert sorted(e.cn for e in index.entries.values()) == certs
    # a second run: each already has a valid certificate; --replace revokes and replaces them in one CRL
    assert collector_cli.main(["ca", "sign-bulk", str(csr_dir), "--dir", str(ca_dir), "--out", str(out),
                               "--registry", str(reg)]) == 1
    assert "already has a valid certificate" in capsys.readouterr().err
    assert collector_cli.main(["ca", "sign-bulk", str(csr_dir), "--dir", str(ca_dir), "--out", str(out),
                               "--registry", str(reg), "--replace"]) == 1
    assert "5 replaced certificate(s) revoked" in capsys.readouterr().out
    assert len(DeviceCA(ca_dir).revoked_serials()) == 5


def test_issue_many_refuses_a_second_csr_for_one_gateway(tmp_path: Path) -> None:
    ca = DeviceCA.init(tmp_path / "ca")
    _, first = _gateway("gw-1")
    _, second = _gateway("gw-1")
    results = ca.issue_many([first, second])
    assert not isinstance(results[0], PkiError)
    assert isinstance(results[1], PkiError) and "second CSR" in str(results[1])


def test_readers_see_only_changes_and_the_same_key_object(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    keys = [ed25519.Ed25519PrivateKey.generate().public_key() for _ in range(3)]
    with GatewayRegistry(path, create=True) as w:
        w.add_many([("gw-0", keys[0]), ("gw-1", keys[1])])
    reader = GatewayRegistry(path)
    k0 = reader.lookup("gw-0")
    assert k0 is reader.lookup("gw-0")  # one object per key: the Opener's session cache is keyed on it
    with GatewayRegistry(path) as w:
        w.revoke("gw-1")
        w.add("gw-2", keys[2])
    assert reader.refresh_if_changed() is True
    assert reader.lookup("gw-1") is None and reader.lookup("gw-2") is not None
    assert reader.lookup("gw-0") is k0  # untouched row, same object
    with GatewayRegistry(path) as w:
        w.add("gw-0", keys[2], replace=True)
    assert reader.refresh_if_changed() is True
    assert reader.lookup("gw-0") is not k0 and reader.lookup("gw-0").public_bytes_raw() == keys[2].public_bytes_raw()
    assert reader.refresh_if_changed() is False
    reader.close()


def test_a_version_1_registry_is_migrated_and_keeps_its_gateways(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE gateways (id TEXT PRIMARY KEY, public_key BLOB NOT NULL CHECK (length(public_key) = 32),"
                 " status TEXT NOT NULL CHECK (status IN ('active', 'revoked')), added_at TEXT NOT NULL, revoked_at TEXT)")
    conn.execute("INSERT INTO gateways VALUES ('gw-old', ?, 'active', '2025-01-01T00:00:00Z', NULL)",
                 (key.public_bytes_raw(),))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    path.chmod(0o600)
    reader = GatewayRegistry(path)
    assert reader.lookup("gw-old").public_bytes_raw() == key.public_bytes_raw()
    with GatewayRegistry(path) as w:
        w.revoke("gw-old")
    assert reader.refresh_if_changed() and reader.status("gw-old") == "revoked"
    reader.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
