"""DL/T 645-2007 and DL/T 645-1997 frames: pure bytes in, frames and rejections (with stream offsets) out.

The link layer is the same in both editions (DL/T 645-2007 §4, DL/T 645-1997 §4):

    [FE ...] 68 A0 A1 A2 A3 A4 A5 68 C L DATA(L) CS 16

- FE: the wake-up preamble a master sends (usually four) before a frame; meters may answer with it too. It is not
  part of the frame and not covered by the checksum.
- A0..A5: the meter address, 12 BCD digits, low byte first ("000012345678" is sent 78 56 34 12 00 00).
  AA in every byte is the wildcard of the read-address request (2007 §7.1); 99 99 99 99 99 99 the broadcast
  address (time synchronisation).
- C: the control code. D7 direction (1: the meter's answer), D6 (answers only) 1: abnormal answer, D5 1: follow-up
  frames exist, D4..D0 the function. 2007: 0x11 read data, 0x12 read follow-up, 0x13 read address, 0x14 write,
  0x08 broadcast time sync. 1997: 0x01 read data, 0x02 read follow-up, 0x04 write, 0x08 time sync.
- L: the length of DATA (2007: at most 200 in a read answer; a byte, so a parser must accept up to 255).
- DATA: every byte sent plus 0x33 (mod 256), taken off on reception ("加33H处理", 2007 §4.2.7).
- CS: the sum modulo 256 of every byte from the first 68 through the last DATA byte.
- 16: the end.

Data identifiers (DI) come first in DATA, low byte first: four bytes in 2007 (DI0..DI3, e.g. 00 01 00 00 is the
forward active total energy, sent 33 33 34 33), two in 1997 (DI0 DI1, e.g. 0x9010 sent 43 C3). The values after
the DI are BCD, low byte first; identifiers.py knows what each DI holds.

An abnormal answer (C = 0xD1 for a 2007 read, 0xC1 for a 1997 read) carries one error byte whose bits are named
in ERROR_BITS_2007 / ERROR_BITS_1997 (2007 §7.2 Table "错误信息字 ERR", 1997 §6.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edge_agent.serial.base import JunkRun, Rejected

Version = Literal["2007", "1997"]

START = 0x68
END = 0x16
WAKE = 0xFE
OFFSET = 0x33
HEADER_LEN = 10  # 68 A0..A5 68 C L
MAX_DATA = 255
WILDCARD_ADDRESS = "AAAAAAAAAAAA"  # 2007 §7.1: read the address of the one meter on the line
BROADCAST_ADDRESS = "999999999999"

# Function codes (D4..D0 of C) per edition.
READ = {"2007": 0x11, "1997": 0x01}
READ_FOLLOW_UP = {"2007": 0x12, "1997": 0x02}
READ_ADDRESS = 0x13  # 2007 only
DI_LEN = {"2007": 4, "1997": 2}

# 2007 §7.2 / Appendix: "错误信息字 ERR" of an abnormal answer.
ERROR_BITS_2007 = {
    0: "other_error",  # 其他错误
    1: "no_such_data",  # 无请求数据
    2: "unauthorised",  # 密码错/未授权
    3: "baud_rate_unchangeable",  # 通信速率不能更改
    4: "too_many_year_zones",  # 年时区数超
    5: "too_many_day_periods",  # 日时段数超
    6: "too_many_tariffs",  # 费率数超
}
# 1997 §6.3: the error byte of an abnormal answer.
ERROR_BITS_1997 = {
    0: "illegal_data",  # 非法数据
    1: "unknown_identifier",  # 数据标识错
    2: "wrong_password",  # 密码错
    4: "too_many_year_zones",
    5: "too_many_day_periods",
    6: "too_many_tariffs",
}


class FrameError(ValueError):
    """A frame that is not what was asked for; `reason` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def encode_address(address: str) -> bytes:
    """12 BCD digits (or the wildcard 'AAAAAAAAAAAA'), low byte first. Shorter addresses are padded with leading
    zeros, as the standard says for addresses of fewer than 12 digits (2007 §4.2.3: "不足6字节时高位补0")."""
    text = address.strip()
    if text.upper() == WILDCARD_ADDRESS:
        return bytes([0xAA] * 6)
    if not text.isdigit() or not 1 <= len(text) <= 12:
        raise ValueError(f"a DL/T 645 address is 1..12 decimal digits, got {address!r}")
    text = text.zfill(12)
    return bytes(int(text[i:i + 2], 16) for i in range(10, -1, -2))


