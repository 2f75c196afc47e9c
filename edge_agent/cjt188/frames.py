"""CJ/T 188-2004 frames for water, gas and heat meters: pure bytes in, frames, readings and rejections out.

The link layer ("户用计量仪表数据传输技术条件" CJ/T 188-2004 §6):

    [FE ...] 68 T A0 A1 A2 A3 A4 A5 A6 C L DATA(L) CS 16

- FE: wake-up preamble (0 to 4 bytes), not covered by the checksum.
- T: the meter type. 10H cold water, 11H domestic hot water, 12H drinking water, 13H reclaimed water; 20H heat
  meter (heat), 21H heat meter (cooling); 30H gas; 40H electricity.
- A0..A6: the address, 14 BCD digits low byte first; A5 A6 are commonly the manufacturer code. AA in every byte
  is the broadcast/wildcard address.
- C: D7 direction (1: the meter's answer), D6 1: abnormal answer, D5..D0 the function (01H read data).
- L: the length of DATA. No 33H offset (unlike DL/T 645).
- DATA: the data identifier DI (two bytes), a sequence number SER (one byte, echoed by the meter), the values.
- CS: sum modulo 256 of every byte from 68 through the last DATA byte. 16: the end.

"Read metering data" (DI 901F) answers, after DI and SER (CJ/T 188-2004 Table "计量数据"):
- water and gas meters (T 10H..13H, 30H): current accumulated flow (XXXXXX.XX, 4 bytes BCD) + unit, accumulated
  flow at the settlement day + unit, the meter's real time (7 bytes: ss mm hh DD MM YY YY, low first), status ST
  (2 bytes). L = 16H.
- heat meters (T 20H, 21H): heat at the settlement day + unit, current heat + unit, heat power + unit, flow rate +
  unit, accumulated flow + unit (each XXXXXX.XX, 4 bytes + 1), supply and return temperature (XXXX.XX °C, 3
  bytes each), accumulated working time (XXXXXX h, 3 bytes), real time (7), status ST (2). L = 2EH.
Status ST, first byte: D1 D0 the valve (00 open, 01 closed, 11 abnormal), D2 battery low; the rest the vendor's.

Vendors differ (public write-ups of real meters show both): the order of the two DI bytes on the wire (the
standard's DI0 DI1 = 1F 90; some meters send 90 1F) and, in heat meters, whether the unit byte comes before or
after its value. Both are device workarounds (`di_order`, `unit_first`); answers are accepted in either DI order.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from edge_agent.serial.base import JunkRun, Rejected

START = 0x68
END = 0x16
WAKE = 0xFE
HEADER_LEN = 11  # 68 T A0..A6 C L
MAX_DATA = 255
READ_DATA = 0x01
DI_METERING = 0x901F
WILDCARD_ADDRESS = "AAAAAAAAAAAAAA"

METER_TYPES = {
    0x10: ("water", "cold water meter"), 0x11: ("water", "domestic hot water meter"),
    0x12: ("water", "drinking water meter"), 0x13: ("water", "reclaimed water meter"),
    0x20: ("heat", "heat meter (heat)"), 0x21: ("cooling", "heat meter (cooling)"),
    0x30: ("gas", "gas meter"), 0x40: ("electricity", "electricity meter"),
}
# The names agent.toml gives the meter types whose metering data (901F) is decoded (40H is not: DL/T 645).
TYPE_NAMES = {"cold_water": 0x10, "hot_water": 0x11, "drinking_water": 0x12, "reclaimed_water": 0x13,
              "heat": 0x20, "cooling": 0x21, "gas": 0x30}

# CJ/T 188-2004 Appendix "单位代码": unit byte -> (the vocabulary's unit, factor into it).
UNITS: dict[int, tuple[str, str, float]] = {
    0x01: ("J", "kWh", 1 / 3.6e6), 0x02: ("Wh", "kWh", 1e-3), 0x05: ("kWh", "kWh", 1.0), 0x08: ("MWh", "kWh", 1e3),
    0x0A: ("MWh x 100", "kWh", 1e5), 0x0B: ("kJ", "kWh", 1 / 3600), 0x0E: ("MJ", "kWh", 1 / 3.6),
    0x11: ("GJ", "kWh", 1e3 / 3.6), 0x13: ("GJ x 100", "kWh", 1e5 / 3.6),
    0x14: ("W", "W", 1.0), 0x17: ("kW", "W", 1e3), 0x1A: ("MW", "W", 1e6),
    0x29: ("L", "m³", 1e-3), 0x2C: ("m³", "m³", 1.0), 0x32: ("L/h", "m³/h", 1e-3), 0x35: ("m³/h", "m³/h", 1.0),
}
# What kind of quantity each slot must be: a unit byte of the wrong kind is a decoding error, not a value.
_KIND = {"kWh": "energy", "W": "power", "m³": "volume", "m³/h": "flow"}

DiOrder = Literal["low_first", "high_first"]


class FrameError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def encode_address(address: str) -> bytes:
    text = address.strip()
    if text.upper() == WILDCARD_ADDRESS:
        return bytes([0xAA] * 7)
    if not text.isdigit() or not 1 <= len(text) <= 14:
        raise ValueError(f"a CJ/T 188 address is 1..14 decimal digits, got {address!r}")
    text = text.zfill(14)
    return bytes(int(text[i:i + 2], 16) for i in range(12, -1, -2))


def decode_address(raw: bytes) -> str:
    return "".join(f"{b:02X}" for b in reversed(raw))


def checksum(data: bytes | bytearray) -> int:
    return sum(data) & 0xFF


def di_bytes(di: int, order: DiOrder = "low_first") -> bytes:
    return di.to_bytes(2, "little" if order == "low_first" else "big")


def build(meter_type: int, address: str, control: int, data: bytes = b"", *, wake: int = 4) -> bytes:
    if len(data) > MAX_DATA:
        raise ValueError(f"{len(data)} data bytes (at most {MAX_DATA})")
    body = bytes([START, meter_type]) + encode_address(address) + bytes([control, len(data)]) + data
    return bytes([WAKE] * wake) + body + bytes([checksum(body), END])


def read_request(meter_type: int, address: str, *, di: int = DI_METERING, ser: int = 0, order: DiOrder = "low_first",
                 wake: int = 4) -> bytes:
    """Read data (control 01H, L = 3: DI, SER)."""
    return build(meter_type, address, READ_DATA, di_bytes(di, order) + bytes([ser & 0xFF]), wake=wake)


@dataclass(frozen=True)
class Frame:
    meter_type: int
    address: str
    control: int
    data: bytes
    offset: int = 0
    length: int = 0

    @property
    def from_meter(self) -> bool:
        return bool(self.control & 0x80)

    @property
    def abnormal(self) -> bool:
        return self.from_meter and bool(self.control & 0x40)

    @property
    def function(self) -> int:
        return self.control & 0x3F


def parse(frame: bytes, *, base: int = 0) -> Frame:
    i = 0
    while i < len(frame) and frame[i] == WAKE:
        i += 1
    raw = frame[i:]
    if len(raw) < HEADER_LEN + 2:
        raise FrameError("short", f"{len(raw)} bytes at offset {base + i}, a frame has at least {HEADER_LEN + 2}")
    if raw[0] != START:
        raise FrameError("malformed", f"expected 68 at offset {base + i}, got {raw[0]:02X}")
    n = raw[10]
    if len(raw) != HEADER_LEN + n + 2:
        raise FrameError("length", f"L = {n} at offset {base + i + 10} needs {HEADER_LEN + n + 2} bytes, got "
                                   f"{len(raw)}")
    cs = checksum(raw[:HEADER_LEN + n])
    if raw[HEADER_LEN + n] != cs:
        raise FrameError("checksum", f"CS {raw[HEADER_LEN + n]:02X} at offset {base + i + HEADER_LEN + n}, "
                                     f"computed {cs:02X}")
    if raw[-1] != END:
        raise FrameError("malformed", f"expected 16 at offset {base + len(frame) - 1}, got {raw[-1]:02X}")
    return Frame(raw[1], decode_address(raw[2:9]), raw[9], bytes(raw[HEADER_LEN:HEADER_LEN + n]), base + i, len(raw))


class Deframer:
    """Frames out of a byte stream in any split; garbage and bad frames reported with stream offsets; bounded."""

    max_buffer = 2 * (HEADER_LEN + MAX_DATA + 2)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0
        self._junk = JunkRun(64, "bytes outside a CJ/T 188 frame", blank=bytes([WAKE]))

    def feed(self, data: bytes) -> list[Frame | Rejected]:
        self._buf += data
        events: list[Frame | Rejected] = []
        buf = self._buf
        pos = 0
        while True:
            start = buf.find(START, pos)
            if start < 0:
                keep = len(buf)
                while keep > pos and buf[keep - 1] == WAKE and len(buf) - keep < 8:
                    keep -= 1  # maybe the preamble of a frame whose 68 is still on its way
                self._junk.add(buf, pos, keep, self._base, events)
                pos = keep
                break
            junk_end = start
            while junk_end > pos and buf[junk_end - 1] == WAKE:
                junk_end -= 1
            self._junk.add(buf, pos, junk_end, self._base, events)
            pos = start
            if len(buf) - pos < HEADER_LEN:
                break
            if buf[pos + 1] not in METER_TYPES:
                self._junk.add(buf, pos, pos + 1, self._base, events)  # a 68 that is not a frame start
                pos += 1
                continue
            total = HEADER_LEN + buf[pos + 10] + 2
            if len(buf) - pos < total:
                if self._later_frame(pos):
                    self._junk.add(buf, pos, pos + 1, self._base, events)
                    pos += 1
                    continue
                break
            self._junk.end(events)
            try:
                events.append(parse(bytes(buf[pos:pos + total]), base=self._base + pos))
            except FrameError as exc:
                events.append(Rejected(self._base + pos, exc.reason, exc.detail, total))
                pos += 1
                continue
            pos += total
        del buf[:pos]
        self._base += pos
        if len(buf) > self.max_buffer:
            drop = len(buf) - self.max_buffer
            self._junk.add(buf, 0, drop, self._base, events)
            del buf[:drop]
            self._base += drop
        return events

    def _later_frame(self, pos: int) -> bool:
        buf = self._buf
        start = buf.find(START, pos + 1)
        while 0 <= start <= len(buf) - HEADER_LEN - 2:
            if buf[start + 1] in METER_TYPES:
                end = start + HEADER_LEN + buf[start + 10] + 2
                if end <= len(buf) and buf[end - 1] == END and buf[end - 2] == checksum(buf[start:end - 2]):
                    return True
            start = buf.find(START, start + 1)
        return False

    def flush(self) -> list[Frame | Rejected]:
        events: list[Frame | Rejected] = []
        self._junk.end(events)
        if self._buf:
            events.append(Rejected(self._base, "incomplete", f"{len(self._buf)} bytes of an unfinished frame",
                                   len(self._buf)))
            self._base += len(self._buf)
            self._buf.clear()
        return events


# -- the metering data (DI 901F) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metering:
    measurement: str
    fields: dict[str, float | int | bool | str]
    units: dict[str, str]


def _bcd(raw: bytes, what: str, offset: int) -> int:
    """An unsigned BCD number sent low byte first; FrameError names the byte (offset within DATA)."""
    digits = ""
    for k, byte in enumerate(reversed(raw)):
        if byte >> 4 > 9 or byte & 0x0F > 9:
            raise FrameError("not_bcd", f"{what}: byte {offset + len(raw) - 1 - k} of the data is {byte:02X}, not BCD")
        digits += f"{byte:02X}"
    return int(digits)


class _Reader:
    def __init__(self, data: bytes, unit_first: bool) -> None:
        self.data = data
        self.pos = 3  # after DI and SER
        self.unit_first = unit_first

    def take(self, n: int, what: str) -> tuple[bytes, int]:
        if self.pos + n > len(self.data):
            raise FrameError("short", f"{what}: needs data bytes {self.pos}..{self.pos + n - 1}, the answer has "
                                      f"{len(self.data)}")
        at = self.pos
        self.pos += n
        return self.data[at:at + n], at

    def quantity(self, what: str, kind: str) -> tuple[float, str]:
        """XXXXXX.XX + unit byte, in the vocabulary's unit."""
        if self.unit_first:
            (unit_byte,), unit_at = self.take(1, what)
            raw, at = self.take(4, what)
        else:
            raw, at = self.take(4, what)
            (unit_byte,), unit_at = self.take(1, what)
        unit = UNITS.get(unit_byte)
        if unit is None or _KIND[unit[1]] != kind:
            raise FrameError("unit", f"{what}: unit byte {unit_byte:02X} at data byte {unit_at} is not a unit of "
                                     f"{kind}")
        value = _bcd(raw, what, at) / 100 * unit[2]
        return round(value, 6), unit[1]

    def number(self, n: int, decimals: int, what: str) -> float:
        raw, at = self.take(n, what)
        return _bcd(raw, what, at) / 10 ** decimals

    def meter_time(self) -> str:
        raw, at = self.take(7, "real time")
        ss, mi, hh, dd, mo = (_bcd(raw[i:i + 1], "real time", at + i) for i in range(5))
        year = _bcd(raw[5:7], "real time", at + 5)
        try:
            return dt.datetime(year, mo, dd, hh, mi, ss).strftime("%Y-%m-%dT%H:%M:%S")
        except ValueError:
            raise FrameError("bad_time", f"real time at data byte {at}: {raw.hex(' ')} is not a date and time") \
                from None

    def status(self) -> dict[str, int | bool]:
        raw, _ = self.take(2, "status")
        valve = raw[0] & 0x03
        return {"status": raw[0] | raw[1] << 8, "valve_state": valve, "battery_low": bool(raw[0] & 0x04)}


