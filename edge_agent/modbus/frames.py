"""Modbus frames without I/O: request PDUs, response checks, and the RTU, TCP (MBAP) and ASCII framings.

Bytes in, validated PDUs (or a reason to reject) out; no sockets, no clocks. The transports in
`edge_agent/modbus/transport.py` own the timing; this module only says when a frame is complete and whether it
is acceptable.

A response is accepted only when everything agrees with the request: the unit id, the function code, the MBAP
transaction id, the byte count and the checksum. Anything else raises `FrameRejected` with one of the stable
`REASONS`, so the caller can count it; a rejected frame is never decoded.

Decoders take bytes as they arrive (`feed`) and answer `NEED_MORE` until the frame is complete, then the
response PDU (function code first, no unit id, no checksum). An exception response (function | 0x80) is a
valid PDU: `raise_for_exception(pdu)` or `parse_read_response` turns it into `ModbusExceptionResponse`.

Writes (FC 5, 6, 15, 16): `write_request` builds the request PDU, `check_write_response` accepts only the answer
the specification defines for it (§6.5, §6.6: an echo of the request; §6.11, §6.12: function, starting address
and quantity); anything else is rejected as "echo".

Frame length, per framing:
- RTU: unit(1) pdu crc(2, low byte first). The length follows from the function code and byte count of the
  response, bounded by the request (`Expect`), so a frame is complete without waiting for the line's silence.
  A Read Device Identification answer (FC 43 / MEI 14) has no byte count: its length follows from its object
  list (each object says its own length), walked as the bytes arrive.
- TCP (MBAP): transaction id(2) protocol id(2)=0 length(2) unit(1) pdu; length = 1 + len(pdu).
- ASCII: ':' hex(unit pdu lrc) CR LF, hex digits upper case (lower case is accepted).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# --- errors -----------------------------------------------------------------------------------------------------

REASONS: Final = ("crc", "lrc", "unit", "function", "transaction", "byte_count", "length", "protocol_id", "garbage",
                  "echo")

EXCEPTION_NAMES: Final[dict[int, str]] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class FrameRejected(Exception):
    """A response that does not match its request (or is corrupt). `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):  # pickles (and copies) with both arguments
        return (type(self), (self.reason, self.detail))


class ModbusExceptionResponse(Exception):
    """The device answered with an exception code. `function` is the request's function code (without 0x80)."""

    def __init__(self, function: int, code: int) -> None:
        self.function = function
        self.code = code
        self.name = EXCEPTION_NAMES.get(code, "unknown exception")
        super().__init__(f"exception code {code} ({self.name}) to function {function}")

    def __reduce__(self):
        return (type(self), (self.function, self.code))


def raise_for_exception(pdu: bytes) -> None:
    """Raise ModbusExceptionResponse when `pdu` is an exception response (a validated PDU from a decoder)."""
    if pdu and pdu[0] & 0x80:
        raise ModbusExceptionResponse(pdu[0] & 0x7F, pdu[1] if len(pdu) > 1 else 0)


# --- checksums --------------------------------------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc16_modbus(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (poly 0x8005 reflected = 0xA001, init 0xFFFF). On the wire: low byte first."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def lrc(data: bytes | bytearray | memoryview) -> int:
    """Modbus ASCII LRC: the two's complement of the 8-bit sum of the bytes."""
    return -sum(data) & 0xFF


# --- request PDUs and read responses -------------------------------------------------------------------------------

READ_FUNCTIONS: Final[dict[str, int]] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
_BIT_TABLES: Final = frozenset({"coil", "discrete"})
MAX_BITS: Final = 2000  # FC 1 and 2: 1..0x07D0
MAX_REGISTERS: Final = 125  # FC 3 and 4: 1..0x007D


def _table_function(table: str) -> int:
    try:
        return READ_FUNCTIONS[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}: expected one of {', '.join(READ_FUNCTIONS)}") from None


def read_byte_count(table: str, count: int) -> int:
    """The byte count of a read response: ceil(count / 8) for bits, 2 * count for registers."""
    _table_function(table)
    return (count + 7) // 8 if table in _BIT_TABLES else 2 * count


def read_request(table: str, address: int, count: int) -> bytes:
    """The request PDU reading `count` coils/discrete inputs/holding/input registers from `address` (0-based)."""
    function = _table_function(table)
    limit = MAX_BITS if table in _BIT_TABLES else MAX_REGISTERS
    if not 1 <= count <= limit:
        raise ValueError(f"cannot read {count} {table} values in one request: 1..{limit}")
    if not 0 <= address <= 0xFFFF or address + count > 0x10000:
        raise ValueError(f"{table} addresses {address}..{address + count - 1} are outside 0..65535")
    return struct.pack(">BHH", function, address, count)


def _answers(function: int, pdu: bytes) -> None:
    """A normal answer to `function` follows; raises for anything else (empty, exception, another function)."""
    if not pdu:
        raise FrameRejected("length", "empty PDU")
    if pdu[0] == function | 0x80:
        if len(pdu) != 2:
            raise FrameRejected("length", f"exception response of {len(pdu)} bytes, not 2")
        raise ModbusExceptionResponse(function, pdu[1])
    if pdu[0] != function:
        raise FrameRejected("function", f"function {pdu[0]} in the answer to function {function}")


def parse_read_response(table: str, count: int, pdu: bytes) -> list[int]:
    """The values of a read response PDU: registers as 0..65535, bits as one 0/1 per requested bit.

    Raises ModbusExceptionResponse for an exception response, FrameRejected("function" | "byte_count" |
    "length") when the PDU does not answer a read of `count` values from `table`.
    """
    function = _table_function(table)
    _answers(function, pdu)
    if len(pdu) < 2:
        raise FrameRejected("length", "read response without a byte count")
    expected = read_byte_count(table, count)
    if pdu[1] != expected:
        raise FrameRejected("byte_count", f"byte count {pdu[1]}, expected {expected} for {count} {table} values")
    if len(pdu) != 2 + expected:
        raise FrameRejected("length", f"{len(pdu) - 2} data bytes after byte count {expected}")
    data = pdu[2:]
    if table in _BIT_TABLES:
        return [(data[i >> 3] >> (i & 7)) & 1 for i in range(count)]
    return list(struct.unpack(f">{count}H", data))


# --- write requests and their responses (Modbus Application Protocol 1.1b §6.5, §6.6, §6.11, §6.12) -----------------

WRITE_SINGLE_COIL: Final = 5
WRITE_SINGLE_REGISTER: Final = 6
WRITE_MULTIPLE_COILS: Final = 15
WRITE_MULTIPLE_REGISTERS: Final = 16
WRITE_FUNCTIONS: Final[dict[int, str]] = {
    WRITE_SINGLE_COIL: "write single coil",
    WRITE_SINGLE_REGISTER: "write single register",
    WRITE_MULTIPLE_COILS: "write multiple coils",
    WRITE_MULTIPLE_REGISTERS: "write multiple registers",
}
MAX_WRITE_BITS: Final = 0x07B0  # §6.11: quantity of outputs 1..1968
MAX_WRITE_REGISTERS: Final = 0x007B  # §6.12: quantity of registers 1..123
_COIL_ON: Final = 0xFF00  # §6.5: FF 00 requests ON, 00 00 OFF; any other value is illegal


def _check_span(what: str, address: int, count: int) -> None:
    if not 0 <= address <= 0xFFFF or address + count > 0x10000:
        raise ValueError(f"{what} addresses {address}..{address + count - 1} are outside 0..65535")


def write_request(function: int, address: int, values: list[int] | tuple[int, ...]) -> bytes:
    """The request PDU writing `values` from `address` (0-based): coils as 0/1 (FC 5, 15), registers as
    0..65535 (FC 6, 16). FC 5 and 6 write exactly one value."""
    values = list(values)
    if function in (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER):
        if len(values) != 1:
            raise ValueError(f"function {function} ({WRITE_FUNCTIONS[function]}) writes one value, got {len(values)}")
        (value,) = values
        _check_span("coil" if function == WRITE_SINGLE_COIL else "holding", address, 1)
        if function == WRITE_SINGLE_COIL:
            if value not in (0, 1):
                raise ValueError(f"a coil is 0 or 1, got {value!r}")
            return struct.pack(">BHH", function, address, _COIL_ON if value else 0)  # §6.5
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"register value {value} is outside 0..65535")
        return struct.pack(">BHH", function, address, value)  # §6.6
    if function == WRITE_MULTIPLE_COILS:
        if not 1 <= len(values) <= MAX_WRITE_BITS:
            raise ValueError(f"cannot write {len(values)} coils in one request: 1..{MAX_WRITE_BITS}")
        _check_span("coil", address, len(values))
        if any(v not in (0, 1) for v in values):
            raise ValueError("coils are 0 or 1")
        # §6.11: the first coil is the least significant bit of the first byte; unused high bits are 0
        data = bytearray((len(values) + 7) // 8)
        for i, bit in enumerate(values):
            data[i >> 3] |= bit << (i & 7)
        return struct.pack(">BHHB", function, address, len(values), len(data)) + bytes(data)
    if function == WRITE_MULTIPLE_REGISTERS:
        if not 1 <= len(values) <= MAX_WRITE_REGISTERS:
            raise ValueError(f"cannot write {len(values)} registers in one request: 1..{MAX_WRITE_REGISTERS}")
        _check_span("holding", address, len(values))
        if any(not 0 <= v <= 0xFFFF for v in values):
            raise ValueError("register values are 0..65535")
        return struct.pack(f">BHHB{len(values)}H", function, address, len(values), 2 * len(values), *values)  # §6.12
    raise ValueError(f"function {function} is not a write: expected one of {', '.join(map(str, WRITE_FUNCTIONS))}")


def check_write_response(request: bytes, pdu: bytes) -> None:
    """Accept the response PDU to the write `request` (from write_request), or raise.

    ModbusExceptionResponse for an exception response; FrameRejected("function" | "length") for an answer to
    another function or of the wrong size; FrameRejected("echo") when it does not repeat what the specification
    says it must: the whole request for FC 5 and 6 (§6.5, §6.6: "the normal response is an echo of the
    request"), function, starting address and quantity for FC 15 and 16 (§6.11, §6.12). A device that answers
    a write with other values did not write what was asked, or answered another request.
    """
    function = request[0]
    if function not in WRITE_FUNCTIONS:
        raise ValueError(f"function {function} is not a write")
    _answers(function, pdu)
    if len(pdu) != 5:
        raise FrameRejected("length", f"response of {len(pdu)} bytes to {WRITE_FUNCTIONS[function]}, expected 5")
    if pdu != request[:5]:
        got_address, got_value = struct.unpack(">HH", pdu[1:5])
        want_address, want_value = struct.unpack(">HH", request[1:5])
        what = "value" if function in (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER) else "quantity"
        raise FrameRejected("echo", f"{WRITE_FUNCTIONS[function]} answered address {got_address} {what} "
                                    f"0x{got_value:04X}, asked address {want_address} {what} 0x{want_value:04X}")


# --- FC 43 / MEI 14: Read Device Identification (Modbus Application Protocol 1.1b §6.21) ------------------------------

MEI_DEVICE_ID: Final = 0x0E
# Read Device ID codes: 01 basic, 02 regular, 03 extended (stream access: every object of the category from
# the given object id on, over as many transactions as it takes), 04 one specific object (individual access).
BASIC_STREAM: Final = 1
REGULAR_STREAM: Final = 2
EXTENDED_STREAM: Final = 3
ONE_OBJECT: Final = 4
MORE_FOLLOWS: Final = 0xFF  # "more follows": further objects need a further transaction from NextObjectId
# The objects of the basic (0x00-0x02, mandatory) and regular (0x03-0x06, optional) categories, as we name them.
DEVICE_ID_OBJECTS: Final[dict[int, str]] = {
    0x00: "vendor_name",
    0x01: "product_code",
    0x02: "revision",  # MajorMinorRevision
    0x03: "vendor_url",
    0x04: "product_name",
    0x05: "model_name",
    0x06: "user_application_name",
}


@dataclass(frozen=True, slots=True)
class DeviceIdPage:
    """One Read Device Identification answer: part of the device's objects (the stream may continue)."""

    code: int  # the Read Device ID code it answers
    conformity: int  # 0x01/0x02/0x03 basic/regular/extended stream; +0x80 also individual access
    more_follows: bool
    next_object_id: int  # where the next request starts when more_follows
    objects: tuple[tuple[int, bytes], ...]  # (object id, value) in the order sent


def device_id_request(code: int, object_id: int = 0) -> bytes:
    """The request PDU: 2B 0E <Read Device ID code> <Object Id>."""
    if code not in (BASIC_STREAM, REGULAR_STREAM, EXTENDED_STREAM, ONE_OBJECT):
        raise ValueError(f"Read Device ID code {code}: expected 1 (basic), 2 (regular), 3 (extended) or 4 (one object)")
    if not 0 <= object_id <= 0xFF:
        raise ValueError(f"object id {object_id} is outside 0..255")
    return bytes((ENCAPSULATED_INTERFACE, MEI_DEVICE_ID, code, object_id))


def parse_device_id_response(code: int, pdu: bytes) -> DeviceIdPage:
    """The answer to device_id_request(code, ...): header and object list, checked against each other.

    Raises ModbusExceptionResponse for an exception response (01 "illegal function": the device does not offer
    it; 02 "illegal data address": no such object; 03 "illegal data value": that Read Device ID code is not
    supported), FrameRejected("function") when it answers another MEI type or Read Device ID code, and
    FrameRejected("length") when the object list does not match its count or the PDU's end, or a header field
    holds a value §6.21 does not allow (More Follows other than 00/FF, or FF for one object)."""
    _answers(ENCAPSULATED_INTERFACE, pdu)
    if len(pdu) < 7:
        raise FrameRejected("length", f"device identification answer of {len(pdu)} bytes, the header alone has 7")
    _, mei, answered, conformity, more, next_id, count = pdu[:7]
    if mei != MEI_DEVICE_ID:
        raise FrameRejected("function", f"MEI type {mei} in the answer, asked {MEI_DEVICE_ID}")
    if answered != code:
        raise FrameRejected("function", f"Read Device ID code {answered} in the answer, asked {code}")
    if more not in (0x00, MORE_FOLLOWS) or (more and code == ONE_OBJECT):
        raise FrameRejected("length", f"More Follows {more:02X}: expected 00 or FF (00 for one object)")
    objects: list[tuple[int, bytes]] = []
    at = 7
    for index in range(count):
        if at + 2 > len(pdu):
            raise FrameRejected("length", f"object {index + 1} of {count} missing at PDU offset {at}")
        object_id, length = pdu[at], pdu[at + 1]
        if at + 2 + length > len(pdu):
            raise FrameRejected("length", f"object {object_id:#04x} of {length} bytes runs past the PDU's end")
        objects.append((object_id, bytes(pdu[at + 2 : at + 2 + length])))
        at += 2 + length
    if at != len(pdu):
        raise FrameRejected("length", f"{len(pdu) - at} bytes after the {count} objects")
    return DeviceIdPage(code, conformity, more == MORE_FOLLOWS, next_id if more else 0, tuple(objects))


# --- what a response must look like ---------------------------------------------------------------------------------

# Response PDUs whose length follows from a byte count at PDU offset 1 (PDU length = 2 + byte count).
BYTE_COUNT_FUNCTIONS: Final = frozenset({1, 2, 3, 4, 0x0C, 0x11, 0x14, 0x15, 0x17})
# Response PDUs of a fixed length (function code included).
FIXED_PDU_LENGTHS: Final[dict[int, int]] = {5: 5, 6: 5, 7: 2, 8: 5, 0x0B: 5, 0x0F: 5, 0x10: 5, 0x16: 7}
# Response PDUs whose length follows from their content, not from a byte count: FC 43 (Encapsulated Interface
# Transport); for MEI type 14 the object list (Modbus Application Protocol 1.1b §6.21), see _mei_frame_length.
ENCAPSULATED_INTERFACE: Final = 0x2B
VARIABLE_LENGTH_FUNCTIONS: Final = frozenset({ENCAPSULATED_INTERFACE})
EXCEPTION_PDU_LENGTH: Final = 2
MAX_PDU: Final = 253


@dataclass(frozen=True, slots=True)
class Expect:
    """What the response to a request must be: its function code and, for reads, its byte count.

    For functions in BYTE_COUNT_FUNCTIONS give `byte_count` when it is known (reads); for functions in
    FIXED_PDU_LENGTHS the length is known; for anything else give `pdu_length`.
    """

    function: int
    byte_count: int | None = None
    pdu_length: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.function <= 0x7F:
            raise ValueError(f"function code {self.function} is outside 1..127")
        if self.byte_count is not None:
            if self.function not in BYTE_COUNT_FUNCTIONS:
                raise ValueError(f"function {self.function} has no byte count")
            if not 0 <= self.byte_count <= MAX_PDU - 2:
                raise ValueError(f"byte count {self.byte_count} is outside 0..{MAX_PDU - 2}")
        if self.pdu_length is not None and not 1 <= self.pdu_length <= MAX_PDU:
            raise ValueError(f"PDU length {self.pdu_length} is outside 1..{MAX_PDU}")
        if (self.function not in BYTE_COUNT_FUNCTIONS and self.function not in FIXED_PDU_LENGTHS
                and self.function not in VARIABLE_LENGTH_FUNCTIONS and self.pdu_length is None):
            raise ValueError(f"the response length of function {self.function} is unknown: give pdu_length")

    @classmethod
    def read(cls, table: str, count: int) -> Expect:
        """The answer to read_request(table, address, count)."""
        return cls(_table_function(table), byte_count=read_byte_count(table, count))

    @classmethod
    def write(cls, request: bytes) -> Expect:
        """The answer to write_request(...): 5 bytes for every write function (§6.5, §6.6, §6.11, §6.12)."""
        return cls(request[0])

    @classmethod
    def device_id(cls) -> Expect:
        """The answer to device_id_request(): FC 43, its length read from its own object list."""
        return cls(ENCAPSULATED_INTERFACE)

    @property
    def response_pdu_length(self) -> int | None:
        """The length of a normal (non-exception) response PDU when it is known from the request."""
        if self.pdu_length is not None:
            return self.pdu_length
        if self.byte_count is not None:
            return 2 + self.byte_count
        return FIXED_PDU_LENGTHS.get(self.function)

    @property
    def longest_response_pdu(self) -> int:
        """The longest response PDU to allow time for on a slow line: the known length; the largest PDU for an
        answer whose length only its content tells (FC 43); else an exception response."""
        known = self.response_pdu_length
        if known is not None:
            return known
        return MAX_PDU if self.function in VARIABLE_LENGTH_FUNCTIONS else EXCEPTION_PDU_LENGTH


def _check_response(unit: int, want_unit: int, pdu: bytes | bytearray, expect: Expect) -> bytes:
    """Unit, function, byte count and length of a complete, checksum-verified response."""
    if unit != want_unit:
        raise FrameRejected("unit", f"answer from unit {unit}, asked unit {want_unit}")
    if not pdu:
        raise FrameRejected("length", "no PDU")
    function = pdu[0]
    if function == expect.function | 0x80:
        if len(pdu) != EXCEPTION_PDU_LENGTH:
            raise FrameRejected("length", f"exception response of {len(pdu)} bytes, not 2")
        return bytes(pdu)
    if function != expect.function:
        raise FrameRejected("function", f"function {function} in the answer to function {expect.function}")
    if expect.pdu_length is None and function in BYTE_COUNT_FUNCTIONS:
        if len(pdu) < 2:
            raise FrameRejected("length", "response without a byte count")
        if expect.byte_count is not None and pdu[1] != expect.byte_count:
            raise FrameRejected("byte_count", f"byte count {pdu[1]}, expected {expect.byte_count}")
        if len(pdu) != 2 + pdu[1]:
            raise FrameRejected("length", f"{len(pdu) - 2} data bytes after byte count {pdu[1]}")
    else:
        want = expect.response_pdu_length
        if want is not None and len(pdu) != want:
            raise FrameRejected("length", f"response PDU of {len(pdu)} bytes, expected {want}")
    return bytes(pdu)


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __bool__(self) -> bool:
        return False


NEED_MORE: Final = _NeedMore()
"""What a decoder's `feed` returns while the frame is incomplete (falsy)."""


class _Decoder:
    """One response. `feed` returns NEED_MORE, then the PDU; it raises FrameRejected.

    After the PDU, further bytes go to `surplus` and `feed` keeps returning the PDU. After a rejection (except
    where a subclass says otherwise) the decoder is spent and `feed` raises the same rejection again.
    """

    def __init__(self, unit: int, expect: Expect) -> None:
        if not 0 <= unit <= 255:
            raise ValueError(f"unit id {unit} is outside 0..255")
        self.unit = unit
        self.expect = expect
        self.pdu: bytes | None = None
        self.surplus = b""  # bytes received after the complete frame
        self._buf = bytearray()
        self._rejected: FrameRejected | None = None

    def feed(self, data: bytes | bytearray | memoryview = b"") -> bytes | _NeedMore:
        if self._rejected is not None:
            raise self._rejected
        if self.pdu is not None:
            self.surplus += bytes(data)
            return self.pdu
        self._buf += data
        try:
            return self._step()
        except FrameRejected as exc:
            self._rejected = exc
            raise

    @property
    def buffered(self) -> int:
        """Bytes of the incomplete frame received so far."""
        return len(self._buf)

    def remainder(self) -> bytes:
        """Bytes fed but not consumed by a frame: an incomplete frame, or what followed the frame."""
        return bytes(self._buf) + self.surplus

    def _step(self) -> bytes | _NeedMore:
        raise NotImplementedError


# --- RTU ------------------------------------------------------------------------------------------------------------

RTU_MAX_ADU: Final = 256


def rtu_encode(unit: int, pdu: bytes) -> bytes:
    """unit + pdu + CRC-16/MODBUS, low byte first."""
    if not 0 <= unit <= 255:
        raise ValueError(f"unit id {unit} is outside 0..255")
    if not 1 <= len(pdu) <= MAX_PDU:
        raise ValueError(f"PDU of {len(pdu)} bytes: 1..{MAX_PDU}")
    body = bytes((unit,)) + pdu
    return body + crc16_modbus(body).to_bytes(2, "little")


def rtu_response_length(expect: Expect) -> int | None:
    """The ADU length of the normal response to a request, when it is known."""
    pdu = expect.response_pdu_length
    return None if pdu is None else pdu + 3


class RtuDecoder(_Decoder):
    """The RTU response to one request from `unit` (see the module docstring).

    The frame's length is taken from its function code: exception 5 bytes, byte-count functions 5 + byte count
    (a byte count above the expected one is rejected at once), fixed-length functions 3 + PDU. A complete frame
    is checked in this order: CRC, unit, function, byte count/length. Bytes after it are `surplus`.

    "unit" is reported only for a frame whose CRC checks out (another device answered). Bytes that cannot be
    verified as a frame and do not start with the unit id asked for (noise, a glitch at the line's turnaround,
    leftovers) are "garbage"; a frame that starts with the right unit id but fails its CRC is "crc".
    """

    def _not_ours(self, data: bytes | bytearray) -> FrameRejected:
        return FrameRejected("garbage", f"{bytes(data[:8]).hex(' ')} ... is not a frame from unit {self.unit}")

    def _frame_length(self) -> int | None:
        buf, expect = self._buf, self.expect
        if len(buf) < 2:
            return None
        function = buf[1]
        if function & 0x80:
            return EXCEPTION_PDU_LENGTH + 3
        if function == expect.function and expect.pdu_length is not None:
            return expect.pdu_length + 3
        if function == expect.function and function in VARIABLE_LENGTH_FUNCTIONS:
            return self._mei_frame_length()
        if function in BYTE_COUNT_FUNCTIONS:
            if len(buf) < 3:
                return None
            count = buf[2]
            if function == expect.function and expect.byte_count is not None and count > expect.byte_count:
                if buf[0] != self.unit:
                    raise self._not_ours(buf)
                raise FrameRejected("byte_count", f"byte count {count}, expected {expect.byte_count}")
            if count + 5 > RTU_MAX_ADU:
                if buf[0] != self.unit:
                    raise self._not_ours(buf)
                raise FrameRejected("length", f"byte count {count} makes a frame longer than {RTU_MAX_ADU} bytes")
            return count + 5
        fixed = FIXED_PDU_LENGTHS.get(function)
        if fixed is not None:
            return fixed + 3
        # Not a function whose length we know: nothing after it can be framed.
        if buf[0] != self.unit:
            raise self._not_ours(buf)
        raise FrameRejected("function", f"function {function} in the answer to function {expect.function}")

    def _mei_frame_length(self) -> int | None:
        """unit, 2B, 0E, read code, conformity, more follows, next object id, number of objects, then per object
        id, length, value (§6.21), then the CRC: walked as far as the bytes go."""
        buf = self._buf
        if len(buf) < 3:
            return None
        if buf[2] != MEI_DEVICE_ID:
            if buf[0] != self.unit:
                raise self._not_ours(buf)
            raise FrameRejected("function", f"MEI type {buf[2]} in the answer, asked {MEI_DEVICE_ID} (device "
                                            "identification)")
        if len(buf) < 8:
            return None
        end = 8
        for _ in range(buf[7]):
            if len(buf) < end + 2:
                return None
            end += 2 + buf[end + 1]
            if end + 2 > RTU_MAX_ADU:
                if buf[0] != self.unit:
                    raise self._not_ours(buf)
                raise FrameRejected("length", f"objects make a frame longer than {RTU_MAX_ADU} bytes")
        return end + 2

    def _step(self) -> bytes | _NeedMore:
        length = self._frame_length()
        if length is None or len(self._buf) < length:
            return NEED_MORE
        frame = self._buf[:length]
        self.surplus = bytes(self._buf[length:])
        self._buf.clear()
        got = int.from_bytes(frame[-2:], "little")
        want = crc16_modbus(frame[:-2])
        if got != want:
            if frame[0] != self.unit:
                raise self._not_ours(frame)
            raise FrameRejected("crc", f"CRC {got:04X}, computed {want:04X}")
        self.pdu = _check_response(frame[0], self.unit, frame[1:-2], self.expect)
        return self.pdu


# --- TCP (MBAP) -----------------------------------------------------------------------------------------------------

MBAP_HEADER: Final = 7  # transaction id, protocol id, length, unit id
MBAP_MAX_LENGTH: Final = MAX_PDU + 1


def tcp_encode(transaction: int, unit: int, pdu: bytes) -> bytes:
    """MBAP header + pdu."""
    if not 0 <= transaction <= 0xFFFF:
        raise ValueError(f"transaction id {transaction} is outside 0..65535")
    if not 0 <= unit <= 255:
        raise ValueError(f"unit id {unit} is outside 0..255")
    if not 1 <= len(pdu) <= MAX_PDU:
        raise ValueError(f"PDU of {len(pdu)} bytes: 1..{MAX_PDU}")
    return struct.pack(">HHHB", transaction, 0, len(pdu) + 1, unit) + pdu


class TcpDecoder(_Decoder):
    """The MBAP response with transaction id `transaction` from `unit`.

    A stream stays framed by the MBAP length, so a frame with another transaction id (a late answer to an
    earlier request) is consumed and rejected with "transaction" and the decoder goes on: call `feed()` again
    (with or without new bytes) to look at what follows. A wrong unit/function/byte count consumes the frame
    too (`in_sync` stays True). A protocol id other than 0 or an impossible length means the stream is out of
    step: `in_sync` becomes False and the connection should be closed.
    """

    def __init__(self, transaction: int, unit: int, expect: Expect) -> None:
        super().__init__(unit, expect)
        self.transaction = transaction
        self.in_sync = True

    def feed(self, data: bytes | bytearray | memoryview = b"") -> bytes | _NeedMore:
        try:
            return super().feed(data)
        except FrameRejected as exc:
            if exc.reason == "transaction" and self.in_sync:
                self._rejected = None  # stale answer skipped; the next frame may be ours
            raise

    def _step(self) -> bytes | _NeedMore:
        buf = self._buf
        if len(buf) < MBAP_HEADER:
            return NEED_MORE
        transaction, protocol, length = struct.unpack_from(">HHH", buf)
        if protocol != 0:
            self.in_sync = False
            raise FrameRejected("protocol_id", f"protocol id {protocol}, not 0")
        if not 2 <= length <= MBAP_MAX_LENGTH:
            self.in_sync = False
            raise FrameRejected("length", f"MBAP length {length} is outside 2..{MBAP_MAX_LENGTH}")
        if len(buf) < 6 + length:
            return NEED_MORE
        unit = buf[6]
        pdu = bytes(buf[7 : 6 + length])
        del buf[: 6 + length]
        if transaction != self.transaction:
            raise FrameRejected("transaction", f"transaction id {transaction}, expected {self.transaction}")
        self.surplus = bytes(buf)
        buf.clear()
        self.pdu = _check_response(unit, self.unit, pdu, self.expect)
        return self.pdu


# --- ASCII ----------------------------------------------------------------------------------------------------------

ASCII_MAX_FRAME: Final = 513  # ':' + 2 * (unit + 253 + lrc) + CR LF


def ascii_encode(unit: int, pdu: bytes) -> bytes:
    """':' + upper-case hex of (unit, pdu, LRC) + CR LF."""
    if not 0 <= unit <= 255:
        raise ValueError(f"unit id {unit} is outside 0..255")
    if not 1 <= len(pdu) <= MAX_PDU:
        raise ValueError(f"PDU of {len(pdu)} bytes: 1..{MAX_PDU}")
    body = bytes((unit,)) + pdu
    return b":" + (body + bytes((lrc(body),))).hex().upper().encode("ascii") + b"\r\n"


def ascii_response_length(expect: Expect) -> int | None:
    """The number of characters of the normal ASCII response to a request, when it is known."""
    pdu = expect.response_pdu_length
    return None if pdu is None else 2 * (pdu + 2) + 3


_HEX_DIGITS: Final = frozenset(b"0123456789ABCDEFabcdef")


class AsciiDecoder(_Decoder):
    """The ASCII response from `unit`: complete at LF; anything before ':' is garbage.

    Checked in this order: framing (CR LF, hex digits, even count), LRC, unit, function, byte count/length.
    """

    def _step(self) -> bytes | _NeedMore:
        buf = self._buf
        if not buf:
            return NEED_MORE
        if buf[0] != 0x3A:  # ':'
            raise FrameRejected("garbage", f"{buf[:16].hex(' ')} before the frame's ':'")
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) >= ASCII_MAX_FRAME:
                raise FrameRejected("length", f"no end of frame within {ASCII_MAX_FRAME} characters")
            return NEED_MORE
        frame = bytes(buf[: end + 1])
        self.surplus = bytes(buf[end + 1 :])
        buf.clear()
        if not frame.endswith(b"\r\n"):
            raise FrameRejected("garbage", "frame ends with LF, not CR LF")
        digits = frame[1:-2]
        if any(c not in _HEX_DIGITS for c in digits):
            raise FrameRejected("garbage", "characters other than hex digits in the frame")
        if len(digits) % 2 or len(digits) < 6:
            raise FrameRejected("length", f"{len(digits)} hex digits in the frame")
        body = bytes.fromhex(digits.decode("ascii"))
        if lrc(body[:-1]) != body[-1]:
            raise FrameRejected("lrc", f"LRC {body[-1]:02X}, computed {lrc(body[:-1]):02X}")
        self.pdu = _check_response(body[0], self.unit, body[1:-1], self.expect)
        return self.pdu


# --- serial line timing ---------------------------------------------------------------------------------------------

PARITIES: Final = ("N", "E", "O")


def char_time(baud: int, data_bits: int = 8, parity: str = "N", stop_bits: float = 1) -> float:
    """Seconds on the wire per character: start bit + data bits + parity bit (if any) + stop bits."""
    if baud <= 0:
        raise ValueError(f"baud rate {baud} must be positive")
    if parity not in PARITIES:
        raise ValueError(f"parity {parity!r}: expected one of N, E, O")
    bits = 1 + data_bits + (0 if parity == "N" else 1) + stop_bits
    return bits / baud


def frame_silence(baud: int, data_bits: int = 8, parity: str = "N", stop_bits: float = 1) -> float:
    """The RTU inter-frame silence t3.5: 3.5 characters, fixed at 1.75 ms above 19200 baud."""
    if baud > 19200:
        return 0.00175
    return 3.5 * char_time(baud, data_bits, parity, stop_bits)


def char_gap_limit(baud: int, data_bits: int = 8, parity: str = "N", stop_bits: float = 1) -> float:
    """The longest silence allowed inside an RTU frame t1.5: 1.5 characters, fixed at 0.75 ms above 19200 baud."""
    if baud > 19200:
        return 0.00075
    return 1.5 * char_time(baud, data_bits, parity, stop_bits)


def rtu_cycle_time(
    request_chars: int,
    response_chars: int,
    baud: int,
    data_bits: int = 8,
    parity: str = "N",
    stop_bits: float = 1,
    turnaround: float | None = None,
) -> float:
    """The shortest time between the starts of two back-to-back RTU transactions on a serial line.

    Request on the wire, the device's turnaround (at least t3.5: a device sees the end of the request only
    after t3.5 of silence; None means exactly t3.5), the response on the wire, then t3.5 before the next
    request. 1 / this is the theoretical limit of transactions per second.
    """
    silence = frame_silence(baud, data_bits, parity, stop_bits)
    gap = silence if turnaround is None else max(turnaround, silence)
    return (request_chars + response_chars) * char_time(baud, data_bits, parity, stop_bits) + gap + silence
