"""BatchWriter against real servers: batching by size and time, order, tokens, rejections, retry until stored."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.influx.backends import V1Backend, WriteFailure
from collector.influx.batcher import BatchResult, BatchWriter, Refused, WriterClosed
from collector.influx.config import InfluxConfig
from labkit.influxd import InfluxdServer, InfluxError
from labkit.process import free_port

pytestmark = pytest.mark.integration

T = 1_700_000_000_000_000_000


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=25))


def line(i: int, measurement: str = "m") -> bytes:
    return b"%s v=%di %d" % (measurement.encode(), i, T + i)


class Results:
    """on_result collector that a test can wait on."""

    def __init__(self) -> None:
        self.items: list[BatchResult] = []
        self.times: list[float] = []
        self._changed = asyncio.Event()

    def __call__(self, result: BatchResult) -> None:
        self.items.append(result)
        self.times.append(time.monotonic())
        self._changed.set()

    async def until(self, done: Callable[[list[BatchResult]], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not done(self.items):
                self._changed.clear()
                await self._changed.wait()

    @property
    def tokens(self) -> list[Any]:
        return [t for r in self.items for t in r.tokens]

    @property
    def lines(self) -> int:
        return sum(r.lines for r in self.items)


def writer(
    backend: Any, results: Results, *, batch_size: int = 100, flush_interval: float = 0.05,
    retry_initial: float = 0.05, retry_max: float = 0.4, max_pending_lines: int = 10_000,
    log: logging.Logger | None = None,
) -> BatchWriter:
    return BatchWriter(
        backend, batch_size=batch_size, flush_interval=flush_interval, retry_initial=retry_initial,
        retry_max=retry_max, max_pending_lines=max_pending_lines, on_result=results, log=log,
    )


def v1(server: InfluxdServer, db: str) -> V1Backend:
    return V1Backend(InfluxConfig(url=server.url, database=db, timeout=2.0))


def stored_values(server: InfluxdServer, db: str, measurement: str = "m") -> list[int]:
    return [row["v"] for row in server.query(f'SELECT "v" FROM "{measurement}" ORDER BY time', db)]


# -- batching ----------------------------------------------------------------------------------------------


def test_flush_by_size(influxd: InfluxdServer, influx_db: str) -> None:
    async def main() -> None:
        results = Results()
        w = writer(v1(influxd, influx_db), results, batch_size=10, flush_interval=60)
        await w.start()
        for i in range(25):
            await w.put([line(i)], token=i)
        await results.until(lambda r: len(r) == 2, timeout=5)  # long before the 60 s flush interval
        assert [r.lines for r in results.items] == [10, 10]
        assert w.stats.pending_lines == 5
        await w.close()
        assert [r.lines for r in results.items] == [10, 10, 5]

    run(main())
    assert stored_values(influxd, influx_db) == list(range(25))


def test_flush_by_time(influxd: InfluxdServer, influx_db: str) -> None:
    async def main() -> None:
        results = Results()
        w = writer(v1(influxd, influx_db), results, batch_size=1000, flush_interval=0.4)
        await w.start()
        started = time.monotonic()
        await w.put([line(0), line(1)], token="a")
        await asyncio.sleep(0.1)
        await w.put([line(2)], token="b")  # joins the batch; its deadline is set by the first line
        await results.until(lambda r: len(r) == 1, timeout=5)
        waited = results.times[0] - started
        assert 0.35 <= waited < 1.0, waited
        assert (results.items[0].lines, results.items[0].tokens) == (3, ["a", "b"])
        await w.close()

    run(main())
    assert stored_values(influxd, influx_db) == [0, 1, 2]


def test_puts_are_atomic(influxd: InfluxdServer, influx_db: str) -> None:
    async def main() -> list[int]:
        results = Results()
        w = writer(v1(influxd, influx_db), results, batch_size=5, flush_interval=60)
        await w.start()
        for n in range(4):
            await w.put([line(n * 3 + k) for k in range(3)], token=n)  # 3 + 3 > 5: one put per batch
        await w.put([line(100 + k) for k in range(12)], token="big")  # larger than a batch: alone
        await w.close()
        return [r.lines for r in results.items]

    assert run(main()) == [3, 3, 3, 3, 12]
    assert len(stored_values(influxd, influx_db)) == 24


def test_order_tokens_and_stats(influxd: InfluxdServer, influx_db: str) -> None:
    async def main() -> tuple[Results, Any]:
        results = Results()
        w = writer(v1(influxd, influx_db), results, batch_size=7, flush_interval=0.02)
        await w.start()
        for i in range(200):
            await w.put([line(i)], token=("msg", i))
            # The same point again in a later batch with another value: only order decides which stays.
            await w.put([b"last v=%di %d" % (i, T)], token=None)
            if i % 50 == 0:
                await asyncio.sleep(0.05)
        await w.put([], token="no lines")  # still reported, so its message can be acknowledged
        await w.close()
        return results, w.stats

    results, stats = run(main())
    assert results.tokens == [("msg", i) for i in range(200)] + ["no lines"]
    assert all(r.ok and r.status is None and r.reason == "" and r.attempts == 1 for r in results.items if r.lines)
    assert results.lines == 400
    assert (stats.lines_written, stats.retries, stats.batches_rejected, stats.pending_lines) == (400, 0, 0, 0)
    assert stats.batches_written == len(results.items)
    # the metrics' histograms: one request per batch with lines, each batch's lines
    batches_with_lines = [r for r in results.items if r.lines]
    assert stats.request_seconds.count == len(batches_with_lines) and stats.request_seconds.sum > 0
    assert stats.batch_lines.count == len(batches_with_lines) and stats.batch_lines.sum == 400
    assert stats.batch_lines.cumulative()[-1] == ("+Inf", len(batches_with_lines))
    assert stored_values(influxd, influx_db) == list(range(200))
    assert stored_values(influxd, influx_db, "last") == [199]


def test_empty_put_alone_is_reported_without_a_request() -> None:
    async def main() -> Results:
        results = Results()
        w = writer(V1Backend(InfluxConfig(url=f"http://127.0.0.1:{free_port()}")), results)
        await w.start()
        await w.put([], token="t")
        await results.until(lambda r: len(r) == 1, timeout=5)
        await w.close()
        return results

    (result,) = run(main()).items
    assert (result.tokens, result.lines, result.ok, result.attempts) == (["t"], 0, True, 0)


# -- failures ----------------------------------------------------------------------------------------------


def test_client_error_is_reported_once_and_not_retried(
    influxd: InfluxdServer, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.batcher")

    async def main() -> tuple[Results, Any]:
        results = Results()
        w = writer(v1(influxd, "missing_db"), results, batch_size=3, log=log)
        await w.start()
        await w.put([line(1), line(2)], token="x")
        await w.put([line(3)], token="y")
        await results.until(lambda r: len(r) == 1, timeout=5)
        await asyncio.sleep(0.3)  # time for retries, were there any
        await w.close()
        return results, w.stats

    with caplog.at_level(logging.INFO, logger="test.batcher"):
        results, stats = run(main())
    (result,) = results.items
    # A refusal of this side's configuration: every put of the batch, with one request, not split.
    reason = 'database not found: "missing_db"'
    assert (result.ok, result.attempts, result.lines, result.tokens, result.stored) == (False, 1, 3, ["x", "y"], [])
    assert result.refused == [Refused("x", 404, reason), Refused("y", 404, reason)]
    assert (result.status, result.reason, result.lines_refused) == (404, reason, 3)
    assert (stats.retries, stats.batches_rejected, stats.lines_rejected, stats.lines_written) == (0, 1, 3, 0)
    assert stats.last_error == 'HTTP 404: database not found: "missing_db"'
    # The on_result owner (the collector) logs it once, naming the gateways; the batcher stays quiet.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_client_error_without_an_owner_is_logged_once(influxd: InfluxdServer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.batcher.alone")

    async def main() -> None:
        w = BatchWriter(v1(influxd, "missing_db"), batch_size=3, flush_interval=0.05, retry_initial=0.05,
                        retry_max=0.4, max_pending_lines=100, log=log)
        await w.start()
        await w.put([line(1), line(2), line(3)])
        await asyncio.sleep(0.4)
        await w.close()

    with caplog.at_level(logging.INFO, logger="test.batcher.alone"):
        run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and 'database not found: "missing_db"' in errors[0].getMessage()


def test_flush_by_number_of_puts(influxd: InfluxdServer, influx_db: str) -> None:
    """Each put holds an MQTT acknowledgement: a batch goes once max_batch_puts wait, long before
    batch_size lines or the flush interval, so a broker's receive maximum is never the bottleneck."""

    async def main() -> None:
        results = Results()
        w = BatchWriter(v1(influxd, influx_db), batch_size=10_000, flush_interval=60, retry_initial=0.05,
                        retry_max=0.4, max_pending_lines=100_000, on_result=results, max_batch_puts=5)
        await w.start()
        for i in range(12):
            await w.put([line(i)], token=i)
        await results.until(lambda r: sum(len(x.tokens) for x in r) >= 10, timeout=5)
        assert results.tokens[:10] == list(range(10))
        await w.close()

    run(main())
    assert stored_values(influxd, influx_db) == list(range(12))


