"""The retained gateway status message on <prefix>/<gateway_id>/status: small JSON for humans and dashboards.

The birth message says "online" with details; the last will says "offline". Both are retained so that a
subscriber arriving later learns the current state at once.

While online, the agent republishes the status (retained) as a heartbeat every `uplink.heartbeat_interval`,
with its health; a collector writes it to InfluxDB (citynerve_gateway_health, citynerve_device_health):

    state               "online" | "offline"
    gateway             gateway id
    time_ns             when this heartbeat was made (gateway clock); absent in the last will
    version, since_ns   agent version, process start
    mqtt                protocol in use ("MQTTv5" | "MQTTv311")
    backlog_messages    messages in the outbox not yet acknowledged end to end
    backlog_readings    readings in them
    backlog_bytes       their encoded size
    backlog_oldest_ns   creation time of the oldest unacknowledged message, or null
    oldest_unacked_seq  its sequence number, or null
    next_seq            the sequence number the next message gets
    last_publish_ns     last time a message was handed to the broker, or null
    last_ack_ns         last time an end-to-end acknowledgement arrived, or null
    dropped_readings    readings dropped by the outbox bounds since the outbox was created
    resent_messages     messages sent again for want of an acknowledgement (this process)
    outbox_resets       damaged outbox databases moved aside (this process)
    devices             {device id: {"polls": n, "errors": n, "last_error": "...", "failing": bool}} (this
                        process; failing: its last poll failed, or a serial device sent nothing for a while)

and the gateway's inventory, which the collector keeps (collector/inventory.py, `edge-collector gateways`):

    config_version      the running configuration's version (0: the local file, never pushed; docs/control.md)
    config_sha256       its SHA-256 (hex), when known
    location            {"lat": deg, "lon": deg, "alt": m or null, "time_ns": fix time (gps only)}
    location_source     "config" ([gateway] location) | "gps" (the latest fix of an NMEA source)
    inventory           {device id: DeviceInfo}: kind, bus, unit or address, protocol, profile, model, vendor, serial,
                        revision, and `modbus_id`, what a Modbus device answered to Read Device Identification
                        (FC 43 / MEI 14): state "read" | "not_offered" | "pending" | "failed", conformity level
                        and the basic and regular objects (vendor_name, product_code, revision, vendor_url,
                        product_name, model_name, user_application_name)

Every text is bounded; enumerations (kind, state, location_source) are bounded strings rather than closed sets,
so that a newer agent's new value does not make an older collector refuse the whole heartbeat.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from wire.control import Sha256Hex
from wire.schema import GatewayId, Name, Seq, TimeNs

ONLINE = "online"
OFFLINE = "offline"

# A status is small (a few hundred bytes plus ~60 per device for its health and ~300 for its inventory entry);
# anything larger is refused before it is parsed, which also bounds the nesting a parser could be made to
# descend. The agent leaves its inventory out rather than send more (edge_agent/inventory.py).
MAX_STATUS_BYTES = 256 * 1024
MAX_DEVICES = 1000
MAX_ERROR_CHARS = 1024
MAX_TEXT_CHARS = 128  # an identification text (edge_agent/modbus/identify.py cuts objects to this)
MAX_BUS_CHARS = 300  # a bus: a device id (128), a serial port path, or tcp://<host of up to 253>:<port>
# Location bounds (WGS 84 degrees; metres above mean sea level: the Dead Sea shore to an airliner's ceiling),
# shared with the agent's [gateway] location.
LAT_RANGE = (-90.0, 90.0)
LON_RANGE = (-180.0, 180.0)
ALT_RANGE = (-1000.0, 20000.0)

Count = Seq  # a non-negative int64, as the wire schema's seq
Short = Annotated[str, msgspec.Meta(max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]
Latitude = Annotated[float, msgspec.Meta(ge=LAT_RANGE[0], le=LAT_RANGE[1])]
Longitude = Annotated[float, msgspec.Meta(ge=LON_RANGE[0], le=LON_RANGE[1])]
Altitude = Annotated[float, msgspec.Meta(ge=ALT_RANGE[0], le=ALT_RANGE[1])]


class DeviceHealth(msgspec.Struct, frozen=True, omit_defaults=True):
    polls: Count | None = None
    errors: Count | None = None
    last_error: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CHARS)] | None = None
    failing: bool | None = None


class Location(msgspec.Struct, frozen=True, omit_defaults=True):
    lat: Latitude
    lon: Longitude
    alt: Altitude | None = None
    time_ns: TimeNs | None = None  # when the fix was taken (gps)


class ModbusId(msgspec.Struct, frozen=True, omit_defaults=True):
    """A Modbus device's answer to Read Device Identification (FC 43 / MEI 14, Modbus Application Protocol
    1.1b §6.21); the objects are named as in edge_agent/modbus/frames.py DEVICE_ID_OBJECTS."""

    state: Short  # "read" | "not_offered" | "pending" | "failed"
    conformity: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    vendor_name: Text | None = None
    product_code: Text | None = None
    revision: Text | None = None
    vendor_url: Text | None = None
    product_name: Text | None = None
    model_name: Text | None = None
    user_application_name: Text | None = None
    error: Annotated[str, msgspec.Meta(max_length=512)] | None = None  # why the last attempt failed


class DeviceInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """One device of the gateway's inventory: what the configuration says and what the device says."""

    kind: Short  # the [[devices]] kind: "modbus" | "modbus-tcp" | "serial" | "dlt645" | "cjt188" | "mbus"
    bus: Annotated[str, msgspec.Meta(max_length=MAX_BUS_CHARS)] | None = None
    unit: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    address: Text | None = None  # a meter's: DL/T 645 / CJ/T 188 digits, an M-Bus primary or secondary address
    protocol: Short | None = None  # serial: "dsmr", "iec62056-21", "nmea", ...
    profile: Text | None = None  # the firmware profile's name ("sunspec": discovered)
    model: Text | None = None  # the profile's model, or the SunSpec device's
    vendor: Text | None = None
    serial: Text | None = None  # serial number, meter or sensor id where the device tells it
    revision: Text | None = None
    modbus_id: ModbusId | None = None


