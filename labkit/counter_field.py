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
"""

from __future__ import annotations

import asyncio
import threading
import time
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