def test_retry_until_influxd_is_back(influxd_factory, caplog: pytest.LogCaptureFixture) -> None:
    server: InfluxdServer = influxd_factory()
    server.create_database("db")
    server.stop()
    log = logging.getLogger("test.retry")

    async def main() -> tuple[Results, Any, int]:
        results = Results()
        w = writer(v1(server, "db"), results, batch_size=50, retry_initial=0.05, retry_max=0.4,
                   max_pending_lines=120, log=log)
        await w.start()
        for i in range(100):  # fits in max_pending_lines: accepted while InfluxDB is down
            await w.put([line(i)], token=i)
        await asyncio.sleep(1.0)
        assert results.items == []  # nothing acknowledged while down
        assert w.stats.retries >= 3 and w.stats.pending_lines == 100
        assert "Connection refused" in (w.stats.last_error or "")
        # Backpressure: 30 more lines would pass max_pending_lines, so the put waits.
        blocked = asyncio.create_task(w.put([line(100 + k) for k in range(30)], token=100))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        await asyncio.to_thread(server.restart)  # same port, same data
        await blocked
        await results.until(lambda r: sum(x.lines for x in r) == 130, timeout=10)
        await w.close()
        return results, w.stats, max(r.attempts for r in results.items)

    with caplog.at_level(logging.DEBUG, logger="test.retry"):
        results, stats, attempts = run(main())
    assert results.tokens == list(range(101))  # each exactly once, in order
    assert all(r.ok for r in results.items) and attempts > 1
    assert stats.lines_written == 130 and stats.pending_lines == 0
    # every attempt is timed, the failed ones too
    assert stats.request_seconds.count == stats.retries + sum(1 for r in results.items if r.lines)
    assert stored_values(server, "db") == list(range(130))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 3  # the first failure, not one per retry
    assert any("succeeded after" in r.getMessage() for r in caplog.records)


