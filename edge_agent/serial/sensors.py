"""Binary air-quality sensors on a UART: Nova SDS011, Plantower PMS x003, Winsen MH-Z19B. Pure decoding.

Each is a fixed-layout frame that starts with a sync byte and carries a checksum. One framer serves all three:

- it looks for the sync byte, lets the sensor's `_examine` say whether a frame starts there, and skips (and
  reports as "garbage") whatever cannot start one;
- a frame that fails its checks is rejected ("checksum", "malformed", "unsupported") and the search resumes
  ONE byte after its start, not after its end: a sync byte inside line noise must not swallow the real frame
  that follows it. Bytes of a rejected frame are not reported a second time as garbage;
- the buffer never holds more than one frame (`max_buffer`); garbage runs are reported in pieces of at most
  `GARBAGE_REPORT` bytes, so a stream of junk (a wrong baud rate) is visible without holding anything back.

Events depend only on the bytes, never on how they were split into feeds.

Physical quantities are floats for every model (PM2.5 of an SDS011 is 0.1 µg/m³ resolution, of a PMS 1 µg/m³),
so a field never changes type inside the shared "air_quality" measurement; codes are integers. Names and units are
the shared vocabulary's (wire/vocabulary.toml); particle counts are per litre (the PMS counts per 0.1 L, x 10).
"""

from __future__ import annotations

from typing import ClassVar, Final

from edge_agent.serial.base import Event, Rejected, Sample

GARBAGE_REPORT: Final = 256  # longest run of garbage held before it is reported
_PREVIEW: Final = 8  # bytes of a rejected run shown in its detail

_NOT_START: Final = object()  # _examine: no frame starts at this sync byte
_Verdict = tuple[int, Event] | object | None  # None: need more bytes


def _hex(data: bytes | bytearray | memoryview) -> str:
    return bytes(data).hex(" ")


