"""Serial lines on pseudo-terminals, for tests and benchmarks: no hardware, no socat.

- `PtyPair`: one pty in raw mode. A transport opens `pair.device` (the slave's path, or a symlink to it, as
  udev's /dev/serial/by-id links); the test holds the other end, `pair.master`. `unplug()` makes the device
  vanish as a USB adapter does; a new PtyPair with the same `link` is the adapter plugged in again.
- `PtyLink`: two ptys joined by a relay thread, a null-modem cable between two device paths:
  `client_path` for the transport, `server_path` for a program that opens a path itself (pymodbus).
- `TimedLine`: the same with real serial timing, in a child process: each character is delivered one
  character time after the previous one ended (a frame of n characters takes n * char_time), the line is
  half duplex, a device's answer starts no earlier than `turnaround` after the request ended, and the gaps the
  master leaves before its requests are measured (`report()`).
- `SerialModbusServer` / `serial_modbus_server(...)`: a real pymodbus ModbusSerialServer (RTU or ASCII) on a
  path, serving several unit ids on one bus, on its own event loop in a thread; stop() and start() again.
- `MisbehavingResponder`: an RTU device on a pty that answers each request with a chosen fault (bad CRC, wrong
  unit, wrong function, wrong byte count, truncated, garbage before/after, silence, an exception code, a late
  answer) or correctly.

Run a timed line by hand: `python -m labkit.serial_lab timed-line --baud 9600` prints the two paths as JSON and
then takes the commands "report", "reset" and "stop" on stdin (one JSON answer per line on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import select
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.modbus.frames import char_time, crc16_modbus, frame_silence

REPO = Path(__file__).resolve().parent.parent


# --- one pty ----------------------------------------------------------------------------------------------------


class PtyPair:
    """A pseudo-terminal in raw mode (no echo, no CR/LF translation, 8 bits, no signals).

    `master` is the test's end (non-blocking); `path` is the slave device, `device` the path to give to a
    transport (the symlink `link` when one was asked for). The pair keeps a slave descriptor of its own, so the
    master never sees end of file while the transport closes and reopens the port.
    """

    def __init__(self, link: str | Path | None = None) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        tty.setraw(self.master)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self.link = Path(link) if link is not None else None
        if self.link is not None:
            tmp = self.link.with_name(self.link.name + ".new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.path)
            tmp.replace(self.link)
        self.closed = False

    @property
    def device(self) -> str:
        return str(self.link) if self.link is not None else self.path

    def write(self, data: bytes) -> None:
        """Write to the master end: the transport reads it from the device."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                select.select([], [self.master], [], 1.0)

    def read(self, timeout: float = 1.0, quiet: float = 0.05) -> bytes:
        """What the transport wrote: bytes until `quiet` seconds without any, waiting `timeout` for the first."""
        out = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            wait = deadline - time.monotonic() if not out else quiet
            if wait <= 0 or not select.select([self.master], [], [], wait)[0]:
                return bytes(out)
            try:
                out += os.read(self.master, 4096)
            except BlockingIOError:
                continue

    def unplug(self) -> None:
        """The adapter is pulled out: the device path vanishes and an open port reads end of file."""
        if self.closed:
            return
        self.closed = True
        for fd in (self._slave, self.master):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(self.link) == self.path:
                    self.link.unlink()

    close = unplug

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PtyPair {self.device}{' unplugged' if self.closed else ''}>"


# --- relaying two ptys, with or without serial timing ----------------------------------------------------------------

CLIENT_TO_SERVER = 0
SERVER_TO_CLIENT = 1


@dataclass
class LineTiming:
    """A serial line's character format and the devices' turnaround (None: t3.5)."""

    baud: int
    data_bits: int = 8
    parity: str = "N"
    stop_bits: float = 1
    turnaround: float | None = None
    spin: float = 0.005  # poll without sleeping this long after any traffic (precise time stamps)

    @property
    def char_time(self) -> float:
        return char_time(self.baud, self.data_bits, self.parity, self.stop_bits)

    @property
    def silence(self) -> float:
        return frame_silence(self.baud, self.data_bits, self.parity, self.stop_bits)


