"""A bus is the unit of scheduling: one owner per serial port or TCP endpoint, one transaction at a time.

The engine polls every device (unit) on its bus at wall-clock-aligned deadlines, earliest deadline first.
Failures stay local: a unit that does not answer costs at most one timeout, then backs off exponentially on
its own while the others keep their schedule; exception 6 (busy) is retried after a pause; other
exceptions and rejected frames cost the points of that one request (reported with quality "error"); a lost
connection or vanished serial port is reopened with backoff. When the bus cannot keep its intervals, it
says so: utilisation and overrun counters, one log line per report period.

DL/T 645, CJ/T 188 and M-Bus meters on a serial bus (docs/dlt645.md, docs/cjt188.md, docs/mbus.md) are devices of
the same engine with the same rules: their poll is one dialogue (edge_agent/meters/readers.py) on the bus's own
port (SerialTransport.line()), one transaction of the bus at a time, scheduled earliest deadline first among the
Modbus units, backed off on its own when silent.

Commands (docs/control.md "Commands to devices"): `submit` queues a write or a poll-now (at most
MAX_QUEUED_COMMANDS per bus); the run loop wakes for it instead of sleeping until the next deadline and runs it
ahead of the next poll, as one transaction (FC 5/6/15/16) followed by a read of the point, on the same
transport as the polls: one transaction at a time on the bus, whoever asks.

Each Modbus unit is asked once per process what it is (Read Device Identification, FC 43 / MEI 14,
edge_agent/modbus/identify.py), after a successful poll when the next deadline leaves room for a timeout (on a
bus that never has the room, after IDENTIFY_POSTPONE polls), on this bus's one transaction at a time. A device
that does not offer it is "not offered", never a failing device; an answer that fails (no answer, a rejected
frame, a busy device) is tried again after a later poll, at most IDENTIFY_ATTEMPTS times. A reconnect does not
ask again: a device's identification does not change with its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from edge_agent.meters.readers import MeterReader
from edge_agent.modbus import frames
from edge_agent.modbus.config import ModbusBus
from edge_agent.modbus.decode import Missing, Value
from edge_agent.modbus.identify import DeviceIdReader, Identified, NotOffered
from edge_agent.modbus.plan import PollValues, ReadRequest, decode_poll
from edge_agent.modbus.transport import (
    FrameRejected,
    ModbusExceptionResponse,
    NoAnswer,
    RawLine,
    SerialTransport,
    TcpTransport,
    Transport,
    TransportError,
)
from edge_agent.modbus.write import WritePoint
from edge_agent.schedule import next_aligned, skipped_deadlines
from edge_agent.serial.dialogue import run_session
from wire.control import CommandFailure, ControlReason, modbus_exception
from wire.logs import RateLimitedLog
from wire.metrics import Histogram
from wire.schema import Reading

log = logging.getLogger("citynerve.modbus")

BUSY = 6  # Modbus exception code "server device busy"
MAX_QUEUED_COMMANDS = 16  # per bus: commands are rare and each costs a few transactions
_T = TypeVar("_T")
# Upper bounds (seconds) of the answer-time histogram: Modbus TCP on a LAN answers in milliseconds, RTU at 9600 baud
# in tens of (a 125-register answer is ~270 ms on the wire), a slow meter in hundreds; the timeout ends the rest.
ANSWER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
IDENTIFY_ATTEMPTS = 3
IDENTIFY_POSTPONE = 10  # polls of a device on a bus without room before it is identified anyway


@dataclass
class PolledDevice:
    """Everything the engine needs about one unit, built once at start-up."""

    id: str
    unit: int
    interval: float
    plan: list[ReadRequest]
    tags: dict[str, str]
    # For `profile = "sunspec"`: builds the plan from the device's own model chain on the first poll
    # (and again after a failed attempt); takes a register reader, returns (plan, model name, what else it
    # learnt of the device: {"vendor"|"serial"|"revision": text}).
    discover: Callable[[Callable[[int, int], Awaitable[list[int]]]],
                       Awaitable[tuple[list[ReadRequest], str, dict[str, str]]]] | None = None
    # Commands: the writable points this device opted in to, every point name of its profile, and which of them
    # the profile declares writable (to say "not opted in" rather than "not writable").
    writes: dict[str, WritePoint] = field(default_factory=dict)
    points: frozenset[str] = frozenset()
    profile_writable: frozenset[str] = frozenset()
    # A DL/T 645, CJ/T 188 or M-Bus meter: polled by a dialogue of its protocol instead of a register plan.
    meter: MeterReader | None = None
    # runtime state
    next_due: float = 0.0
    failures: int = 0
    stats: Counter[str] = field(default_factory=Counter)
    last_error: str = ""
    # request sent -> answer (a register read or an exception response) validated, per transaction
    answer_seconds: Histogram = field(default_factory=lambda: Histogram(ANSWER_BUCKETS))
    # what the device says it is (FC 43 / MEI 14): None until read; attempts and the last failure meanwhile
    identification: Identified | NotOffered | None = None
    identify_attempts: int = 0
    identify_postponed: int = 0
    identify_error: str = ""
    # what a discovery read on the device itself (SunSpec model 1: Mn, Md, SN, Vr), by the inventory's names
    discovered: dict[str, str] = field(default_factory=dict)

    @property
    def identify_state(self) -> str:
        """"read" | "not_offered" | "pending" (not asked yet, or to be asked again) | "failed" (given up)."""
        if isinstance(self.identification, Identified):
            return "read"
        if isinstance(self.identification, NotOffered):
            return "not_offered"
        return "failed" if self.identify_attempts >= IDENTIFY_ATTEMPTS else "pending"

    def readings(self, values: PollValues, time_ns: int) -> list[Reading]:
        out = []
        for measurement in sorted(values.fields.keys() | values.quality.keys()):
            fields = values.fields.get(measurement, {})
            if fields or values.quality.get(measurement):
                out.append(Reading(self.id, measurement, time_ns, fields, self.tags,
                                   values.quality.get(measurement, {})))
        return out


@dataclass
class PollOutcome:
    device: PolledDevice
    readings: list[Reading]
    error: str = ""  # why the poll produced nothing, or what part of it failed


@dataclass(frozen=True)
class CommandResult:
    """How a command ended on the bus: done (value: what the device holds after a write; None for a poll-now
    or when the read-back failed, with `reason` saying so), failed (reason: wire.control.CommandFailure or
    modbus_exception_N), expired (its deadline passed before the bus was free)."""

    state: Literal["done", "failed", "expired"]
    value: Value | None = None
    reason: str = ""
    detail: str = ""


@dataclass
class BusCommand:
    """A write of `words` to `point` of `device`, or (point None) a poll of `device` now. Not run after
    `deadline_ms` (wall clock, ms since the epoch)."""

    device: PolledDevice
    deadline_ms: int
    point: WritePoint | None = None
    words: list[int] = field(default_factory=list)
    value: Value | None = None  # what the operator asked for (compared with the read-back in the detail)
    result: asyncio.Future[CommandResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def make_transport(bus: ModbusBus, meters_only: bool = False) -> Transport:
    """The bus's port or connection; line settings the bus does not give are its usual ones (ModbusBus.resolved:
    a configuration's buses are resolved already)."""
    bus = bus.resolved(meters_only)
    where = bus.where
    if where.kind == "serial":
        assert bus.baud is not None and bus.parity is not None
        return SerialTransport(where.path, bus.baud, bus.data_bits, bus.parity, bus.stop_bits, framing=bus.framing)
    return TcpTransport(where.host, where.port, framing="tcp" if where.kind == "tcp" else "rtu")


