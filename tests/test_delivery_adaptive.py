"""The agent's re-sends when the collector is slow (edge_agent/delivery.py rules 3 and 4): the timeout follows
the acknowledgement latency, an expiry probes instead of sending everything again. Pure: no clock, no sockets;
times are passed in."""

from __future__ import annotations

from collections import Counter

from edge_agent.delivery import REORDER_MIN, Delivery, Publish, ReadBodies, ScanBacklog, Sender, Wait


def send_times(sender: Sender, latency, cycles: int, interval: float = 10.0, step: float = 0.5,
               lose: frozenset[int] = frozenset(), lose_copies: int = 1) -> dict[int, list[float]]:
    """The agent's send loop (edge_agent.delivery.Sender, as Agent._send_loop drives it) over an outbox in RAM:
    one message committed per cycle; the broker PUBACKs at once; the collector acknowledges each copy it gets
    `latency(t)` seconds after it was sent, in the order sent (a FIFO that is behind: a re-sent copy waits like
    any other, so a re-send never makes anything faster); the first `lose_copies` acknowledgements of each seq in
    `lose` are lost (a broker restart, QoS 0). Returns when each seq was sent."""
    outbox: dict[int, bytes] = {}
    acks: list[tuple[float, int]] = []  # (when, seq)
    sends: dict[int, list[float]] = {}
    lost: Counter[int] = Counter()
    sender.link_changed(True, 1000)
    t, seq, mid = 0.0, 0, 0
    end = cycles * interval
    while t <= end + 3000 and (t <= end or outbox):
        if t <= end and t >= seq * interval:
            outbox[seq] = b"x"
            sender.committed([(seq, b"x")])
            seq += 1
        for a in sorted(a for a in acks if a[0] <= t):
            acks.remove(a)
            if a[1] in lose and lost[a[1]] < lose_copies:
                lost[a[1]] += 1
                continue
            sender.acked([(a[1], a[1])], a[0])
            taken = sender.take_acked()
            for first, last in taken:
                for s in [s for s in outbox if first <= s <= last]:
                    del outbox[s]
            sender.deleted(taken, [])
        while True:
            action = sender.next_action(t)
            if isinstance(action, Publish):
                mid += 1
                sender.published(action.seq, mid, 1, t)
                sender.pubacked(mid)
                sends.setdefault(action.seq, []).append(t)
                # a FIFO: never acknowledged before what was sent earlier (when the latency drops, the queue
                # ahead still has to go first)
                acks.append((max(t + latency(t), acks[-1][0] if acks else 0.0), action.seq))
            elif isinstance(action, ScanBacklog):
                sender.scanned([s for s in outbox if s > action.after][: action.limit], action.limit)
            elif isinstance(action, ReadBodies):
                sender.bodies_read(list(action.seqs), [(s, outbox[s]) for s in action.seqs if s in outbox])
            else:
                assert isinstance(action, Wait)
                break
        t += step
    assert not outbox, f"not delivered: {sorted(outbox)[:10]}"
    return sends


def run(sender: Sender, latency, cycles: int, interval: float = 10.0, step: float = 0.5) -> Counter[int]:
    """send_times(), counted: how often each seq was sent."""
    return Counter({seq: len(times) for seq, times in send_times(sender, latency, cycles, interval, step).items()})


def test_an_acknowledgement_of_a_message_sent_once_is_a_latency_sample() -> None:
    d = Delivery(window=200, ack_timeout=30, ack_timeout_max=600)
    d.sent([1], now=0)
    d.acked([(1, 1)], now=40)
    # RFC 6298 §2.2: srtt = R, rttvar = R/2, RTO = srtt + 4 rttvar
    assert (d.srtt, d.rttvar, d.timeout) == (40, 20, 120)
    d.sent([2], now=50)
    d.acked([(2, 2)], now=70)
    # §2.3: rttvar = 3/4 rttvar + 1/4 |srtt - R|, srtt = 7/8 srtt + 1/8 R
    assert (d.rttvar, d.srtt) == (0.75 * 20 + 0.25 * 20, 0.875 * 40 + 0.125 * 20)
    assert d.timeout == d.srtt + 4 * d.rttvar


