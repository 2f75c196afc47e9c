"""The collector's Prometheus metrics (`[metrics]`): read at scrape time, on the event loop, from the state the
collector keeps anyway (its counters and reason codes, the InfluxDB writer's stats, the admission queues, the
quarantine sink, the registry, the gateways' states and last-seen times). Nothing is counted twice.

Labels are bounded: reason codes (collector/reasons.py, wire.envelope.Rejection, wire.seal.SealReason), outcomes,
states. The one label that grows with the fleet is `gateway`, on one metric only,
citynerve_gateway_last_seen_timestamp_seconds: one series per gateway this collector heard from (revoked
gateways left out), so Prometheus can say which gateway went silent. At 10,000 gateways that is 10,000 series per
collector (about 0.8 MB of text per scrape; docs/operations.md "Metrics" has the measured cost); `per_gateway =
false` leaves it out, and the fleet-wide counts remain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from wire.metrics import MetricsServer
from wire.prom import Families, metrics_server

if TYPE_CHECKING:
    from collector.app import Collector

_P = "citynerve_collector_"


def server(collector: Collector) -> MetricsServer:
    assert collector.cfg.metrics is not None
    return metrics_server(collector.cfg.metrics, lambda: collect(collector))


def collect(c: Collector) -> Iterator[Metric]:
    f = Families()
    _messages(c, f)
    _influx(c, f)
    _queues(c, f)
    _gateways(c, f)
    if c.cfg.nats is not None:
        _nats(c, f)
    yield from f


def _nats(c: Collector, f: Families) -> None:
    """The clustered tier's input (collector/natsin.py): what it took from the consumer and what became of it."""
    events = {key.removeprefix("nats_"): v for key, v in c.counters.items() if key.startswith("nats_")}
    f.counters_by(_P + "nats_events_total", "The NATS input: messages taken from the shared consumer (taken), taken "
                  "again (redelivered), acknowledged to JetStream (acked) or not (acks_lost), held and marked in "
                  "progress, fetch errors, downlinks dropped", "event", events)


def _messages(c: Collector, f: Families) -> None:
    n = c.counters
    kinds = f.counter(_P + "messages_total", "Authentic, well-formed messages taken up, by kind (up: readings, "
                      "status: heartbeats)", ("kind",))
    kinds.add_metric(["up"], n["messages"])
    kinds.add_metric(["status"], n["status_messages"])
    f.counter(_P + "messages_duplicate_total", "Sealed messages seen before (stored again, idempotently)",
              ()).add_metric([], n["duplicates"])
    f.counters_by(_P + "messages_rejected_total", "Messages not taken up, by reason code: declined at the door "
                  "(sent again by the gateway), rejected (quarantined), refused by InfluxDB", "reason", c.rejections)
    f.counter(_P + "readings_total", "Readings in authentic uplink messages", ()).add_metric([], n["readings"])
    f.counter(_P + "readings_suspect_time_total", "Readings with an implausible sample time (a gateway's clock), "
              "stored aside in the suspect measurement", ()).add_metric([], n["suspect_time"])
    f.counter(_P + "readings_skipped_total", "Readings with nothing storable (every value missing)",
              ()).add_metric([], n["skipped_readings"])
    declined = {key.removeprefix("declined."): v for key, v in n.items() if key.startswith("declined.")}
    f.counters_by(_P + "readings_declined_total", "Readings (or fields of readings) the guard declined, by reason "
                  "code (limits: held back and sent again; types and names: left out)", "reason", declined)
    f.counter(_P + "internal_errors_total", "Messages that met a bug (reason internal; logged)",
              ()).add_metric([], n["internal_errors"])
    f.counter(_P + "acks_sent_total", "End-to-end acknowledgement messages published to gateways",
              ()).add_metric([], n["acks_sent"])
    f.counter(_P + "acked_messages_total", "Gateway messages acknowledged end to end (stored, or refused for "
              "their own content)", ()).add_metric([], n["acked_seqs"])
    f.counter(_P + "acks_dropped_total", "Acknowledgements not sent: the gateway's session was gone",
              ()).add_metric([], n["acks_dropped"])


