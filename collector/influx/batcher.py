"""Batched, ordered, retried writes to InfluxDB from asyncio, with bounded memory; a batch refused for the content
of some of its lines is written apart until each put is known to be stored or refused for its own lines.

    writer = BatchWriter(make_backend(cfg), batch_size=5000, flush_interval=1.0, retry_initial=0.5,
                         retry_max=30.0, max_pending_lines=100_000, on_result=handle)
    await writer.start()
    await writer.put(lines, token=delivery, group=gateway)   # waits while too much is pending
    ...
    await writer.close(drain=True)

- A put is atomic: its lines go into one batch (a put larger than batch_size makes a batch of its own).
  A put with no lines is still carried through, so its token is reported with the next batch (alone, it is
  reported at once as written, without a request).
- `group` says whose lines a put holds (the collector passes the gateway id; it must be hashable); None makes
  the put a group of its own. Groups matter only when a batch is refused (below).
- A batch leaves when it holds batch_size lines, or flush_interval after its oldest line arrived.
- One batch is in flight at a time, and one request of it, so batches are written in the order their puts were
  accepted; the HTTP request runs in a worker thread, never on the event loop. A batch written apart (below)
  keeps the order of each group's puts; the order between points of different groups is kept only while a batch
  goes whole, which is enough when groups write disjoint series (the collector's points carry the gateway tag).
- A retryable failure (InfluxDB down, 5xx, 429, timeout) retries the same request for as long as it takes, with
  exponential backoff from retry_initial doubling up to retry_max, each pause shortened by up to 25% at random
  so that several collectors do not hammer a recovering server in step (a Retry-After header is honoured up
  to retry_max). Meanwhile puts queue up to max_pending_lines, then wait: memory stays bounded and the
  pressure reaches the MQTT broker, which keeps the rest. The same holds for every request of a split.
- A refusal of this side's configuration (401/403 credentials, 404 database, any 4xx but 400/413/422) is
  reported once for every put of the request, with the server's reason, and neither retried nor split.
- A refusal for the content (400, 422; and 413, body too large) is split: see "Refused batches".
- on_result(BatchResult) runs on the event loop after each batch with, per put (puts without a token contribute
  none), `stored`: the tokens of the puts whose lines were stored, and `refused`: Refused(token, status,
  reason) for each put refused for its own lines (or with its whole request, for a configuration refusal), so a
  caller can acknowledge exactly what was stored or refused. `ok` means every put was stored.

Exactly once: a request is sent again only after a failure. If a request timed out after the server had
stored it, the retry stores the same points again; InfluxDB overwrites a point with the same series and
timestamp, so nothing is doubled there (VictoriaMetrics, without deduplication, keeps both samples).

Refused batches
---------------
InfluxDB refuses a whole request for one bad line, and its answer does not say which line. So that one bad
message does not take down the others of its batch, the writer then finds the offending puts:

1. it writes each group's puts as a request of its own, groups in the order of their first put (a batch of one
   group skips this step);
2. a group refused again is bisected by puts, depth first (a refused first half is settled before the second
   half goes), down to single puts;
3. a single put refused is reported refused with the status and reason of its own request; every put whose
   request was answered 2xx is reported stored. A 413 is bisected in halves at once, whatever the groups: the
   size, not a line, is the trouble.

Re-writing a point that the refused request had stored (1.x stores the other lines: a "partial write") stores
the same point again, which is idempotent. The 2xx of the re-write is what proves a put stored: influxd 1.6.7
may lose good lines of a request with a partial write (see the table). A put reported refused may still have
some of its own lines stored (partial write).

Cost bound (retries aside). However the refusals fall, a batch of P puts with lines costs at most 2P - 1
requests: each split divides a refused request into at least two non-empty ones. For a content refusal (400,
422) of a batch in G groups it costs at most

    1 + G + sum over the refused groups g of min(2*k_g - 2, 2*b_g*ceil(log2 k_g))

requests (G counted only when >= 2; k_g puts of group g, b_g of them refused), and a line is sent at most
2 + ceil(log2 k_g) times: in the batch, in its group's request, once per level of its group's bisection. The
other groups cost one request each, their lines written a second time, once per refused batch. And a group
that had a put refused is "suspect" until it has gone 8 batches without one (1000 groups remembered at most):
its puts go in a request of their own after the rest of the batch (one more request per batch, refused or
not), so a gateway that poisons every message costs the others nothing after its first refusal, only its own
request and bisection (bench/refused_batch.py, docs/benchmarks.md "Refused batches").

What influxd 1.6.7 answers on /write (measured with the real server, labkit.influxd; tests/test_influx_backends.py
replays the rows, tests/test_influx_batcher.py the split against them):

| refusal                                                            | HTTP    | the request's other lines      | reason |
|--------------------------------------------------------------------|---------|--------------------------------|--------|
| field type conflict with the field already in the shard            | 400     | stored                         | a      |
| type conflict between lines of the request, measurement in shard   | 400     | stored (first line's type won) | a      |
| the same, measurement new to the shard (new database, or the first | 400     | NONE stored (but the types are | b      |
| write after a shard rollover: weekly with the default policy)      |         | recorded: the same again -> a) |        |
| max-values-per-tag exceeded (limit checked against the values      | 400     | stored, but good lines of      | c      |
| stored before the request: one request may pass it)               |         | existing series may be lost (1)|        |
| max-series-per-database exceeded (counts the request's LINES of    | 400     | every line of a new series     | d      |
| new series, not distinct series: a smaller request may fit)        |         | dropped; good ones lost as (1) |        |
| point outside the retention policy                                 | 400     | stored                         | e      |
| unparsable line(s) among good ones                                 | 400     | stored                         | f      |
| only unparsable lines                                              | 400     | -                              | g      |
| field named "time"                                                 | 400     | stored                         | h      |
| body over [http] max-body-size (with gzip: the compressed size)    | 413     | none stored                    | i      |
| unknown database / wrong credentials: not split                    | 404/401 | none stored                    | j      |
| unknown retention policy: retried                                  | 500     | none stored                    | k      |

a: partial write: field type conflict: input field "v" on measurement "m" is type float, already exists as type
   integer dropped=1
b: field type conflict
c: partial write: max-values-per-tag limit exceeded (3/3): measurement="m" tag="t" value="v3" dropped=1
d: partial write: max-series-per-database limit exceeded: (5) dropped=6
e: partial write: points beyond retention policy dropped=1
f: partial write: unable to parse 'm v= 1700000000000000000': missing field value\nunable to parse 'xx': missing
   fields dropped=0
g: unable to parse 'xx': missing fields
h: partial write: invalid field name: input field "time" on measurement "m" is invalid dropped=1
i: Request Entity Too Large
j: database not found: "x" / authorization failed
k: retention policy not found: x

Several problems in one request: the reason names the first, `dropped` counts them all.
(1) influxd 1.6.7's index removes the series it already has from the request's list of series keys in place, so
the shard then skips points by the wrong keys: a request "v0 v1 v2 v3" (tag t; v0-v2 exist; limit 3) lost the
good v0 line as well as v3, and "dropped" said 1. The split re-writes every good put, which stores it.

VictoriaMetrics (v1 /write and v2 /api/v2/write): a line it cannot parse is logged and skipped, every value
becomes a float (no type conflicts), samples outside the retention are dropped silently, and the answer is 204:
it never refuses a batch for its content, so nothing is split, and its 204 does not mean every line is stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from collector.influx.backends import WriteFailure
from wire.metrics import Histogram
from wire.supervise import wait_ended

__all__ = ["CONTENT_REFUSALS", "BatchResult", "BatchWriter", "Refused", "WriterClosed", "WriterStats"]

_REPEAT_WARNING_EVERY = 60.0  # seconds between warnings while one batch keeps failing the same way
# Refusals of a request's content: the batch is written apart to find whose lines they are.
CONTENT_REFUSALS = frozenset({400, 413, 422})
_SUSPECT_BATCHES = 8  # a group with a refused put is written apart for its next this many batches without one
_MAX_SUSPECTS = 1000
# Histogram bounds: seconds per HTTP request (a healthy influxd on a LAN answers a 5000-line batch in tens of ms;
# the client's timeout ends the slowest), and lines per batch (batch_size is 5000 by default).
REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_LINES_BUCKETS = (1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 50000)


@dataclass(frozen=True)
class Refused:
    """A put that was not stored: its token, and the status and reason of the request that refused it (its own
    request for a content refusal; the batch's for a configuration refusal such as 401/403/404)."""

    token: Any
    status: int | None
    reason: str


@dataclass
class BatchResult:
    tokens: list[Any]  # every put's token, in put order (puts without a token contribute none)
    stored: list[Any]  # tokens of the puts whose lines were stored, in put order
    refused: list[Refused]  # the puts refused, in put order
    lines: int  # lines of the batch
    lines_refused: int  # lines of the refused puts (token or not); some may be stored (a partial write)
    attempts: int  # HTTP requests made for this batch, retries and split included (0 for puts without lines)

    @property
    def ok(self) -> bool:
        """Every put of the batch was stored."""
        return not self.refused and not self.lines_refused

    @property
    def status(self) -> int | None:
        """The status of the first refused put with a token; None when there is none."""
        return self.refused[0].status if self.refused else None

    @property
    def reason(self) -> str:
        """The reason of the first refused put with a token; "" when there is none."""
        return self.refused[0].reason if self.refused else ""


@dataclass
class WriterStats:
    lines_written: int = 0
    batches_written: int = 0  # batches whose every put was stored
    retries: int = 0  # failed attempts that were retried
    batches_rejected: int = 0  # batches with at least one refused put
    lines_rejected: int = 0
    puts_rejected: int = 0
    batches_split: int = 0  # batches written apart after a refusal of their content
    last_error: str | None = None
    pending_lines: int = 0  # accepted by put() and not yet written or rejected
    # every HTTP request's duration, failed and retried ones included; and the lines of each batch
    request_seconds: Histogram = field(default_factory=lambda: Histogram(REQUEST_SECONDS_BUCKETS))
    batch_lines: Histogram = field(default_factory=lambda: Histogram(BATCH_LINES_BUCKETS))


class WriterClosed(RuntimeError):
    """put() after close() began (or while the writer was never started)."""


class _Put(NamedTuple):
    arrived: float
    lines: list[bytes]
    count: int
    token: Any
    group: Hashable | None


@dataclass(frozen=True)
class _Own:
    """The group of a put without one: equal to nothing but itself."""

    index: int


class _Batch:
    """One batch being written: its puts, the refusal of each refused put (by index), the requests made."""

    def __init__(self, puts: list[_Put]) -> None:
        self.puts = puts
        self.refusals: dict[int, WriteFailure] = {}
        self.attempts = 0
        self.split = False
        self.warned_at = 0.0
        self.warned_reason = ""

    def group_of(self, index: int) -> Hashable:
        group = self.puts[index].group
        return _Own(index) if group is None else group

    def result(self) -> BatchResult:
        tokens: list[Any] = []
        stored: list[Any] = []
        refused: list[Refused] = []
        lines_refused = 0
        for i, put in enumerate(self.puts):
            failure = self.refusals.get(i)
            if failure is not None:
                lines_refused += put.count
            if put.token is None:
                continue
            tokens.append(put.token)
            if failure is None:
                stored.append(put.token)
            else:
                refused.append(Refused(put.token, failure.status, failure.reason))
        lines = sum(put.count for put in self.puts)
        return BatchResult(tokens, stored, refused, lines, lines_refused, self.attempts)


class BatchWriter:
    def __init__(
        self,
        backend: Any,
        *,
        batch_size: int,
        flush_interval: float,
        retry_initial: float,
        retry_max: float,
        max_pending_lines: int,
        on_result: Callable[[BatchResult], None] | None = None,
        log: logging.Logger | None = None,
        max_batch_puts: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if flush_interval < 0:
            raise ValueError("flush_interval must not be negative")
        if retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("need 0 < retry_initial <= retry_max")
        if max_pending_lines < 1:
            raise ValueError("max_pending_lines must be at least 1")
        self._backend = backend
        self._batch_size = batch_size
        self._flush_interval = float(flush_interval)
        self._retry_initial = float(retry_initial)
        self._retry_max = float(retry_max)
        self._max_pending = max_pending_lines
        # Also flush once this many puts wait: a caller that holds an MQTT acknowledgement per put must not let
        # the broker's receive maximum be reached while small messages accumulate towards batch_size.
        self._max_puts = max_batch_puts or sys.maxsize
        self._on_result = on_result
        self._log = log or logging.getLogger(__name__)
        self._buf: deque[_Put] = deque()
        self._buf_lines = 0
        self._pending = 0  # lines in _buf + the batch in flight + space granted to waiting puts
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stats = WriterStats()
        self._jitter = random.Random()
        # group -> batches without a refusal still to go before its puts are batched with the others again
        self._suspects: OrderedDict[Hashable, int] = OrderedDict()

    # -- public ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="influx-write")
        self._task = asyncio.create_task(self._run(), name="influx-writer")
        executor = self._executor
        self._task.add_done_callback(lambda _task: executor.shutdown(wait=False))

    async def put(self, lines: Sequence[bytes], token: Any = None, group: Hashable | None = None) -> None:
        """Queue the lines of one message as one unit; waits while max_pending_lines would be exceeded.

        group: whose lines these are (e.g. the gateway id); None: a group of its own."""
        self._check_open()
        lines = list(lines)
        count = len(lines)
        if self._waiters or not self._fits(count):
            await self._wait_for_room(count)
            if self._closing:  # close() began while we waited: the room we were given is not used
                self._pending -= count
                raise WriterClosed("the InfluxDB writer is closing")
        else:
            self._pending += count
        was_empty = not self._buf
        self._buf.append(_Put(time.monotonic(), lines, count, token, group))
        self._buf_lines += count
        if was_empty or self._buf_lines >= self._batch_size or len(self._buf) >= self._max_puts:
            self._wake.set()

    async def close(self, drain: bool = True) -> None:
        """Stop accepting puts; with drain, first write everything pending (retrying as long as it takes).

        Cancelling a draining close (e.g. asyncio.wait_for timing out) stops the writer; what was not written
        by then is not reported. Puts still waiting for room raise WriterClosed.
        """
        self._closing = True
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(WriterClosed("the InfluxDB writer is closing"))
        task = self._task
        if task is None:
            return
        self._wake.set()
        if not drain:
            task.cancel()
        await wait_ended(task)

    @property
    def stats(self) -> WriterStats:
        return replace(self._stats, pending_lines=self._pending)

    # -- room for puts (backpressure) -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._task is None:
            raise WriterClosed("BatchWriter.start() was not called")
        if self._closing:
            raise WriterClosed("the InfluxDB writer is closed")
        if self._task.done():
            raise WriterClosed("the InfluxDB writer stopped")

    def _fits(self, count: int) -> bool:
        # Bounded by max_pending_lines, except that a single put larger than that is let through when nothing
        # else is pending (otherwise it could never go).
        return self._pending == 0 or self._pending + count <= self._max_pending

    async def _wait_for_room(self, count: int) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (count, fut)
        self._waiters.append(entry)  # first come, first served: a small put never overtakes a big one
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._pending -= count  # room was granted but will not be used
            elif entry in self._waiters:
                self._waiters.remove(entry)
            self._grant_room()
            raise

    def _grant_room(self) -> None:
        while self._waiters:
            count, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(count):
                return
            self._waiters.popleft()
            self._pending += count
            fut.set_result(None)

    # -- the writer task ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._buf:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._closing and self._buf_lines < self._batch_size and len(self._buf) < self._max_puts:
                delay = self._buf[0].arrived + self._flush_interval - time.monotonic()
                if delay > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    continue
            puts = self._take_batch()
            try:
                batch = await self._write(puts)
            finally:
                self._pending -= sum(put.count for put in puts)
                self._grant_room()
            self._report(batch)

    def _take_batch(self) -> list[_Put]:
        puts: list[_Put] = []
        count = 0
        buf = self._buf
        limit = self._batch_size
        while buf:
            put = buf[0]
            if count and count + put.count > limit:
                break
            puts.append(buf.popleft())
            count += put.count
        self._buf_lines -= count
        return puts

    async def _write(self, puts: list[_Put]) -> _Batch:
        batch = _Batch(puts)
        parts = self._first_parts(batch)
        for part in parts:
            failure = await self._send(batch, part)
            if failure is not None:
                await self._settle(batch, part, failure)
        self._update_suspects(batch, parts)
        return batch

    def _first_parts(self, batch: _Batch) -> list[list[int]]:
        """The batch's puts with lines as one request, suspect groups each in a request of its own after it."""
        work = [i for i, put in enumerate(batch.puts) if put.count]
        if not self._suspects:
            return [work] if work else []
        clean: list[int] = []
        apart: dict[Hashable, list[int]] = {}
        for i in work:
            group = batch.puts[i].group
            if group is not None and group in self._suspects:
                apart.setdefault(group, []).append(i)
            else:
                clean.append(i)
        return ([clean] if clean else []) + list(apart.values())

    async def _settle(self, batch: _Batch, part: list[int], failure: WriteFailure) -> None:
        """Find which puts of a refused request are refused for their own lines; store the others."""
        if failure.status not in CONTENT_REFUSALS or len(part) == 1:
            for i in part:
                batch.refusals[i] = failure
            return
        if not batch.split:
            batch.split = True
            self._log.debug(
                "InfluxDB refused a request of %d puts (HTTP %s): %s; writing them apart",
                len(part), failure.status, failure.reason,
            )
        for sub in self._split(batch, part, failure.status):
            sub_failure = await self._send(batch, sub)
            if sub_failure is not None:
                await self._settle(batch, sub, sub_failure)

    @staticmethod
    def _split(batch: _Batch, part: list[int], status: int | None) -> list[list[int]]:
        if status != 413:  # a line's content: whose is it? one request per group first
            groups: dict[Hashable, list[int]] = {}
            for i in part:
                groups.setdefault(batch.group_of(i), []).append(i)
            if len(groups) > 1:
                return list(groups.values())
        middle = len(part) // 2
        return [part[:middle], part[middle:]]

    def _update_suspects(self, batch: _Batch, parts: list[list[int]]) -> None:
        suspects = self._suspects
        refused = {
            batch.puts[i].group for i, failure in batch.refusals.items()
            if failure.status in CONTENT_REFUSALS and batch.puts[i].group is not None
        }
        for part in parts:
            group = batch.puts[part[0]].group
            if group in suspects and group not in refused:
                suspects[group] -= 1
                if suspects[group] <= 0:
                    del suspects[group]
        for group in refused:
            suspects[group] = _SUSPECT_BATCHES
            suspects.move_to_end(group)
        while len(suspects) > _MAX_SUSPECTS:
            suspects.popitem(last=False)

    async def _send(self, batch: _Batch, part: list[int]) -> WriteFailure | None:
        """One request with the lines of these puts, retried while retryable: None once stored, else the refusal."""
        puts = batch.puts
        body = b"\n".join(itertools.chain.from_iterable(puts[i].lines for i in part))
        count = sum(puts[i].count for i in part)
        loop = asyncio.get_running_loop()
        attempts = 0
        delay = self._retry_initial
        started = time.monotonic()
        while True:
            attempts += 1
            batch.attempts += 1
            began = time.monotonic()
            try:
                await loop.run_in_executor(self._executor, self._backend.write, body)
            except WriteFailure as exc:
                failure = exc
            except Exception as exc:  # a bug in a backend must not lose the batch: log it, retry it
                if attempts == 1:
                    self._log.exception("unexpected error writing to InfluxDB")
                failure = WriteFailure(None, f"unexpected {type(exc).__name__}: {exc}", retryable=True)
            else:
                if attempts > 1:
                    self._log.info(
                        "InfluxDB write succeeded after %d attempts (%.1fs): %d lines",
                        attempts, time.monotonic() - started, count,
                    )
                return None
            finally:
                self._stats.request_seconds.observe(time.monotonic() - began)
            self._stats.last_error = str(failure)
            if not failure.retryable:
                return failure
            self._stats.retries += 1
            pause = delay * (1.0 - 0.25 * self._jitter.random())
            if failure.retry_after is not None:
                pause = max(pause, min(failure.retry_after, self._retry_max))
            now = time.monotonic()
            if batch.warned_reason != failure.reason or now - batch.warned_at >= _REPEAT_WARNING_EVERY:
                batch.warned_at, batch.warned_reason = now, failure.reason
                self._log.warning(
                    "InfluxDB write of %d lines failed (attempt %d): %s; retrying in %.1fs, %d lines pending",
                    count, attempts, failure, pause, self._pending,
                    extra={"reason": "influx_unavailable"},
                )
            else:
                self._log.debug("InfluxDB write failed again (attempt %d): %s", attempts, failure)
            await asyncio.sleep(pause)
            delay = min(delay * 2.0, self._retry_max)

    def _report(self, batch: _Batch) -> None:
        result = batch.result()
        stats = self._stats
        stats.lines_written += result.lines - result.lines_refused
        if result.lines:
            stats.batch_lines.observe(result.lines)
        stats.batches_split += batch.split
        if not batch.refusals:
            stats.batches_written += 1
        else:
            stats.batches_rejected += 1
            stats.lines_rejected += result.lines_refused
            stats.puts_rejected += len(batch.refusals)
            if self._on_result is None:  # an on_result owner reports it with its own context
                first = batch.refusals[min(batch.refusals)]
                self._log.error(
                    "InfluxDB refused %d of the %d puts of a batch (%d of %d lines; HTTP %s): %s; not retried",
                    len(batch.refusals), len(batch.puts), result.lines_refused, result.lines, first.status,
                    first.reason, extra={"reason": "influx_rejected"},
                )
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                self._log.exception("on_result callback failed")