def test_the_configured_timeout_is_the_floor_and_the_maximum_the_ceiling() -> None:
    d = Delivery(window=200, ack_timeout=30, ack_timeout_max=100)
    d.sent([1], now=0)
    d.acked([(1, 1)], now=2)  # a healthy collector: 2 s
    assert d.timeout == 30
    d.sent([2], now=10)
    d.acked([(2, 2)], now=200)
    assert d.timeout == 100


def test_a_copy_sent_twice_gives_no_sample_and_an_expiry_probes_even_while_acks_come() -> None:
    """Karn's rule (RFC 6298 §5.5, and Karn & Partridge 1987): the ack of a message sent twice may answer either
    copy. A timeout that expired while acks still came (the collector is slow, not gone) doubles once per round,
    and the window collapses to a probe, as after an outage (RFC 5681 §3.1 after a retransmission timeout)."""
    d = Delivery(window=200, ack_timeout=30, ack_timeout_max=600)
    d.sent([1, 2], now=0)
    d.acked([(1, 1)], now=5)  # the collector answers: it is there
    assert d.timeout == 30
    d.expire(now=30)  # 2 is overdue although acks come
    assert d.timeout == 60 and d.probing
    assert d.choose([], d.budget) == [2]
    d.sent([2], now=30)
    d.acked([(2, 2)], now=50)  # sent twice: 50 s or 20 s? no sample: the window reopens, the timeout stays
    assert d.srtt == 5 and d.timeout == 60 and d.cwnd == 2
    d.sent([3], now=60)
    d.acked([(3, 3)], now=101)  # sent once: 41 s
    assert d.timeout == d.estimate() > 41


def test_a_slow_collector_costs_a_probe_at_the_onset_not_every_message_again() -> None:
    """The collector falls behind: from t = 100 s its acknowledgements take 45 s, above the 30 s floor, for ten
    minutes; then 2 s again. With a fixed 30 s timeout and the window kept, every message of those ten minutes
    would be sent twice (issue 14: 20,000-36,000 duplicates in 2-3 minutes at 10,000 gateways)."""
    s = Sender(window=200, ack_timeout=30, ack_timeout_max=600)
    sends = run(s, lambda t: 45.0 if 100 <= t < 700 else 2.0, cycles=120)
    resent = sorted(seq for seq, n in sends.items() if n > 1)
    assert len(sends) == 121
    assert len(resent) <= 1, resent  # at most the onset's probe
    assert s.rules.timeout == 30  # back to the floor once the latency is low again


def test_under_latency_that_keeps_growing_nothing_is_sent_twice() -> None:
    """A collector that takes less than is offered, for long: its queue, and so the latency, grows by 0.6 s per
    second (10,000 gateways offering 1,000 messages/s to a collector taking 400/s). The estimate keeps ahead
    of it."""
    s = Sender(window=200, ack_timeout=30, ack_timeout_max=600)
    sends = run(s, lambda t: 3.0 if t < 100 else 3.0 + 0.6 * (t - 100), cycles=60)
    assert len(sends) == 61 and max(sends.values()) == 1


def test_the_rules_before_would_have_sent_every_slow_message_again() -> None:
    """The slow collector's run above under the rules before (a fixed timeout, reset by every acknowledgement;
    back-off and probing only while nothing at all is acknowledged): the comparison that makes that test mean
    something."""

    class Before(Delivery):
        def acked(self, ranges: list[tuple[int, int]], now: float) -> int:
            covered = super().acked(ranges, now)
            self.timeout = self.base_timeout
            return covered

        def expire(self, now: float) -> int:
            oldest = next(iter(self.outstanding.values()), None)
            acks_came = oldest is not None and self.last_ack is not None and self.last_ack >= oldest
            before = (self.timeout, self.cwnd, self._backed_off_at)
            expired = super().expire(now)
            if acks_came:
                self.timeout, self.cwnd, self._backed_off_at = before
            return expired

    s = Sender(window=200, ack_timeout=30, ack_timeout_max=600)
    s.rules = Before(200, 30, 600)
    sends = run(s, lambda t: 45.0 if 100 <= t < 700 else 2.0, cycles=120)
    assert sum(1 for n in sends.values() if n > 1) >= 55


