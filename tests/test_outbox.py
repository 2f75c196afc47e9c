"""The durable outbox (SQLite, real files) and the pure delivery rules."""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.delivery import Delivery, Publish, ReadBodies, ScanBacklog, Sender, Wait
from edge_agent.outbox import NewMessage, Outbox
from labkit.faults import kill_inside_write

NOW = 1_700_000_000_000_000_000


def message(seq: int, size: int = 100, created_ns: int = NOW, readings: int = 3) -> NewMessage:
    return NewMessage(seq, created_ns, readings, bytes([seq % 256]) * size)


def test_commit_inserts_and_acks_delete_in_one_transaction(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=10**6, max_age_s=86400, clock=lambda: NOW)
    box.commit([message(s) for s in range(10)])
    assert (box.backlog.messages, box.backlog.readings, box.backlog.bytes) == (10, 30, 1000)
    assert (box.backlog.oldest_seq, box.backlog.newest_seq) == (0, 9)
    box.commit([message(10)], acked=[(0, 3), (7, 7), (50, 60)])
    assert box.seqs_after(-1, 100) == [4, 5, 6, 8, 9, 10]
    assert (box.backlog.messages, box.backlog.oldest_seq) == (6, 4)
    assert box.bodies([9, 4, 99]) == [(4, bytes([4]) * 100), (9, bytes([9]) * 100)]
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite3", max_bytes=10**6, max_age_s=86400, clock=lambda: NOW)
    assert (reopened.backlog.messages, reopened.backlog.bytes, reopened.backlog.oldest_seq) == (6, 600, 4)
    assert sqlite3.connect(tmp_path / "o.sqlite3").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bounds_drop_oldest_by_size_and_age_counted_and_persistent(tmp_path: Path) -> None:
    clock = [NOW]
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=1000, max_age_s=60, clock=lambda: clock[0])
    dropped = box.commit([message(s) for s in range(12)])  # 1200 bytes > 1000
    assert (dropped.messages, dropped.by_size, dropped.readings, dropped.seqs) == (2, 2, 6, [(0, 1)])
    assert box.backlog.oldest_seq == 2 and box.backlog.bytes == 1000
    clock[0] = NOW + 61 * 10**9
    dropped = box.commit([message(12, created_ns=clock[0])])
    assert (dropped.by_age, dropped.seqs) == (10, [(2, 11)])
    assert box.seqs_after(-1, 100) == [12]
    assert box.dropped_readings_total == 36
    box.close()
    assert Outbox(tmp_path / "o.sqlite3", 1000, 60, clock=lambda: clock[0]).dropped_messages_total == 12


