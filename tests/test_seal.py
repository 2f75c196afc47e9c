"""Sealed envelope (wire v2): wire/seal.py and wire/keys.py. Pure, no sockets; every clock is injected."""

from __future__ import annotations

import collections
import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import keys, topics
from wire.envelope import Format
from wire.schema import Batch, Reading, decode_batch, encode_batch
from wire.seal import (
    DOWNLINK_SESSIONS_KEPT,
    FORMAT_CONFIDENTIAL,
    FORMAT_DOWNLINK,
    FORMAT_SEALED,
    CollectorKey,
    GatewaySealer,
    Opener,
    SealError,
    SealReason,
    sealed_overhead,
)

PREFIX = "citynerve/v1"
T0 = 1_700_000_000.0


def up(gw: str) -> str:
    return topics.up(PREFIX, gw)


def ack(gw: str) -> str:
    return topics.down(PREFIX, gw, "ack")


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class CountingKey:
    """An Ed25519 public key that counts signature verifications (duck-typed like Ed25519PublicKey)."""

    def __init__(self, key) -> None:
        self.key = key
        self.verifies = 0

    def verify(self, signature: bytes, data: bytes) -> None:
        self.verifies += 1
        self.key.verify(signature, data)

    def public_bytes_raw(self) -> bytes:
        return self.key.public_bytes_raw()


class Fleet:
    """Collector keys, gateway identities and the enrollment lookup a collector would have."""

    def __init__(self) -> None:
        self.collector = CollectorKey.generate()
        self.identities: dict[str, Ed25519PrivateKey] = {}
        self.enrolled: dict[str, object] = {}
        self.clock = Clock()

    def enroll(self, gw: str) -> Ed25519PrivateKey:
        self.identities[gw] = Ed25519PrivateKey.generate()
        self.enrolled[gw] = CountingKey(self.identities[gw].public_key())
        return self.identities[gw]

    def lookup(self, gw: str):
        return self.enrolled.get(gw)

    def sealer(self, gw: str, collector: CollectorKey | None = None, **kw) -> GatewaySealer:
        if gw not in self.identities:
            self.enroll(gw)
        kw.setdefault("clock", self.clock)
        return GatewaySealer(gw, self.identities[gw], (collector or self.collector).public_only(), **kw)

    def opener(self, keys: list[CollectorKey] | None = None, **kw) -> Opener:
        kw.setdefault("clock", self.clock)
        return Opener(keys or [self.collector], self.lookup, **kw)


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


def sample_batch(gw: str = "gw-0001", seq: int = 7, readings: int = 3) -> Batch:
    fields = ("voltage_l1", "voltage_l2", "current_l1", "power", "energy_import", "frequency")
    return Batch(gw, seq, 1_700_000_000_123_456_789, [
        Reading(f"meter-ACME-{4200 + i}", "electricity", 1_700_000_000_000_000_000 + i,
                {f: 231.4567 + 17.125 * i + k for k, f in enumerate(fields)} | {"phase_ok": True, "errors": 1234567 + i},
                {"model": "SDM630", "site": "Rathausplatz"})
        for i in range(readings)
    ])


def reason(fn, *args) -> SealReason:
    with pytest.raises(SealError) as info:
        fn(*args)
    return info.value.reason


# ------------------------------------------------------------------------------------------------ basics


def test_format_bytes_agree_with_the_envelope():
    assert FORMAT_SEALED == Format.SEALED_V2 == 0x02
    assert FORMAT_DOWNLINK == 0x03


def test_round_trip(fleet):
    sealer, opener = fleet.sealer("gw-0001"), fleet.opener()
    plain = encode_batch(sample_batch())
    for i in range(3):
        sealed = sealer.seal(up("gw-0001"), plain)
        assert sealed[0] == FORMAT_SEALED
        assert len(sealed) == len(plain) + sealed_overhead("gw-0001") == len(plain) + 161
        opened = opener.open("gw-0001", up("gw-0001"), sealed)
        assert (opened.gateway, opened.session_id, opened.counter, opened.duplicate) == \
            ("gw-0001", sealer.session_id, i, False)
        assert decode_batch(opened.plaintext) == sample_batch()
    assert sealer.counter == 3
    assert opener.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"")).plaintext == b""


def test_collector_key_id_and_validation():
    ck = CollectorKey.generate()
    assert len(ck.kid) == 8 and ck.public_only().kid == ck.kid and ck.public_only().private is None
    assert "private" in repr(ck) and ck.public.hex() not in repr(ck)
    with pytest.raises(ValueError):
        CollectorKey(ck.public[:31])
    with pytest.raises(ValueError):
        CollectorKey(ck.public, X25519PrivateKey.generate())
    with pytest.raises(ValueError):
        Opener([ck.public_only()], lambda gw: None)
    with pytest.raises(ValueError):
        Opener([ck, CollectorKey.generate(), CollectorKey.generate()], lambda gw: None)
    with pytest.raises(ValueError):
        Opener([ck, ck], lambda gw: None)
    with pytest.raises(ValueError):
        GatewaySealer("bad/id", Ed25519PrivateKey.generate(), ck)


