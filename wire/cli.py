"""What both command-line programs share: reporting a user's mistake as one line, and running until a signal."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from wire.config import ConfigError

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["text", "json"], help="overrides [log] format in the config")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides [log] level")


async def run_tasks_until(stop: asyncio.Event, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Wait for `stop`, then cancel `tasks` and wait until they have all ended."""
    tasks = list(tasks)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    """Run `main(stop)` until SIGINT/SIGTERM sets `stop`; a second signal ends at once."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                raise SystemExit(130)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await main(stop)

    try:
        asyncio.run(runner())
    except ConfigError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return 0


def iso_ns(time_ns: int) -> str:
    """RFC 3339 UTC with nanoseconds, for people reading JSON lines."""
    import datetime as dt

    seconds, ns = divmod(time_ns, 1_000_000_000)
    base = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{ns:09d}Z"
