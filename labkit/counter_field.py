"""A simulated field whose every reading is known: Modbus TCP units whose input register pair 0x0000 counts
the reads it answered (1, 2, 3 ...), with a log of when each number was served.

For the fault tests: a number the agent read is a reading that must end in InfluxDB exactly once, at the time
the agent received it; a number missing from InfluxDB is a lost reading unless it was served in the last cycle
before the agent was killed (uncommitted, which the outbox's guarantee allows).

    field = CounterField(units=6)
    field.start()            # own event loop in a thread; field.port
    ...
    field.stop()
    field.served[unit]       # [(n, time_ns), ...] in order

    config = agent_config(path, "gw-1", mqtt, field, ...)  # an edge-agent polling every unit, as the fault tests run it
    accounting = account(produced, stored, excused=...)   # what InfluxDB holds against what was served
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from pymodbus.simulator import SimData, SimDevice
from pymodbus.simulator.simutils import DataType

from labkit.meter_sim import serve_tcp

PROFILE = Path(__file__).parent / "profiles" / "counter.toml"


class CounterField:
    def __init__(self, units: int, host: str = "127.0.0.1") -> None:
        self.units = list(range(1, units + 1))
        self.host = host
        self.port = 0
        self.served: dict[int, list[tuple[int, int]]] = {u: [] for u in self.units}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="counter-field", daemon=True)
        self._server = None

    def _device(self, unit: int) -> SimDevice:
        async def action(function_code, start_address, address, count, registers, set_values):
            if function_code != 4 or set_values is not None or address != 0:
                return None
            with self._lock:
                n = len(self.served[unit]) + 1
                self.served[unit].append((n, time.time_ns()))
            registers[0 - start_address] = n >> 16
            registers[1 - start_address] = n & 0xFFFF
            return None

        return SimDevice(
            id=unit,
            simdata=(
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, count=2, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=2, values=0, datatype=DataType.REGISTERS)],
            ),
            action=action,
        )

    def start(self) -> CounterField:
        self._thread.start()

        async def serve():
            server, _host, port = await serve_tcp([self._device(u) for u in self.units], self.host, 0)
            return server, port

        self._server, self.port = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def total(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.served.values())


@dataclass
class Accounting:
    """Readings served against readings stored, per reading (n) of each series (a device, or gateway and device)."""

    duplicates: int = 0  # extra points of one reading (never expected: a point is its series and sample time)
    lost: int = 0  # served, not stored, not excused
    excused: int = 0  # served, not stored, and `excused` said why that is allowed (a cycle not yet committed)
    wrong: int = 0  # stored at a time other than when it was served (within 1 s), or stored and never served
    problems: list[str] = field(default_factory=list)


def account(produced: dict[Hashable, list[tuple[int, int]]], stored: dict[Hashable, list[tuple[int, int]]],
            excused: Callable[[int], bool] = lambda _served_ns: False) -> Accounting:
    """Every reading served (`produced`: series -> [(n, served_ns)]) must be stored once (`stored`: series ->
    [(n, time_ns)] as InfluxDB returns them), at most 1 s after it was served; a missing one counts as excused
    when `excused(served_ns)`, else as lost."""
    out = Accounting()
    for series, served in produced.items():
        by_n: dict[int, list[int]] = {}
        for n, t in stored.get(series, []):
            by_n.setdefault(n, []).append(t)
        for n, times in by_n.items():
            if len(times) > 1:
                out.duplicates += len(times) - 1
                out.problems.append(f"{series} n={n} stored {len(times)} times: {times}")
        for n, served_ns in served:
            times = by_n.get(n)
            if times is None:
                if excused(served_ns):
                    out.excused += 1
                else:
                    out.lost += 1
                    out.problems.append(f"{series} n={n} (served {served_ns}) is not in InfluxDB")
            elif not served_ns <= times[0] <= served_ns + 1_000_000_000:
                out.wrong += 1
                out.problems.append(f"{series} n={n} stored at {times[0]}, served at {served_ns}")
        extra = set(by_n) - {n for n, _ in served}
        if extra:
            out.wrong += len(extra)
            out.problems.append(f"{series}: stored values never served: {sorted(extra)[:10]}")
    return out


def agent_config(path: Path, gateway_id: str, mqtt: dict[str, object], field: CounterField, *, identity_key: Path,
                 collector_key: Path, poll: float, cycle: float) -> Path:
    """agent.toml for an enrolled gateway polling every unit of `field` every `poll` seconds, committing every
    `cycle`, re-sending after 3 s (doubling up to 10 s), a heartbeat every 2 s: the fault tests' agent."""
    from labkit import stack

    return stack.write_agent_config(
        path, gateway_id, mqtt,
        [stack.modbus_tcp_device(f"counter-{u}", field.port, unit=u, interval=f"{poll}s", profile=str(PROFILE))
         for u in field.units],
        publish_interval=f"{cycle}s",
        uplink={"ack_timeout": "3s", "ack_timeout_max": "10s", "heartbeat_interval": "2s"},
        security={"identity_key": str(identity_key), "collector_key": str(collector_key)},
    )
