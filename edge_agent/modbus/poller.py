"""The one module that talks Modbus TCP (through pymodbus): run a precomputed plan, decode, make Readings.

Everything that can be decided without a device is decided once in `ModbusTcpPoller.__init__` (the plan and
the decoders). A poll only sends the planned requests one after the other, checks the answers and decodes.

Timing and retries are ours: pymodbus is created with retries=0 and automatic reconnection off, so a poll
takes at most about (number of requests) x `timeout`, and the caller's schedule decides when to try again.
The connection is opened on the first poll (pymodbus needs a running event loop) and re-opened by the next
poll after it was lost or after a request went unanswered (a half-open TCP connection, or a gateway that has
lost track of us, shows only as silence; a fresh connection is the cure).

A poll either returns every reading of the device or raises PollError: one failed request fails the poll,
so a reading never mixes values from a complete and an incomplete sample.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Sequence

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from edge_agent.modbus.config import ModbusTcpDevice
from edge_agent.modbus.plan import ReadRequest, decode_answers, plan_reads
from edge_agent.profiles import Profile
from wire.schema import Reading

log = logging.getLogger(__name__)

EXCEPTION_CODES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
_HINTS = {
    1: "the device does not support reading this table",
    2: "the device has no such register: check the profile's addresses and max_registers",
    10: "the gateway has no route to this unit: check the gateway's serial settings",
    11: "the gateway got no answer on RS-485: check the unit id, wiring, baud rate and parity",
}


class PollError(Exception):
    """A poll failed; `message` says what failed in words a technician can act on (no traceback needed)."""

    def __init__(self, device_id: str, message: str) -> None:
        self.device_id = device_id
        self.message = message
        super().__init__(f"{device_id}: {message}")


class ModbusTcpPoller:
    """Polls one Modbus TCP device with one firmware profile."""

    def __init__(self, device: ModbusTcpDevice, profile: Profile) -> None:
        self.device = device
        self.profile = profile
        self.plan: list[ReadRequest] = plan_reads(
            profile.point_specs(device.measurement), profile.max_registers, profile.max_gap
        )
        self.tags: dict[str, str] = {"model": profile.model, **device.tags}
        host = f"[{device.host}]" if ":" in device.host else device.host
        self.target = f"{host}:{device.port}"
        self.where = f"{self.target} unit {device.unit}"
        self._timeout = float(device.timeout)
        self._client: AsyncModbusTcpClient | None = None

    async def poll(self) -> list[Reading]:
        """Read every planned request and return one Reading per measurement.

        `time_ns` is time.time_ns() taken when the last response of the poll arrived: the moment the sample
        was complete. (A poll's requests are answered within a few round trips of each other; the meter's own
        measurement instant is unknown to Modbus.) Values decoding to None (NaN/inf) are left out.
        Raises PollError.
        """
        answers: list[Sequence[int]] = []
        await self._connect()
        for request in self.plan:
            answers.append(await self._read(request))
        time_ns = time.time_ns()

        fields = decode_answers(self.plan, answers)
        return [
            Reading(
                device=self.device.id,
                measurement=measurement,
                time_ns=time_ns,
                fields=values,
                tags=dict(self.tags),
            )
            for measurement, values in fields.items()
        ]

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- I/O ---------------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        if self._client is None:
            self._client = AsyncModbusTcpClient(
                self.device.host,
                port=self.device.port,
                timeout=self._timeout,
                retries=0,
                reconnect_delay=0,  # no background reconnect: the next poll reconnects
                name=f"modbus-tcp {self.device.id}",
            )
        if self._client.connected:
            return
        started = time.monotonic()
        if await self._client.connect():
            log.debug("%s: connected to %s", self.device.id, self.target)
            return
        elapsed = time.monotonic() - started
        self._client.close()
        raise PollError(self.device.id, await self._why_no_connection(elapsed))

    async def _why_no_connection(self, elapsed: float) -> str:
        """pymodbus reports a failed connect only as False; find out why, for the message."""
        target = self.target
        if elapsed >= self._timeout * 0.9:
            return (
                f"no answer from {target} within {self._timeout:g} s while connecting "
                "(device off, wrong address, or a firewall dropping packets?)"
            )
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.device.host, self.device.port), self._timeout
            )
        except ConnectionRefusedError:
            return f"connection refused by {target} (nothing listens on port {self.device.port})"
        except socket.gaierror as exc:
            return f"cannot resolve host name {self.device.host!r}: {exc.strerror or exc}"
        except TimeoutError:
            return f"no answer from {target} within {self._timeout:g} s while connecting"
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return f"cannot reach {target}: {exc.strerror} (check the network and the address)"
            return f"cannot connect to {target}: {exc.strerror or exc}"
        writer.close()
        return f"could not connect to {target} (it accepts connections again now)"

    async def _read(self, request: ReadRequest) -> Sequence[int]:
        client = self._client
        assert client is not None
        what = f"reading {request.describe()}"
        call = client.read_input_registers if request.table == "input" else client.read_holding_registers
        try:
            # pymodbus waits `timeout` for the answer; the outer limit only guards against a hang inside it.
            async with asyncio.timeout(self._timeout * 2 + 1):
                response = await call(request.address, count=request.count, device_id=self.device.unit)
        except (TimeoutError, ModbusException) as exc:
            lost = not client.connected
            client.close()  # the next poll starts on a fresh connection
            if lost:
                raise PollError(self.device.id, f"connection to {self.where} lost {what}") from None
            if isinstance(exc, ConnectionException | TimeoutError) or "No response" in str(exc):
                raise PollError(
                    self.device.id, f"no answer from {self.where} within {self._timeout:g} s {what}"
                ) from None
            raise PollError(self.device.id, f"bad answer from {self.where} {what}: {exc}") from None

        if response.isError():
            code = getattr(response, "exception_code", 0)
            name = EXCEPTION_CODES.get(code, "unknown exception")
            hint = _HINTS.get(code)
            raise PollError(
                self.device.id,
                f"exception code {code} ({name}) from {self.where} {what}" + (f": {hint}" if hint else ""),
            )
        registers = response.registers
        if len(registers) != request.count:
            raise PollError(
                self.device.id,
                f"short answer from {self.where} {what}: {len(registers)} registers, not {request.count}",
            )
        return registers
