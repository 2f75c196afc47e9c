"""An enrolled deployment in a directory, made with the real command-line tools as a technician would:

    edge-collector ca init            the device CA (the broker's gateways' listener trusts it)
    edge-collector ca init            the collector CA (the broker's collectors' listener trusts it)
    edge-collector keys init          the collector's X25519 sealing key
    edge-agent enroll                 per gateway: identity key, TLS key, CSR (with the identity proof) - made
                                      "on the gateway"
    edge-collector gateways add --ca  per gateway: its identity key in the registry (checked against the CA)
    edge-collector ca sign --registry per gateway: its client certificate (CN = gateway id), bound to the
                                      identity key the registry holds
    edge-collector ca sign --collector  the collector instance's certificate (CN collector-1), by the collector CA

Used by the security tests and the demo, so both run what docs/enrollment.md tells a technician to run.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from wire.files import write_private


def _run(module: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass
class GatewayFiles:
    id: str
    dir: Path

    @property
    def identity_key(self) -> Path:
        return self.dir / "identity.key"

    @property
    def tls_cert(self) -> Path:
        return self.dir / "tls.crt"

    @property
    def tls_key(self) -> Path:
        return self.dir / "tls.key"


@dataclass
class Deployment:
    root: Path
    ca_dir: Path
    keys_dir: Path
    registry: Path
    collector_cert: Path
    collector_key: Path
    collector_ca_dir: Path  # signs the collectors' certificates only (ca sign --collector)
    gateways: dict[str, GatewayFiles] = field(default_factory=dict)

    @property
    def collector_pub(self) -> Path:
        return self.keys_dir / "collector.pub"

    def enroll(self, gateway_id: str, register: bool = True) -> GatewayFiles:
        gw = GatewayFiles(gateway_id, self.root / "gateways" / gateway_id)
        _run("edge_agent.cli", "enroll", "--gateway-id", gateway_id, "--dir", str(gw.dir))
        # The order of docs/enrollment.md: register the identity key, then sign against the registry.
        sign = ["ca", "sign", str(gw.dir / "tls.csr"), "--dir", str(self.ca_dir), "--out", str(gw.tls_cert)]
        if register:
            _run("collector.cli", "gateways", "add", gateway_id, str(gw.dir / "identity.pub"),
                 "--registry", str(self.registry), "--ca", str(self.ca_dir))
            sign += ["--registry", str(self.registry)]
        _run("collector.cli", *sign)
        self.gateways[gateway_id] = gw
        return gw

    def enroll_many(self, gateway_ids: list[str]) -> list[GatewayFiles]:
        """Bulk enrollment (docs/enrollment.md, issue 14): each gateway's keys and CSR made as `edge-agent enroll`
        makes them on the gateway (edge_agent.enroll.make_csr), the identity keys registered in one transaction
        (`gateways import` = GatewayRegistry.add_many) and the CSRs signed against the registry under one lock
        (`ca sign-bulk` = DeviceCA.issue_many). In-process: 10,000 gateways take seconds, not the minutes that
        three CLI processes per gateway would."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from collector.pki import DeviceCA, PkiError
        from collector.registry import GatewayRegistry
        from edge_agent.enroll import make_csr

        pem = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        made, keys, csrs = [], [], []
        for gateway_id in gateway_ids:
            gw = GatewayFiles(gateway_id, self.root / "gateways" / gateway_id)
            gw.dir.mkdir(parents=True, exist_ok=True)
            identity = ed25519.Ed25519PrivateKey.generate()
            tls_key = ec.generate_private_key(ec.SECP256R1())
            write_private(gw.identity_key, identity.private_bytes(*pem), durable=False)
            write_private(gw.tls_key, tls_key.private_bytes(*pem), durable=False)
            made.append(gw)
            keys.append((gateway_id, identity.public_key()))
            csrs.append(make_csr(gateway_id, identity, tls_key).public_bytes(serialization.Encoding.PEM))
        with GatewayRegistry(self.registry, create=True) as registry:
            registry.add_many(keys)
        issued = DeviceCA(self.ca_dir).issue_many(csrs, registry=self.registry)
        for gw, result in zip(made, issued, strict=True):
            if isinstance(result, PkiError):
                raise RuntimeError(f"ca sign-bulk refused {gw.id}: {result}")
            gw.tls_cert.write_bytes(result.cert.public_bytes(serialization.Encoding.PEM))
            self.gateways[gw.id] = gw
        return made

    def revoke(self, gateway_id: str) -> None:
        _run("collector.cli", "gateways", "revoke", gateway_id, "--registry", str(self.registry))


def collector_certificate(root: Path, ca_dir: Path, name: str) -> tuple[Path, Path]:
    """A collector instance's TLS key and certificate (CN `name`) signed by the CA in `ca_dir` - the collector
    CA (`Deployment.collector_ca_dir`) for the broker's collectors' listener; production makes the CSR with
    openssl."""
    key = ec.generate_private_key(ec.SECP256R1())
    collector_name = name
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, collector_name)]))
           .sign(key, hashes.SHA256()))
    collector_key = root / f"{collector_name}.key"
    write_private(collector_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    csr_path = root / f"{collector_name}.csr"
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    collector_cert = root / f"{collector_name}.crt"
    _run("collector.cli", "ca", "sign", str(csr_path), "--dir", str(ca_dir), "--collector", "--out", str(collector_cert))
    return collector_cert, collector_key


def create(root: Path, gateways: list[str], collector_name: str = "collector-1") -> Deployment:
    root.mkdir(parents=True, exist_ok=True)
    ca_dir, keys_dir, collector_ca_dir = root / "device-ca", root / "collector-keys", root / "collector-ca"
    _run("collector.cli", "ca", "init", "--dir", str(ca_dir))
    _run("collector.cli", "ca", "init", "--dir", str(collector_ca_dir))
    _run("collector.cli", "keys", "init", "--dir", str(keys_dir))
    collector_cert, collector_key = collector_certificate(root, collector_ca_dir, collector_name)
    deployment = Deployment(root, ca_dir, keys_dir, root / "gateways.db", collector_cert, collector_key,
                            collector_ca_dir)
    for gateway_id in gateways:
        deployment.enroll(gateway_id)
    return deployment
