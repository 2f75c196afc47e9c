"""BatchWriter against real servers: batching by size and time, order, tokens, rejections, retry until stored."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from collector.influx.backends import V1Backend, WriteFailure
from collector.influx.batcher import BatchResult, BatchWriter, WriterClosed
from collector.influx.config import InfluxConfig
from labkit.influxd import InfluxdServer
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
    assert (result.ok, result.status, result.attempts, result.lines, result.tokens) == (
        False, 404, 1, 3, ["x", "y"],
    )
    assert result.reason == 'database not found: "missing_db"'
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