async def read_registers(transport: Transport, unit: int, request: ReadRequest, timeout: float) -> list[int]:
    """One read transaction: request PDU out, validated registers (or bits) in."""
    pdu = frames.read_request(request.table, request.address, request.count)
    answer = await transport.transact(unit, pdu, frames.Expect.read(request.table, request.count), timeout)
    return frames.parse_read_response(request.table, request.count, answer)


async def write_registers(transport: Transport, unit: int, request: bytes, timeout: float) -> None:
    """One write transaction: the request PDU (frames.write_request) out, its answer checked: an echo of the
    request (FC 5, 6) or its start and quantity (FC 15, 16), else FrameRejected / ModbusExceptionResponse."""
    answer = await transport.transact(unit, request, frames.Expect.write(request), timeout)
    frames.check_write_response(request, answer)


class BusEngine:
    def __init__(self, bus: ModbusBus, devices: list[PolledDevice], transport: Transport | None = None,
                 report_interval: float = 60.0) -> None:
        self.bus = bus
        self.devices = devices
        self.transport = transport or make_transport(bus, meters_only=bool(devices) and all(d.meter for d in devices))
        self.report_interval = report_interval
        self.stats: Counter[str] = Counter()
        self._warn = RateLimitedLog(log, interval=300)
        self._last_transaction_end = 0.0
        self._busy_seconds = 0.0
        self.busy_seconds_total = 0.0  # never reset: rate() of it is the utilisation over any window
        self._window_start = time.monotonic()
        self._window_overruns: Counter[str] = Counter()
        self._reconnect_delay = 0.0
        self.last_open_error = ""
        self._commands: deque[BusCommand] = deque()
        self._wake = asyncio.Event()  # set when a command is queued: the run loop stops sleeping
        self._emit: Callable[[list[Reading]], None] | None = None

    # -- commands -----------------------------------------------------------------------------------------------

    def submit(self, command: BusCommand) -> bool:
        """Queue a command to run ahead of the next poll; False when MAX_QUEUED_COMMANDS are waiting already.
        Its outcome arrives in `command.result` (never an exception)."""
        if len(self._commands) >= MAX_QUEUED_COMMANDS:
            return False
        self._commands.append(command)
        self._wake.set()
        return True

    async def _sleep_until(self, deadline: float) -> bool:
        """Sleep until the wall-clock `deadline`; False if a command came first (run it, then look again)."""
        self._wake.clear()
        if self._commands:
            return False
        delay = deadline - time.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        return not self._commands

    async def _run_command(self, command: BusCommand) -> None:
        if command.result.done():  # its waiter went away (the agent is stopping)
            return
        try:
            result = await self._command_result(command)
        except asyncio.CancelledError:
            # The bus is stopped in the middle of it (a live reconfiguration rebuilds this bus, or the agent
            # stops): its waiter must not wait for ever, and the write may or may not have reached the device.
            if not command.result.done():
                command.result.set_result(CommandResult(
                    "failed", reason=CommandFailure.INTERRUPTED,
                    detail="the bus was stopped while running it: the write may or may not have happened, read "
                           "the point"))
            raise
        except Exception as exc:  # a bug must not stop the bus; the command ends as failed
            log.exception("command on device %s failed", command.device.id, extra={"device": command.device.id})
            result = CommandResult("failed", reason=CommandFailure.ERROR, detail=f"internal error: {exc}")
        if not command.result.done():
            command.result.set_result(result)

    async def _command_result(self, command: BusCommand) -> CommandResult:
        device = command.device
        late_ms = time.time_ns() // 1_000_000 - command.deadline_ms
        if late_ms > 0:
            return CommandResult("expired", reason=ControlReason.EXPIRED,
                                 detail=f"its deadline passed {late_ms / 1000:.1f} s before the bus was free")
        if not await self._ensure_open():
            return CommandResult("failed", reason=CommandFailure.BUS_DOWN, detail=f"bus {self.bus.id}: "
                                 f"{self.last_open_error or 'cannot open it'}")
        if command.point is None:
            outcome = await self.poll(device)
            if outcome.readings and self._emit is not None:
                self._emit(outcome.readings)
            if not outcome.readings:
                return CommandResult("failed", reason=CommandFailure.POLL_FAILED, detail=outcome.error)
            return CommandResult("done", detail=outcome.error)
        return await self._write(device, command)

    async def _write(self, device: PolledDevice, command: BusCommand) -> CommandResult:
        point = command.point
        assert point is not None
        request = point.request(command.words)
        started = time.monotonic()
        device.stats["writes"] += 1
        try:
            await self._retrying(device, lambda: write_registers(self.transport, device.unit, request,
                                                                  float(self.bus.timeout)))
        except NoAnswer:
            device.stats["write_failures"] += 1
            return CommandResult("failed", reason=CommandFailure.NO_ANSWER, detail=(
                f"no answer from unit {device.unit} on {self.bus.target} within {float(self.bus.timeout):g} s to "
                f"the write of {point.describe()}: it may or may not have been written"))
        except ModbusExceptionResponse as exc:
            device.stats["write_failures"] += 1
            return CommandResult("failed", reason=modbus_exception(exc.code), detail=(
                f"unit {device.unit} answered exception {exc.code} ({exc.name}) to the write of {point.describe()}"))
        except FrameRejected as exc:
            device.stats["write_failures"] += 1
            return CommandResult("failed", reason=CommandFailure.REJECTED_ANSWER, detail=(
                f"the answer to the write of {point.describe()} was rejected ({exc}): it may or may not have "
                f"been written"))
        except TransportError as exc:
            await self.transport.close()
            self.stats["connection_lost"] += 1
            device.stats["write_failures"] += 1
            return CommandResult("failed", reason=CommandFailure.BUS_DOWN, detail=(
                f"{exc} during the write of {point.describe()}: it may or may not have been written"))
        finally:
            self._busy(started)
        log.info("device %s: wrote %s = %r", device.id, point.name, command.value,
                 extra={"device": device.id, "point": point.name})
        return await self._read_back(device, command)

    async def _read_back(self, device: PolledDevice, command: BusCommand) -> CommandResult:
        """The write was confirmed by the device: read the point as a poll reads it."""
        point = command.point
        assert point is not None
        started = time.monotonic()
        try:
            value = point.decode(await self._transaction(device, point.readback()))
        except (NoAnswer, ModbusExceptionResponse, FrameRejected, TransportError) as exc:
            if isinstance(exc, TransportError):
                await self.transport.close()
            return CommandResult("done", reason=CommandFailure.READBACK_FAILED,
                                 detail=f"written (the device confirmed it), but reading it back failed: {exc}")
        finally:
            self._busy(started)
        if isinstance(value, Missing | dict):
            return CommandResult("done", reason=CommandFailure.READBACK_FAILED,
                                 detail=f"written (the device confirmed it); it reads back as {value!r}")
        detail = ""
        if value != command.value and not (isinstance(value, float) and isinstance(command.value, int | float)
                                          and abs(value - command.value) <= 1e-6 * max(1.0, abs(value))):
            detail = f"reads back {value!r}, not the {command.value!r} written (the device may limit or round it)"
        return CommandResult("done", value=value, detail=detail)

    # -- the schedule -------------------------------------------------------------------------------------------

    async def run(self, emit: Callable[[list[Reading]], None]) -> None:
        now = time.time()
        for device in self.devices:
            device.next_due = next_aligned(now, device.interval)
        self._emit = emit
        try:
            while True:
                if self._commands:  # ahead of the next poll, one at a time
                    await self._run_command(self._commands.popleft())
                    continue
                device = min(self.devices, key=lambda d: d.next_due)
                if not await self._sleep_until(device.next_due):
                    continue
                if not await self._ensure_open(device):
                    continue
                deadline = device.next_due
                outcome = await self.poll(device)
                if outcome.readings:
                    emit(outcome.readings)
                finished = time.time()
                skipped = skipped_deadlines(deadline, finished, device.interval)
                if skipped:
                    device.stats["overruns"] += skipped
                    self.stats["overruns"] += skipped
                    self._window_overruns[device.id] += skipped
                device.next_due = next_aligned(finished + self._backoff(device), device.interval)
                if device.meter is None and device.identify_state == "pending" and device.failures == 0 \
                        and self.transport.is_open and self._slack_for_identify(device):
                    await self.identify(device)  # once, after a poll it answered: a silent device costs nothing
                self._report_if_due()
        finally:
            self._emit = None
            for command in self._commands:  # never run: their waiters learn it
                if not command.result.done():
                    command.result.cancel()
            self._commands.clear()
            await self.transport.close()

    def _backoff(self, device: PolledDevice) -> float:
        """Extra wait for a unit that does not answer: it skips 1, 3, 7 ... deadlines (the gap doubles per
        failed poll, capped by backoff_max), so a dead unit costs its timeout ever more rarely."""
        if device.failures == 0:
            return 0.0
        return max(0.0, min(device.interval * 2 ** device.failures, float(self.bus.backoff_max)) - device.interval)

    async def open_once(self) -> bool:
        """Open the transport for a one-off use (poll-once, read); False with `last_open_error` set."""
        try:
            await self.transport.open()
        except TransportError as exc:
            self.last_open_error = str(exc)
            return False
        return True

    async def poll_alone(self, device: PolledDevice) -> PollOutcome:
        """Open the bus, poll one device once, close it again: for `read`, one-off checks and tests."""
        if not await self.open_once():
            return PollOutcome(device, [], self.last_open_error)
        try:
            return await self.poll(device)
        finally:
            await self.transport.close()

    async def _ensure_open(self, due: PolledDevice | None = None) -> bool:
        if self.transport.is_open:
            return True
        try:
            await self.transport.open()
        except TransportError as exc:
            self.last_open_error = str(exc)
            self.stats["connect_failures"] += 1
            if due is not None:
                # The poll this failure stopped is the due device's: its health counts it (open_failures, as a
                # serial source counts its port) and says why, or a meter behind a dead TCP gateway would show
                # 0 errors. Every device on the bus shows the reason; only the due one counts a failed poll.
                due.stats["open_failures"] += 1
                for device in self.devices:
                    device.last_error = f"bus {self.bus.id}: {exc}"
            self._reconnect_delay = min(max(1.0, self._reconnect_delay * 2), float(self.bus.reconnect_max))
            self._warn.warning(("open", self.bus.id), "bus %s: %s; retrying in %.0fs", self.bus.id, exc,
                               self._reconnect_delay, bus=self.bus.id)
            for device in self.devices:
                device.next_due = max(device.next_due, time.time() + self._reconnect_delay)
            return False
        if self._reconnect_delay:
            log.info("bus %s is open again", self.bus.id, extra={"bus": self.bus.id})
        self._reconnect_delay = 0.0
        self.stats["opens"] += 1
        if self.bus.pause_after_connect:
            await asyncio.sleep(float(self.bus.pause_after_connect))
        return True

    # -- one device --------------------------------------------------------------------------------------------

    async def poll(self, device: PolledDevice) -> PollOutcome:
        """Run a device's plan once. Never raises for a device's or a line's failure."""
        if device.meter is not None:
            return await self._poll_meter(device, device.meter)
        if not device.plan and device.discover is not None:
            problem = await self._discover(device)
            if problem:
                return PollOutcome(device, [], problem)
        started = time.monotonic()
        answers: list[list[int] | BaseException] = []
        errors: list[str] = []
        last_answer_ns = 0
        for index, request in enumerate(device.plan):
            try:
                answers.append(await self._transaction(device, request))
                last_answer_ns = time.time_ns()
            except NoAnswer:
                # The unit is silent: do not spend a timeout on each of its remaining requests.
                device.failures += 1
                device.stats["no_answer"] += 1
                self._busy(started)
                device.last_error = (f"no answer from unit {device.unit} on {self.bus.target} within "
                                     f"{float(self.bus.timeout):g} s ({request.describe()})")
                self._warn.warning(("silent", self.bus.id, device.id), "device %s: %s; backing off",
                                   device.id, device.last_error, device=device.id, bus=self.bus.id)
                if not any(not isinstance(a, BaseException) for a in answers):
                    return PollOutcome(device, [], device.last_error)
                answers += [NoAnswer()] * (len(device.plan) - index)
                break
            except ModbusExceptionResponse as exc:
                answers.append(exc)
                device.stats[f"exception_{exc.code}"] += 1
                errors.append(f"exception {exc.code} ({exc.name}) reading {request.describe()}")
            except FrameRejected as exc:
                answers.append(exc)
                device.stats["rejected"] += 1
                errors.append(f"rejected answer ({exc.reason}) to {request.describe()}")
            except TransportError as exc:
                outcome = await self._connection_lost(device, exc)
                self._busy(started)
                return outcome
        self._busy(started)
        device.stats["polls"] += 1
        if errors:
            device.last_error = "; ".join(errors)
            self._warn.warning(("groups", device.id), "device %s: %s", device.id, device.last_error,
                               device=device.id, bus=self.bus.id)
        if len(errors) == len(device.plan):  # nothing usable: an error, not a reading of error flags
            device.failures += 1
            return PollOutcome(device, [], device.last_error)
        device.failures = 0
        try:
            values = decode_poll(device.plan, answers)
        except Exception:  # a decoder bug must not stop the bus
            log.exception("decoding device %s failed", device.id, extra={"device": device.id})
            device.stats["decode_errors"] += 1
            return PollOutcome(device, [], "decode error")
        return PollOutcome(device, device.readings(values, last_answer_ns or time.time_ns()), "; ".join(errors))

    async def _connection_lost(self, device: PolledDevice, exc: TransportError) -> PollOutcome:
        """The connection broke during `device`'s poll: closed, to be reopened before the next one; counted for the
        bus and in the device's health (the poll it cut short)."""
        await self.transport.close()
        self.stats["connection_lost"] += 1
        device.stats["lost"] += 1
        device.last_error = str(exc)
        self._warn.warning(("lost", self.bus.id), "bus %s: %s; reopening", self.bus.id, exc, bus=self.bus.id)
        return PollOutcome(device, [], str(exc))

    def _busy(self, started: float) -> None:
        spent = time.monotonic() - started
        self._busy_seconds += spent
        self.busy_seconds_total += spent

    async def _poll_meter(self, device: PolledDevice, reader: MeterReader) -> PollOutcome:
        """One dialogue of a DL/T 645, CJ/T 188 or M-Bus meter on the bus's port, holding the bus for its length.
        Never raises for a meter's or a line's failure."""
        if not isinstance(self.transport, SerialTransport):  # the configuration refuses it (edge-agent check)
            return PollOutcome(device, [], f"{reader.describe()}: bus {self.bus.id} is not a serial port")
        session = reader.session()
        started = time.monotonic()
        answered_ns = 0
        try:
            async with self.transport.line() as line:
                paced = _PacedLine(line, self, device)
                await run_session(session, paced)
                paced.finish()
                answered_ns = line.last_rx_ns
        except TransportError as exc:
            return await self._connection_lost(device, exc)
        finally:
            self._busy(started)
            self._last_transaction_end = time.monotonic()
        try:
            result = reader.result(session)
        except Exception:  # a decoder bug must not stop the bus
            log.exception("decoding device %s failed", device.id, extra={"device": device.id})
            device.stats["decode_errors"] += 1
            return PollOutcome(device, [], "decode error")
        for rejected in result.rejected:  # counted for the device and for the bus, as a Modbus answer's
            device.stats[f"rejected.{rejected.reason}"] += 1
            self.transport.stats[f"rejected.{rejected.reason}"] += 1
        if result.silent:
            device.failures += 1
            device.stats["no_answer"] += 1
            device.last_error = f"{reader.describe()} on {self.bus.target}: {'; '.join(result.errors)}"
            self._warn.warning(("silent", self.bus.id, device.id), "device %s: %s; backing off", device.id,
                               device.last_error, device=device.id, bus=self.bus.id)
            return PollOutcome(device, [], device.last_error)
        device.stats["polls"] += 1
        if result.failed:
            device.stats["answer_errors"] += result.failed
        error = "; ".join(result.errors)
        if error:
            device.last_error = error
            self._warn.warning(("answers", device.id), "device %s: %s", device.id, error, device=device.id,
                               bus=self.bus.id)
        sample = result.sample
        if sample is None or not (sample.fields or sample.quality):  # nothing usable: an error, not a reading
            device.failures += 1
            return PollOutcome(device, [], error or f"{reader.describe()}: no values")
        device.failures = 0
        if sample.tags.get("manufacturer"):  # M-Bus: the maker's three letters, for the inventory
            device.discovered.setdefault("vendor", sample.tags["manufacturer"])
        reading = Reading(device.id, sample.measurement or "meter", sample.time_ns or answered_ns or time.time_ns(),
                          dict(sample.fields), {**sample.tags, **device.tags}, dict(sample.quality))
        return PollOutcome(device, [reading], error)

    async def _discover(self, device: PolledDevice) -> str:
        """Run the device's discovery; '' when its plan is ready, else why not (retried with backoff)."""
        from edge_agent.sunspec.discovery import SunSpecNotFound

        async def read_holding(address: int, count: int) -> list[int]:
            return await self._transaction(device, ReadRequest("holding", address, count, ()))

        assert device.discover is not None
        try:
            device.plan, model, device.discovered = await device.discover(read_holding)
        except (NoAnswer, TransportError, SunSpecNotFound, ValueError) as exc:
            device.failures += 1
            if isinstance(exc, TransportError):
                await self.transport.close()
            device.last_error = f"SunSpec discovery of unit {device.unit} on {self.bus.target} failed: {exc}"
            self._warn.warning(("discover", device.id), "device %s: %s", device.id, device.last_error,
                               device=device.id, bus=self.bus.id)
            return device.last_error
        device.tags["model"] = model
        log.info("device %s: SunSpec device %s found, %d read(s) per poll", device.id, model, len(device.plan),
                 extra={"device": device.id})
        return ""

    def _slack_for_identify(self, device: PolledDevice) -> bool:
        """Identification goes between polls: when the next deadline leaves room for an answer's timeout, or,
        on a bus that never has that room, after IDENTIFY_POSTPONE polls of the device (once, then never
        again: it costs the bus a few transactions per process)."""
        if min(d.next_due for d in self.devices) - time.time() >= float(self.bus.timeout):
            return True
        device.identify_postponed += 1
        return device.identify_postponed > IDENTIFY_POSTPONE

    async def identify(self, device: PolledDevice) -> None:
        """Read the device's identification (see the module docstring); never raises for the device's or the
        line's failure. The bus must be open."""
        reader = DeviceIdReader()
        device.identify_attempts += 1
        started = time.monotonic()
        expect = frames.Expect.device_id()
        problem = ""
        try:
            while (pdu := reader.next_request()) is not None:
                try:
                    reader.answered(await self._retrying(device, lambda pdu=pdu: self.transport.transact(
                        device.unit, pdu, expect, float(self.bus.timeout))))
                except ModbusExceptionResponse as exc:
                    if not reader.refused(exc.code):
                        problem = f"exception {exc.code} ({exc.name})"
                        break
        except NoAnswer:
            problem = f"no answer within {float(self.bus.timeout):g} s"
        except FrameRejected as exc:
            problem = f"rejected answer ({exc})"
        except TransportError as exc:
            await self.transport.close()
            self.stats["connection_lost"] += 1
            problem = str(exc)
        finally:
            self._busy_seconds += time.monotonic() - started
        if reader.outcome is not None:
            device.identification = reader.outcome
            device.identify_error = ""
            if isinstance(reader.outcome, Identified):
                log.info("device %s identifies as %s", device.id,
                         ", ".join(f"{k} {v!r}" for k, v in reader.outcome.named().items()),
                         extra={"device": device.id})
            return
        device.identify_error = f"Read Device Identification (FC 43/14) of unit {device.unit}: {problem}"
        if device.identify_attempts >= IDENTIFY_ATTEMPTS:
            self._warn.warning(("identify", device.id), "device %s: %s; not asked again", device.id,
                               device.identify_error, device=device.id, bus=self.bus.id)

    async def _transaction(self, device: PolledDevice, request: ReadRequest) -> list[int]:
        return await self._retrying(device, lambda: read_registers(self.transport, device.unit, request,
                                                                   float(self.bus.timeout)))

    async def _retrying(self, device: PolledDevice, transaction: Callable[[], Awaitable[_T]]) -> _T:
        """One transaction, after `pause_between_requests` since the last one ended; exception 6 (busy) is
        retried `busy_retries` times: the device did nothing with the request (§7, "server device busy")."""
        pause = float(self.bus.pause_between_requests)
        for attempt in range(self.bus.busy_retries + 1):
            wait = self._last_transaction_end + pause - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            sent = time.monotonic()
            try:
                result = await transaction()
                device.answer_seconds.observe(time.monotonic() - sent)
                return result
            except ModbusExceptionResponse as exc:
                device.answer_seconds.observe(time.monotonic() - sent)  # an answer too, just not the registers
                if exc.code != BUSY or attempt == self.bus.busy_retries:
                    raise
                device.stats["busy_retries"] += 1
                await asyncio.sleep(float(self.bus.busy_pause))
            finally:
                self._last_transaction_end = time.monotonic()
        raise AssertionError("unreachable")

    async def _pause_before_request(self) -> None:
        wait = self._last_transaction_end + float(self.bus.pause_between_requests) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    # -- saying when the bus cannot keep up -------------------------------------------------------------------

    def utilisation(self) -> float:
        elapsed = time.monotonic() - self._window_start
        return self._busy_seconds / elapsed if elapsed > 0 else 0.0

    def _report_if_due(self) -> None:
        elapsed = time.monotonic() - self._window_start
        if elapsed < self.report_interval:
            return
        if self._window_overruns:
            worst = ", ".join(f"{d} {n}" for d, n in self._window_overruns.most_common(5))
            log.warning(
                "bus %s cannot keep up with its intervals: utilisation %.0f%%, %d overruns in the last %.0fs "
                "(%s); lengthen intervals, raise the baud rate or split the bus",
                self.bus.id, 100 * self.utilisation(), sum(self._window_overruns.values()), elapsed, worst,
                extra={"bus": self.bus.id},
            )
        self._busy_seconds = 0.0
        self._window_start = time.monotonic()
        self._window_overruns.clear()