def test_cached_session_costs_one_signature_check(fleet):
    sealer, opener = fleet.sealer("gw-0001"), fleet.opener()
    for _ in range(100):
        opener.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x"))
    assert fleet.enrolled["gw-0001"].verifies == 1
    restarted = fleet.sealer("gw-0001")
    opener.open("gw-0001", up("gw-0001"), restarted.seal(up("gw-0001"), b"x"))
    assert fleet.enrolled["gw-0001"].verifies == 2
    assert opener.cached_sessions == 2


# -------------------------------------------------------------------------------------- tampering, binding


def _region(offset: int, gw_len: int) -> str:
    g = 2 + gw_len
    if offset == 0:
        return "format"
    if offset == 1:
        return "gw_len"
    if offset < g:
        return "gateway"
    if offset < g + 8:
        return "kid"
    if offset < g + 8 + 16 + 8 + 32 + 64:
        return "announcement"
    return "counter+ciphertext+tag"


EXPECTED_BY_REGION = {
    "format": {SealReason.MALFORMED_HEADER},
    "gw_len": {SealReason.MALFORMED_HEADER, SealReason.TOPIC_MISMATCH},
    "gateway": {SealReason.MALFORMED_HEADER, SealReason.TOPIC_MISMATCH},
    "kid": {SealReason.UNKNOWN_KEY},
    "announcement": {SealReason.BAD_SIGNATURE},
    "counter+ciphertext+tag": {SealReason.BAD_TAG},
}


