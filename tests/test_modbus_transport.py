"""edge_agent/modbus/transport.py against real servers: pymodbus over TCP and on ptys, a misbehaving RTU device."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.modbus import frames
from edge_agent.modbus.frames import Expect
from edge_agent.modbus.transport import (
    FrameRejected,
    ModbusExceptionResponse,
    NoAnswer,
    SerialTransport,
    TcpTransport,
    TransportError,
)
from labkit.process import free_port
from labkit.serial_lab import MisbehavingResponder, PtyLink, PtyPair, TimedLine, serial_modbus_server

pytestmark = pytest.mark.integration

SLOW_ADDRESS = 50  # the TCP servers below answer reads from here only after SLOW_DELAY
SLOW_DELAY = 0.4
UNITS: dict[int, Any] = {
    1: {"holding": [11, 12, 13, 14], "input": [21, 22, 23], "coil": [1, 0, 1, 1, 0, 0, 0, 0, 1], "discrete": [0, 1]},
    2: list(range(200, 260)),  # SLOW_ADDRESS is in here
    17: list(range(1700, 1710)),
}


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def read(transport, unit: int, table: str, address: int, count: int, timeout: float = 0.5) -> list[int]:
    pdu = await transport.transact(unit, frames.read_request(table, address, count), Expect.read(table, count), timeout)
    return frames.parse_read_response(table, count, pdu)


async def check_all_tables(transport) -> None:
    assert await read(transport, 1, "holding", 0, 4) == [11, 12, 13, 14]
    assert await read(transport, 1, "input", 1, 2) == [22, 23]
    assert await read(transport, 1, "coil", 0, 9) == [1, 0, 1, 1, 0, 0, 0, 0, 1]
    assert await read(transport, 1, "discrete", 0, 2) == [0, 1]
    assert await read(transport, 2, "input", 10, 5) == [210, 211, 212, 213, 214]
    assert await read(transport, 17, "holding", 0, 10) == list(range(1700, 1710))
    with pytest.raises(ModbusExceptionResponse) as caught:
        await read(transport, 1, "input", 40, 2)
    assert (caught.value.code, caught.value.name) == (2, "illegal data address")


# --- a pymodbus TCP server in a thread ------------------------------------------------------------------------------


@contextlib.contextmanager
def tcp_modbus_server(framer: str = "socket", port: int = 0) -> Iterator[dict[str, Any]]:
    """pymodbus ModbusTcpServer (MBAP, or RTU frames) for UNITS; reads at SLOW_ADDRESS are answered late."""
    from pymodbus.framer import FramerType
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import SimData, SimDevice
    from pymodbus.simulator.simutils import DataType

    async def slow(*args: Any) -> None:
        if args[2] == SLOW_ADDRESS:
            await asyncio.sleep(SLOW_DELAY)

    def device(unit: int, data: Any) -> SimDevice:
        tables = data if isinstance(data, dict) else {"holding": data, "input": data}

        def registers(values: list[int]) -> list[SimData]:
            return [SimData(0, values=values, datatype=DataType.REGISTERS)]

        def bits(values: list[int]) -> list[SimData]:
            return [SimData(0, values=[bool(v) for v in values] or False, datatype=DataType.BITS)]

        return SimDevice(
            id=unit,
            simdata=(
                bits(tables.get("coil", [])),
                bits(tables.get("discrete", [])),
                registers(tables["holding"]),
                registers(tables["input"]),
            ),
            action=slow,
        )

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tcp-modbus-server", daemon=True)
    thread.start()
    state: dict[str, Any] = {}

    async def start() -> None:
        server = ModbusTcpServer(
            [device(u, d) for u, d in UNITS.items()],
            framer=FramerType.SOCKET if framer == "socket" else FramerType.RTU,
            address=("127.0.0.1", state.get("port", port)),
        )
        await server.serve_forever(background=True)
        state["server"] = server
        state["port"] = server.transport.sockets[0].getsockname()[1]

    async def stop() -> None:
        await state.pop("server").shutdown()

    state["start"] = lambda: asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    state["stop"] = lambda: asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    state["start"]()
    try:
        yield state
    finally:
        if "server" in state:
            state["stop"]()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- TCP ------------------------------------------------------------------------------------------------------------


def test_tcp_units_tables_and_exceptions() -> None:
    async def scenario(port: int) -> None:
        async with TcpTransport("127.0.0.1", port) as transport:
            await check_all_tables(transport)
            assert transport.stats["transactions"] == 7
            assert transport.stats["exceptions"] == 1
            assert transport.stats["bytes_out"] == 7 * 12
            assert not any(k.startswith("rejected") for k in transport.stats)

    with tcp_modbus_server() as server:
        run(scenario(server["port"]))


def test_tcp_late_answer_is_skipped_by_its_transaction_id() -> None:
    async def scenario(port: int) -> None:
        async with TcpTransport("127.0.0.1", port) as transport:
            with pytest.raises(NoAnswer, match="no answer from unit 2"):
                await read(transport, 2, "holding", SLOW_ADDRESS, 2, timeout=0.1)
            await asyncio.sleep(SLOW_DELAY)  # the late answer is in the socket now
            assert await read(transport, 2, "holding", 0, 2) == [200, 201]
            assert transport.is_open
            assert transport.stats["timeouts"] == 1
            assert transport.stats["rejected.transaction"] == 1
            assert transport.stats["reconnects"] == 0

    with tcp_modbus_server() as server:
        run(scenario(server["port"]))


def test_tcp_cancelled_transaction_leaves_the_stream_in_step() -> None:
    async def scenario(port: int) -> None:
        async with TcpTransport("127.0.0.1", port) as transport:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(read(transport, 2, "holding", SLOW_ADDRESS, 2, timeout=5), 0.1)
            await asyncio.sleep(SLOW_DELAY)
            assert await read(transport, 2, "holding", 1, 2) == [201, 202]
            assert transport.stats["rejected.transaction"] == 1
            assert transport.stats["bytes_in"] == 2 * (9 + 4)  # each answer counted once
            assert transport.is_open

    with tcp_modbus_server() as server:
        run(scenario(server["port"]))


def test_rtu_over_tcp_and_a_late_answer_costs_the_connection() -> None:
    async def scenario(port: int) -> None:
        async with TcpTransport("127.0.0.1", port, framing="rtu") as transport:
            await check_all_tables(transport)
            with pytest.raises(NoAnswer):
                await read(transport, 2, "holding", SLOW_ADDRESS, 2, timeout=0.1)
            assert not transport.is_open  # a late answer could be taken for the next one
            await asyncio.sleep(SLOW_DELAY)
            assert await read(transport, 2, "holding", 0, 2) == [200, 201]  # reconnects by itself
            assert transport.stats["reconnects"] == 1
            assert not any(k.startswith("rejected") for k in transport.stats)

    with tcp_modbus_server("rtu") as server:
        run(scenario(server["port"]))


class RawTcpResponder:
    """A TCP server answering each request with bytes from `answer(request)` (b"" closes the connection)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while request := conn.recv(4096):
                    reply = self.answer(request)
                    if not reply:
                        break
                    conn.sendall(reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
        self.listener.close()
        self._thread.join(5)


def test_tcp_bad_answers_rejected_counted_and_resynchronised() -> None:
    faults = ["unit", "protocol_id", "ok", "length", "ok"]

    def answer(request: bytes) -> bytes:
        tid, _, _, unit = struct.unpack(">HHHB", request[:7])
        pdu = b"\x03\x04\x00\x07\x00\x08"
        fault = faults.pop(0)
        if fault == "unit":
            unit += 1
        protocol = 1 if fault == "protocol_id" else 0
        length = 400 if fault == "length" else len(pdu) + 1
        return struct.pack(">HHHB", tid, protocol, length, unit) + pdu

    responder = RawTcpResponder(answer)

    async def scenario() -> None:
        async with TcpTransport("127.0.0.1", responder.port) as transport:
            with pytest.raises(FrameRejected) as caught:
                await read(transport, 5, "holding", 0, 2)
            assert caught.value.reason == "unit"
            assert transport.is_open  # the stream is still in step
            with pytest.raises(FrameRejected) as caught:
                await read(transport, 5, "holding", 0, 2)
            assert caught.value.reason == "protocol_id"
            assert not transport.is_open  # out of step: closed
            assert await read(transport, 5, "holding", 0, 2) == [7, 8]  # reconnected
            with pytest.raises(FrameRejected, match="length"):
                await read(transport, 5, "holding", 0, 2)
            assert await read(transport, 5, "holding", 0, 2) == [7, 8]
            assert transport.stats["rejected.unit"] == 1
            assert transport.stats["rejected.protocol_id"] == 1
            assert transport.stats["rejected.length"] == 1
            assert transport.stats["reconnects"] == 2
        assert responder.connections == 3

    try:
        run(scenario())
    finally:
        responder.close()


def test_tcp_messages_for_a_technician() -> None:
    async def scenario() -> None:
        port = free_port()
        with pytest.raises(TransportError) as caught:
            await TcpTransport("127.0.0.1", port).open()
        assert str(caught.value) == f"connection refused by 127.0.0.1:{port}"
        with pytest.raises(TransportError) as caught:
            await TcpTransport("meter.invalid", 502).open()
        assert str(caught.value) == "cannot resolve host name meter.invalid"
        transport = TcpTransport("127.0.0.1", port)
        with pytest.raises(TransportError, match="not open"):
            await read(transport, 1, "input", 0, 1)

        closer = RawTcpResponder(lambda request: b"")
        try:
            async with TcpTransport("127.0.0.1", closer.port) as transport:
                with pytest.raises(TransportError) as caught:
                    await read(transport, 1, "input", 0, 1)
                assert str(caught.value) == f"connection to 127.0.0.1:{closer.port} lost: closed by the device"
                assert not transport.is_open
        finally:
            closer.close()

    run(scenario())


def test_tcp_server_restart_then_reopen() -> None:
    with tcp_modbus_server() as server:

        async def scenario() -> None:
            transport = TcpTransport("127.0.0.1", server["port"])
            await transport.open()
            assert await read(transport, 2, "input", 0, 1) == [200]
            await asyncio.to_thread(server["stop"])
            with pytest.raises(TransportError, match="lost"):
                await read(transport, 2, "input", 0, 1)
            await transport.close()
            with pytest.raises(TransportError, match="connection refused"):
                await transport.open()
            await asyncio.to_thread(server["start"])
            await transport.open()
            assert await read(transport, 2, "input", 0, 1) == [200]
            assert transport.stats["reconnects"] == 1
            await transport.close()

        run(scenario())


# --- serial: pymodbus on a pty ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["rtu", "ascii"])
def test_serial_units_tables_and_exceptions(framing: str) -> None:
    async def scenario(path: str) -> None:
        async with SerialTransport(path, 19200, framing=framing) as transport:
            await check_all_tables(transport)
            with pytest.raises(NoAnswer, match="no answer from unit 9"):
                await read(transport, 9, "input", 0, 1, timeout=0.1)  # nobody on the bus has unit id 9
            assert await read(transport, 2, "holding", 0, 1) == [200]
            assert transport.stats["timeouts"] == 1
            assert not any(k.startswith("rejected") for k in transport.stats)

    with PtyLink() as link, serial_modbus_server(link, UNITS, framer=framing) as server:
        run(scenario(link.client_path))
    assert {unit for unit, *_ in server.served} == {1, 2, 17}


def test_serial_server_restart_then_reopen() -> None:
    with PtyLink() as link, serial_modbus_server(link, UNITS) as server:

        async def scenario() -> None:
            transport = SerialTransport(link.client_path, 19200)
            await transport.open()
            assert await read(transport, 17, "input", 2, 1) == [1702]
            await asyncio.to_thread(server.stop)
            with pytest.raises(NoAnswer):
                await read(transport, 17, "input", 2, 1, timeout=0.1)
            await asyncio.to_thread(server.start)
            assert await read(transport, 17, "input", 2, 1) == [1702]
            await transport.close()
            await transport.open()
            assert await read(transport, 17, "input", 3, 1) == [1703]
            assert transport.stats["reconnects"] == 1
            await transport.close()

        run(scenario())


def test_serial_one_transaction_at_a_time_with_the_silence_kept() -> None:
    """Concurrent callers are serialised; on a timed 19200-baud line every request waits t3.5 after an answer."""
    with TimedLine(19200) as line, serial_modbus_server(line, UNITS, baud=19200):

        async def scenario() -> list[list[int]]:
            async with SerialTransport(line.client_path, 19200) as transport:
                await read(transport, 2, "input", 0, 1)
                line.reset()
                return await asyncio.gather(*(read(transport, 2, "input", i, 10) for i in range(20)))

        results = run(scenario())
        report = line.report()
    assert results == [list(range(200 + i, 210 + i)) for i in range(20)]
    assert report["frames_to_server"] == 20
    assert report["frames_to_client"] == 20
    assert report["silence_violations"] == 0
    assert report["master_gap_min"] >= frames.frame_silence(19200)


# --- serial: a device that misbehaves -----------------------------------------------------------------------------


REGISTERS = list(range(1000, 1100))
FAULT_CASES = [
    ("bad_crc", FrameRejected, "rejected.crc"),
    ("wrong_unit", FrameRejected, "rejected.unit"),
    ("wrong_function", FrameRejected, "rejected.function"),
    ("wrong_byte_count", FrameRejected, "rejected.byte_count"),
    ("garbage_before", FrameRejected, "rejected.garbage"),
    ("truncated", NoAnswer, "timeouts"),
    ("silence", NoAnswer, "timeouts"),
    ("exception:6", ModbusExceptionResponse, "exceptions"),
    ("garbage_after", None, "rejected.garbage"),
    ("late:0.15", NoAnswer, "timeouts"),
]


@pytest.mark.parametrize(("fault", "raised", "counter"), FAULT_CASES, ids=[c[0] for c in FAULT_CASES])
def test_serial_misbehaviour_is_rejected_counted_and_the_next_transaction_succeeds(
    fault: str, raised: type[Exception] | None, counter: str
) -> None:
    async def scenario(responder: MisbehavingResponder) -> None:
        async with SerialTransport(responder.device, 38400) as transport:
            responder.plan(fault)
            if raised is None:
                assert await read(transport, 3, "holding", 4, 2, timeout=0.1) == [1004, 1005]
            else:
                with pytest.raises(raised) as caught:
                    await read(transport, 3, "holding", 4, 2, timeout=0.1)
                if raised is FrameRejected:
                    assert caught.value.reason == counter.split(".")[1]
                if raised is ModbusExceptionResponse:
                    assert caught.value.name == "server device busy"
            if fault.startswith("late"):
                await asyncio.sleep(0.15)  # the late answer arrives between transactions
            for address in (10, 20):
                assert await read(transport, 3, "holding", address, 3) == REGISTERS[address : address + 3]
            assert transport.stats[counter] == 1
            rejected = {k: v for k, v in transport.stats.items() if k.startswith("rejected")}
            if fault.startswith("late"):
                assert rejected == {"rejected.garbage": 1}  # discarded before the next request, never decoded
                assert transport.stats["timeouts"] == 1
            elif counter.startswith("rejected"):
                assert rejected == {counter: 1}
            else:
                assert rejected == {}
            assert transport.stats["transactions"] == 3

    with MisbehavingResponder({3: REGISTERS}) as responder:
        run(scenario(responder))
        assert [fault_seen for *_, fault_seen in responder.requests] == [fault, "ok", "ok"]


def test_serial_dead_unit_does_not_disturb_the_others() -> None:
    async def scenario(responder: MisbehavingResponder) -> None:
        async with SerialTransport(responder.device, 9600) as transport:
            for _ in range(2):
                with pytest.raises(NoAnswer):
                    await read(transport, 4, "input", 0, 1, timeout=0.05)
                assert await read(transport, 3, "input", 0, 1) == [1000]
            assert transport.stats["timeouts"] == 2

    with MisbehavingResponder({3: REGISTERS, 4: REGISTERS}) as responder:
        responder.dead.add(4)
        run(scenario(responder))


def test_serial_babbling_line() -> None:
    """A line that never goes quiet for t3.5 is not written to; the transport says why.

    The babbler is another process writing a byte every 0.5 ms, and the line runs at 300 baud, where t3.5 is
    128 ms: a quiet gap needs the babbler to stall for 128 ms. (At 9600 baud t3.5 is 4 ms, and a babbler thread
    in this process stalled that long whenever it waited for the GIL, or the machine was loaded: the line was
    then really quiet, the transport rightly wrote, and the test failed about one run in three.)"""
    with PtyPair() as pair:
        babbler = subprocess.Popen(
            [sys.executable, "-c", "import os, sys, time\nfd = int(sys.argv[1])\nwhile True:\n"
             "    os.write(fd, b'\\x55')\n    time.sleep(0.0005)", str(pair.master)],
            pass_fds=[pair.master])

        async def scenario() -> None:
            async with SerialTransport(pair.device, 300, quiet_limit=0.8) as transport:
                with pytest.raises(TransportError, match="never goes quiet"):
                    await read(transport, 1, "input", 0, 1)
                assert transport.stats["transactions"] == 0
                assert transport.stats["rejected.garbage"] > 0

        try:
            run(scenario())
        finally:
            babbler.kill()
            babbler.wait(5)
        assert pair.read(timeout=0.05) == b""  # no request went out


def test_serial_busy_then_success() -> None:
    async def scenario(responder: MisbehavingResponder) -> None:
        async with SerialTransport(responder.device, 115200) as transport:
            responder.plan("exception:6", "ok")
            with pytest.raises(ModbusExceptionResponse) as caught:
                await read(transport, 3, "coil", 0, 20)
            assert caught.value.code == 6
            # coils are the registers' bits, least significant first: 1000 = 0b1111101000, 1001 = 0b1111101001
            expected = [0, 0, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1]
            assert await read(transport, 3, "coil", 0, 20) == expected

    with MisbehavingResponder({3: REGISTERS}) as responder:
        run(scenario(responder))


# --- serial: ports that are missing, locked, or pulled out ----------------------------------------------------------


async def open_error(path: str) -> str:
    try:
        await SerialTransport(path, 9600).open()
    except TransportError as exc:
        return str(exc)
    return "opened"


def as_unprivileged_user(path: str) -> str:
    """open_error(path) in a forked child running as nobody (root ignores file permissions)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            message = asyncio.run(open_error(path))
        except BaseException as exc:
            message = f"child failed: {exc!r}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


def test_serial_open_messages(tmp_path: Path) -> None:
    assert run(open_error("/dev/ttyUSB9-absent")) == "serial port /dev/ttyUSB9-absent does not exist"
    regular = tmp_path / "not-a-tty"
    regular.write_bytes(b"")
    assert run(open_error(str(regular))) == f"{regular} is not a serial port (it does not accept serial settings)"
    with PtyPair() as pair:
        os.chmod(pair.path, 0)
        message = as_unprivileged_user(pair.path) if os.geteuid() == 0 else run(open_error(pair.path))
        assert message == f"permission denied on {pair.path}: add the service user to group dialout"

        async def twice() -> str:
            async with SerialTransport(pair.path, 9600):
                return await open_error(pair.path)

        os.chmod(pair.path, 0o600)
        assert run(twice()) == f"serial port {pair.path} is in use by another program"


def test_serial_adapter_unplugged_and_plugged_in_again(tmp_path: Path) -> None:
    link = tmp_path / "usb-FTDI_FT232R-if00-port0"  # as /dev/serial/by-id/... names an adapter

    async def scenario() -> None:
        first = MisbehavingResponder({3: REGISTERS}, link=link)
        transport = SerialTransport(str(link), 38400)
        await transport.open()
        assert await read(transport, 3, "input", 0, 1) == [1000]
        first.unplug()  # while idle
        await asyncio.sleep(0.05)
        assert not transport.is_open
        with pytest.raises(TransportError) as caught:
            await read(transport, 3, "input", 0, 1)
        assert str(caught.value).startswith(f"serial port {link} disappeared (USB adapter unplugged?)")
        with pytest.raises(TransportError, match="does not exist"):
            await transport.open()

        second = MisbehavingResponder({3: REGISTERS}, link=link)
        await transport.open()
        assert await read(transport, 3, "input", 1, 1) == [1001]
        second.plan("silence")  # pulled out while waiting for an answer
        threading.Timer(0.1, second.unplug).start()
        started = time.monotonic()
        with pytest.raises(TransportError, match="disappeared"):
            await read(transport, 3, "input", 1, 1, timeout=2.0)
        assert time.monotonic() - started < 1.0
        await transport.close()
        assert transport.stats["reconnects"] == 1

    run(scenario())
