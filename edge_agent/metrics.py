"""The agent's Prometheus metrics (`[metrics]`, off unless configured): read at scrape time, on the event loop,
from the state the agent keeps anyway (device and bus counters, the transport's counters, the loop's view of the
outbox, the sender's window, AgentStats) plus the kernel's clock state. Nothing is counted twice.

Every label value is bounded by this gateway's configuration: device ids, bus ids, and the kinds of error a
device or a bus can have (reason codes of the decoders and of the Modbus frames). docs/operations.md "Metrics"
lists every metric.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from edge_agent.app import AGENT_VERSION, poll_errors
from edge_agent.clock import kernel_clock
from wire.metrics import MetricsServer
from wire.prom import Families, metrics_server

if TYPE_CHECKING:
    from edge_agent.app import Agent

_P = "citynerve_agent_"


def server(agent: Agent) -> MetricsServer:
    assert agent.cfg.metrics is not None
    return metrics_server(agent.cfg.metrics, lambda: collect(agent))


def collect(agent: Agent) -> Iterator[Metric]:
    f = Families()
    f.gauge(_P + "info", "The gateway id and the agent's version (always 1)", ("gateway", "version")).add_metric(
        [agent.gateway_id, AGENT_VERSION], 1)
    _devices(agent, f)
    _buses(agent, f)
    _outbox(agent, f)
    _delivery(agent, f)
    _clock(agent, f)
    yield from f


def _devices(agent: Agent, f: Families) -> None:
    polls = f.counter(_P + "device_polls_total", "Polls that produced values (Modbus units and meters on buses), or "
                      "samples decoded (serial)",
                      ("device",))
    errors = f.counter(_P + "device_errors_total", "Failed polls or parts of polls, by kind: no_answer, exception_<code> "
                       "(Modbus exception), rejected[.<reason>] (bad frame), answer_errors (a meter's fields that "
                       "failed), decode_errors, open_failures, lost",
                       ("device", "kind"))
    failing = f.gauge(_P + "device_consecutive_failures", "Polls in a row that produced nothing (devices on buses; "
                      "the device backs off while this is above 0)", ("device",))
    overruns = f.counter(_P + "device_overruns_total", "Poll deadlines skipped because the bus was busy (devices "
                         "on buses)",
                         ("device",))
    answer = f.histogram(_P + "device_answer_seconds", "Time from a request to its answer (a Modbus unit's "
                         "validated answer; a meter's answer, to its last byte)",
                         ("device",))

    def polled(device_id: str, stats: Counter[str], polls_key: str) -> None:
        polls.add_metric([device_id], stats[polls_key])
        for kind, n in sorted(poll_errors(stats).items()):
            errors.add_metric([device_id, kind], n)

    for engine in agent.buses:
        for device in engine.devices:
            polled(device.id, device.stats, "polls")
            failing.add_metric([device.id], device.failures)
            overruns.add_metric([device.id], device.stats["overruns"])
            h = device.answer_seconds
            answer.add_metric([device.id], h.cumulative(), h.sum)
    for source in agent.serial_sources:
        polled(source.device.id, source.stats, "samples")


def _buses(agent: Agent, f: Families) -> None:
    busy = f.counter(_P + "bus_busy_seconds_total", "Time the bus spent in transactions; rate() is its utilisation",
                     ("bus",))
    util = f.gauge(_P + "bus_utilisation_ratio", "Share of time in transactions since the bus's last report period "
                   "began (at most 60 s ago)", ("bus",))
    overruns = f.counter(_P + "bus_overruns_total", "Poll deadlines skipped on the bus: it cannot keep its intervals",
                         ("bus",))
    opens = f.counter(_P + "bus_connect_failures_total", "Failed attempts to open the port or connection",
                      ("bus",))
    lost = f.counter(_P + "bus_connections_lost_total", "Port or connection lost during a poll", ("bus",))
    transactions = f.counter(_P + "bus_transactions_total", "Requests sent on the bus", ("bus",))
    timeouts = f.counter(_P + "bus_timeouts_total", "Requests without a complete answer in time", ("bus",))
    rejected = f.counter(_P + "bus_rejected_frames_total", "Answers rejected before decoding, by reason (crc, unit, "
                         "function, transaction, garbage, ...)", ("bus", "reason"))
    traffic = f.counter(_P + "bus_bytes_total", "Bytes on the bus", ("bus", "direction"))
    for engine in agent.buses:
        bus = engine.bus.id
        busy.add_metric([bus], engine.busy_seconds_total)
        util.add_metric([bus], engine.utilisation())
        overruns.add_metric([bus], engine.stats["overruns"])
        opens.add_metric([bus], engine.stats["connect_failures"])
        lost.add_metric([bus], engine.stats["connection_lost"])
        stats = engine.transport.stats
        transactions.add_metric([bus], stats["transactions"])
        timeouts.add_metric([bus], stats["timeouts"])
        for key, n in sorted(stats.items()):
            if key.startswith("rejected."):
                rejected.add_metric([bus, key.removeprefix("rejected.")], n)
        traffic.add_metric([bus, "in"], stats["bytes_in"])
        traffic.add_metric([bus, "out"], stats["bytes_out"])


def _outbox(agent: Agent, f: Families) -> None:
    b = agent.box.backlog
    f.gauge(_P + "outbox_messages", "Messages in the outbox, waiting for an end-to-end acknowledgement",
            ()).add_metric([], b.messages)
    f.gauge(_P + "outbox_readings", "Readings in those messages", ()).add_metric([], b.readings)
    f.gauge(_P + "outbox_bytes", "Bytes of those messages", ()).add_metric([], b.bytes)
    # An age measured on the gateway's own clock (now minus the oldest message's creation, both the gateway's),
    # not a timestamp: Prometheus's time() minus a gateway's timestamp would add the gateway's clock error.
    age = max(0.0, (time.time_ns() - b.oldest_ns) / 1e9) if b.oldest_ns else 0.0
    f.gauge(_P + "outbox_oldest_age_seconds", "Age of the oldest message in the outbox (0 when empty)",
            ()).add_metric([], age)
    dropped = f.counter(_P + "readings_dropped_total", "Readings dropped: the cycle buffer was full (buffer), or the "
                        "outbox's size or age bound was reached (outbox)", ("where",))
    dropped.add_metric(["buffer"], agent.buffer.dropped_total)
    dropped.add_metric(["outbox"], agent.box.dropped_readings_total)
    f.gauge(_P + "buffer_readings", "Readings of the cycle in progress, not yet committed", ()).add_metric(
        [], len(agent.buffer))
    f.gauge(_P + "readings_held", "Readings stamped while the clock was not synchronised, held until its offset is "
            "known (`[clock] rtc = false`; in RAM and in the outbox)", ()).add_metric(
        [], agent.box.held.readings + len(agent.held_buffer))
    f.counter(_P + "outbox_commit_failures_total", "Cycle commits that failed (disk full, I/O error); retried "
              "next cycle", ()).add_metric([], agent.stats.commit_failures)
    f.counter(_P + "outbox_resets_total", "Damaged outbox files moved aside", ()).add_metric([], agent.box.resets)


def _delivery(agent: Agent, f: Families) -> None:
    f.counter(_P + "messages_published_total", "Messages handed to the MQTT client, re-sends included",
              ()).add_metric([], agent.stats.published_messages)
    f.counter(_P + "messages_resent_total", "Messages sent again after their acknowledgement timed out",
              ()).add_metric([], agent.sender.resent)
    f.counter(_P + "messages_acked_total", "Messages a collector acknowledged as stored (end to end)",
              ()).add_metric([], agent.stats.acked_messages)
    f.counter(_P + "acks_rejected_total", "Acknowledgements ignored (not authentic, malformed)",
              ()).add_metric([], agent.stats.bad_acks)
    f.gauge(_P + "messages_unacked", "Messages sent and not yet acknowledged (the window in use)",
            ()).add_metric([], len(agent.sender.rules.outstanding))
    f.gauge(_P + "mqtt_connected", "1 while connected to the broker", ()).add_metric([], int(agent.sender.link_up))
    if agent.stats.last_ack_ns is not None:
        f.gauge(_P + "last_ack_timestamp_seconds", "When the last acknowledgement arrived (the gateway's clock)",
                ()).add_metric([], agent.stats.last_ack_ns / 1e9)


def _clock(agent: Agent, f: Families) -> None:
    state = kernel_clock()
    if state is not None:
        synchronised, max_error, est_error = state
        f.gauge(_P + "clock_synchronised", "1 when the kernel's clock is synchronised (NTP, chrony, timesyncd: "
                "adjtimex STA_UNSYNC clear)", ()).add_metric([], int(synchronised))
        f.gauge(_P + "clock_max_error_seconds", "The kernel's maximum error of the clock (adjtimex maxerror)",
                ()).add_metric([], max_error)
        f.gauge(_P + "clock_estimated_error_seconds", "The kernel's estimated error of the clock (adjtimex esterror)",
                ()).add_metric([], est_error)
    age = agent.sealer.last_downlink_age if agent.sealer is not None else None
    if age is not None:
        f.gauge(_P + "clock_ack_offset_seconds", "This gateway's clock minus the collector's, as seen in the newest "
                "sealed downlink (acknowledgement or control message; includes its transit time, usually well under "
                "a second)", ()).add_metric([], age)
