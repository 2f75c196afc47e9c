"""What a Modbus device says it is: Read Device Identification (FC 43 / MEI 14, Modbus Application Protocol
1.1b §6.21) as a pure state machine - request PDUs out, answers in, no I/O and no clock.

    reader = DeviceIdReader()
    while (pdu := reader.next_request()) is not None:
        try:
            reader.answered(await transact(pdu, frames.Expect.device_id()))
        except ModbusExceptionResponse as exc:
            reader.refused(exc.code)
    reader.outcome     # Identified(conformity, objects) | NotOffered(why)

The reader asks for the regular objects (stream access, code 02: 0x00-0x06), which includes the basic ones
(0x00-0x02, which every device that offers the function must have). A device that supports only the basic
category may refuse code 02 (exception 02 or 03); then the basic stream (code 01) is asked. Exception 01
("illegal function"), a refusal of the basic stream too, or an answer without any object means the device
does not offer identification: `NotOffered`, never a failure of the device (its polling goes on as before).

"More follows" (§6.21: the objects do not fit one answer) is followed from NextObjectId, at most
MAX_TRANSACTIONS answers in all, and only forward (a NextObjectId not above the last one asked would loop):
what was read until then is kept. Other exceptions (04 device failure, 06 busy after the bus's retries) and
rejected answers are for the shell to retry later (edge_agent/modbus/bus.py).

Object values are "ASCII strings" in the spec; devices send what they like, so they are decoded as UTF-8 with
replacement, control characters become spaces, and each is cut to MAX_OBJECT_CHARS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.modbus import frames
from wire.names import BAD_CHARACTER

MAX_TRANSACTIONS = 8
MAX_OBJECT_CHARS = 128  # wire/status.py bounds every identification text to this

# exception codes (§7): 01 illegal function, 02 illegal data address, 03 illegal data value
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE = 1, 2, 3


@dataclass(frozen=True)
class Identified:
    conformity: int
    objects: dict[int, str]  # object id -> text, basic and regular objects only

    def named(self) -> dict[str, str]:
        """{"vendor_name": ..., "product_code": ..., ...} for the objects it sent."""
        return {frames.DEVICE_ID_OBJECTS[i]: text for i, text in sorted(self.objects.items())}


@dataclass(frozen=True)
class NotOffered:
    why: str


def object_text(value: bytes) -> str:
    """An object's value as text a status, a log or a terminal can carry."""
    text = value.decode("utf-8", "replace")
    return BAD_CHARACTER.sub(" ", text).strip()[:MAX_OBJECT_CHARS].rstrip()


@dataclass
class DeviceIdReader:
    code: int = frames.REGULAR_STREAM
    object_id: int = 0
    transactions: int = 0
    conformity: int | None = None
    objects: dict[int, str] = field(default_factory=dict)
    outcome: Identified | NotOffered | None = None

    def next_request(self) -> bytes | None:
        """The next request PDU, or None once `outcome` is known."""
        if self.outcome is not None:
            return None
        return frames.device_id_request(self.code, self.object_id)

    def answered(self, pdu: bytes) -> None:
        """A normal answer PDU (the transport validated its framing). Raises FrameRejected when its content is
        not an answer to the request (frames.parse_device_id_response); the reader is then unchanged."""
        page = frames.parse_device_id_response(self.code, pdu)
        self.transactions += 1
        if self.conformity is None:
            self.conformity = page.conformity
        for object_id, value in page.objects:
            if object_id in frames.DEVICE_ID_OBJECTS:  # private (0x80+) or extended objects are not asked for
                self.objects.setdefault(object_id, object_text(value))
        if (page.more_follows and self.transactions < MAX_TRANSACTIONS and page.next_object_id > self.object_id
                and page.next_object_id in frames.DEVICE_ID_OBJECTS):
            self.object_id = page.next_object_id
            return
        self._finish()

    def refused(self, exception_code: int) -> bool:
        """An exception answer. True when it decided the outcome; False when it is not the device's word on
        identification (a failure or busy device: the shell tries again another time)."""
        if exception_code not in (ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE):
            return False
        if self.transactions:
            # Part of the stream was read, the continuation refused: keep what was read.
            self._finish()
        elif exception_code != ILLEGAL_FUNCTION and self.code == frames.REGULAR_STREAM:
            self.code, self.object_id = frames.BASIC_STREAM, 0  # the basic category only
        else:
            self.outcome = NotOffered(f"exception {exception_code} ({frames.EXCEPTION_NAMES[exception_code]}) "
                                      f"to Read Device Identification code {self.code:02d}")
        return True

    def _finish(self) -> None:
        if self.objects:
            self.outcome = Identified(self.conformity or 0, dict(sorted(self.objects.items())))
        else:
            self.outcome = NotOffered("answered without any basic or regular object")
