"""edge-agent enroll: a gateway's keys, made on the gateway and never copied off it.

    edge-agent enroll --gateway-id gw-0001 --dir /etc/citynerve/pki [--force | --new-csr] [--operator-ca FILE]

writes into DIR (0700, created if missing, tightened if looser), every file mode 0600:

    identity.key  Ed25519 private key, PEM PKCS#8 - signs the gateway's messages
    identity.pub  the public half in one line, "ed25519:<base64url>" - goes into the collector's registry
    tls.key       EC P-256 private key, PEM PKCS#8 - the gateway's TLS client key
    tls.csr       certificate signing request for tls.key, subject CN=<gateway id>, carrying the identity proof
                  (the identity key's signature over the gateway id and the TLS public key, wire/keys.py) -
                  signed by the device CA, which binds the certificate to the identity key

    operator-ca.pub   (--operator-ca FILE) the operator CA's public key (`edge-collector operators init`): the
                  only key whose operators this gateway obeys (commands, configurations: docs/control.md);
                  agent.toml [security] operator_ca names it. Given only at enrollment, never by a push

Existing keys are never overwritten unless --force is given (a new identity key means the collector's
registry entry must be replaced, and a new TLS key needs a new certificate). --new-csr writes tls.csr again
from the keys already in DIR (a gateway enrolled before CSRs carried the identity proof). See
docs/enrollment.md. With --operator-ca alone on a gateway already enrolled, only operator-ca.pub is installed
(an installed one is never replaced by another CA's key: delete it first if that is really intended).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
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
OPERATOR_CA = "operator-ca.pub"

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
    operator_ca: OperatorCa | None = None  # --operator-ca: installed (or found already installed)


@dataclass(frozen=True)
class OperatorCa:
    path: Path
    key_id: str  # hex, as `edge-collector operators init` prints it: compare them over a second channel
    unchanged: bool  # the same key was installed already


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


def install_operator_ca(directory: Path | str, source: Path | str) -> OperatorCa:
    """Copy the operator CA's public key into `directory` as operator-ca.pub, after checking it is one. An
    installed key is kept: the same key again changes nothing, another one is refused (whoever replaces it
    decides whose commands this gateway runs)."""
    from wire.control import key_id
    from wire.keys import public_identity_from_file, public_identity_from_pem, public_identity_to_pem

    source, directory = Path(source), Path(directory)
    try:
        key = public_identity_from_file(source)
    except ValueError as exc:
        hint = ("a gateway gets only the operator CA's public key" if "private key" in str(exc)
                else "expected the operator CA's public key, operator-ca.pub from edge-collector operators init")
        raise EnrollError(f"{exc}: {hint}") from None
    kid = key_id(key).hex()
    target = directory / OPERATOR_CA
    if target.exists() or target.is_symlink():
        try:
            installed = public_identity_from_pem(target.read_bytes())
        except (ValueError, TypeError):
            installed = None
        if installed is not None and installed.public_bytes_raw() == key.public_bytes_raw():
            return OperatorCa(target, kid, True)
        other = f"key id {key_id(installed).hex()}" if installed is not None else "an unreadable key"
        raise EnrollError(f"{target} already holds another operator CA ({other}; this one is {kid}); replacing it "
                          "changes whose commands this gateway obeys: delete it first if that is intended")
    private_dir(directory)
    _write(target, public_identity_to_pem(key), overwrite=False)
    return OperatorCa(target, kid, False)


def _operator_ca_lines(e: Enrollment) -> list[str]:
    if e.operator_ca is None:
        return ["operator CA: none installed; to accept operators' commands and configurations, copy operator-ca.pub "
                f"(edge-collector operators init) here and run: edge-agent enroll --gateway-id {e.gateway_id} "
                f"--dir {e.directory} --operator-ca operator-ca.pub"]
    ca = e.operator_ca
    return [f"operator CA: {ca.path}{' (already installed)' if ca.unchanged else ''}, key id {ca.key_id}: compare "
            "it with what `edge-collector operators init` printed; agent.toml [security]: "
            f'operator_ca = "{ca.path}"']


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
            *_operator_ca_lines(e),
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
        "  4. agent.toml [security]: identity_key = \"" + str(e.identity_key) + "\", collector_key = the "
        "collector.pub copied here (edge-collector keys init)"
        + (f', operator_ca = "{e.operator_ca.path}"' if e.operator_ca else ""),
        "  5. edge-agent check /etc/citynerve/agent.toml, then restart the agent",
        *_operator_ca_lines(e),
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
    p.add_argument("--operator-ca", metavar="FILE",
                   help="the operator CA's operator-ca.pub: install it in DIR (alone on an enrolled gateway: only that)")


def dispatch(args: argparse.Namespace) -> int | None:
    """Run `enroll` and return its exit code; None for any other command."""
    if args.command != "enroll":
        return None
    from wire.cli import fail

    try:
        if args.operator_ca and not (args.new_csr or args.force) and _enrolled(args.dir):
            check_gateway_id(args.gateway_id)
            ca = install_operator_ca(args.dir, args.operator_ca)
            print("\n".join(_operator_ca_lines(Enrollment(args.gateway_id, Path(args.dir), "", Path(), Path(), Path(),
                                                          operator_ca=ca))))
            return 0
        ca = None
        if args.operator_ca:  # first: a refused CA file stops the enrollment before any key is made
            check_gateway_id(args.gateway_id)
            ca = install_operator_ca(args.dir, args.operator_ca)
        result = new_csr(args.gateway_id, args.dir) if args.new_csr else enroll(args.gateway_id, args.dir,
                                                                                  force=args.force)
        result = dataclasses.replace(result, operator_ca=ca)
    except EnrollError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or args.dir}: {exc.strerror or exc}", 1)
    print(next_steps(result))
    return 0


def _enrolled(directory: str) -> bool:
    return all((Path(directory) / name).exists() for name in (IDENTITY_KEY, TLS_KEY))
