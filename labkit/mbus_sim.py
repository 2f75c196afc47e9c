"""A simulated wired M-Bus meter (EN 13757-2/-3) answering with real telegrams (the libmbus suite,
labkit/mbus_suite.py): E5 to SND_NKE and to its secondary address selection, RSP_UD to REQ_UD2, a multi-telegram
answer when given several telegrams (the FCB toggles to get the next; an unchanged FCB repeats the last). Meters
that answer at once collide as on a real bus (labkit.serial_devices.collide): several selected by a wildcard all
acknowledge (one E5 is heard), their RSP_UDs garble each other.
`MbusMeters.answer(request)` is pure; `MbusLine` puts it on a pty."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.mbus import frames, records
from labkit.serial_devices import QueryDevice, collide


@dataclass
class SimMeter:
    primary: int
    telegrams: list[bytes]  # whole RSP_UD frames (68 L L 68 08 A CI ... 16), in order
    answers_reset: bool = True
    selected: bool = False
    next_index: int = 0
    last_fcb: bool | None = None
    requests: list[int] = field(default_factory=list)

    @property
    def secondary(self) -> str:
        first = frames.parse(self.telegrams[0])
        return records.parse_header(first.ci, first.data)[0].secondary_address


def _readdressed(telegram: bytes, address: int) -> bytes:
    f = frames.parse(telegram)
    return frames.long_frame(f.control, address, f.ci, f.data)


def _matches(pattern: bytes, secondary: str) -> bool:
    """EN 13757-3 §11.3: F nibbles in the selection are wildcards."""
    want = frames.select_secondary(secondary)[7:15]
    for p, w in zip(pattern, want, strict=True):
        for shift in (0, 4):
            pn = (p >> shift) & 0xF
            if pn != 0xF and pn != (w >> shift) & 0xF:
                return False
    return True


class MbusMeters:
    def __init__(self, meters: list[SimMeter]) -> None:
        self.meters = meters
        self.deframer = frames.Deframer()

    def answer(self, data: bytes) -> bytes | None:
        out = b""
        for event in self.deframer.feed(data):
            if isinstance(event, frames.Frame):
                out += self._one(event) or b""
        return out or None

    def _one(self, f: frames.Frame) -> bytes | None:
        if f.kind == "short" and f.control == frames.SND_NKE:
            targets = [m for m in self.meters if m.primary == f.address or
                       (f.address == frames.SELECTED and m.selected)]
            if f.address == frames.SELECTED:
                for m in self.meters:
                    m.selected = False  # SND_NKE to 253 deselects
            for m in targets:
                m.next_index, m.last_fcb = 0, None
            return bytes([frames.ACK]) if any(m.answers_reset for m in targets) else None
        if f.kind == "long" and f.ci == frames.CI_SELECT and f.address == frames.SELECTED:
            hits = [m for m in self.meters if _matches(f.data, m.secondary)]
            for m in self.meters:
                m.selected = m in hits
            # every selected meter acknowledges: identical E5s on the bus are heard as one E5
            return bytes([frames.ACK]) if hits else None
        if f.kind == "short" and f.control & 0xDF == frames.REQ_UD2:
            meters = [m for m in self.meters if m.primary == f.address or
                      (f.address == frames.SELECTED and m.selected)]
            return collide([self._telegram(m, f.control) for m in meters]) or None
        return None

    @staticmethod
    def _telegram(meter: SimMeter, control: int) -> bytes:
        fcb = bool(control & frames.FCB)
        meter.requests.append(control)
        if meter.last_fcb is not None and fcb == meter.last_fcb:
            index = max(0, meter.next_index - 1)  # the master did not get the last one: repeat it
        else:
            index = meter.next_index
            meter.next_index = (meter.next_index + 1) % len(meter.telegrams)
        meter.last_fcb = fcb
        return _readdressed(meter.telegrams[index], meter.primary)


class MbusLine:
    def __init__(self, meters: list[SimMeter]) -> None:
        self.meters = MbusMeters(meters)
        self.query = QueryDevice(self.meters.answer)

    @property
    def device(self) -> str:
        return self.query.device

    def close(self) -> None:
        self.query.close()
