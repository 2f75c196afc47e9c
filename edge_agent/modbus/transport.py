"""Thin asyncio transports for Modbus: one transaction at a time, every bad answer counted.

The frames are built and checked by `edge_agent/modbus/frames.py`; this module only moves bytes and keeps
time. `transact(unit, pdu, expect, timeout)` sends one request and returns the validated response PDU, or
raises:

- `ModbusExceptionResponse` - the device answered with an exception code;
- `FrameRejected` - an answer that does not match the request (unit, function, transaction id, byte count,
  checksum, ...); it was counted in `stats["rejected.<reason>"]` and never decoded;
- `NoAnswer` - no complete answer within the timeout;
- `TransportError` - the port or connection cannot be used (message for a technician). The transport is
  closed then; the caller reopens it with `open()` under its own backoff policy.

`stats` (a Counter): "transactions" (requests sent), "timeouts", "exceptions", "rejected.<reason>",
"reconnects" (successful opens after the first), "bytes_out", "bytes_in".

Serial lines (`SerialTransport`): a request is sent only after the line has been silent for t3.5
(3.5 characters; 1.75 ms above 19200 baud) since the last byte sent or received, so a response to an earlier
request that arrives late, or the tail of a rejected frame, is discarded (and counted as "rejected.garbage")
instead of being taken for the next answer. The last part of that wait, and every write, run in the port's
writer thread (a single-thread executor, "modbus-tx <port>") that sleeps precisely, so the event loop is never
blocked (not by a write that waits for the port either) and the gap is not stretched by the loop's 1 ms timer
granularity. That thread reads no state of the loop's: it gets the time of the last byte on the line from a
small lock-protected clock (`_LineClock`) the loop keeps, and hands its failures back as exceptions. Closing
the port also happens on that thread, after a write in flight. Bytes that follow a complete frame are counted
as garbage too.

Bytes that arrive outside a transaction wait in the transport's inbox until the next one discards them; the
inbox holds at most MAX_INBOX bytes (the oldest beyond that are dropped and counted as garbage), so a babbling
device between two slow polls cannot grow the agent's memory.
The timeout of a serial transaction counts from the end of the request on the wire and is extended by the
expected response's own time on the wire.

Query protocols that share a serial bus with Modbus units (DL/T 645, CJ/T 188, M-Bus: edge_agent/meters/) get
the port between two transactions with `SerialTransport.line()`: raw requests and answers under the same lock,
after the same silence, through the same writer thread, so the port keeps one owner.

TCP (`TcpTransport`): with MBAP framing every request has a new transaction id, so after a timeout the
connection is kept and a late answer is skipped by its transaction id (counted as "rejected.transaction").
With RTU frames over TCP (serial device servers) there is no such protection: after a timeout the socket is
closed and reopened by the next transaction; after a rejected frame input is drained until quiet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Literal

import serial  # pyserial

from edge_agent.modbus.frames import (
    NEED_MORE,
    AsciiDecoder,
    Expect,
    FrameRejected,
    ModbusExceptionResponse,
    RtuDecoder,
    TcpDecoder,
    ascii_encode,
    char_time,
    frame_silence,
    raise_for_exception,
    rtu_encode,
    tcp_encode,
)

__all__ = [
    "Expect",
    "FrameRejected",
    "ModbusExceptionResponse",
    "NoAnswer",
    "SerialTransport",
    "TcpTransport",
    "Transport",
    "TransportError",
]


class TransportError(Exception):
    """The port or connection cannot be used; the message says why in words a technician can act on."""


class NoAnswer(Exception):
    """No complete answer within the timeout."""


MAX_INBOX = 64 * 1024  # bytes received and not yet consumed


class _Inbox:
    """Bytes received and not yet consumed (at most MAX_INBOX), the time of the last byte, and whether the link is
    gone. Event loop only."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.last_rx = 0.0  # time.monotonic() of the last received byte
        self.lost: str | None = None  # why the link is gone, once it is
        self.overflow = 0  # bytes dropped because nobody consumed them, not yet counted by the transport
        self._event = asyncio.Event()

    def put(self, data: bytes) -> None:
        self.data += data
        self.last_rx = time.monotonic()
        excess = len(self.data) - MAX_INBOX
        if excess > 0:
            del self.data[:excess]
            self.overflow += excess
        self._event.set()

    def unread(self, data: bytes) -> None:
        """Give bytes back so that they are taken first next time."""
        if data:
            self.data[:0] = data

    def take(self) -> bytes:
        data = bytes(self.data)
        self.data.clear()
        self._event.clear()
        return data

    def lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        self._event.set()

    async def wait(self, timeout: float | None) -> None:
        """Until something arrives (or the link is lost), at most `timeout` seconds (None: no limit)."""
        if self.data or self.lost is not None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()


