"""Local files and secrets: everything both programs keep for themselves is 0600 (files) / 0700 (directories)
whatever the umask, older looser files are tightened and said so once, and no message shows a secret.

Every process here runs with umask 000, the worst a shell or a service manager can hand over: a file that
does not set its mode explicitly comes out world-readable (or world-writable) and fails the checks.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A program of this repository (python -m ...) with umask 000."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=60, umask=0)
    if check:
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    return proc


def start(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, umask=0)


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, then everything the process wrote (stdout + stderr)."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return out + err


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited ({proc.returncode}) before {path} appeared: {out}{err}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def not_private(root: Path) -> dict[str, str]:
    """Every file under `root` that is not 0600 and every directory that is not 0700 (root itself excluded)."""
    wrong = {}
    for path in sorted(root.rglob("*")):
        want = 0o700 if path.is_dir() else 0o600
        if mode(path) != want:
            wrong[str(path.relative_to(root))] = f"{mode(path):04o}"
    return wrong


# --- the command-line tools ----------------------------------------------------------------------------------


def test_enrollment_commands_create_only_private_files(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ca, keys, gw, reg = work / "device-ca", work / "collector-keys", work / "gw" / "pki", work / "state" / "gateways.db"
    run("-m", "collector.cli", "ca", "init", "--dir", str(ca))
    run("-m", "collector.cli", "keys", "init", "--dir", str(keys))
    run("-m", "collector.cli", "keys", "init", "--dir", str(keys), "--next")
    run("-m", "collector.cli", "keys", "promote", "--dir", str(keys))  # makes retired/
    run("-m", "edge_agent.cli", "enroll", "--gateway-id", "gw-0001", "--dir", str(gw))  # gw/ and gw/pki/ made
    run("-m", "collector.cli", "gateways", "add", "gw-0001", str(gw / "identity.pub"), "--registry", str(reg),
        "--ca", str(ca))
    run("-m", "collector.cli", "ca", "sign", str(gw / "tls.csr"), "--dir", str(ca), "--registry", str(reg),
        "--out", str(gw / "tls.crt"))
    run("-m", "collector.cli", "ca", "sign", str(gw / "tls.csr"), "--dir", str(ca), "--replace")  # CRL, index
    run("-m", "collector.cli", "ca", "crl", "--dir", str(ca))
    run("-m", "edge_agent.cli", "enroll", "--gateway-id", "gw-0001", "--dir", str(gw), "--force")
    run("-m", "edge_agent.cli", "enroll", "--gateway-id", "gw-0001", "--dir", str(gw), "--new-csr")

    made = {str(p.relative_to(work)) for p in work.rglob("*")}
    for expected in ("device-ca/ca.key", "device-ca/ca.crt", "device-ca/ca.crl", "device-ca/index.json",
                     "device-ca/issued", "collector-keys/collector.key", "collector-keys/retired",
                     "gw/pki/identity.key", "gw/pki/tls.key", "gw/pki/tls.csr", "gw/pki/tls.crt",
                     "state/gateways.db"):
        assert expected in made, sorted(made)
    assert not_private(work) == {}
    assert not [p for p in made if p.endswith(".tmp")]


def test_operator_ca_and_audit_log_are_private(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ca, home, log = work / "operator-ca", work / "alice", work / "state" / "audit.log"
    run("-m", "collector.cli", "operators", "init", "--dir", str(ca))
    run("-m", "collector.cli", "operators", "keygen", "alice", "--out", str(home))
    run("-m", "collector.cli", "operators", "add", "alice", "--dir", str(ca), "--public", str(home / "alice.pub"),
        "--role", "operator", "--gateways", "*")
    run("-m", "collector.cli", "operators", "add", "bob", "--dir", str(ca), "--role", "engineer", "--gateways", "*",
        "--out", str(home))
    run("-m", "collector.cli", "operators", "revoke", "alice", "--dir", str(ca), "--out", str(work / "copy.crl"))
    run("-m", "collector.cli", "operators", "crl", "--dir", str(ca))
    run("-c", "import sys; from collector.audit import AuditLog; AuditLog(sys.argv[1]).append({'a': 1})", str(log))
    made = {str(p.relative_to(work)) for p in work.rglob("*")}
    for expected in ("operator-ca/operator-ca.key", "operator-ca/operator-ca.pub", "operator-ca/operators.crl",
                     "operator-ca/index.json", "operator-ca/issued/1.cert", "alice/alice.key", "alice/alice.cert",
                     "alice/bob.key", "copy.crl", "state/audit.log", "state/audit.log.head", "state/audit.log.lock"):
        assert expected in made, sorted(made)
    assert not_private(work) == {}


def test_registry_wal_and_shm_are_private_while_it_is_open(tmp_path: Path) -> None:
    # SQLite gives -wal and -shm the database's own permissions: a 0600 database, 0600 companions.
    code = (
        "import os, stat, sys\n"
        "from collector.registry import GatewayRegistry\n"
        "from cryptography.hazmat.primitives.asymmetric import ed25519\n"
        "reg = GatewayRegistry(sys.argv[1], create=True)\n"
        "reg.add('gw-1', ed25519.Ed25519PrivateKey.generate().public_key())\n"
        "for s in ('', '-wal', '-shm'):\n"
        "    print(s or 'db', oct(stat.S_IMODE(os.stat(sys.argv[1] + s).st_mode)))\n"
    )
    proc = run("-c", code, str(tmp_path / "new" / "gateways.db"))
    assert proc.stdout.split() == ["db", "0o600", "-wal", "0o600", "-shm", "0o600"]
    assert mode(tmp_path / "new") == 0o700


# --- the running programs ------------------------------------------------------------------------------------


AGENT_TOML = """
[gateway]
id = "gw-files"
state_dir = "{state}"

