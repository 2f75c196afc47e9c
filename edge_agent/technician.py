"""`edge-agent read` and `edge-agent scan`: what a technician runs at the meter cabinet with a laptop.

Both use the same bus engine, transports and profiles as the running agent, so what they show is what the
agent will see.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from edge_agent.cjt188 import frames as cjt188_frames
from edge_agent.dlt645 import frames as dlt645_frames
from edge_agent.mbus import frames as mbus_frames
from edge_agent.meters import scan as probes
from edge_agent.modbus.bus import BusEngine, PolledDevice, read_registers
from edge_agent.modbus.config import ModbusBus, ModbusDevice
from edge_agent.modbus.devices import polled_device
from edge_agent.modbus.inspect import format_table, pair_rows, register_rows
from edge_agent.modbus.plan import ReadRequest
from edge_agent.modbus.transport import (
    FrameRejected,
    ModbusExceptionResponse,
    NoAnswer,
    SerialTransport,
    TransportError,
)
from edge_agent.profiles import available_profiles, load_profile
from edge_agent.serial.dialogue import run_session


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

    def describe(self, protocol: str = "modbus") -> str:
        if self.target.startswith("/"):
            framing = f" {self.framing.upper()}" if protocol == "modbus" else ""
            return f"{self.target} {self.baud} {self.data_bits}{self.parity}{self.stop_bits}{framing}"
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


# -- scan: DL/T 645, CJ/T 188, M-Bus -------------------------------------------------------------------------------

METER_PROTOCOLS = ("dlt645", "cjt188", "mbus")


@dataclass
class MeterFound:
    protocol: str
    address: str
    line: LineSettings
    note: str = ""


@dataclass
class MeterScan:
    found: list[MeterFound]
    tried: list[str]  # what was tried and what came of it, one line each
    requests: int
    seconds: float


class _MeterPort:
    """The port a meter scan talks through: the agent's own serial transport (edge_agent/modbus/transport.py),
    its raw line for each probe, so what a scan sees is what the bus owner will see."""

    def __init__(self, line: LineSettings, progress: Progress | None) -> None:
        self.transport = SerialTransport(line.target, line.baud, line.data_bits, line.parity, line.stop_bits)
        self.progress = progress
        self.requests = 0

    async def probe(self, probe: probes.OneShot, label: str) -> probes.Probe:
        if self.progress:
            self.progress.step(label)
        try:
            async with self.transport.line() as raw:
                result = await run_session(probe, raw)
        except TransportError as exc:
            raise TechnicianError(str(exc)) from None
        self.requests += 1
        return result


async def scan_meters(protocol: str, line: LineSettings, *, addresses: list[str] | None = None,
                      meter_types: list[int] | None = None, secondary: bool = False, max_probes: int = 400,
                      answer_s: float | None = None, progress: Progress | None = None) -> MeterScan:
    """Look for meters of `protocol` on a serial line (edge_agent/meters/scan.py says how). `addresses`: DL/T 645
    addresses to probe, or M-Bus primary addresses (default 0..250); `answer_s`: the reaction time allowed (the
    protocol's by default)."""
    if not line.target.startswith("/"):
        raise TechnicianError(f"--protocol {protocol}: scans a serial port (a TCP target speaks Modbus)")
    port = _MeterPort(line, progress)
    try:
        await port.transport.open()
    except TransportError as exc:
        raise TechnicianError(str(exc)) from None
    started = time.monotonic()
    extra = {} if answer_s is None else {"answer_s": answer_s}
    try:
        if protocol == "dlt645":
            found, tried = await _scan_dlt645(port, line, addresses or [], extra)
        elif protocol == "cjt188":
            found, tried = await _scan_cjt188(port, line, meter_types or list(cjt188_frames.TYPE_NAMES.values()),
                                              extra)
        elif secondary:
            found, tried = await _scan_mbus_secondary(port, line, max_probes, extra)
        else:
            primaries = [int(a) for a in addresses] if addresses else list(range(251))
            found, tried = await _scan_mbus_primary(port, line, primaries, extra)
    finally:
        await port.transport.close()
    return MeterScan(found, tried, port.requests, time.monotonic() - started)


def _heard(probe: probes.Probe) -> str:
    kinds = sorted({r.reason for r in probe.garbled})
    return f"garbled answers ({len(probe.garbled)} rejected: {', '.join(kinds)})"


async def _scan_dlt645(port: _MeterPort, line: LineSettings, addresses: list[str],
                       extra: dict[str, float]) -> tuple[list[MeterFound], list[str]]:
    found: list[MeterFound] = []
    tried: list[str] = []
    several = ("several meters on the line (or a wrong baud rate or parity): probe their addresses "
               "(--addresses, --config)")

    def add(address: str, note: str) -> None:
        if all(f.address != address for f in found):
            found.append(MeterFound("dlt645", address, line, note))

    async def confirmed(address: str, edition: dlt645_frames.Version) -> bool:
        """An address named by an answer to a wildcard: does it answer on its own?"""
        return (await port.probe(probes.dlt645_read(address, edition, line.baud, **extra), f"DL/T 645 {address}")
                ).answer is not None

    wildcards: list[tuple[probes.OneShot, dlt645_frames.Version, str, str, str]] = [
        (probes.dlt645_read_address(line.baud, **extra), "2007",
         "read-address request (13H) to AAAAAAAAAAAA, DL/T 645-2007 §7.1",
         "DL/T 645-2007, answered the read-address request", "no answer"),
        (probes.dlt645_read(dlt645_frames.WILDCARD_ADDRESS, "1997", line.baud, **extra), "1997",
         "DL/T 645-1997 read of 9010 (total energy) to the wildcard address AAAAAAAAAAAA",
         "DL/T 645-1997, answered a read to the wildcard address", "no answer (not every 1997 meter answers it)"),
    ]
    for probe, edition, what, note, silent in wildcards:
        p = await port.probe(probe, f"DL/T 645-{edition} wildcard")
        if p.answer and await confirmed(p.answer, edition):
            add(p.answer, note)
            tried.append(f"{what}: answered by {p.answer}")
        elif p.answer:
            tried.append(f"{what}: an answer named {p.answer}, which does not answer on its own: {several}")
        else:
            tried.append(f"{what}: {_heard(p) + ': ' + several if p.collision else silent}")
    answered = 0
    for address in addresses:
        for edition in ("2007", "1997"):
            p = await port.probe(probes.dlt645_read(address, edition, line.baud, **extra), f"DL/T 645 {address}")
            if p.answer:
                add(p.answer, f"DL/T 645-{edition}, answered a read of the total energy")
                answered += 1
                break
            if p.collision:
                add(address, f"garbled answers to a DL/T 645-{edition} read: two meters with this address?")
                break
    if addresses:
        tried.append(f"{len(addresses)} address(es) probed with a read of the total energy (2007, then 1997): "
                     f"{answered} answered")
    return found, tried


async def _scan_cjt188(port: _MeterPort, line: LineSettings, meter_types: list[int],
                       extra: dict[str, float]) -> tuple[list[MeterFound], list[str]]:
    found: list[MeterFound] = []
    outcome: list[str] = []
    names = {b: n for n, b in cjt188_frames.TYPE_NAMES.items()}
    for meter_type in meter_types:
        p = await port.probe(probes.cjt188_read(meter_type, line.baud, **extra), f"CJ/T 188 {meter_type:02X}H")
        label = f"{meter_type:02X}H"
        if p.answer:
            address, _ = p.answer
            alone = await port.probe(probes.cjt188_read(meter_type, line.baud, address, **extra), f"CJ/T 188 {address}")
            if alone.answer is None:
                outcome.append(f"{label} an answer named {address}, which does not answer on its own: several "
                               f"meters of this type?")
                continue
            found.append(MeterFound("cjt188", address, line, f"{names.get(meter_type, '?')} ({label}), answered the "
                                                             f"wildcard address"))
            outcome.append(f"{label} answered by {address}")
        elif p.collision:
            outcome.append(f"{label} {_heard(p)}: several meters of this type?")
    tried = [f"read of 901F at the wildcard address AAAAAAAAAAAAAA for meter types "
             f"{', '.join(f'{t:02X}H' for t in meter_types)}: {'; '.join(outcome) or 'no answer'} (meters that do "
             f"not answer the wildcard address are not found this way)"]
    return found, tried


async def _scan_mbus_primary(port: _MeterPort, line: LineSettings, primaries: list[int],
                             extra: dict[str, float]) -> tuple[list[MeterFound], list[str]]:
    found: list[MeterFound] = []
    for address in primaries:
        p = await port.probe(probes.mbus_ack(mbus_frames.snd_nke(address), line.baud, **extra), f"M-Bus {address}")
        if p.answer is None and not p.collision:
            continue
        q = await port.probe(probes.mbus_identify(address, line.baud, **extra), f"M-Bus {address} REQ_UD2")
        if q.answer:
            m = q.answer
            note = f"secondary address {m.secondary}, {m.manufacturer}, {m.medium}" if m.secondary else m.medium
        elif q.collision:
            note = f"{_heard(q)} to REQ_UD2: several meters with this primary address?"
        else:
            note = "acknowledged SND_NKE, no answer to REQ_UD2"
        found.append(MeterFound("mbus", str(address), line, note))
    span = f"{primaries[0]}..{primaries[-1]}" if primaries == list(range(primaries[0], primaries[-1] + 1)) else \
        ", ".join(map(str, primaries))
    tried = [f"SND_NKE to primary address(es) {span} ({len(primaries)}), REQ_UD2 where acknowledged: "
             f"{len(found)} answered (a meter that does not acknowledge SND_NKE is found by --secondary)"]
    return found, tried


async def _scan_mbus_secondary(port: _MeterPort, line: LineSettings, max_probes: int,
                               extra: dict[str, float]) -> tuple[list[MeterFound], list[str]]:
    search = probes.SecondarySearch(max_probes=max_probes)
    # SND_NKE to 253 deselects whatever meter a previous master left selected (EN 13757-3 secondary addressing)
    await port.probe(probes.mbus_ack(mbus_frames.snd_nke(mbus_frames.SELECTED), line.baud, **extra), "M-Bus deselect")
    while (mask := search.next_mask()) is not None:
        p = await port.probe(probes.mbus_ack(mbus_frames.select_secondary(mask), line.baud, **extra), f"select {mask}")
        if p.answer is None and not p.collision:
            search.nothing(mask)
            continue
        q = await port.probe(probes.mbus_identify(mbus_frames.SELECTED, line.baud, **extra), f"REQ_UD2 {mask}")
        meter = q.answer if q.answer is not None and q.answer.secondary else None
        if meter is not None and mask != meter.secondary:  # confirm: the full address it named, alone
            again = await port.probe(probes.mbus_ack(mbus_frames.select_secondary(meter.secondary), line.baud,
                                                     **extra), f"select {meter.secondary}")
            check = None
            if again.answer is not None:
                check = (await port.probe(probes.mbus_identify(mbus_frames.SELECTED, line.baud, **extra),
                                          f"REQ_UD2 {meter.secondary}")).answer
            meter = meter if check is not None and check.secondary == meter.secondary else None
        if meter is not None:
            search.single(mask, meter)
        else:
            search.collision(mask)
    found = [MeterFound("mbus", m.secondary, line, f"{m.manufacturer}, {m.medium}, primary address {m.primary}")
             for m in search.found]
    tried = [f"secondary search by wildcard narrowing (EN 13757-3 §11.3): {search.probes} selection(s), "
             f"{len(found)} meter(s) found"]
    if search.left:
        tried.append(f"stopped at --max-probes {max_probes}: {len(search.left)} mask(s) not tried, from "
                     f"{search.left[0]}")
    for mask in search.unresolved:
        tried.append(f"{mask}: meters with the same identification number collide; read them by primary address")
    return found, tried


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

