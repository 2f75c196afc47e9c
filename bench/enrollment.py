"""Enrollment at fleet size (issue 14 part 5): what registering and certifying gateways costs as the fleet grows.

Measured in one run, on this machine, each against its own baseline:
1. `gateways add` (the CLI process, as an operator runs it) into a registry of 10 entries vs one of 10,000:
   the ratio should be ~1 (it used to grow: ~3 ms at 1,000 entries, ~32 ms per gateway beyond 5,000);
2. bulk enrollment of N gateways (default 10,000): `gateways import` of their identity keys, then `ca sign-bulk` of
   their CSRs against the registry - wall time (goal: under a minute for 10,000), vs signing the same number of
   certificates with the bare `cryptography` calls (the floor);
3. the collector's side at 100,000 entries: loading the registry at start-up, one lookup, and the refresh after
   one gateway is revoked, vs the same at 1,000 entries.

    .venv/bin/python -m bench.enrollment [--gateways 10000] [--registry-size 100000]

CSRs are made in-process with edge_agent.enroll.make_csr (what `edge-agent enroll` runs on each gateway; not part
of the measured time: on a real fleet each gateway makes its own).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from collector.pki import DeviceCA
from collector.registry import GatewayRegistry
from edge_agent.enroll import make_csr


def _key_text(key: ed25519.Ed25519PublicKey) -> str:
    return "ed25519:" + base64.urlsafe_b64encode(key.public_bytes_raw()).rstrip(b"=").decode()


def _fill(path: Path, n: int, prefix: str = "fill") -> None:
    rows = [(f"{prefix}-{i:06d}", os.urandom(32)) for i in range(n)]
    with GatewayRegistry(path, create=True) as reg:
        reg.add_many(rows)


def _cli_add_ms(registry: Path, rounds: int, tag: str) -> float:
    times = []
    for i in range(rounds):
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "collector.cli", "gateways", "add", f"{tag}-{i:04d}", _key_text(key),
                        "--registry", str(registry)], check=True, capture_output=True)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _api_add_ms(registry: Path, rounds: int, tag: str) -> float:
    times = []
    with GatewayRegistry(registry) as reg:
        for i in range(rounds):
            key = ed25519.Ed25519PrivateKey.generate().public_key()
            t0 = time.perf_counter()
            reg.add(f"{tag}-{i:04d}", key)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.enrollment")
    p.add_argument("--gateways", type=int, default=10_000)
    p.add_argument("--registry-size", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-enroll-") as tmp:
        root = Path(tmp)

        # 1. one `gateways add` at 10 vs 10,000 entries
        small, large = root / "small.db", root / "large.db"
        _fill(small, 10)
        _fill(large, 10_000)
        # interleaved, so that the machine's load drifting during the run weighs on both sides alike
        cli: dict[Path, list[float]] = {small: [], large: []}
        api: dict[Path, list[float]] = {small: [], large: []}
        for r in range(args.rounds):
            for path in (small, large):
                cli[path].append(_cli_add_ms(path, 1, f"cli{r}"))
                api[path].append(_api_add_ms(path, 20, f"api{r}"))
        cli_small, cli_large = statistics.median(cli[small]), statistics.median(cli[large])
        api_small, api_large = statistics.median(api[small]), statistics.median(api[large])
        print(f"gateways add (CLI process, median of {args.rounds} interleaved): {cli_small:.0f} ms at 10 entries, "
              f"{cli_large:.0f} ms at 10,000: ratio {cli_large / cli_small:.2f}")
        print(f"GatewayRegistry.add (in-process, median of {args.rounds} x 20): {api_small:.2f} ms at 10 entries, "
              f"{api_large:.2f} ms at 10,000: ratio {api_large / api_small:.2f}")

        # 2. bulk: N identity keys imported, N CSRs signed against the registry
        n = args.gateways
        t0 = time.perf_counter()
        csr_dir = root / "csrs"
        csr_dir.mkdir()
        lines = ["id,public_key"]
        for i in range(n):
            gid = f"gw-{i:06d}"
            identity = ed25519.Ed25519PrivateKey.generate()
            tls = ec.generate_private_key(ec.SECP256R1())
            lines.append(f"{gid},{_key_text(identity.public_key())}")
            (csr_dir / f"{gid}.csr").write_bytes(make_csr(gid, identity, tls).public_bytes(serialization.Encoding.PEM))
        (root / "fleet.csv").write_text("\n".join(lines) + "\n")
        made = time.perf_counter() - t0
        ca_dir, out = root / "ca", root / "certs"
        out.mkdir()
        DeviceCA.init(ca_dir)
        fleet_db = root / "fleet.db"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "collector.cli", "gateways", "import", str(root / "fleet.csv"),
                        "--registry", str(fleet_db)], check=True, capture_output=True)
        imported = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "collector.cli", "ca", "sign-bulk", str(csr_dir), "--dir", str(ca_dir),
                        "--out", str(out), "--registry", str(fleet_db)], check=True, capture_output=True)
        signed = time.perf_counter() - t0
        certs = len(list(out.glob("*.crt")))
        # the floor: the same number of certificates signed with bare cryptography calls, nothing checked or written
        ca = DeviceCA(ca_dir)
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        t0 = time.perf_counter()
        now = dt.datetime.now(dt.UTC)
        for i in range(n):
            (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"f{i}")]))
             .issuer_name(ca.cert.subject).public_key(key).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(ca.key, hashes.SHA256()))
        floor = time.perf_counter() - t0
        print(f"bulk enrollment of {n:,} gateways: gateways import {imported:.1f} s + ca sign-bulk {signed:.1f} s = "
              f"{imported + signed:.1f} s ({certs:,} certificates; goal < 60 s); bare signing floor {floor:.1f} s, "
              f"sign-bulk / floor = {signed / floor:.2f}x (CSRs made beforehand in {made:.0f} s, not counted)")

        # 3. the collector's side: load, lookup, refresh after one revoke - 100,000 entries vs 1,000
        for size in (1_000, args.registry_size):
            path = root / f"r{size}.db"
            _fill(path, size)
            t0 = time.perf_counter()
            reader = GatewayRegistry(path)
            reader.refresh_if_changed()  # the first read: what the collector does at start-up
            loaded = time.perf_counter() - t0
            t0 = time.perf_counter()
            assert reader.lookup("fill-000500") is not None
            looked = time.perf_counter() - t0
            with GatewayRegistry(path) as writer:
                writer.revoke("fill-000500")
            t0 = time.perf_counter()
            assert reader.refresh_if_changed() and reader.lookup("fill-000500") is None
            refreshed = time.perf_counter() - t0
            reader.close()
            print(f"collector registry at {size:,} entries: start-up load {loaded * 1000:.0f} ms, first lookup "
                  f"{looked * 1e6:.0f} us, refresh after one revoke {refreshed * 1000:.2f} ms")


if __name__ == "__main__":
    main()
