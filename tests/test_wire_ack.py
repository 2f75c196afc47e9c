"""The end-to-end acknowledgement body (wire/ack.py): seq ranges, their codec, and the collector's pending set."""

from __future__ import annotations

import itertools
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire.ack import MAX_RANGES, AckError, PendingAcks, decode_ack, encode_ack, to_ranges

SEQ_MAX = 2**63 - 1
seqs = st.sets(st.one_of(st.integers(0, 300), st.integers(SEQ_MAX - 50, SEQ_MAX)), max_size=200)


def covered(ranges: list[tuple[int, int]]) -> set[int]:
    return {seq for first, last in ranges for seq in range(first, last + 1)}


def test_to_ranges_examples() -> None:
    assert to_ranges([]) == []
    assert to_ranges([5]) == [(5, 5)]
    assert to_ranges([3, 1, 2, 2, 7, 9, 8, 20]) == [(1, 3), (7, 9), (20, 20)]
    assert to_ranges(range(1000, 6000)) == [(1000, 5999)]  # a drained backlog is one pair


@settings(max_examples=300, deadline=None)
@given(seqs)
def test_ranges_cover_exactly_the_seqs_and_round_trip(numbers: set[int]) -> None:
    ranges = to_ranges(numbers)
    assert covered(ranges) == numbers
    for (_, last), (first, _) in itertools.pairwise(ranges):
        assert first > last + 1  # ascending, disjoint and not touching: the shortest form
    assert decode_ack(encode_ack(ranges)) == ranges


def test_encode_refuses_more_than_max_ranges() -> None:
    too_many = [(2 * i, 2 * i) for i in range(MAX_RANGES + 1)]
    with pytest.raises(ValueError, match="limit"):
        encode_ack(too_many)
    assert len(decode_ack(encode_ack(too_many[:MAX_RANGES]))) == MAX_RANGES


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "not an acknowledgement body"),
        (b"\xc1", "not an acknowledgement body"),  # never valid msgpack
        (msgspec.msgpack.encode({"first": 1}), "not an acknowledgement body"),
        (msgspec.msgpack.encode([[1, 2, 3]]), "not an acknowledgement body"),
        (msgspec.msgpack.encode([[1]]), "not an acknowledgement body"),
        (msgspec.msgpack.encode([[-1, 2]]), "not an acknowledgement body"),
        (msgspec.msgpack.encode([[1, 2**63]]), "not an acknowledgement body"),
        (msgspec.msgpack.encode([["1", "2"]]), "not an acknowledgement body"),
        (msgspec.msgpack.encode([[1.0, 2.0]]), "not an acknowledgement body"),
        (msgspec.msgpack.encode([[1, 2]]) + b"\x00", "not an acknowledgement body"),  # trailing bytes
        (msgspec.msgpack.encode([[2 * i, 2 * i] for i in range(MAX_RANGES + 1)]), f"ranges (limit {MAX_RANGES})"),
        (msgspec.msgpack.encode([[5, 4]]), "range 0: first 5 > last 4"),
        (msgspec.msgpack.encode([[1, 5], [3, 8]]), "range 1 [3, 8] overlaps"),
        (msgspec.msgpack.encode([[1, 5], [6, 8]]), "range 1 [6, 8] overlaps or touches"),
        (msgspec.msgpack.encode([[10, 12], [1, 2]]), "range 1 [1, 2] overlaps"),  # not ascending
        (msgspec.msgpack.encode([[1, 1], [1, 1]]), "range 1 [1, 1] overlaps"),
    ],
)
def test_every_malformed_body_is_an_ack_error(body: bytes, message: str) -> None:
    with pytest.raises(AckError, match=re.escape(message)):
        decode_ack(body)


def test_empty_body_list_and_extremes_are_valid() -> None:
    assert decode_ack(encode_ack([])) == []
    assert decode_ack(encode_ack([(0, SEQ_MAX)])) == [(0, SEQ_MAX)]


def test_pending_acks_per_gateway_then_empty() -> None:
    pending = PendingAcks()
    assert not pending and pending.take() == {}
    for seq in (4, 2, 3, 3, 9):  # a re-sent seq is acknowledged again, once per message
        pending.add("gw-a", seq)
    pending.add("gw-b", 7)
    assert pending
    assert pending.take() == {"gw-a": [[(2, 4), (9, 9)]], "gw-b": [[(7, 7)]]}
    assert not pending and pending.take() == {}


def test_pending_acks_split_at_max_ranges() -> None:
    pending = PendingAcks()
    every_other = [2 * i for i in range(2 * MAX_RANGES + 3)]  # no two adjacent: one range each
    for seq in every_other:
        pending.add("gw-a", seq)
    messages = pending.take()["gw-a"]
    assert [len(m) for m in messages] == [MAX_RANGES, MAX_RANGES, 3]
    assert [first for m in messages for first, _ in m] == every_other  # in order, nothing lost or repeated
    for m in messages:
        assert decode_ack(encode_ack(m)) == m
