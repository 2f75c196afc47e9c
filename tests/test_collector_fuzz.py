"""Fuzz: whatever a peer sends ends in a typed rejection (a reason code), never in an exception.

Random and mutated envelopes (plain and sealed), authentic sealed bodies that are garbage inside, bodies that
are valid msgpack of the wrong shape, and status documents are driven through the whole collector path
(`Collector._process`: admission's successor, ingest, guard, health, the batch writer) into a real influxd.
The collector turns an unexpected exception into Reason.INTERNAL (one log line a minute): the test fails if
that ever happens, and if InfluxDB refuses a line the collector made (the collector must never make a line
the store cannot take).
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import msgspec
import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.app import Collector
from collector.config import CollectorConfig
from collector.reasons import Reason
from wire import topics
from wire.config import load
from wire.envelope import seal_plain
from wire.schema import Batch, Reading, encode_batch
from wire.seal import CollectorKey, GatewaySealer, Opener

pytestmark = pytest.mark.integration
NOW = None  # receive times are the real clock: the collector's time policy is relative to them

names = st.text(min_size=1, max_size=12)
values = st.one_of(st.floats(allow_nan=True), st.integers(min_value=-(2**64), max_value=2**64), st.booleans(),
                   st.text(max_size=20))
readings = st.builds(
    lambda device, measurement, t, fields, tags, quality: Reading(device, measurement, t, fields, tags, quality),
    names, names, st.integers(min_value=0, max_value=2**63 - 1) | st.just(-1),
    st.dictionaries(names, values, max_size=4), st.dictionaries(names, st.text(max_size=10), max_size=2),
    st.dictionaries(names, st.text(max_size=10), max_size=2),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=15,
)


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(4)
        if op == 0 and buf:
            buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
        elif op == 1 and buf:
            del buf[rnd.randrange(len(buf)):]
        elif op == 2:
            buf[rnd.randrange(len(buf) + 1):0] = rnd.randbytes(rnd.randint(1, 8))
        elif buf:
            i = rnd.randrange(len(buf))
            buf[i] = rnd.choice([0x00, 0xFF, 0xC1, 0xDC, 0xDD, 0xDF, 0xD9, 0x80, 0x7F])
    return bytes(buf)


def _message(topic: str, payload: bytes, mid: int, retain: bool = False) -> paho.MQTTMessage:
    msg = paho.MQTTMessage(mid=mid, topic=topic.encode())
    msg.payload = payload
    msg.qos = 0  # no PUBACK: there is no broker in this test
    msg.retain = retain
    return msg


@pytest.fixture
def collector(tmp_path: Path, influxd, influx_db: str):
    cfg_path = tmp_path / "collector.toml"
    cfg_path.write_text(
        f'[influx]\nurl = "{influxd.url}"\ndatabase = "{influx_db}"\nflush_interval = "50ms"\n'
        f'[quarantine]\npath = "{tmp_path / "q.db"}"\n[log]\nstats_interval = "0s"\n'
    )
    cfg = load(cfg_path, CollectorConfig)
    c = Collector(cfg)
    key = CollectorKey.generate()
    identity = Ed25519PrivateKey.generate()
    c.ingest.opener = Opener([key], lambda gw: identity.public_key() if gw == "gw-s" else None)
    c.sealer = GatewaySealer("gw-s", identity, key.public_only())  # the test's own gateway, for sealed bodies
    return c


def run_fuzz(collector: Collector, messages: list[paho.MQTTMessage]) -> None:
    async def main() -> None:
        await collector.writer.start()
        try:
            for msg in messages:
                gateway, kind = topics.parse("citynerve/v1", msg.topic)  # as admission hands it over
                await collector._process(gateway, msg, __import__("time").time_ns(), kind)
        finally:
            await collector.writer.close(drain=True)

    asyncio.run(main())
    internal = collector.rejections.get(Reason.INTERNAL, 0)
    assert internal == 0 and not collector.counters.get("internal_errors"), (
        f"unexpected exceptions in the per-message path: {collector.rejections}")
    assert not collector.rejections.get(Reason.INFLUX_REFUSED), (
        f"the collector made lines InfluxDB refused: {collector.counters}")


def test_fuzzed_uplinks_and_status_documents_end_in_reason_codes(collector: Collector) -> None:
    rnd = random.Random(20261205)
    msgs: list[paho.MQTTMessage] = []
    mid = 0

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(readings, max_size=4), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1),
           st.sampled_from(["plain", "sealed", "mutated-plain", "mutated-sealed", "raw-sealed-body", "status",
                            "status-raw"]),
           st.dictionaries(st.sampled_from(["state", "time_ns", "gateway", "devices", "backlog_messages",
                                            "version", "x"]) | st.text(max_size=6), json_values, max_size=6),
           st.binary(max_size=64))
    def gather(rs: list[Reading], seq: int, sent: int, kind: str, doc: dict, junk: bytes) -> None:
        nonlocal mid
        mid += 1
        gw = "gw-s" if "sealed" in kind else "gw-p"
        try:
            body = encode_batch(Batch(gw, seq, sent, rs))
        except (msgspec.EncodeError, OverflowError, ValueError):
            body = junk
        if kind == "plain":
            msgs.append(_message(f"citynerve/v1/{gw}/up", b"\x01" + body, mid))
        elif kind == "mutated-plain":
            msgs.append(_message(f"citynerve/v1/{gw}/up", _mutate(b"\x01" + body, rnd), mid))
        elif kind == "sealed":
            msgs.append(_message(f"citynerve/v1/{gw}/up", collector.sealer.seal(f"citynerve/v1/{gw}/up", body), mid))
        elif kind == "mutated-sealed":
            sealed = collector.sealer.seal(f"citynerve/v1/{gw}/up", body)
            msgs.append(_message(f"citynerve/v1/{gw}/up", _mutate(sealed, rnd), mid))
        elif kind == "raw-sealed-body":  # authentic, and garbage inside: only the decoder stands between
            inner = _mutate(body, rnd) if rnd.random() < 0.7 else junk
            msgs.append(_message(f"citynerve/v1/{gw}/up", collector.sealer.seal(f"citynerve/v1/{gw}/up", inner), mid))
        elif kind == "status":
            payload = json.dumps(doc).encode()
            msgs.append(_message(f"citynerve/v1/{gw}/status", payload, mid, retain=rnd.random() < 0.2))
        else:
            payload = _mutate(json.dumps({"state": "online", "devices": {"d": {"polls": 1}}, **doc}).encode(), rnd)
            msgs.append(_message(f"citynerve/v1/{gw}/status", payload, mid))

    gather()
    # the hand-made worst cases as well
    msgs += [
        _message("citynerve/v1/gw-p/up", b"", 1),
        _message("citynerve/v1/gw-p/up", b"\x01" + encode_batch(Batch("gw-p", 1, 1, [])).replace(b"gw-p", b"gw\xffp"), 2),
        _message("citynerve/v1/gw-p/up", b"\x01" + b"\x91" * 100_000, 3),  # nested arrays
        _message("citynerve/v1/gw-p/status", b'{"state":"online","x":' + b"[" * 30_000 + b"]" * 30_000 + b"}", 4),
        _message("citynerve/v1/gw-p/status", b'{"state":"online","version":"\xff"}', 5),
        _message("citynerve/v1/gw-p/status", b"[" * 300_000, 6),
        _message("citynerve/v1/gw-p/up", seal_plain(Batch("gw-p", 1, 2**63 - 1, [
            Reading("d\u0085", "m", 2**63 - 1, {"v": 1.0}), Reading("d", "m\x7f", 1, {"v": 1.0}),
            Reading("d", "m", 10**18 * 9, {"v": 2**63}), Reading("d", "m", 0, {"time": 1.0}),
            Reading("d", "#m", 0, {"v": 1.0}), Reading("d\\", "m", 0, {"v": 1.0}),
            Reading("d", "m", 0, {"v": "a\nb"}),
        ])), 7),
    ]
    run_fuzz(collector, msgs)
    # most of it was refused, with codes; the well-formed rest was written
    assert sum(collector.rejections.values()) > 100
    assert collector.counters["lines_written"] > 0
