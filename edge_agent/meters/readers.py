"""How the bus owner reads a DL/T 645, CJ/T 188 or M-Bus meter: a fresh sans-IO session for each poll, and what
its result means - a Sample, the errors of the poll, whether the meter was silent (the bus owner backs off a
silent meter, not the others). Pure: the bus engine (edge_agent/modbus/bus.py) drives the session over the bus's
port (edge_agent/serial/dialogue.py run_session, SerialTransport.line()).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.cjt188.session import Cjt188Session
from edge_agent.dlt645.identifiers import table
from edge_agent.dlt645.session import Dlt645Session
from edge_agent.mbus.session import MbusSession
from edge_agent.meters.config import Cjt188Device, Dlt645Device, MbusDevice, MeterDevice
from edge_agent.serial.base import Rejected, Sample
from edge_agent.serial.dialogue import Session


@dataclass
class MeterResult:
    sample: Sample | None  # None: nothing usable
    errors: list[str] = field(default_factory=list)  # what went wrong, for the device's last_error
    failed: int = 0  # how many of those are errors (an identifier the meter says it lacks is not one)
    silent: bool = False  # the meter did not answer at all
    rejected: list[Rejected] = field(default_factory=list)  # frames on the line that were not its answer


class MeterReader(Protocol):
    protocol: str  # the device's "protocol" tag

    def describe(self) -> str: ...

    def session(self) -> Session: ...

    def result(self, session: Any) -> MeterResult: ...


def _measured(sample: Sample | None, measurement: str | None, tags: dict[str, str] | None = None) -> Sample | None:
    if sample is None:
        return None
    return dataclasses.replace(sample, measurement=measurement or sample.measurement,
                               tags={**sample.tags, **(tags or {})})


class Dlt645Reader:
    def __init__(self, device: Dlt645Device, baud: int) -> None:
        self.device = device
        self.baud = baud
        self.identifiers = device.reads()
        self.measurement = device.measurement or table(device.edition).measurement
        self.protocol = f"dlt645-{device.edition}"

    def describe(self) -> str:
        return f"DL/T 645-{self.device.edition} meter {self.device.address}"

    def session(self) -> Dlt645Session:
        return Dlt645Session(self.device.address, self.device.edition, self.identifiers, baud=self.baud)

    def result(self, session: Dlt645Session) -> MeterResult:
        r = session.result
        failed = sum(1 for q in r.quality.values() if q == "error")
        return MeterResult(session.sample(self.measurement, {}), list(r.errors), failed, r.silent,
                           list(session.rejected))


class Cjt188Reader:
    protocol = "cjt188"

    def __init__(self, device: Cjt188Device, baud: int) -> None:
        self.device = device
        self.baud = baud

    def describe(self) -> str:
        return f"CJ/T 188 meter {self.device.type_byte():02X}H {self.device.address}"

    def session(self) -> Cjt188Session:
        d = self.device
        return Cjt188Session(d.type_byte(), d.address, di_order=d.di_order, unit_first=d.unit_first, baud=self.baud)

    def result(self, session: Cjt188Session) -> MeterResult:
        r = session.result
        errors = [r.error] if r.error else []
        return MeterResult(_measured(session.sample({}), self.device.measurement), errors, len(errors), r.silent,
                           list(session.rejected))


class MbusReader:
    protocol = "mbus"

    def __init__(self, device: MbusDevice, baud: int) -> None:
        self.device = device
        self.baud = baud

    def describe(self) -> str:
        return f"M-Bus meter at {self.device.where}"

    def session(self) -> MbusSession:
        d = self.device
        return MbusSession(primary=d.address, secondary=d.secondary, baud=self.baud, max_telegrams=d.max_telegrams)

    def result(self, session: MbusSession) -> MeterResult:
        r = session.result
        errors = [r.error] if r.error else []
        # the manufacturer's three letters (EN 13757-3 §5.6) tell a technician what answered at this address
        maker = r.telegrams[0].header.manufacturer if r.telegrams else ""
        tags = {"manufacturer": maker} if maker.isalpha() else {}
        return MeterResult(_measured(r.sample({}), self.device.measurement, tags), errors, len(errors), r.silent,
                           list(session.rejected))


def reader_for(device: MeterDevice, baud: int) -> MeterReader:
    if isinstance(device, Dlt645Device):
        return Dlt645Reader(device, baud)
    if isinstance(device, Cjt188Device):
        return Cjt188Reader(device, baud)
    return MbusReader(device, baud)