class StatusDoc(msgspec.Struct, frozen=True):
    """The status document as the collector accepts it: every field typed and bounded. Unknown fields (a
    newer agent's) are skipped, never stored; a known field of the wrong type refuses the document."""

    state: Literal["online", "offline"]
    gateway: GatewayId | None = None
    time_ns: TimeNs | None = None
    version: Short | None = None
    since_ns: TimeNs | None = None
    mqtt: Short | None = None
    backlog_messages: Count | None = None
    backlog_readings: Count | None = None
    backlog_bytes: Count | None = None
    backlog_oldest_ns: TimeNs | None = None
    oldest_unacked_seq: Count | None = None
    next_seq: Count | None = None
    last_publish_ns: TimeNs | None = None
    last_ack_ns: TimeNs | None = None
    dropped_readings: Count | None = None
    resent_messages: Count | None = None
    outbox_resets: Count | None = None
    devices: Annotated[dict[Name, DeviceHealth], msgspec.Meta(max_length=MAX_DEVICES)] | None = None
    config_version: Count | None = None
    config_sha256: Sha256Hex | None = None
    location: Location | None = None
    location_source: Short | None = None
    inventory: Annotated[dict[Name, DeviceInfo], msgspec.Meta(max_length=MAX_DEVICES)] | None = None


_status_decoder = msgspec.json.Decoder(StatusDoc)


class StatusError(ValueError):
    pass


def encode_status(state: str, **details: Any) -> bytes:
    return json.dumps({"state": state, **details}, separators=(",", ":"), sort_keys=True).encode()


def decode_status(payload: bytes | memoryview) -> StatusDoc:
    """The typed status, or StatusError naming what is wrong (size, JSON position, key path)."""
    if len(payload) > MAX_STATUS_BYTES:
        raise StatusError(f"{len(payload)} bytes > limit {MAX_STATUS_BYTES}")
    try:
        return _status_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise StatusError(str(exc)) from None
    except UnicodeDecodeError as exc:  # msgspec raises it as such for invalid UTF-8 in a string
        raise StatusError(f"invalid UTF-8 at byte offset {exc.start}: {exc.reason}") from None
    except RecursionError:  # unknown fields nested deeper than the parser's stack, within the size bound
        raise StatusError("nested too deeply") from None
