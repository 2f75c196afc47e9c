"""edge-agent enroll: a gateway's keys, made on the gateway and never copied off it.

    edge-agent enroll --gateway-id gw-0001 --dir /etc/citynerve/pki [--force | --new-csr]

writes into DIR (0700, created if missing, tightened if looser), every file mode 0600:

    identity.key  Ed25519 private key, PEM PKCS#8 - signs the gateway's messages
    identity.pub  the public half in one line, "ed25519:<base64url>" - goes into the collector's registry
    tls.key       EC P-256 private key, PEM PKCS#8 - the gateway's TLS client key
    tls.csr       certificate signing request for tls.key, subject CN=<gateway id>, carrying the identity proof
                  (the identity key's signature over the gateway id and the TLS public key, wire/keys.py) -
                  signed by the device CA, which binds the certificate to the identity key

Existing keys are never overwritten unless --force is given (a new identity key means the collector's
registry entry must be replaced, and a new TLS key needs a new certificate). --new-csr writes tls.csr again
from the keys already in DIR (a gateway enrolled before CSRs carried the identity proof). See
docs/enrollment.md.
"""

from __future__ import annotations

import argparse
import base64
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from wire.files import private_dir, write_private
from wire.keys import IDENTITY_PROOF_OID, identity_from_pem, make_identity_proof
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
    new_csr_only: bool = False  # --new-csr: the keys were there already


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


def _write(path: Path, data: bytes, *, overwrite: bool) -> None:
    try:
        write_private(path, data, overwrite=overwrite)
    except FileExistsError:
        raise EnrollError(f"{path} already exists") from None


def make_csr(gateway_id: str, identity: ed25519.Ed25519PrivateKey,
             tls_key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """CN = the gateway id, signed by the TLS key, carrying the identity key's proof that it asks for this key."""
    proof = make_identity_proof(identity, gateway_id, tls_key.public_key())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)]))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(IDENTITY_PROOF_OID), proof), critical=False)
        .sign(tls_key, hashes.SHA256())
    )


def enroll(gateway_id: str, directory: Path | str, *, force: bool = False) -> Enrollment:
    """Make the gateway's identity key, TLS key and CSR in `directory`. Refuses to overwrite keys unless `force`."""
    check_gateway_id(gateway_id)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise EnrollError(f"{directory} is not a directory")
    private_dir(directory)
    paths = {name: directory / name for name in (IDENTITY_KEY, IDENTITY_PUB, TLS_KEY, TLS_CSR)}
    existing = [p.name for p in (paths[IDENTITY_KEY], paths[TLS_KEY]) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise EnrollError(f"{directory} already holds {' and '.join(existing)}; refusing to overwrite "
                          "(--force makes new keys: the gateway then needs a new certificate and registry entry; "
                          "--new-csr only writes tls.csr again from them)")

    identity = ed25519.Ed25519PrivateKey.generate()
    tls_key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(gateway_id, identity, tls_key)
    pem = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = format_identity_key(identity.public_key())
    _write(paths[IDENTITY_KEY], identity.private_bytes(*pem), overwrite=force)
    _write(paths[TLS_KEY], tls_key.private_bytes(*pem), overwrite=force)
    _write(paths[IDENTITY_PUB], (public + "\n").encode(), overwrite=True)
    _write(paths[TLS_CSR], csr.public_bytes(serialization.Encoding.PEM), overwrite=True)
    return Enrollment(gateway_id, directory, public, paths[IDENTITY_KEY], paths[TLS_KEY], paths[TLS_CSR])


def new_csr(gateway_id: str, directory: Path | str) -> Enrollment:
    """Write tls.csr (with the identity proof) again from identity.key and tls.key already in `directory`."""
    check_gateway_id(gateway_id)
    directory = Path(directory)
    identity_path, tls_path = directory / IDENTITY_KEY, directory / TLS_KEY
    try:
        identity = identity_from_pem(identity_path.read_bytes())
    except FileNotFoundError:
        raise EnrollError(f"{identity_path} does not exist: enroll without --new-csr makes the keys") from None
    except ValueError as exc:
        raise EnrollError(f"{identity_path}: not an Ed25519 private key ({exc})") from None
    try:
        tls_key = serialization.load_pem_private_key(tls_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise EnrollError(f"{tls_path} does not exist: enroll without --new-csr makes the keys") from None
    except ValueError as exc:
        raise EnrollError(f"{tls_path}: not a PEM private key ({exc})") from None
    if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
        raise EnrollError(f"{tls_path}: expected an EC private key, got {type(tls_key).__name__}")
    private_dir(directory)
    csr = make_csr(gateway_id, identity, tls_key)
    _write(directory / TLS_CSR, csr.public_bytes(serialization.Encoding.PEM), overwrite=True)
    public = format_identity_key(identity.public_key())
    _write(directory / IDENTITY_PUB, (public + "\n").encode(), overwrite=True)
    return Enrollment(gateway_id, directory, public, identity_path, tls_path, directory / TLS_CSR, new_csr_only=True)


def next_steps(e: Enrollment) -> str:
    d = e.directory
    if e.new_csr_only:
        return "\n".join([
            f"certificate request for {e.gateway_id} written again from the keys in {d}",
            f"identity public key: {e.identity_public} (unchanged)",
            f"certificate request: {e.csr} (CN={e.gateway_id}, with the identity proof)",
            f"next: on the CA host: edge-collector ca sign {TLS_CSR} --dir /etc/citynerve/device-ca --replace "
            f"--out {e.gateway_id}.crt (--replace revokes the certificate it replaces), then install it as "
            f"{d / TLS_CERT} and restart the agent",
        ])
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
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="replace existing keys")
    mode.add_argument("--new-csr", action="store_true",
                      help="only write tls.csr again (with the identity proof) from the keys already in DIR")


def dispatch(args: argparse.Namespace) -> int | None:
    """Run `enroll` and return its exit code; None for any other command."""
    if args.command != "enroll":
        return None
    from wire.cli import fail

    try:
        result = new_csr(args.gateway_id, args.dir) if args.new_csr else enroll(args.gateway_id, args.dir,
                                                                                  force=args.force)
    except EnrollError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or args.dir}: {exc.strerror or exc}", 1)
    print(next_steps(result))
    return 0
