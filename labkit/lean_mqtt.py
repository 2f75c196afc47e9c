"""A lean MQTT 5 client for the fleet benchmark: thousands of mutual-TLS connections on one asyncio loop.

paho runs a network thread per client, which does not scale to 10,000 simulated gateways in a few processes.
This is the part of MQTT 5 (OASIS MQTT Version 5.0) a citynerve gateway uses, and nothing else:

    CONNECT (clean start, keepalive, session expiry 0) -> CONNACK (§3.2: reason code, Receive Maximum)
    PUBLISH QoS 1 -> PUBACK (§3.4: reason code, 0x87 from the broker's rate limit)
    SUBSCRIBE QoS 1 (§3.8) -> SUBACK;  PUBLISH QoS 0/1 received -> PUBACK sent;  PINGREQ/PINGRESP;  DISCONNECT

Sans-IO core (`encode_*`, `PacketReader`: bytes in, packets out, no sockets, no clock) and a thin asyncio
shell (`LeanConnection`, an asyncio.Protocol: no task per connection, the loop's transport does the TLS).
Not a general client: no QoS 2, no topic aliases, no will, no re-delivery of its own on reconnect (the
caller's sender decides what to send again, as the agent's edge_agent/delivery.py Sender does with paho).
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
PROTOCOL_LEVEL = 5
MAX_REMAINING = 268_435_455  # §1.5.5: four bytes of Variable Byte Integer


class ProtocolError(ValueError):
    """The peer sent something this client cannot read: the connection is closed."""


# -- encoding (pure) -------------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """§1.5.5 Variable Byte Integer."""
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"{n} does not fit a Variable Byte Integer")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def encode_connect(client_id: str, keepalive: int, *, session_expiry: int = 0,
                   receive_maximum: int | None = None) -> bytes:
    """§3.1: clean start, no will, no username (the broker takes the certificate's CN)."""
    props = b""
    if session_expiry:
        props += b"\x11" + struct.pack("!I", session_expiry)
    if receive_maximum:
        props += b"\x21" + struct.pack("!H", receive_maximum)
    variable = _string("MQTT") + bytes((PROTOCOL_LEVEL, 0x02)) + struct.pack("!H", keepalive)
    return _packet(CONNECT << 4, variable + varint(len(props)) + props + _string(client_id))


def encode_publish(topic: str, payload: bytes, packet_id: int, qos: int = 1, retain: bool = False,
                   dup: bool = False) -> bytes:
    """§3.3: no properties. `dup`: the same PUBLISH again after a reconnect (§3.3.1.1), as paho re-sends what
    was not PUBACKed."""
    head = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + b"\x00"
    return _packet((PUBLISH << 4) | (int(dup) << 3) | (qos << 1) | int(retain), head + payload)


def encode_puback(packet_id: int, reason: int = 0) -> bytes:
    """§3.4.2.1: a success PUBACK may leave out the reason code."""
    return _packet(PUBACK << 4, struct.pack("!H", packet_id) + (bytes((reason,)) if reason else b""))


def encode_subscribe(packet_id: int, filters: list[str], qos: int = 1) -> bytes:
    """§3.8: each filter with its Subscription Options byte (maximum QoS only)."""
    body = struct.pack("!H", packet_id) + b"\x00" + b"".join(_string(f) + bytes((qos,)) for f in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)  # §3.8.1: reserved flags 0010


PINGREQ_BYTES = bytes((PINGREQ << 4, 0))
DISCONNECT_BYTES = bytes((DISCONNECT << 4, 0))


# -- decoding (pure) -------------------------------------------------------------------------------------------------


@dataclass
class Packet:
    kind: int
    flags: int
    packet_id: int = 0
    reason: int = 0  # CONNACK/PUBACK reason code; SUBACK: the first reason code
    reasons: list[int] = field(default_factory=list)  # SUBACK: every reason code
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    session_present: bool = False
    receive_maximum: int | None = None  # CONNACK property 0x21
    server_keepalive: int | None = None  # CONNACK property 0x13


# Property identifier -> its type (§2.2.2.2), to step over the ones this client does not use.
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _U32, 0x12: _UTF8,
    0x13: _U16, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE, 0x1A: _UTF8, 0x1C: _UTF8,
    0x1F: _UTF8, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}