def test_backoff_doubles_up_to_retry_max() -> None:
    """Pauses between attempts grow from retry_initial to retry_max (each shortened by at most 25%)."""
    attempts: list[float] = []

    class Down:
        def write(self, body: bytes) -> None:
            attempts.append(time.monotonic())
            raise WriteFailure(None, "connection failed: Connection refused", retryable=True)

    async def main() -> None:
        w = writer(Down(), Results(), retry_initial=0.05, retry_max=0.2)
        await w.start()
        await w.put([line(0)])
        await asyncio.sleep(1.2)
        await w.close(drain=False)

    run(main())
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(gaps) >= 5
    for gap, nominal in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=False):
        assert nominal * 0.75 - 0.01 <= gap <= nominal + 0.15, (gaps, nominal)


# -- closing -----------------------------------------------------------------------------------------------


def test_close_without_drain_and_put_after_close(influxd: InfluxdServer, influx_db: str) -> None:
    async def main() -> Results:
        results = Results()
        w = writer(v1(influxd, influx_db), results, batch_size=100, flush_interval=60)
        await w.start()
        await w.put([line(1)], token=1)
        await w.close(drain=False)
        with pytest.raises(WriterClosed):
            await w.put([line(2)])
        return results

    assert run(main()).items == []
    assert stored_values(influxd, influx_db) == []