class Transport:
    """What the bus engine uses: open, close, transact. One transaction at a time (an asyncio.Lock)."""

    framing: str = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats: Counter[str] = Counter()
        self._lock = asyncio.Lock()
        self._inbox: _Inbox | None = None
        self._opened_before = False

    @property
    def is_open(self) -> bool:
        return self._inbox is not None and self._inbox.lost is None

    async def open(self) -> None:
        """Open the port or connect; no-op when open. Raises TransportError."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def transact(self, unit: int, pdu: bytes, expect: Expect, timeout: float) -> bytes:
        """Send `pdu` to `unit` and return the response PDU; see the module docstring for what it raises."""
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} must be positive")
        async with self._lock:
            return await self._transact(unit, pdu, expect, timeout)

    async def _transact(self, unit: int, pdu: bytes, expect: Expect, timeout: float) -> bytes:
        raise NotImplementedError

    async def __aenter__(self) -> Transport:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.framing} {'open' if self.is_open else 'closed'}>"

    # --- shared pieces -----------------------------------------------------------------------------------------

    def _opened(self) -> None:
        if self._opened_before:
            self.stats["reconnects"] += 1
        self._opened_before = True

    def _reject(self, exc: FrameRejected) -> None:
        self.stats[f"rejected.{exc.reason}"] += 1

    def _discard_input(self, inbox: _Inbox) -> None:
        """Throw away bytes that arrived outside a transaction, counting them as garbage."""
        stale = inbox.take()
        if stale or inbox.overflow:
            self.stats["bytes_in"] += len(stale) + inbox.overflow
            self.stats["rejected.garbage"] += 1
            inbox.overflow = 0

    async def _receive(self, inbox: _Inbox, decoder, deadline: float, unit: int, timeout: float) -> bytes:
        """Feed arriving bytes to `decoder` until it returns the PDU; NoAnswer at `deadline`."""
        while True:
            data = inbox.take()
            if data:
                self.stats["bytes_in"] += len(data)
                result = self._feed(decoder, data)
                if result is not NEED_MORE:
                    return result  # type: ignore[return-value]
            if inbox.lost is not None:
                raise self._lost_error(inbox.lost)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = decoder.buffered
                if got:
                    raise NoAnswer(f"incomplete answer from unit {unit} on {self.name}: {got} bytes within {timeout:g} s")
                raise NoAnswer(f"no answer from unit {unit} on {self.name} within {timeout:g} s")
            await inbox.wait(remaining)

    def _feed(self, decoder, data: bytes):
        return decoder.feed(data)

    def _lost_error(self, why: str) -> TransportError:
        return TransportError(why)

    def _give_back(self, inbox: _Inbox, data: bytes) -> None:
        """Return bytes a decoder did not consume to the inbox (they are counted again when taken)."""
        if data:
            inbox.unread(data)
            self.stats["bytes_in"] -= len(data)

    def _finish(self, pdu: bytes) -> bytes:
        try:
            raise_for_exception(pdu)
        except ModbusExceptionResponse:
            self.stats["exceptions"] += 1
            raise
        return pdu


# --- serial ---------------------------------------------------------------------------------------------------------

_COARSE_MARGIN = 0.0015  # the event loop's timers wake up to ~1 ms late: the last stretch is slept in a thread


class _LineClock:
    """What the writer thread needs to know of the line, kept by the event loop: when the last byte arrived and
    how many have arrived in all. Shared under a lock, so the thread reads no state the loop owns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_rx = 0.0
        self._received = 0

    def received(self, count: int, at: float) -> None:
        with self._lock:
            self._last_rx = at
            self._received += count

    def read(self) -> tuple[float, int]:
        with self._lock:
            return self._last_rx, self._received


class _LineLost(TransportError):
    """(writer thread) The port failed under a write: the loop marks the inbox lost."""