@pytest.mark.parametrize("damage", ["garbage", "truncated_page"])
def test_damaged_database_is_moved_aside_and_a_new_one_started(tmp_path: Path, damage: str, caplog) -> None:
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, 10**6, 86400, clock=lambda: NOW)
    box.commit([message(s, size=5000) for s in range(20)])
    box.close()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        data = bytearray(path.read_bytes())
        data[4096 * 2:4096 * 3] = os.urandom(4096)  # a page of the table, as a failing SD card returns it
        path.write_bytes(bytes(data))
    box = Outbox(path, 10**6, 86400, clock=lambda: NOW)
    assert box.resets == 1 and box.backlog.messages == 0
    # Sequence numbers continue from what the damaged file still tells (its counter, its highest message).
    assert box.next_seq == {"garbage": 0, "truncated_page": 20}[damage]
    assert "moved aside" in caplog.text and "Polling goes on" in caplog.text
    aside = [p.name for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert aside and all(name.startswith("o.sqlite3.damaged-") for name in aside)
    box.commit([message(100)])
    assert box.seqs_after(-1, 10) == [100]


def test_an_outbox_moved_aside_during_a_run_passes_its_numbering_on(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = Outbox(path, 10**6, 86400, clock=lambda: NOW)
    box.commit([message(s) for s in range(10)])
    box.commit([], acked=[(0, 9)])
    path.write_bytes(b"this is not a database" * 100)  # what a commit would trip over: nothing readable left
    box._move_aside(sqlite3.DatabaseError("file is not a database"))
    box._open()
    assert box.resets == 1 and box.backlog.messages == 0 and box.next_seq == 10
    with pytest.raises(ValueError):
        box.commit([message(9)])


def test_schema_from_the_future_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    box = Outbox(path, 10**6, 86400)
    assert box.resets == 1  # moved aside (kept for a newer agent), never reinterpreted


_COMMITTER = textwrap.dedent("""
    import sys, time
    from edge_agent.outbox import NewMessage, Outbox
    box = Outbox(sys.argv[1], 10**9, 10**9)
    seq = (box.backlog.newest_seq or 0) + 1
    print("ready", flush=True)
    while True:
        cycle = [NewMessage(seq + i, time.time_ns(), 50, bytes([i]) * 4000) for i in range(25)]
        box.commit(cycle, acked=[(seq - 200, seq - 101)])
        seq += 25
""")


def test_kill_9_in_the_middle_of_commits_keeps_whole_cycles(tmp_path: Path) -> None:
    """A real process committing 25-message cycles is killed at random moments and inside its WAL writes and
    syncs: every reopened database is intact and holds whole cycles only (the commit is all or nothing), and
    sequence numbers stay consecutive."""
    path = tmp_path / "o.sqlite3"
    rng = __import__("random").Random(5)
    inside: list[str | None] = []
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-c", _COMMITTER, str(path)], stdout=subprocess.PIPE,
                                cwd=Path(__file__).parent.parent)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        if attempt % 2:
            time.sleep(rng.uniform(0.05, 0.4))
            proc.kill()
        else:
            inside.append(kill_inside_write(proc.pid, "o.sqlite3-wal", timeout=5))
        proc.wait()
        box = Outbox(path, 10**9, 10**9)
        assert box.resets == 0
        seqs = box.seqs_after(-1, 10**6)
        box.close()
        assert seqs, "nothing committed"
        assert len(seqs) % 25 == 0 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert seqs[0] % 25 == 1 and seqs[-1] % 25 == 0  # whole cycles: 1 + 25k .. 25(k + 1)
    assert all(inside), f"half the kills must land inside a WAL write or sync: {inside}"


_NUMBERER = textwrap.dedent("""
    import sys, time
    from edge_agent.outbox import NewMessage, Outbox
    box = Outbox(sys.argv[1], 10**9, 10**9)
    print("ready", box.next_seq, flush=True)
    while True:
        seq = box.next_seq  # the agent's way: numbers from the outbox's own counter
        box.commit([NewMessage(seq + i, time.time_ns(), 1, bytes([i]) * 3000) for i in range(10)])
        print(seq + 9, flush=True)
        box.commit([], acked=[(0, seq + 9)])  # all acknowledged: the outbox is empty, only the counter remains
""")


def test_kill_9_never_gives_a_sequence_number_twice(tmp_path: Path) -> None:
    """The sequence counter lives in the outbox's transactions: a process numbering and committing cycles, and
    deleting every message as acknowledged (so an empty outbox cannot tell the numbers), is killed at random
    moments and inside its WAL writes and syncs; every restart numbers above everything committed before."""
    path = tmp_path / "o.sqlite3"
    rng = __import__("random").Random(7)
    highest = -1  # the highest seq a killed process reported committed
    inside: list[str | None] = []
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", _NUMBERER, str(path)], stdout=subprocess.PIPE,
                                cwd=Path(__file__).parent.parent)
        assert proc.stdout is not None
        ready, first = proc.stdout.readline().split()
        assert ready == b"ready" and int(first) > highest
        if attempt % 2:
            time.sleep(rng.uniform(0.05, 0.4))
            proc.kill()
        else:
            inside.append(kill_inside_write(proc.pid, "o.sqlite3-wal", timeout=5))
        proc.wait()
        reported = [int(line) for line in proc.stdout.read().split()]
        assert all(seq >= int(first) for seq in reported)
        highest = max([highest, *reported])
        box = Outbox(path, 10**9, 10**9)
        assert box.resets == 0 and box.next_seq > highest
        box.close()
    assert all(inside), f"half the kills must land inside a WAL write or sync: {inside}"
    assert highest >= 100, "too few cycles committed between the kills to show anything"


