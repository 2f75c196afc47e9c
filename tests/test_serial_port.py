"""The serial port of the serial sources on a real pty: it never blocks the event loop, and what it holds is
bounded."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from edge_agent.serial.config import SerialDevice
from edge_agent.serial.port import SerialStream
from edge_agent.serial.source import SerialSource
from labkit.serial_lab import PtyPair

pytestmark = pytest.mark.integration


def test_a_write_that_waits_for_the_line_does_not_stall_the_event_loop() -> None:
    """Nobody reads the other end, so the write (and its drain) cannot finish: it waits on the port's own thread
    while the loop goes on reading. (Before, it ran on the loop: at 300 baud an IEC 62056-21 sign-on held every
    bus of the gateway ~200 ms per message; here the loop would hang until the other end reads.)"""
    block = bytes(range(256)) * 1024  # 256 KiB: far more than a pty buffers
    with PtyPair() as pair:
        release = threading.Event()
        received = bytearray()

        def other_end() -> None:  # reads only when released (or after 5 s, so that a blocked loop fails, not hangs)
            release.wait(5)
            deadline = time.monotonic() + 10
            while len(received) < len(block) and time.monotonic() < deadline:
                received.extend(pair.read(timeout=0.5))

        reader = threading.Thread(target=other_end, daemon=True)
        reader.start()

        async def scenario() -> float:
            stream = SerialStream(pair.device, 300)
            await stream.open()
            started = time.monotonic()
            stream.write(block)
            returned = time.monotonic() - started
            pair.write(b"meanwhile")  # the loop still reads while the write waits for the line
            assert await stream.read(timeout=2) == b"meanwhile"
            release.set()
            await stream.aclose()  # returns once the port's thread has written everything and closed it
            return returned

        returned = asyncio.run(scenario())
        reader.join(15)
    assert returned < 0.05
    assert bytes(received) == block


def test_bytes_nobody_reads_are_bounded_the_oldest_dropped_and_counted() -> None:
    """A query or dialogue source does not read between its intervals: what arrives meanwhile is held up to the
    bound, the oldest bytes are dropped and the source counts them as an overrun."""
    payload = bytes(i % 251 for i in range(5000))
    with PtyPair() as pair:

        async def scenario() -> tuple[SerialSource, bytes]:
            source = SerialSource(SerialDevice(id="co2", port=pair.device, protocol="mhz19b"))
            source.stream.max_buffered = 1000
            all_dropped = asyncio.Event()
            count_overrun = source.stream.on_overrun
            assert count_overrun is not None

            def on_overrun(dropped: int) -> None:
                count_overrun(dropped)
                if source.stats["overrun_bytes"] >= len(payload) - 1000:
                    all_dropped.set()

            source.stream.on_overrun = on_overrun
            await source.stream.open()
            await asyncio.get_running_loop().run_in_executor(None, pair.write, payload)
            await asyncio.wait_for(all_dropped.wait(), 5)
            data = await source.stream.read(timeout=1)
            await source.stream.aclose()
            return source, data

        source, data = asyncio.run(scenario())
    assert data == payload[-1000:]
    assert source.stats["overrun_bytes"] == 4000 and source.stats["rejected.overrun"] >= 1