@dataclass
class _Stats:
    bytes: list[int] = field(default_factory=lambda: [0, 0])
    frames: list[int] = field(default_factory=lambda: [0, 0])
    late: list[float] = field(default_factory=list)  # delivery time - due time, per delivered write
    master_gaps: list[float] = field(default_factory=list)  # end of an answer -> start of the next request
    device_delays: list[float] = field(default_factory=list)  # end of a request -> the device wrote its answer
    turnaround_waits: int = 0  # answers held back to honour the turnaround
    started: float = field(default_factory=time.monotonic)

    def report(self, timing: LineTiming | None) -> dict[str, Any]:
        late = sorted(self.late)
        gaps = sorted(self.master_gaps)
        delays = sorted(self.device_delays)

        def pct(values: list[float], q: float) -> float | None:
            return values[min(len(values) - 1, int(q * len(values)))] if values else None

        out: dict[str, Any] = {
            "seconds": time.monotonic() - self.started,
            "bytes_to_server": self.bytes[CLIENT_TO_SERVER],
            "bytes_to_client": self.bytes[SERVER_TO_CLIENT],
            "frames_to_server": self.frames[CLIENT_TO_SERVER],
            "frames_to_client": self.frames[SERVER_TO_CLIENT],
            "late_max": late[-1] if late else None,
            "late_mean": sum(late) / len(late) if late else None,
            "late_p99": pct(late, 0.99),
            "master_gap_min": gaps[0] if gaps else None,
            "master_gap_median": pct(gaps, 0.5),
            "device_delay_median": pct(delays, 0.5),
            "turnaround_waits": self.turnaround_waits,
        }
        if timing is not None:
            out["char_time"] = timing.char_time
            out["silence"] = timing.silence
            # a request started less than t3.5 after the previous answer ended (50 us of measuring slack)
            out["silence_violations"] = sum(1 for g in gaps if g < timing.silence - 50e-6)
        return out


def _relay(a: int, b: int, control: int, timing: LineTiming | None, on_control) -> None:
    """Copy bytes between masters `a` (client side) and `b` (server side) until on_control returns False.

    Untimed: a chunk is written to the other side as soon as it is read. Timed: see TimedLine.
    """
    stats = _Stats()
    on_control.stats = stats  # the control handler reads and resets it
    peer = {a: b, b: a}
    direction = {a: CLIENT_TO_SERVER, b: SERVER_TO_CLIENT}
    pending: collections.deque[tuple[float, int, int]] = collections.deque()  # (due, fd, byte)
    ct = timing.char_time if timing else 0.0
    turnaround = (timing.turnaround if timing.turnaround is not None else timing.silence) if timing else 0.0
    wire_free = 0.0
    last_dir: int | None = None
    last_end = 0.0
    active_until = 0.0
    fds = [a, b, control]
    while True:
        now = time.monotonic()
        if timing is not None and now < active_until:
            wait: float | None = 0.0  # traffic expected: poll
        elif pending:
            wait = max(0.0, pending[0][0] - now - 0.0003)  # wake early, finish the wait polling
        else:
            wait = None
        ready = select.select(fds, [], [], wait)[0]
        for fd in ready:
            if fd == control:
                if not on_control():
                    return
                stats = on_control.stats
                continue
            try:
                data = os.read(fd, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                continue
            arrived = time.monotonic()
            d = direction[fd]
            if timing is None:
                stats.bytes[d] += len(data)
                _write_all(peer[fd], data)
                continue
            active_until = arrived + timing.spin
            for byte in data:
                start = max(arrived, wire_free)
                if last_dir != d or arrived - last_end >= timing.silence:  # a new frame
                    stats.frames[d] += 1
                    if last_dir == CLIENT_TO_SERVER and d == SERVER_TO_CLIENT:
                        stats.device_delays.append(arrived - last_end)
                        if last_end + turnaround > start:
                            start = last_end + turnaround
                            stats.turnaround_waits += 1
                    elif last_dir == SERVER_TO_CLIENT and d == CLIENT_TO_SERVER:
                        stats.master_gaps.append(arrived - last_end)
                end = start + ct
                pending.append((end, peer[fd], byte))
                wire_free = last_end = end
                last_dir = d
                stats.bytes[d] += 1
        if pending:
            # finish the wait precisely, then deliver every byte that is due (one write per run of bytes)
            due = pending[0][0]
            if due - time.monotonic() > 0.0003:
                continue
            while time.monotonic() < due:
                pass
            now = time.monotonic()
            run = bytearray()
            target = pending[0][1]
            while pending and pending[0][0] <= now and pending[0][1] == target:
                run.append(pending.popleft()[2])
            stats.late.append(time.monotonic() - due)
            _write_all(target, bytes(run))
            active_until = time.monotonic() + timing.spin if timing else 0.0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 0.1)
        except OSError:
            return  # the other side is gone: the bytes are lost, as on a cut cable