class _FrameDecoder:
    """The framer. Subclasses set SYNC, max_buffer, FIELDS and `_examine`."""

    SYNC: int
    max_buffer: int
    FIELDS: ClassVar[dict[str, str]]  # {field: unit} a frame can give: the data catalogue (docs/catalog.md)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._quiet_until = 0  # bytes before this offset belong to a reported frame: not garbage
        self._junk_start = 0  # the garbage run being collected: stream offset, length, first bytes
        self._junk_len = 0
        self._junk_preview = b""

    def _examine(self, frame: bytearray, start: int, offset: int) -> _Verdict:
        """Is there a frame at frame[start] (a sync byte)? None: not enough bytes to tell; _NOT_START; or
        (length, event): a Sample, or a Rejected covering the bytes it judged."""
        raise NotImplementedError

    def feed(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        buf = self._buf
        buf += data
        pos = 0
        while True:
            start = buf.find(self.SYNC, pos)
            if start < 0:
                self._junk(out, buf, pos, len(buf))
                pos = len(buf)
                break
            self._junk(out, buf, pos, start)
            verdict = self._examine(buf, start, self._base + start)
            if verdict is None:  # a frame may start here: wait for more bytes
                pos = start
                break
            if verdict is _NOT_START:
                self._junk(out, buf, start, start + 1)
                pos = start + 1
                continue
            length, event = verdict  # type: ignore[misc]
            self._report_junk(out)
            out.append(event)
            if isinstance(event, Rejected):
                self._quiet_until = max(self._quiet_until, event.offset + event.length)
                pos = start + 1
            else:
                pos = start + length
        del buf[:pos]
        self._base += pos
        return out

    def flush(self) -> list[Event]:
        out: list[Event] = []
        self._report_junk(out)
        if self._buf:
            rest = self._buf
            offset = self._base
            skip = max(0, min(len(rest), self._quiet_until - offset))  # inside a frame already rejected
            if skip < len(rest):
                out.append(Rejected(offset + skip, "incomplete",
                                    f"stream ended inside a frame: {_hex(rest[skip:skip + _PREVIEW])}",
                                    len(rest) - skip))
            self._base += len(rest)
            rest.clear()
        return out

    # -- garbage runs ----------------------------------------------------------------------------------------

    def _junk(self, out: list[Event], buf: bytearray, a: int, b: int) -> None:
        """buf[a:b] cannot start a frame: add it to the garbage run (minus what a rejected frame covered)."""
        a = max(a, min(b, self._quiet_until - self._base))
        while a < b:
            if self._junk_len == 0:
                self._junk_start = self._base + a
                self._junk_preview = b""
            take = min(b - a, GARBAGE_REPORT - self._junk_len)
            if len(self._junk_preview) < _PREVIEW:
                self._junk_preview += bytes(buf[a:a + min(take, _PREVIEW - len(self._junk_preview))])
            self._junk_len += take
            a += take
            if self._junk_len >= GARBAGE_REPORT:
                self._report_junk(out)

    def _report_junk(self, out: list[Event]) -> None:
        if self._junk_len:
            more = " ..." if self._junk_len > len(self._junk_preview) else ""
            out.append(Rejected(self._junk_start, "garbage", f"no frame start: {_hex(self._junk_preview)}{more}",
                                self._junk_len))
            self._junk_len = 0


# --- Nova SDS011 ------------------------------------------------------------------------------------------------

SDS011_FRAME: Final = 10
_SDS_DATA: Final = 0xC0  # measurement
_SDS_REPLY: Final = 0xC5  # reply to a configuration command


class Sds011Decoder(_FrameDecoder):
    """Nova SDS011 (and SDS01x): `AA C0 PM25lo PM25hi PM10lo PM10hi ID1 ID2 CS AB`, 9600 8N1, one frame a second.

    CS is the low byte of the sum of the six data bytes. Values are 0.1 µg/m³ steps. `AA C5` frames (answers to
    configuration commands) are recognised and reported as "unsupported".
    """

    SYNC = 0xAA
    max_buffer = SDS011_FRAME
    FIELDS: ClassVar[dict[str, str]] = {"pm2_5": "µg/m³", "pm10": "µg/m³"}

    def _examine(self, buf: bytearray, start: int, offset: int) -> _Verdict:
        have = len(buf) - start
        if have >= 2 and buf[start + 1] not in (_SDS_DATA, _SDS_REPLY):
            return _NOT_START
        if have < SDS011_FRAME:
            return None
        frame = bytes(buf[start:start + SDS011_FRAME])
        if frame[9] != 0xAB:
            return SDS011_FRAME, Rejected(offset, "malformed", f"tail byte 0x{frame[9]:02X}, not 0xAB: {_hex(frame)}",
                                          SDS011_FRAME)
        checksum = sum(frame[2:8]) & 0xFF
        if checksum != frame[8]:
            return SDS011_FRAME, Rejected(offset, "checksum",
                                          f"checksum 0x{frame[8]:02X}, computed 0x{checksum:02X}: {_hex(frame)}",
                                          SDS011_FRAME)
        if frame[1] == _SDS_REPLY:
            return SDS011_FRAME, Rejected(offset, "unsupported",
                                          f"reply to a configuration command (AA C5): {_hex(frame)}", SDS011_FRAME)
        return SDS011_FRAME, Sample(
            fields={"pm2_5": (frame[2] | frame[3] << 8) / 10, "pm10": (frame[4] | frame[5] << 8) / 10},
            tags={"sensor_id": f"{frame[6]:02X}{frame[7]:02X}"},
            units={"pm2_5": "µg/m³", "pm10": "µg/m³"},
        )


# --- Plantower PMS x003 ----------------------------------------------------------------------------------------

PMSX003_FRAME: Final = 32
_PMS_LENGTH: Final = 0x1C  # 13 data words + the checksum word
_PMS_MAX_LENGTH: Final = 0x40  # longer "frames" are noise: do not wait for them
_PMS_FIELDS: Final = (
    # (field, unit, factor into the vocabulary's unit) of data words 1..12, big-endian uint16
    ("pm1_0_cf1", "µg/m³", 1), ("pm2_5_cf1", "µg/m³", 1), ("pm10_cf1", "µg/m³", 1),  # CF=1, "standard particle"
    ("pm1_0", "µg/m³", 1), ("pm2_5", "µg/m³", 1), ("pm10", "µg/m³", 1),  # atmospheric environment
    # particles larger than x µm: the sensor counts them in 0.1 L of air, the vocabulary per litre
    ("particles_0_3", "1/L", 10), ("particles_0_5", "1/L", 10), ("particles_1_0", "1/L", 10),
    ("particles_2_5", "1/L", 10), ("particles_5_0", "1/L", 10), ("particles_10", "1/L", 10),
)


class PmsX003Decoder(_FrameDecoder):
    """Plantower PMS1003/3003/5003/6003/7003/A003, active mode: `42 4D 00 1C` + 13 data words + checksum word.

    The checksum is the 16-bit sum of every byte before it. The frame-length word is checked, so a frame of
    another length (PMS3003's 24-byte frames, PMS5003ST's 40-byte ones) with a good checksum is "unsupported",
    never mis-decoded. Data word 13 is "reserved" in the PMS5003 datasheet and "version (high byte), error code
    (low byte)" in others: it is reported as tag `version` and field `error_code`, as is.
    """

    SYNC = 0x42
    max_buffer = 4 + _PMS_MAX_LENGTH
    FIELDS: ClassVar[dict[str, str]] = {**{name: unit for name, unit, _ in _PMS_FIELDS}, "error_code": ""}

    def _examine(self, buf: bytearray, start: int, offset: int) -> _Verdict:
        have = len(buf) - start
        if have >= 2 and buf[start + 1] != 0x4D:
            return _NOT_START
        if have < 4:
            return None
        length = buf[start + 2] << 8 | buf[start + 3]
        if length < 2 or length % 2 or length > _PMS_MAX_LENGTH:
            return 4, Rejected(offset, "malformed", f"frame length 0x{length:04X}: {_hex(buf[start:start + 4])}", 4)
        size = 4 + length
        if have < size:
            return None
        frame = bytes(buf[start:start + size])
        stated = frame[-2] << 8 | frame[-1]
        checksum = sum(frame[:-2]) & 0xFFFF
        if stated != checksum:
            return size, Rejected(offset, "checksum", f"checksum 0x{stated:04X}, computed 0x{checksum:04X}: "
                                  f"{_hex(frame[:_PREVIEW])} ...", size)
        if length != _PMS_LENGTH:
            return size, Rejected(offset, "unsupported", f"a {size}-byte frame (length word 0x{length:04X}); "
                                  "only the 32-byte PMS x003 frame is decoded", size)
        words = [frame[i] << 8 | frame[i + 1] for i in range(4, 30, 2)]
        fields: dict[str, float | int] = {}
        for (name, _unit, factor), word in zip(_PMS_FIELDS, words, strict=False):
            fields[name] = float(word * factor)
        fields["error_code"] = words[12] & 0xFF
        return size, Sample(
            fields=fields,
            tags={"version": f"{words[12] >> 8:02X}"},
            units={name: unit for name, unit, _ in _PMS_FIELDS},
        )


# --- Winsen MH-Z19B ---------------------------------------------------------------------------------------------

MHZ19B_FRAME: Final = 9


def mhz19b_checksum(frame: bytes) -> int:
    """Of a 9-byte MH-Z19B command or answer: the two's complement of the sum of bytes 1..7."""
    return (0xFF - (sum(frame[1:8]) & 0xFF) + 1) & 0xFF


def mhz19b_command(command: int, data: bytes = b"\x00" * 5) -> bytes:
    """A command to sensor 1: `FF 01 <command> <5 data bytes> <checksum>`."""
    if len(data) != 5:
        raise ValueError("an MH-Z19B command carries 5 data bytes")
    frame = bytes([0xFF, 0x01, command]) + data
    return frame + bytes([mhz19b_checksum(frame)])


MHZ19B_QUERY: Final = mhz19b_command(0x86)  # "read CO2 concentration": FF 01 86 00 00 00 00 00 79


class Mhz19bDecoder(_FrameDecoder):
    """Winsen MH-Z19B answers to MHZ19B_QUERY: `FF 86 HH LL TT SS U1 U2 CS`, 9600 8N1.

    CO2 = HH*256 + LL ppm. TT - 40 is a temperature in °C that Winsen does not document (it is the sensor's
    internal temperature, coarse and offset by self-heating): reported as field `temperature` for diagnosis,
    not as an air temperature. SS, U1, U2 are undocumented and not reported. Only 0x86 answers are frames;
    anything else (including an echo of the query itself) is garbage.
    """

    SYNC = 0xFF
    max_buffer = MHZ19B_FRAME
    FIELDS: ClassVar[dict[str, str]] = {"co2": "ppm", "temperature": "°C"}

    def _examine(self, buf: bytearray, start: int, offset: int) -> _Verdict:
        have = len(buf) - start
        if have >= 2 and buf[start + 1] != 0x86:
            return _NOT_START
        if have < MHZ19B_FRAME:
            return None
        frame = bytes(buf[start:start + MHZ19B_FRAME])
        checksum = mhz19b_checksum(frame)
        if checksum != frame[8]:
            return MHZ19B_FRAME, Rejected(offset, "checksum",
                                          f"checksum 0x{frame[8]:02X}, computed 0x{checksum:02X}: {_hex(frame)}",
                                          MHZ19B_FRAME)
        return MHZ19B_FRAME, Sample(
            fields={"co2": float(frame[2] << 8 | frame[3]), "temperature": float(frame[4] - 40)},
            units={"co2": "ppm", "temperature": "°C"},
        )


DECODERS: Final[dict[str, type[_FrameDecoder]]] = {
    "sds011": Sds011Decoder,
    "pmsx003": PmsX003Decoder,
    "mhz19b": Mhz19bDecoder,
}
