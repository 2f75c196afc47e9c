"""A bus is the unit of scheduling: one owner per serial port or TCP endpoint, one transaction at a time.

The engine polls every device (unit) on its bus at wall-clock-aligned deadlines, earliest deadline first.
Failures stay local: a unit that does not answer costs at most one timeout, then backs off exponentially on
its own while the others keep their schedule; exception 6 (busy) is retried after a pause; other
exceptions and rejected frames cost the points of that one request (reported with quality "error"); a lost
connection or vanished serial port is reopened with backoff. When the bus cannot keep its intervals, it
says so: utilisation and overrun counters, one log line per report period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edge_agent.modbus import frames
from edge_agent.modbus.config import ModbusBus
from edge_agent.modbus.plan import PollValues, ReadRequest, decode_poll
from edge_agent.modbus.transport import (
    FrameRejected,
    ModbusExceptionResponse,
    NoAnswer,
    SerialTransport,
    TcpTransport,
    Transport,
    TransportError,
)
from edge_agent.schedule import next_aligned, skipped_deadlines
from wire.logs import RateLimitedLog
from wire.schema import Reading

log = logging.getLogger("citynerve.modbus")

BUSY = 6  # Modbus exception code "server device busy"


@dataclass
class PolledDevice:
    """Everything the engine needs about one unit, built once at start-up."""

    id: str
    unit: int
    interval: float
    plan: list[ReadRequest]
    tags: dict[str, str]
    # For `profile = "sunspec"`: builds the plan from the device's own model chain on the first poll
    # (and again after a failed attempt); takes a register reader, returns (plan, model name).
    discover: Callable[[Callable[[int, int], Awaitable[list[int]]]], Awaitable[tuple[list[ReadRequest], str]]] | None = None
    # runtime state
    next_due: float = 0.0
    failures: int = 0
    stats: Counter[str] = field(default_factory=Counter)
    last_error: str = ""

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


def make_transport(bus: ModbusBus) -> Transport:
    where = bus.where
    if where.kind == "serial":
        return SerialTransport(where.path, bus.baud, bus.data_bits, bus.parity, bus.stop_bits, framing=bus.framing)
    return TcpTransport(where.host, where.port, framing="tcp" if where.kind == "tcp" else "rtu")


async def read_registers(transport: Transport, unit: int, request: ReadRequest, timeout: float) -> list[int]:
    """One read transaction: request PDU out, validated registers (or bits) in."""
    pdu = frames.read_request(request.table, request.address, request.count)
    answer = await transport.transact(unit, pdu, frames.Expect.read(request.table, request.count), timeout)
    return frames.parse_read_response(request.table, request.count, answer)


class BusEngine:
    def __init__(self, bus: ModbusBus, devices: list[PolledDevice], transport: Transport | None = None,
                 report_interval: float = 60.0) -> None:
        self.bus = bus
        self.devices = devices
        self.transport = transport or make_transport(bus)
        self.report_interval = report_interval
        self.stats: Counter[str] = Counter()
        self._warn = RateLimitedLog(log, interval=300)
        self._last_transaction_end = 0.0
        self._busy_seconds = 0.0
        self._window_start = time.monotonic()
        self._window_overruns: Counter[str] = Counter()
        self._reconnect_delay = 0.0
        self.last_open_error = ""

    # -- the schedule -------------------------------------------------------------------------------------------

    async def run(self, emit: Callable[[list[Reading]], None]) -> None:
        now = time.time()
        for device in self.devices:
            device.next_due = next_aligned(now, device.interval)
        try:
            while True:
                device = min(self.devices, key=lambda d: d.next_due)
                await asyncio.sleep(max(0.0, device.next_due - time.time()))
                if not await self._ensure_open():
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
                self._report_if_due()
        finally:
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

    async def _ensure_open(self) -> bool:
        if self.transport.is_open:
            return True
        try:
            await self.transport.open()
        except TransportError as exc:
            self.stats["connect_failures"] += 1
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
                self._busy_seconds += time.monotonic() - started
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
                await self.transport.close()
                self.stats["connection_lost"] += 1
                self._busy_seconds += time.monotonic() - started
                device.last_error = str(exc)
                self._warn.warning(("lost", self.bus.id), "bus %s: %s; reopening", self.bus.id, exc, bus=self.bus.id)
                return PollOutcome(device, [], str(exc))
        self._busy_seconds += time.monotonic() - started
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

    async def _discover(self, device: PolledDevice) -> str:
        """Run the device's discovery; '' when its plan is ready, else why not (retried with backoff)."""
        from edge_agent.sunspec.discovery import SunSpecNotFound

        async def read_holding(address: int, count: int) -> list[int]:
            return await self._transaction(device, ReadRequest("holding", address, count, ()))

        assert device.discover is not None
        try:
            device.plan, model = await device.discover(read_holding)
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

    async def _transaction(self, device: PolledDevice, request: ReadRequest) -> list[int]:
        pause = float(self.bus.pause_between_requests)
        for attempt in range(self.bus.busy_retries + 1):
            wait = self._last_transaction_end + pause - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                return await read_registers(self.transport, device.unit, request, float(self.bus.timeout))
            except ModbusExceptionResponse as exc:
                if exc.code != BUSY or attempt == self.bus.busy_retries:
                    raise
                device.stats["busy_retries"] += 1
                await asyncio.sleep(float(self.bus.busy_pause))
            finally:
                self._last_transaction_end = time.monotonic()
        raise AssertionError("unreachable")

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
