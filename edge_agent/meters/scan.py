"""Finding DL/T 645, CJ/T 188 and M-Bus meters on a line (`edge-agent scan --protocol ...`): the probes and the
M-Bus secondary search, pure (steps of edge_agent/serial/dialogue.py; the driver is edge_agent/technician.py).

Every probe is one request and the first frame that answers it (`OneShot`), with what else came on the line:
bytes that frame nothing are a collision (several meters answering at once) or a wrong line setting, never a
meter. Each probe waits one answer time at most, so a scan's length is bounded by the number of probes, which
the caller chooses and reports. An address learnt from an answer to a wildcard is confirmed by asking that
address alone before it is reported: the answers of colliding meters can merge into a frame whose checksum
happens to fit, naming a meter that does not exist.

- DL/T 645: the read-address request to the wildcard address (DL/T 645-2007 §7.1, control 13H; only when one
  meter is on the line: several garble each other), a DL/T 645-1997 read of the total energy (9010) to the
  wildcard address (answered by some 1997 meters when alone on the line; the standard has no read-address
  command), and a read of the total energy at each address to try (2007 first, then 1997): an abnormal answer
  is an answer too.
- CJ/T 188: a read of the metering data (901F) to the wildcard address AAAAAAAAAAAAAA, per meter type; meters
  that answer it (not all do) give their address.
- M-Bus primary: SND_NKE to each address, and where a meter acknowledges it (E5), REQ_UD2 for its secondary
  address, manufacturer and medium (EN 13757-2 §5). A meter that does not acknowledge SND_NKE is not found this
  way (the secondary search finds it).
- M-Bus secondary: `SecondarySearch`, EN 13757-3 §11.3 wildcard narrowing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.cjt188 import frames as cjt
from edge_agent.dlt645 import frames as dlt
from edge_agent.dlt645.session import ANSWER_S as DLT645_ANSWER_S
from edge_agent.mbus import frames as mbus
from edge_agent.mbus import records
from edge_agent.mbus.session import ANSWER_S as MBUS_ANSWER_S
from edge_agent.serial.base import Rejected
from edge_agent.serial.dialogue import Done, Expect, Send, Step, transmit_s

CJT188_ANSWER_S = 0.5  # edge_agent/cjt188/session.py: the reaction time allowed


class _Deframer(Protocol):
    def feed(self, data: bytes) -> list[Any]: ...

    def flush(self) -> list[Any]: ...


@dataclass
class Probe:
    answer: Any = None  # what `accept` made of the frame that answered; None: no answer
    garbled: list[Rejected] = field(default_factory=list)  # bytes that framed nothing, frames with bad checksums

    @property
    def collision(self) -> bool:
        """No answer, but bytes on the line: several meters answered at once (or the line settings are wrong)."""
        return self.answer is None and bool(self.garbled)


class OneShot:
    """One request; the first frame `accept` turns into something (not None) answers it. Pure."""

    def __init__(self, request: bytes, deframer: _Deframer, accept: Callable[[Any], Any], *, answer_bytes: int,
                 baud: int, answer_s: float) -> None:
        self.request = request
        self._deframer = deframer
        self._accept = accept
        self._wait = transmit_s(len(request) + answer_bytes, baud) + answer_s
        self._sent = False
        self._done = False
        self.result = Probe()

    def next_step(self) -> Step:
        if self._done:
            return Done()
        if not self._sent:
            self._sent = True
            return Send(self.request)
        return Expect(self._wait)

    def feed(self, data: bytes) -> None:
        if self._done or not self._sent:
            return
        for event in self._deframer.feed(data):
            if isinstance(event, Rejected):
                self.result.garbled.append(event)
                continue
            answer = self._accept(event)
            if answer is not None:
                self.result.answer = answer
                self._done = True
                return

    def timeout(self) -> None:
        if self._done:
            return
        self.result.garbled += [e for e in self._deframer.flush() if isinstance(e, Rejected)]
        self._done = True


# -- DL/T 645 -----------------------------------------------------------------------------------------------------

DLT645_ENERGY = {"2007": 0x00010000, "1997": 0x9010}  # forward active energy, total: every meter has it
_DLT645_ANSWER = 4 + dlt.HEADER_LEN + 2 + 4 + 4  # preamble, header, CS 16, DI, value (the longest of both)


def dlt645_read_address(baud: int, answer_s: float = DLT645_ANSWER_S) -> OneShot:
    """2007 §7.1: read the communication address (13H) at the wildcard address; the answer (93H) holds it."""
    def accept(frame: dlt.Frame) -> str | None:
        return dlt.address_answer(frame) if frame.from_meter and frame.function == dlt.READ_ADDRESS else None

    return OneShot(dlt.read_address_request(), dlt.Deframer(), accept, answer_bytes=4 + dlt.HEADER_LEN + 2 + 6,
                   baud=baud, answer_s=answer_s)


def dlt645_read(address: str, edition: dlt.Version, baud: int, answer_s: float = DLT645_ANSWER_S) -> OneShot:
    """A read of the total energy at `address` (or the wildcard); answers with the meter's own address (normal or
    abnormal answer: either says a meter of this edition is there)."""
    read = dlt.READ[edition]

    def accept(frame: dlt.Frame) -> str | None:
        if not frame.from_meter or frame.function != read:
            return None  # our own request echoed by a half-duplex converter
        if address.upper() != dlt.WILDCARD_ADDRESS and frame.address != dlt.decode_address(dlt.encode_address(address)):
            return None
        return frame.address

    return OneShot(dlt.read_request(address, DLT645_ENERGY[edition], edition), dlt.Deframer(), accept,
                   answer_bytes=_DLT645_ANSWER, baud=baud, answer_s=answer_s)


# -- CJ/T 188 -----------------------------------------------------------------------------------------------------


def cjt188_read(meter_type: int, baud: int, address: str = cjt.WILDCARD_ADDRESS,
                answer_s: float = CJT188_ANSWER_S) -> OneShot:
    """Read the metering data (901F) at `address`, by default the wildcard address: a meter of this type that
    answers it names its address (tuple: address, type)."""
    wanted = cjt.decode_address(cjt.encode_address(address))

    def accept(frame: cjt.Frame) -> tuple[str, int] | None:
        if not frame.from_meter or frame.meter_type != meter_type:
            return None
        if wanted != cjt.WILDCARD_ADDRESS and frame.address != wanted:
            return None
        return frame.address, frame.meter_type

    return OneShot(cjt.read_request(meter_type, address), cjt.Deframer(), accept, answer_bytes=63, baud=baud,
                   answer_s=answer_s)


# -- M-Bus ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MbusIdentity:
    """What a meter's RSP_UD header says of it (EN 13757-3 §5)."""

    secondary: str  # 16 hex digits: what a secondary selection names it by
    manufacturer: str
    medium: str
    primary: int  # the address it answered from


