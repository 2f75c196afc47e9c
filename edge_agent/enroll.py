"""edge-agent enroll: a gateway's keys, made on the gateway and never copied off it.

    edge-agent enroll --gateway-id gw-0001 --dir /etc/citynerve/pki [--force]

writes into DIR (created 0700 if missing):

    identity.key  Ed25519 private key, PEM PKCS#8, mode 0600 - signs the gateway's messages
    identity.pub  the public half in one line, "ed25519:<base64url>" - goes into the collector's registry
    tls.key       EC P-256 private key, PEM PKCS#8, mode 0600 - the gateway's TLS client key
    tls.csr       certificate signing request for tls.key, subject CN=<gateway id> - signed by the device CA

Existing keys are never overwritten unless --force is given (a new identity key means the collector's
registry entry must be replaced, and a new TLS key needs a new certificate). See docs/enrollment.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from wire.schema import GATEWAY_ID_PATTERN

IDENTITY_KEY = "identity.key"
IDENTITY_PUB = "identity.pub"
TLS_KEY = "tls.key"
TLS_CSR = "tls.csr"
TLS_CERT = "tls.crt"  # where the signed certificate goes when it comes back (not written by enroll)

# One-line form of an Ed25519 public key: this prefix, then the 32 raw bytes in unpadded base64url.
IDENTITY_KEY_PREFIX = "ed25519:"

_GATEWAY_ID = re.compile(GATEWAY_ID_PATTERN)


class EnrollError(Exception):
    """A technician's mistake or a refused operation: printed as one line."""


@dataclass(frozen=True)
class Enrollment:
    gateway_id: str
    directory: Path
    identity_public: str  # "ed25519:..."
    identity_key: Path
    tls_key: Path
    csr: Path


def check_gateway_id(gateway_id: str) -> str:
    # fullmatch: the pattern's "$" alone would also accept a trailing newline.
    if not isinstance(gateway_id, str) or not _GATEWAY_ID.fullmatch(gateway_id):
        raise EnrollError(f"invalid gateway id {gateway_id!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    if gateway_id.lower().startswith("collector"):  # the broker's collector usernames (collector/pki.py)
        raise EnrollError(f"invalid gateway id {gateway_id!r}: names starting with 'collector' are reserved "
                          "for collector instances")
    return gateway_id


def format_identity_key(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return IDENTITY_KEY_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write `data` to `path` with mode 0600 from the first byte on (whatever the umask).

    Without `overwrite` an existing file is an error (O_EXCL); with it, the file is replaced atomically.
    """
    target = path if not overwrite else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise EnrollError(f"{path} already exists") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def enroll(gateway_id: str, directory: Path | str, *, force: bool = False) -> Enrollment:
    """Make the gateway's identity key, TLS key and CSR in `directory`. Refuses to overwrite keys unless `force`."""
    check_gateway_id(gateway_id)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise EnrollError(f"{directory} is not a directory")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = {name: directory / name for name in (IDENTITY_KEY, IDENTITY_PUB, TLS_KEY, TLS_CSR)}
    existing = [p.name for p in (paths[IDENTITY_KEY], paths[TLS_KEY]) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise EnrollError(f"{directory} already holds {' and '.join(existing)}; refusing to overwrite "
                          "(--force makes new keys: the gateway then needs a new certificate and registry entry)")

    identity = ed25519.Ed25519PrivateKey.generate()
    tls_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)]))
        .sign(tls_key, hashes.SHA256())
    )
    pem = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = format_identity_key(identity.public_key())
    write_private(paths[IDENTITY_KEY], identity.private_bytes(*pem), overwrite=force)
    write_private(paths[TLS_KEY], tls_key.private_bytes(*pem), overwrite=force)
    _write_public(paths[IDENTITY_PUB], (public + "\n").encode())
    _write_public(paths[TLS_CSR], csr.public_bytes(serialization.Encoding.PEM))
    return Enrollment(gateway_id, directory, public, paths[IDENTITY_KEY], paths[TLS_KEY], paths[TLS_CSR])


def next_steps(e: Enrollment) -> str:
    d = e.directory
    return "\n".join([
        f"gateway {e.gateway_id} enrolled in {d}",
        f"identity public key: {e.identity_public}",
        f"certificate request: {e.csr} (CN={e.gateway_id})",
        "next steps (private keys stay here; copy only the public key and tls.csr):",
        f"  1. on the server: edge-collector gateways add {e.gateway_id} {e.identity_public} "
        "--registry /var/lib/citynerve-collector/gateways.db",
        f"  2. on the CA host: edge-collector ca sign {TLS_CSR} --dir /etc/citynerve/device-ca "
        f"--out {e.gateway_id}.crt",
        f"  3. copy the certificate back to {d / TLS_CERT} and set in agent.toml [mqtt]: "
        f'cert_file = "{d / TLS_CERT}", key_file = "{e.tls_key}"',
        "  4. edge-agent check /etc/citynerve/agent.toml, then restart the agent",
    ])


# --- command line (wired into edge_agent/cli.py) --------------------------------------------------------------


def register_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enroll", help="make this gateway's identity key, TLS key and certificate request")
    p.add_argument("--gateway-id", required=True, metavar="ID", help="the gateway id (as in agent.toml)")
    p.add_argument("--dir", required=True, metavar="DIR", help="where the keys go, e.g. /etc/citynerve/pki")
    p.add_argument("--force", action="store_true", help="replace existing keys")


def dispatch(args: argparse.Namespace) -> int | None:
    """Run `enroll` and return its exit code; None for any other command."""
    if args.command != "enroll":
        return None
    from wire.cli import fail

    try:
        result = enroll(args.gateway_id, args.dir, force=args.force)
    except EnrollError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or args.dir}: {exc.strerror or exc}", 1)
    print(next_steps(result))
    return 0