@pytest.mark.parametrize("warm", [False, True], ids=["cold-cache", "warm-cache"])
def test_every_single_bit_flip_is_rejected(fleet, warm):
    sealer, opener = fleet.sealer("gw-0001"), fleet.opener()
    sealed = sealer.seal(up("gw-0001"), encode_batch(sample_batch(readings=1)))
    if warm:
        assert not opener.open("gw-0001", up("gw-0001"), sealed).duplicate
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for bit in range(len(sealed) * 8):
        flipped = bytearray(sealed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            opener.open("gw-0001", up("gw-0001"), bytes(flipped))
        except SealError as exc:
            seen[_region(bit // 8, 7)][exc.reason] += 1
        else:
            pytest.fail(f"bit {bit} flipped and the message still opened")
    assert sum(sum(c.values()) for c in seen.values()) == len(sealed) * 8
    for region, reasons in seen.items():
        assert set(reasons) <= EXPECTED_BY_REGION[region], (region, reasons)
    # nothing a rejected message did changed the opener's state
    assert opener.open("gw-0001", up("gw-0001"), sealed).duplicate is warm


def test_wrong_topic_is_rejected(fleet):
    sealer, opener = fleet.sealer("gw-0001"), fleet.opener()
    sealed = sealer.seal(up("gw-0001"), b"payload")
    for topic in (topics.status(PREFIX, "gw-0001"), ack("gw-0001"), topics.up("citynerve/v2", "gw-0001"),
                  up("gw-0001") + "/", "citynerve/v1/gw-0001/UP"):
        assert reason(opener.open, "gw-0001", topic, sealed) == SealReason.BAD_TAG
    assert opener.open("gw-0001", up("gw-0001"), sealed).plaintext == b"payload"


def test_message_moved_to_another_gateway_is_rejected(fleet):
    a, opener = fleet.sealer("gw-A"), fleet.opener()
    fleet.sealer("gw-B")
    sealed = a.seal(up("gw-A"), b"readings of A")
    # as is, on B's topic
    assert reason(opener.open, "gw-B", up("gw-B"), sealed) == SealReason.TOPIC_MISMATCH
    # with its header rewritten to say B: the session announcement is A's, not signed by B
    forged = sealed.replace(b"gw-A", b"gw-B", 1)
    assert reason(opener.open, "gw-B", up("gw-B"), forged) == SealReason.BAD_SIGNATURE
    # a gateway (B's stolen key) claiming to be A
    impostor = GatewaySealer("gw-A", fleet.identities["gw-B"], fleet.collector.public_only(), clock=fleet.clock)
    assert reason(opener.open, "gw-A", up("gw-A"), impostor.seal(up("gw-A"), b"x")) == SealReason.BAD_SIGNATURE
    assert opener.open("gw-A", up("gw-A"), sealed).plaintext == b"readings of A"


def test_eavesdropper_sees_no_names_ids_or_values(fleet):
    batch = sample_batch(readings=4)
    sealed = fleet.sealer("gw-0001").seal(up("gw-0001"), encode_batch(batch))
    plain = encode_batch(batch)
    secrets: list[bytes] = [b"electricity", b"SDM630", b"Rathausplatz", b"model", b"site"]
    for r in batch.readings:
        secrets.append(r.device.encode())
        secrets.append(struct.pack(">Q", r.time_ns))
        for name, value in r.fields.items():
            secrets.append(name.encode())
            if isinstance(value, float):
                secrets.append(struct.pack(">d", value))
            elif not isinstance(value, bool):
                secrets.append(struct.pack(">I", value))
    for s in secrets:
        assert s in plain, s  # the needle is really in the plaintext...
        assert s not in sealed, s  # ...and not in what the broker sees
    # the clear header carries the gateway id on purpose (docs/security.md: what is not protected)
    assert b"gw-0001" in sealed


# ------------------------------------------------------------------------------------------- replay, grace


def test_replay_is_a_duplicate_and_reordering_is_fine(fleet):
    sealer, opener = fleet.sealer("gw-0001"), fleet.opener()
    msgs = [sealer.seal(up("gw-0001"), bytes([i])) for i in range(10)]
    order = [3, 0, 9, 1, 2, 8, 4, 5, 7, 6]
    assert [opener.open("gw-0001", up("gw-0001"), msgs[i]).duplicate for i in order] == [False] * 10
    for i in order:
        opened = opener.open("gw-0001", up("gw-0001"), msgs[i])
        assert opened.duplicate and opened.counter == i and opened.plaintext == bytes([i])


def test_counter_below_the_window_is_too_old(fleet):
    sealer, opener = fleet.sealer("gw-0001"), fleet.opener(replay_window=16)
    msgs = [sealer.seal(up("gw-0001"), b"m") for _ in range(40)]
    opener.open("gw-0001", up("gw-0001"), msgs[39])
    assert reason(opener.open, "gw-0001", up("gw-0001"), msgs[2]) == SealReason.TOO_OLD
    assert reason(opener.open, "gw-0001", up("gw-0001"), msgs[23]) == SealReason.TOO_OLD
    assert not opener.open("gw-0001", up("gw-0001"), msgs[24]).duplicate  # 15 behind: inside
    assert opener.open("gw-0001", up("gw-0001"), msgs[24]).duplicate
    # a far jump forward clears the window
    far = [sealer.seal(up("gw-0001"), b"m") for _ in range(100)]
    assert not opener.open("gw-0001", up("gw-0001"), far[-1]).duplicate
    assert reason(opener.open, "gw-0001", up("gw-0001"), msgs[39]) == SealReason.TOO_OLD


def test_old_session_accepted_within_grace_then_expired(fleet):
    clock = fleet.clock
    old = fleet.sealer("gw-0001")
    old_msgs = [old.seal(up("gw-0001"), bytes([i])) for i in range(4)]
    a, b = fleet.opener(grace_seconds=300), fleet.opener(grace_seconds=300)  # b never sees the old session first
    a.open("gw-0001", up("gw-0001"), old_msgs[0])
    clock.t += 10
    new = fleet.sealer("gw-0001")  # agent restart: a newer session
    clock.t += 5
    for opener in (a, b):
        opener.open("gw-0001", up("gw-0001"), new.seal(up("gw-0001"), b"new"))
    clock.t += 299
    assert a.open("gw-0001", up("gw-0001"), old_msgs[1]).plaintext == b"\x01"
    assert b.open("gw-0001", up("gw-0001"), old_msgs[1]).plaintext == b"\x01"
    clock.t += 2  # 301 s after the newer session appeared
    for opener in (a, b):
        assert reason(opener.open, "gw-0001", up("gw-0001"), old_msgs[2]) == SealReason.EXPIRED_SESSION
        assert reason(opener.open, "gw-0001", up("gw-0001"), old_msgs[1]) == SealReason.EXPIRED_SESSION  # dup too
        assert opener.open("gw-0001", up("gw-0001"), new.seal(up("gw-0001"), b"new")).plaintext == b"new"
    clock.t += 86400 * 30  # the newest session never expires at the collector (the agent rotates it)
    assert a.open("gw-0001", up("gw-0001"), new.seal(up("gw-0001"), b"x")).plaintext == b"x"


def test_old_session_seen_after_its_successor_by_a_fresh_collector(fleet):
    """Order is by the signed start time, not by arrival: an old session arriving late is still the old one."""
    clock = fleet.clock
    old = fleet.sealer("gw-0001")
    old_msg = old.seal(up("gw-0001"), b"old")
    clock.t += 3600
    new = fleet.sealer("gw-0001")
    opener = fleet.opener(grace_seconds=60)
    opener.open("gw-0001", up("gw-0001"), new.seal(up("gw-0001"), b"new"))
    clock.t += 61
    assert reason(opener.open, "gw-0001", up("gw-0001"), old_msg) == SealReason.EXPIRED_SESSION
    assert opener.open("gw-0001", up("gw-0001"), new.seal(up("gw-0001"), b"new")).plaintext == b"new"


def test_gateway_clock_ahead_cannot_pin_its_session_as_newest(fleet):
    """A session started with the gateway clock a year ahead is ordered at the collector's clock, so the next
    session (clock corrected) is newer and the wrong one expires: the gateway is not locked out."""
    ahead = GatewaySealer("gw-0001", fleet.enroll("gw-0001"), fleet.collector.public_only(),
                          clock=lambda: fleet.clock.t + 365 * 86400)
    opener = fleet.opener(grace_seconds=60)
    opener.open("gw-0001", up("gw-0001"), ahead.seal(up("gw-0001"), b"ahead"))
    fleet.clock.t += 10
    fixed = fleet.sealer("gw-0001")
    opener.open("gw-0001", up("gw-0001"), fixed.seal(up("gw-0001"), b"fixed"))
    fleet.clock.t += 61
    assert reason(opener.open, "gw-0001", up("gw-0001"), ahead.seal(up("gw-0001"), b"a")) == \
        SealReason.EXPIRED_SESSION
    assert opener.open("gw-0001", up("gw-0001"), fixed.seal(up("gw-0001"), b"f")).plaintext == b"f"


def test_a_clone_shows_as_a_steady_stream_of_expired_sessions(fleet):
    original = fleet.sealer("gw-0001")
    fleet.clock.t += 1
    clone = GatewaySealer("gw-0001", fleet.identities["gw-0001"], fleet.collector.public_only(), clock=fleet.clock)
    opener = fleet.opener(grace_seconds=60)
    for _ in range(3):
        opener.open("gw-0001", up("gw-0001"), original.seal(up("gw-0001"), b"o"))
        opener.open("gw-0001", up("gw-0001"), clone.seal(up("gw-0001"), b"c"))
    fleet.clock.t += 61
    assert reason(opener.open, "gw-0001", up("gw-0001"), original.seal(up("gw-0001"), b"o")) == \
        SealReason.EXPIRED_SESSION
    assert opener.open("gw-0001", up("gw-0001"), clone.seal(up("gw-0001"), b"c")).plaintext == b"c"


# ------------------------------------------------------------------------------- enrollment, keys, rotation


def test_unknown_gateway(fleet):
    sealer = GatewaySealer("gw-stranger", Ed25519PrivateKey.generate(), fleet.collector.public_only())
    opener = fleet.opener()
    assert reason(opener.open, "gw-stranger", up("gw-stranger"), sealer.seal(up("gw-stranger"), b"x")) == \
        SealReason.UNKNOWN_GATEWAY


def test_revoked_gateway(fleet):
    sealer, opener = fleet.sealer("gw-0001"), fleet.opener()
    opener.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x"))
    key = fleet.enrolled.pop("gw-0001")  # revoked in the enrollment store
    assert reason(opener.open, "gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x")) == SealReason.REVOKED
    assert opener.cached_sessions == 0
    assert reason(opener.open, "gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x")) == SealReason.REVOKED
    # forget_gateway drops the cached sessions at once: the next message is verified from scratch
    fleet.enrolled["gw-0001"] = key
    opener.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x"))
    verifies = key.verifies
    opener.forget_gateway("gw-0001")
    assert opener.cached_sessions == 0
    opener.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x"))
    assert key.verifies == verifies + 1
    opener.forget_gateway("gw-0001")
    del fleet.enrolled["gw-0001"]
    assert reason(opener.open, "gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x")) == SealReason.REVOKED
    # an opener that never saw it cannot tell revoked from unknown
    assert reason(fleet.opener().open, "gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x")) == \
        SealReason.UNKNOWN_GATEWAY


