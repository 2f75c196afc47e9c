"""An async serial port for streaming sources: bytes as they arrive, writes for query protocols, baud changes.

The only module of the serial sources that touches a port. Opened with exclusive access, non-blocking, read
through the event loop (add_reader). A vanished port (USB adapter unplugged) ends `read()` with PortLost;
the source reopens it with backoff when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios

import serial

from edge_agent.modbus.transport import serial_open_error

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_STOP = {1: serial.STOPBITS_ONE, 2: serial.STOPBITS_TWO}


class PortError(Exception):
    """The port cannot be used; the message is for a technician."""


class PortLost(PortError):
    pass


class SerialStream:
    def __init__(self, path: str, baud: int, data_bits: int = 8, parity: str = "N", stop_bits: int = 1) -> None:
        self.path = path
        self.baud = baud
        self.data_bits = data_bits
        self.parity = parity
        self.stop_bits = stop_bits
        self._serial: serial.Serial | None = None
        self._queue: asyncio.Queue[bytes | BaseException] | None = None

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def open(self) -> None:
        ser = serial.Serial()
        ser.port = self.path
        ser.baudrate = self.baud
        ser.bytesize = self.data_bits
        ser.parity = _PARITY[self.parity]
        ser.stopbits = _STOP[self.stop_bits]
        ser.timeout = 0
        ser.exclusive = True
        try:
            ser.open()
        except (serial.SerialException, OSError) as exc:
            raise PortError(serial_open_error(self.path, exc)) from None
        os.set_blocking(ser.fileno(), False)
        self._serial = ser
        self._queue = asyncio.Queue()
        asyncio.get_running_loop().add_reader(ser.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._serial is not None and self._queue is not None
        try:
            data = os.read(self._serial.fileno(), 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"read error: {exc.strerror}")
            return
        if not data:
            self._lost("end of file")
            return
        self._queue.put_nowait(data)

    def _lost(self, why: str) -> None:
        queue = self._queue
        self.close()
        if queue is not None:
            queue.put_nowait(PortLost(f"serial port {self.path} disappeared (USB adapter unplugged?): {why}"))

    async def read(self, timeout: float | None = None) -> bytes:
        """The next bytes that arrived; b"" when `timeout` passes first. Raises PortLost."""
        queue = self._queue
        if queue is None:
            raise PortLost(f"serial port {self.path} is not open")
        try:
            item = await asyncio.wait_for(queue.get(), timeout) if timeout is not None else await queue.get()
        except TimeoutError:
            return b""
        if isinstance(item, BaseException):
            raise item
        return item

    def write(self, data: bytes) -> None:
        if self._serial is None:
            raise PortLost(f"serial port {self.path} is not open")
        try:
            self._serial.write(data)
            self._serial.flush()
        except (serial.SerialException, OSError) as exc:
            self._lost(f"write error: {exc}")
            raise PortLost(f"serial port {self.path} disappeared (USB adapter unplugged?): {exc}") from None

    def set_baud(self, baud: int) -> None:
        self._reconfigure(lambda ser: setattr(ser, "baudrate", baud))
        self.baud = baud

    def _reconfigure(self, change) -> None:
        """A port that refuses new settings is treated as lost: the source reopens it with backoff."""
        if self._serial is None:
            return
        try:
            change(self._serial)
        except (serial.SerialException, OSError, termios.error, ValueError) as exc:
            self._lost(f"cannot change its settings: {exc}")
            raise PortLost(f"serial port {self.path} refused new settings: {exc}") from None

    def close(self) -> None:
        ser, self._serial = self._serial, None
        self._queue = None
        if ser is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(ser.fileno())
            with contextlib.suppress(Exception):
                ser.close()