class PtyLink:
    """Two ptys joined by a relay thread (no timing): a transport opens `client_path`, a server `server_path`."""

    def __init__(self, client_link: str | Path | None = None, server_link: str | Path | None = None) -> None:
        self.client = PtyPair(client_link)
        self.server = PtyPair(server_link)
        self._stop_r, self._stop_w = os.pipe()

        def on_control() -> bool:
            return False

        self._thread = threading.Thread(
            target=_relay,
            args=(self.client.master, self.server.master, self._stop_r, None, on_control),
            name="pty-link",
            daemon=True,
        )
        self._thread.start()

    @property
    def client_path(self) -> str:
        return self.client.device

    @property
    def server_path(self) -> str:
        return self.server.device

    def close(self) -> None:
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_w = -1
        self.client.close()
        self.server.close()

    def __enter__(self) -> PtyLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TimedLine:
    """A serial line with real timing between `client_path` and `server_path`, run in a child process.

    Every character is delivered `char_time` after the previous one ended (so an n-character frame takes
    n * char_time), one character at a time on a half-duplex line; an answer from the server side starts no
    earlier than `turnaround` (default t3.5, as a device detects the end of a request only after t3.5) after
    the request's last character. The relay wakes early and polls the last 0.3 ms, and polls continuously for
    `spin` seconds after any traffic, so deliveries and time stamps are accurate to a few microseconds on an
    idle machine (see report()["late_max"]).

    report(): bytes and frames per direction, delivery lateness (max, mean, p99), the master's gaps between an
    answer's end and its next request (min, median, and "silence_violations": gaps shorter than t3.5), the
    device's delays, and how often the turnaround held an answer back. reset() starts the counts afresh.
    """

    def __init__(
        self,
        baud: int,
        data_bits: int = 8,
        parity: str = "N",
        stop_bits: float = 1,
        turnaround: float | None = None,
        spin: float = 0.005,
    ) -> None:
        self.timing = LineTiming(baud, data_bits, parity, stop_bits, turnaround, spin)
        argv = [
            sys.executable, "-m", "labkit.serial_lab", "timed-line",
            "--baud", str(baud), "--data-bits", str(data_bits), "--parity", parity,
            "--stop-bits", str(stop_bits), "--spin", str(spin),
        ]  # fmt: skip
        if turnaround is not None:
            argv += ["--turnaround", str(turnaround)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env, text=True, bufsize=1
        )
        try:
            hello = self._answer(timeout=20)
        except BaseException:
            self._kill()
            raise
        self.client_path: str = hello["client_path"]
        self.server_path: str = hello["server_path"]

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        if not select.select([self._proc.stdout], [], [], timeout)[0]:
            raise RuntimeError("the timed line does not answer")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the timed line exited with {self._proc.wait()}")
        return json.loads(line)

    def _command(self, command: str) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._answer(timeout=10)

    def report(self) -> dict[str, Any]:
        return self._command("report")

    def reset(self) -> None:
        self._command("reset")

    def stop(self) -> dict[str, Any]:
        """Stop the line; returns the final report."""
        if self._proc.poll() is not None:
            self._close_pipes()
            return {}
        try:
            return self._command("stop")
        finally:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._kill()
            self._close_pipes()

    def _kill(self) -> None:
        self._proc.kill()
        self._proc.wait(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def __enter__(self) -> TimedLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _timed_line_main(timing: LineTiming) -> int:
    """(child process) Own the two ptys, print their paths, relay with timing, obey stdin commands."""
    client, server = PtyPair(), PtyPair()
    print(json.dumps({"client_path": client.path, "server_path": server.path}), flush=True)
    control = sys.stdin.fileno()
    pending = bytearray()

    def on_control() -> bool:
        chunk = os.read(control, 4096)
        if not chunk:
            return False  # the parent is gone
        pending.extend(chunk)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            command = line.decode().strip()
            print(json.dumps(on_control.stats.report(timing)), flush=True)
            if command == "stop":
                return False
            if command == "reset":
                on_control.stats = _Stats()
        return True

    try:
        _relay(client.master, server.master, control, timing, on_control)
    finally:
        client.close()
        server.close()
    return 0


# --- a real pymodbus serial server ----------------------------------------------------------------------------------

TABLES = ("coil", "discrete", "holding", "input")
UnitData = Sequence[int] | Mapping[str, Sequence[int]]


def _unit_tables(data: UnitData) -> dict[str, list[int]]:
    """A list of registers serves as both holding and input registers; a mapping names its tables."""
    if isinstance(data, Mapping):
        unknown = set(data) - set(TABLES)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}: expected {', '.join(TABLES)}")
        return {table: list(data.get(table, ())) for table in TABLES}
    registers = list(data)
    return {"coil": [], "discrete": [], "holding": registers, "input": registers}


