"""Simulated CJ/T 188 water, gas and heat meters on one line, written from CJ/T 188-2004 (frames as
edge_agent/cjt188/frames.py describes), for tests: `MeterLine.answer(request)` is pure, `Cjt188Line` puts it on a
pty through labkit.serial_devices.QueryDevice."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edge_agent.cjt188 import frames
from labkit.serial_devices import QueryDevice, collide


def _bcd(value: int, n: int) -> bytes:
    digits = str(value).zfill(2 * n)
    if len(digits) > 2 * n:
        raise ValueError(f"{value} does not fit {n} BCD bytes")
    return bytes(int(digits[i:i + 2], 16) for i in range(2 * n - 2, -2, -2))  # low byte first


def _quantity(value: float, unit: int, unit_first: bool) -> bytes:
    raw = _bcd(round(value * 100), 4)
    return bytes([unit]) + raw if unit_first else raw + bytes([unit])


@dataclass
class SimMeter:
    meter_type: int
    address: str
    volume_m3: float = 123.45
    unit_first: bool = False  # the heat-meter variant with the unit byte first
    di_order: frames.DiOrder = "low_first"
    status: int = 0x0000
    start: float = field(default_factory=time.time)
    requests: int = 0

    def metering(self, now: float) -> bytes:
        t = now - self.start
        volume = round(self.volume_m3 + t * 0.001, 2)
        stamp = time.gmtime(now)
        real_time = (_bcd(stamp.tm_sec, 1) + _bcd(stamp.tm_min, 1) + _bcd(stamp.tm_hour, 1) + _bcd(stamp.tm_mday, 1)
                     + _bcd(stamp.tm_mon, 1) + _bcd(stamp.tm_year, 2))
        status = self.status.to_bytes(2, "little")
        if self.meter_type >= 0x20 and self.meter_type < 0x30:
            u = self.unit_first
            body = (_quantity(1000.0, 0x05, u) + _quantity(1234.56 + t * 0.01, 0x05, u) + _quantity(12.5, 0x17, u)
                    + _quantity(0.85, 0x35, u) + _quantity(volume, 0x2C, u) + _bcd(6512, 3) + _bcd(4023, 3)
                    + _bcd(8760, 3))
        else:
            body = _quantity(volume, 0x2C, False) + _quantity(100.0, 0x2C, False)
        return frames.di_bytes(frames.DI_METERING, self.di_order) + b"\x00" + body + real_time + status


class MeterLine:
    def __init__(self, meters: list[SimMeter], now=time.time) -> None:  # type: ignore[no-untyped-def]
        self.meters = {frames.decode_address(frames.encode_address(m.address)): m for m in meters}
        self.now = now
        self.deframer = frames.Deframer()

    def answer(self, data: bytes) -> bytes | None:
        """Meters answer their own address, and (as many do) the wildcard address AAAAAAAAAAAAAA with their type;
        several answering the wildcard at once collide."""
        out = b""
        for event in self.deframer.feed(data):
            if isinstance(event, frames.Frame) and not event.from_meter and event.function == frames.READ_DATA:
                if event.address == frames.WILDCARD_ADDRESS:
                    targets = list(self.meters.values())
                else:
                    targets = [self.meters[event.address]] if event.address in self.meters else []
                answers = []
                for meter in targets:
                    if event.meter_type != meter.meter_type:
                        continue
                    meter.requests += 1
                    answers.append(frames.build(meter.meter_type, meter.address, 0x81, meter.metering(self.now())))
                out += collide(answers)
        return out or None


class Cjt188Line:
    def __init__(self, meters: list[SimMeter]) -> None:
        self.line = MeterLine(meters)
        self.query = QueryDevice(self.line.answer)

    @property
    def device(self) -> str:
        return self.query.device

    def close(self) -> None:
        self.query.close()