def test_draining_close_can_be_cut_short() -> None:
    """The collector bounds its shutdown with wait_for(close(), t): a close that cannot drain stops anyway."""

    async def main() -> Results:
        results = Results()
        w = writer(V1Backend(InfluxConfig(url=f"http://127.0.0.1:{free_port()}")), results,
                   max_pending_lines=1)
        await w.start()
        await w.put([line(1)], token=1)
        waiting = asyncio.create_task(w.put([line(2)], token=2))  # waits for room
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(w.close(drain=True), timeout=0.3)
        with pytest.raises(WriterClosed):
            await waiting
        return results

    assert run(main()).items == []


def test_put_before_start_is_refused() -> None:
    async def main() -> None:
        w = writer(V1Backend(InfluxConfig()), Results())
        with pytest.raises(WriterClosed, match="start"):
            await w.put([line(1)])

    run(main())


def test_influxd_killed_and_restarted_keeps_what_was_acknowledged(influxd_factory) -> None:
    server: InfluxdServer = influxd_factory()
    server.create_database("db")

    async def main() -> Results:
        results = Results()
        w = writer(v1(server, "db"), results, batch_size=10, flush_interval=0.02)
        await w.start()
        for i in range(20):
            await w.put([line(i)], token=i)
        await results.until(lambda r: sum(x.lines for x in r) == 20, timeout=5)
        await asyncio.to_thread(server.kill)  # SIGKILL: no clean shutdown
        for i in range(20, 40):
            await w.put([line(i)], token=i)
        await asyncio.sleep(0.5)
        assert sum(x.lines for x in results.items) == 20
        await asyncio.to_thread(server.restart)
        await w.close()
        return results

    results = run(main())
    assert results.tokens == list(range(40))
    assert stored_values(server, "db") == list(range(40))


# -- refused batches: every put stored or refused for its own lines ---------------------------------------


class Recorder:
    """A backend around another that keeps the lines of every request (retries included) and can fail chosen
    requests before they reach the server: fail(request number from 1, lines) returns a WriteFailure or None."""

    def __init__(self, inner: Any, fail: Callable[[int, list[bytes]], WriteFailure | None] | None = None) -> None:
        self.inner = inner
        self.fail = fail
        self.requests: list[list[bytes]] = []

    def write(self, body: bytes) -> None:
        lines = body.split(b"\n")
        self.requests.append(lines)
        failure = self.fail(len(self.requests), lines) if self.fail else None
        if failure is not None:
            raise failure
        self.inner.write(body)


