"""A writable point: what an operator's value must satisfy and how it becomes a Modbus write. Pure, no I/O.

Built once at start-up from a profile point that says `writable = true` (edge_agent/profiles.py) for each point
a device opted in to (`writable = [...]` in agent.toml). The bus engine (edge_agent/modbus/bus.py) sends
`request(words)`, checks the answer with `frames.check_write_response` and reads the point back with
`readback()` and `decode` - the same decoder the polls use, so the value reported is the value a poll reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_agent.modbus import frames
from edge_agent.modbus.decode import Decoder, Encoder, NotRepresentable, Value
from edge_agent.modbus.plan import ReadRequest
from wire.control import ControlReason, ControlRefused

#: (value - min) / step within this of a whole number is on the step: 0.3 / 0.1 is 2.9999999999999996.
_STEP_TOLERANCE = 1e-9


@dataclass(frozen=True)
class WritePoint:
    name: str
    table: str  # "holding" or "coil"
    address: int
    width: int  # registers (holding) or bits (coil)
    function: int  # frames.WRITE_SINGLE_COIL, ..._REGISTER, WRITE_MULTIPLE_COILS, ..._REGISTERS
    type: str
    encode: Encoder  # decode.make_encoder: engineering value -> registers
    decode: Decoder  # decode.make_decoder: registers -> engineering value (the read-back)
    minimum: float | None = None  # engineering units; None for a coil
    maximum: float | None = None
    step: float | None = None
    critical: bool = False  # two different operators must sign (wire/control.py Trust.verify required=2)
    unit: str = ""

    def describe(self) -> str:
        return f"{self.name} ({self.table} 0x{self.address:04X}+{self.width}, {frames.WRITE_FUNCTIONS[self.function]})"

    def registers_for(self, value: Value | None) -> list[int]:
        """The registers (or bit) to write for `value`, once it is allowed: raises ControlRefused(out_of_range)
        naming the rule it breaks (range, step, a number the registers cannot hold)."""
        if self.table == "coil":
            if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
                raise ControlRefused(ControlReason.OUT_OF_RANGE, f"{self.name} is a coil: true or false, not {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ControlRefused(ControlReason.OUT_OF_RANGE, f"{self.name} takes a number, not {value!r}")
            assert self.minimum is not None and self.maximum is not None  # a writable register has both (profiles)
            if not self.minimum <= value <= self.maximum:
                raise ControlRefused(ControlReason.OUT_OF_RANGE, f"{value:g}{_unit(self.unit)} is outside {self.name}'s "
                                                                 f"range {self.minimum:g}..{self.maximum:g}")
            if self.step is not None:
                steps = (value - self.minimum) / self.step
                if abs(steps - round(steps)) > _STEP_TOLERANCE * max(1.0, abs(steps)):
                    raise ControlRefused(ControlReason.OUT_OF_RANGE, f"{value:g} is not on {self.name}'s step of "
                                                                     f"{self.step:g} from {self.minimum:g}")
        try:
            return self.encode(value)  # type: ignore[arg-type]
        except NotRepresentable as exc:
            raise ControlRefused(ControlReason.OUT_OF_RANGE, f"{self.name}: {exc}") from None

    def request(self, words: list[int]) -> bytes:
        """The write request PDU for registers_for()'s result."""
        return frames.write_request(self.function, self.address, words)

    def readback(self) -> ReadRequest:
        """The read of exactly this point, to learn what the device holds after the write."""
        return ReadRequest(self.table, self.address, self.width, ())


def _unit(unit: str) -> str:
    return f" {unit}" if unit else ""