# -- delivery rules ------------------------------------------------------------------------------------------------


def test_live_first_then_oldest_backlog_within_the_window() -> None:
    d = Delivery(window=3, ack_timeout=10, ack_timeout_max=80)
    d.committed([100])
    assert d.take_live() == [100]
    d.sent([100], now=0)
    assert d.budget == 2
    assert d.choose([1, 2, 3, 100], d.budget) == [1, 2]
    d.sent([1, 2], now=0)
    assert d.budget == 0 and d.cursor == 2
    d.acked([(1, 1), (100, 100)], now=1)
    assert d.budget == 2
    assert d.choose([3, 4, 100], d.budget) == [3, 4]
    assert d.take_acked() == [(1, 1), (100, 100)]


def test_timeouts_retry_oldest_first_with_backoff_reset_by_an_ack() -> None:
    d = Delivery(window=10, ack_timeout=10, ack_timeout_max=40)
    d.sent([5, 6, 7], now=0)
    assert d.next_expiry() == 10
    assert d.expire(now=9) == 0
    assert d.expire(now=10) == 3 and d.timeout == 20  # nothing acknowledged: back off
    assert d.choose([8], budget=2) == [5, 6]
    d.sent([5, 6], now=10)
    assert d.resent == 2
    assert d.expire(now=30) == 2 and d.timeout == 40
    d.sent([7], now=31)
    d.expire(now=100)
    assert d.timeout == 40  # capped
    d.acked([(5, 7)], now=101)
    # only re-sent copies were acknowledged: no latency sample (Karn's rule, delivery.py rule 4), the timeout
    # stays backed off until a message sent once is acknowledged
    assert d.timeout == 40 and not d.outstanding
    assert d.choose([8, 9], budget=5) == [8, 9]
    d.sent([8, 9], now=102)
    d.acked([(8, 9)], now=103)
    assert d.timeout == 10


def test_acks_for_numbers_never_sent_here_are_deleted_too() -> None:
    d = Delivery(window=10, ack_timeout=10, ack_timeout_max=40)
    d.acked([(0, 9)], now=0)
    d.acked([(10, 12), (20, 20)], now=0)
    assert d.take_acked() == [(0, 12), (20, 20)]
    assert d.choose(list(range(8, 25)), budget=3) == [13, 14, 15]
    taken = d.take_acked()
    d.acked([(30, 30)], now=1)
    d.acked_deleted(taken)
    assert d.take_acked() == [(30, 30)]


class ModelShell:
    """The agent's send-loop shell with a model outbox, a model paho and a clock: it performs what the real
    Sender asks and feeds it the results, as edge_agent/app.py `Agent._send_loop` does with SQLite and paho."""

    def __init__(self, sender: Sender) -> None:
        self.s = sender
        self.held: dict[int, bytes] = {}  # the outbox
        self.committed: dict[int, bytes] = {}  # every body ever committed
        self.next_seq = 0
        self.now = 0.0
        self.mids = itertools.count(1)
        self.in_flight: dict[int, int] = {}  # paho: mid -> seq, awaiting the broker's PUBACK
        self.published: list[int] = []
        self.broker: set[int] = set()  # PUBACKed, so a collector may store and acknowledge it

    def commit(self, n: int) -> None:
        new = [(seq, bytes([seq % 256]) * (40 * (1 + seq % 3))) for seq in range(self.next_seq, self.next_seq + n)]
        self.next_seq += n
        self.held.update(new)
        self.committed.update(new)
        acked = self.s.take_acked()
        for first, last in acked:
            for seq in [q for q in self.held if first <= q <= last]:
                del self.held[seq]
        self.s.deleted(acked, [])
        self.s.committed(new)

    def act(self, limit: int = 2000) -> Wait:
        """Perform actions until the sender waits; it must get there (no busy loop)."""
        for _ in range(limit):
            action = self.s.next_action(self.now)
            if isinstance(action, Wait):
                assert action.deadline is None or action.deadline > self.now, "a deadline already passed: a spin"
                return action
            if isinstance(action, Publish):
                assert self.s.link_up, "published while the link is down"
                assert self.committed[action.seq] == action.body, "a body that is not the message's"
                mid = next(self.mids)
                self.in_flight[mid] = action.seq
                self.s.published(action.seq, mid, len(action.body), self.now)
                self.published.append(action.seq)
                assert self.s.pending_handover[0] <= self.s.receive_maximum
            elif isinstance(action, ScanBacklog):
                self.s.scanned(sorted(q for q in self.held if q > action.after)[:action.limit], action.limit)
            elif isinstance(action, ReadBodies):
                examined, found, size = [], [], 0
                for seq in action.seqs:
                    if examined and size >= action.max_bytes:
                        break
                    examined.append(seq)
                    if seq in self.held:
                        found.append((seq, self.held[seq]))
                        size += len(self.held[seq])
                self.s.bodies_read(examined, found)
        raise AssertionError(f"the sender never waits: {action}")

    def puback(self, n: int) -> None:
        for mid in list(self.in_flight)[:n]:
            self.broker.add(self.in_flight.pop(mid))
            self.s.pubacked(mid)

    def ack(self, seqs: list[int]) -> None:
        for seq in seqs:
            self.s.acked([(seq, seq)], self.now)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["commit", "act", "puback", "ack", "down", "up", "tick", "drop"]),
                          st.integers(0, 5)), max_size=80))
