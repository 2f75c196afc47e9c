"""Commit confirmed (edge_agent/confirm.py): which version may be tried, when it is confirmed or rolled back, and
what a start-up finds. Pure: no clock (times are arguments), no files, no sockets."""

from __future__ import annotations

from edge_agent.confirm import (
    Accept,
    Confirm,
    Confirmer,
    Queued,
    Refuse,
    Repeat,
    RollBack,
    Saved,
    StartUp,
    at_start,
)
from wire.control import ControlReason

SHA = {v: f"{v:064x}" for v in range(10)}


def trying(c: Confirmer, version: int, now: float = 0.0, fresh_from: int = 100, timeout: float = 120.0) -> None:
    assert c.offer(version, SHA[version], f"doc {version}") == Accept()
    c.begin(version, SHA[version], timeout)
    c.applied(fresh_from, now)


def test_a_fresh_acknowledgement_confirms_an_old_one_does_not() -> None:
    c: Confirmer[str] = Confirmer(0, "local", floor=0)
    trying(c, 1, now=1000.0, fresh_from=100)
    assert c.deadline == 1120.0
    assert c.acked([(90, 99)]) is None  # messages committed before the apply: they prove nothing new
    assert c.due(1119.9) is None
    assert c.acked([(95, 100)]) == Confirm(1)  # reaches the first message committed after the apply
    c.confirmed()
    assert (c.running_version, c.running_sha256, c.trial, c.deadline) == (1, SHA[1], None, None)
    assert c.acked([(100, 200)]) is None  # nothing on trial


def test_no_acknowledgement_within_the_timeout_rolls_back_and_the_version_cannot_come_back() -> None:
    c: Confirmer[str] = Confirmer(2, SHA[2], floor=2)
    trying(c, 3, now=50.0, timeout=10.0)
    assert c.due(59.99) is None
    assert c.due(60.0) == RollBack(3, "no end-to-end acknowledgement within 10 s after applying version 3")
    c.rolled_back()
    assert (c.running_version, c.trial) == (2, None)
    refused = c.offer(3, SHA[3], "redelivered")  # a late redelivery of the rolled-back version
    assert isinstance(refused, Refuse) and refused.reason == ControlReason.REPLAYED
    assert refused.detail == "version 3 is not above 3, the newest version this gateway has run or tried"
    assert c.offer(4, SHA[4], "next") == Accept()


def test_before_the_apply_there_is_no_deadline_and_no_confirmation() -> None:
    c: Confirmer[str] = Confirmer(0, "local", floor=0)
    c.begin(1, SHA[1], 30.0)
    assert c.deadline is None and c.due(10**9) is None and c.acked([(0, 10**9)]) is None


def test_versions_not_above_the_floor_are_replays_and_redeliveries_repeat_their_state() -> None:
    c: Confirmer[str] = Confirmer(5, SHA[5], floor=7)  # runs 5 (7 was tried and rolled back before a restart)
    assert c.offer(5, SHA[5], "again") == Repeat("confirmed")  # the confirmed report may have been lost
    for version in (1, 6, 7):
        decision = c.offer(version, SHA[version], "old")
        assert isinstance(decision, Refuse) and decision.reason == ControlReason.REPLAYED
    assert isinstance(c.offer(5, SHA[6], "same number, other text"), Refuse)
    trying(c, 8)
    assert c.offer(8, SHA[8], "redelivered while on trial") == Repeat("applied")


def test_the_local_file_is_version_0_and_never_a_redelivery() -> None:
    c: Confirmer[str] = Confirmer(0, SHA[0], floor=0)
    assert c.offer(1, SHA[1], "first push") == Accept()


def test_a_newer_version_during_a_trial_waits_in_one_place_the_newest_wins() -> None:
    c: Confirmer[str] = Confirmer(1, SHA[1], floor=1)
    trying(c, 2)
    assert c.offer(3, SHA[3], "doc 3") == Queued(None)
    assert c.offer(3, SHA[3], "doc 3 redelivered") == Queued(None)
    assert c.take_queued() is None  # not while the trial runs
    assert c.offer(4, SHA[4], "doc 4") == Queued(3)  # 3 is refused busy by the shell
    late = c.offer(3, SHA[3], "doc 3 late")
    assert isinstance(late, Refuse) and late.reason == ControlReason.REPLAYED
    c.confirmed()
    assert c.take_queued() == "doc 4" and c.take_queued() is None
    assert c.offer(4, SHA[4], "doc 4") == Accept()  # offered again by the shell: the floor is 2 now


def test_a_reload_sets_what_runs_and_keeps_the_floor() -> None:
    c: Confirmer[str] = Confirmer(4, SHA[4], floor=4)
    c.now_running(0, SHA[0])  # `edge-agent config reset`, then SIGHUP: the local file runs
    assert (c.running_version, c.floor) == (0, 4)
    assert isinstance(c.offer(4, SHA[4], "old"), Refuse)


def test_at_start_the_last_confirmed_runs_and_an_interrupted_trial_is_dropped() -> None:
    assert at_start(Saved()) == StartUp(False, None, False, False)  # never pushed: the local file
    assert at_start(Saved(floor=3, confirmed=3)) == StartUp(True, None, False, False)
    # kill -9 while version 4 was on trial: the confirmed 3 runs, 4 is reported rolled back (interrupted)
    assert at_start(Saved(floor=4, trying=4, confirmed=3, pending_file=True)) == StartUp(True, 4, True, True)
    # ... before the pending file was written, with nothing confirmed yet: the local file runs
    assert at_start(Saved(floor=1, trying=1)) == StartUp(False, 1, False, True)
    # killed between the confirming rename and the state file: it was confirmed, nothing to report
    assert at_start(Saved(floor=4, trying=4, confirmed=4)) == StartUp(True, None, False, True)
    # a stray pending file without a trial (killed while rolling back): removed
    assert at_start(Saved(floor=4, confirmed=3, pending_file=True)) == StartUp(True, None, True, False)
