"""A simulated Eastron SDM630 on Modbus TCP (a real pymodbus server) that keeps a log of what it served.

Values change plausibly: line-to-neutral voltages around 230 V with noise, currents following a daily load
curve (morning bump, evening peak), active power = V * I * power factor per phase, frequency near 50 Hz, and
the import energy counter integrating the total power, so it only ever grows.
The meter re-measures at most every `update_interval` seconds (a real SDM630 refreshes about once a second),
so the requests of one poll usually see one consistent snapshot.

Proving that stored values equal served values: every answered read request is logged as `Served`
(wall-clock time.time_ns() when the answer was built, unit, table, address, count, registers) in `served`,
and with `--serve-log FILE.jsonl` as one JSON line per request, flushed at once. `decode_served(log, profile)`
maps logged registers back to named values with a firmware profile; `sdm630_values(entry)` does the same with
the simulator's own register table (independent of the agent's decoders).

In-process (tests, demos):

    sim = MeterSimulator(seed=1)
    await sim.start("127.0.0.1", 0, unit=1)   # port 0: any free port, read sim.port
    ...
    await sim.stop()

or from synchronous code `with meter_in_thread(unit=1) as sim:` (own event loop in a thread).
As a process: `python -m labkit.meter_sim --port 5020 [--unit 1] [--serve-log served.jsonl] [--seed 7]`.

The served registers 0x0000..0x004F (30001..30080) are readable, listed parameters carry values and unlisted
registers in that block read 0; anything else answers exception 2 (illegal data address).
Holding registers 0x0000..0x0015 (40001..40022) hold the demand period (60 min) and the system type
(3 = 3P4W), and can be written (FC 6, 16) as on a real SDM630.

Lab additions, not in an SDM630, so that commands have something to write (labkit/profiles/lab_meter.toml):
holding register 0x0020 `setpoint` (int16, 0.1 degC, initially 20.0) in a block 0x0016..0x002F that reads 0,
and 16 coils 0..15 (`relay_1` = coil 0, `relay_2` = coil 1; FC 1, 5, 15). Every accepted write is logged in
`writes` (`Written`: time, table, address, values) before it is applied; `write_delay[(table, address)]`
holds a write that long before answering (a slow device: the agent can be killed mid-command), and
`write_exceptions[(table, address)] = code` answers a write there with that Modbus exception instead.

Read Device Identification (FC 43 / MEI 14, Modbus Application Protocol 1.1b §6.21) is answered by pymodbus'
own implementation (its ReadDeviceInformationResponse and DeviceInformationFactory: stream and individual
access, "more follows" when the objects do not fit one answer) with this simulator's `identity` (object id ->
text; SIMULATOR_IDENTITY by default). pymodbus keeps one identity per process; here each simulator answers with
its own. `identity=None` makes the meter refuse the function (exception 01, illegal function), as many real
meters do; `--no-identity` on the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.device import DeviceInformationFactory, ModbusDeviceIdentification
from pymodbus.pdu.mei_message import ReadDeviceInformationResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import SimData, SimDevice
from pymodbus.simulator.simutils import DataType

from edge_agent.modbus.decode import Missing

# The simulator's own SDM630 input register map (0-based addresses, float32 ABCD), written from Eastron's
# table independently of firmware_profiles/eastron_sdm630.toml so that a wrong profile address shows up.
SDM630_INPUT: dict[str, int] = {
    "voltage_l1": 0x00,
    "voltage_l2": 0x02,
    "voltage_l3": 0x04,
    "current_l1": 0x06,
    "current_l2": 0x08,
    "current_l3": 0x0A,
    "power_l1": 0x0C,
    "power_l2": 0x0E,
    "power_l3": 0x10,
    "apparent_power_l1": 0x12,
    "apparent_power_l2": 0x14,
    "apparent_power_l3": 0x16,
    "reactive_power_l1": 0x18,
    "reactive_power_l2": 0x1A,
    "reactive_power_l3": 0x1C,
    "power_factor_l1": 0x1E,
    "power_factor_l2": 0x20,
    "power_factor_l3": 0x22,
    "voltage_average": 0x2A,
    "current_average": 0x2E,
    "current_sum": 0x30,
    "power": 0x34,
    "apparent_power": 0x38,
    "reactive_power": 0x3C,
    "power_factor": 0x3E,
    "frequency": 0x46,
    "energy_import": 0x48,
    "energy_export": 0x4A,
    "reactive_energy_import": 0x4C,
    "reactive_energy_export": 0x4E,
}
SDM630_HOLDING: dict[str, int] = {"demand_period": 0x02, "system_type": 0x0A}
INPUT_BLOCK = 0x50  # registers 0x0000..0x004F are served
HOLDING_BLOCK = 0x30  # 0x0000..0x0015 the SDM630's, 0x0016..0x002F the lab's
LAB_HOLDING: dict[str, int] = {"setpoint": 0x20}  # int16, 0.1 degC
LAB_COILS: dict[str, int] = {"relay_1": 0, "relay_2": 1}

_FUNCTION_TABLE = {4: "input", 3: "holding"}
_WRITE_TABLE = {5: "coil", 15: "coil", 6: "holding", 16: "holding"}


class Written(NamedTuple):
    """One write the simulator accepted (before it is applied and answered)."""

    time_ns: int
    table: str  # "holding" | "coil"
    address: int
    values: tuple[int, ...]  # registers, or 0/1 per coil


# What the simulated meter answers to Read Device Identification: the basic objects (0x00-0x02) and two of
# the regular ones (0x03-0x06), as a vendor fills them in.
SIMULATOR_IDENTITY: dict[int, str] = {
    0x00: "citynerve lab",  # VendorName
    0x01: "SDM630-SIM",  # ProductCode
    0x02: "1.4",  # MajorMinorRevision
    0x04: "SDM630 simulator",  # ProductName
    0x05: "SDM630-Modbus",  # ModelName
}


class _DeviceIdRequest(ModbusPDU):
    """FC 43 for one server (custom_pdu): MEI 14 answered from the class's `identity` by pymodbus' own encoder,
    any other MEI type refused; `identity` None refuses the function. (pymodbus' built-in handler reads one
    process-wide identity, so two simulators in one process could not differ.)"""

    function_code = 0x2B
    rtu_frame_size = 7  # 2B 0E code object: a request's RTU size, for pymodbus' serial framer
    identity: ModbusDeviceIdentification | None = None

    def __init__(self, dev_id: int = 0, transaction_id: int = 0) -> None:
        super().__init__(dev_id=dev_id, transaction_id=transaction_id)
        self.mei_type = self.read_code = self.object_id = 0

    def encode(self) -> bytes:
        return bytes((self.mei_type, self.read_code, self.object_id))

    def decode(self, data: bytes) -> None:
        self.mei_type, self.read_code, self.object_id = struct.unpack(">BBB", data[:3])

    async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
        identity = type(self).identity
        if identity is None or self.mei_type != 0x0E:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)
        if not 1 <= self.read_code <= 4:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_VALUE)
        information = DeviceInformationFactory.get(_IdentityBlock(identity), self.read_code, self.object_id)
        if self.read_code == 4 and not information.get(self.object_id):
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
        return ReadDeviceInformationResponse(read_code=self.read_code, information=information, dev_id=device_id,
                                             transaction_id=self.transaction_id)


class _IdentityBlock(NamedTuple):  # what DeviceInformationFactory reads: a control block's Identity
    Identity: ModbusDeviceIdentification


def device_id_pdu(identity: Mapping[int, str] | None) -> type[ModbusPDU]:
    """A custom_pdu class answering FC 43 / MEI 14 with `identity` (None: exception 01)."""
    ident = None if identity is None else ModbusDeviceIdentification(info=dict(identity))
    return type("DeviceIdRequest", (_DeviceIdRequest,), {"identity": ident})


class Served(NamedTuple):
    """One answered read request."""

    time_ns: int  # time.time_ns() when the answer was built, just before it was written to the socket
    unit: int
    table: str  # "input" | "holding"
    address: int
    count: int
    registers: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "time_ns": self.time_ns,
                "unit": self.unit,
                "table": self.table,
                "address": self.address,
                "count": self.count,
                "registers": list(self.registers),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str | Mapping[str, Any]) -> Served:
        raw = json.loads(line) if isinstance(line, str) else line
        return cls(
            int(raw["time_ns"]),
            int(raw["unit"]),
            str(raw["table"]),
            int(raw["address"]),
            int(raw["count"]),
            tuple(int(r) for r in raw["registers"]),
        )


def load_serve_log(path: Path | str) -> list[Served]:
    with open(path, encoding="utf-8") as fh:
        return [Served.from_json(line) for line in fh if line.strip()]


def float32_registers(value: float) -> tuple[int, int]:
    """A float32 as an SDM630 sends it: high word first, big-endian bytes."""
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return high, low


def registers_float32(high: int, low: int) -> float:
    return struct.unpack(">f", struct.pack(">HH", high, low))[0]


class MeterModel:
    """The physics: what an SDM630 on a small building's supply would measure at a given time."""

    PHASE_SHARE = (0.9, 1.0, 1.12)

    def __init__(
        self,
        rng: random.Random,
        *,
        peak_current: float = 32.0,
        day_seconds: float = 86400.0,
        energy_import_kwh: float = 18_250.0,
        energy_export_kwh: float = 0.0,
        reactive_import_kvarh: float = 2_100.0,
    ) -> None:
        self.rng = rng
        self.peak_current = peak_current
        self.day_seconds = day_seconds
        self.energy_import_kwh = energy_import_kwh
        self.energy_export_kwh = energy_export_kwh
        self.reactive_import_kvarh = reactive_import_kvarh
        self._last: float | None = None

    def load_factor(self, now: float) -> float:
        """0.25 at night, a bump around 08:00 and the peak around 19:00 (UTC, or compressed days)."""
        hour = (now % self.day_seconds) / self.day_seconds * 24.0
        morning = 0.35 * math.exp(-(((hour - 8.0) / 1.5) ** 2))
        evening = 0.7 * math.exp(-(((hour - 19.0) / 2.5) ** 2))
        return 0.25 + morning + evening

    def measure(self, now: float) -> dict[str, float]:
        rng = self.rng
        load = self.load_factor(now)
        values: dict[str, float] = {}
        total_p = total_s = total_q = 0.0
        volts, amps = [], []
        for i, share in enumerate(self.PHASE_SHARE, start=1):
            v = 230.0 + 3.0 * math.sin(2 * math.pi * now / 900.0 + i * 2.1) + rng.gauss(0.0, 0.4)
            a = max(0.05, self.peak_current * load * share * (1.0 + rng.gauss(0.0, 0.03)))
            pf = min(0.999, max(0.8, 0.95 + rng.gauss(0.0, 0.015)))
            s = v * a
            p = s * pf
            q = math.sqrt(max(0.0, s * s - p * p))
            values |= {
                f"voltage_l{i}": v,
                f"current_l{i}": a,
                f"power_l{i}": p,
                f"apparent_power_l{i}": s,
                f"reactive_power_l{i}": q,
                f"power_factor_l{i}": pf,
            }
            volts.append(v)
            amps.append(a)
            total_p, total_s, total_q = total_p + p, total_s + s, total_q + q
        values |= {
            "voltage_average": sum(volts) / 3,
            "current_average": sum(amps) / 3,
            "current_sum": sum(amps),
            "power": total_p,
            "apparent_power": total_s,
            "reactive_power": total_q,
            "power_factor": total_p / total_s,
            "frequency": 50.0 + 0.03 * math.sin(2 * math.pi * now / 300.0) + rng.gauss(0.0, 0.005),
        }
        if self._last is not None:
            dt = max(0.0, now - self._last)  # a wall clock stepping back must not make energy run backwards
            self.energy_import_kwh += total_p * dt / 3.6e6
            self.reactive_import_kvarh += total_q * dt / 3.6e6
        self._last = now
        values["energy_import"] = self.energy_import_kwh
        values["energy_export"] = self.energy_export_kwh
        values["reactive_energy_import"] = self.reactive_import_kvarh
        values["reactive_energy_export"] = 0.0
        return values


