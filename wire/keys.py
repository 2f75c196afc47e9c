"""Key (de)serialisation for the sealed envelope: PEM bytes in and out, no files, no passwords.

Gateway identity: Ed25519 (private: PKCS#8 PEM on the gateway; public: SubjectPublicKeyInfo PEM at the
collector, or wherever the enrollment keeps it). Operator CA: Ed25519, its public key (SubjectPublicKeyInfo PEM)
on every gateway (wire/control.py). Collector key: X25519 (private PKCS#8 PEM on the collector;
public SubjectPublicKeyInfo PEM shipped to gateways). Loading checks the key type: an Ed25519 key is never
accepted where an X25519 key is expected, or the other way round.

The identity proof binds a gateway's TLS key to its identity key (docs/enrollment.md, "Certificates and
identity keys"). `edge-agent enroll` puts it in the CSR as a non-critical extension, OID IDENTITY_PROOF_OID,
whose value is the DER of

    SEQUENCE { OCTET STRING (32 bytes: the raw Ed25519 identity public key),
               OCTET STRING (64 bytes: Ed25519 signature by that key over proof_message(gateway id, TLS key)) }

and `edge-collector ca sign` verifies it and writes the identity key's fingerprint (SHA-256 of the 32 raw
bytes, hex) into the certificate as the subjectAltName URI `urn:citynerve:identity:<fingerprint>`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from wire.seal import CollectorKey

_PEM = serialization.Encoding.PEM


def identity_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def identity_from_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def public_identity_to_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(_PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_identity_from_pem(data: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"expected an Ed25519 public key, got {type(key).__name__}")
    return key


def operator_ca_to_pem(key: Ed25519PublicKey) -> bytes:
    """The operator CA's public key as gateways receive it (SubjectPublicKeyInfo PEM, docs/control.md)."""
    return public_identity_to_pem(key)


def operator_ca_from_pem(data: bytes) -> Ed25519PublicKey:
    """The operator CA's public key (agent.toml [security] operator_ca). A private key is refused: the CA's
    private half never belongs on a gateway."""
    if b"PRIVATE KEY" in data:
        raise ValueError("this is a private key: a gateway gets only the operator CA's public key")
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"expected the operator CA's Ed25519 public key, got {type(key).__name__}")
    return key


def public_identity_from_file(path: Path | str) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file that someone copied here (an operator's NAME.pub, the operator CA's
    operator-ca.pub). ValueError("<path>: why") for a missing or unreadable file, a private key (which must never
    travel where a public key goes) or anything that is not an Ed25519 public key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a public key file") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied") from None
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{path} holds a private key, not a public key")
    try:
        return public_identity_from_pem(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an Ed25519 public key PEM ({exc})") from None


def collector_key_to_pem(key: CollectorKey) -> bytes:
    """The private collector key (PKCS#8 PEM). Raises ValueError on a public-only key."""
    if key.private is None:
        raise ValueError("this collector key has no private half")
    return key.private.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def collector_public_to_pem(key: CollectorKey) -> bytes:
    return X25519PublicKey.from_public_bytes(key.public).public_bytes(
        _PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def collector_key_from_pem(data: bytes) -> CollectorKey:
    """A CollectorKey from a private (collector side) or public (agent side) X25519 PEM."""
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, X25519PrivateKey):
            raise ValueError(f"expected an X25519 private key, got {type(private).__name__}")
        return CollectorKey.from_private(private)
    public = serialization.load_pem_public_key(data)
    if not isinstance(public, X25519PublicKey):
        raise ValueError(f"expected an X25519 public key, got {type(public).__name__}")
    return CollectorKey(public.public_bytes_raw())


# --- the identity proof in a gateway's CSR --------------------------------------------------------------------

# An OID under 2.25 (ITU-T X.667: a UUID as an OID) needs no registration and collides with nobody's.
IDENTITY_PROOF_OID = "2.25.301321778253857324044854617672315249801"
IDENTITY_URN_PREFIX = "urn:citynerve:identity:"
# Domain separation: a signature made for this proof is never a valid signature of anything else the identity
# key signs (session announcements, wire/seal.py), and the other way round.
_PROOF_CONTEXT = b"citynerve identity proof v1\0"
_PROOF_HEADER = bytes([0x30, 100, 0x04, 32])  # SEQUENCE (100 bytes) { OCTET STRING (32) ...
_SIGNATURE_HEADER = bytes([0x04, 64])  # ... OCTET STRING (64) }


def identity_fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, hex: what a certificate says about the identity key."""
    return hashlib.sha256(key.public_bytes_raw()).hexdigest()


def proof_message(gateway_id: str, tls_public_key_der: bytes) -> bytes:
    """What the identity key signs: this gateway id uses this TLS key (SubjectPublicKeyInfo DER)."""
    gid = gateway_id.encode("utf-8")
    return _PROOF_CONTEXT + len(gid).to_bytes(2, "big") + gid + tls_public_key_der


def _spki_der(tls_public_key: object) -> bytes:
    return tls_public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_identity_proof(identity: Ed25519PrivateKey, gateway_id: str, tls_public_key: object) -> bytes:
    """The extension value (DER) proving that `identity`'s holder asks for `tls_public_key` as `gateway_id`."""
    signature = identity.sign(proof_message(gateway_id, _spki_der(tls_public_key)))
    return _PROOF_HEADER + identity.public_key().public_bytes_raw() + _SIGNATURE_HEADER + signature


def verify_identity_proof(value: bytes, gateway_id: str, tls_public_key: object) -> Ed25519PublicKey:
    """The identity key whose proof `value` is, once its signature over (gateway id, TLS key) verified.

    Raises ValueError("malformed ...") for a value of the wrong shape and ValueError("does not verify ...")
    for a signature that is not the identity key's over this gateway id and this TLS key.
    """
    if len(value) != 102 or value[:4] != _PROOF_HEADER or value[36:38] != _SIGNATURE_HEADER:
        raise ValueError("malformed: expected SEQUENCE { OCTET STRING (32), OCTET STRING (64) }")
    key = Ed25519PublicKey.from_public_bytes(value[4:36])
    try:
        key.verify(value[38:], proof_message(gateway_id, _spki_der(tls_public_key)))
    except InvalidSignature:
        raise ValueError("does not verify: the identity key did not sign this gateway id and TLS key") from None
    return key