class SerialTransport(Transport):
    """A serial port (RS-485 adapter) with RTU or ASCII framing. Opened with exclusive access."""

    def __init__(
        self,
        port: str,
        baud: int = 9600,
        data_bits: int = 8,
        parity: str = "N",
        stop_bits: float = 1,
        framing: Literal["rtu", "ascii"] = "rtu",
        *,
        quiet_limit: float = 2.0,
    ) -> None:
        """`quiet_limit`: how long to wait for a silent line before sending (a babbling line is an error)."""
        if framing not in ("rtu", "ascii"):
            raise ValueError(f"serial framing {framing!r}: expected 'rtu' or 'ascii'")
        super().__init__(port)
        self.port = port
        self.baud = baud
        self.data_bits = data_bits
        self.parity = parity
        self.stop_bits = stop_bits
        self.framing = framing
        self.char_time = char_time(baud, data_bits, parity, stop_bits)
        self.silence = frame_silence(baud, data_bits, parity, stop_bits)
        self.quiet_limit = quiet_limit
        self._serial = None
        self._fd = -1
        self._tx_end = 0.0  # when the last request has left the wire (estimated from the baud rate)
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._line = _LineClock()

    @property
    def is_open(self) -> bool:
        return self._fd >= 0 and super().is_open

    async def open(self) -> None:
        if self.is_open:
            return
        if self._fd >= 0:  # lost (unplugged): let go of the old handle first
            await self.close()
        ser = serial.Serial()
        try:
            ser.port = self.port
            ser.baudrate = self.baud
            ser.bytesize = self.data_bits
            ser.parity = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}[self.parity]
            ser.stopbits = {1: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2: serial.STOPBITS_TWO}[
                self.stop_bits
            ]
            ser.timeout = 0
            ser.write_timeout = 0
            ser.exclusive = True
        except (KeyError, ValueError) as exc:
            raise TransportError(f"serial port {self.port}: unsupported settings ({exc})") from None
        try:
            ser.open()
        except (serial.SerialException, OSError) as exc:
            raise TransportError(self._open_error(exc)) from None
        except termios.error as exc:  # the port refuses the line settings (not an OSError)
            raise TransportError(f"serial port {self.port} refuses the settings {self.baud} {self.data_bits}"
                                 f"{self.parity}{self.stop_bits}: {exc.args[-1]}") from None
        self._serial = ser
        self._fd = ser.fileno()
        os.set_blocking(self._fd, False)
        self._inbox = _Inbox()
        self._line = _LineClock()
        self._tx_end = time.monotonic()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"modbus-tx {self.port}")
        asyncio.get_running_loop().add_reader(self._fd, self._readable)
        self._opened()

    def _open_error(self, exc: BaseException) -> str:
        return serial_open_error(self.port, exc)

    async def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
        writer, self._writer = self._writer, None
        ser, self._serial = self._serial, None
        self._fd = -1
        if self._inbox is not None:
            self._inbox.lose(f"serial port {self.port} was closed")
            self._inbox = None
        if ser is None:
            return

        def close_port() -> None:
            with contextlib.suppress(Exception):
                ser.close()

        if writer is None:
            close_port()
            return
        try:  # on the writer thread: a write in flight finishes before its descriptor goes; the loop never waits
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(writer, close_port))
        finally:
            writer.shutdown(wait=False)  # the thread ends by itself once that is done

    def _readable(self) -> None:
        inbox = self._inbox
        if inbox is None:
            return
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._vanished(f"read error: {exc.strerror}")
            return
        if not data:  # a hung-up tty reads as end of file
            self._vanished("end of file")
            return
        inbox.put(data)
        self._line.received(len(data), inbox.last_rx)

    def _vanished(self, detail: str) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._fd)
        if self._inbox is not None:
            self._inbox.lose(f"serial port {self.port} disappeared (USB adapter unplugged?): {detail}")

    async def _transact(self, unit: int, pdu: bytes, expect: Expect, timeout: float) -> bytes:
        inbox = self._inbox
        if inbox is None or self._fd < 0:
            raise TransportError(f"serial port {self.port} is not open")
        if inbox.lost is not None:
            raise TransportError(inbox.lost)
        if self.framing == "rtu":
            frame = rtu_encode(unit, pdu)
            decoder = RtuDecoder(unit, expect)
            answer_chars = expect.longest_response_pdu + 3  # unit, CRC
        else:
            frame = ascii_encode(unit, pdu)
            decoder = AsciiDecoder(unit, expect)
            answer_chars = 2 * (expect.longest_response_pdu + 2) + 3  # ':', hex of unit + PDU + LRC, CR LF
        await self._send(inbox, frame)
        self.stats["transactions"] += 1
        deadline = self._tx_end + timeout + answer_chars * self.char_time
        try:
            answer = await self._receive(inbox, decoder, deadline, unit, timeout)
        except FrameRejected as exc:
            self._reject(exc)
            raise
        except NoAnswer:
            self.stats["timeouts"] += 1
            raise
        if decoder.surplus:
            self.stats["rejected.garbage"] += 1
        return self._finish(answer)

    @contextlib.asynccontextmanager
    async def line(self) -> AsyncIterator[RawLine]:
        """The port for one dialogue of a query protocol (DL/T 645, CJ/T 188, M-Bus), between two transactions.
        The transaction lock is held throughout: the dialogue is one transaction of the bus, whoever else uses
        it. Each request waits for the line's silence as a Modbus request does (bytes that arrived meanwhile - a
        late answer to an earlier request - are discarded and counted as "rejected.garbage") and is written by
        the writer thread. TransportError as for a transaction."""
        async with self._lock:
            inbox = self._inbox
            if inbox is None or self._fd < 0:
                raise TransportError(f"serial port {self.port} is not open")
            if inbox.lost is not None:
                raise TransportError(inbox.lost)
            yield RawLine(self, inbox)

    def _quiet_at(self, inbox: _Inbox) -> float:
        return max(inbox.last_rx, self._tx_end) + self.silence

    async def _send(self, inbox: _Inbox, frame: bytes) -> None:
        """Wait for t3.5 of silence (discarding what arrives meanwhile), then write the frame."""
        give_up = time.monotonic() + self.quiet_limit
        while True:
            self._discard_input(inbox)
            wait = self._quiet_at(inbox) - time.monotonic()
            if wait > _COARSE_MARGIN:
                await asyncio.sleep(wait - _COARSE_MARGIN)
            elif not inbox.data:
                break
            if inbox.lost is not None:
                raise TransportError(inbox.lost)
            if time.monotonic() > give_up:
                raise TransportError(
                    f"the line on {self.port} never goes quiet for {self.silence * 1000:.2f} ms "
                    "(another master on the bus, a wrong baud rate, or a babbling device?)"
                )
        assert self._writer is not None and self._fd >= 0
        received_before = self._line.read()[1] - len(inbox.data)  # what arrived up to inbox.data[0]
        loop = asyncio.get_running_loop()
        try:
            sent_at, received_at_write = await loop.run_in_executor(
                self._writer, self._write_when_quiet, self._fd, frame, self._tx_end)
        except _LineLost as exc:
            inbox.lose(str(exc))
            raise TransportError(str(exc)) from None
        stale = min(len(inbox.data), max(0, received_at_write - received_before))
        if stale:  # arrived while the writer thread waited, before the request went out
            del inbox.data[:stale]
            self.stats["bytes_in"] += stale
            self.stats["rejected.garbage"] += 1
        self._tx_end = sent_at + len(frame) * self.char_time
        self.stats["bytes_out"] += len(frame)

    def _write_when_quiet(self, fd: int, frame: bytes, tx_end: float) -> tuple[float, int]:
        """(writer thread) Sleep until t3.5 after the last byte on the line, precisely, then write.

        Returns when the write started and how many bytes had been received in all just before it (the loop
        works out which of the bytes it holds predate the request)."""
        give_up = time.monotonic() + self.quiet_limit
        while True:
            last_rx, received = self._line.read()
            remaining = max(last_rx, tx_end) + self.silence - time.monotonic()
            if remaining <= 0 and _input_waiting(fd):
                remaining = self.char_time  # bytes the loop has not read yet: the line was not quiet
            if remaining <= 0:
                break
            if time.monotonic() > give_up:
                raise TransportError(f"the line on {self.port} never goes quiet (a babbling device?)")
            if remaining > 0.0002:
                time.sleep(remaining - 0.0001)
        return self._write(fd, frame), received

    def _write(self, fd: int, frame: bytes) -> float:
        """(writer thread) Write the whole frame now; returns when the write started. Lost port: _LineLost."""
        started = time.monotonic()
        view = memoryview(frame)
        deadline = started + 1.0
        while view:
            try:
                written = os.write(fd, view)
            except (BlockingIOError, InterruptedError):
                if time.monotonic() > deadline:
                    raise TransportError(f"serial port {self.port} does not accept output") from None
                time.sleep(self.char_time)
                continue
            except OSError as exc:
                raise _LineLost(f"serial port {self.port} disappeared (USB adapter unplugged?): write error: "
                                f"{exc.strerror}") from None
            view = view[written:]
        return started