class RefusesBad:
    """A fake store (for what is the writer's own behaviour, not InfluxDB's): a request holding a line with
    b"bad" is refused whole (400, naming the first bad line) and nothing of it is stored; others are stored."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[list[bytes]] = []
        self.stored: list[bytes] = []

    def write(self, body: bytes) -> None:
        lines = body.split(b"\n")
        self.requests.append(lines)
        if self.delay:
            time.sleep(self.delay)
        bad = [x for x in lines if b"bad" in x]
        if bad:
            raise WriteFailure(400, f"bad line: {bad[0].decode()}", retryable=False)
        self.stored.extend(lines)


CONFLICT = ('partial write: field type conflict: input field "v" on measurement "m" is type float, '
            "already exists as type integer dropped=1")


def gw_line(gateway: str, i: int, value: bytes | None = None, measurement: bytes = b"m") -> bytes:
    return b"%s,gw=%s v=%s %d" % (measurement, gateway.encode(), value or b"%di" % i, T + i)


def by_gateway(server: InfluxdServer, db: str, measurement: str = "m") -> dict[str, list[int]]:
    rows = server.query(f'SELECT "v" FROM "{measurement}" GROUP BY "gw"', db)
    found: dict[str, list[int]] = {}
    for row in rows:
        found.setdefault(row["gw"], []).append(row["v"])
    return found


async def write_puts(w: BatchWriter, puts: list[tuple[Any, Any, list[bytes]]]) -> None:
    await w.start()
    for token, group, lines in puts:
        await w.put(lines, token=token, group=group)
    await w.close()


def test_a_conflicting_put_refuses_only_itself(influxd: InfluxdServer, influx_db: str) -> None:
    """Gateways A (one conflicting line in its second message), B and C in one batch: B's and C's messages are
    stored, A's first too; A's second is refused with InfluxDB's own reason."""
    influxd.write(f"m,gw=setup v=0i {T}", influx_db)  # v is an integer in this shard
    puts = [
        ("A1", "A", [gw_line("A", 1), gw_line("A", 2)]),
        ("B1", "B", [gw_line("B", 1)]),
        ("C1", "C", [gw_line("C", 1), gw_line("C", 2)]),
        ("A2", "A", [gw_line("A", 3), gw_line("A", 4, b"0.5"), gw_line("A", 5)]),
        ("B2", "B", [gw_line("B", 2)]),
        ("C2", "C", [gw_line("C", 3)]),
    ]
    recorder = Recorder(v1(influxd, influx_db))
    results = Results()
    w = writer(recorder, results, batch_size=100, flush_interval=60)
    run(write_puts(w, puts))

    (result,) = results.items
    assert result.tokens == ["A1", "B1", "C1", "A2", "B2", "C2"]
    assert result.stored == ["A1", "B1", "C1", "B2", "C2"]
    assert result.refused == [Refused("A2", 400, CONFLICT)]
    assert (result.ok, result.lines, result.lines_refused) == (False, 10, 3)
    # The batch; one request per gateway, in the order of their first message; A's two messages apart.
    assert [len(r) for r in recorder.requests] == [10, 5, 2, 3, 2, 3] and result.attempts == 6
    stats = w.stats
    assert (stats.batches_split, stats.batches_rejected, stats.puts_rejected) == (1, 1, 1)
    assert (stats.lines_written, stats.lines_rejected, stats.retries) == (7, 3, 0)
    # Read back: B and C whole; of A's refused message InfluxDB kept the lines around the bad one (partial write).
    assert by_gateway(influxd, influx_db) == {"setup": [0], "A": [1, 2, 3, 5], "B": [1, 2], "C": [1, 2, 3]}


def test_a_conflict_inside_the_batch_on_a_new_measurement(influxd: InfluxdServer, influx_db: str) -> None:
    """The measurement is new to the shard: influxd refuses the whole request ("field type conflict") and
    stores NOTHING of it. Written apart, A's integer comes first and stays; B's float is refused."""
    puts = [
        ("A1", "A", [gw_line("A", 1, measurement=b"n")]),
        ("B1", "B", [gw_line("B", 2, b"2.5", b"n"), gw_line("B", 3, b"3.5", b"n")]),
        ("C1", "C", [gw_line("C", 4, measurement=b"other")]),
    ]
    recorder = Recorder(v1(influxd, influx_db), fail=None)
    refusals: list[str] = []
    inner_write = recorder.inner.write

    def write(body: bytes) -> None:
        try:
            inner_write(body)
        except WriteFailure as exc:
            refusals.append(exc.reason)
            raise

    recorder.inner.write = write  # type: ignore[method-assign]
    results = Results()
    run(write_puts(writer(recorder, results, flush_interval=60), puts))
    (result,) = results.items
    assert refusals[0] == "field type conflict"  # the first request: whole, nothing stored
    assert (result.stored, result.refused) == (["A1", "C1"], [Refused("B1", 400, CONFLICT.replace(
        'measurement "m"', 'measurement "n"').replace("dropped=1", "dropped=2"))])
    assert by_gateway(influxd, influx_db, "n") == {"A": [1]}
    assert by_gateway(influxd, influx_db, "other") == {"C": [4]}


