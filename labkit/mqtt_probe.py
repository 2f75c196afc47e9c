"""A plain paho subscriber that records what a broker delivers: for tests that check what is on the wire."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from labkit.pki import CertFiles


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class MqttProbe:
    def __init__(self, port: int, ca_file: str, topics: list[str], client: CertFiles | None = None,
                 client_id: str = "") -> None:
        self.messages: list[Seen] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        ctx = ssl.create_default_context(cafile=ca_file)
        if client:
            ctx.load_cert_chain(str(client.cert), str(client.key))
        self.client.tls_set_context(ctx)
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("probe could not subscribe")

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Seen(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Seen]], bool], timeout: float = 15) -> list[Seen]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met within {timeout}s; saw {len(self.messages)} messages")
                self._cond.wait(left)
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