def test_reenrolled_identity_invalidates_cached_sessions(fleet):
    stolen, opener = fleet.sealer("gw-0001"), fleet.opener()
    opener.open("gw-0001", up("gw-0001"), stolen.seal(up("gw-0001"), b"x"))
    fleet.enroll("gw-0001")  # new identity key for the gateway; the stolen one is no longer valid
    assert reason(opener.open, "gw-0001", up("gw-0001"), stolen.seal(up("gw-0001"), b"x")) == \
        SealReason.BAD_SIGNATURE
    assert opener.open("gw-0001", up("gw-0001"), fleet.sealer("gw-0001").seal(up("gw-0001"), b"y")).plaintext == b"y"


def test_unknown_key_id(fleet):
    other = CollectorKey.generate()
    sealer = fleet.sealer("gw-0001", collector=other)
    assert reason(fleet.opener().open, "gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"x")) == \
        SealReason.UNKNOWN_KEY


def test_collector_key_rotation(fleet):
    previous, current = fleet.collector, CollectorKey.generate()
    on_previous = fleet.sealer("gw-A", collector=previous)
    on_current = fleet.sealer("gw-B", collector=current)
    both = fleet.opener([current, previous])
    assert set(both.key_ids) == {current.kid, previous.kid}
    for _ in range(3):
        assert both.open("gw-A", up("gw-A"), on_previous.seal(up("gw-A"), b"a")).plaintext == b"a"
        assert both.open("gw-B", up("gw-B"), on_current.seal(up("gw-B"), b"b")).plaintext == b"b"
    only_current = fleet.opener([current])
    assert reason(only_current.open, "gw-A", up("gw-A"), on_previous.seal(up("gw-A"), b"a")) == \
        SealReason.UNKNOWN_KEY
    assert on_previous.collector_kid == previous.kid


def test_new_session_after_n_messages(fleet):
    sealer, opener = fleet.sealer("gw-0001", rotate_after_messages=3), fleet.opener()
    counters, sessions = [], []
    for i in range(7):
        opened = opener.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), bytes([i])))
        counters.append(opened.counter)
        sessions.append(opened.session_id)
    assert counters == [0, 1, 2, 0, 1, 2, 0]
    assert len(set(sessions)) == 3 and sealer.sessions_started == 3


def test_new_session_after_t_seconds(fleet):
    sealer, opener = fleet.sealer("gw-0001", rotate_after_seconds=3600), fleet.opener()
    first = sealer.session_id
    sealer.seal(up("gw-0001"), b"x")
    fleet.clock.t += 3599
    sealer.seal(up("gw-0001"), b"x")
    assert sealer.session_id == first and sealer.counter == 2
    fleet.clock.t += 1
    sealed = sealer.seal(up("gw-0001"), b"x")
    assert sealer.session_id != first and sealer.counter == 1
    assert opener.open("gw-0001", up("gw-0001"), sealed).counter == 0


