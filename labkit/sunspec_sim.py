"""A simulated SunSpec device on Modbus TCP (a real pymodbus server) serving a fixed holding-register image.

By default it serves the test inverter of tests/golden/sunspec/ (pysunspec's mbmap_test_inverter_1: `SunS`,
model 1, model 103, end marker) at base 40000; `base=0` or `base=50000` moves the whole image there, so the
discovery probe order can be tested. Any other image works too: `SunSpecSimulator({address: value, ...})`.
Registers outside the image answer exception 2 (illegal data address), and so does a read that spans a hole,
as on a real device.

Every answered read is logged in `served` as (address, count).

In-process (tests):

    with sunspec_in_thread(base=0) as sim:        # own event loop in a daemon thread
        ... AsyncModbusTcpClient("127.0.0.1", port=sim.port) ...

As a process: `python -m labkit.sunspec_sim --port 5020 [--base 40000] [--unit 1] [--registers FILE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import SimData, SimDevice
from pymodbus.simulator.simutils import DataType

from labkit.meter_sim import serve_tcp

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "golden" / "sunspec" / "test_inverter_1_registers_base40000.txt"
FIXTURE_BASE = 40000


def load_register_dump(path: Path | str = FIXTURE) -> dict[int, int]:
    """A register image from a dump file: one `<address> <hex value>` per line, `#` comments."""
    registers: dict[int, int] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            address_text, value_text = text.split()
            address, value = int(address_text, 0), int(value_text, 16)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: expected '<address> <hex value>', got {line!r}") from exc
        if not 0 <= address <= 65535 or not 0 <= value <= 0xFFFF:
            raise ValueError(f"{path}:{number}: address or value out of range")
        registers[address] = value
    return registers


def relocate(registers: Mapping[int, int], to_base: int, from_base: int = FIXTURE_BASE) -> dict[int, int]:
    """The same image moved so that what was at `from_base` is at `to_base`."""
    shift = to_base - from_base
    moved = {address + shift: value for address, value in registers.items()}
    if any(not 0 <= address <= 65535 for address in moved):
        raise ValueError(f"the image does not fit at base {to_base}")
    return moved


def fixture_image(base: int = FIXTURE_BASE) -> dict[int, int]:
    """The test inverter's registers with its SunS marker at `base`."""
    return relocate(load_register_dump(FIXTURE), base)


def _runs(registers: Mapping[int, int]) -> list[tuple[int, list[int]]]:
    """Contiguous runs of the image: [(first address, values), ...]."""
    runs: list[tuple[int, list[int]]] = []
    for address in sorted(registers):
        if runs and runs[-1][0] + len(runs[-1][1]) == address:
            runs[-1][1].append(registers[address])
        else:
            runs.append((address, [registers[address]]))
    return runs


class SunSpecSimulator:
    """A pymodbus ModbusTcpServer answering function code 3 from a fixed register image."""

    def __init__(self, registers: Mapping[int, int] | None = None, *, base: int = FIXTURE_BASE) -> None:
        self.registers = dict(registers) if registers is not None else fixture_image(base)
        self.served: list[tuple[int, int]] = []
        self.host = ""
        self.port = 0
        self.unit = 1
        self._server: ModbusTcpServer | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0, unit: int = 1) -> None:
        """Listen on host:port (port 0: a free port, see self.port) and answer requests for `unit`."""
        self.unit = unit
        holding = [SimData(a, values=v, datatype=DataType.REGISTERS) for a, v in _runs(self.registers)]
        if not holding:
            raise ValueError("an empty register image")
        device = SimDevice(
            id=unit,
            simdata=(
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, values=False, datatype=DataType.BITS)],
                holding,
                [SimData(0, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._on_access,
        )
        self._server, self.host, self.port = await serve_tcp(device, host, port)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def _on_access(self, function_code: int, start_address: int, address: int, count: int,
                         registers: list[int], set_values: list[int] | list[bool] | None) -> None:
        if function_code == 3 and set_values is None:
            self.served.append((address, count))


@contextlib.contextmanager
def sunspec_in_thread(
    registers: Mapping[int, int] | None = None, *, base: int = FIXTURE_BASE, host: str = "127.0.0.1",
    port: int = 0, unit: int = 1,
) -> Iterator[SunSpecSimulator]:
    """A SunSpecSimulator on its own event loop in a daemon thread, for synchronous callers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sunspec-sim", daemon=True)
    thread.start()
    try:
        sim = SunSpecSimulator(registers, base=base)
        asyncio.run_coroutine_threadsafe(sim.start(host, port, unit), loop).result(10)
        try:
            yield sim
        finally:
            asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.sunspec_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unit", type=int, default=1)
    parser.add_argument("--base", type=int, default=FIXTURE_BASE, help="where the SunS marker goes")
    parser.add_argument("--registers", type=Path, default=FIXTURE,
                        help="register dump (<address> <hex> per line) whose SunS marker is at 40000")
    args = parser.parse_args(argv)
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    try:
        image = relocate(load_register_dump(args.registers), args.base)
    except (OSError, ValueError) as exc:
        print(f"sunspec_sim: {exc}", file=sys.stderr)
        return 2
    sim = SunSpecSimulator(image)
    try:
        await sim.start(args.host, args.port, args.unit)
    except (OSError, RuntimeError) as exc:
        print(f"sunspec_sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"sunspec_sim: SunSpec device unit {sim.unit} (base {args.base}) listening on {sim.host}:{sim.port}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
