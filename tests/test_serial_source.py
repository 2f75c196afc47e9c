"""The serial source around the decoders: reading a real pty, reopening after a USB unplug, counting rejects."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from edge_agent.serial.config import SerialDevice
from edge_agent.serial.source import SerialSource
from labkit.serial_lab import PtyPair
from tests.test_serial_sensors import frames

pytestmark = pytest.mark.integration


def test_source_reads_counts_garbage_and_reopens_after_unplug(tmp_path: Path) -> None:
    link = tmp_path / "ttyUSB-pm"
    sds = frames("sds011")
    got = []

    async def scenario() -> SerialSource:
        pty = PtyPair(link)
        source = SerialSource(SerialDevice(id="pm", port=str(link), protocol="sds011"))
        task = asyncio.create_task(source.run(got.extend))
        await asyncio.sleep(0.3)
        pty.write(b"\x01\x02junk" + sds[0] + sds[1])
        await asyncio.sleep(0.3)
        pty.unplug()  # the adapter is pulled: the device path vanishes
        await asyncio.sleep(1.5)
        before = len(got)
        pty = PtyPair(link)  # plugged back in (udev recreates the same /dev/serial/by-id link)
        for _ in range(40):  # the source reopens with backoff; keep sending until it reads again
            pty.write(sds[2])
            await asyncio.sleep(0.2)
            if len(got) > before:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pty.close()
        return source

    source = asyncio.run(scenario())
    assert [r.fields["pm2_5"] for r in got[:2]] == [0.6, 0.9]
    assert len(got) >= 3 and got[2].device == "pm" and got[2].measurement == "air_quality"
    assert source.stats["rejected.garbage"] >= 1 and source.stats["lost"] >= 1
    assert "disappeared" in source.last_error or "does not exist" in source.last_error


def test_missing_port_is_retried_with_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> SerialSource:
        source = SerialSource(SerialDevice(id="gps", port=str(tmp_path / "ttyNOPE"), protocol="nmea"))
        task = asyncio.create_task(source.run(lambda _readings: None))
        await asyncio.sleep(1.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return source

    source = asyncio.run(scenario())
    assert source.stats["open_failures"] >= 2
    assert source.last_error == f"serial port {tmp_path / 'ttyNOPE'} does not exist"
