"""Gateway health from the status heartbeat (wire/status.py) as line protocol. Pure: no I/O, never raises.

    citynerve_gateway_health,gateway=<id> online=1i,backlog_messages=12i,... <time>
    citynerve_device_health,device=<dev>,gateway=<id> polls=120i,errors=3i,last_error="timeout" <time>

The status is not sealed: it is as trustworthy as the broker's ACL (a gateway may publish only its own status
topic), so the gateway tag comes from the topic, never from the document. A document from an older or newer
agent may lack fields or carry new ones: missing, null and non-numeric values are left out, nothing is refused.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from collector.influx.lineproto import INT64_MAX, INT64_MIN, LineProtocolError, encode_line
from collector.ingest import TimePolicy
from wire.status import ONLINE

GATEWAY_HEALTH_MEASUREMENT = "citynerve_gateway_health"
DEVICE_HEALTH_MEASUREMENT = "citynerve_device_health"

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
# A heartbeat is small JSON from a device we do not fully trust: bound what one message can make us write.
MAX_DEVICES = 1000
MAX_ERROR_CHARS = 1024

_DEVICE_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,128}\Z")  # wire.schema.Name, as in the readings' device tag
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class HealthLines(NamedTuple):
    lines: list[bytes]
    skipped_devices: int  # device entries left out: invalid name or entry, or beyond MAX_DEVICES


def _number(value: Any) -> int | float | None:
    # bool is an int in Python, but a flag is not a count; an int outside int64 cannot be stored.
    if type(value) is int:
        return value if INT64_MIN <= value <= INT64_MAX else None
    if type(value) is float:
        return value if value - value == 0.0 else None
    return None


def _count(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value <= INT64_MAX else None


def health_lines(doc: dict[str, Any], gateway: str, receive_ns: int, policy: TimePolicy) -> HealthLines:
    """The points of one status document received on the status topic of `gateway` at `receive_ns`."""
    time_ns = doc.get("time_ns")
    # The gateway's own time when plausible, as for readings (Ingest); else when it arrived. The last will has
    # no time_ns: the broker sends it when the gateway is gone, so the receive time is right for it.
    if type(time_ns) is not int or not policy.min_time_ns <= time_ns <= receive_ns + policy.max_future_ns:
        time_ns = receive_ns
    fields: dict[str, int | float] = {"online": 1 if doc.get("state") == ONLINE else 0}
    for name in GATEWAY_FIELDS:
        value = _number(doc.get(name))
        if value is not None:
            fields[name] = value
    # Cannot fail: the gateway id passed the topic check, the fields are int64 or finite, time_ns is checked.
    lines = [encode_line(GATEWAY_HEALTH_MEASUREMENT, {"gateway": gateway}, fields, time_ns)]
    devices = doc.get("devices")
    if not isinstance(devices, dict):  # absent, or an older agent's device count: no per-device health
        return HealthLines(lines, 0)
    skipped = max(0, len(devices) - MAX_DEVICES)
    for index, (device, entry) in enumerate(devices.items()):
        if index >= MAX_DEVICES:
            break
        if not isinstance(device, str) or not _DEVICE_NAME.match(device) or not isinstance(entry, dict):
            skipped += 1
            continue
        device_fields: dict[str, int | str] = {}
        for name in ("polls", "errors"):
            count = _count(entry.get(name))
            if count is not None:
                device_fields[name] = count
        error = entry.get("last_error")
        if isinstance(error, str):
            # An exception text may hold newlines, which line protocol cannot carry in a string.
            device_fields["last_error"] = _CONTROL.sub(" ", error[:MAX_ERROR_CHARS])
        try:
            lines.append(encode_line(DEVICE_HEALTH_MEASUREMENT, {"gateway": gateway, "device": device},
                                     device_fields, time_ns))
        except LineProtocolError:  # no valid field, or a name line protocol cannot express
            skipped += 1
    return HealthLines(lines, skipped)