def decode_address(raw: bytes) -> str:
    """The 12-digit address of six address bytes; a non-BCD byte is shown in hex (the wildcard is 'AA...')."""
    return "".join(f"{b:02X}" for b in reversed(raw))


def checksum(data: bytes | bytearray) -> int:
    return sum(data) & 0xFF


def _offset(data: bytes) -> bytes:
    return bytes((b + OFFSET) & 0xFF for b in data)


def _unoffset(data: bytes | bytearray) -> bytes:
    return bytes((b - OFFSET) & 0xFF for b in data)


def build(address: str, control: int, data: bytes = b"", *, wake: int = 4) -> bytes:
    """A complete frame with `wake` FE bytes in front; `data` is given without the 0x33 offset."""
    if len(data) > MAX_DATA:
        raise ValueError(f"{len(data)} data bytes (at most {MAX_DATA})")
    body = bytes([START]) + encode_address(address) + bytes([START, control, len(data)]) + _offset(data)
    return bytes([WAKE] * wake) + body + bytes([checksum(body), END])


def di_bytes(di: int, version: Version) -> bytes:
    """A data identifier as it goes into DATA: low byte first."""
    n = DI_LEN[version]
    if not 0 <= di < 1 << (8 * n):
        raise ValueError(f"DL/T 645-{version} identifiers are {n} bytes, got 0x{di:X}")
    return di.to_bytes(n, "little")


def read_request(address: str, di: int, version: Version, *, wake: int = 4) -> bytes:
    """Read one data identifier (2007 §7.2 control code 11H; 1997 control code 01H)."""
    return build(address, READ[version], di_bytes(di, version), wake=wake)


def read_address_request(*, wake: int = 4) -> bytes:
    """2007 §7.1 read communication address (13H) to the wildcard: only one meter may be on the line."""
    return build(WILDCARD_ADDRESS, READ_ADDRESS, wake=wake)


@dataclass(frozen=True)
class Frame:
    """A well-formed frame: checksum and end byte verified, DATA with the 0x33 offset taken off."""

    address: str
    control: int
    data: bytes
    offset: int = 0  # stream offset of its first 68
    length: int = 0  # bytes from the first 68 through 16

    @property
    def from_meter(self) -> bool:
        return bool(self.control & 0x80)

    @property
    def abnormal(self) -> bool:
        return bool(self.control & 0x40) and self.from_meter

    @property
    def follow_up(self) -> bool:
        return bool(self.control & 0x20)

    @property
    def function(self) -> int:
        return self.control & 0x1F


def parse(frame: bytes, *, base: int = 0) -> Frame:
    """One whole frame (preamble allowed); FrameError(reason) names what is wrong and at which byte offset."""
    i = 0
    while i < len(frame) and frame[i] == WAKE:
        i += 1
    raw = frame[i:]
    if len(raw) < HEADER_LEN + 2:
        raise FrameError("short", f"{len(raw)} bytes at offset {base + i}, a frame has at least {HEADER_LEN + 2}")
    if raw[0] != START or raw[7] != START:
        bad = i if raw[0] != START else i + 7
        raise FrameError("malformed", f"expected 68 at offset {base + bad}, got {frame[bad]:02X}")
    n = raw[9]
    if len(raw) != HEADER_LEN + n + 2:
        raise FrameError("length", f"L = {n} at offset {base + i + 9} needs {HEADER_LEN + n + 2} bytes, got "
                                   f"{len(raw)}")
    cs = checksum(raw[:HEADER_LEN + n])
    if raw[HEADER_LEN + n] != cs:
        raise FrameError("checksum", f"CS {raw[HEADER_LEN + n]:02X} at offset {base + i + HEADER_LEN + n}, "
                                     f"computed {cs:02X}")
    if raw[-1] != END:
        raise FrameError("malformed", f"expected 16 at offset {base + len(frame) - 1}, got {raw[-1]:02X}")
    return Frame(decode_address(raw[1:7]), raw[8], _unoffset(raw[HEADER_LEN:HEADER_LEN + n]), base + i, len(raw))