[mqtt]
host = "127.0.0.1"
port = {port}
tls = false
username = "gw-files"
password = "mqtt-secret-agent-1234"
"""


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_agent_run_creates_a_private_state_dir_and_outbox(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "agent.toml").write_text(AGENT_TOML.format(state=state, port=closed_port()))
    agent = start("-m", "edge_agent.cli", "run", str(tmp_path / "agent.toml"))
    try:
        wait_for(state / "outbox.sqlite3-shm", agent)
        time.sleep(0.3)  # a cycle or two
        assert {p.name for p in state.iterdir()} >= {"outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3-shm"}
        assert mode(state) == 0o700
        assert not_private(state) == {}
    finally:
        output = stop(agent)
    assert "mqtt-secret-agent-1234" not in output


def test_agent_tightens_an_older_looser_state_dir_and_outbox_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    outbox = state / "outbox.sqlite3"
    with sqlite3.connect(outbox) as db:  # an outbox from before: SQLite's own 0644
        db.execute("PRAGMA journal_mode=WAL")
    os.chmod(outbox, 0o644)
    (state / "outbox.sqlite3-wal").write_bytes(b"")
    os.chmod(state / "outbox.sqlite3-wal", 0o666)
    (tmp_path / "agent.toml").write_text(AGENT_TOML.format(state=state, port=closed_port()))

    agent = start("-m", "edge_agent.cli", "run", str(tmp_path / "agent.toml"))
    try:
        wait_for(state / "outbox.sqlite3-shm", agent)
        time.sleep(0.3)
        assert not_private(state) == {} and mode(state) == 0o700
    finally:
        output = stop(agent)
    tightened = [line for line in output.splitlines() if "more open than" in line]
    assert len(tightened) == 3, output  # the directory, the database, its -wal: one line each
    assert any(f"{state} had mode 0755, more open than 0700: set to 0700" in line for line in tightened)
    assert any(f"{outbox} had mode 0644" in line for line in tightened)


COLLECTOR_TOML = """
[mqtt]
host = "127.0.0.1"
port = {port}
tls = false
username = "collector-1"
password = "mqtt-secret-collector-5678"

[influx]
url = "http://127.0.0.1:{influx_port}"
username = "admin"
password = "influx-secret-9012"

[quarantine]
path = "{quarantine}"

[inventory]
path = "{inventory}"
"""


def test_collector_run_creates_a_private_quarantine_and_logs_no_secret(tmp_path: Path) -> None:
    quarantine = tmp_path / "state" / "quarantine" / "quarantine.db"
    inventory = tmp_path / "state" / "inventory" / "inventory.db"
    (tmp_path / "collector.toml").write_text(COLLECTOR_TOML.format(
        port=closed_port(), influx_port=closed_port(), quarantine=quarantine, inventory=inventory))
    collector = start("-m", "collector.cli", "run", str(tmp_path / "collector.toml"))
    try:
        wait_for(Path(f"{quarantine}-shm"), collector)
        wait_for(Path(f"{inventory}-shm"), collector)
        # state/, quarantine/ and inventory/ made 0700, the databases and their -wal/-shm 0600
        assert not_private(tmp_path / "state") == {}
    finally:
        output = stop(collector)
    assert "cannot reach MQTT broker" in output  # it did run, and said what went wrong ...
    for secret in ("mqtt-secret-collector-5678", "influx-secret-9012"):
        assert secret not in output  # ... without a password


def test_quarantine_list_tightens_an_older_looser_database(tmp_path: Path) -> None:
    from collector.quarantine import Quarantine

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    path = shared / "quarantine.db"
    Quarantine(path).close()
    os.chmod(path, 0o644)
    (tmp_path / "collector.toml").write_text(
        COLLECTOR_TOML.format(port=closed_port(), influx_port=closed_port(), quarantine=path,
                              inventory=shared / "inventory.db"))
    proc = run("-m", "collector.cli", "quarantine", "list", str(tmp_path / "collector.toml"))
    assert mode(path) == 0o600
    assert f"{path} had mode 0644, more open than 0600: set to 0600" in proc.stderr
    assert mode(shared) == 0o755  # a directory that was there already, holding the file, is not ours to change


def test_ca_key_made_looser_by_hand_is_tightened_when_the_ca_is_used(tmp_path: Path) -> None:
    run("-m", "collector.cli", "ca", "init", "--dir", str(tmp_path / "ca"))
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    os.chmod(tmp_path / "ca", 0o755)
    proc = run("-m", "collector.cli", "ca", "crl", "--dir", str(tmp_path / "ca"))
    assert not_private(tmp_path) == {}
    assert proc.stderr.count("more open than") == 2, proc.stderr  # the directory and the key, once each