class MeterSimulator:
    """A simulated SDM630 served by pymodbus' ModbusTcpServer (see the module docstring)."""

    def __init__(
        self,
        *,
        seed: int | None = None,
        update_interval: float = 1.0,
        serve_log: Path | str | None = None,
        keep_served: int = 100_000,
        model: MeterModel | None = None,
        identity: Mapping[int, str] | None = SIMULATOR_IDENTITY,
    ) -> None:
        self.model = model or MeterModel(random.Random(seed))
        self.identity = identity
        self.update_interval = update_interval
        self.served: list[Served] = []
        self.values: dict[str, float] = {}  # last measurement, as float32 values (what the registers hold)
        self.keep_served = keep_served
        self.host = ""
        self.port = 0
        self.unit = 1
        self._serve_log_path = serve_log
        self._log_file: IO[str] | None = None
        self._server: ModbusTcpServer | None = None
        self._measured_at: float | None = None
        self.writes: list[Written] = []
        self._written = threading.Condition()  # notified on every accepted write (wait_for_write)
        self.write_delay: dict[tuple[str, int], float] = {}
        self.write_exceptions: dict[tuple[str, int], int] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0, unit: int = 1) -> None:
        """Listen on host:port (port 0: a free port, see self.port) and answer requests for `unit`."""
        self.unit = unit
        if self._serve_log_path is not None:
            self._log_file = open(self._serve_log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        holding = [0] * HOLDING_BLOCK
        for name, value in (("demand_period", 60.0), ("system_type", 3.0)):
            address = SDM630_HOLDING[name]
            holding[address : address + 2] = float32_registers(value)
        holding[LAB_HOLDING["setpoint"]] = 200  # 20.0 degC
        device = SimDevice(
            id=unit,
            simdata=(
                [SimData(0, values=False, datatype=DataType.BITS)],  # 16 coils, all off
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, values=holding, datatype=DataType.REGISTERS)],
                [SimData(0, count=INPUT_BLOCK, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._on_access,
            use_bit_addressing=True,  # coil n is bit n % 16 of register n // 16, as FC 1, 5 and 15 expect
        )
        self._server, self.host, self.port = await serve_tcp(device, host, port, self.identity)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def _on_access(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        """pymodbus calls this for every valid access, before it copies the answer out of `registers` (or
        the written values into them)."""
        if set_values is not None:
            return await self._on_write(function_code, address, set_values)
        table = _FUNCTION_TABLE.get(function_code)
        if table is None:
            return None  # other functions: not part of the serve log
        if table == "input":
            self._refresh(registers, start_address)
        offset = address - start_address
        entry = Served(
            time.time_ns(), self.unit, table, address, count, tuple(registers[offset : offset + count])
        )
        self._record(entry)
        return None

    async def _on_write(self, function_code: int, address: int, values: list[int] | list[bool]) -> ExcCodes | None:
        table = _WRITE_TABLE.get(function_code, f"function {function_code}")
        code = self.write_exceptions.get((table, address))
        if code is not None:
            return ExcCodes(code)
        with self._written:
            self.writes.append(Written(time.time_ns(), table, address, tuple(int(v) for v in values)))
            self._written.notify_all()
        delay = self.write_delay.get((table, address))
        if delay:
            await asyncio.sleep(delay)
        return None

    def wait_for_write(self, predicate: Callable[[list[Written]], bool], timeout: float = 10.0) -> list[Written]:
        """Block (another thread than the simulator's) until `predicate(writes)` holds; TimeoutError after
        `timeout` seconds."""
        with self._written:
            if not self._written.wait_for(lambda: predicate(self.writes), timeout):
                raise TimeoutError(f"no such write within {timeout}s; writes: {self.writes}")
            return list(self.writes)

    def _refresh(self, registers: list[int], start_address: int) -> None:
        now = time.time()
        if self._measured_at is not None and now - self._measured_at < self.update_interval:
            return
        self._measured_at = now
        measured = self.model.measure(now)
        for name, address in SDM630_INPUT.items():
            high, low = float32_registers(measured[name])
            registers[address - start_address] = high
            registers[address - start_address + 1] = low
            self.values[name] = registers_float32(high, low)

    def _record(self, entry: Served) -> None:
        self.served.append(entry)
        if len(self.served) > self.keep_served:
            del self.served[: len(self.served) - self.keep_served // 2]
        if self._log_file is not None:
            self._log_file.write(entry.to_json() + "\n")
            self._log_file.flush()


async def serve_tcp(device: SimDevice, host: str, port: int,
                    identity: Mapping[int, str] | None = None) -> tuple[ModbusTcpServer, str, int]:
    """A pymodbus TCP server for `device` in the background; port 0 picks a free one. (server, host, port)
    It answers Read Device Identification with `identity`, or refuses it (exception 01) when None."""
    server = ModbusTcpServer(device, address=(host, port), custom_pdu=[device_id_pdu(identity)])
    await server.serve_forever(background=True)
    sockname = server.transport.sockets[0].getsockname()  # type: ignore[attr-defined]
    return server, sockname[0], sockname[1]


def sdm630_values(entry: Served) -> dict[str, float]:
    """Named values in one served input-register answer, by the simulator's own register table."""
    if entry.table != "input":
        return {}
    out: dict[str, float] = {}
    for name, address in SDM630_INPUT.items():
        offset = address - entry.address
        if offset >= 0 and offset + 2 <= entry.count:
            out[name] = registers_float32(entry.registers[offset], entry.registers[offset + 1])
    return out


def decode_served(entries: Iterable[Served], profile: Any, measurement: str | None = None) -> dict[str, dict]:
    """What a poller using `profile` must have stored for these served answers: {measurement: {field: value}}.

    A point is decoded from an answer that contains all of its registers (a later answer wins); values that
    decode to None (NaN/inf) are left out, as the poller leaves them out. `profile` is an
    edge_agent.profiles.Profile; `measurement` is the device's override, if any.
    """
    specs = profile.point_specs(measurement)
    out: dict[str, dict] = {}
    for entry in entries:
        for spec in specs:
            offset = spec.address - entry.address
            if spec.table != entry.table or offset < 0 or offset + spec.width > entry.count:
                continue
            value = spec.decode(entry.registers[offset : offset + spec.width])
            fields = out.setdefault(spec.measurement, {})
            if value is None or isinstance(value, Missing):
                fields.pop(spec.field, None)
            else:
                fields[spec.field] = value
    return {m: f for m, f in out.items() if f}


@contextlib.contextmanager
def meter_in_thread(
    host: str = "127.0.0.1", port: int = 0, unit: int = 1, **kwargs: Any
) -> Iterator[MeterSimulator]:
    """A MeterSimulator running on its own event loop in a daemon thread, for synchronous callers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="meter-sim", daemon=True)
    thread.start()
    try:
        sim = asyncio.run_coroutine_threadsafe(_make_and_start(host, port, unit, kwargs), loop).result(10)
        try:
            yield sim
        finally:
            asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _make_and_start(host: str, port: int, unit: int, kwargs: dict[str, Any]) -> MeterSimulator:
    sim = MeterSimulator(**kwargs)
    await sim.start(host, port, unit)
    return sim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.meter_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unit", type=int, default=1)
    parser.add_argument("--serve-log", type=Path, help="append one JSON line per answered read request")
    parser.add_argument("--seed", type=int, help="random seed for reproducible noise")
    parser.add_argument("--update-interval", type=float, default=1.0, help="seconds between measurements")
    parser.add_argument("--no-identity", action="store_true",
                        help="refuse Read Device Identification (FC 43/14) with exception 01")
    args = parser.parse_args(argv)
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    sim = MeterSimulator(seed=args.seed, update_interval=args.update_interval, serve_log=args.serve_log,
                         identity=None if args.no_identity else SIMULATOR_IDENTITY)
    try:
        await sim.start(args.host, args.port, args.unit)
    except (OSError, RuntimeError) as exc:
        print(f"meter_sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"meter_sim: SDM630 unit {sim.unit} listening on {sim.host}:{sim.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
