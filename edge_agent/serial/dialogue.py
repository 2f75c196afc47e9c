"""The steps of a request/answer dialogue on a serial line, and their driver: shared by the query protocols whose
session is one request and one answer at a time (DL/T 645, CJ/T 188, M-Bus). Everything but `run_session` is pure.

A session says what to do next with `next_step()`:

    Send(data)           write data
    Expect(timeout_s)    read what arrives, waiting at most timeout_s of silence; bytes -> session.feed(bytes),
                         silence -> session.timeout(); Expect is returned again until the answer is complete
    Done()               stop; the session's `result` holds what it read

(IEC 62056-21's sign-on, with its baud switches and reaction times, has steps of its own:
edge_agent/serial/iec62056_21.py.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class Expect:
    timeout_s: float


@dataclass(frozen=True)
class Done:
    pass


Step = Send | Expect | Done


def transmit_s(n_bytes: int, baud: int, bits_per_byte: int = 11) -> float:
    """Time on the wire: 11 bits per byte for 8E1 (start, 8 data, parity, stop)."""
    return n_bytes * bits_per_byte / baud


class Session(Protocol):
    result: Any

    def next_step(self) -> Step: ...

    def feed(self, data: bytes) -> None: ...

    def timeout(self) -> None: ...


class LinePort(Protocol):
    """What the driver needs of a line: edge_agent/serial/port.py SerialStream (a port of its own), or the bus
    owner's port between two transactions (edge_agent/modbus/transport.py SerialTransport.line())."""

    async def send(self, data: bytes) -> None: ...

    async def read(self, timeout: float | None = None) -> bytes: ...  # b"" when the timeout passed


async def run_session(session: Session, port: LinePort) -> Any:
    """Drive `session` over `port` until Done; returns its result. The port's errors propagate (the bus owner
    reopens the port)."""
    while True:
        step = session.next_step()
        if isinstance(step, Send):
            await port.send(step.data)
        elif isinstance(step, Expect):
            data = await port.read(step.timeout_s)
            if data:
                session.feed(data)
            else:
                session.timeout()
        else:
            return session.result
