"""The supervisor both programs run their long-lived tasks under: a task that dies ends the process.

A program's tasks (bus engines, serial sources, the cycle, the sender, the collector's consumer ...) run until
the program is stopped. If one of them ends before that, with an exception or by returning, the process must
not carry on without it (polling while nothing commits, consuming while nothing acknowledges): the other tasks
are cancelled, the program's clean-shutdown code runs (its `finally`: the last outbox commit, the final
acknowledgements), and `run_until_signal` (wire/cli.py) logs one line

    fatal: task <name> died: <exception>

and exits with EXIT_FATAL, so that systemd (Restart=on-failure) starts it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

EXIT_FATAL = 70  # EX_SOFTWARE (sysexits.h): the program found itself in a state it cannot carry on from


class TaskDied(Exception):
    """A task that should have run until the program stopped ended first."""

    def __init__(self, name: str, cause: BaseException | None) -> None:
        super().__init__(name, cause)
        self.name = name
        self.cause = cause

    def __str__(self) -> str:
        if self.cause is None:
            what = "returned (it should run until the program stops)"
        elif isinstance(self.cause, asyncio.CancelledError):
            what = "cancelled (by something other than the program's stop)"
        else:
            what = f"{type(self.cause).__name__}: {self.cause}" if str(self.cause) else type(self.cause).__name__
        return f"task {self.name} died: {what}"


async def run_tasks_until(stop: asyncio.Event, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Wait for `stop`, then cancel `tasks` and wait until they have all ended.

    If a task ends before `stop` is set (an exception, or it returned), the others are cancelled and awaited
    too, and TaskDied is raised naming the first one that ended: the caller's `finally` runs, then the process
    ends (wire/cli.py `run_until_signal`).
    """
    tasks = list(tasks)
    stopped = asyncio.ensure_future(stop.wait())
    died: asyncio.Task[Any] | None = None
    try:
        pending: set[asyncio.Future[Any]] = {stopped, *tasks}
        while died is None and not stopped.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            ended = [t for t in tasks if t in done]
            if ended and not stop.is_set():
                died = ended[0]
    finally:
        stopped.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(stopped, *tasks, return_exceptions=True)
    if died is not None:
        cause = None if died.cancelled() else died.exception()
        if died.cancelled():
            cause = asyncio.CancelledError()
        raise TaskDied(died.get_name(), cause) from cause
