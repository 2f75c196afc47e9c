"""Every way the collector can decline (part of) a message: one stable code each.

A code is a counter name (`rejected.<code>` in the stats line), a log field (`reason=`) and the `reason` column
of the quarantine. wire.envelope.Rejection and wire.seal.SealReason are the codes of the envelope and the seal;
these are the collector's own, decided after a message is authentic. docs/security.md lists all of them with
what the gateway sees (is the message acknowledged end to end or sent again?).
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    # -- admission: before anything is decoded (collector/admission.py) ---------------------------------------
    RATE_LIMITED = "rate_limited"  # the gateway's token bucket (messages or bytes per second) is empty
    QUEUE_FULL = "queue_full"  # the gateway's own intake queue is full (it sends faster than its share)
    OVERLOAD = "overload"  # the collector's global intake bound is reached (the event loop falls behind)
    # -- what a reading may write into the shared store (collector/guard.py) ------------------------------------
    FIELD_TYPE_CONFLICT = "field_type_conflict"  # a field's value has another type than the store holds
    RESERVED_NAME = "reserved_name"  # a name the collector owns: a tag key as a field, a citynerve_* measurement
    SERIES_LIMIT = "series_limit"  # too many new series from one gateway in the window (or in total)
    DEVICE_LIMIT = "device_limit"  # too many new device ids from one gateway in the window (or in total)
    FIELD_LIMIT = "field_limit"  # too many new field names from one gateway in the window
    MEASUREMENT_LIMIT = "measurement_limit"  # too many new measurements from one gateway in the window
    # -- the status heartbeat (wire/status.py) --------------------------------------------------------------------
    BAD_STATUS = "bad_status"  # not a valid status document (schema, size, depth, encoding)
    STATUS_MISMATCH = "status_mismatch"  # a status document speaking for another gateway than its topic's
    # -- the store ----------------------------------------------------------------------------------------------
    INFLUX_REFUSED = "influx_refused"  # InfluxDB refused this message's own lines (with the server's reason)
    # -- the collector itself -----------------------------------------------------------------------------------
    INTERNAL = "internal"  # an unexpected exception while handling one message: a bug, logged once per minute


# Reasons that are about *when*, not *what*: the message is not acknowledged end to end, so the gateway keeps it
# in its outbox and sends it again later, when its budget allows. Everything else is about the content and
# would fail the same way every time: acknowledged (so the gateway stops sending it) and quarantined.
RETRY_LATER = frozenset({
    Reason.RATE_LIMITED, Reason.QUEUE_FULL, Reason.OVERLOAD,
    Reason.SERIES_LIMIT, Reason.DEVICE_LIMIT, Reason.FIELD_LIMIT, Reason.MEASUREMENT_LIMIT,
    Reason.INTERNAL,
})
