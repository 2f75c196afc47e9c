"""Gateway health and inventory from the status heartbeat (wire/status.py) as line protocol. Pure: no I/O,
never raises.

    citynerve_gateway_health,gateway=<id> online=1i,backlog_messages=12i,...,backlog_age_s=42.5,devices_failing=1i <time>
    citynerve_device_health,device=<dev>,gateway=<id> polls=120i,errors=3i,last_error="timeout",failing=0i <time>
    citynerve_gateway_info,gateway=<id> version="0.2.0",config_version=3i,latitude=52.37,... <time>
    citynerve_device_info,device=<dev>,gateway=<id> kind="modbus-tcp",unit=1i,modbus_vendor_name="..." <time>

Health points when something in them that matters changed (`health_mark`: the state, a restart, drops, re-sends,
an outbox reset, a backlog appearing or draining, a device's errors), with every heartbeat while the gateway has a
backlog, and otherwise every `[inventory] health_interval` (collector/inventory.py Change.write_health); the info
points only when the inventory changed or is due again (Change.write_info). So versions and serial numbers cost a
point per change, and a healthy gateway's steady heartbeat a point per health_interval, not per heartbeat (issue
14: the store's own records were a share of its work at fleet size that carried nothing new). Versions, hashes,
serial numbers and names are string fields, never tags: the tags stay the gateway and the device, whose values
the device budget already bounds. Every field name has one type (integers as integers, coordinates as floats,
whatever a document sends), so no write conflicts with an earlier one.

The status is not sealed: it is as trustworthy as the broker's ACL (a gateway may publish only its own status
topic), so the gateway tag comes from the topic; a document naming another gateway is refused before this
(Reason.STATUS_MISMATCH). The document was decoded against the strict schema wire.status.StatusDoc (every
field typed and bounded, at most MAX_DEVICES devices): what reaches here is well-typed, and only its names and
times are still checked. Its device ids count against the gateway's device budget (collector/guard.py) like
the devices of its readings, since each becomes a tag value in the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from collector.influx.lineproto import LineProtocolError, encode_line
from collector.ingest import TimePolicy
from wire.names import BAD_CHARACTER
from wire.status import MAX_DEVICES, MAX_ERROR_CHARS, ONLINE, StatusDoc

GATEWAY_HEALTH_MEASUREMENT = "citynerve_gateway_health"
DEVICE_HEALTH_MEASUREMENT = "citynerve_device_health"
GATEWAY_INFO_MEASUREMENT = "citynerve_gateway_info"
DEVICE_INFO_MEASUREMENT = "citynerve_device_info"
# DeviceInfo's texts (wire/status.py), stored under the same names; the Modbus identification's with "modbus_".
DEVICE_TEXTS = ("kind", "bus", "address", "protocol", "profile", "model", "vendor", "serial", "revision")
MODBUS_ID_TEXTS = ("vendor_name", "product_code", "revision", "vendor_url", "product_name", "model_name",
                   "user_application_name")

# The numeric fields of the heartbeat (wire/status.py), stored under the same names.
GATEWAY_FIELDS = (
    "since_ns",
    "backlog_messages",
    "backlog_readings",
    "backlog_bytes",
    "backlog_oldest_ns",
    "oldest_unacked_seq",
    "next_seq",
    "last_publish_ns",
    "last_ack_ns",
    "dropped_readings",
    "resent_messages",
    "outbox_resets",
)
__all__ = ["DEVICE_HEALTH_MEASUREMENT", "DEVICE_INFO_MEASUREMENT", "GATEWAY_HEALTH_MEASUREMENT",
           "GATEWAY_INFO_MEASUREMENT", "MAX_DEVICES", "HealthLines", "backlog_age_s", "health_lines", "health_mark",
           "info_lines", "point_time"]

# An exception text may hold newlines, which line protocol cannot carry in a string.
_CONTROL = BAD_CHARACTER  # and what else no name may hold (wire/names.py): lone surrogates cannot be UTF-8


def backlog_age_s(doc: StatusDoc) -> float | None:
    """How old the oldest unacknowledged message was when the heartbeat was made, in seconds: both times are the
    gateway's own clock, so a clock that is wrong by a constant does not matter. 0.0 for an empty backlog; None
    when the document does not tell. Stored because InfluxQL cannot subtract a field from a point's time, and
    "how far behind is this gateway" is what a dashboard and an alert ask."""
    if doc.backlog_messages == 0:
        return 0.0
    if doc.time_ns is None or doc.backlog_oldest_ns is None:
        return None
    return max(0, doc.time_ns - doc.backlog_oldest_ns) / 1e9


def health_mark(doc: StatusDoc) -> tuple:
    """What of a heartbeat, when it differs from the last one written, makes a health point due at once: the
    state, the agent's start (a restart), the event counters (readings dropped, messages re-sent, outbox resets),
    whether there is a backlog, and each device's errors, last error and failing flag (a device added or gone
    too). Counters that move with every heartbeat (next_seq, polls, the last publish and ack times, the backlog's
    size) are not in it: they are written with the slow heartbeat, or with every heartbeat while there is a
    backlog (collector/inventory.py Inventory.status)."""
    devices = tuple(sorted((name, d.errors, d.last_error, d.failing) for name, d in (doc.devices or {}).items()))
    return (doc.state, doc.since_ns, doc.dropped_readings, doc.resent_messages, doc.outbox_resets,
            bool(doc.backlog_messages), devices)


class HealthLines(NamedTuple):
    lines: list[bytes]
    skipped_devices: int  # device entries left out: a name line protocol cannot express, or over the budget


def point_time(doc: StatusDoc, receive_ns: int, policy: TimePolicy) -> int:
    """The gateway's own time when plausible, as for readings (Ingest); else when it arrived. The last will has
    no time_ns: the broker sends it when the gateway is gone, so the receive time is right for it."""
    time_ns = doc.time_ns
    if time_ns is None or not policy.plausible(time_ns, receive_ns):
        return receive_ns
    return time_ns


def _text(value: str) -> str:
    return _CONTROL.sub(" ", value[:MAX_ERROR_CHARS])


def health_lines(doc: StatusDoc, gateway: str, receive_ns: int, policy: TimePolicy,
                 devices_allowed: Iterable[str] | None = None) -> HealthLines:
    """The points of one status document received on the status topic of `gateway` at `receive_ns`.

    `devices_allowed`: the device ids within the gateway's device budget (None: all)."""
    time_ns = point_time(doc, receive_ns, policy)
    fields: dict[str, int | float] = {"online": 1 if doc.state == ONLINE else 0}
    for name in GATEWAY_FIELDS:
        value = getattr(doc, name)
        if value is not None:
            fields[name] = value
    age = backlog_age_s(doc)
    if age is not None:
        fields["backlog_age_s"] = age
    flags = [entry.failing for entry in (doc.devices or {}).values() if entry.failing is not None]
    if flags:  # an older agent says nothing of it: nothing is written, rather than a made-up 0
        fields["devices_failing"] = sum(flags)
    # Cannot fail: the gateway id passed the topic check, the fields are bounded ints, time_ns is checked.
    lines = [encode_line(GATEWAY_HEALTH_MEASUREMENT, {"gateway": gateway}, fields, time_ns)]
    if not doc.devices:
        return HealthLines(lines, 0)
    allowed = None if devices_allowed is None else set(devices_allowed)
    skipped = 0
    for device, entry in doc.devices.items():
        if allowed is not None and device not in allowed:
            skipped += 1
            continue
        device_fields: dict[str, int | str] = {}
        if entry.polls is not None:
            device_fields["polls"] = entry.polls
        if entry.errors is not None:
            device_fields["errors"] = entry.errors
        if entry.last_error is not None:
            device_fields["last_error"] = _text(entry.last_error)
        if entry.failing is not None:
            device_fields["failing"] = int(entry.failing)
        try:
            lines.append(encode_line(DEVICE_HEALTH_MEASUREMENT, {"gateway": gateway, "device": device},
                                     device_fields, time_ns))
        except LineProtocolError:  # no field, or a name line protocol cannot express
            skipped += 1
    return HealthLines(lines, skipped)