def _read_varint(data: bytes | memoryview, at: int) -> tuple[int, int] | None:
    """(value, next offset), or None when the bytes end first; ProtocolError past four bytes."""
    value = shift = 0
    for i in range(4):
        if at + i >= len(data):
            return None
        byte = data[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + i + 1
        shift += 7
    raise ProtocolError(f"malformed Variable Byte Integer at offset {at}")


def _properties(body: bytes, at: int) -> tuple[dict[int, int], int]:
    """The numeric properties (others stepped over) and the offset after the property block."""
    got = _read_varint(body, at)
    if got is None:
        raise ProtocolError(f"truncated property length at offset {at}")
    length, at = got
    end = at + length
    if end > len(body):
        raise ProtocolError(f"property block of {length} bytes runs past the packet at offset {at}")
    out: dict[int, int] = {}
    while at < end:
        ident = body[at]
        kind = _PROPERTY_TYPES.get(ident)
        at += 1
        if kind is None:
            raise ProtocolError(f"unknown property 0x{ident:02x} at offset {at - 1}")
        if kind == _BYTE:
            out[ident], at = body[at], at + 1
        elif kind == _U16:
            out[ident], at = struct.unpack_from("!H", body, at)[0], at + 2
        elif kind == _U32:
            out[ident], at = struct.unpack_from("!I", body, at)[0], at + 4
        elif kind == _VARINT:
            got = _read_varint(body, at)
            if got is None:
                raise ProtocolError(f"truncated property 0x{ident:02x}")
            out[ident], at = got
        else:
            for _ in range(2 if kind == _PAIR else 1):
                (n,) = struct.unpack_from("!H", body, at)
                at += 2 + n
    if at != end:
        raise ProtocolError(f"properties end at offset {at}, their length says {end}")
    return out, end


def decode_packet(first: int, body: bytes) -> Packet:
    """One packet from its first byte and its body (what follows the Remaining Length)."""
    kind, flags = first >> 4, first & 0x0F
    try:
        if kind == CONNACK:
            props, _ = _properties(body, 2)
            return Packet(kind, flags, reason=body[1], session_present=bool(body[0] & 1),
                          receive_maximum=props.get(0x21), server_keepalive=props.get(0x13))
        if kind == PUBACK:
            (pid,) = struct.unpack_from("!H", body, 0)
            return Packet(kind, flags, packet_id=pid, reason=body[2] if len(body) > 2 else 0)
        if kind == SUBACK:
            (pid,) = struct.unpack_from("!H", body, 0)
            _, at = _properties(body, 2)
            reasons = list(body[at:])
            return Packet(kind, flags, packet_id=pid, reason=reasons[0] if reasons else 0, reasons=reasons)
        if kind == PUBLISH:
            qos = (flags >> 1) & 3
            (n,) = struct.unpack_from("!H", body, 0)
            topic = body[2:2 + n].decode()
            at = 2 + n
            pid = 0
            if qos:
                (pid,) = struct.unpack_from("!H", body, at)
                at += 2
            _, at = _properties(body, at)
            return Packet(kind, flags, packet_id=pid, topic=topic, payload=bytes(body[at:]), qos=qos)
        if kind in (PINGRESP, DISCONNECT):
            return Packet(kind, flags, reason=body[0] if body else 0)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"packet type {kind}: truncated or malformed ({exc})") from None
    raise ProtocolError(f"unexpected packet type {kind} from the broker")


class PacketReader:
    """Bytes in (any split), whole packets out."""

    def __init__(self, max_packet: int = 1 << 20) -> None:
        self._buffer = bytearray()
        self.max_packet = max_packet

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buffer
        buf += data
        out: list[Packet] = []
        at = 0
        while len(buf) - at >= 2:
            got = _read_varint(buf, at + 1)
            if got is None:
                break
            length, start = got
            if length > self.max_packet:
                raise ProtocolError(f"packet of {length} bytes exceeds this client's limit {self.max_packet}")
            if len(buf) - start < length:
                break
            out.append(decode_packet(buf[at], bytes(buf[start:start + length])))
            at = start + length
        if at:
            del buf[:at]
        return out


# -- the asyncio shell -----------------------------------------------------------------------------------------------


