"""`edge-agent read` and `edge-agent scan`: what a technician runs at the meter cabinet with a laptop.

Both use the same bus engine, transports and profiles as the running agent, so what they show is what the
agent will see.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from edge_agent.modbus.bus import BusEngine, PolledDevice, read_registers
from edge_agent.modbus.config import ModbusBus, ModbusDevice
from edge_agent.modbus.devices import polled_device
from edge_agent.modbus.inspect import format_table, pair_rows, register_rows
from edge_agent.modbus.plan import ReadRequest
from edge_agent.modbus.transport import FrameRejected, ModbusExceptionResponse, NoAnswer, TransportError
from edge_agent.profiles import available_profiles, load_profile


class TechnicianError(Exception):
    """A problem to report in one line, with what to check."""


@dataclass(frozen=True)
class LineSettings:
    target: str
    baud: int = 9600
    parity: str = "N"
    data_bits: int = 8
    stop_bits: int = 1
    framing: str = "rtu"
    timeout: float = 1.0

    def bus(self) -> ModbusBus:
        try:
            return ModbusBus(id="technician", target=self.target, framing=self.framing,  # type: ignore[arg-type]
                             baud=self.baud, parity=self.parity, data_bits=self.data_bits,  # type: ignore[arg-type]
                             stop_bits=self.stop_bits, timeout=self.timeout)  # type: ignore[arg-type]
        except ValueError as exc:  # raised by wire.config.invalid(key, message): "@key@message"
            key, _, message = str(exc).strip("@").partition("@")
            raise TechnicianError(f"--{key.replace('_', '-')}: {message}") from None

    def describe(self) -> str:
        if self.target.startswith("/"):
            return f"{self.target} {self.baud} {self.data_bits}{self.parity}{self.stop_bits} {self.framing.upper()}"
        return self.target


def explain(exc: BaseException, unit: int, line: LineSettings, what: str = "") -> str:
    """Turn a failed transaction into what a technician should check."""
    where = f"unit {unit} on {line.describe()}"
    if isinstance(exc, TransportError):
        return str(exc)
    if isinstance(exc, NoAnswer):
        hint = "check the unit id, the wiring (A/B swapped?), termination"
        if line.target.startswith("/"):
            hint += ", baud rate and parity"
        return f"no answer from {where} within {line.timeout:g} s{what}: {hint}"
    if isinstance(exc, FrameRejected):
        if exc.reason in ("crc", "lrc", "garbage", "length"):
            return (f"answers from {where} fail their {exc.reason.upper()} check{what}: wrong baud rate or "
                    "parity, or two devices answering at once (duplicate unit id)?")
        return f"unusable answer from {where}{what}: {exc}"
    if isinstance(exc, ModbusExceptionResponse):
        hint = {2: ": that address range does not exist on this device (check the table and 0-based address)",
                1: ": the device does not support that function (try the other table)"}.get(exc.code, "")
        return f"{where} answered exception {exc.code} ({exc.name}){what}{hint}"
    return f"{where}: {exc}"


# -- read ---------------------------------------------------------------------------------------------------------

async def read_profile(line: LineSettings, unit: int, profile_name: str) -> list[dict[str, Any]]:
    """One poll with a profile: [{"name", "value", "unit", "quality"?}] in profile order."""
    profile = load_profile(profile_name)
    device = ModbusDevice(id="read", bus="technician", profile=profile_name, unit=unit)
    engine = BusEngine(line.bus(), [polled_device(device, profile)])
    outcome = await engine.poll_alone(engine.devices[0])
    if not outcome.readings and outcome.error:
        raise TechnicianError(outcome.error)
    values: dict[str, Any] = {}
    quality: dict[str, str] = {}
    for reading in outcome.readings:
        values.update(reading.fields)
        quality.update(reading.quality)
    rows = []
    for point in profile.points:
        if getattr(point, "internal", False):
            continue
        row: dict[str, Any] = {"name": point.name, "value": values.get(point.name), "unit": point.unit}
        if point.name in quality:
            row["quality"] = quality[point.name]
        rows.append(row)
    # bitfields and other multi-field points: anything decoded that is not a point name
    known = {r["name"] for r in rows}
    rows += [{"name": k, "value": v, "unit": ""} for k, v in values.items() if k not in known]
    return rows


async def read_raw(line: LineSettings, unit: int, table: str, address: int, count: int) -> list[int]:
    engine = BusEngine(line.bus(), [])
    if not await engine.open_once():
        raise TechnicianError(engine.last_open_error)
    try:
        return await read_registers(engine.transport, unit, ReadRequest(table, address, count, ()), line.timeout)
    except (NoAnswer, FrameRejected, ModbusExceptionResponse, TransportError) as exc:
        raise TechnicianError(explain(exc, unit, line, f" reading {table} {address}+{count}")) from None
    finally:
        await engine.transport.close()


def print_profile_rows(rows: list[dict[str, Any]], as_json: bool, out: TextIO = sys.stdout) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row), file=out)
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for row in rows:
        value = row["value"]
        shown = "-" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
        note = f"  ({row['quality']})" if "quality" in row else ""
        print(f"{row['name']:<{width}}  {shown:>14} {row['unit']}{note}", file=out)


def print_raw(table: str, address: int, registers: list[int], as_json: bool, out: TextIO = sys.stdout) -> None:
    if table in ("coil", "discrete"):
        rows = [{"address": address + i, "value": bool(bit)} for i, bit in enumerate(registers)]
        if as_json:
            for row in rows:
                print(json.dumps(row), file=out)
        else:
            print(format_table(rows), file=out)
        return
    singles, pairs = register_rows(address, registers), pair_rows(address, registers)
    if as_json:
        for row in singles:
            print(json.dumps({"kind": "register", **row}), file=out)
        for row in pairs:
            print(json.dumps({"kind": "pair", **row}), file=out)
        return
    print(f"{table} registers {address}..{address + len(registers) - 1} "
          f"(0-based; a manual's {'3' if table == 'input' else '4'}{address + 1:04d} is address {address})", file=out)
    print(format_table(singles), file=out)
    if pairs:
        print("\nevery pair of registers in every word order (find the column that makes sense):", file=out)
        print(format_table(pairs), file=out)


# -- scan ---------------------------------------------------------------------------------------------------------

@dataclass
class Found:
    unit: int
    line: LineSettings
    note: str = ""  # e.g. "answered with exception 2"
    profiles: tuple[str, ...] = ()


class Progress:
    """A one-line progress bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.enabled = stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<40}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 90 + "\r")
            self.stream.flush()