def test_new_session_when_the_wall_clock_is_stepped(fleet):
    mono = Clock(1000.0)
    sealer = fleet.sealer("gw-0001", monotonic=mono, clock_step_seconds=60)
    first = sealer.session_id
    fleet.clock.t += 30
    mono.t += 1  # 29 s of drift: not a step
    sealer.seal(up("gw-0001"), b"x")
    assert sealer.session_id == first
    fleet.clock.t += 3 * 3600  # NTP after a boot with a stale clock
    sealer.seal(up("gw-0001"), b"x")
    assert sealer.session_id != first
    second = sealer.session_id
    fleet.clock.t -= 7200  # stepped back: a new session, and its start still goes forward
    sealer.seal(up("gw-0001"), b"x")
    assert sealer.session_id != second
    opener = fleet.opener()
    assert opener.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"y")).plaintext == b"y"


def test_start_times_are_strictly_increasing_within_a_process(fleet):
    sealer = fleet.sealer("gw-0001")
    starts = []
    for _ in range(5):
        sealer.new_session()
        starts.append(int.from_bytes(sealer.seal(up("gw-0001"), b"")[2 + 7 + 8 + 16:][:8], "big"))
    assert starts == sorted(set(starts))


def test_two_collectors_open_independently_in_any_order(fleet):
    sealers = [fleet.sealer(f"gw-{i}", rotate_after_messages=25) for i in range(4)]
    msgs = [(s.gateway_id, s.seal(up(s.gateway_id), f"{s.gateway_id}:{n}".encode())) for n in range(60) for s in sealers]
    rng = random.Random(1)
    rng.shuffle(msgs)
    collectors = [fleet.opener(), fleet.opener()]
    got = set()
    for gw, sealed in msgs:
        opened = rng.choice(collectors).open(gw, up(gw), sealed)
        assert not opened.duplicate
        got.add(opened.plaintext)
    assert len(got) == len(msgs)
    # the other collector, given everything again, opens it all too (its own window, its own cache)
    for gw, sealed in msgs:
        collectors[0].open(gw, up(gw), sealed)
        collectors[1].open(gw, up(gw), sealed)


def test_session_cache_is_bounded_and_eviction_only_costs_a_reverification(fleet):
    opener = fleet.opener(max_sessions=2)
    sealers = [fleet.sealer(f"gw-{i}") for i in range(3)]
    for _ in range(2):
        for s in sealers:
            assert opener.open(s.gateway_id, up(s.gateway_id), s.seal(up(s.gateway_id), b"x")).plaintext == b"x"
    assert opener.cached_sessions == 2
    assert fleet.enrolled["gw-0"].verifies == 2


# ------------------------------------------------------------------------------------ nonce uniqueness


def test_no_key_nonce_pair_ever_repeats(fleet):
    """10k messages across forced rotations and crashes (a new process with the same identity and the same
    clock reading, as after restoring an SD-card image): every (key, nonce) pair is new."""
    pairs = set()
    keys_used = set()
    opener = fleet.opener()
    sealer = fleet.sealer("gw-0001", rotate_after_messages=997)
    sessions = 1
    for i in range(10_000):
        if i and i % 3000 == 0:  # crash + restore: same identity, same clock, counter state gone
            sealer = fleet.sealer("gw-0001", rotate_after_messages=997)
            sessions += 1
        sealed = sealer.seal(up("gw-0001"), i.to_bytes(4, "big"))
        if sealer.counter == 1 and i % 3000:
            sessions += 1
        nonce = bytes(4) + sealed[2 + 7 + 8 + 16 + 8 + 32 + 64:][:8]
        key = sealer._session.up_key
        pairs.add((key, nonce))
        keys_used.add(key)
        if i % 97 == 0:
            assert opener.open("gw-0001", up("gw-0001"), sealed).plaintext == i.to_bytes(4, "big")
    assert len(pairs) == 10_000
    assert len(keys_used) == sessions >= 14


# ----------------------------------------------------------------------------- robustness (Hypothesis)


@pytest.fixture(scope="module")
def robust():
    fleet = Fleet()
    sealer = fleet.sealer("gw-0001")
    return fleet.opener(), sealer.seal(up("gw-0001"), encode_batch(sample_batch(readings=1))), fleet


def test_every_truncation_is_rejected(robust):
    opener, sealed, _ = robust
    for n in range(len(sealed)):
        assert isinstance(reason(opener.open, "gw-0001", up("gw-0001"), sealed[:n]), SealReason)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_random_payloads_are_rejected(robust, data):
    opener, _, _ = robust
    assert isinstance(reason(opener.open, "gw-0001", up("gw-0001"), data), SealReason)
    assert isinstance(reason(opener.open, "gw-0001", up("gw-0001"), b"\x02\x07gw-0001" + data), SealReason)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.binary(min_size=1, max_size=70_000))
def test_oversized_payloads_are_rejected(robust, extra):
    opener, sealed, _ = robust
    assert reason(opener.open, "gw-0001", up("gw-0001"), sealed + extra) == SealReason.BAD_TAG


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
                      min_size=1, max_size=8))
def test_random_byte_edits_are_rejected(robust, edits):
    opener, sealed, _ = robust
    edited = bytearray(sealed)
    for pos, value in edits:
        edited[pos % len(sealed)] = value
    if bytes(edited) == sealed:
        return
    assert isinstance(reason(opener.open, "gw-0001", up("gw-0001"), bytes(edited)), SealReason)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(min_size=0, max_size=600))
