"""The pure cores of isolation: admission (collector/admission.py) and the store guard (collector/guard.py).

No clock, no sockets: time is a number passed in.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.admission import FairQueue, Limits
from collector.guard import Guard, GuardLimits, learn_from_show_keys
from collector.ingest import Ingest, TimePolicy
from collector.reasons import Reason
from wire.envelope import seal_plain
from wire.schema import Batch, Reading

NOW = 1_800_000_000_000_000_000

# -- admission ---------------------------------------------------------------------------------------------------


def test_round_robin_gives_every_gateway_its_turn_whatever_one_of_them_sends() -> None:
    q = FairQueue(Limits(burst=1000, rate=1))
    for i in range(100):
        assert q.offer("flood", f"f{i}", 10, 0.0) is None
    for i in range(3):
        assert q.offer("b", f"b{i}", 10, 0.0) is None
    order = []
    while (job := q.take()) is not None:
        order.append(job)
        q.done(job[0])
    # b's three messages are among the first six taken, not after the flood's hundred
    assert [item for _, item in order[:6]] == ["f0", "b0", "f1", "b1", "f2", "b2"]
    assert len(order) == 103


def test_a_busy_gateway_is_skipped_and_keeps_its_turn() -> None:
    q = FairQueue(Limits(gateway_pending_lines=100))
    q.offer("a", "a0", 1, 0.0)
    q.offer("a", "a1", 1, 0.0)
    q.offer("b", "b0", 1, 0.0)
    assert q.take() == ("a", "a0")
    assert q.take() == ("b", "b0")  # a is working on a0
    assert q.take() is None
    q.done("a")
    q.lines_pending("a", 100)  # its lines wait for the writer: no more of its messages until they are written
    assert q.take() is None
    q.lines_pending("a", -100)
    assert q.take() == ("a", "a1")


def test_rate_limit_queue_bound_and_global_bound_have_their_own_reasons() -> None:
    q = FairQueue(Limits(rate=1, burst=2, gateway_messages=10, max_messages=100))
    assert q.offer("a", 1, 1, 0.0) is None
    assert q.offer("a", 2, 1, 0.0) is None
    assert q.offer("a", 3, 1, 0.0) is Reason.RATE_LIMITED
    assert q.offer("a", 4, 1, 1.0) is None  # one token back after a second
    assert q.declined("a") == 1

    q = FairQueue(Limits(rate=1000, burst=1000, gateway_messages=2, max_messages=100))
    assert [q.offer("a", i, 1, 0.0) for i in range(3)] == [None, None, Reason.QUEUE_FULL]
    assert q.offer("b", 0, 1, 0.0) is None  # a's full queue is a's problem only

    q = FairQueue(Limits(rate=1000, burst=1000, gateway_messages=3, max_messages=4))
    for gw in "abcd":
        assert q.offer(gw, 0, 1, 0.0) is None
    assert q.offer("e", 0, 1, 0.0) is Reason.OVERLOAD


def test_byte_budgets() -> None:
    q = FairQueue(Limits(byte_rate=100, byte_burst=1000, gateway_bytes=10_000, max_bytes=1_000_000))
    assert q.offer("a", 1, 900, 0.0) is None
    assert q.offer("a", 2, 200, 0.0) is Reason.RATE_LIMITED
    assert q.offer("a", 3, 200, 1.0) is None
    # a message larger than the burst passes only with a full bucket, and empties it for as long as it is over
    q = FairQueue(Limits(byte_rate=100, byte_burst=1000, gateway_bytes=100_000, max_bytes=1_000_000))
    assert q.offer("a", 1, 5000, 0.0) is None
    assert q.offer("a", 2, 10, 1.0) is Reason.RATE_LIMITED
    assert q.offer("a", 3, 10, 41.0) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 5000), st.booleans()), max_size=200))
def test_admission_bounds_hold_and_nothing_is_taken_twice(events: list[tuple[str, int, bool]]) -> None:
    lim = Limits(max_messages=20, max_bytes=30_000, gateway_messages=8, gateway_bytes=12_000, rate=5, burst=10,
                 byte_rate=5000, byte_burst=20_000)
    q = FairQueue(lim)
    taken: list[int] = []
    offered = 0
    for i, (gw, size, take) in enumerate(events):
        if take:
            job = q.take()
            if job is not None:
                taken.append(job[1])
                q.done(job[0])
        elif q.offer(gw, i, size, i * 0.1) is None:
            offered += 1
        assert q.messages <= lim.max_messages and q.bytes <= lim.max_bytes
    rest = q.drain()
    assert len(taken) + len(rest) == offered
    assert len(set(taken)) == len(taken)


# -- the guard --------------------------------------------------------------------------------------------------


def check(guard: Guard, gateway: str, measurement: str, fields: dict, device: str = "m", tags: dict | None = None,
          quality: dict | None = None, now: float = 0.0):
    point_tags = {**(tags or {}), "gateway": gateway, "device": device}
    return guard.check(gateway, measurement, point_tags, fields, quality or {}, now)


def test_a_field_type_once_known_cannot_be_changed_by_any_gateway() -> None:
    g = Guard()
    assert check(g, "good", "electricity", {"power": 1.5}).fields == {"power": 1.5}
    v = check(g, "evil", "electricity", {"power": "x", "energy": 3.0})
    assert v.fields == {"energy": 3.0}
    assert v.declined[0][0] is Reason.FIELD_TYPE_CONFLICT and "power" in v.declined[0][1]
    # an integer where the store holds a float is the same number, written as a float
    assert check(g, "good", "electricity", {"power": 2}).fields == {"power": 2.0}
    assert type(check(g, "good", "electricity", {"power": 2}).fields["power"]) is float
    # but never a float into an integer field, nor a bool into a float one
    check(g, "good", "counter", {"n": 1})
    assert check(g, "evil", "counter", {"n": 1.5}).fields is None
    assert check(g, "evil", "electricity", {"power": True}).fields is None


def test_types_learnt_from_the_store_win() -> None:
    g = Guard()
    doc = {"results": [
        {"statement_id": 0, "series": [{"name": "electricity", "columns": ["fieldKey", "fieldType"],
                                        "values": [["power", "float"], ["state", "string"]]}]},
        {"statement_id": 1, "series": [{"name": "electricity", "columns": ["tagKey"],
                                        "values": [["device"], ["gateway"], ["site"]]}]},
    ]}
    assert learn_from_show_keys(g, doc) == (2, 3)
    assert check(g, "evil", "electricity", {"power": "claimed"}).fields is None
    assert check(g, "evil", "electricity", {"site": 1.0}).declined[0][0] is Reason.RESERVED_NAME
    assert learn_from_show_keys(g, {"results": "garbage"}) == (0, 0)


def test_types_are_learnt_from_influx_refusals() -> None:
    g = Guard()
    check(g, "a", "m", {"v": "s"})  # we thought string ...
    reason = ('partial write: field type conflict: input field "v" on measurement "m" is type string, '
              'already exists as type float dropped=1')
    assert g.learn_from_refusal(reason) == 1
    assert g.field_type("m", "v") == "float"  # ... the store knows better


@pytest.mark.parametrize("fields, tags, quality", [
    ({"gateway": 1.0}, {}, {}),
    ({"device": 1.0}, {}, {}),
    ({"measurement": 1.0}, {}, {}),
    ({"model": 1.0}, {"model": "SDM630"}, {}),
    ({"v": 1.0, "v_quality": 2.0}, {}, {"v": "error"}),
])
def test_a_field_may_not_be_named_like_a_tag(fields: dict, tags: dict, quality: dict) -> None:
    v = check(Guard(), "evil", "electricity", fields, tags=tags, quality=quality)
    assert Reason.RESERVED_NAME in [r for r, _ in v.declined]


def test_a_tag_key_seen_on_a_measurement_is_reserved_for_everyone() -> None:
    g = Guard()
    check(g, "good", "electricity", {"p": 1.0}, tags={"site": "north"})
    assert check(g, "evil", "electricity", {"site": 5.0, "p": 1.0}).fields == {"p": 1.0}


def test_collector_measurements_are_reserved() -> None:
    v = check(Guard(), "evil", "citynerve_gateway_health", {"online": 1})
    assert v.fields is None and v.declined[0][0] is Reason.RESERVED_NAME


def test_cardinality_budgets_per_gateway_and_window() -> None:
    g = Guard(GuardLimits(window=60, new_series=3, new_devices=2, new_fields=4, new_measurements=2,
                          max_series=5, max_devices=3))
    assert check(g, "a", "m", {"v": 1.0}, device="d1").fields
    assert check(g, "a", "m", {"v": 1.0}, device="d2").fields
    v = check(g, "a", "m", {"v": 1.0}, device="d3")
    assert v.fields is None and v.declined[0][0] is Reason.DEVICE_LIMIT
    # another gateway has its own budget
    assert check(g, "b", "m", {"v": 1.0}, device="d3").fields
    # a new window, a new budget; but not beyond the total
    assert check(g, "a", "m", {"v": 1.0}, device="d3", now=61).fields
    assert check(g, "a", "m", {"v": 1.0}, device="d4", now=200).declined[0][0] is Reason.DEVICE_LIMIT
    # series: tags that make new series count
    assert check(g, "a", "m", {"v": 1.0}, device="d1", tags={"x": "1"}, now=300).fields
    assert check(g, "a", "m", {"v": 1.0}, device="d1", tags={"x": "2"}, now=300).fields
    assert check(g, "a", "m", {"v": 1.0}, device="d1", tags={"x": "3"}, now=300).declined[0][0] is Reason.SERIES_LIMIT
    # known series always pass
    assert check(g, "a", "m", {"v": 2.0}, device="d1", tags={"x": "1"}, now=300).fields
    # measurements and field names
    assert check(g, "a", "m2", {"v": 1.0}, device="d1", now=400).fields is None  # series total reached
    g2 = Guard(GuardLimits(new_fields=2, new_measurements=1))
    assert check(g2, "a", "m", {"a": 1.0, "b": 1.0, "c": 1.0}).declined == [
        (Reason.FIELD_LIMIT, "m.c: more than 2 new field names from this gateway within 3600 s")]
    assert check(g2, "a", "other", {"a": 1.0}).declined[0][0] is Reason.MEASUREMENT_LIMIT
    assert check(g2, "b", "other", {"a": 1.0}).fields  # b's budget is its own


def test_ingest_drops_what_the_guard_declines_and_keeps_the_rest() -> None:
    guard = Guard()
    ingest = Ingest("citynerve/v1", 1 << 20, TimePolicy(300 * 10**9, 0, 45 * 86400 * 10**9), "suspect", guard=guard)
    good = Batch("good", 1, NOW, [Reading("m1", "electricity", NOW, {"power": 1.0})])
    ingest.uplink("citynerve/v1/good/up", seal_plain(good), NOW)
    evil = Batch("evil", 1, NOW, [Reading("x", "electricity", NOW, {"power": "s", "gateway": 1.0, "ok": 2.0}),
                                  Reading("x", "citynerve_ingest", NOW, {"seq": 1})])
    accepted = ingest.uplink("citynerve/v1/evil/up", seal_plain(evil), NOW)
    assert accepted.declined == {Reason.FIELD_TYPE_CONFLICT: 1, Reason.RESERVED_NAME: 2}
    assert not accepted.held
    assert accepted.lines[0] == b"electricity,device=x,gateway=evil ok=2.0 " + str(NOW).encode()
    assert len(accepted.lines) == 2  # and the ingest record


def test_times_that_would_open_far_shards_never_become_point_times() -> None:
    ingest = Ingest("citynerve/v1", 1 << 20, TimePolicy(300 * 10**9, 0, 45 * 86400 * 10**9), "suspect")
    old = NOW - 46 * 86400 * 10**9
    batch = Batch("gw", 1, 2**62, [Reading("m", "e", old, {"v": 1.0})])  # sent_ns in the 22nd century
    accepted = ingest.uplink("citynerve/v1/gw/up", seal_plain(batch), NOW)
    assert accepted.suspect == 1
    assert accepted.lines[0].endswith(b" " + str(NOW).encode())
    assert accepted.lines[1].startswith(b"citynerve_ingest,") and accepted.lines[1].endswith(b" " + str(NOW).encode())


def test_bytes_waiting_for_the_writer_are_bounded_per_gateway_and_in_all() -> None:
    q = FairQueue(Limits(gateway_pending_bytes=1000, max_pending_bytes=1500))
    for gw in "abc":
        q.offer(gw, gw + "0", 1, 0.0)
        q.offer(gw, gw + "1", 1, 0.0)
    assert q.take() == ("a", "a0")
    q.done("a")
    q.lines_pending("a", 1, 1000)  # a's first message: 1000 bytes of lines wait for the writer
    assert q.take() == ("b", "b0")
    q.done("b")
    assert q.take() == ("c", "c0")  # a is passed over
    q.done("c")
    q.lines_pending("b", 1, 600)  # 1600 bytes wait in all: nobody's next message now
    assert q.take() is None
    q.lines_pending("a", -1, -1000)
    assert q.take() == ("a", "a1")