def test_the_sender_delivers_every_committed_message_whatever_happens(events) -> None:
    """The real send-loop core (delivery.Sender) driven through any order of commits, link losses, PUBACKs,
    acknowledgements, outbox drops and timeouts: it only publishes messages that were committed, with their
    bodies, while the link is up, never more awaiting PUBACK than the broker's receive maximum, never spins; and
    once the link stays up and acknowledgements flow, every committed message is acknowledged and deleted."""
    shell = ModelShell(Sender(window=4, ack_timeout=1, ack_timeout_max=4, max_handover_bytes=300))
    for kind, n in events:
        shell.now += 0.25
        if kind == "commit":
            shell.commit(n)
        elif kind == "act":
            shell.act()
        elif kind == "puback":
            shell.puback(n)
        elif kind == "ack":
            stored = sorted(shell.broker & shell.held.keys())
            shell.ack(stored[: n + 1])
        elif kind == "down":
            shell.s.link_changed(False)
            shell.in_flight.clear()  # (paho would send them again; the model loses them)
        elif kind == "up":
            shell.s.link_changed(True, receive_maximum=n + 1)
        elif kind == "tick":
            shell.now += n
        elif shell.held:  # "drop": the outbox bounds drop the oldest message
            oldest = min(shell.held)
            del shell.held[oldest]
            shell.s.deleted([], [(oldest, oldest)])
    shell.s.link_changed(True, receive_maximum=3)
    for _ in range(300):
        shell.now += 5
        shell.act()
        shell.puback(10**6)
        shell.ack(sorted(shell.broker & shell.held.keys()))
        shell.commit(0)
        if not shell.held:
            break
    assert shell.held == {}