def test_forged_headers_with_a_real_key_id_are_rejected(robust, tail):
    opener, sealed, _ = robust
    forged = sealed[:2 + 7 + 8] + tail  # a real gateway and key id, anything after
    assert reason(opener.open, "gw-0001", up("gw-0001"), forged) in {
        SealReason.MALFORMED_HEADER, SealReason.BAD_SIGNATURE}


# ---------------------------------------------------------------------------------------------- downlink


def _session_with_downlink(fleet, gw="gw-0001", **kw):
    sealer, opener = fleet.sealer(gw, **kw), fleet.opener()
    opened = opener.open(gw, up(gw), sealer.seal(up(gw), b"batch"))
    return sealer, opener, opened


def test_downlink_round_trip(fleet):
    sealer, opener, opened = _session_with_downlink(fleet)
    down = opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"), b'{"acked":[[1,7]]}')
    assert down[0] == FORMAT_DOWNLINK
    assert sealer.open_downlink(ack("gw-0001"), down) == b'{"acked":[[1,7]]}'
    # a second collector instance that verified the same session authenticates downlinks for it too
    other = fleet.opener()
    other.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"batch"))
    fleet.clock.t += 0.01
    assert sealer.open_downlink(ack("gw-0001"), other.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"),
                                                                     b"x")) == b"x"


def test_downlink_every_bit_flip_and_wrong_topic_are_rejected(fleet):
    sealer, opener, opened = _session_with_downlink(fleet)
    down = opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"), b"ack 1..7")
    reasons = collections.Counter()
    for bit in range(len(down) * 8):
        flipped = bytearray(down)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            sealer.open_downlink(ack("gw-0001"), bytes(flipped))
        except SealError as exc:
            reasons[exc.reason] += 1
        else:
            pytest.fail(f"downlink bit {bit} flipped and still accepted")
    assert set(reasons) <= {SealReason.MALFORMED_HEADER, SealReason.UNKNOWN_SESSION, SealReason.BAD_TAG}
    assert reason(sealer.open_downlink, topics.down(PREFIX, "gw-0001", "cmd"), down) == SealReason.BAD_TAG
    assert reason(sealer.open_downlink, ack("gw-0001"), down[:40]) == SealReason.MALFORMED_HEADER
    assert sealer.open_downlink(ack("gw-0001"), down) == b"ack 1..7"


def test_downlink_for_another_gateway_is_rejected(fleet):
    _, opener, opened = _session_with_downlink(fleet, "gw-A")
    b = fleet.sealer("gw-B")
    down = opener.seal_downlink("gw-A", opened.session_id, ack("gw-A"), b"ack")
    assert reason(b.open_downlink, ack("gw-B"), down) == SealReason.UNKNOWN_SESSION


def test_downlink_stale_future_and_replayed(fleet):
    sealer, opener, opened = _session_with_downlink(fleet, downlink_max_age=300)
    down = opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"), b"ack")
    assert sealer.open_downlink(ack("gw-0001"), down) == b"ack"
    assert reason(sealer.open_downlink, ack("gw-0001"), down) == SealReason.DUPLICATE
    fleet.clock.t += 301
    assert reason(sealer.open_downlink, ack("gw-0001"), down) == SealReason.STALE
    future = opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"), b"later")
    fleet.clock.t -= 301  # the collector's clock is 301 s ahead of the gateway's
    assert reason(sealer.open_downlink, ack("gw-0001"), future) == SealReason.STALE
    fleet.clock.t += 2  # 299 s ahead: accepted once
    assert sealer.open_downlink(ack("gw-0001"), future) == b"later"
    assert reason(sealer.open_downlink, ack("gw-0001"), future) == SealReason.DUPLICATE


def test_downlink_age_is_the_clock_offset_seen_in_acks(fleet):
    """last_downlink_age (the agent's citynerve_agent_clock_ack_offset_seconds): this gateway's clock minus the
    collector's at sealing, from authentic, fresh downlinks only; a replay or a forgery does not move it."""
    sealer, opener, opened = _session_with_downlink(fleet, downlink_max_age=300)
    assert sealer.last_downlink_age is None
    down = opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"), b"ack")
    fleet.clock.t += 0.25  # in transit
    sealer.open_downlink(ack("gw-0001"), down)
    assert sealer.last_downlink_age == pytest.approx(0.25, abs=0.002)
    fleet.clock.t += 90  # later, the same message replayed: refused, the age not taken from it
    assert reason(sealer.open_downlink, ack("gw-0001"), down) == SealReason.DUPLICATE
    forged = bytearray(opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"), b"x"))
    forged[-1] ^= 1
    assert reason(sealer.open_downlink, ack("gw-0001"), bytes(forged)) == SealReason.BAD_TAG
    assert sealer.last_downlink_age == pytest.approx(0.25, abs=0.002)
    behind = opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"), b"2")
    fleet.clock.t -= 120  # the gateway's clock two minutes behind the collector's
    sealer.open_downlink(ack("gw-0001"), behind)
    assert sealer.last_downlink_age == pytest.approx(-120, abs=0.002)


def test_downlink_sessions_kept_and_unknown(fleet):
    sealer, opener, opened = _session_with_downlink(fleet)
    sealer.new_session()  # an ack for the previous session still arrives
    assert sealer.open_downlink(ack("gw-0001"), opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"),
                                                                     b"1")) == b"1"
    for _ in range(3):
        sealer.new_session()
    assert reason(sealer.open_downlink, ack("gw-0001"),
                  opener.seal_downlink("gw-0001", opened.session_id, ack("gw-0001"), b"2")) == \
        SealReason.UNKNOWN_SESSION
    assert reason(opener.seal_downlink, "gw-0001", os.urandom(16), ack("gw-0001"), b"x") == SealReason.UNKNOWN_SESSION
    assert reason(opener.seal_downlink, "gw-none", opened.session_id, ack("gw-none"), b"x") == \
        SealReason.UNKNOWN_SESSION


