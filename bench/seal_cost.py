"""Sealed envelope cost: µs per seal and per open (cached session) of a realistic 2 KB and 4 KB batch, against the
bare ChaCha20Poly1305 encrypt/decrypt call on the same sizes in the same run, plus the one-off cost of a session.

    python -m bench.seal_cost [--messages 20000] [--repeats 5]

Each figure is the best of `repeats` runs of `messages` operations (the least disturbed run). The bare baseline is
given twice: without associated data (the bare call) and with associated data of the sealed header's length.
Prints JSON; main(argv) returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cryptography
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wire import topics
from wire.schema import Batch, Reading, encode_batch
from wire.seal import CollectorKey, GatewaySealer, Opener, sealed_overhead

GATEWAY = "gw-0001"
TOPIC = topics.up("citynerve/v1", GATEWAY)
FIELDS = ("voltage_l1", "voltage_l2", "voltage_l3", "current_l1", "current_l2", "current_l3", "power_l1",
          "power_l2", "power_l3", "power", "power_factor", "frequency", "energy_import",
          "energy_export", "reactive_power")


def batch_of(target_bytes: int) -> bytes:
    """An encoded Batch of SDM630-like readings (15 float fields each), just at or above target_bytes."""
    readings: list[Reading] = []
    while True:
        i = len(readings)
        readings.append(Reading(f"meter-{i}", "electricity", 1_700_000_000_000_000_000 + i,
                                {f: 230.0 + (i * 7 + k) % 1000 / 10 for k, f in enumerate(FIELDS)},
                                {"model": "SDM630"}))
        data = encode_batch(Batch(GATEWAY, 1, 1_700_000_000_000_000_000, readings))
        if len(data) >= target_bytes:
            return data


def best_us(fn, items: list, repeats: int) -> float:
    """Best (over repeats) mean µs of fn(item) over items."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items) * 1e6)
    return best


def size_case(plain: bytes, messages: int, repeats: int) -> dict:
    collector = CollectorKey.generate()
    identity = Ed25519PrivateKey.generate()
    public = identity.public_key()
    sealer = GatewaySealer(GATEWAY, identity, collector.public_only(), rotate_after_messages=2**63)

    seal_us = best_us(lambda _: sealer.seal(TOPIC, plain), range(messages), repeats)
    # first openings (a repeat would be a duplicate): a fresh Opener and fresh messages for each repeat; the
    # duplicate path on the last 4000 (the replay window) of the last set.
    open_best = float("inf")
    for _ in range(repeats):
        opener = Opener([collector], lambda gw: public)
        sealed = [sealer.seal(TOPIC, plain) for _ in range(messages + 1)]
        opener.open(GATEWAY, TOPIC, sealed.pop(0))  # verifies and caches the session
        open_best = min(open_best, best_us(lambda m, o=opener: o.open(GATEWAY, TOPIC, m), sealed, 1))
    dup_us = best_us(lambda m, o=opener: o.open(GATEWAY, TOPIC, m), sealed[-4000:], 1)  # inside the window

    aead = ChaCha20Poly1305(os.urandom(32))
    aad = os.urandom(sealed_overhead(GATEWAY) - 16 + len(TOPIC) + 2)
    nonces = [i.to_bytes(12, "big") for i in range(messages)]
    ct_plain = [aead.encrypt(n, plain, None) for n in nonces]
    ct_aad = [aead.encrypt(n, plain, aad) for n in nonces]
    bare_enc = best_us(lambda n: aead.encrypt(n, plain, None), nonces, repeats)
    bare_enc_aad = best_us(lambda n: aead.encrypt(n, plain, aad), nonces, repeats)
    bare_dec = best_us(lambda i: aead.decrypt(nonces[i], ct_plain[i], None), range(messages), repeats)
    bare_dec_aad = best_us(lambda i: aead.decrypt(nonces[i], ct_aad[i], aad), range(messages), repeats)
    return {
        "plaintext_bytes": len(plain),
        "sealed_bytes": len(plain) + sealed_overhead(GATEWAY),
        "overhead_bytes": sealed_overhead(GATEWAY),
        "seal_us": round(seal_us, 2),
        "open_us": round(open_best, 2),
        "open_duplicate_us": round(dup_us, 2),
        "bare_encrypt_us": round(bare_enc, 2),
        "bare_decrypt_us": round(bare_dec, 2),
        "bare_encrypt_same_aad_us": round(bare_enc_aad, 2),
        "bare_decrypt_same_aad_us": round(bare_dec_aad, 2),
        "seal_vs_bare": round(seal_us / bare_enc, 2),
        "open_vs_bare": round(open_best / bare_dec, 2),
        "seal_vs_bare_same_aad": round(seal_us / bare_enc_aad, 2),
        "open_vs_bare_same_aad": round(open_best / bare_dec_aad, 2),
    }


