"""An async serial port for streaming sources: bytes as they arrive, writes for query protocols, baud changes.

The only module of the serial sources that touches a port. Opened with exclusive access, non-blocking, read
through the event loop (add_reader). A vanished port (USB adapter unplugged) ends `read()` with PortLost;
the source reopens it with backoff when it returns.

Nothing here blocks the event loop. Every call that can wait on the line (open's settings, a write with its
drain until the bytes are on the wire, a baud change that must wait for that drain, close, which the kernel
may hold until the output is gone) runs on the port's own single-thread executor ("serial-tx <port>"), in the
order they were asked for. `write()` and `set_baud()` return at once: an IEC 62056-21 sign-on at 300 baud
takes ~200 ms on the wire per message, and used to stall every bus of the gateway for that long. A write
that fails there is handed back to the loop, which closes the port: the next `read()` raises PortLost.

Bounds: received bytes not yet read are held up to `max_buffered` bytes (the loop is not reading while a query
or dialogue source waits for its next interval); beyond it the oldest are dropped and reported to
`on_overrun(bytes)` (the source counts them as "rejected.overrun": the decoders resynchronise by their
framing). At most `max_pending_writes` writes may wait for the line; more means the port does not take output
(flow control stuck, a dead adapter): the port is treated as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import serial

from edge_agent.modbus.transport import serial_open_error

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_STOP = {1: serial.STOPBITS_ONE, 2: serial.STOPBITS_TWO}

MAX_BUFFERED = 64 * 1024  # received bytes held until read: > 5 s of 115200 baud, > 30 min of 300 baud
MAX_PENDING_WRITES = 16


class PortError(Exception):
    """The port cannot be used; the message is for a technician."""


class PortLost(PortError):
    pass


class _Received:
    """Bytes received and not yet read (at most `limit`; the oldest go first), or why the port is gone."""

    def __init__(self, limit: int, on_overrun: Callable[[int], None] | None) -> None:
        self.limit = limit
        self.on_overrun = on_overrun
        self.chunks: deque[bytes] = deque()
        self.held = 0
        self.lost: PortLost | None = None
        self.event = asyncio.Event()

    def put(self, data: bytes) -> None:
        self.chunks.append(data)
        self.held += len(data)
        dropped = 0
        while self.held > self.limit:
            oldest = self.chunks.popleft()
            cut = min(len(oldest), self.held - self.limit)
            if cut < len(oldest):
                self.chunks.appendleft(oldest[cut:])
            self.held -= cut
            dropped += cut
        if dropped and self.on_overrun is not None:
            self.on_overrun(dropped)
        self.event.set()

    def lose(self, exc: PortLost) -> None:
        if self.lost is None:
            self.lost = exc
        self.event.set()

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.held = 0
        self.event.clear()
        return data


class SerialStream:
    def __init__(self, path: str, baud: int, data_bits: int = 8, parity: str = "N", stop_bits: int = 1, *,
                 max_buffered: int = MAX_BUFFERED, max_pending_writes: int = MAX_PENDING_WRITES,
                 on_overrun: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.baud = baud
        self.data_bits = data_bits
        self.parity = parity
        self.stop_bits = stop_bits
        self.max_buffered = max_buffered
        self.max_pending_writes = max_pending_writes
        self.on_overrun = on_overrun
        self._serial: serial.Serial | None = None
        self._rx: _Received | None = None
        self._tx: ThreadPoolExecutor | None = None  # one thread for this port: open, writes, drains, close
        self._pending_writes = 0

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def _executor(self) -> ThreadPoolExecutor:
        if self._tx is None:
            self._tx = ThreadPoolExecutor(1, thread_name_prefix=f"serial-tx {self.path}")
        return self._tx

    async def open(self) -> None:
        """Open the port (on its thread, after whatever it still had to write and close). Raises PortError."""
        ser = serial.Serial()
        ser.port = self.path
        ser.baudrate = self.baud
        ser.bytesize = self.data_bits
        ser.parity = _PARITY[self.parity]
        ser.stopbits = _STOP[self.stop_bits]
        ser.timeout = 0
        ser.exclusive = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor(), ser.open)
        except (serial.SerialException, OSError) as exc:
            raise PortError(serial_open_error(self.path, exc)) from None
        except termios.error as exc:  # the port refuses the line settings (not an OSError)
            raise PortError(f"serial port {self.path} refuses the settings {self.baud} {self.data_bits}{self.parity}"
                            f"{self.stop_bits}: {exc.args[-1]}") from None
        os.set_blocking(ser.fileno(), False)
        self._serial = ser
        self._rx = _Received(self.max_buffered, self.on_overrun)
        self._pending_writes = 0
        loop.add_reader(ser.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._serial is not None and self._rx is not None
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
        self._rx.put(data)

    def _lost(self, why: str) -> None:
        rx = self._rx
        self.close()
        if rx is not None:
            rx.lose(PortLost(f"serial port {self.path} disappeared (USB adapter unplugged?): {why}"))

    async def read(self, timeout: float | None = None) -> bytes:
        """The bytes that arrived since the last read; b"" when `timeout` passes first. Raises PortLost."""
        rx = self._rx
        if rx is None:
            raise PortLost(f"serial port {self.path} is not open")
        if not rx.chunks and rx.lost is None:
            try:
                await asyncio.wait_for(rx.event.wait(), timeout)
            except TimeoutError:
                return b""
        if rx.chunks:
            return rx.take()
        assert rx.lost is not None
        raise rx.lost

    def write(self, data: bytes) -> None:
        """Queue `data` for the line; returns at once. The port's thread writes it and waits until it is on the
        wire (tcdrain), so a baud change asked for afterwards happens after the last bit."""
        self._submit("write", lambda ser: (ser.write(data), ser.flush()))

    async def send(self, data: bytes) -> None:
        """write(), for the dialogue driver (edge_agent/serial/dialogue.py): queued, returns at once."""
        self.write(data)

    def set_baud(self, baud: int) -> None:
        """Change the rate once everything written before has left. A port that refuses is lost."""
        self._submit("set_baud", lambda ser: setattr(ser, "baudrate", baud))
        self.baud = baud

    def _submit(self, what: str, job: Callable[[serial.Serial], Any]) -> None:
        ser = self._serial
        if ser is None:
            raise PortLost(f"serial port {self.path} is not open")
        if self._pending_writes >= self.max_pending_writes:
            why = f"it does not take output ({self._pending_writes} writes waiting for the line)"
            self._lost(why)
            raise PortLost(f"serial port {self.path}: {why}")
        self._pending_writes += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor(), job, ser)
        future.add_done_callback(lambda f: self._done(ser, what, f))  # runs on the loop

    def _done(self, ser: serial.Serial, what: str, future: asyncio.Future[Any]) -> None:
        if self._serial is not ser:
            return  # closed (or reopened) meanwhile: that port's story is over
        self._pending_writes -= 1
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            return
        if what == "set_baud" and isinstance(exc, (serial.SerialException, OSError, termios.error, ValueError)):
            self._lost(f"cannot change its settings: {exc}")
        else:
            self._lost(f"{what} error: {exc}")

    def close(self) -> None:
        """Stop reading now; the port itself is closed on its thread, after what it still had to write."""
        ser, self._serial = self._serial, None
        self._rx = None
        if ser is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(ser.fileno())
        executor = self._executor()

        def close_port() -> None:
            with contextlib.suppress(Exception):
                ser.close()

        with contextlib.suppress(RuntimeError):  # the executor was shut down: the process is ending
            executor.submit(close_port)

    async def aclose(self) -> None:
        """close(), and wait until the port is really closed (its thread has written what it had); the thread
        then ends (a source stopped for good, e.g. by a live reconfiguration)."""
        self.close()
        tx, self._tx = self._tx, None
        if tx is not None:
            await asyncio.get_running_loop().run_in_executor(tx, lambda: None)
            tx.shutdown(wait=False)  # idle: its thread ends (a later open() starts another)
