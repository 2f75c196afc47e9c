"""Gateway health from the status heartbeat (wire/status.py) as line protocol. Pure: no I/O, never raises.

    citynerve_gateway_health,gateway=<id> online=1i,backlog_messages=12i,...,backlog_age_s=42.5 <time>
    citynerve_device_health,device=<dev>,gateway=<id> polls=120i,errors=3i,last_error="timeout" <time>

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
__all__ = ["DEVICE_HEALTH_MEASUREMENT", "GATEWAY_HEALTH_MEASUREMENT", "MAX_DEVICES", "HealthLines", "backlog_age_s",
           "health_lines"]

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


class HealthLines(NamedTuple):
    lines: list[bytes]
    skipped_devices: int  # device entries left out: a name line protocol cannot express, or over the budget


def health_lines(doc: StatusDoc, gateway: str, receive_ns: int, policy: TimePolicy,
                 devices_allowed: Iterable[str] | None = None) -> HealthLines:
    """The points of one status document received on the status topic of `gateway` at `receive_ns`.

    `devices_allowed`: the device ids within the gateway's device budget (None: all)."""
    time_ns = doc.time_ns
    # The gateway's own time when plausible, as for readings (Ingest); else when it arrived. The last will has
    # no time_ns: the broker sends it when the gateway is gone, so the receive time is right for it.
    if time_ns is None or not policy.plausible(time_ns, receive_ns):
        time_ns = receive_ns
    fields: dict[str, int | float] = {"online": 1 if doc.state == ONLINE else 0}
    for name in GATEWAY_FIELDS:
        value = getattr(doc, name)
        if value is not None:
            fields[name] = value
    age = backlog_age_s(doc)
    if age is not None:
        fields["backlog_age_s"] = age
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
            device_fields["last_error"] = _CONTROL.sub(" ", entry.last_error[:MAX_ERROR_CHARS])
        try:
            lines.append(encode_line(DEVICE_HEALTH_MEASUREMENT, {"gateway": gateway, "device": device},
                                     device_fields, time_ns))
        except LineProtocolError:  # no field, or a name line protocol cannot express
            skipped += 1
    return HealthLines(lines, skipped)