def session_costs(count: int, repeats: int) -> dict:
    collector = CollectorKey.generate()
    identity = Ed25519PrivateKey.generate()
    public = identity.public_key()
    sealer = GatewaySealer(GATEWAY, identity, collector.public_only())
    new_session = best_us(lambda _: sealer.new_session(), range(count), repeats)

    # collector: the first message of a session (signature check + X25519 + HKDF + one open) minus a cached open
    first = float("inf")
    for _ in range(repeats):
        opener = Opener([collector], lambda gw: public, max_sessions=count + 1)
        firsts = []
        for _ in range(count):
            sealer.new_session()
            firsts.append(sealer.seal(TOPIC, b"x"))
        first = min(first, best_us(lambda m, o=opener: o.open(GATEWAY, TOPIC, m), firsts, 1))
    cached_small = best_us(lambda m, o=opener: o.open(GATEWAY, TOPIC, m),
                           [sealer.seal(TOPIC, b"x") for _ in range(count)], 1)

    eph_priv = X25519PrivateKey.generate()
    peer = collector.private.public_key()
    sig = identity.sign(b"m" * 150)
    return {
        "agent_new_session_us": round(new_session, 1),
        "collector_first_message_of_session_us": round(first, 1),
        "collector_cached_open_small_us": round(cached_small, 2),
        "parts_us": {
            "x25519_generate": round(best_us(lambda _: X25519PrivateKey.generate(), range(count), repeats), 1),
            "x25519_exchange": round(best_us(lambda _: eph_priv.exchange(peer), range(count), repeats), 1),
            "hkdf_sha256_x2": round(best_us(lambda _: [HKDF(hashes.SHA256(), 32, salt=b"s" * 16, info=b"i" * 200)
                                                       .derive(b"k" * 32) for _ in range(2)], range(count), repeats), 1),
            "ed25519_sign": round(best_us(lambda _: identity.sign(b"m" * 150), range(count), repeats), 1),
            "ed25519_verify": round(best_us(lambda _: public.verify(sig, b"m" * 150), range(count), repeats), 1),
        },
    }


def downlink_costs(count: int, repeats: int) -> dict:
    collector = CollectorKey.generate()
    identity = Ed25519PrivateKey.generate()
    public = identity.public_key()
    sealer = GatewaySealer(GATEWAY, identity, collector.public_only())
    opener = Opener([collector], lambda gw: public)
    session = opener.open(GATEWAY, TOPIC, sealer.seal(TOPIC, b"x")).session_id
    ack = topics.down("citynerve/v1", GATEWAY, "ack")
    body = b'{"acked":[[1000,1099]]}'
    seal_us = best_us(lambda _: opener.seal_downlink(GATEWAY, session, ack, body), range(count), repeats)
    # distinct messages (the agent rejects a repeat as a duplicate): vary the body
    open_best = float("inf")
    for r in range(repeats):
        msgs = [opener.seal_downlink(GATEWAY, session, ack, body + f"{r}.{i}".encode()) for i in range(count)]
        open_best = min(open_best, best_us(lambda m: sealer.open_downlink(ack, m), msgs, 1))
    return {"downlink_seal_us": round(seal_us, 2), "downlink_open_us": round(open_best, 2), "downlink_bytes": len(body) + 57}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result = {
        "benchmark": "seal_cost",
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "machine": platform.machine(),
        "messages": args.messages,
        "repeats": args.repeats,
        "sizes": [size_case(batch_of(target), args.messages, args.repeats) for target in (2048, 4096)],
        "session": session_costs(max(50, args.messages // 100), args.repeats),
        "downlink": downlink_costs(max(100, args.messages // 10), args.repeats),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
