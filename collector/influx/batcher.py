"""Batched, ordered, retried writes to InfluxDB from asyncio, with bounded memory.

    writer = BatchWriter(make_backend(cfg), batch_size=5000, flush_interval=1.0, retry_initial=0.5,
                         retry_max=30.0, max_pending_lines=100_000, on_result=handle)
    await writer.start()
    await writer.put(lines, token=delivery)   # waits while too much is pending
    ...
    await writer.close(drain=True)

- A put is atomic: its lines go into one batch (a put larger than batch_size makes a batch of its own).
  A put with no lines is still carried through, so its token is reported with the next batch (alone, it is
  reported at once as written, without a request).
- A batch leaves when it holds batch_size lines, or flush_interval after its oldest line arrived.
- One batch is in flight at a time, so batches are written in the order their puts were accepted; the HTTP
  request runs in a worker thread, never on the event loop.
- A retryable failure (InfluxDB down, 5xx, 429, timeout) retries the same batch for as long as it takes, with
  exponential backoff from retry_initial doubling up to retry_max, each pause shortened by up to 25% at random
  so that several collectors do not hammer a recovering server in step (a Retry-After header is honoured up
  to retry_max). Meanwhile puts queue up to max_pending_lines, then wait: memory stays bounded and the
  pressure reaches the MQTT broker, which keeps the rest.
- A non-retryable failure (other 4xx) is reported once, with the server's reason, and not retried.
- on_result(BatchResult) runs on the event loop after each batch, with the tokens of its puts (puts without a
  token contribute none), so a caller can acknowledge exactly what was stored or refused.

Exactly once: a batch is sent again only after a failure. If a request timed out after the server had
stored it, the retry stores the same points again; InfluxDB overwrites a point with the same series and
timestamp, so nothing is doubled there (VictoriaMetrics, without deduplication, keeps both samples).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from collector.influx.backends import WriteFailure

__all__ = ["BatchResult", "BatchWriter", "WriterClosed", "WriterStats"]

_REPEAT_WARNING_EVERY = 60.0  # seconds between warnings while one batch keeps failing the same way


@dataclass
class BatchResult:
    tokens: list[Any]
    lines: int
    ok: bool
    status: int | None  # HTTP status of the final failure; None when written (or never answered)
    reason: str  # the server's reason for a failure; "" when written
    attempts: int  # HTTP requests made for this batch (0 for a batch of puts without lines)


@dataclass
class WriterStats:
    lines_written: int = 0
    batches_written: int = 0
    retries: int = 0  # failed attempts that were retried
    batches_rejected: int = 0
    lines_rejected: int = 0
    last_error: str | None = None
    pending_lines: int = 0  # accepted by put() and not yet written or rejected


class WriterClosed(RuntimeError):
    """put() after close() began (or while the writer was never started)."""


class _Put(NamedTuple):
    arrived: float
    lines: list[bytes]
    count: int
    token: Any


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

    # -- public ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="influx-write")
        self._task = asyncio.create_task(self._run(), name="influx-writer")
        executor = self._executor
        self._task.add_done_callback(lambda _task: executor.shutdown(wait=False))

    async def put(self, lines: Sequence[bytes], token: Any = None) -> None:
        """Queue the lines of one message as one unit; waits while max_pending_lines would be exceeded."""
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
        self._buf.append(_Put(time.monotonic(), lines, count, token))
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
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we ourselves are being cancelled

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
            tokens, lines = self._take_batch()
            try:
                result = await self._write(tokens, lines)
            finally:
                self._pending -= len(lines)
                self._grant_room()
            self._report(result)

    def _take_batch(self) -> tuple[list[Any], list[bytes]]:
        tokens: list[Any] = []
        lines: list[bytes] = []
        buf = self._buf
        limit = self._batch_size
        while buf:
            put = buf[0]
            if lines and len(lines) + put.count > limit:
                break
            buf.popleft()
            lines += put.lines
            if put.token is not None:
                tokens.append(put.token)
        self._buf_lines -= len(lines)
        return tokens, lines

    async def _write(self, tokens: list[Any], lines: list[bytes]) -> BatchResult:
        count = len(lines)
        if not count:
            return BatchResult(tokens, 0, True, None, "", 0)
        body = b"\n".join(lines)
        loop = asyncio.get_running_loop()
        attempts = 0
        delay = self._retry_initial
        started = time.monotonic()
        warned_at = 0.0
        warned_reason = ""
        while True:
            attempts += 1
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
                return BatchResult(tokens, count, True, None, "", attempts)
            self._stats.last_error = str(failure)
            if not failure.retryable:
                return BatchResult(tokens, count, False, failure.status, failure.reason, attempts)
            self._stats.retries += 1
            pause = delay * (1.0 - 0.25 * self._jitter.random())
            if failure.retry_after is not None:
                pause = max(pause, min(failure.retry_after, self._retry_max))
            now = time.monotonic()
            if warned_reason != failure.reason or now - warned_at >= _REPEAT_WARNING_EVERY:
                warned_at, warned_reason = now, failure.reason
                self._log.warning(
                    "InfluxDB write of %d lines failed (attempt %d): %s; retrying in %.1fs, %d lines pending",
                    count, attempts, failure, pause, self._pending,
                    extra={"reason": "influx_unavailable"},
                )
            else:
                self._log.debug("InfluxDB write failed again (attempt %d): %s", attempts, failure)
            await asyncio.sleep(pause)
            delay = min(delay * 2.0, self._retry_max)

    def _report(self, result: BatchResult) -> None:
        stats = self._stats
        if result.ok:
            stats.lines_written += result.lines
            stats.batches_written += 1
        else:
            stats.batches_rejected += 1
            stats.lines_rejected += result.lines
        if not result.ok and self._on_result is None:  # an on_result owner reports it with its own context
            self._log.error(
                "InfluxDB refused a batch of %d lines (HTTP %s): %s; not retried",
                result.lines, result.status, result.reason, extra={"reason": "influx_rejected"},
            )
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                self._log.exception("on_result callback failed")