def _influx(c: Collector, f: Families) -> None:
    w = c.writer.stats
    n = c.counters
    f.counter(_P + "influx_lines_written_total", "Lines InfluxDB confirmed stored", ()).add_metric([], w.lines_written)
    f.counter(_P + "influx_lines_refused_total", "Lines of messages InfluxDB refused", ()).add_metric(
        [], w.lines_rejected)
    batches = f.counter(_P + "influx_batches_total", "Batches written: every put stored (written), or some "
                        "refused (refused)", ("outcome",))
    batches.add_metric(["written"], w.batches_written)
    batches.add_metric(["refused"], w.batches_rejected)
    f.counter(_P + "influx_batches_split_total", "Batches written apart after InfluxDB refused their content",
              ()).add_metric([], w.batches_split)
    f.counter(_P + "influx_retries_total", "Write requests that failed and were retried (InfluxDB down, 5xx, "
              "timeout)", ()).add_metric([], w.retries)
    f.counter(_P + "influx_store_limit_refusals_total", "Messages refused by a limit of the whole store "
              "(max-values-per-tag, max-series-per-database); sent again by the gateway",
              ()).add_metric([], n["store_limit_refusals"])
    f.gauge(_P + "influx_pending_lines", "Lines accepted by the writer and not yet written or refused",
            ()).add_metric([], w.pending_lines)
    f.add_histogram(_P + "influx_request_seconds", "Duration of each write request to InfluxDB, failed and retried "
                    "ones included", (), [], w.request_seconds)
    f.add_histogram(_P + "influx_batch_lines", "Lines per batch written", (), [], w.batch_lines)


def _queues(c: Collector, f: Families) -> None:
    a = c.admission
    f.gauge(_P + "admission_messages", "Messages waiting in the per-gateway admission queues", ()).add_metric(
        [], a.messages)
    f.gauge(_P + "admission_bytes", "Bytes of those messages", ()).add_metric([], a.bytes)
    f.gauge(_P + "writer_pending_bytes", "Bytes of lines and payloads waiting for the InfluxDB writer",
            ()).add_metric([], a.pending_bytes)
    f.gauge(_P + "mqtt_connected", "1 while connected to the broker", ()).add_metric(
        [], int(c.link.connected.is_set()))
    q = c.quarantine
    if q is None:
        return
    entries = f.counter(_P + "quarantine_entries_total", "Messages sent to the quarantine: kept (written), over "
                        "the per-gateway-and-reason sample (sampled_out), or lost to a full queue or a write "
                        "error (dropped)", ("outcome",))
    entries.add_metric(["written"], q.written)
    entries.add_metric(["sampled_out"], q.sampled_out)
    entries.add_metric(["dropped"], q.dropped)
    f.gauge(_P + "quarantine_queue_entries", "Entries waiting to be written to the quarantine file",
            ()).add_metric([], q.pending)
    f.gauge(_P + "quarantine_stored_entries", "Entries the quarantine file holds (every collector sharing it)",
            ()).add_metric([], q.stored_entries)
    f.gauge(_P + "quarantine_stored_bytes", "Payload bytes the quarantine file holds", ()).add_metric(
        [], q.stored_bytes)


def _gateways(c: Collector, f: Families) -> None:
    states = Counter(c.gateway_state.values())
    by_state = f.gauge(_P + "gateways", "Gateways by the state of their latest status document this collector "
                       "received (online: heartbeat; offline: clean stop or the broker's last will)", ("state",))
    for state in sorted({"online", "offline", *states}):
        by_state.add_metric([state], states[state])
    f.gauge(_P + "gateways_seen", "Gateways this collector heard from since it started", ()).add_metric(
        [], len(c.last_seen))
    registry = c.registry
    if registry is not None:
        statuses = Counter(entry.status for entry in registry.list())
        enrolled = f.gauge(_P + "registry_gateways", "Gateways in the registry, by status", ("status",))
        for status in ("active", "revoked"):
            enrolled.add_metric([status], statuses[status])
    assert c.cfg.metrics is not None
    if not c.cfg.metrics.per_gateway:
        return
    seen = f.gauge("citynerve_gateway_last_seen_timestamp_seconds", "When this collector last heard from the "
                   "gateway: an authentic message or a heartbeat (Unix time; take the max over collectors)",
                   ("gateway",))
    for gateway, time_ns in sorted(c.last_seen.items()):
        if registry is not None and registry.status(gateway) == "revoked":
            continue  # out of the fleet: not an outage to alert on
        seen.add_metric([gateway], time_ns / 1e9)