def test_sender_live_first_then_the_backlog_read_back_in_byte_bounded_slices() -> None:
    s = Sender(window=10, ack_timeout=10, ack_timeout_max=40, max_handover_bytes=250)
    assert s.next_action(0) == Wait(None)  # link down: nothing to do
    s.link_changed(True, receive_maximum=100)
    s.committed([(50, b"L" * 100)])
    assert s.next_action(0) == Publish(50, b"L" * 100)
    s.published(50, 1, 100, now=0)
    scan = s.next_action(0)
    assert isinstance(scan, ScanBacklog) and scan.after == -1
    s.scanned([1, 2, 3, 50], scan.limit)
    read = s.next_action(0)
    assert read == ReadBodies((1, 2, 3), 150)  # what the RAM bound leaves beside the 100 bytes awaiting PUBACK
    s.bodies_read([1, 2], [(1, b"a" * 100), (2, b"b" * 100)])  # the shell stopped at 150 bytes
    s.pubacked(1)
    assert s.next_action(0) == Publish(1, b"a" * 100)
    s.published(1, 2, 100, now=0)
    assert s.next_action(0) == Publish(2, b"b" * 100)
    s.published(2, 3, 100, now=0)
    assert s.next_action(0) == ReadBodies((3,), 50)  # 200 bytes await PUBACK
    s.bodies_read([3], [(3, b"c" * 100)])
    assert s.next_action(0) == Publish(3, b"c" * 100)  # under the bound before it: the bound is one message loose
    s.published(3, 4, 100, now=0)
    s.committed([(51, b"L" * 100)])
    assert s.next_action(0) == Wait(10)  # 300 bytes await PUBACK: even a live message waits for room
    s.pubacked(2)
    assert s.next_action(0) == Publish(51, b"L" * 100)
    s.published(51, 5, 100, now=0)
    s.pubacked(5)
    s.pubacked(3)
    s.pubacked(4)
    s.acked([(1, 3), (50, 51)], now=1)
    assert s.next_action(1) == Wait(None)  # everything acknowledged, the outbox read to its end: no scan
    s.link_changed(False)
    s.committed([(52, b"o" * 100)])  # committed offline: backlog
    s.link_changed(True)
    scan = s.next_action(1)
    assert isinstance(scan, ScanBacklog) and scan.after == 50
    s.scanned([52], scan.limit)
    assert s.next_action(1) == ReadBodies((52,), 250)
    s.bodies_read([52], [])  # gone from the outbox meanwhile (dropped by its bounds): forgotten
    assert s.next_action(1) == Wait(None) and s.rules.cursor == 52


def test_sender_hands_over_no_more_than_the_brokers_receive_maximum() -> None:
    s = Sender(window=10, ack_timeout=10, ack_timeout_max=40)
    s.link_changed(True, receive_maximum=2)
    s.committed([(seq, b"x") for seq in range(5)])
    for mid in (1, 2):
        action = s.next_action(0)
        assert isinstance(action, Publish)
        s.published(action.seq, mid, 1, now=0)
    assert isinstance(s.next_action(0), Wait)
    s.pubacked(1)
    assert s.next_action(0) == Publish(2, b"x")


def test_sender_gives_back_what_the_link_did_not_take() -> None:
    s = Sender(window=10, ack_timeout=10, ack_timeout_max=40)
    s.link_changed(True)
    s.committed([(7, b"live")])
    s.link_changed(False)  # before it was handed over: backlog now, its body let go (the outbox has it)
    s.committed([(8, b"offline")])
    s.link_changed(True)
    scan = s.next_action(0)
    assert isinstance(scan, ScanBacklog)
    s.scanned([7, 8], scan.limit)
    read = s.next_action(0)
    assert isinstance(read, ReadBodies) and read.seqs == (7, 8)
    s.link_changed(False)  # down during the read: its result is due again, not sent
    s.bodies_read([7, 8], [(7, b"live"), (8, b"offline")])
    s.link_changed(True)
    scan = s.next_action(0)
    assert isinstance(scan, ScanBacklog) and scan.after == 6
    s.scanned([7, 8], scan.limit)
    assert s.next_action(0).seqs == (7, 8)


def test_sender_waits_instead_of_scanning_an_outbox_it_has_read_to_the_end() -> None:
    s = Sender(window=10, ack_timeout=10, ack_timeout_max=40)
    s.link_changed(True)
    scan = s.next_action(0)
    s.scanned([], scan.limit)
    assert s.next_action(0) == Wait(None)
    s.committed([(0, b"x")])  # a new live message: sent, no scan
    assert s.next_action(0) == Publish(0, b"x")


def test_what_the_link_did_not_take_is_due_again() -> None:
    d = Delivery(window=10, ack_timeout=10, ack_timeout_max=40)
    d.sent([1, 2], now=0)
    d.expire(now=10)
    d.committed([7])
    # the scan ran while 7 was live (skipped), then the link went down before 7 and the retries were sent
    assert d.choose([1, 2, 3, 7], budget=3) == [1, 2, 3]
    assert d.cursor == 7
    d.unsent(d.take_live())
    d.unsent([2, 3])
    d.sent([1], now=11)
    assert d.choose([3, 4, 7], budget=5) == [2, 3, 4, 7]


