"""Reading one wired M-Bus meter: the sans-IO dialogue (steps and driver: edge_agent/serial/dialogue.py).

    primary address A:     SND_NKE(A) -> E5;  REQ_UD2(A, FCB) -> RSP_UD ...
    secondary address S:   SND_NKE(253) -> E5 (deselect);  SND_UD(253, CI 52H, S) -> E5 (select);
                           REQ_UD2(253, FCB) -> RSP_UD ...

EN 13757-2 §5.7: the FCB (frame count bit) of REQ_UD2 toggles for each next telegram of a multi-telegram answer
(the meter sets DIF 1FH "more records follow" in all but the last); a REQ_UD2 with an unchanged FCB asks for the
last telegram again. The first REQ_UD2 after the link reset goes with FCB set (7BH), the next with it clear.
A missing E5 to SND_NKE is tolerated (several meters do not answer it); a missing RSP_UD ends the poll.
At most `max_telegrams` telegrams are read per poll (a meter that always says "more follows" cannot hold the bus).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.mbus import frames, records
from edge_agent.serial.base import Rejected, Sample
from edge_agent.serial.dialogue import Done, Expect, Send, Step, transmit_s

# EN 13757-2 §5.8: a meter answers within 11 bit times + 50 ms (+ up to 330 bit times); masters wait longer.
ANSWER_S = 0.3


@dataclass
class MbusResult:
    telegrams: list[records.Telegram] = field(default_factory=list)
    error: str = ""
    silent: bool = False

    def sample(self, tags: dict[str, str]) -> Sample | None:
        if not self.telegrams:
            return None
        values: dict[str, float | int | str] = {}
        quality: dict[str, str] = {}
        units: dict[str, str] = {}
        for i, t in enumerate(self.telegrams):
            f, q, u = t.fields()
            suffix = f"_p{i + 1}" if i else ""  # records of the next telegrams keep their own names
            values.update({k + suffix: v for k, v in f.items()})
            quality.update({k + suffix: v for k, v in q.items()})
            units.update({k + suffix: v for k, v in u.items()})
        return Sample(values, self.telegrams[0].measurement, None, dict(tags), quality, units)


class MbusSession:
    def __init__(self, *, primary: int | None = None, secondary: str | None = None, baud: int = 2400,
                 max_telegrams: int = 8, reset: bool = True) -> None:
        if (primary is None) == (secondary is None):
            raise ValueError("an M-Bus meter is read by a primary address or a secondary address, one of them")
        if primary is not None and not 0 <= primary <= 250:
            raise ValueError(f"primary address {primary}: expected 0..250")
        self.address = primary if primary is not None else frames.SELECTED
        self.baud = baud
        self.max_telegrams = max_telegrams
        self._steps: list[tuple[str, bytes]] = []
        if reset:
            self._steps.append(("ack?", frames.snd_nke(self.address)))
        if secondary is not None:
            self._steps.append(("ack", frames.select_secondary(secondary)))
        self._fcb = True
        self._steps.append(("rsp", frames.req_ud2(self.address, self._fcb)))
        self._waiting: str | None = None
        self._last_len = 0
        self._deframer = frames.Deframer()
        self.result = MbusResult()
        self.rejected: list[Rejected] = []
        self._done = False

    def next_step(self) -> Step:
        if self._done:
            return Done()
        if self._waiting is None:
            if not self._steps:
                self._done = True
                return Done()
            self._waiting, data = self._steps.pop(0)
            self._last_len = len(data)
            self._deframer = frames.Deframer()
            return Send(data)
        longest = 1 if self._waiting != "rsp" else 261
        return Expect(transmit_s(self._last_len + longest, self.baud) + ANSWER_S)

    def feed(self, data: bytes) -> None:
        if self._done or self._waiting is None:
            return
        for event in self._deframer.feed(data):
            if isinstance(event, Rejected):
                self.rejected.append(event)
            elif self._waiting in ("ack", "ack?") and event.kind == "ack":
                self._waiting = None
                return
            elif self._waiting == "rsp" and event.kind == "long" and event.control & 0x0F == frames.RSP_UD:
                self._response(event)
                return

    def timeout(self) -> None:
        if self._done or self._waiting is None:
            return
        waiting, self._waiting = self._waiting, None
        if waiting == "ack?":
            return  # no E5 to the link reset: many meters stay silent; go on
        self.result.error = ("no acknowledgement of the secondary address selection" if waiting == "ack" else
                             f"no answer to REQ_UD2 (telegram {len(self.result.telegrams) + 1})")
        self.result.silent = not self.result.telegrams
        self._done = True

    def _response(self, frame: frames.Frame) -> None:
        self._waiting = None
        try:
            telegram = records.decode(frame.ci, frame.data)
        except records.TelegramError as exc:
            self.result.error = f"telegram {len(self.result.telegrams) + 1}: {exc}"
            self._done = True
            return
        self.result.telegrams.append(telegram)
        if telegram.more_follows and len(self.result.telegrams) < self.max_telegrams:
            self._fcb = not self._fcb
            self._steps.append(("rsp", frames.req_ud2(self.address, self._fcb)))
        elif telegram.more_follows:
            self.result.error = f"more than {self.max_telegrams} telegrams: the rest not read"
