"""The supervisor both programs run their tasks under (wire/supervise.py, wire/cli.py): no clock, no sockets."""

from __future__ import annotations

import asyncio
import logging

import pytest

from wire.cli import EXIT_FATAL, run_until_signal
from wire.supervise import TaskDied, run_tasks_until


async def _forever(cleaned: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        cleaned.append(name)


def test_a_task_that_raises_ends_the_run_naming_it_after_the_others_are_cancelled() -> None:
    async def scenario() -> None:
        cleaned: list[str] = []
        go = asyncio.Event()

        async def commits() -> None:
            await go.wait()
            raise OSError(28, "No space left on device")

        tasks = [asyncio.create_task(_forever(cleaned, "bus"), name="bus:rs485"),
                 asyncio.create_task(commits(), name="cycle")]
        go.set()
        with pytest.raises(TaskDied) as died:
            await run_tasks_until(asyncio.Event(), tasks)
        assert str(died.value) == "task cycle died: OSError: [Errno 28] No space left on device"
        assert isinstance(died.value.cause, OSError) and died.value.name == "cycle"
        assert cleaned == ["bus"] and all(task.done() for task in tasks)

    asyncio.run(scenario())


def test_a_task_that_returns_when_it_should_run_forever_ends_the_run() -> None:
    async def scenario() -> None:
        cleaned: list[str] = []

        async def stats() -> None:
            return  # e.g. a loop whose condition was wrong

        tasks = [asyncio.create_task(stats(), name="stats"), asyncio.create_task(_forever(cleaned, "consume"))]
        with pytest.raises(TaskDied, match=r"^task stats died: returned \(it should run until the program stops\)$"):
            await run_tasks_until(asyncio.Event(), tasks)
        assert cleaned == ["consume"]

    asyncio.run(scenario())


def test_stop_cancels_every_task_and_what_they_do_while_ending_is_not_a_death() -> None:
    async def scenario() -> None:
        cleaned: list[str] = []
        stop = asyncio.Event()

        async def raises_when_cancelled() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                raise RuntimeError("a messy end after the stop")

        tasks = [asyncio.create_task(_forever(cleaned, "a")), asyncio.create_task(raises_when_cancelled())]
        runner = asyncio.create_task(run_tasks_until(stop, tasks))
        await asyncio.sleep(0)  # let the tasks start
        stop.set()
        await runner  # no TaskDied
        assert cleaned == ["a"] and all(task.done() for task in tasks)

    asyncio.run(scenario())


def test_run_until_signal_runs_the_programs_clean_up_then_logs_one_fatal_line_and_exits_non_zero(caplog) -> None:
    cleaned: list[str] = []

    async def main(stop: asyncio.Event) -> None:
        async def heartbeat() -> None:
            raise KeyError("devices")

        try:
            await run_tasks_until(stop, [asyncio.create_task(heartbeat(), name="heartbeat")])
        finally:
            cleaned.append("final commit")

    with caplog.at_level(logging.INFO):
        assert run_until_signal(main) == EXIT_FATAL != 0
    assert cleaned == ["final commit"]
    fatal = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in fatal] == ["fatal: task heartbeat died: KeyError: 'devices'"]
