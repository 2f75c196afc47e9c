"""What both command-line programs share: reporting a user's mistake as one line, and running until a signal."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from wire.config import ConfigError
from wire.http import HttpError
from wire.supervise import EXIT_FATAL, TaskDied, run_tasks_until

__all__ = ["EXIT_FATAL", "EXIT_USAGE", "add_catalog_format", "add_log_options", "add_version_option", "fail",
           "iso_ns", "reports_missing_dependencies", "run_tasks_until", "run_until_signal"]

EXIT_USAGE = 2
# An installation without a program's extra lacks these (pyproject.toml [project.optional-dependencies]):
# import name -> (distribution, extra).
OPTIONAL_DEPENDENCIES = {
    "serial": ("pyserial", "agent"),
    "influxdb_client": ("influxdb-client", "collector"),
    "urllib3": ("urllib3", "collector"),
}
log = logging.getLogger("citynerve")


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def reports_missing_dependencies(program: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """A command's `main` that says in one line which optional dependency is missing and how to install it,
    instead of an ImportError's traceback: "error: edge-collector needs influxdb-client: pip install
    'citynerve[collector]'". Only for the modules an extra provides; any other import error is a bug."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def checked(*args: Any, **kwargs: Any) -> int:
            try:
                code = main(*args, **kwargs)
                sys.stdout.flush()  # here, where a reader that went away is caught below, not at the exit
                return code
            except BrokenPipeError:
                # The reader went away (`edge-agent enroll | head`): stop quietly as `cat` would, not with a
                # traceback. stdout now points at /dev/null so the interpreter's final flush does not fail again
                # (Python's documentation, "Note on SIGPIPE"). 128 + SIGPIPE, the status a shell shows for it.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                return 128 + signal.SIGPIPE
            except ModuleNotFoundError as exc:
                missing = OPTIONAL_DEPENDENCIES.get((exc.name or "").partition(".")[0])
                if missing is None:
                    raise
                distribution, extra = missing
                return fail(f"{program} needs {distribution}: pip install 'citynerve[{extra}]'")

        return checked

    return decorate


def add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["text", "json"], help="overrides [log] format in the config")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides [log] level")


def add_version_option(parser: argparse.ArgumentParser) -> None:
    from wire.version import VERSION

    python = ".".join(map(str, sys.version_info[:3]))
    parser.add_argument("--version", action="version", version=f"{parser.prog} {VERSION} (citynerve, Python {python})")


def add_catalog_format(parser: argparse.ArgumentParser) -> None:
    """--json | --csv of both `catalog` commands (wire/catalog.py); default a readable table."""
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json", help="a JSON list of objects")
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV (RFC 4180) with a header")
    parser.set_defaults(format="table")


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], *,
                     on_hangup: Callable[[], None] | None = None) -> int:
    """Run `main(stop)` until SIGINT/SIGTERM sets `stop`; a second signal ends at once.

    `on_hangup`: called on the event loop for each SIGHUP (reload the configuration; `systemctl reload`). It
    must only note the request and return. Without it SIGHUP is ignored rather than ending the process (its
    default action), so that a reload sent to a program that cannot reload costs nothing.

    A task that died (wire/supervise.py TaskDied, raised by run_tasks_until after `main`'s own clean-up ran)
    is logged as one line, `fatal: task <name> died: <exception>`, and ends the process with EXIT_FATAL.
    """

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                raise SystemExit(130)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, on_hangup or (lambda: log.info("SIGHUP ignored: nothing to reload")))
        await main(stop)

    try:
        asyncio.run(runner())
    except (ConfigError, HttpError) as exc:
        return fail(str(exc))
    except TaskDied as exc:
        log.critical("fatal: %s", exc)
        if exc.cause is not None:
            log.debug("the traceback of task %s", exc.name, exc_info=exc.cause)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return 130
    return 0


def iso_ns(time_ns: int) -> str:
    """RFC 3339 UTC with nanoseconds, for people reading JSON lines."""
    import datetime as dt

    seconds, ns = divmod(time_ns, 1_000_000_000)
    base = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{ns:09d}Z"