# {field: unit} of the 901F metering data of each kind of meter, as `metering` gives them: the data catalogue
# (docs/catalog.md; tests/test_catalog.py checks it against decoded answers)
_STATUS_FIELDS = {"meter_time": "", "status": "", "valve_state": "", "battery_low": ""}
METERING_FIELDS: dict[str, dict[str, str]] = {
    "water": {"volume": "m³", "volume_settlement": "m³", **_STATUS_FIELDS},
    "heat": {"energy_settlement": "kWh", "energy": "kWh", "power": "W", "flow": "m³/h", "volume": "m³",
             "temperature_supply": "°C", "temperature_return": "°C", "operating_time": "s", **_STATUS_FIELDS},
}
METERING_FIELDS["gas"] = METERING_FIELDS["water"]
METERING_FIELDS["cooling"] = METERING_FIELDS["heat"]


def metering(frame: Frame, *, unit_first: bool = False) -> Metering:
    """The fields of a 901F answer, by meter type. FrameError (with the data byte) for anything off."""
    kind = METER_TYPES.get(frame.meter_type)
    if kind is None:
        raise FrameError("unsupported", f"meter type {frame.meter_type:02X}")
    if len(frame.data) < 3 or {int.from_bytes(frame.data[:2], "little"), int.from_bytes(frame.data[:2], "big")} \
            .isdisjoint({DI_METERING}):
        raise FrameError("wrong_identifier", f"answer for DI {frame.data[:2].hex()}, asked 901F")
    r = _Reader(frame.data, unit_first and kind[0] in ("heat", "cooling"))
    fields: dict[str, float | int | bool | str] = {}
    units: dict[str, str] = {}

    def put(name: str, value_unit: tuple[float, str]) -> None:
        fields[name], units[name] = value_unit

    if kind[0] in ("water", "gas"):
        put("volume", r.quantity("current accumulated flow", "volume"))
        put("volume_settlement", r.quantity("accumulated flow at the settlement day", "volume"))
    elif kind[0] in ("heat", "cooling"):
        put("energy_settlement", r.quantity("heat at the settlement day", "energy"))
        put("energy", r.quantity("current heat", "energy"))
        put("power", r.quantity("heat power", "power"))
        put("flow", r.quantity("flow rate", "flow"))
        put("volume", r.quantity("accumulated flow", "volume"))
        fields["temperature_supply"], units["temperature_supply"] = r.number(3, 2, "supply temperature"), "°C"
        fields["temperature_return"], units["temperature_return"] = r.number(3, 2, "return temperature"), "°C"
        fields["operating_time"], units["operating_time"] = r.number(3, 0, "working time") * 3600, "s"
    else:
        raise FrameError("unsupported", f"metering data of a {kind[1]} (type {frame.meter_type:02X})")
    fields["meter_time"] = r.meter_time()
    fields.update(r.status())
    if r.pos != len(frame.data):
        raise FrameError("length", f"{len(frame.data) - r.pos} data bytes after the status (at {r.pos})")
    return Metering(kind[0], fields, units)