class Deframer:
    """Frames out of a byte stream in any split: FE preambles skipped, garbage and bad frames reported with
    their stream offsets (edge_agent/serial/base.py's contract), the buffer bounded."""

    max_buffer = 2 * (HEADER_LEN + MAX_DATA + 2)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._junk = JunkRun(64, "bytes outside a DL/T 645 frame", blank=bytes([WAKE]))

    def feed(self, data: bytes) -> list[Frame | Rejected]:
        self._buf += data
        events: list[Frame | Rejected] = []
        buf = self._buf
        pos = 0
        while True:
            start = buf.find(START, pos)
            if start < 0:
                # keep a trailing run of FE: it may be the preamble of a frame whose 68 has not arrived yet
                keep = len(buf)
                while keep > pos and buf[keep - 1] == WAKE and len(buf) - keep < 8:
                    keep -= 1
                self._junk.add(buf, pos, keep, self._base, events)
                pos = keep
                break
            if start > pos:
                junk_end = start
                while junk_end > pos and buf[junk_end - 1] == WAKE:  # the preamble of the frame that follows
                    junk_end -= 1
                self._junk.add(buf, pos, junk_end, self._base, events)
            pos = start
            if len(buf) - pos < HEADER_LEN:
                break  # wait for the header
            if buf[pos + 7] != START:
                # a 68 that does not start a frame (a data byte, an address digit 68): not a frame start
                self._junk.add(buf, pos, pos + 1, self._base, events)
                pos += 1
                continue
            total = HEADER_LEN + buf[pos + 9] + 2
            if len(buf) - pos < total:
                if self._later_frame(pos):
                    # this 68 only looked like a header (its L asks for more than arrived) and a whole frame
                    # with a good checksum already follows it: that one is the answer
                    self._junk.add(buf, pos, pos + 1, self._base, events)
                    pos += 1
                    continue
                break
            self._junk.end(events)
            try:
                events.append(parse(bytes(buf[pos:pos + total]), base=self._base + pos))
            except FrameError as exc:
                # A bad checksum or end byte: the 68 might have been a data byte; resume right after it, so a
                # real frame that starts inside the rejected span is still found.
                events.append(Rejected(self._base + pos, exc.reason, exc.detail, total))
                pos += 1
                continue
            pos += total
        del buf[:pos]
        self._base += pos
        if len(buf) > self.max_buffer:  # cannot happen with the checks above; a bound in code all the same
            drop = len(buf) - self.max_buffer
            self._junk.add(buf, 0, drop, self._base, events)
            del buf[:drop]
            self._base += drop
        return events

    def _later_frame(self, pos: int) -> bool:
        buf = self._buf
        start = buf.find(START, pos + 1)
        while 0 <= start <= len(buf) - HEADER_LEN - 2:
            if buf[start + 7] == START:
                end = start + HEADER_LEN + buf[start + 9] + 2
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


@dataclass(frozen=True)
class ReadAnswer:
    di: int
    value: bytes  # the bytes after the DI (low byte first, BCD), offset already removed
    follow_up: bool


@dataclass(frozen=True)
class Abnormal:
    error: int
    names: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join(self.names) or f"error byte {self.error:02X}"


def read_answer(frame: Frame, address: str, di: int, version: Version) -> ReadAnswer | Abnormal:
    """The meter's answer to read_request(address, di, version); FrameError for an answer that is not one."""
    want = encode_address(address)
    if address.upper() != WILDCARD_ADDRESS and frame.address != decode_address(want):
        raise FrameError("wrong_address", f"answer from {frame.address}, asked {decode_address(want)}")
    if not frame.from_meter or frame.function != READ[version]:
        raise FrameError("unexpected", f"control code {frame.control:02X} is not an answer to a DL/T 645-{version} "
                                       f"read ({0x80 | READ[version]:02X})")
    if frame.abnormal:
        if len(frame.data) != 1:
            raise FrameError("malformed", f"abnormal answer with {len(frame.data)} data bytes, expected 1")
        bits = ERROR_BITS_2007 if version == "2007" else ERROR_BITS_1997
        err = frame.data[0]
        return Abnormal(err, tuple(name for bit, name in bits.items() if err >> bit & 1))
    n = DI_LEN[version]
    if len(frame.data) < n:
        raise FrameError("malformed", f"{len(frame.data)} data bytes, shorter than the {n}-byte identifier")
    got = int.from_bytes(frame.data[:n], "little")
    if got != di:
        raise FrameError("wrong_identifier", f"answer for DI {got:0{2 * n}X}, asked {di:0{2 * n}X}")
    return ReadAnswer(got, frame.data[n:], frame.follow_up)


def address_answer(frame: Frame) -> str:
    """The address in a meter's answer to read_address_request (2007 §7.1: C = 93H, L = 6, DATA = the address)."""
    if frame.control != 0x93 or len(frame.data) != 6:
        raise FrameError("unexpected", f"control code {frame.control:02X} with {len(frame.data)} data bytes is not "
                                       f"an answer to read address (93H, 6 bytes)")
    return decode_address(frame.data)
