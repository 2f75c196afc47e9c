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
    devices             {device id: {"polls": n, "errors": n, "last_error": "..."}} (this process)
"""

from __future__ import annotations

import json
from typing import Any

ONLINE = "online"
OFFLINE = "offline"


def encode_status(state: str, **details: Any) -> bytes:
    return json.dumps({"state": state, **details}, separators=(",", ":"), sort_keys=True).encode()


def decode_status(payload: bytes) -> dict[str, Any]:
    """Raises ValueError for anything that is not a JSON object with a string "state"."""
    doc = json.loads(payload)
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), str):
        raise ValueError('expected a JSON object with a string "state"')
    return doc