def test_an_outage_still_probes_and_the_first_live_message_acknowledged_resets_the_timeout() -> None:
    d = Delivery(window=8, ack_timeout=10, ack_timeout_max=80)
    d.sent([1, 2, 3], now=0)
    d.expire(now=10)  # nothing acknowledged at all
    assert d.probing and d.timeout == 20
    assert d.choose([], d.budget) == [1]
    d.sent([1], now=10)
    d.acked([(1, 3)], now=12)  # only a re-sent copy: no sample, the window reopens, the timeout waits for one
    assert d.srtt is None and d.timeout == 20 and not d.probing
    d.committed([4])
    d.sent(d.take_live(), now=20)
    d.acked([(4, 4)], now=21)
    assert d.srtt == 1 and d.timeout == 10


# -- rule 5: a message a later acknowledgement shows lost is sent again at once ----------------------------------


def test_a_lost_acknowledgement_is_made_good_by_the_next_one_not_the_timeout() -> None:
    # seq 3's acknowledgement is lost; seq 4, sent 10 s later, is acknowledged 1 s after that: 3 goes again then,
    # 8 s after its first copy, not after the 30 s timeout
    sends = send_times(Sender(window=200, ack_timeout=30, ack_timeout_max=600), lambda t: 1.0, 10,
                       lose=frozenset({3}))
    assert len(sends[3]) == 2
    assert sends[3][1] - sends[3][0] == 11.0  # 30 + 1 without rule 5 (the latency sample, 1 s, stays below 30)
    assert all(len(v) == 1 for s, v in sends.items() if s != 3)


def test_each_message_is_sent_again_early_once_then_the_timeout_rules() -> None:
    # both of seq 3's first two acknowledgements are lost: one early re-send, then the timeout's
    sends = send_times(Sender(window=200, ack_timeout=30, ack_timeout_max=600), lambda t: 1.0, 10,
                       lose=frozenset({3}), lose_copies=2)
    first, early, late = sends[3]
    assert early - first == 11.0
    assert late - early >= 30.0


def test_messages_sent_close_together_are_not_taken_for_lost() -> None:
    # the reorder allowance: an acknowledgement of a message sent less than REORDER_MIN after an unacknowledged
    # one does not make that one due (two collectors may take one gateway's messages seconds apart)
    d = Delivery(window=200, ack_timeout=30, ack_timeout_max=600)
    d.sent([1], now=0.0)
    d.sent([2], now=REORDER_MIN - 0.5)
    d.acked([(2, 2)], now=REORDER_MIN)
    assert d.fast_resends == 0 and 1 in d.outstanding
    d.sent([3], now=REORDER_MIN + 1.0)
    d.acked([(3, 3)], now=REORDER_MIN + 2.0)
    assert d.fast_resends == 1 and 1 not in d.outstanding


def test_the_allowance_grows_with_the_latencys_variation() -> None:
    d = Delivery(window=200, ack_timeout=30, ack_timeout_max=600)
    d.sent([1], now=0.0)
    d.acked([(1, 1)], now=40.0)  # a sample of 40 s: rttvar 20 s, allowance 40 s
    d.sent([2], now=50.0)
    d.sent([3], now=80.0)
    d.acked([(3, 3)], now=85.0)  # 3 went 30 s after 2: within the allowance, 2 is not taken for lost
    assert d.fast_resends == 0 and 2 in d.outstanding