def info_lines(doc: StatusDoc, gateway: str, time_ns: int, devices_allowed: Iterable[str] | None = None) -> list[bytes]:
    """citynerve_gateway_info and one citynerve_device_info point per inventory entry (within the budget) of an
    online status; none for a document without them (an older agent's, the last will)."""
    if doc.state != ONLINE:
        return []
    fields: dict[str, int | float | str] = {}
    for name in ("version", "mqtt", "config_sha256", "location_source"):
        value = getattr(doc, name)
        if value:
            fields[name] = _text(value)
    if doc.config_version is not None:
        fields["config_version"] = doc.config_version
    if doc.location is not None:
        fields["latitude"] = float(doc.location.lat)
        fields["longitude"] = float(doc.location.lon)
        if doc.location.alt is not None:
            fields["altitude"] = float(doc.location.alt)  # metres, the vocabulary's name (wire/vocabulary.toml)
        if doc.location.time_ns is not None:
            fields["location_time_ns"] = doc.location.time_ns
    if doc.inventory is not None:
        fields["devices"] = len(doc.inventory)
    lines = []
    if fields:
        lines.append(encode_line(GATEWAY_INFO_MEASUREMENT, {"gateway": gateway}, fields, time_ns))
    allowed = None if devices_allowed is None else set(devices_allowed)
    for device, info in (doc.inventory or {}).items():
        if allowed is not None and device not in allowed:
            continue
        device_fields: dict[str, int | str] = {name: _text(getattr(info, name)) for name in DEVICE_TEXTS
                                              if getattr(info, name)}
        if info.unit is not None:
            device_fields["unit"] = info.unit
        ident = info.modbus_id
        if ident is not None:
            device_fields["modbus_id"] = _text(ident.state)
            if ident.conformity is not None:
                device_fields["modbus_conformity"] = ident.conformity
            device_fields.update({f"modbus_{name}": _text(getattr(ident, name)) for name in MODBUS_ID_TEXTS
                                  if getattr(ident, name)})
        try:
            lines.append(encode_line(DEVICE_INFO_MEASUREMENT, {"gateway": gateway, "device": device},
                                     device_fields, time_ns))
        except LineProtocolError:  # a device id line protocol cannot carry, or an empty entry: skipped
            continue
    return lines
