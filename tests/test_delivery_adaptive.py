"""The agent's re-send timeout follows the acknowledgement latency (edge_agent/delivery.py rule 4). Pure: no
clock, no sockets; times are passed in."""

from __future__ import annotations

from edge_agent.delivery import Delivery


def run(d: Delivery, latency, cycles: int, interval: float = 10.0) -> list[int]:
    """One message per cycle, sent live; the collector acknowledges each copy `latency(t)` seconds after it was
    sent (a re-sent copy too, so a re-send never makes anything faster). Re-sends go out as the agent sends
    them: retries first, within the window. Returns the seqs re-sent."""
    acks: list[tuple[float, int]] = []  # (when, seq)
    resent: list[int] = []
    t = 0.0
    end = cycles * interval
    next_cycle = 0.0
    seq = 0
    while t <= end + 600:
        if t >= next_cycle and t <= end:
            d.committed([seq])
            live = d.take_live()
            d.sent(live, t)
            acks += [(t + latency(t), s) for s in live]
            seq += 1
            next_cycle += interval
        for when, s in sorted(a for a in acks if a[0] <= t):
            acks.remove((when, s))
            d.acked([(s, s)], when)
        d.expire(t)
        again = d.choose([], d.budget)
        if again:
            d.sent(again, t)
            resent += again
            acks += [(t + latency(t), s) for s in again]
        t += 0.5
    return resent


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


def test_a_copy_sent_twice_gives_no_sample_and_a_backed_off_timeout_waits_for_one() -> None:
    """Karn's rule (RFC 6298 §5.5, and Karn & Partridge 1987): the ack of a message sent twice may answer either
    copy. While acks still come, a timeout that expired doubles once per round and stays until a sample."""
    d = Delivery(window=200, ack_timeout=30, ack_timeout_max=600)
    d.sent([1, 2], now=0)
    d.acked([(1, 1)], now=5)  # the collector answers: it is there
    assert d.timeout == 30
    d.expire(now=30)  # 2 is overdue although acks come: the collector is slow, not gone
    assert d.timeout == 60 and d.cwnd == 200  # backed off, window kept (no probing: it is not an outage)
    assert d.choose([], d.budget) == [2]
    d.sent([2], now=30)
    d.acked([(2, 2)], now=50)  # sent twice: 50 s or 20 s? no sample
    assert d.srtt == 5 and d.timeout == 60
    d.sent([3], now=60)
    d.acked([(3, 3)], now=101)  # sent once: 41 s
    assert d.timeout == d.estimate() > 41


def test_a_slow_collector_costs_at_most_one_resend_per_message_at_the_onset_not_one_per_timeout() -> None:
    """The collector falls behind: from t = 100 s its acknowledgements take 45 s, above the 30 s floor, for ten
    minutes; then 2 s again. With a fixed 30 s timeout every message of those ten minutes would be sent twice
    (issue 14: 20,000-36,000 duplicates in 2-3 minutes at 10,000 gateways)."""

    def latency(t: float) -> float:
        return 45.0 if 100 <= t < 700 else 2.0

    d = Delivery(window=200, ack_timeout=30, ack_timeout_max=600)
    resent = run(d, latency, cycles=120)
    slow = [s for s in range(120) if 100 <= s * 10 < 700]
    assert len(resent) <= 3, resent  # at the onset only
    assert set(resent) <= set(slow)
    assert d.timeout == 30  # back to the floor once the latency is low again
    assert not d.outstanding


def test_a_fixed_timeout_would_have_resent_every_slow_message() -> None:
    """The same run with the estimate switched off (what the agent did before): the comparison that makes the
    test above mean something."""

    class Fixed(Delivery):
        def sample(self, latency: float) -> None:
            pass

        def estimate(self) -> float:
            return self.base_timeout

        def expire(self, now: float) -> int:
            before = self.timeout
            expired = super().expire(now)
            if self.cwnd > 1:
                self.timeout = before  # no back-off while acknowledgements come
            return expired

    d = Fixed(window=200, ack_timeout=30, ack_timeout_max=600)
    resent = run(d, lambda t: 45.0 if 100 <= t < 700 else 2.0, cycles=120)
    assert len(resent) >= 55


def test_an_outage_still_probes_and_the_first_ack_after_it_resets_the_timeout() -> None:
    d = Delivery(window=8, ack_timeout=10, ack_timeout_max=80)
    d.sent([1, 2, 3], now=0)
    d.expire(now=10)  # nothing acknowledged at all
    assert d.probing and d.timeout == 20
    assert d.choose([], d.budget) == [1]
    d.sent([1], now=10)
    d.acked([(1, 3)], now=12)  # only re-sent copies: no sample, but the outage is over
    assert d.srtt is None and d.timeout == 10 and not d.probing
