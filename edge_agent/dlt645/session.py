"""Reading one DL/T 645 meter: the sans-IO decision of what to send next and what the answers mean.

Events in (bytes from the line, a silence timeout), actions out (`Send`, `Expect`, `Done`: the steps and the
driver of edge_agent/serial/dialogue.py). One poll reads each
configured identifier in turn with its own request (DL/T 645-2007 §7.2, 1997 §6.2): a meter answers one
identifier per request, and an abnormal answer ("no such data") for one identifier costs that field only -
its quality becomes "not_available"; a silent meter ends the poll at the first timeout (the bus owner backs off
that meter, not the others).

Follow-up frames (D5 of the control code, a block longer than one frame) are not requested: every identifier in
the shipped tables fits one frame; a follow-up bit is ignored and the first frame's value used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.dlt645 import frames
from edge_agent.dlt645.identifiers import Identifier, ValueError645, decode_value
from edge_agent.serial.base import Rejected, Sample
from edge_agent.serial.dialogue import Done, Expect, Send, Step, run_session, transmit_s

__all__ = ["Dlt645Session", "PollResult", "run_session"]

# At 2400 baud a byte (8E1: 11 bits) takes 4.6 ms; DL/T 645-2007 §4.1.3 lets a meter take up to 500 ms before it
# answers (Td "≤500ms") and the bytes of a frame must follow each other within 500 ms.
ANSWER_S = 0.5
GAP_S = 0.5


@dataclass
class PollResult:
    fields: dict[str, float | int | str] = field(default_factory=dict)
    quality: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # one line per identifier that failed
    silent: bool = False  # the meter did not answer at all: back off
    transactions: int = 0


class Dlt645Session:
    """One poll of one meter: each identifier read in turn. Pure: see the module docstring."""

    def __init__(self, address: str, edition: frames.Version, identifiers: list[Identifier], *, baud: int = 2400,
                 wake: int = 4) -> None:
        frames.encode_address(address)  # ValueError for a bad address, before anything is sent
        self.address = address
        self.edition = edition
        self.baud = baud
        self.wake = wake
        self._todo = list(identifiers)
        self._current: Identifier | None = None
        self._deframer = frames.Deframer()
        self._sent = False
        self._request_len = 0
        self.result = PollResult()
        self.rejected: list[Rejected] = []
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def next_step(self) -> Step:
        if self._done:
            return Done()
        if self._current is None:
            if not self._todo:
                self._done = True
                return Done()
            self._current = self._todo.pop(0)
            self._deframer = frames.Deframer()  # nothing of a late answer to the previous request is kept
            self._sent = False
        if not self._sent:
            self._sent = True
            request = frames.read_request(self.address, self._current.code, self.edition, wake=self.wake)
            self.result.transactions += 1
            self._request_len = len(request)
            return Send(request)
        # the request still leaving the port, the meter's reaction time, its answer (preamble, header, DI, value)
        answer = self.wake + frames.HEADER_LEN + 2 + frames.DI_LEN[self.edition] + self._current.size
        return Expect(transmit_s(self._request_len + answer, self.baud) + ANSWER_S)

    def feed(self, data: bytes) -> None:
        """Bytes from the line (any split). Completes the current identifier when its answer is whole."""
        if self._done or self._current is None or not self._sent:
            return
        for event in self._deframer.feed(data):
            if isinstance(event, Rejected):
                self.rejected.append(event)
                continue
            if not event.from_meter:
                continue  # our own request echoed by a half-duplex converter
            if self._answer(event):
                return

    def timeout(self) -> None:
        """Silence for the Expect's timeout: the meter did not answer this identifier."""
        if self._done or self._current is None:
            return
        ident = self._current
        self.rejected += [e for e in self._deframer.flush() if isinstance(e, Rejected)]
        self.result.errors.append(f"{ident.di} ({ident.name}): no answer from meter {self.address} within the "
                                  f"timeout")
        if not self.result.fields and not self.result.quality:
            # nothing from this meter in this poll: it is silent (or absent); do not spend a timeout per field
            self.result.silent = True
            self._done = True
            return
        self.result.quality[ident.name] = "error"
        self._current = None

    def _answer(self, frame: frames.Frame) -> bool:
        """True when `frame` settled the current identifier; False for a late answer to an earlier request."""
        ident = self._current
        assert ident is not None
        try:
            answer = frames.read_answer(frame, self.address, ident.code, self.edition)
        except frames.FrameError as exc:
            if exc.reason in ("wrong_identifier", "wrong_address"):
                # a late answer to a request that already timed out (or another meter's): keep waiting
                self.rejected.append(Rejected(frame.offset, exc.reason, exc.detail, frame.length))
                return False
            self._current = None
            self.result.quality[ident.name] = "error"
            self.result.errors.append(f"{ident.di} ({ident.name}): {exc}")
            return True
        self._current = None
        if isinstance(answer, frames.Abnormal):
            # the meter has no such data (or refuses it): the field is absent, never a made-up value
            self.result.quality[ident.name] = "not_available"
            self.result.errors.append(f"{ident.di} ({ident.name}): abnormal answer {answer.error:02X} "
                                      f"({answer.describe()})")
            return True
        try:
            value = decode_value(ident, answer.value)
        except ValueError645 as exc:
            self.result.quality[ident.name] = "error"
            self.result.errors.append(str(exc))
            return True
        self.result.fields[ident.name] = value
        if ident.unit:
            self.result.units[ident.name] = ident.unit
        return True

    def sample(self, measurement: str, tags: dict[str, str]) -> Sample | None:
        r = self.result
        if not r.fields and not r.quality:
            return None
        return Sample(dict(r.fields), measurement, None, dict(tags), dict(r.quality), dict(r.units))
