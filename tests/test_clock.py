"""The clock correction of a gateway without RTC (edge_agent/clock.py), without a clock: events in, decisions out;
and its part of the outbox (the `held` table)."""

from __future__ import annotations

import time
from pathlib import Path

from edge_agent.clock import (
    MAX_STAMP_GAP_NS,
    ClockCorrection,
    Offset,
    Stamp,
    boot_stamp,
    corrected,
    decode_held,
    encode_held,
    kernel_clock,
    uncorrectable,
)
from edge_agent.outbox import HeldGroup, NewMessage, Outbox
from wire.schema import Reading

S = 10**9
YEARS = 5 * 365 * 86400 * S
TRUE_NOW = 1_750_000_000 * S  # the real time at boottime 1000 s
BOOT = 1000 * S


def reading(time_ns: int, v: float = 1.0, quality: dict | None = None) -> Reading:
    return Reading("meter", "electricity", time_ns, {"v": v}, {}, quality or {})


def test_with_an_rtc_everything_is_sent_as_stamped() -> None:
    c = ClockCorrection("boot-a", hold=False)
    assert c.stamped(synchronised=False) is True and c.stamped(synchronised=True) is True


def test_unsynchronised_readings_are_held_then_converted_with_the_ntp_offset() -> None:
    c = ClockCorrection("boot-a", hold=True)
    wrong_wall = TRUE_NOW - YEARS  # the clock five years back
    assert c.stamped(synchronised=False) is False  # hold
    held = [(boot_stamp(wrong_wall - 2 * S, Stamp(wrong_wall, BOOT)), reading(wrong_wall - 2 * S))]
    assert held[0][0] == BOOT - 2 * S
    assert c.release("boot-a") is False  # still no offset: keep holding
    # 10 s later NTP steps the clock: wall is right now, and so is wall - boottime
    offset = c.synchronised(Stamp(TRUE_NOW + 10 * S, BOOT + 10 * S))
    assert offset == Offset(TRUE_NOW - BOOT, 0, "ntp")
    assert c.stamped(synchronised=True) is True
    assert c.release("boot-a") == offset
    [fixed] = corrected(held, offset)
    assert fixed.time_ns == TRUE_NOW - 2 * S  # the true time of the reading
    assert fixed.quality == {"time": "corrected_ntp"} and fixed.fields == {"v": 1.0}


def test_an_earlier_boots_readings_cannot_be_corrected() -> None:
    c = ClockCorrection("boot-b", hold=True)
    c.synchronised(Stamp(TRUE_NOW, BOOT))
    assert c.release("boot-a") is True  # send as uncorrectable: its boottime is meaningless in this boot
    [r] = uncorrectable([(5 * S, reading(123, quality={"x": "error"}))])
    assert r.time_ns == 123 and r.quality == {"x": "error", "time": "uncorrectable"}


def test_an_acknowledgement_bounds_the_offset_by_its_round_trip() -> None:
    c = ClockCorrection("boot-a", hold=True, max_ack_error_ns=2 * S)
    # a message first sent at boottime 100 s, acked at 101 s; the collector sealed the ack at its time T
    collector = TRUE_NOW
    offset = c.acked(collector, 100 * S, 101 * S)
    assert offset == Offset(collector - 100_500_000_000, 500_000_000, "ack")
    # the true offset lies in [T - 101 s, T - 100 s]: the estimate is within +- error of either end
    for true in (collector - 101 * S, collector - 100 * S):
        assert abs(offset.offset_ns - true) <= offset.error_ns
    assert c.stamped(synchronised=False) == offset  # restamp at once from now on
    assert c.release("boot-a") == offset
    [r] = corrected([(100 * S, reading(0))], offset)
    assert r.quality["time"] == "corrected_ack"
    # a slower round trip is not taken; a newer good one replaces the older (boottime drifts against real time)
    assert c.acked(collector, 100 * S, 106 * S) is None and c.offset == offset
    newer = c.acked(collector + 60 * S, 159 * S, 160 * S)
    assert newer is not None and c.offset == newer
    # NTP wins over acknowledgements
    ntp = c.synchronised(Stamp(TRUE_NOW, BOOT))
    assert c.acked(collector, 100 * S, 100 * S) is None and c.offset == ntp


def test_acknowledgements_are_ignored_when_switched_off_or_out_of_order() -> None:
    assert ClockCorrection("b", hold=True, from_acks=False).acked(TRUE_NOW, 1, 2) is None
    assert ClockCorrection("b", hold=True).acked(TRUE_NOW, 5 * S, 4 * S) is None


def test_boot_stamp_falls_back_to_the_pair_when_the_clock_stepped_in_between() -> None:
    now = Stamp(TRUE_NOW, BOOT)
    assert boot_stamp(TRUE_NOW - 3 * S, now) == BOOT - 3 * S
    assert boot_stamp(TRUE_NOW + S, now) == BOOT  # stamped "after" the pair: a step backwards in between
    assert boot_stamp(TRUE_NOW - MAX_STAMP_GAP_NS - 1, now) == BOOT  # a step forwards in between


def test_held_rows_are_encoded_losslessly() -> None:
    held = [(7 * S, reading(1, 2.5, {"a": "error"})), (8 * S, reading(2))]
    assert decode_held(encode_held(held)) == held


def test_kernel_clock_reads_without_privilege() -> None:
    state = kernel_clock()
    assert state is not None and isinstance(state[0], bool) and state[1] >= 0


def test_the_outbox_holds_releases_and_bounds_held_readings(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", 1_000_000, 3600)
    body = encode_held([(S, reading(1))])
    box.commit([], hold=[HeldGroup("boot-a", 1, body), HeldGroup("boot-b", 1, body)])
    assert (box.held.rows, box.held.readings, box.held.boots) == (2, 2, frozenset({"boot-a", "boot-b"}))
    box.close()
    box = Outbox(tmp_path / "outbox.sqlite3", 1_000_000, 3600)  # durable
    assert box.held.readings == 2
    [(row_id, boot, got)] = box.held_groups(["boot-a"])
    assert boot == "boot-a" and decode_held(got) == decode_held(body)
    # released in the transaction that commits the converted message
    box.commit([NewMessage(0, time.time_ns(), 1, b"converted")], release=[row_id])
    assert box.held.boots == frozenset({"boot-b"}) and box.backlog.messages == 1
    # held readings count against the size bound with the messages: the oldest held row goes first
    box.set_bounds(len(b"converted") + len(body), 3600)
    box.commit([], hold=[HeldGroup("boot-c", 1, body)])
    assert box.held.boots == frozenset({"boot-c"}) and box.dropped_readings_total == 1
    box.close()
