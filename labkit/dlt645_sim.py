"""Simulated DL/T 645 electricity meters, written from the standard (DL/T 645-2007 §7, DL/T 645-1997 §6), for
tests and the demo: several meters on one line (a pty), each answering reads of the identifiers in the shipped
tables with values that move, an abnormal "no such data" answer for the others, and the read-address request
when it is alone on the line.

`MeterBank.answer(request)` is pure (bytes in, bytes out); `Dlt645Line` puts a bank on a pty through
labkit.serial_devices.QueryDevice. Meters that answer a wildcard request at once collide (labkit.serial_devices
collide); a meter can misbehave for the bus owner's torture tests: `fault = "late"` answers `late_s` late,
`"garbage"` answers noise and a frame with a wrong checksum.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from edge_agent.dlt645 import frames
from edge_agent.dlt645.identifiers import Identifier, encode_value, table
from labkit.serial_devices import Delayed, QueryDevice, collide

NO_SUCH_DATA = {"2007": 0x02, "1997": 0x02}  # 2007 ERR bit 1 "无请求数据"; 1997 bit 1 "数据标识错"


@dataclass
class SimMeter:
    address: str
    edition: frames.Version = "2007"
    start_kwh: float = 1206.42
    clock: float = field(default_factory=time.time)  # fixed start: values derive from elapsed time
    omit: set[str] = field(default_factory=set)  # identifier names this meter does not have (abnormal answer)
    fault: str = ""  # "late": answers late_s late; "garbage": noise and a frame with a wrong checksum instead
    late_s: float = 0.9
    requests: int = 0

    def value(self, ident: Identifier, now: float) -> float | int | str:
        t = now - self.clock
        phase = {"l1": 0, "l2": 1, "l3": 2}.get(ident.name.rsplit("_", 1)[-1], 0)
        name = ident.name
        if name.startswith("energy_import"):
            return round(self.start_kwh + t * 0.01 + (0 if name == "energy_import" else 100 * int(name[-1])), 2)
        if name.startswith("energy"):
            return round(12.5 + t * 0.001, 2)
        if name.startswith("voltage"):
            return round(230.0 + phase + math.sin(t / 10), 1 if self.edition == "2007" else 0)
        if name.startswith("current"):
            return round(5.0 + phase * 0.5, 3 if self.edition == "2007" else 2)
        if name.startswith("power_factor"):
            return 0.987
        if name == "reactive_power":
            return -120.0 if self.edition == "2007" else 120.0  # 2007: negative (capacitive), the sign bit
        if name.startswith(("power", "apparent_power")):
            return 3456.7 + phase * 100 if self.edition == "2007" else 3456.7
        if name == "frequency":
            return 50.01
        if name == "meter_date":
            return time.strftime("%Y-%m-%d", time.gmtime(now))
        if name == "meter_time":
            return time.strftime("%H:%M:%S", time.gmtime(now))
        if name in ("address", "serial_number"):
            return self.address.zfill(12)
        return 0


class MeterBank:
    """Meters sharing one line. A request to an address nobody has gets no answer (as on a real bus)."""

    def __init__(self, meters: list[SimMeter], now=time.time) -> None:  # type: ignore[no-untyped-def]
        self.meters = {frames.decode_address(frames.encode_address(m.address)): m for m in meters}
        self.now = now
        self.deframer = frames.Deframer()

    def answer(self, data: bytes) -> bytes | Delayed | None:
        out = b""
        late = 0.0
        for event in self.deframer.feed(data):
            if isinstance(event, frames.Frame) and not event.from_meter:
                answers = []
                for meter, answer in self._answers(event):
                    if meter.fault == "garbage":
                        bad = bytearray(answer)
                        bad[-2] ^= 0x55  # the checksum
                        answer = b"\x00\x13\x37" * 4 + bytes(bad)
                    late = max(late, meter.late_s if meter.fault == "late" else 0.0)
                    answers.append(answer)
                out += collide(answers)
        if not out:
            return None
        return Delayed(out, late) if late else out

    def _answers(self, request: frames.Frame) -> list[tuple[SimMeter, bytes]]:
        """Every meter's answer to `request`: one for an address, all that take a wildcard request."""
        if request.address == frames.WILDCARD_ADDRESS:
            if request.control == frames.READ_ADDRESS:  # 2007 §7.1; a 1997 meter does not know 13H
                return [(m, frames.build(m.address, 0x93, frames.encode_address(m.address)))
                        for m in self.meters.values() if m.edition == "2007"]
            targets = list(self.meters.values())
        else:
            targets = [self.meters[request.address]] if request.address in self.meters else []
        out = []
        for meter in targets:
            answer = self._one(meter, request)
            if answer is not None:
                out.append((meter, answer))
        return out

    def _one(self, meter: SimMeter, request: frames.Frame) -> bytes | None:
        meter.requests += 1
        edition = meter.edition
        if request.function != frames.READ[edition]:
            return None
        n = frames.DI_LEN[edition]
        di = int.from_bytes(request.data[:n], "little")
        ident = table(edition).by_code().get(di)
        read = frames.READ[edition]
        if ident is None or ident.name in meter.omit:
            return frames.build(meter.address, 0xC0 | read, bytes([NO_SUCH_DATA[edition]]))
        value = encode_value(ident, meter.value(ident, self.now()))
        return frames.build(meter.address, 0x80 | read, frames.di_bytes(di, edition) + value)


class Dlt645Line:
    """A MeterBank on a pty: `device` is the path the agent opens."""

    def __init__(self, meters: list[SimMeter]) -> None:
        self.bank = MeterBank(meters)
        self.query = QueryDevice(self.bank.answer)

    @property
    def device(self) -> str:
        return self.query.device

    def close(self) -> None:
        self.query.close()