def test_the_agent_takes_only_authentic_acknowledgements(tmp_path: Path) -> None:
    """The agent's downlink handler with real keys: a forged, moved or plain acknowledgement deletes nothing; one
    sealed by a collector for this gateway's session does, whatever its age."""
    import asyncio

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_agent import config as agent_config
    from edge_agent.app import Agent
    from wire import ack
    from wire.keys import collector_public_to_pem, identity_to_pem
    from wire.schema import encode_batch
    from wire.seal import CollectorKey, Opener

    identity, collector = Ed25519PrivateKey.generate(), CollectorKey.generate()
    (tmp_path / "identity.key").write_bytes(identity_to_pem(identity))
    (tmp_path / "collector.pub").write_bytes(collector_public_to_pem(collector))
    (tmp_path / "agent.toml").write_text(textwrap.dedent(f"""
        [gateway]
        id = "gw-acks"
        state_dir = "{tmp_path / 'state'}"
        [mqtt]
        host = "127.0.0.1"
        tls = false
        [security]
        identity_key = "{tmp_path / 'identity.key'}"
        collector_key = "{tmp_path / 'collector.pub'}"
    """))

    async def scenario() -> None:
        agent = Agent(agent_config.load(tmp_path / "agent.toml"))
        agent._loop = asyncio.get_running_loop()
        from wire.schema import Batch

        sealed = agent.sealer.seal(agent.up_topic, encode_batch(Batch("gw-acks", 5, NOW, [])))
        opener = Opener([collector], lambda gw: identity.public_key(), clock=lambda: 1.0)  # a collector clock far off
        opened = opener.open("gw-acks", agent.up_topic, sealed)
        body = ack.encode_ack([(5, 9)])
        good = opener.seal_downlink("gw-acks", opened.session_id, agent.ack_topic, body)
        other_topic = agent.ack_topic.replace("gw-acks", "gw-other")
        forged = [good[:-1] + bytes([good[-1] ^ 1]),
                  opener.seal_downlink("gw-acks", opened.session_id, other_topic, body),
                  bytes([ack.PLAIN_ACK]) + body, b""]
        for payload in forged:
            agent._downlink(agent.ack_topic, payload)
        assert agent.stats.bad_acks == len(forged) and agent.sender.take_acked() == []
        agent._downlink(agent.ack_topic, good)
        assert agent.sender.take_acked() == [(5, 9)] and agent.stats.last_ack_ns
        agent._db.shutdown()

    asyncio.run(scenario())


def test_the_agent_opens_its_outbox_off_the_loop_folds_the_old_sequence_file_in_and_numbers_from_it(
        tmp_path: Path) -> None:
    """The agent's start and its cycle commit, without a broker: the loop's view of the outbox is right from
    the start, the sequence file of an older agent is folded in once, and the cycle's messages are numbered
    from the outbox's counter in the job that commits them."""
    import asyncio

    from edge_agent import config as agent_config
    from edge_agent.app import Agent
    from wire.schema import Reading, decode_batch

    state = tmp_path / "state"
    state.mkdir()
    box = Outbox(state / "outbox.sqlite3", 10**9, 10**9)
    box.commit([message(s) for s in range(3)])
    box.close()
    (state / "sequence").write_text("100\n")
    (tmp_path / "agent.toml").write_text(textwrap.dedent(f"""
        [gateway]
        id = "gw-numbers"
        state_dir = "{state}"
        [mqtt]
        host = "127.0.0.1"
        tls = false
    """))

    async def scenario() -> None:
        agent = Agent(agent_config.load(tmp_path / "agent.toml"))
        agent._loop = asyncio.get_running_loop()
        await agent._open_outbox()
        assert (agent.box.backlog.messages, agent.box.next_seq) == (3, 100)
        assert not (state / "sequence").exists()
        agent.buffer.add([Reading("d", "m", NOW, {"v": 1.0})])
        await agent._commit_cycle()
        assert agent.box.next_seq == 101 and agent.box.backlog.newest_seq == 100
        body = agent.outbox.bodies([100])[0][1]
        assert decode_batch(body).seq == 100
        agent.outbox.close()
        agent._db.shutdown()

    asyncio.run(scenario())