def test_max_values_per_tag_the_split_stores_what_the_partial_write_lost(influxd_factory) -> None:
    """influxd 1.6.7, max-values-per-tag exceeded: besides the refused line it loses the good line of an existing
    series before it (dropped=1 says nothing of it). The re-write of B's messages stores it: reported stored is
    stored."""
    server: InfluxdServer = influxd_factory(settings={"data": {"max-values-per-tag": 3}})
    existing = f"m,gw=B,t=v0 v=0 {T}\nm,gw=B,t=v1 v=0 {T}\nm,gw=A,t=v2 v=0 {T}"
    body = [b"m,gw=B,t=v0 v=10 %d" % (T + 10), b"m,gw=B,t=v1 v=11 %d" % (T + 11), b"m,gw=A,t=v3 v=13 %d" % (T + 13)]
    for db in ("direct", "writer"):
        server.create_database(db)
        server.write(existing, db)
    # The same lines as one request, directly: B's first line is lost.
    with pytest.raises(InfluxError) as info:
        server.write(b"\n".join(body), "direct")
    assert info.value.status == 400
    assert by_gateway(server, "direct") == {"A": [0], "B": [0, 0, 11]}

    results = Results()
    run(write_puts(writer(v1(server, "writer"), results, flush_interval=60),
                   [("B1", "B", [body[0]]), ("B2", "B", [body[1]]), ("A1", "A", [body[2]])]))
    (result,) = results.items
    assert result.stored == ["B1", "B2"]
    assert result.refused == [Refused("A1", 400, 'partial write: max-values-per-tag limit exceeded (3/3): '
                                                 'measurement="m" tag="t" value="v3" dropped=1')]
    assert by_gateway(server, "writer") == {"A": [0], "B": [0, 0, 10, 11]}


def test_bisect_inside_one_group(influxd: InfluxdServer, influx_db: str) -> None:
    """16 messages of one gateway, the 11th with a conflicting line: halves, down to it alone; 9 requests."""
    influxd.write(f"m,gw=G v=0i {T}", influx_db)
    puts = [(i, "G", [gw_line("G", 100 + i, b"0.5" if i == 10 else None)]) for i in range(16)]
    recorder = Recorder(v1(influxd, influx_db))
    results = Results()
    run(write_puts(writer(recorder, results, flush_interval=60), puts))
    (result,) = results.items
    assert result.stored == [i for i in range(16) if i != 10]
    assert result.refused == [Refused(10, 400, CONFLICT)]
    assert [len(r) for r in recorder.requests] == [16, 8, 8, 4, 2, 2, 1, 1, 4] and result.attempts == 9
    assert by_gateway(influxd, influx_db)["G"] == [0] + [100 + i for i in range(16) if i != 10]


