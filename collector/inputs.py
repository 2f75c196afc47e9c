"""Where the collector's messages come from and its downlinks go: one mosquitto ([mqtt], the default) or the
clustered broker tier ([nats], collector/natsin.py). collector/app.py holds one input and uses only this surface:

    mount           the mount point in front of the gateways' topics as the input names them ("" for none)
    window          messages the broker may hand over unacknowledged (receive maximum / max_inflight)
    ack_qos         the QoS the collector's end-to-end acknowledgements are published at
    connected       a threading.Event, set while connected (the metrics read it)
    describe()      for the start-up log line
    await open()    start connecting (and keep retrying); returns at once
    tasks()         long-lived tasks the collector supervises with its own
    subscribe(filters, qos)          on (re)connection, from `on_connected`; answered by `on_subscribed(codes)`
    ack(mid, qos)                    a message's fate is decided: the broker may forget it
    unsent()                         downlinks published and not yet written to the connection
    publish(topic, payload, qos, retain)   a downlink (acknowledgements, control documents)
    await flush(sent, timeout)       wait (briefly) until the broker has what was published
    await close()

Messages reach the collector through `on_message(msg)`, msg having paho's MQTTMessage attributes topic, payload,
qos, mid and retain: from paho's network thread on MQTT (the collector hands them to its loop), from the loop
itself on NATS.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from collector.config import CollectorConfig, default_client_id
from wire.mqttlink import MqttLink


class MqttInput(MqttLink):
    """The collector's MQTT 5 session: persistent, manual acknowledgement, receive maximum."""

    def __init__(self, cfg: CollectorConfig, *, on_connected: Callable[[bool], None],
                 on_message: Callable[[paho.MQTTMessage], None], on_subscribed: Callable[[list[int]], None]) -> None:
        m = cfg.mqtt
        super().__init__(m, m.client_id or default_client_id(), clean_start=False,
                         session_expiry=float(m.session_expiry), receive_maximum=m.receive_maximum, manual_ack=True,
                         on_connected=on_connected, on_message=on_message, on_subscribed=on_subscribed)
        self.mount = m.gateway_mount
        self.window = m.receive_maximum
        # QoS 0: an acknowledgement lost on the way costs a re-send the agent makes anyway, and the agents have no
        # persistent session for QoS 1 to keep one in. At QoS 1 their PUBACKs queued at mosquitto behind the
        # uplink messages a collector that is behind has not read yet, which capped acknowledgements near
        # 100/s at 10,000 gateways (docs/benchmarks.md "Fleet"; collector/app.py _publish_acks).
        self.ack_qos = 0

    def unsent(self) -> int:
        return self.unwritten_packets()

    def describe(self) -> str:
        return f"MQTT {self.settings.host}:{self.settings.port}"

    async def open(self) -> None:
        self.start()

    def tasks(self) -> list[asyncio.Task[None]]:
        return []  # paho's own thread

    async def flush(self, sent: list[paho.MQTTMessageInfo], timeout: float) -> None:
        """MqttLink.stop() disconnects at once: wait (at most `timeout`) until the broker has `sent`."""
        if sent and self.connected.is_set():
            waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mqtt-flush")
            try:
                await asyncio.get_running_loop().run_in_executor(waiter, _wait_published, sent, timeout)
            finally:
                waiter.shutdown(wait=False)

    async def close(self) -> None:
        self.stop()


def _wait_published(sent: list[paho.MQTTMessageInfo], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for info in sent:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        with contextlib.suppress(RuntimeError, ValueError):  # not queued (disconnected): nothing to wait for
            info.wait_for_publish(timeout=left)


def make_input(cfg: CollectorConfig, *, on_connected: Callable[[bool], None], on_message: Callable[[Any], None],
               on_subscribed: Callable[[list[int]], None], counters: Counter[str] | None = None) -> Any:
    """The input the configuration names: [nats] when present, else [mqtt]. `counters`: where the NATS input counts
    what it does (nats_*), e.g. the collector's own."""
    if cfg.nats is not None:
        from collector.natsin import NatsInput  # nats-py is needed only on this tier

        return NatsInput(cfg.nats, cfg.nats.name or default_client_id(), on_connected=on_connected,
                         on_message=on_message, on_subscribed=on_subscribed, counters=counters)
    return MqttInput(cfg, on_connected=on_connected, on_message=on_message, on_subscribed=on_subscribed)
