"""Sealed envelope (wire v2): end-to-end encrypted and authenticated uplinks, authenticated downlinks.

Pure and synchronous: bytes in, bytes or values out; no I/O, no threads, no global state. Every primitive is
from the `cryptography` package: X25519, HKDF-SHA256, Ed25519, ChaCha20-Poly1305, HMAC-SHA256.
The format, the key schedule and the reasoning are in docs/security.md; this docstring is the short version.

Uplink (format 0x02), all integers big-endian:

    0        1   format 0x02
    1        1   L = length of the gateway id (1..64)
    2        L   gateway id (ASCII, wire.schema.GATEWAY_ID_PATTERN)
    2+L      8   collector key id (kid = SHA-256(collector X25519 public key)[:8])
    10+L    16   session id (random)
    26+L     8   session start, ms since the Unix epoch (gateway clock)
    34+L    32   ephemeral X25519 public key of the session
    66+L    64   Ed25519 signature of the session announcement by the gateway's identity key
    130+L    8   counter (per session, from 0)
    138+L    n   ChaCha20-Poly1305 ciphertext of the payload
    138+L+n 16   Poly1305 tag

    nonce = 00 00 00 00 || counter (8)
    AAD   = bytes [0, 138+L) || u16 len(topic) || topic (UTF-8)

Confidential downlink (format 0x04): operators' commands and configurations (wire/control.py). Encrypted and
authenticated with a key derived from the session's downlink key; the broker reads nothing of it:

    0    1   format 0x04
    1   16   session id (of the gateway session whose downlink key seals it)
    17   8   collector time, ms since the Unix epoch
    25  12   nonce (random: several collector instances seal for one session, so no shared counter exists;
             a session carries few downlinks, far below the 2**32 messages random 96-bit nonces allow)
    37   n   ChaCha20-Poly1305 ciphertext of the payload
    37+n 16  tag;  AAD = label || L || gateway id || u16 len(topic) || topic || bytes [0, 37)

Downlink (format 0x03), authenticated, not encrypted:

    0    1   format 0x03
    1   16   session id (of the gateway session whose downlink key authenticates it)
    17   8   collector time, ms since the Unix epoch
    25   n   payload
    25+n 32  HMAC-SHA256(downlink key, label || L || gateway id || u16 len(topic) || topic || bytes [0, 25+n))
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import math
import os
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wire.schema import GATEWAY_ID_PATTERN

FORMAT_SEALED = 0x02  # == wire.envelope.Format.SEALED_V2
FORMAT_DOWNLINK = 0x03
FORMAT_CONFIDENTIAL = 0x04
NONCE_LEN = 12

KID_LEN = 8
SID_LEN = 16
START_LEN = 8
PUB_LEN = 32
SIG_LEN = 64
COUNTER_LEN = 8
TAG_LEN = 16
MAC_LEN = 32
MAX_GATEWAY_ID = 64
# bytes after the gateway id: kid, session id, start, ephemeral public key, signature (the announcement), counter
_ANNOUNCEMENT_LEN = KID_LEN + SID_LEN + START_LEN + PUB_LEN + SIG_LEN  # 128
_FIXED_LEN = 2 + _ANNOUNCEMENT_LEN + COUNTER_LEN  # 138: header length without the gateway id
_DOWN_HEADER_LEN = 1 + SID_LEN + 8  # 25
_NONCE_PREFIX = bytes(4)
MAX_COUNTER = 2**64 - 1

# Domain-separation labels: a signature, a key or a MAC made for one purpose is never valid for another.
_LABEL_SESSION = b"citynerve seal v2 session\x00"
_LABEL_UP = b"citynerve seal v2 uplink key\x00"
_LABEL_DOWN = b"citynerve seal v2 downlink key\x00"
_LABEL_DOWN_MAC = b"citynerve seal v2 downlink mac\x00"
_LABEL_SECRET = b"citynerve seal v2 confidential downlink key\x00"
_LABEL_SECRET_AAD = b"citynerve seal v2 confidential downlink\x00"
_CONF_HEADER_LEN = 1 + SID_LEN + 8 + NONCE_LEN  # 37

DOWNLINK_SESSIONS_KEPT = 4  # the agent accepts downlinks for its current session and the 3 before it
SESSIONS_PER_GATEWAY = 8  # cached sessions per gateway on the collector (a gateway normally has 1, 2 at a rotation)
HISTORY_PER_GATEWAY = 16  # session orderings remembered per gateway for the grace rule

_GATEWAY_ID = re.compile(GATEWAY_ID_PATTERN)


def sealed_overhead(gateway_id: str) -> int:
    """Bytes a sealed uplink adds to its plaintext (header + tag): 154 + len(gateway_id)."""
    return _FIXED_LEN + len(gateway_id) + TAG_LEN


class SealReason(enum.StrEnum):
    """Stable outcome codes: counter names and log fields. Listed in the order the collector checks them."""

    MALFORMED_HEADER = "malformed_header"  # not a parseable sealed header (format byte, lengths, gateway id)
    TOPIC_MISMATCH = "topic_mismatch"  # the header's gateway id is not the one of the topic
    UNKNOWN_GATEWAY = "unknown_gateway"  # lookup_gateway() has no key for it
    REVOKED = "revoked"  # it was known (or forgotten) and lookup_gateway() now says None
    UNKNOWN_KEY = "unknown_key"  # sealed to a collector key id this collector does not hold
    BAD_SIGNATURE = "bad_signature"  # the session announcement is not signed by the gateway's identity key
    BAD_TAG = "bad_tag"  # AEAD (uplink) or HMAC (downlink) verification failed: tampered, moved, wrong key
    TOO_OLD = "too_old"  # counter below the replay window of its session
    EXPIRED_SESSION = "expired_session"  # a session older than the gateway's newest, past the grace period
    DUPLICATE = "duplicate"  # uplink: an outcome (Opened.duplicate), never raised; downlink: raised by the agent
    UNKNOWN_SESSION = "unknown_session"  # downlink: a session the sealer/opener does not (or no longer) hold
    STALE = "stale"  # downlink: timestamp outside the agent's accepted age


class SealError(Exception):
    def __init__(self, reason: SealReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class CollectorKey:
    """The collector's static X25519 key. The agent holds the public half only; the collector holds both."""

    __slots__ = ("kid", "private", "public")

    def __init__(self, public: bytes, private: X25519PrivateKey | None = None) -> None:
        public = bytes(public)
        if len(public) != PUB_LEN:
            raise ValueError(f"an X25519 public key is {PUB_LEN} bytes, not {len(public)}")
        if private is not None and private.public_key().public_bytes_raw() != public:
            raise ValueError("the private key does not belong to this public key")
        self.public = public
        self.private = private
        self.kid = hashlib.sha256(public).digest()[:KID_LEN]

    @classmethod
    def generate(cls) -> CollectorKey:
        return cls.from_private(X25519PrivateKey.generate())

    @classmethod
    def from_private(cls, private: X25519PrivateKey) -> CollectorKey:
        return cls(private.public_key().public_bytes_raw(), private)

    def public_only(self) -> CollectorKey:
        return CollectorKey(self.public)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CollectorKey) and other.public == self.public

    def __hash__(self) -> int:
        return hash(self.public)

    def __repr__(self) -> str:
        return f"CollectorKey(kid={self.kid.hex()}, private={'yes' if self.private else 'no'})"


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _topic_aad(topic: str) -> bytes:
    raw = topic.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("an MQTT topic is at most 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _announcement(gw: bytes, kid: bytes, collector_pub: bytes, sid: bytes, start: bytes, eph_pub: bytes) -> bytes:
    """What the gateway signs: the session, bound to the gateway id and to the full collector public key."""
    return _LABEL_SESSION + bytes((len(gw),)) + gw + kid + collector_pub + sid + start + eph_pub


def _session_keys(shared: bytes, sid: bytes, announcement: bytes, identity_pub: bytes) -> tuple[bytes, bytes]:
    """(uplink key, downlink key): two HKDF-SHA256 derivations with distinct labels, salt = session id, info =
    label || the signed announcement || the gateway's identity public key."""
    context = announcement + identity_pub
    up = HKDF(hashes.SHA256(), 32, salt=sid, info=_LABEL_UP + context).derive(shared)
    down = HKDF(hashes.SHA256(), 32, salt=sid, info=_LABEL_DOWN + context).derive(shared)
    return up, down


def _secret_key(down_key: bytes) -> bytes:
    """The confidential downlink's AEAD key: separate from the MAC key of format 0x03 (one key, one purpose)."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=_LABEL_SECRET).derive(down_key)


def _secret_aad(gw: bytes, topic: str, header: bytes) -> bytes:
    return _LABEL_SECRET_AAD + bytes((len(gw),)) + gw + _topic_aad(topic) + header


def _down_mac(key: bytes, gw: bytes, topic: str, signed: bytes) -> bytes:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(_LABEL_DOWN_MAC + bytes((len(gw),)) + gw + _topic_aad(topic))
    mac.update(signed)
    return mac.finalize()


# ---------------------------------------------------------------------------------------------- agent side


class _UpSession:
    __slots__ = ("aead", "counter", "down_key", "prefix", "sid", "start_mono", "start_ms", "start_wall", "up_key")


class GatewaySealer:
    """Agent side, one per gateway process. Not thread-safe (one caller at a time).

    A session (fresh session id, fresh ephemeral X25519 key, hence fresh keys) is started at construction, after
    `rotate_after_messages` messages, after `rotate_after_seconds`, when the wall clock is stepped by more than
    `clock_step_seconds` against the monotonic clock, and on new_session(). Nothing is persisted: a restarted
    process (crash, restored SD card, clone) starts from a new random session, never from an old counter.
    """

    def __init__(
        self,
        gateway_id: str,
        identity: Ed25519PrivateKey,
        collector: CollectorKey,
        *,
        rotate_after_messages: int = 1_000_000,
        rotate_after_seconds: float = 86400,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
        clock_step_seconds: float = 60.0,
        downlink_max_age: float = 300.0,
    ) -> None:
        if not _GATEWAY_ID.match(gateway_id):
            raise ValueError(f"invalid gateway id {gateway_id!r}")
        if not 1 <= rotate_after_messages <= MAX_COUNTER:
            raise ValueError("rotate_after_messages must be in 1..2**64-1")
        if not rotate_after_seconds > 0 or not downlink_max_age > 0:
            raise ValueError("rotate_after_seconds and downlink_max_age must be > 0")
        self.gateway_id = gateway_id
        self._gw = gateway_id.encode("ascii")
        self._identity = identity
        self._identity_pub = identity.public_key().public_bytes_raw()
        self._collector_pub = X25519PublicKey.from_public_bytes(collector.public)
        self._collector = collector.public_only()
        self._rotate_n = rotate_after_messages
        self._rotate_s = rotate_after_seconds
        self._clock = clock
        # Step detection compares the wall clock with a monotonic one; with an injected wall clock and no
        # monotonic one it is off (time.monotonic would disagree with the fake clock all the time).
        self._monotonic = monotonic if monotonic is not None else (time.monotonic if clock is time.time else None)
        self._clock_step = clock_step_seconds
        self._down_max_age_ms = downlink_max_age * 1000.0
        self._down_keys: OrderedDict[bytes, bytes] = OrderedDict()
        self._seen_down: set[bytes] = set()
        self._seen_down_order: deque[tuple[float, bytes]] = deque()
        self._last_start_ms = 0
        self.sessions_started = 0
        self.last_downlink_age: float | None = None  # seconds; see _check_fresh
        self._session: _UpSession
        self.new_session()

    @property
    def session_id(self) -> bytes:
        return self._session.sid

    @property
    def counter(self) -> int:
        """The counter the next message of the current session gets (= messages sealed in it so far)."""
        return self._session.counter

    @property
    def collector_kid(self) -> bytes:
        return self._collector.kid

    def new_session(self) -> None:
        """Start a new session now: e.g. after the clock was synchronised, or to announce a new collector key."""
        wall = self._clock()
        # Session starts are strictly increasing within a process, whatever the clock does.
        start_ms = max(int(wall * 1000), self._last_start_ms + 1)
        self._last_start_ms = start_ms
        sid = os.urandom(SID_LEN)
        eph = X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes_raw()
        shared = eph.exchange(self._collector_pub)
        start = _u64(start_ms)
        announcement = _announcement(self._gw, self._collector.kid, self._collector.public, sid, start, eph_pub)
        up_key, down_key = _session_keys(shared, sid, announcement, self._identity_pub)
        signature = self._identity.sign(announcement)
        s = _UpSession()
        s.sid = sid
        s.start_ms = start_ms
        s.start_wall = wall
        s.start_mono = self._monotonic() if self._monotonic else 0.0
        s.counter = 0
        s.up_key = up_key
        s.down_key = down_key
        s.aead = ChaCha20Poly1305(up_key)
        s.prefix = (bytes((FORMAT_SEALED, len(self._gw))) + self._gw + self._collector.kid + sid + start + eph_pub
                    + signature)
        self._session = s
        self._down_keys[sid] = down_key
        while len(self._down_keys) > DOWNLINK_SESSIONS_KEPT:
            self._down_keys.popitem(last=False)
        self.sessions_started += 1

    def _due(self, s: _UpSession) -> bool:
        if s.counter >= self._rotate_n:
            return True
        wall = self._clock()
        if wall - s.start_wall >= self._rotate_s:
            return True
        if self._monotonic is not None:
            drift = (wall - s.start_wall) - (self._monotonic() - s.start_mono)
            if abs(drift) > self._clock_step:
                return True  # the wall clock was stepped (NTP after a boot without RTC, an operator's date -s)
        return False

    def seal(self, topic: str, plaintext: bytes) -> bytes:
        """The sealed uplink payload (format 0x02) of plaintext for exactly this MQTT topic."""
        s = self._session
        if self._due(s):
            self.new_session()
            s = self._session
        counter = s.counter
        s.counter = counter + 1  # taken before encrypting: a counter value is never used twice, even on error
        ctr = _u64(counter)
        header = s.prefix + ctr
        return header + s.aead.encrypt(_NONCE_PREFIX + ctr, plaintext, header + _topic_aad(topic))

    def open_downlink(self, topic: str, payload: bytes, *, check_age: bool = True) -> bytes:
        """The payload of a collector's downlink (format 0x03) for this topic; raises SealError.

        check_age=False is for downlinks whose replay is harmless (acknowledgements: deleting what is already
        deleted), so that a gateway whose clock is off by more than the age limit still drains its outbox."""
        payload = bytes(payload)
        if len(payload) < _DOWN_HEADER_LEN + MAC_LEN or payload[0] != FORMAT_DOWNLINK:
            raise SealError(SealReason.MALFORMED_HEADER, f"not a downlink ({len(payload)} bytes)")
        sid = payload[1:1 + SID_LEN]
        key = self._down_keys.get(sid)
        if key is None:
            raise SealError(SealReason.UNKNOWN_SESSION, f"downlink for session {sid.hex()}, not one of ours")
        signed, tag = payload[:-MAC_LEN], payload[-MAC_LEN:]
        mac = hmac.HMAC(key, hashes.SHA256())
        mac.update(_LABEL_DOWN_MAC + bytes((len(self._gw),)) + self._gw + _topic_aad(topic))
        mac.update(signed)
        try:
            mac.verify(tag)
        except InvalidSignature:
            raise SealError(SealReason.BAD_TAG, "downlink authentication failed") from None
        self._check_fresh(int.from_bytes(payload[1 + SID_LEN:_DOWN_HEADER_LEN], "big"), tag, check_age)
        return payload[_DOWN_HEADER_LEN:-MAC_LEN]

    def open_confidential(self, topic: str, payload: bytes) -> bytes:
        """The plaintext of a confidential downlink (format 0x04) for this topic; raises SealError. The age is
        always checked (a command or configuration replayed later must not be taken as new): the document's own
        deadline and id are checked again by the agent (wire/control.py)."""
        payload = bytes(payload)
        if len(payload) < _CONF_HEADER_LEN + TAG_LEN or payload[0] != FORMAT_CONFIDENTIAL:
            raise SealError(SealReason.MALFORMED_HEADER, f"not a confidential downlink ({len(payload)} bytes)")
        sid = payload[1:1 + SID_LEN]
        key = self._down_keys.get(sid)
        if key is None:
            raise SealError(SealReason.UNKNOWN_SESSION, f"downlink for session {sid.hex()}, not one of ours")
        header = payload[:_CONF_HEADER_LEN]
        try:
            plaintext = ChaCha20Poly1305(_secret_key(key)).decrypt(
                header[1 + SID_LEN + 8:], payload[_CONF_HEADER_LEN:], _secret_aad(self._gw, topic, header))
        except InvalidTag:
            raise SealError(SealReason.BAD_TAG, "confidential downlink authentication failed") from None
        self._check_fresh(int.from_bytes(payload[1 + SID_LEN:1 + SID_LEN + 8], "big"), payload[-TAG_LEN:], True)
        return plaintext

    def _check_fresh(self, sent_ms: int, tag: bytes, check_age: bool) -> None:
        now_ms = self._clock() * 1000.0
        if check_age and abs(now_ms - sent_ms) > self._down_max_age_ms:
            raise SealError(SealReason.STALE, f"downlink sent {(now_ms - sent_ms) / 1000:.1f} s ago (limit "
                                              f"{self._down_max_age_ms / 1000:.0f} s either way)")
        # Replays inside the age window: remember every accepted tag for 2 x max age after its arrival; a replay
        # arriving later than that is stale anyway (its timestamp is at most max age ahead of its first arrival).
        order = self._seen_down_order
        while order and order[0][0] < now_ms:
            self._seen_down.discard(order.popleft()[1])
        if tag in self._seen_down:
            raise SealError(SealReason.DUPLICATE, "downlink already received")
        self._seen_down.add(tag)
        order.append((now_ms + 2 * self._down_max_age_ms, tag))
        # This gateway's clock minus the collector's when it sealed this downlink, plus the time in transit: the
        # clock offset seen in acknowledgements (a metric; replays never get here, so a late copy cannot skew it).
        self.last_downlink_age = (now_ms - sent_ms) / 1000.0



# ------------------------------------------------------------------------------------------ collector side


class Opened(NamedTuple):
    """An authentic uplink. duplicate: its counter was already accepted in this session by this Opener (count
    it, do not alarm; the write is idempotent)."""

    gateway: str
    session_id: bytes
    counter: int
    plaintext: bytes
    duplicate: bool


class _Gateway:
    __slots__ = ("history", "identity", "identity_raw", "sessions")

    def __init__(self, identity: object, identity_raw: bytes) -> None:
        self.identity = identity
        self.identity_raw = identity_raw
        self.sessions: dict[bytes, _Session] = {}
        # (order, first accepted at) of recent sessions with an accepted message, sorted by order
        self.history: list[tuple[tuple[int, bytes], float]] = []


class _Session:
    __slots__ = ("accepted", "aead", "bits", "cache_key", "down_key", "gateway", "highest", "order", "sid", "state")


class Opener:
    """Collector side, one per process, shared by every message. Not thread-safe (one caller at a time).

    open() checks, in this order (the first failure is raised as SealError with its SealReason):
    header parse -> topic/gateway agreement -> known, non-revoked gateway -> collector key id -> session
    signature (cached once verified) -> AEAD tag -> replay window -> grace of superseded sessions.
    Replay windows and the session ordering move only when every check has passed. A session announcement
    whose signature verified is cached even if that message's tag then fails: it is authentic either way.
    """

    def __init__(
        self,
        keys: list[CollectorKey],
        lookup_gateway: Callable[[str], Ed25519PublicKey | None],
        *,
        grace_seconds: float = 300,
        replay_window: int = 4096,
        max_sessions: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= len(keys) <= 2:
            raise ValueError("an Opener holds the current collector key and at most the previous one")
        if any(k.private is None for k in keys):
            raise ValueError("an Opener needs the private collector keys")
        self._keys = {k.kid: k for k in keys}
        if len(self._keys) != len(keys):
            raise ValueError("the collector keys have the same key id")
        if replay_window < 1 or max_sessions < 1 or grace_seconds < 0:
            raise ValueError("replay_window and max_sessions must be >= 1, grace_seconds >= 0")
        self._lookup = lookup_gateway
        self._grace = grace_seconds
        self._window = replay_window
        self._mask = (1 << replay_window) - 1
        self._max_sessions = max_sessions
        self._clock = clock
        self._gateways: dict[str, _Gateway] = {}
        self._cache: OrderedDict[bytes, _Session] = OrderedDict()
        self._revoked: OrderedDict[str, None] = OrderedDict()

    @property
    def cached_sessions(self) -> int:
        return len(self._cache)

    @property
    def key_ids(self) -> list[bytes]:
        return list(self._keys)

    # -- uplink

    def open(self, topic_gateway: str, topic: str, payload: bytes) -> Opened:
        payload = bytes(payload)
        n = len(payload)
        if n < _FIXED_LEN + 1 + TAG_LEN or payload[0] != FORMAT_SEALED:
            raise SealError(SealReason.MALFORMED_HEADER, f"not a sealed v2 payload ({n} bytes)")
        gw_len = payload[1]
        gw_end = 2 + gw_len
        header_end = gw_end + _ANNOUNCEMENT_LEN + COUNTER_LEN
        if not 1 <= gw_len <= MAX_GATEWAY_ID or n < header_end + TAG_LEN:
            raise SealError(SealReason.MALFORMED_HEADER, f"gateway id length {gw_len} in a {n}-byte payload")
        gw_raw = payload[2:gw_end]
        try:
            gateway = gw_raw.decode("ascii")
        except UnicodeDecodeError:
            raise SealError(SealReason.MALFORMED_HEADER, "gateway id is not ASCII") from None
        state = self._gateways.get(gateway)
        if state is None and not _GATEWAY_ID.match(gateway):
            raise SealError(SealReason.MALFORMED_HEADER, f"invalid gateway id {gateway!r}")
        if gateway != topic_gateway:
            raise SealError(SealReason.TOPIC_MISMATCH,
                            f"sealed by {gateway!r} but arrived on the topic of {topic_gateway!r}")
        try:
            topic_aad = _topic_aad(topic)
        except (UnicodeEncodeError, ValueError):
            raise SealError(SealReason.TOPIC_MISMATCH, "topic is not valid UTF-8 of at most 65535 bytes") from None

        identity = self._lookup(gateway)
        if identity is None:
            if state is not None or gateway in self._revoked:
                self.forget_gateway(gateway)
                raise SealError(SealReason.REVOKED, f"gateway {gateway!r} is revoked")
            raise SealError(SealReason.UNKNOWN_GATEWAY, f"gateway {gateway!r} is not enrolled")
        if state is None or state.identity is not identity:
            state = self._gateway_state(gateway, identity)

        key = self._keys.get(payload[gw_end:gw_end + KID_LEN])
        if key is None:
            raise SealError(SealReason.UNKNOWN_KEY,
                            f"sealed to collector key {payload[gw_end:gw_end + KID_LEN].hex()}, held: "
                            f"{', '.join(k.hex() for k in self._keys)}")

        cache_key = payload[1:gw_end + _ANNOUNCEMENT_LEN]
        session = self._cache.get(cache_key)
        if session is None or session.state is not state:
            session = self._verify_session(gateway, state, identity, key, payload, gw_end, cache_key)
        else:
            self._cache.move_to_end(cache_key)

        ctr = payload[header_end - COUNTER_LEN:header_end]
        try:
            plaintext = session.aead.decrypt(_NONCE_PREFIX + ctr, payload[header_end:], payload[:header_end] + topic_aad)
        except InvalidTag:
            raise SealError(SealReason.BAD_TAG, "authentication failed (tampered, other topic or other key)") from None

        counter = int.from_bytes(ctr, "big")
        if counter > session.highest:
            duplicate = False
        else:
            behind = session.highest - counter
            if behind >= self._window:
                raise SealError(SealReason.TOO_OLD, f"counter {counter} is {behind} behind the newest "
                                                    f"{session.highest} (window {self._window})")
            duplicate = bool((session.bits >> behind) & 1)

        now = self._clock()
        history = state.history
        if not history or history[-1][0] != session.order:  # not the newest session of this gateway
            i = bisect.bisect_right(history, (session.order, math.inf))
            if i < len(history) and now - history[i][1] > self._grace:
                raise SealError(SealReason.EXPIRED_SESSION,
                                f"session {session.sid.hex()} was superseded {now - history[i][1]:.0f} s ago "
                                f"(grace {self._grace:g} s)")

        # Every check passed: now, and only now, the state moves.
        if not duplicate:
            if counter > session.highest:
                shift = counter - session.highest
                session.bits = 1 if shift >= self._window else ((session.bits << shift) | 1) & self._mask
                session.highest = counter
            else:
                session.bits |= 1 << (session.highest - counter)
        if not session.accepted:
            session.accepted = True
            i = bisect.bisect_left(history, (session.order,))
            if i == len(history) or history[i][0] != session.order:
                history.insert(i, (session.order, now))
                if len(history) > HISTORY_PER_GATEWAY:
                    del history[0]
        return Opened(gateway, session.sid, counter, plaintext, duplicate)

    def _gateway_state(self, gateway: str, identity: Ed25519PublicKey) -> _Gateway:
        raw = identity.public_bytes_raw()
        state = self._gateways.get(gateway)
        if state is not None and state.identity_raw == raw:
            state.identity = identity
        else:  # new, or re-enrolled with another identity key: nothing verified under the old key survives
            if state is not None:
                self._drop_sessions(state)
            state = self._gateways[gateway] = _Gateway(identity, raw)
        self._revoked.pop(gateway, None)
        return state

    def _verify_session(self, gateway: str, state: _Gateway, identity: Ed25519PublicKey, key: CollectorKey,
                        payload: bytes, gw_end: int, cache_key: bytes) -> _Session:
        gw_raw = payload[2:gw_end]
        p = gw_end + KID_LEN
        sid, start, eph_pub, signature = (payload[p:p + SID_LEN], payload[p + SID_LEN:p + SID_LEN + START_LEN],
                                          payload[p + 24:p + 24 + PUB_LEN], payload[p + 56:p + 56 + SIG_LEN])
        announcement = _announcement(gw_raw, key.kid, key.public, sid, start, eph_pub)
        try:
            identity.verify(signature, announcement)
        except InvalidSignature:
            raise SealError(SealReason.BAD_SIGNATURE, f"session {sid.hex()} is not signed by {gateway!r}") from None
        try:
            shared = key.private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        except ValueError:  # a low-order point, signed by the gateway itself: a broken or hostile gateway
            raise SealError(SealReason.BAD_TAG, "the session's ephemeral key gives no shared secret") from None
        up_key, down_key = _session_keys(shared, sid, announcement, state.identity_raw)
        s = _Session()
        s.gateway = gateway
        s.state = state
        s.sid = sid
        s.cache_key = cache_key
        s.aead = ChaCha20Poly1305(up_key)
        s.down_key = down_key
        s.highest = -1
        s.bits = 0
        s.accepted = False
        # Sessions are ordered by their signed start, capped at this collector's clock when first verified so
        # that a gateway clock running ahead cannot make one session "newer" than everything after it.
        s.order = (min(int.from_bytes(start, "big"), int(self._clock() * 1000)), sid)
        old = state.sessions.get(sid)
        if old is not None:
            self._evict(old)
        if len(state.sessions) >= SESSIONS_PER_GATEWAY:
            self._evict(min(state.sessions.values(), key=lambda x: x.order))
        state.sessions[sid] = s
        self._cache[cache_key] = s
        while len(self._cache) > self._max_sessions:
            self._evict(next(iter(self._cache.values())))
        return s

    def _evict(self, s: _Session) -> None:
        self._cache.pop(s.cache_key, None)
        if s.state.sessions.get(s.sid) is s:
            del s.state.sessions[s.sid]

    def _drop_sessions(self, state: _Gateway) -> None:
        for s in list(state.sessions.values()):
            self._evict(s)

    def forget_gateway(self, gateway_id: str) -> None:
        """Revocation: drop every cached session and the session history of this gateway at once. Later
        messages are re-verified from scratch, and reported as `revoked` while lookup_gateway() returns None."""
        state = self._gateways.pop(gateway_id, None)
        if state is not None:
            self._drop_sessions(state)
        self._revoked[gateway_id] = None
        self._revoked.move_to_end(gateway_id)
        while len(self._revoked) > self._max_sessions:
            self._revoked.popitem(last=False)

    # -- downlink

    def seal_downlink(self, gateway_id: str, session_id: bytes, topic: str, plaintext: bytes) -> bytes:
        """A downlink (format 0x03) authenticated with the downlink key of a session this Opener has verified
        (normally: the session of the uplink being acknowledged). Raises SealError(unknown_session)."""
        state = self._gateways.get(gateway_id)
        session = state.sessions.get(bytes(session_id)) if state is not None else None
        if session is None:
            raise SealError(SealReason.UNKNOWN_SESSION,
                            f"no verified session {bytes(session_id).hex()} of {gateway_id!r} here")
        signed = bytes((FORMAT_DOWNLINK,)) + session.sid + _u64(int(self._clock() * 1000)) + plaintext
        return signed + _down_mac(session.down_key, gateway_id.encode("ascii"), topic, signed)

    def newest_session(self, gateway_id: str) -> bytes | None:
        """The id of the newest session of this gateway with an accepted message that this Opener still holds:
        the one to seal a downlink for when no uplink is being answered (commands, configurations)."""
        state = self._gateways.get(gateway_id)
        if state is None:
            return None
        for order, _ in reversed(state.history):
            if order[1] in state.sessions:
                return order[1]
        return None

    def seal_confidential(self, gateway_id: str, session_id: bytes, topic: str, plaintext: bytes) -> bytes:
        """A confidential downlink (format 0x04) for a session this Opener has verified. Raises
        SealError(unknown_session)."""
        state = self._gateways.get(gateway_id)
        session = state.sessions.get(bytes(session_id)) if state is not None else None
        if session is None:
            raise SealError(SealReason.UNKNOWN_SESSION,
                            f"no verified session {bytes(session_id).hex()} of {gateway_id!r} here")
        header = (bytes((FORMAT_CONFIDENTIAL,)) + session.sid + _u64(int(self._clock() * 1000))
                  + os.urandom(NONCE_LEN))
        aad = _secret_aad(gateway_id.encode("ascii"), topic, header)
        return header + ChaCha20Poly1305(_secret_key(session.down_key)).encrypt(header[1 + SID_LEN + 8:],
                                                                               plaintext, aad)