# ------------------------------------------------------------------------------ confidential downlink (0x04)


def control(gw: str) -> str:
    return topics.down(PREFIX, gw, "control")


SECRET_COMMAND = b'{"device":"pump-Rathausplatz-3","point":"setpoint","value":42.125,"operator":"alice"}'


def test_confidential_round_trip_for_the_newest_session(fleet):
    sealer, opener, opened = _session_with_downlink(fleet)
    assert opener.newest_session("gw-0001") == opened.session_id
    assert opener.newest_session("gw-none") is None
    down = opener.seal_confidential("gw-0001", opened.session_id, control("gw-0001"), SECRET_COMMAND)
    assert down[0] == FORMAT_CONFIDENTIAL == 0x04
    assert len(down) == 1 + 16 + 8 + 12 + len(SECRET_COMMAND) + 16
    assert sealer.open_confidential(control("gw-0001"), down) == SECRET_COMMAND
    # a new session with an accepted message becomes the one to seal for; the previous one still opens
    fleet.clock.t += 1  # sessions are ordered by their start (capped at the collector's clock): a later one
    sealer.new_session()
    newer = opener.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"batch")).session_id
    assert opener.newest_session("gw-0001") == newer != opened.session_id
    for sid in (newer, opened.session_id):
        fleet.clock.t += 0.001
        assert sealer.open_confidential(control("gw-0001"), opener.seal_confidential(
            "gw-0001", sid, control("gw-0001"), b"x")) == b"x"
    # another collector instance that verified the session seals for it too (random nonces: no coordination)
    other = fleet.opener()
    other.open("gw-0001", up("gw-0001"), sealer.seal(up("gw-0001"), b"batch"))
    assert sealer.open_confidential(control("gw-0001"), other.seal_confidential(
        "gw-0001", newer, control("gw-0001"), b"y")) == b"y"


def test_confidential_the_broker_reads_nothing(fleet):
    _, opener, opened = _session_with_downlink(fleet)
    a = opener.seal_confidential("gw-0001", opened.session_id, control("gw-0001"), SECRET_COMMAND)
    b = opener.seal_confidential("gw-0001", opened.session_id, control("gw-0001"), SECRET_COMMAND)
    assert a[25:] != b[25:]  # a fresh nonce each time: the same command twice does not look the same
    for secret in (b"pump", b"Rathausplatz", b"setpoint", b"alice", b"42.125", b"gw-0001"):
        assert secret in SECRET_COMMAND + b"gw-0001"
        assert secret not in a and secret not in b, secret
    # unlike the authenticated-only downlink 0x03, whose payload is in the clear
    assert SECRET_COMMAND in opener.seal_downlink("gw-0001", opened.session_id, control("gw-0001"), SECRET_COMMAND)


def test_confidential_every_bit_flip_is_rejected(fleet):
    sealer, opener, opened = _session_with_downlink(fleet)
    down = opener.seal_confidential("gw-0001", opened.session_id, control("gw-0001"), b"set point 7")
    reasons = collections.Counter()
    for bit in range(len(down) * 8):
        flipped = bytearray(down)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            sealer.open_confidential(control("gw-0001"), bytes(flipped))
        except SealError as exc:
            reasons[exc.reason] += 1
        else:
            pytest.fail(f"confidential downlink bit {bit} flipped and still accepted")
    assert reasons[SealReason.MALFORMED_HEADER] == 8  # the format byte
    assert reasons[SealReason.UNKNOWN_SESSION] == 16 * 8  # the session id
    assert reasons[SealReason.BAD_TAG] == (len(down) - 17) * 8  # time, nonce, ciphertext, tag: all authenticated
    for n in range(len(down)):
        assert reason(sealer.open_confidential, control("gw-0001"), down[:n]) in {
            SealReason.MALFORMED_HEADER, SealReason.UNKNOWN_SESSION, SealReason.BAD_TAG}
    assert sealer.open_confidential(control("gw-0001"), down) == b"set point 7"


def test_confidential_wrong_topic_and_format_confusion(fleet):
    sealer, opener, opened = _session_with_downlink(fleet)
    down = opener.seal_confidential("gw-0001", opened.session_id, control("gw-0001"), b"command " * 4)
    for topic in (ack("gw-0001"), topics.down("other/v1", "gw-0001", "control"), control("gw-0001") + "/",
                  "gw/" + control("gw-0001")):
        assert reason(sealer.open_confidential, topic, down) == SealReason.BAD_TAG
    # a 0x03 turned into a 0x04 and back: separate formats, separate keys
    mac_down = opener.seal_downlink("gw-0001", opened.session_id, control("gw-0001"), b"command " * 4)
    assert reason(sealer.open_confidential, control("gw-0001"), mac_down) == SealReason.MALFORMED_HEADER
    assert reason(sealer.open_confidential, control("gw-0001"), bytes([FORMAT_CONFIDENTIAL]) + mac_down[1:]) == \
        SealReason.BAD_TAG
    assert reason(sealer.open_downlink, control("gw-0001"), down) == SealReason.MALFORMED_HEADER
    assert reason(sealer.open_downlink, control("gw-0001"), bytes([FORMAT_DOWNLINK]) + down[1:]) == \
        SealReason.BAD_TAG
    assert sealer.open_confidential(control("gw-0001"), down) == b"command " * 4


