"""What the collector's per-gateway last-seen time means (citynerve_gateway_last_seen_timestamp_seconds, the basis
of the GatewayOffline alert), with a real collector process and mosquitto:

- a retained heartbeat, replayed when the collector subscribes, counts at the gateway's own time (capped at its
  receive time): after a collector restart a silent gateway is not "seen now";
- a last will (retained or live) is the broker speaking, not the gateway: it counts the gateway offline but is no
  sign of life;
- a rejected message is no sign of life either.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labkit import stack
from labkit.influxd import InfluxdServer
from labkit.mosquitto import MosquittoServer
from labkit.process import free_port
from tests.fixtures_mqtt import mqtt_settings
from wire.envelope import seal_plain
from wire.mqttlink import MqttLink
from wire.schema import Batch, Reading
from wire.status import encode_status

pytestmark = pytest.mark.integration

PREFIX = "seenlab/v1"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_scrape(port: int, predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last scrape: {samples}")
        time.sleep(0.1)


def seen(samples, gateway: str) -> float | None:
    return samples.get(("citynerve_gateway_last_seen_timestamp_seconds", (("gateway", gateway),)))


def test_last_seen_counts_the_gateways_own_messages_only(tmp_path: Path, mosquitto: MosquittoServer,
                                                           influxd: InfluxdServer, influx_db: str) -> None:
    port = free_port()
    config = stack.write_collector_config(
        tmp_path / "collector.toml", stack.mqtt_section(mosquitto, client_id="collector-seen", topic_prefix=PREFIX),
        {"api": "v1", "url": influxd.url, "database": influx_db}, metrics={"listen": port})
    link = MqttLink(mqtt_settings(mosquitto), "seen-publisher", max_inflight=100)
    link.start()
    assert link.connected.wait(10)
    status = f"{PREFIX}/{{}}/status"
    old_ns = time.time_ns() - 600 * 10**9
    retained = [status.format("gw-old"), status.format("gw-gone")]
    collector = stack.collector_process(config)
    try:
        # before the collector subscribes: gw-old's last heartbeat, ten minutes ago; gw-gone's last will
        link.publish(retained[0], encode_status("online", gateway="gw-old", time_ns=old_ns), qos=1,
                     retain=True).wait_for_publish(10)
        link.publish(retained[1], encode_status("offline", gateway="gw-gone"), qos=1, retain=True).wait_for_publish(10)
        collector.start()
        samples = wait_scrape(port, lambda s: seen(s, "gw-old") is not None
                              and s.get(("citynerve_collector_gateways", (("state", "offline"),))) == 1)
        assert seen(samples, "gw-old") == pytest.approx(old_ns / 1e9)
        assert seen(samples, "gw-gone") is None

        # gw-a speaks (readings, then a heartbeat), then the broker publishes its last will: still seen at its
        # heartbeat. gw-bad sends something the collector rejects: never seen.
        before = time.time_ns()
        now = time.time_ns()
        link.publish(f"{PREFIX}/gw-a/up", seal_plain(Batch("gw-a", 0, now, [Reading("m", "seen", now, {"v": 1.0})])),
                     qos=1).wait_for_publish(10)
        link.publish(status.format("gw-a"), encode_status("online", gateway="gw-a", time_ns=time.time_ns()),
                     qos=1).wait_for_publish(10)
        samples = wait_scrape(port, lambda s: s.get(("citynerve_collector_messages_total", (("kind", "status"),))) == 2)
        heard = seen(samples, "gw-a")  # (the first status message was gw-old's retained one)
        assert before / 1e9 <= heard <= time.time()
        link.publish(status.format("gw-a"), encode_status("offline", gateway="gw-a"), qos=1).wait_for_publish(10)
        link.publish(f"{PREFIX}/gw-bad/up", b"\x01not msgpack", qos=1).wait_for_publish(10)
        samples = wait_scrape(port, lambda s: s.get(("citynerve_collector_gateways", (("state", "offline"),))) == 2
                              and sum(v for (n, _), v in s.items()
                                      if n == "citynerve_collector_messages_rejected_total") == 1)
        assert seen(samples, "gw-a") == heard
        assert seen(samples, "gw-bad") is None
        assert samples[("citynerve_collector_gateways_seen", ())] == 2  # gw-old and gw-a
    finally:
        collector.stop()
        for topic in retained:
            link.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear the retained messages
        link.stop()