class RawLine:
    """SerialTransport.line()'s view of the port: what edge_agent/serial/dialogue.py's driver needs (send, read).
    `last_rx_ns`: the wall-clock time the last bytes arrived (a poll is stamped with its last answer)."""

    def __init__(self, transport: SerialTransport, inbox: _Inbox) -> None:
        self._transport = transport
        self._inbox = inbox
        self.last_rx_ns = 0

    async def send(self, data: bytes) -> None:
        await self._transport._send(self._inbox, data)
        self._transport.stats["transactions"] += 1

    async def read(self, timeout: float | None = None) -> bytes:
        """What arrived since the last read; b"" when `timeout` seconds pass in silence."""
        inbox = self._inbox
        await inbox.wait(timeout)
        if inbox.lost is not None:
            raise TransportError(inbox.lost)
        data = inbox.take()
        if data:
            self._transport.stats["bytes_in"] += len(data)
            self.last_rx_ns = time.time_ns()
        return data


def _input_waiting(fd: int) -> bool:
    """Received bytes in the kernel that nobody has read yet (FIONREAD); False if the port cannot tell."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0] > 0
    except OSError:
        return False


# --- TCP ------------------------------------------------------------------------------------------------------------


class _SocketProtocol(asyncio.Protocol):
    def __init__(self, inbox: _Inbox, name: str) -> None:
        self.inbox = inbox
        self.name = name
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.inbox.put(data)

    def eof_received(self) -> bool:
        self.inbox.lose(f"connection to {self.name} lost: closed by the device")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.inbox.lose(f"connection to {self.name} lost: closed by the device")
        else:
            self.inbox.lose(f"connection to {self.name} lost: {getattr(exc, 'strerror', None) or exc}")


class TcpTransport(Transport):
    """Modbus TCP (MBAP, framing="tcp") or RTU frames over TCP (framing="rtu", serial device servers)."""

    def __init__(
        self,
        host: str,
        port: int = 502,
        framing: Literal["tcp", "rtu"] = "tcp",
        connect_timeout: float = 3.0,
        *,
        drain_quiet: float = 0.05,
    ) -> None:
        """`drain_quiet` (RTU over TCP): after a rejected frame, input is discarded until quiet this long."""
        if framing not in ("tcp", "rtu"):
            raise ValueError(f"TCP framing {framing!r}: expected 'tcp' or 'rtu'")
        super().__init__(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.host = host
        self.port = port
        self.framing = framing
        self.connect_timeout = connect_timeout
        self.drain_quiet = drain_quiet
        self._socket: asyncio.Transport | None = None
        self._transaction_id = 0
        self._reopen = False  # closed by us to resynchronise: the next transaction reconnects
        self._dirty = False  # RTU: the tail of a rejected frame may still come

    @property
    def is_open(self) -> bool:
        return self._socket is not None and super().is_open

    async def open(self) -> None:
        if self.is_open:
            return
        if self._socket is not None:
            await self.close()
        inbox = _Inbox()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock, _ = await loop.create_connection(lambda: _SocketProtocol(inbox, self.name), self.host, self.port)
        except TimeoutError:
            raise TransportError(
                f"no answer from {self.name} within {self.connect_timeout:g} s while connecting "
                "(device off, wrong address, or a firewall dropping packets?)"
            ) from None
        except ConnectionRefusedError:
            raise TransportError(f"connection refused by {self.name}") from None
        except socket.gaierror:
            raise TransportError(f"cannot resolve host name {self.host}") from None
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                raise TransportError(f"cannot reach {self.name}: {exc.strerror} (check the network)") from None
            raise TransportError(f"cannot connect to {self.name}: {exc.strerror or exc}") from None
        with contextlib.suppress(OSError):
            sock.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket = sock  # type: ignore[assignment]
        self._inbox = inbox
        self._reopen = False
        self._dirty = False
        self._opened()

    async def close(self) -> None:
        self._reopen = False
        self._drop()

    def _drop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._inbox is not None:
            self._inbox.lose(f"connection to {self.name} was closed")
            self._inbox = None

    async def _transact(self, unit: int, pdu: bytes, expect: Expect, timeout: float) -> bytes:
        if not self.is_open:
            if self._reopen:
                await self.open()
            elif self._inbox is not None and self._inbox.lost is not None:
                raise TransportError(self._inbox.lost)
            else:
                raise TransportError(f"connection to {self.name} is not open")
        inbox = self._inbox
        assert inbox is not None and self._socket is not None
        if self.framing == "tcp":
            return await self._transact_mbap(inbox, unit, pdu, expect, timeout)
        return await self._transact_rtu(inbox, unit, pdu, expect, timeout)

    def _write(self, frame: bytes) -> None:
        assert self._socket is not None
        self._socket.write(frame)
        self.stats["transactions"] += 1
        self.stats["bytes_out"] += len(frame)

    async def _transact_mbap(self, inbox: _Inbox, unit: int, pdu: bytes, expect: Expect, timeout: float) -> bytes:
        self._transaction_id = (self._transaction_id + 1) & 0xFFFF
        decoder = TcpDecoder(self._transaction_id, unit, expect)
        self._write(tcp_encode(self._transaction_id, unit, pdu))
        deadline = time.monotonic() + timeout
        try:
            answer = await self._receive(inbox, decoder, deadline, unit, timeout)
        except FrameRejected as exc:
            self._reject(exc)
            if not decoder.in_sync:
                self._drop()  # out of step: nothing after this can be framed
                self._reopen = True
            raise
        except NoAnswer:
            self.stats["timeouts"] += 1  # the late answer will be skipped by its transaction id
            raise
        finally:
            if decoder.in_sync:  # a partial frame or what followed ours belongs to the stream (also on cancel)
                self._give_back(inbox, decoder.remainder())
        return self._finish(answer)

    def _feed(self, decoder, data: bytes):
        """MBAP: frames with an old transaction id are late answers; count them and look further."""
        while True:
            try:
                return decoder.feed(data)
            except FrameRejected as exc:
                if exc.reason != "transaction" or not isinstance(decoder, TcpDecoder):
                    raise
                self._reject(exc)
                data = b""

    async def _transact_rtu(self, inbox: _Inbox, unit: int, pdu: bytes, expect: Expect, timeout: float) -> bytes:
        if self._dirty:
            await self._drain(inbox, timeout)
        self._discard_input(inbox)
        decoder = RtuDecoder(unit, expect)
        self._write(rtu_encode(unit, pdu))
        deadline = time.monotonic() + timeout
        try:
            answer = await self._receive(inbox, decoder, deadline, unit, timeout)
        except FrameRejected as exc:
            self._reject(exc)
            self._dirty = True
            raise
        except (NoAnswer, asyncio.CancelledError) as exc:
            if isinstance(exc, NoAnswer):
                self.stats["timeouts"] += 1
            self._drop()  # a late answer would be taken for the next one: start a fresh connection
            self._reopen = True
            raise
        if decoder.surplus:
            self.stats["rejected.garbage"] += 1
            self._dirty = True
        return self._finish(answer)

    async def _drain(self, inbox: _Inbox, limit: float) -> None:
        """Discard input until nothing has arrived for `drain_quiet` seconds (at most `limit` seconds)."""
        give_up = time.monotonic() + limit
        while True:
            self._discard_input(inbox)
            if inbox.lost is not None:
                raise TransportError(inbox.lost)
            wait = max(inbox.last_rx + self.drain_quiet - time.monotonic(), 0.0)
            if wait <= 0 and not inbox.data:
                break
            if time.monotonic() > give_up:
                self._drop()
                self._reopen = True
                break
            await asyncio.sleep(wait)
        self._dirty = False


def serial_open_error(port: str, exc: BaseException) -> str:
    """Why a serial port could not be opened, in words a technician can act on."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
        return f"serial port {port} does not exist"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied on {port}: add the service user to group dialout"
    if code in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EBUSY):
        return f"serial port {port} is in use by another program"
    if code is None and "configure port" in str(exc):
        return f"{port} is not a serial port (it does not accept serial settings)"
    reason = getattr(exc, "strerror", None) or str(exc)
    return f"cannot open serial port {port}: {reason}"