def test_confidential_for_another_gateway_is_rejected(fleet):
    _, opener, opened = _session_with_downlink(fleet, "gw-A")
    b = fleet.sealer("gw-B")
    down = opener.seal_confidential("gw-A", opened.session_id, control("gw-A"), b"open the valve")
    assert reason(b.open_confidential, control("gw-B"), down) == SealReason.UNKNOWN_SESSION
    # even a gateway holding the same downlink key (it cannot: the key is derived from A's session) would
    # fail, because the gateway id is in the associated data
    b._down_keys[opened.session_id] = fleet_down_key(opener, "gw-A", opened.session_id)
    assert reason(b.open_confidential, control("gw-B"), down) == SealReason.BAD_TAG
    assert reason(b.open_confidential, control("gw-A"), down) == SealReason.BAD_TAG
    # and a collector cannot seal for a gateway whose session it has not verified
    assert reason(opener.seal_confidential, "gw-B", b.session_id, control("gw-B"), b"x") == \
        SealReason.UNKNOWN_SESSION


def fleet_down_key(opener: Opener, gw: str, sid: bytes) -> bytes:
    return opener._gateways[gw].sessions[sid].down_key


def test_confidential_replayed_stale_and_future(fleet):
    sealer, opener, opened = _session_with_downlink(fleet, downlink_max_age=300)
    down = opener.seal_confidential("gw-0001", opened.session_id, control("gw-0001"), b"cmd")
    assert sealer.open_confidential(control("gw-0001"), down) == b"cmd"
    assert reason(sealer.open_confidential, control("gw-0001"), down) == SealReason.DUPLICATE
    fleet.clock.t += 301  # replayed later than the age limit: stale (the age is always checked for 0x04)
    assert reason(sealer.open_confidential, control("gw-0001"), down) == SealReason.STALE
    future = opener.seal_confidential("gw-0001", opened.session_id, control("gw-0001"), b"later")
    fleet.clock.t -= 301  # the collector's clock 301 s ahead of the gateway's
    assert reason(sealer.open_confidential, control("gw-0001"), future) == SealReason.STALE
    fleet.clock.t += 2
    assert sealer.open_confidential(control("gw-0001"), future) == b"later"
    assert reason(sealer.open_confidential, control("gw-0001"), future) == SealReason.DUPLICATE


def test_confidential_unknown_session(fleet):
    sealer, opener, opened = _session_with_downlink(fleet)
    down = opener.seal_confidential("gw-0001", opened.session_id, control("gw-0001"), b"1")
    for _ in range(DOWNLINK_SESSIONS_KEPT):
        sealer.new_session()  # the session the collector sealed for is no longer held (agent restarted, rotated)
    assert reason(sealer.open_confidential, control("gw-0001"), down) == SealReason.UNKNOWN_SESSION
    assert reason(opener.seal_confidential, "gw-0001", os.urandom(16), control("gw-0001"), b"x") == \
        SealReason.UNKNOWN_SESSION
    assert reason(opener.seal_confidential, "gw-none", opened.session_id, control("gw-none"), b"x") == \
        SealReason.UNKNOWN_SESSION
    opener.forget_gateway("gw-0001")  # revoked: nothing is sealed for it any more
    assert opener.newest_session("gw-0001") is None
    assert reason(opener.seal_confidential, "gw-0001", opened.session_id, control("gw-0001"), b"x") == \
        SealReason.UNKNOWN_SESSION


# ------------------------------------------------------------------------------------------------- keys


def test_key_pem_round_trips_and_type_checks():
    identity = Ed25519PrivateKey.generate()
    collector = CollectorKey.generate()
    again = keys.identity_from_pem(keys.identity_to_pem(identity))
    assert again.public_key().public_bytes_raw() == identity.public_key().public_bytes_raw()
    pub = keys.public_identity_from_pem(keys.public_identity_to_pem(identity.public_key()))
    assert pub.public_bytes_raw() == identity.public_key().public_bytes_raw()
    private = keys.collector_key_from_pem(keys.collector_key_to_pem(collector))
    assert private == collector and private.private is not None and private.kid == collector.kid
    public = keys.collector_key_from_pem(keys.collector_public_to_pem(collector))
    assert public == collector and public.private is None
    with pytest.raises(ValueError):
        keys.collector_key_to_pem(public)
    with pytest.raises(ValueError):
        keys.identity_from_pem(keys.collector_key_to_pem(collector))
    with pytest.raises(ValueError):
        keys.collector_key_from_pem(keys.identity_to_pem(identity))
    with pytest.raises(ValueError):
        keys.collector_key_from_pem(keys.public_identity_to_pem(identity.public_key()))
    with pytest.raises(ValueError):
        keys.public_identity_from_pem(keys.collector_public_to_pem(collector))
