"""Agent.reconfigure on a running agent, in process (edge_agent/app.py): a serial source on a pty and a Modbus TCP
meter (pymodbus). What is unchanged keeps its very task; a moved serial source releases its port before the new
one reads; keys that need a restart change nothing. The outbox is the same file throughout. No broker: the uplink
is not what these properties are about (tests/test_reload.py and tests/test_remote_config_e2e.py run it)."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from edge_agent.app import Agent
from edge_agent.config import load_text
from edge_agent.reconfig import ReconfigureFailed
from labkit.meter_sim import MeterSimulator
from labkit.process import free_port
from labkit.serial_lab import PtyPair

pytestmark = pytest.mark.integration

CONFIG = """
[gateway]
id = "gw-live"
state_dir = "{state}"
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
tls = false
[uplink]
publish_interval = "200ms"
[[devices]]
kind = "modbus-tcp"
id = "meter"
host = "127.0.0.1"
port = {meter_port}
profile = "eastron_sdm630"
interval = "1s"
tags = {{ phase = "{phase}" }}
[[devices]]
kind = "serial"
id = "weather"
port = "{port}"
protocol = "ascii"
measurement = "weather"
[devices.ascii]
regex = '^T=(?P<temperature>-?\\d+\\.\\d+)$'
"""


async def readings_of(agent: Agent, device: str, minimum: int, feed=None, timeout: float = 10.0,  # type: ignore[no-untyped-def]
                      where=lambda reading: True) -> list:
    """Readings of `device` (and `where`) committed to the outbox (read on the outbox thread), once there are
    `minimum`; `feed()` is called before each look."""
    from wire.schema import decode_batch

    def read() -> list:  # type: ignore[type-arg]
        if agent.outbox is None:
            return []  # not open yet
        seqs = agent.outbox.seqs_after(-1, 100_000)
        return [r for _, body in agent.outbox.bodies(seqs) for r in decode_batch(body).readings if r.device == device and where(r)]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if feed is not None:
            feed()
        found = await loop.run_in_executor(agent._db, read)
        if len(found) >= minimum:
            return found
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {minimum} readings of {device} within {timeout} s")


def test_reconfigure_keeps_what_is_unchanged_and_moves_a_serial_port(tmp_path: Path, meter_sim: MeterSimulator) -> None:
    with PtyPair() as first, PtyPair() as second:
        _scenario(tmp_path, meter_sim, first, second)


def _scenario(tmp_path: Path, meter_sim: MeterSimulator, first: PtyPair, second: PtyPair) -> None:
    values = {"weather": 20.0}
    mqtt_port = free_port()  # nobody listens: the link retries, unchanged by every reconfiguration below

    def cfg(port: str, phase: str):  # type: ignore[no-untyped-def]
        text = CONFIG.format(state=tmp_path / "state", mqtt_port=mqtt_port, meter_port=meter_sim.port, port=port,
                             phase=phase)
        return load_text(textwrap.dedent(text), "agent.toml", tmp_path)

    def feed(pair: PtyPair):  # type: ignore[no-untyped-def]
        def write() -> None:
            values["weather"] += 0.5
            pair.write(f"T={values['weather']:.1f}\r\n".encode())
        return write

    async def scenario() -> None:
        start = cfg(first.device, "before")
        agent = Agent(start)
        stop = asyncio.Event()
        runner = asyncio.create_task(agent.run(stop))
        try:
            await readings_of(agent, "weather", 2, feed(first))
            await readings_of(agent, "meter", 1)
            outbox_file = agent.outbox.path  # type: ignore[union-attr]
            serial_task = agent._source_tasks["serial:weather"]
            bus_task = agent._source_tasks[f"bus:tcp://127.0.0.1:{meter_sim.port}"]

            # 1. the meter's tags change: its bus is rebuilt, the serial source's task is the same object
            plan = await agent.reconfigure(cfg(first.device, "after"))
            assert plan.start_buses == (f"tcp://127.0.0.1:{meter_sim.port}",) and plan.keep_serial == ("weather",)
            assert not plan.restart_link
            assert agent._source_tasks["serial:weather"] is serial_task and not serial_task.done()
            assert agent._source_tasks[f"bus:tcp://127.0.0.1:{meter_sim.port}"] is not bus_task and bus_task.done()
            await readings_of(agent, "meter", 1, where=lambda r: r.tags["phase"] == "after")
            await readings_of(agent, "weather", 4, feed(first))

            # 2. the serial source moves to another port: the old one is closed before the new one opens
            before = len(await readings_of(agent, "weather", 1))
            old_source = agent.serial_sources[0]
            plan = await agent.reconfigure(cfg(second.device, "after"))
            assert plan.stop_serial == plan.start_serial == ("weather",) and plan.keep_buses
            assert serial_task.done() and old_source.stream._serial is None and old_source.stream._tx is None
            assert agent.serial_sources[0].device.port == second.device
            await readings_of(agent, "weather", before + 2, feed(second))

            # 3. a key that needs a restart: refused, nothing changed
            tasks = dict(agent._source_tasks)
            moved = cfg(second.device, "after")
            moved.gateway.state_dir = str(tmp_path / "elsewhere")
            with pytest.raises(ReconfigureFailed, match=r"^gateway.state_dir: changing it needs a restart"):
                await agent.reconfigure(moved)
            assert agent._source_tasks == tasks and not any(t.done() for t in tasks.values())
            assert agent.outbox.path == outbox_file  # type: ignore[union-attr]
            assert not runner.done()
        finally:
            stop.set()
            await runner

    asyncio.run(scenario())
