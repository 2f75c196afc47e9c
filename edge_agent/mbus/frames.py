"""Wired M-Bus link layer (EN 13757-2, the FT1.2 format of IEC 60870-5-2): pure bytes in, frames out.

    single character  E5                                   (acknowledgement)
    short frame       10 C A CS 16                          (SND_NKE, REQ_UD2)
    control frame     68 03 03 68 C A CI CS 16
    long frame        68 L L 68 C A CI DATA CS 16           L = bytes from C through the end of DATA (3..255)

CS is the sum modulo 256 of C, A, CI and DATA. Control codes used here (EN 13757-2 §5.4):
SND_NKE 40H (link reset: the meter answers E5 and resets its FCB), REQ_UD2 5BH / 7BH (class 2 data, FCB = 20H
toggled for each next telegram of a multi-telegram answer, FCV = 10H set), SND_UD 53H / 73H (send data: the
selection of a secondary address), RSP_UD 08H (the meter's answer; ACD 20H and DFC 10H may be set).
Primary addresses 1..250; 253 (FDH) addresses the meter selected by secondary address; 254 and 255 broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.serial.base import JunkRun, Rejected

ACK = 0xE5
SHORT_START = 0x10
LONG_START = 0x68
END = 0x16
SND_NKE = 0x40
REQ_UD2 = 0x5B
FCB = 0x20
SND_UD = 0x53
RSP_UD = 0x08
SELECTED = 0xFD  # the address of the meter selected by its secondary address (EN 13757-3 §11)
CI_SELECT = 0x52  # SND_UD CI of a secondary address selection


class FrameError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def checksum(data: bytes | bytearray) -> int:
    return sum(data) & 0xFF


def short_frame(control: int, address: int) -> bytes:
    if not 0 <= address <= 255:
        raise ValueError(f"M-Bus address {address}: expected 0..255")
    return bytes([SHORT_START, control, address, (control + address) & 0xFF, END])


def long_frame(control: int, address: int, ci: int, data: bytes = b"") -> bytes:
    body = bytes([control, address, ci]) + data
    if len(body) > 255:
        raise ValueError(f"{len(body)} bytes after the header (at most 255)")
    return bytes([LONG_START, len(body), len(body), LONG_START]) + body + bytes([checksum(body), END])


def snd_nke(address: int) -> bytes:
    return short_frame(SND_NKE, address)


def req_ud2(address: int, fcb: bool) -> bytes:
    return short_frame(REQ_UD2 | (FCB if fcb else 0), address)


def select_secondary(secondary: str) -> bytes:
    """SND_UD to address 253 with CI 52H: identification number (8 BCD digits), manufacturer, version, medium,
    low byte first; 'F' in a digit (or FFFF / FF) is a wildcard (EN 13757-3 §11.3). `secondary` is 16 hex digits as
    printed by scans: IIIIIIII MMMM VV DD (id, manufacturer code, version, medium)."""
    text = secondary.strip().upper()
    if len(text) != 16 or any(c not in "0123456789ABCDEF" for c in text):
        raise ValueError(f"a secondary address is 16 hex digits (id 8, manufacturer 4, version 2, medium 2), "
                         f"got {secondary!r}")
    ident = bytes(int(text[i:i + 2], 16) for i in range(6, -2, -2))
    manufacturer = bytes([int(text[10:12], 16), int(text[8:10], 16)])
    rest = bytes([int(text[12:14], 16), int(text[14:16], 16)])
    return long_frame(SND_UD, SELECTED, CI_SELECT, ident + manufacturer + rest)


@dataclass(frozen=True)
class Frame:
    kind: str  # "ack", "short", "control", "long"
    control: int = 0
    address: int = 0
    ci: int = 0
    data: bytes = b""
    offset: int = 0
    length: int = 0


def parse(raw: bytes, *, base: int = 0) -> Frame:
    """One whole frame; FrameError names what is wrong and at which byte offset."""
    if raw == bytes([ACK]):
        return Frame("ack", offset=base, length=1)
    if raw[:1] == bytes([SHORT_START]):
        if len(raw) != 5:
            raise FrameError("length", f"short frame of {len(raw)} bytes at offset {base}")
        if raw[3] != (raw[1] + raw[2]) & 0xFF:
            raise FrameError("checksum", f"CS {raw[3]:02X} at offset {base + 3}, computed {(raw[1] + raw[2]) & 0xFF:02X}")
        if raw[4] != END:
            raise FrameError("malformed", f"expected 16 at offset {base + 4}, got {raw[4]:02X}")
        return Frame("short", raw[1], raw[2], offset=base, length=5)
    if len(raw) < 9 or raw[0] != LONG_START or raw[3] != LONG_START or raw[1] != raw[2]:
        raise FrameError("malformed", f"not a long or control frame at offset {base}")
    n = raw[1]
    if n < 3 or len(raw) != n + 6:
        raise FrameError("length", f"L = {n} at offset {base + 1} needs {n + 6} bytes, got {len(raw)}")
    body = raw[4:4 + n]
    if raw[4 + n] != checksum(body):
        raise FrameError("checksum", f"CS {raw[4 + n]:02X} at offset {base + 4 + n}, computed {checksum(body):02X}")
    if raw[-1] != END:
        raise FrameError("malformed", f"expected 16 at offset {base + len(raw) - 1}, got {raw[-1]:02X}")
    return Frame("control" if n == 3 else "long", body[0], body[1], body[2], bytes(body[3:]), base, len(raw))


class Deframer:
    """Frames (and single-character acknowledgements) out of a byte stream in any split; garbage and bad frames
    reported with stream offsets; bounded (edge_agent/serial/base.py's contract)."""

    max_buffer = 2 * (255 + 6)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0
        self._junk = JunkRun(64, "bytes outside an M-Bus frame", blank=b"")

    def feed(self, data: bytes) -> list[Frame | Rejected]:
        self._buf += data
        events: list[Frame | Rejected] = []
        buf = self._buf
        pos = 0
        while pos < len(buf):
            b = buf[pos]
            if b == ACK:
                self._junk.end(events)
                events.append(Frame("ack", offset=self._base + pos, length=1))
                pos += 1
                continue
            if b == SHORT_START:
                if len(buf) - pos < 5:
                    break
                candidate = bytes(buf[pos:pos + 5])
                if candidate[4] == END and candidate[3] == (candidate[1] + candidate[2]) & 0xFF:
                    self._junk.end(events)
                    events.append(parse(candidate, base=self._base + pos))
                    pos += 5
                    continue
            elif b == LONG_START:
                if len(buf) - pos < 4:
                    break
                if buf[pos + 3] == LONG_START and buf[pos + 1] == buf[pos + 2] and buf[pos + 1] >= 3:
                    total = buf[pos + 1] + 6
                    if len(buf) - pos < total:
                        break
                    self._junk.end(events)
                    try:
                        events.append(parse(bytes(buf[pos:pos + total]), base=self._base + pos))
                    except FrameError as exc:
                        events.append(Rejected(self._base + pos, exc.reason, exc.detail, total))
                        pos += 1
                        continue
                    pos += total
                    continue
            self._junk.add(buf, pos, pos + 1, self._base, events)
            pos += 1
        del buf[:pos]
        self._base += pos
        if len(buf) > self.max_buffer:
            drop = len(buf) - self.max_buffer
            self._junk.add(buf, 0, drop, self._base, events)
            del buf[:drop]
            self._base += drop
        return events

    def flush(self) -> list[Frame | Rejected]:
        events: list[Frame | Rejected] = []
        self._junk.end(events)
        if self._buf:
            events.append(Rejected(self._base, "incomplete", f"{len(self._buf)} bytes of an unfinished frame",
                                   len(self._buf)))
            self._base += len(self._buf)
            self._buf.clear()
        return events