def test_body_too_large_is_halved(influxd_factory) -> None:
    """413 from influxd's [http] max-body-size: halves at once (not one request per group), down to the one
    message that is too large by itself, which is refused with 413."""
    server: InfluxdServer = influxd_factory(settings={"http": {"max-body-size": 4000}})
    server.create_database("db")
    puts = [(f"P{i}", f"P{i}", [gw_line(f"P{i}", i * 1000 + k) for k in range(20)]) for i in range(10)]
    puts.insert(5, ("BIG", "BIG", [gw_line("BIG", 50_000 + k) for k in range(150)]))
    size = {token: sum(len(x) + 1 for x in lines) for token, _, lines in puts}
    assert sum(size[f"P{i}"] for i in range(5)) < 4000 < size["BIG"]
    recorder = Recorder(V1Backend(InfluxConfig(url=server.url, database="db", gzip=False)))
    results = Results()
    run(write_puts(writer(recorder, results, batch_size=1000, flush_interval=60), puts))
    (result,) = results.items
    assert result.refused == [Refused("BIG", 413, "Request Entity Too Large")]
    assert result.stored == [token for token, _, _ in puts if token != "BIG"]
    # all 11 (413); P0-P4; BIG,P5-P9 (413); BIG,P5,P6 (413); BIG (413); P5,P6; P7-P9
    assert [len(r) // 10 for r in recorder.requests] == [35, 10, 25, 19, 15, 4, 6]
    rows = server.query('SELECT count("v") FROM "m"', "db")
    assert rows[0]["count"] == 200


def test_retry_during_the_split(influxd: InfluxdServer, influx_db: str, caplog: pytest.LogCaptureFixture) -> None:
    """A 503 while the batch is written apart is retried with the usual backoff, and nothing is lost."""
    influxd.write(f"m,gw=setup v=0i {T}", influx_db)
    overloaded = WriteFailure(503, "overloaded", retryable=True)
    recorder = Recorder(v1(influxd, influx_db), fail=lambda n, _lines: overloaded if n in (2, 3) else None)
    log = logging.getLogger("test.split.retry")
    puts = [("A1", "A", [gw_line("A", 1)]), ("B1", "B", [gw_line("B", 2, b"0.5")]), ("C1", "C", [gw_line("C", 3)])]
    results = Results()
    with caplog.at_level(logging.DEBUG, logger="test.split.retry"):
        w = writer(recorder, results, flush_interval=60, log=log)
        run(write_puts(w, puts))
    (result,) = results.items
    assert (result.stored, result.refused) == (["A1", "C1"], [Refused("B1", 400, CONFLICT)])
    # the batch (400); A (503, 503, stored); B (400); C
    assert [r[0][:6] for r in recorder.requests] == [b"m,gw=A", b"m,gw=A", b"m,gw=A", b"m,gw=A", b"m,gw=B", b"m,gw=C"]
    assert result.attempts == 6 and w.stats.retries == 2
    assert by_gateway(influxd, influx_db) == {"setup": [0], "A": [1], "C": [3]}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "overloaded" in warnings[0].getMessage()
    assert any("succeeded after 3 attempts" in r.getMessage() for r in caplog.records)


def test_results_come_in_order_and_a_group_keeps_its_order(influxd: InfluxdServer, influx_db: str) -> None:
    """Batches are reported in order, each put in put order; no request of a batch is made before the previous
    batch is settled; and within a group the later of two writes of a point wins, through the split too."""
    influxd.write(f"m,gw=setup v=0i {T}", influx_db)

    def point(gateway: str, batch: int, i: int, value: bytes | None = None) -> bytes:
        return b"m,gw=%s v=%s %d" % (gateway.encode(), value or b"%di" % (batch * 100 + i), T + batch * 1000 + i)

    batches = [
        [("A", point("A", 1, 0, b"1i")), ("B", point("B", 1, 1)), ("A", point("A", 1, 0, b"2i")),
         ("A", point("A", 1, 3, b"0.5"))],
        [("B", point("B", 2, 0)), ("C", point("C", 2, 1)), ("B", point("B", 2, 2)), ("C", point("C", 2, 3))],
        [("C", point("C", 3, 0, b"0.5")), ("A", point("A", 3, 1)), ("B", point("B", 3, 2)), ("C", point("C", 3, 3))],
    ]
    puts = [((b, i), gw, [x]) for b, batch in enumerate(batches, 1) for i, (gw, x) in enumerate(batch)]
    recorder = Recorder(v1(influxd, influx_db))
    results = Results()
    run(write_puts(writer(recorder, results, batch_size=4, flush_interval=60), puts))
    assert [r.tokens for r in results.items] == [[(b, i) for i in range(4)] for b in (1, 2, 3)]
    assert [r.stored for r in results.items] == [[(1, 0), (1, 1), (1, 2)], [(2, i) for i in range(4)],
                                                 [(3, 1), (3, 2), (3, 3)]]
    assert [[x.token for x in r.refused] for r in results.items] == [[(1, 3)], [], [(3, 0)]]
    batch_of_request = [max((int(x.split()[-1]) - T) // 1000 for x in r) for r in recorder.requests]
    assert batch_of_request == sorted(batch_of_request)
    rows = influxd.query(f"SELECT v FROM m WHERE gw = 'A' AND time = {T + 1000}", influx_db)
    assert [row["v"] for row in rows] == [2]


def test_a_gateway_that_poisons_every_message_costs_the_others_nothing(influxd: InfluxdServer,
                                                                       influx_db: str) -> None:
    """After its first refusal a gateway is written in a request of its own, after the others, until it has gone
    8 batches without a refusal: the others' lines are not written twice again."""
    influxd.write(f"m,gw=setup v=0i {T}", influx_db)
    gateways = ["evil", "g1", "g2", "g3"]
    puts = []
    for b in range(12):
        for gw in gateways:
            value = b"0.5" if gw == "evil" and b < 3 else None
            puts.append(((b, gw), gw, [gw_line(gw, b, value)]))
    results = Results()
    run(write_puts(writer(v1(influxd, influx_db), results, batch_size=4, flush_interval=60), puts))
    assert [r.attempts for r in results.items] == [5, 2, 2] + [2] * 8 + [1]
    assert [len(r.refused) for r in results.items] == [1, 1, 1] + [0] * 9
    assert [len(r.stored) for r in results.items] == [3, 3, 3] + [4] * 9
    assert by_gateway(influxd, influx_db)["evil"] == list(range(3, 12))


def test_memory_stays_bounded_while_a_batch_is_split() -> None:
    """max_pending_lines holds while a refused batch is written apart: puts wait, the split goes on."""
    backend = RefusesBad(delay=0.01)

    async def main() -> tuple[Results, int, bool]:
        results = Results()
        w = writer(backend, results, batch_size=20, flush_interval=0.01, max_pending_lines=50)
        await w.start()
        highest = 0

        async def watch() -> None:
            nonlocal highest
            while True:
                highest = max(highest, w.stats.pending_lines)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        for i in range(20):  # one batch, 20 gateways, one bad: 1 + 20 requests of 10 ms
            await w.put([b"bad v=1 %d" % i if i == 7 else line(i)], token=i, group=f"g{i}")
        await asyncio.sleep(0.05)
        assert len(backend.requests) >= 2  # the split has begun
        for i in range(20, 50):  # fits: 20 in flight + 30
            await w.put([line(i)], token=i, group="late")
        blocked = asyncio.create_task(w.put([line(50)], token=50, group="late"))
        await asyncio.sleep(0.05)
        was_blocked = not blocked.done() and not results.items
        await blocked
        await w.close()
        watcher.cancel()
        return results, highest, was_blocked

    results, highest, was_blocked = run(main())
    assert was_blocked and highest <= 50
    assert results.tokens == list(range(51))
    assert [x.token for r in results.items for x in r.refused] == [7]


# -- the property: with a store that refuses any request holding a bad line --------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", None]), st.lists(st.booleans(), max_size=3)),
                  max_size=40),
    batch_size=st.integers(1, 12),
)
def test_property_each_put_is_reported_once_by_its_own_lines(spec: list[tuple[str | None, list[bool]]],
                                                             batch_size: int) -> None:
    backend = RefusesBad()
    puts = [(i, group, [b"%s,p=%d,k=%d v=1" % (b"bad" if bad else b"ok", i, k) for k, bad in enumerate(flags)])
            for i, (group, flags) in enumerate(spec)]

    async def main() -> Results:
        results = Results()
        await write_puts(writer(backend, results, batch_size=batch_size, flush_interval=60), puts)
        return results

    results = run(main())
    assert [t for r in results.items for t in r.tokens] == list(range(len(puts)))  # each once, in order
    for result in results.items:
        refused = {x.token: x for x in result.refused}
        assert not set(result.stored) & set(refused)
        assert sorted([*result.stored, *refused]) == sorted(result.tokens)
        for token in result.tokens:
            lines = puts[token][2]
            bad = [x for x in lines if x.startswith(b"bad")]
            if bad:  # refused, with the reason naming its own first bad line
                assert refused[token] == Refused(token, 400, f"bad line: {bad[0].decode()}")
            else:
                assert token in result.stored
        # The stated bound on requests: 1 + G (when >= 2) + per refused group min(2k - 2, 2b ceil(log2 k)).
        groups: dict[Any, list[bool]] = {}
        for token in result.tokens:
            group, lines = puts[token][1], puts[token][2]
            if lines:
                groups.setdefault(group if group is not None else ("own", token), []).append(
                    any(x.startswith(b"bad") for x in lines))
        count = sum(len(g) for g in groups.values())
        bound = 1 + (len(groups) if len(groups) >= 2 else 0) + sum(
            min(2 * len(g) - 2, 2 * sum(g) * math.ceil(math.log2(len(g)))) for g in groups.values() if any(g))
        assert result.attempts <= (min(bound, 2 * count - 1) if count else 0), (result, groups)
    good = [x for _, _, lines in puts if not any(x.startswith(b"bad") for x in lines) for x in lines]
    assert sorted(set(backend.stored)) == sorted(good)  # the good puts' lines, and nothing of a bad one
