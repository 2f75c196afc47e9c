"""The supervisor both programs run their long-lived tasks under: a task that dies ends the process.

A program's tasks (bus engines, serial sources, the cycle, the sender, the collector's consumer ...) run until
the program is stopped. If one of them ends before that, with an exception or by returning, the process must
not carry on without it (polling while nothing commits, consuming while nothing acknowledges): the other tasks
are cancelled, the program's clean-shutdown code runs (its `finally`: the last outbox commit, the final
acknowledgements), and `run_until_signal` (wire/cli.py) logs one line

    fatal: task <name> died: <exception>

and exits with EXIT_FATAL, so that systemd (Restart=on-failure) starts it again.

The set of tasks may change while the program runs (the agent rebuilds a bus when its configuration changes,
edge_agent/app.py `Agent.reconfigure`): give run_tasks_until a `TaskSet`, `add` a task to it, `retire` one.
A retired task is cancelled on purpose and awaited: its end is not a death. Any other end still is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
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


async def wait_ended(task: asyncio.Future[Any]) -> None:
    """Wait until `task` (perhaps cancelled by the caller) has ended. Its own CancelledError is not the caller's
    and is swallowed, unless the caller is being cancelled too; any other exception it ended with is raised."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the caller itself is being cancelled, not only `task`


class TaskSet:
    """The tasks a program runs until it stops, which may change meanwhile (event loop only).

    `add` starts one more; `retire` stops one on purpose: it leaves the set first, then is cancelled and
    awaited, so the supervisor never sees its end. Once run_tasks_until has ended, the set is closed: `add`
    raises RuntimeError (the program is stopping; nothing new may start).
    """

    def __init__(self, tasks: Iterable[asyncio.Task[Any]] = ()) -> None:
        self._tasks: dict[asyncio.Task[Any], None] = dict.fromkeys(tasks)  # insertion order: first death named
        self._changed = asyncio.Event()
        self.closed = False

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task: object) -> bool:
        return task in self._tasks

    def add(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        if self.closed:
            coro.close()
            raise RuntimeError(f"cannot start task {name}: the program is stopping")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = None
        self._changed.set()
        return task

    async def retire(self, task: asyncio.Task[Any]) -> None:
        """Stop `task` on purpose and wait until it has ended (its clean-up ran: a port closed, a socket shut).

        A task that already ended by itself is left in the set: that was a death, and the supervisor reports it.
        An exception raised by the task's own clean-up is raised here (a bug in that clean-up)."""
        if task.done() or task not in self._tasks:
            return
        del self._tasks[task]
        self._changed.set()
        task.cancel()
        await wait_ended(task)

    def _cancel_all(self) -> list[asyncio.Task[Any]]:
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks


async def run_tasks_until(stop: asyncio.Event, tasks: Iterable[asyncio.Task[Any]] | TaskSet) -> None:
    """Wait for `stop`, then cancel `tasks` and wait until they have all ended.

    If a task ends before `stop` is set (an exception, or it returned), the others are cancelled and awaited
    too, and TaskDied is raised naming the first one that ended: the caller's `finally` runs, then the process
    ends (wire/cli.py `run_until_signal`). `tasks` may be a TaskSet that changes while this runs; a task
    retired from it is not a death.
    """
    supervised = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
    stopped = asyncio.ensure_future(stop.wait())
    died: asyncio.Task[Any] | None = None
    try:
        while died is None and not stopped.done():
            supervised._changed.clear()
            changed = asyncio.ensure_future(supervised._changed.wait())
            try:
                done, _ = await asyncio.wait({stopped, changed, *supervised._tasks},
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            # A task that left the set (retired) while we waited is not looked at: its end was wanted.
            ended = [t for t in supervised._tasks if t in done]
            if ended and not stop.is_set():
                died = ended[0]
    finally:
        stopped.cancel()
        remaining = supervised._cancel_all()
        await asyncio.gather(stopped, *remaining, return_exceptions=True)
    if died is not None:
        cause = None if died.cancelled() else died.exception()
        if died.cancelled():
            cause = asyncio.CancelledError()
        raise TaskDied(died.get_name(), cause) from cause
