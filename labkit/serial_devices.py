"""Simulated serial meters and sensors on ptys, for end-to-end tests: the agent opens the pty's device path, the
simulator writes real captured frames into the master end at the device's own rate, or answers queries.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from labkit.serial_lab import PtyPair


class StreamingDevice:
    """Writes `frames` one after another, one every `period` seconds (a P1 port, a GPS, a PM sensor),
    in `chunk`-byte pieces as a UART delivers them. Loops over the frames until stopped."""

    def __init__(self, frames: Sequence[bytes], period: float = 1.0, chunk: int = 64, loop: bool = True) -> None:
        self.pty = PtyPair()
        self.frames = list(frames)
        self.period = period
        self.chunk = chunk
        self.loop = loop
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streaming-device", daemon=True)
        self._thread.start()

    @property
    def device(self) -> str:
        return self.pty.device

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            if index >= len(self.frames):
                if not self.loop:
                    return
                index = 0
            frame = self.frames[index]
            for start in range(0, len(frame), self.chunk):
                try:
                    self.pty.write(frame[start : start + self.chunk])
                except OSError:
                    return
            self.sent += 1
            index += 1
            self._stop.wait(self.period)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pty.close()


@dataclass(frozen=True)
class Delayed:
    """An answer that leaves `seconds` late (a slow meter): the device says nothing else meanwhile."""

    data: bytes
    seconds: float


def collide(answers: Sequence[bytes]) -> bytes:
    """What a master hears when several devices answer at once: on M-Bus a 0 bit is the slave drawing more
    current, so overlapping bytes read as their AND (EN 13757-2: a space is a current increase); on RS-485 the
    drivers fight and the result is no better. One answer alone is heard as it is."""
    if not answers:
        return b""
    size = max(len(a) for a in answers)
    out = bytearray(b"\xff" * size)
    for answer in answers:
        for i, byte in enumerate(answer):
            out[i] &= byte
    return bytes(out)


class QueryDevice:
    """Answers each request it recognises (`answer(request) -> bytes | Delayed | None`): an MH-Z19B, a meter's
    optical head, meters on a bus. Requests are whatever arrived within `quiet` seconds of silence."""

    def __init__(self, answer: Callable[[bytes], bytes | Delayed | None], quiet: float = 0.02) -> None:
        self.pty = PtyPair()
        self.answer = answer
        self.quiet = quiet
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="query-device", daemon=True)
        self._thread.start()

    @property
    def device(self) -> str:
        return self.pty.device

    def _run(self) -> None:
        buf = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self.pty.master], [], [], 0.05 if not buf else self.quiet)
            if ready:
                try:
                    data = os.read(self.pty.master, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                buf += data
                continue
            if buf:
                self.requests.append(buf)
                reply = self.answer(buf)
                buf = b""
                if isinstance(reply, Delayed):
                    if self._stop.wait(reply.seconds):
                        return
                    reply = reply.data
                if reply:
                    try:
                        self.pty.write(reply)
                    except OSError:
                        return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pty.close()


def wait_for(predicate: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)