class _PacedLine:
    """The bus's port for a meter's dialogue, with the bus's `pause_between_requests` before every request (as
    between Modbus transactions: some converters and meters need it), and the transactions' numbers the metrics
    show for Modbus units: each request's answer time (request sent -> the last bytes of its answer) in the
    device's `answer_seconds`, a request the session gave up on (silence) in the bus's "timeouts"."""

    def __init__(self, line: RawLine, engine: BusEngine, device: PolledDevice) -> None:
        self._line = line
        self._engine = engine
        self._device = device
        self._sent = 0.0
        self._answered = 0.0  # when the last bytes after the current request arrived; 0: none yet

    async def send(self, data: bytes) -> None:
        self.finish()
        await self._engine._pause_before_request()
        await self._line.send(data)
        self._sent = time.monotonic()

    async def read(self, timeout: float | None = None) -> bytes:
        data = await self._line.read(timeout)
        now = time.monotonic()
        self._engine._last_transaction_end = now
        if data:
            self._answered = now
        else:  # the session gives this request up (dialogue.py: silence -> session.timeout()): not answered,
            self._engine.transport.stats["timeouts"] += 1  # whatever bytes came before the silence
            self._answered = 0.0
        return data

    def finish(self) -> None:
        """The current request's answer, if any, is complete: observe its time."""
        if self._sent and self._answered:
            self._device.answer_seconds.observe(self._answered - self._sent)
        self._sent = self._answered = 0.0