def mbus_ack(request: bytes, baud: int, answer_s: float = MBUS_ANSWER_S) -> OneShot:
    """A request a meter acknowledges with E5 (SND_NKE, a secondary address selection)."""
    return OneShot(request, mbus.Deframer(), lambda frame: True if frame.kind == "ack" else None, answer_bytes=1,
                   baud=baud, answer_s=answer_s)


def mbus_identify(address: int, baud: int, answer_s: float = MBUS_ANSWER_S) -> OneShot:
    """REQ_UD2 to `address`; the RSP_UD's header names the meter. A telegram whose records do not decode still has
    its header (it is read from the fixed part)."""
    def accept(frame: mbus.Frame) -> MbusIdentity | None:
        if frame.kind != "long" or frame.control & 0x0F != mbus.RSP_UD:
            return None
        try:
            header, _ = records.parse_header(frame.ci, frame.data)
        except records.TelegramError:
            return MbusIdentity("", "", f"a telegram with CI {frame.ci:02X}H", frame.address)
        return MbusIdentity(header.secondary_address if header.identification else "", header.manufacturer,
                            records.MEDIA.get(header.medium, f"{header.medium:02X}H"), frame.address)

    return OneShot(mbus.req_ud2(address, True), mbus.Deframer(), accept, answer_bytes=261, baud=baud,
                   answer_s=answer_s)


class SecondarySearch:
    """EN 13757-3 §11.3: find every meter's secondary address by selections with wildcards (F). Pure: masks out,
    outcomes in.

    A selection that nobody acknowledges rules its whole range out; one answered by a single meter (a clean
    RSP_UD to the REQ_UD2 that follows) gives that meter's full address; a collision (several acknowledge and
    their RSP_UDs garble each other) is split on the first wildcard digit of the identification number into the
    ten masks with 0..9 there. The search starts with every digit a wildcard, so a line with one meter takes one
    probe. At most `max_probes` selections: what was left is reported (`left`). The driver confirms a single
    answer by selecting the full address it names (the module docstring says why) before calling `single`."""

    def __init__(self, start: str = "F" * 16, max_probes: int = 400) -> None:
        mbus.select_secondary(start)  # ValueError for a malformed mask
        self._stack = [start.upper()]
        self.max_probes = max_probes
        self.probes = 0
        self.found: list[MbusIdentity] = []
        self.unresolved: list[str] = []  # collisions of meters with the same identification number

    def next_mask(self) -> str | None:
        if not self._stack or self.probes >= self.max_probes:
            return None
        self.probes += 1
        return self._stack.pop()

    def nothing(self, mask: str) -> None:
        pass

    def single(self, mask: str, meter: MbusIdentity) -> None:
        if all(m.secondary != meter.secondary for m in self.found):
            self.found.append(meter)

    def collision(self, mask: str) -> None:
        pos = mask.find("F", 0, 8)
        if pos < 0:
            self.unresolved.append(mask)
            return
        self._stack += [mask[:pos] + digit + mask[pos + 1:] for digit in "9876543210"]  # popped 0 first

    @property
    def left(self) -> list[str]:
        """Masks not probed because the bound was reached."""
        return list(reversed(self._stack))
