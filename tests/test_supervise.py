"""The supervisor both programs run their tasks under (wire/supervise.py, wire/cli.py): no clock, no sockets."""

from __future__ import annotations

import asyncio
import logging

import pytest

from wire.cli import EXIT_FATAL, run_until_signal
from wire.supervise import TaskDied, TaskSet, run_tasks_until


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


def test_a_task_set_grows_and_shrinks_while_supervised_and_a_retired_task_is_not_a_death() -> None:
    async def scenario() -> None:
        cleaned: list[str] = []
        stop = asyncio.Event()
        tasks = TaskSet([asyncio.create_task(_forever(cleaned, "cycle"), name="cycle")])
        runner = asyncio.create_task(run_tasks_until(stop, tasks))
        old_bus = tasks.add(_forever(cleaned, "bus-old"), "bus:a")
        await asyncio.sleep(0)
        await tasks.retire(old_bus)  # a bus whose configuration changed: stopped on purpose
        assert cleaned == ["bus-old"] and old_bus not in tasks and not runner.done()
        new_bus = tasks.add(_forever(cleaned, "bus-new"), "bus:a")
        await asyncio.sleep(0)
        assert not runner.done() and new_bus in tasks and len(tasks) == 2
        stop.set()
        await runner  # no TaskDied: the retired task's cancellation was wanted
        assert sorted(cleaned) == ["bus-new", "bus-old", "cycle"]
        with pytest.raises(RuntimeError, match="cannot start task bus:b: the program is stopping"):
            tasks.add(_forever(cleaned, "late"), "bus:b")

    asyncio.run(scenario())


def test_a_task_added_at_run_time_that_dies_still_ends_the_run() -> None:
    async def scenario() -> None:
        cleaned: list[str] = []
        tasks = TaskSet([asyncio.create_task(_forever(cleaned, "send"), name="send")])
        runner = asyncio.create_task(run_tasks_until(asyncio.Event(), tasks))
        await asyncio.sleep(0)

        async def broken_bus() -> None:
            raise ValueError("plan for unit 3")

        tasks.add(broken_bus(), "bus:rs485-2")
        with pytest.raises(TaskDied, match=r"^task bus:rs485-2 died: ValueError: plan for unit 3$"):
            await runner
        assert cleaned == ["send"]

    asyncio.run(scenario())


def test_retiring_a_task_that_already_died_leaves_its_death_to_the_supervisor() -> None:
    async def scenario() -> None:
        async def dies() -> None:
            raise OSError("port gone")

        tasks = TaskSet()
        task = tasks.add(dies(), "serial:p1")
        await asyncio.sleep(0)
        assert task.done()
        await tasks.retire(task)  # too late to be wanted: still in the set
        with pytest.raises(TaskDied, match="task serial:p1 died: OSError: port gone"):
            await run_tasks_until(asyncio.Event(), tasks)

    asyncio.run(scenario())


def test_a_clean_up_that_raises_while_retired_is_raised_to_whoever_retired_it() -> None:
    async def scenario() -> None:
        async def messy() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                raise RuntimeError("close failed")

        tasks = TaskSet()
        task = tasks.add(messy(), "bus:x")
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="close failed"):
            await tasks.retire(task)
        assert task not in tasks

    asyncio.run(scenario())


def test_sighup_calls_the_reload_hook_on_the_loop_and_without_one_is_not_fatal(caplog) -> None:
    import os
    import signal

    calls: list[str] = []
    reloaded = asyncio.Event()

    def on_hangup() -> None:
        asyncio.get_running_loop()  # called on the event loop (add_signal_handler), not in a signal frame
        calls.append("reload")
        reloaded.set()

    async def with_hook(stop: asyncio.Event) -> None:
        for _ in range(2):
            reloaded.clear()
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.wait_for(reloaded.wait(), 5)

    assert run_until_signal(with_hook, on_hangup=on_hangup) == 0
    assert calls == ["reload", "reload"]

    async def without_hook(stop: asyncio.Event) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        while "SIGHUP ignored" not in caplog.text:  # SIGHUP's default action would end this process instead
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.INFO):
        assert run_until_signal(without_hook) == 0