class LeanConnection(asyncio.Protocol):
    """One MQTT 5 connection over TLS. Callbacks run on the loop:

        on_connack(packet)            CONNACK received (reason 0: connected)
        on_puback(packet_id, reason)  a QoS 1 publish of ours was acknowledged by the broker
        on_message(topic, payload)    a PUBLISH for us (acknowledged by this class if QoS 1)
        on_suback(packet_id, codes)   the broker's answer to a SUBSCRIBE (1 = granted QoS 1, 0x80+ = refused)
        on_lost(reason)               the connection ended (after or before CONNACK)
    """

    def __init__(self, client_id: str, *, keepalive: int = 30,
                 on_connack: Callable[[Packet], None] | None = None,
                 on_puback: Callable[[int, int], None] | None = None,
                 on_message: Callable[[str, bytes], None] | None = None,
                 on_suback: Callable[[int, list[int]], None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.client_id = client_id
        self.keepalive = keepalive
        self.on_connack = on_connack
        self.on_puback = on_puback
        self.on_message = on_message
        self.on_suback = on_suback
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.reader = PacketReader()
        self.connected = False
        self.closed = False
        self._next_id = 0
        self._in_use: set[int] = set()
        self._ping: asyncio.TimerHandle | None = None
        self._last_sent = 0.0

    # loop callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send(encode_connect(self.client_id, self.keepalive))

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.reader.feed(data)
        except ProtocolError as exc:
            self.close(f"protocol error: {exc}")
            return
        for packet in packets:
            self._handle(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(str(exc) if exc else "closed by the broker")

    # operations

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, dup: bool = False) -> int | None:
        """The packet id of the QoS 1 publish, or None when not connected or no packet id is free."""
        if not self.connected or self.transport is None:
            return None
        pid = self._packet_id() if qos else 0
        if qos and pid is None:
            return None
        self._send(encode_publish(topic, payload, pid or 0, qos, retain, dup))
        return pid

    def subscribe(self, filters: list[str]) -> int | None:
        pid = self._packet_id()
        if pid is None or self.transport is None:
            return None
        self._send(encode_subscribe(pid, filters))
        return pid

    def close(self, reason: str = "closed by the client") -> None:
        if self.transport is not None and not self.closed:
            if self.connected:
                self._send(DISCONNECT_BYTES)
            self.transport.close()
        self._end(reason)

    def abort(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._end(reason)

    # internals

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self._last_sent = asyncio.get_running_loop().time()

    def _packet_id(self) -> int | None:
        if len(self._in_use) >= 65535:
            return None
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._in_use:
                self._in_use.add(self._next_id)
                return self._next_id

    def _handle(self, packet: Packet) -> None:
        kind = packet.kind
        if kind == PUBLISH:
            if packet.qos == 1:
                self._send(encode_puback(packet.packet_id))
            if self.on_message is not None:
                self.on_message(packet.topic, packet.payload)
        elif kind == PUBACK:
            self._in_use.discard(packet.packet_id)
            if self.on_puback is not None:
                self.on_puback(packet.packet_id, packet.reason)
        elif kind == SUBACK:
            self._in_use.discard(packet.packet_id)
            if self.on_suback is not None:
                self.on_suback(packet.packet_id, packet.reasons)
        elif kind == CONNACK:
            if packet.reason == 0:
                self.connected = True
                if packet.server_keepalive is not None:
                    self.keepalive = packet.server_keepalive
                self._schedule_ping()
            if self.on_connack is not None:
                self.on_connack(packet)
            if packet.reason != 0:
                self.close(f"CONNACK reason 0x{packet.reason:02x}")
        elif kind == DISCONNECT:
            self.close(f"DISCONNECT from the broker, reason 0x{packet.reason:02x}")

    def _schedule_ping(self) -> None:
        if self.keepalive <= 0 or self.closed:
            return
        loop = asyncio.get_running_loop()
        due = self._last_sent + self.keepalive * 0.75
        if loop.time() >= due:
            self._send(PINGREQ_BYTES)
            due = self._last_sent + self.keepalive * 0.75
        self._ping = loop.call_at(due, self._schedule_ping)

    def _end(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.connected = False
        if self._ping is not None:
            self._ping.cancel()
        if self.on_lost is not None:
            self.on_lost(reason)


async def connect(host: str, port: int, context: ssl.SSLContext, connection: LeanConnection,
                  timeout: float) -> LeanConnection:
    """TCP + TLS handshake + CONNECT within `timeout` seconds (the agent's mqtt.connect_timeout); the CONNACK
    arrives later through the connection's on_connack."""
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(
        loop.create_connection(lambda: connection, host, port, ssl=context, ssl_handshake_timeout=timeout),
        timeout)
    return connection


def client_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """The agent's TLS settings (wire/mqttlink.py): verify the broker, TLS 1.2 or later, the gateway's
    certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context