class SerialModbusServer:
    """pymodbus' ModbusSerialServer on `port` answering for every unit in `units`, on its own loop and thread.

    Units not in `units` stay silent, as absent devices on a bus do.
    `served` logs (unit, function code, address, count) per answered access. stop() releases the port;
    start() opens it again (the same or other `units` assigned meanwhile).
    """

    def __init__(
        self,
        port: str,
        units: Mapping[int, UnitData],
        *,
        framer: str = "rtu",
        baud: int = 19200,
        data_bits: int = 8,
        parity: str = "N",
        stop_bits: int = 1,
    ) -> None:
        if framer not in ("rtu", "ascii"):
            raise ValueError(f"framer {framer!r}: expected 'rtu' or 'ascii'")
        self.port = port
        self.units = {unit: _unit_tables(data) for unit, data in units.items()}
        self.framer = framer
        self.settings = {"baudrate": baud, "bytesize": data_bits, "parity": parity, "stopbits": stop_bits}
        self.served: list[tuple[int, int, int, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> SerialModbusServer:
        if self._server is not None:
            return self
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="serial-modbus-server", daemon=True)
            self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> Any:
        from pymodbus.framer import FramerType
        from pymodbus.server import ModbusSerialServer

        server = ModbusSerialServer(
            [self._device(unit, tables) for unit, tables in self.units.items()],
            framer=FramerType.RTU if self.framer == "rtu" else FramerType.ASCII,
            port=self.port,
            trace_pdu=self._drop_absent_units,
            **self.settings,
        )
        await server.serve_forever(background=True)
        if not server.is_active():
            raise RuntimeError(f"pymodbus could not open {self.port}")
        return server

    def _drop_absent_units(self, sending: bool, pdu: Any) -> Any:
        """A request for a unit that is not on this bus gets no answer (returning None drops it).

        pymodbus 3.16 answers exception 4 instead (its SimCore falls back to device 0, which is missing, and
        ignore_missing_devices does not apply to SimDevice), so the request is dropped before it is handled.
        """
        if not sending and pdu.dev_id not in self.units:
            return None
        return pdu

    def _device(self, unit: int, tables: dict[str, list[int]]) -> Any:
        from pymodbus.simulator import SimData, SimDevice
        from pymodbus.simulator.simutils import DataType

        def bits(values: list[int]) -> list[Any]:
            return [SimData(0, values=[bool(v) for v in values] or False, datatype=DataType.BITS)]

        def registers(values: list[int]) -> list[Any]:
            return (
                [SimData(0, values=values, datatype=DataType.REGISTERS)]
                if values
                else [SimData(0, values=0, datatype=DataType.REGISTERS)]
            )

        return SimDevice(
            id=unit,
            simdata=(
                bits(tables["coil"]),
                bits(tables["discrete"]),
                registers(tables["holding"]),
                registers(tables["input"]),
            ),
            action=functools.partial(self._on_access, unit),
        )

    async def _on_access(self, unit: int, function: int, _start: int, address: int, count: int, *_: Any) -> None:
        self.served.append((unit, function, address, count))

    def stop(self) -> None:
        """Shut the server down and release the port (the thread and loop stay for a later start())."""
        if self._server is None or self._loop is None:
            return
        server, self._server = self._server, None
        asyncio.run_coroutine_threadsafe(server.shutdown(), self._loop).result(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> SerialModbusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serial_modbus_server(
    where: str | PtyPair | PtyLink | TimedLine, units: Mapping[int, UnitData], **kwargs: Any
) -> SerialModbusServer:
    """A started SerialModbusServer on a path, or on the server end of a PtyLink/TimedLine (use it in `with`).

    A bare PtyPair is served on its device path; its master end is then the client's side.
    """
    if isinstance(where, PtyLink | TimedLine):
        port = where.server_path
    elif isinstance(where, PtyPair):
        port = where.device
    else:
        port = str(where)
    return SerialModbusServer(port, units, **kwargs).start()


# --- a device that misbehaves on purpose ----------------------------------------------------------------------------

FAULTS = (
    "ok",
    "bad_crc",
    "wrong_unit",
    "wrong_function",
    "wrong_byte_count",
    "truncated",
    "garbage_before",
    "garbage_after",
    "silence",
    "exception:N",
    "late:SECONDS",
)
_OTHER_READ = {1: 2, 2: 1, 3: 4, 4: 3}


class MisbehavingResponder:
    """An RTU bus on a pty (a transport opens `device`) whose units answer with the faults asked for.

    `units` maps unit ids to registers (served as holding and input registers; coils and discrete inputs are
    their bits, least significant first). Units not listed, and those in `dead`, never answer.
    `plan(*faults)` queues one fault per coming request (see FAULTS; "exception:6", "late:0.3"); when the
    queue is empty, requests are answered correctly. `requests` logs (unit, pdu, fault) per request heard.
    """

    def __init__(
        self,
        units: Mapping[int, Sequence[int]] | None = None,
        *,
        link: str | Path | None = None,
        turnaround: float = 0.0,
    ) -> None:
        self.units = {unit: list(regs) for unit, regs in (units or {1: list(range(100))}).items()}
        self.dead: set[int] = set()
        self.turnaround = turnaround
        self.faults: collections.deque[str] = collections.deque()
        self.requests: list[tuple[int, bytes, str]] = []
        self.pty = PtyPair(link)
        self._stop_r, self._stop_w = os.pipe()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="misbehaving-responder", daemon=True)
        self._thread.start()

    @property
    def device(self) -> str:
        return self.pty.device

    def plan(self, *faults: str) -> None:
        for fault in faults:
            name = fault.split(":", 1)[0]
            if name not in {f.split(":", 1)[0] for f in FAULTS}:
                raise ValueError(f"unknown fault {fault!r}: expected one of {', '.join(FAULTS)}")
        with self._lock:
            self.faults.extend(faults)

    def _serve(self) -> None:
        buf = bytearray()
        master = self.pty.master
        while True:
            ready = select.select([master, self._stop_r], [], [], 0.05 if buf else None)[0]
            if self._stop_r in ready:
                return
            if master not in ready:
                buf.clear()  # a silent gap ends whatever incomplete request was there
                continue
            try:
                chunk = os.read(master, 4096)
            except BlockingIOError:
                continue
            except OSError:
                return
            buf += chunk
            while True:
                size = self._request_size(buf)
                if size is None or len(buf) < size:
                    break
                frame = bytes(buf[:size])
                del buf[:size]
                if crc16_modbus(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                    buf.clear()  # out of step: wait for the line to go quiet
                    break
                self._answer(frame[0], frame[1:-2])

    @staticmethod
    def _request_size(buf: bytearray) -> int | None:
        if len(buf) < 2:
            return None
        function = buf[1]
        if function in (15, 16):
            return 9 + buf[6] if len(buf) >= 7 else None
        if function == 0x2B:  # Read Device Identification: 2B 0E code object (answered "illegal function")
            return 7
        return 8

    def _answer(self, unit: int, pdu: bytes) -> None:
        with self._lock:
            fault = self.faults.popleft() if self.faults else "ok"
        self.requests.append((unit, pdu, fault))
        if unit not in self.units or unit in self.dead or fault == "silence":
            return
        function = pdu[0]
        if fault.startswith("exception:"):
            response = bytes((function | 0x80, int(fault.split(":", 1)[1])))
        else:
            response = self._read(unit, pdu)
        if fault == "wrong_function" and function in _OTHER_READ and not response[0] & 0x80:
            response = bytes((_OTHER_READ[function],)) + response[1:]
        elif fault == "wrong_byte_count" and not response[0] & 0x80 and len(response) > 3:
            cut = 2 if function in (3, 4) else 1
            response = bytes((response[0], response[1] - cut)) + response[2 : len(response) - cut]
        body = bytes((unit + 1 if fault == "wrong_unit" else unit,)) + response
        frame = body + crc16_modbus(body).to_bytes(2, "little")
        if fault == "bad_crc":
            frame = frame[:-1] + bytes((frame[-1] ^ 0x5A,))
        elif fault == "truncated":
            frame = frame[:-3]
        elif fault == "garbage_before":
            frame = b"\x00\xff" + frame
        elif fault == "garbage_after":
            frame = frame + b"\x00\xff\x55"
        delay = self.turnaround
        if fault.startswith("late:"):
            delay += float(fault.split(":", 1)[1])
        if delay:
            time.sleep(delay)
        self.pty.write(frame)

    def _read(self, unit: int, pdu: bytes) -> bytes:
        function = pdu[0]
        if function not in (1, 2, 3, 4) or len(pdu) != 5:
            return bytes((function | 0x80, 1))
        address = int.from_bytes(pdu[1:3], "big")
        count = int.from_bytes(pdu[3:5], "big")
        registers = self.units[unit]
        if function in (3, 4):
            if not 1 <= count <= 125 or address + count > len(registers):
                return bytes((function | 0x80, 2))
            data = b"".join(r.to_bytes(2, "big") for r in registers[address : address + count])
        else:
            if not 1 <= count <= 2000 or address + count > 16 * len(registers):
                return bytes((function | 0x80, 2))
            bits = [(registers[i // 16] >> (i % 16)) & 1 for i in range(address, address + count)]
            data = bytes(sum(bit << j for j, bit in enumerate(bits[k : k + 8])) for k in range(0, len(bits), 8))
        return bytes((function, len(data))) + data

    def close(self) -> None:
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_w = -1
        self.pty.close()

    unplug = close  # the device path vanishes; a new responder with the same `link` plugs it in again

    def __enter__(self) -> MisbehavingResponder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def serial_line(**kwargs: Any) -> Iterator[tuple[PtyLink, SerialModbusServer]]:
    """A PtyLink with a SerialModbusServer on its server end: `with serial_line(units={1: [...]}) as (link, srv)`."""
    units = kwargs.pop("units")
    with PtyLink() as link, serial_modbus_server(link, units, **kwargs) as server:
        yield link, server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.serial_lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    line = sub.add_parser("timed-line", help="relay two ptys with serial timing (see TimedLine)")
    line.add_argument("--baud", type=int, required=True)
    line.add_argument("--data-bits", type=int, default=8)
    line.add_argument("--parity", default="N", choices=["N", "E", "O"])
    line.add_argument("--stop-bits", type=float, default=1)
    line.add_argument("--turnaround", type=float, default=None, help="seconds; default t3.5")
    line.add_argument("--spin", type=float, default=0.005)
    args = parser.parse_args(argv)
    stop_bits = int(args.stop_bits) if args.stop_bits == int(args.stop_bits) else args.stop_bits
    timing = LineTiming(args.baud, args.data_bits, args.parity, stop_bits, args.turnaround, args.spin)
    return _timed_line_main(timing)


if __name__ == "__main__":
    sys.exit(main())
