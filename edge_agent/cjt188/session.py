"""Reading one CJ/T 188 meter: one "read metering data" (901F) request, one answer. Pure; the steps and the
driver are edge_agent/serial/dialogue.py's.

A meter that does not answer costs one timeout (the bus owner backs it off); an abnormal answer, or an answer
that does not decode, is an error of this poll with the reason and byte named; nothing is made up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.cjt188 import frames
from edge_agent.serial.base import Rejected, Sample
from edge_agent.serial.dialogue import Done, Expect, Send, Step, transmit_s

ANSWER_S = 0.5  # the meter's reaction time allowed, as for DL/T 645 (CJ/T 188 names no figure of its own)


@dataclass
class MeterResult:
    measurement: str = ""
    fields: dict[str, float | int | bool | str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    error: str = ""
    silent: bool = False


class Cjt188Session:
    def __init__(self, meter_type: int, address: str, *, di_order: frames.DiOrder = "low_first",
                 unit_first: bool = False, baud: int = 2400, wake: int = 4, ser: int = 0) -> None:
        if meter_type not in frames.METER_TYPES:
            raise ValueError(f"meter type {meter_type:02X}H: expected one of "
                             f"{', '.join(f'{t:02X}H' for t in frames.METER_TYPES)}")
        self.meter_type = meter_type
        self.address = frames.decode_address(frames.encode_address(address))
        self.unit_first = unit_first
        self.baud = baud
        self._request = frames.read_request(meter_type, address, order=di_order, wake=wake, ser=ser)
        self._deframer = frames.Deframer()
        self._sent = False
        self._done = False
        self.result = MeterResult()
        self.rejected: list[Rejected] = []

    def next_step(self) -> Step:
        if self._done:
            return Done()
        if not self._sent:
            self._sent = True
            return Send(self._request)
        # request on the wire, reaction time, the longest answer (a heat meter's: 4 FE + 11 + 46 + 2 bytes)
        return Expect(transmit_s(len(self._request) + 63, self.baud) + ANSWER_S)

    def feed(self, data: bytes) -> None:
        if self._done or not self._sent:
            return
        for event in self._deframer.feed(data):
            if isinstance(event, Rejected):
                self.rejected.append(event)
            elif event.from_meter and event.address == self.address:
                self._answer(event)
                return

    def timeout(self) -> None:
        if self._done:
            return
        self.rejected += [e for e in self._deframer.flush() if isinstance(e, Rejected)]
        self.result.error = f"no answer from meter {self.address} within the timeout"
        self.result.silent = True
        self._done = True

    def _answer(self, frame: frames.Frame) -> None:
        self._done = True
        if frame.abnormal:
            self.result.error = (f"abnormal answer (control {frame.control:02X}, status "
                                 f"{frame.data.hex(' ') or 'none'})")
            return
        if frame.function != frames.READ_DATA:
            self.result.error = f"answer with control code {frame.control:02X}, expected 81"
            return
        try:
            m = frames.metering(frame, unit_first=self.unit_first)
        except frames.FrameError as exc:
            self.result.error = str(exc)
            return
        self.result.measurement, self.result.fields, self.result.units = m.measurement, m.fields, m.units

    def sample(self, tags: dict[str, str]) -> Sample | None:
        r = self.result
        if not r.fields:
            return None
        return Sample(dict(r.fields), r.measurement, None, dict(tags), {}, dict(r.units))
