"""Key (de)serialisation for the sealed envelope: PEM bytes in and out, no files, no passwords.

Gateway identity: Ed25519 (private: PKCS#8 PEM on the gateway; public: SubjectPublicKeyInfo PEM at the
collector, or wherever the enrollment keeps it). Collector key: X25519 (private PKCS#8 PEM on the collector;
public SubjectPublicKeyInfo PEM shipped to gateways). Loading checks the key type: an Ed25519 key is never
accepted where an X25519 key is expected, or the other way round.
"""

from __future__ import annotations

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