def test_while_nothing_is_acknowledged_one_probe_per_round_then_the_window_reopens() -> None:
    d = Delivery(window=8, ack_timeout=10, ack_timeout_max=40)
    assert d.choose(list(range(20)), d.budget) == list(range(8))
    d.sent(range(8), now=0)
    d.expire(now=10)  # the collector (or InfluxDB) is down: nothing acknowledged
    assert d.probing and d.budget == 1
    d.committed([20])
    assert d.take_live() == []  # live waits in the outbox with the rest
    assert d.choose(list(range(8, 21)), d.budget) == [0]  # the oldest goes as the probe
    d.sent([0], now=10)
    d.expire(now=30)
    assert d.budget == 1 and d.timeout == 40
    d.acked([(0, 0)], now=31)
    assert not d.probing and d.budget == 2
    d.committed([21])
    assert d.take_live() == [21]
    assert d.choose(list(range(8, 22)), d.budget) == [1, 2]
    d.sent([21, 1, 2], now=31)
    d.acked([(1, 2), (21, 21)], now=32)
    assert d.cwnd == 4
    assert d.choose(list(range(8, 22)), d.budget) == [3, 4, 5, 6]
    assert 20 in [*d.choose(list(range(8, 22)), 100)]  # the withheld live message is backlog, not forgotten


def test_the_timeout_doubles_once_per_round_not_per_expired_group() -> None:
    d = Delivery(window=10, ack_timeout=10, ack_timeout_max=80)
    d.sent([1, 2, 3], now=0)
    d.sent([4, 5, 6], now=1)  # paced by the broker: the same round, a little later
    d.expire(now=10)
    assert d.timeout == 20
    d.expire(now=21)  # the rest of the round expires: sent before the back-off, no second doubling
    assert d.timeout == 20 and len(d.choose([], budget=10)) == 6
    d.sent([1], now=22)
    d.expire(now=42)  # the next round: doubles again
    assert d.timeout == 40


def test_a_full_disk_keeps_the_outbox_and_the_cycle_can_be_retried(tmp_path: Path) -> None:
    """SQLITE_FULL (here: max_page_count, as a full SD card reports it) is not damage: the outbox stays, holding
    what it held; the failed cycle commits once there is room."""
    box = Outbox(tmp_path / "o.sqlite3", 10**9, 10**9, clock=lambda: NOW)
    box.commit([message(s, size=2000) for s in range(5)])
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count={pages + 1}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        box.commit([message(s, size=20_000) for s in range(5, 10)])
    assert box.resets == 0 and box.seqs_after(-1, 100) == [0, 1, 2, 3, 4] and box.backlog.messages == 5
    assert box.next_seq == 5  # rolled back with the cycle: its numbers (never published) are used again
    box._db.execute("PRAGMA max_page_count=1000000")
    box.commit([message(s, size=20_000) for s in range(5, 10)])
    assert box.backlog.messages == 10 and not [p for p in tmp_path.iterdir() if ".damaged-" in p.name]


def test_new_uplink_limits_apply_to_what_is_sent_next_and_keep_what_is_outstanding() -> None:
    """A live reconfiguration (edge_agent/app.py Agent.reconfigure) changes the window and the timeouts: messages
    already sent stay outstanding, a smaller window only holds back new sends, a larger one opens at once."""
    s = Sender(window=8, ack_timeout=10, ack_timeout_max=40)
    d = s.rules
    d.sent(range(6), now=0)
    s.set_limits(window=4, ack_timeout=5, ack_timeout_max=20)
    assert len(d.outstanding) == 6 and d.budget == 0 and d.cwnd == 4
    assert (d.base_timeout, d.timeout, d.timeout_max) == (5, 10, 20)  # the round in progress keeps its timeout
    d.acked([(0, 3)], now=1)
    assert d.timeout == 5 and d.budget == 2  # 4 - the 2 still outstanding
    s.set_limits(window=50, ack_timeout=5, ack_timeout_max=20)
    d.acked([(4, 4)], now=2)
    assert d.cwnd == 8 and d.budget == 7  # doubles back up towards the new window