PROBE = ReadRequest("holding", 0, 1, ())


async def scan(lines: Iterable[LineSettings], units: list[int], profile_names: list[str] | None = None,
               progress: Progress | None = None) -> tuple[list[Found], list[str]]:
    """Probe every unit id under every line setting; a unit that answers at all (even with an exception) is
    there. Returns what was found and notes on the line (e.g. CRC errors: wrong baud rate)."""
    found: list[Found] = []
    notes: list[str] = []
    for line in lines:
        engine = BusEngine(line.bus(), [])
        if not await engine.open_once():
            raise TechnicianError(engine.last_open_error)
        rejected = 0
        try:
            for unit in units:
                if progress:
                    progress.step(f"{line.describe()} unit {unit}")
                try:
                    await read_registers(engine.transport, unit, PROBE, line.timeout)
                    found.append(Found(unit, line))
                except ModbusExceptionResponse as exc:
                    found.append(Found(unit, line, f"answered exception {exc.code} ({exc.name}) to a probe"))
                except FrameRejected:
                    rejected += 1
                except NoAnswer:
                    pass
            for item in found:
                if item.line is line:
                    item.profiles = await _matching_profiles(engine, item.unit, profile_names)
        finally:
            await engine.transport.close()
        if rejected:
            notes.append(f"{line.describe()}: {rejected} garbled answer(s) (CRC/framing): another baud rate or "
                         "parity may be right, or two devices share a unit id")
    return found, notes


async def _matching_profiles(engine: BusEngine, unit: int, names: list[str] | None) -> tuple[str, ...]:
    """Profiles whose every request this unit answers with data: the candidates for what it is."""
    matches = []
    for name in names or available_profiles():
        profile = load_profile(name)
        device = polled_device(ModbusDevice(id=name, bus="technician", profile=name, unit=unit), profile)
        if await _answers_all(engine, device):
            matches.append(name)
    return tuple(matches)


async def _answers_all(engine: BusEngine, device: PolledDevice) -> bool:
    for request in device.plan:
        try:
            await read_registers(engine.transport, device.unit, request, float(engine.bus.timeout))
        except (NoAnswer, FrameRejected, ModbusExceptionResponse, TransportError):
            return False
    return True


def line_settings(target: str, bauds: list[int], parities: list[str], **common: Any) -> list[LineSettings]:
    if not target.startswith("/"):
        return [LineSettings(target, **common)]
    return [LineSettings(target, baud=b, parity=p, **common) for b, p in itertools.product(bauds, parities)]


def parse_units(text: str) -> list[int]:
    """"1-247", "1,2,5-9" -> unit ids; ValueError with the offending part."""
    units: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f'expected unit ids like "1-247" or "1,3,5", got "{part.strip()}"') from None
        if not 0 <= first <= last <= 255:
            raise ValueError(f"unit ids must be 0..255 and ascending, got {part.strip()!r}")
        units.extend(range(first, last + 1))
    return units

