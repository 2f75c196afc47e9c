"""One simulated RS-485 line shared by devices of several protocols, for tests of a bus whose owner polls Modbus
units and DL/T 645 and CJ/T 188 meters on one port: every device sees every request (as on a real line) and
answers only its own. `RtuUnits` is a minimal Modbus RTU responder (FC 3 and 4 from register tables, Modbus over
Serial Line 1.02 §2.5.1 framing), enough to share a line with the meters' simulators.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from edge_agent.modbus.frames import crc16_modbus, rtu_encode
from labkit.serial_devices import Delayed, QueryDevice

Answer = Callable[[bytes], bytes | Delayed | None]


class RtuUnits:
    """Modbus units answering reads of holding (FC 3) and input (FC 4) registers; exception 2 beyond a table."""

    def __init__(self, units: Mapping[int, Mapping[str, Sequence[int]]]) -> None:
        self.units = {unit: {table: list(values) for table, values in tables.items()} for unit, tables in units.items()}
        self.requests: list[tuple[int, int, int, int]] = []  # (unit, function, address, count)

    def answer(self, data: bytes) -> bytes | None:
        if len(data) != 8 or crc16_modbus(data[:6]) != int.from_bytes(data[6:], "little"):
            return None  # not a Modbus read request (another protocol's frame): a Modbus device stays silent
        unit, function = data[0], data[1]
        address, count = int.from_bytes(data[2:4], "big"), int.from_bytes(data[4:6], "big")
        table = {3: "holding", 4: "input"}.get(function)
        if unit not in self.units or table is None:
            return None
        self.requests.append((unit, function, address, count))
        registers = self.units[unit].get(table, [])
        if address + count > len(registers):
            return rtu_encode(unit, bytes([function | 0x80, 2]))
        body = b"".join(r.to_bytes(2, "big") for r in registers[address:address + count])
        return rtu_encode(unit, bytes([function, len(body)]) + body)


class SharedLine:
    """Devices of any protocols on one pty: each `answer` function sees every request; what they answer goes out
    (a Delayed answer delays the line, as a slow device holds it)."""

    def __init__(self, answers: Sequence[Answer]) -> None:
        self.answers = list(answers)
        self.query = QueryDevice(self._answer)

    def _answer(self, request: bytes) -> bytes | Delayed | None:
        out = b""
        delay = 0.0
        for answer in self.answers:
            reply = answer(request)
            if isinstance(reply, Delayed):
                delay = max(delay, reply.seconds)
                reply = reply.data
            out += reply or b""
        if not out:
            return None
        return Delayed(out, delay) if delay else out

    @property
    def device(self) -> str:
        return self.query.device

    @property
    def requests(self) -> list[bytes]:
        return self.query.requests

    def close(self) -> None:
        self.query.close()
