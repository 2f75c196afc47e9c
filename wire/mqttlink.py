"""One MQTT connection as both programs need it: paho-mqtt 2.x over TLS, TCP_NODELAY, MQTT v5 with a fallback
to 3.1.1, reconnect with exponential backoff. The agent and the collector each hold one `MqttLink`.

paho runs its network loop in its own thread (loop_start); callbacks given to MqttLink run in that thread and
must only hand work over (e.g. loop.call_soon_threadsafe), never block, and read no state the event loop owns.

paho-mqtt 2.x re-raises an exception from a callback in its network thread, which ends that thread silently:
no more keepalives, reconnects or messages, while the process looks alive. So every callback MqttLink gives
paho (the user's and its own) runs inside a guard: an exception is logged (rate-limited per callback, with the
callback's name and where it was raised) and counted in `callback_errors`, and the network thread goes on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import socket
import ssl
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from wire.config import Duration, Secret, check_client_tls, invalid
from wire.logs import RateLimitedLog
from wire.topics import DEFAULT_PREFIX, is_valid_prefix

log = logging.getLogger("citynerve.mqtt")

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]

# CONNACK codes meaning "this broker does not speak the protocol version you asked for":
# 0x84 (MQTT 5 "Unsupported Protocol Version") and 1 (MQTT 3.1.1 "unacceptable protocol version").
_UNSUPPORTED_PROTOCOL = {132, 1}


class MqttSettings(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8883
    tls: bool = True
    ca_file: str | None = None  # None: the system's CA store
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    username: str | None = None
    password: Secret | None = None
    client_id: str | None = None  # default chosen by each program
    topic_prefix: str = DEFAULT_PREFIX
    keepalive: Duration = Duration(30)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    reconnect_min: Duration = Duration(1)
    reconnect_max: Duration = Duration(60)
    connect_timeout: Duration = Duration(10)

    def __post_init__(self) -> None:
        if not is_valid_prefix(self.topic_prefix):
            raise invalid("topic_prefix", f'expected topic levels without + # or empty levels, got "{self.topic_prefix}"')
        check_client_tls(self)
        if self.reconnect_min <= 0 or self.reconnect_max < self.reconnect_min:
            raise invalid("reconnect_max", "expected reconnect_min > 0 and reconnect_max >= reconnect_min")


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def set_tcp_nodelay(sock: Any) -> None:
    """paho does not disable Nagle; a QoS 1 stream without this was measured at ~300 msg/s instead of ~17,000."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        log.debug("could not set TCP_NODELAY on %r", sock)


def reconnect_delay(attempt: int, minimum: float, maximum: float, rand: Callable[[], float]) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 after a connection was lost, 1 after that attempt
    failed, ...): "full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015), a uniform draw
    in [0, min(maximum, minimum * 2**attempt)). When a broker restarts, every gateway loses its connection at
    the same instant; without jitter they all come back at minimum, 2 x minimum, 4 x minimum ... after it, in
    waves that overflow the broker's listen backlog and its TLS handshake rate, with the machine idle between
    (issue 14: 51 s for 10,000 gateways). Drawn afresh per attempt, the attempts spread over the current
    window, and the window grows while the broker stays out of reach. `rand` returns [0, 1) (random.random)."""
    ceiling = min(maximum, minimum * 2.0 ** min(attempt, 32))
    return ceiling * rand()


class MqttLink:
    """A supervised paho client. Reconnects by itself; falls back to MQTT 3.1.1 once if the broker refuses v5."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        will: Will | None = None,
        clean_start: bool = True,
        session_expiry: float = 0,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
        on_connected: Callable[[bool], None] | None = None,
        on_disconnected: Callable[[str], None] | None = None,
        on_message: Callable[[paho.MQTTMessage], None] | None = None,
        on_published: Callable[[int], None] | None = None,
        on_subscribed: Callable[[list[int]], None] | None = None,
        max_inflight: int = 20,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.will = will
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.receive_maximum = receive_maximum
        self.manual_ack = manual_ack
        self.max_inflight = max_inflight
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_message = on_message
        self._on_published = on_published
        self._on_subscribed = on_subscribed
        self.protocol = paho.MQTTv311 if settings.protocol == "3.1.1" else paho.MQTTv5
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._fallback_pending = False
        self.last_error: str = ""
        self.broker_receive_maximum: int | None = None  # from the last CONNACK (MQTT 5); None: no limit given
        self.callback_errors: Counter[str] = Counter()  # exceptions caught in callbacks, per callback name
        self._attempt = 0  # reconnect attempts since the last CONNACK (reconnect_delay)
        self._rand = random.Random().random
        self._failures = RateLimitedLog(log, interval=300)
        self._callback_log = RateLimitedLog(log, interval=300)
        self.client = self._new_client()

    @property
    def protocol_name(self) -> str:
        return "5" if self.protocol == paho.MQTTv5 else "3.1.1"

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if self.protocol == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(self.session_expiry)
            if self.receive_maximum:
                props.ReceiveMaximum = self.receive_maximum
            kwargs = {"clean_start": self.clean_start, "properties": props}
        self.client.connect_async(s.host, s.port, keepalive=int(s.keepalive), **kwargs)
        self.client.loop_start()

    def stop(self, final_message: tuple[str, bytes, int, bool] | None = None) -> None:
        """Disconnect cleanly; `final_message` (topic, payload, qos, retain) is sent first if connected."""
        self._stopping = True
        if final_message and self.connected.is_set():
            info = self.client.publish(*final_message)
            if final_message[2] > 0:
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()

    # -- operations ---------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        if self.protocol == paho.MQTTv5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            self.client.subscribe([(t, SubscribeOptions(qos=qos)) for t in topics])
        else:
            self.client.subscribe([(t, qos) for t in topics])

    def ack(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)

    def unwritten_packets(self) -> int:
        """Packets paho holds that it has not written to the socket yet (its out-packet queue; len() of a deque
        is safe from any thread). paho 2.x has no public accessor; this is the one place that reads it."""
        return len(getattr(self.client, "_out_packet", ()))

    # -- paho plumbing (runs in paho's network thread) ----------------------------------------------------------

    def _new_client(self) -> paho.Client:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if self.protocol != paho.MQTTv5:
            kwargs["clean_session"] = self.clean_start
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
            manual_ack=self.manual_ack,
            **kwargs,
        )
        if s.tls:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.ca_file)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if s.cert_file:
                context.load_cert_chain(s.cert_file, s.key_file)
            client.tls_set_context(context)
        if s.username is not None:
            client.username_pw_set(s.username, s.password.value if s.password else None)
        if self.will:
            client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        # paho waits between reconnect attempts without jitter (min, 2 x min, ... max); _next_delay() sets each wait
        # itself, from paho's thread, before paho's own _reconnect_wait reads it.
        client.reconnect_delay_set(int(max(1, s.reconnect_min)), int(max(1, s.reconnect_max)))
        client.connect_timeout = float(s.connect_timeout)
        client.max_inflight_messages_set(self.max_inflight)  # 0: no limit (the caller paces what it hands over)
        # A second net under the guards below: paho logs and swallows what escapes a callback.
        client.suppress_exceptions = True
        client.on_socket_open = self._guard("on_socket_open", lambda _c, _u, sock: set_tcp_nodelay(sock))
        client.on_connect = self._guard("on_connect", self._handle_connect)
        client.on_connect_fail = self._guard("on_connect_fail", self._handle_connect_fail)
        client.on_disconnect = self._guard("on_disconnect", self._handle_disconnect)
        if self._on_message:
            on_message = self._on_message
            client.on_message = self._guard("on_message", lambda _c, _u, msg: on_message(msg))
        if self._on_published:
            on_published = self._on_published
            client.on_publish = self._guard("on_publish", lambda _c, _u, mid, _rc, _p: on_published(mid))
        if self._on_subscribed:
            on_subscribed = self._on_subscribed
            # SUBACK: one reason code per topic filter; 0x80 and above is a refusal (MQTT 5.0 §3.9.3).
            client.on_subscribe = self._guard("on_subscribe", lambda _c, _u, _mid, codes, _p: on_subscribed(
                [code.value if hasattr(code, "value") else int(code) for code in codes]))
        return client

    def _guard(self, name: str, callback: Callable[..., None]) -> Callable[..., None]:
        """`callback` as paho may call it: an exception is logged and counted, never raised into paho's thread."""

        @functools.wraps(callback)
        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception as exc:
                self.callback_errors[name] += 1
                frame = traceback.extract_tb(exc.__traceback__)[-1:]
                where = f" at {frame[0].filename}:{frame[0].lineno}" if frame else ""
                self._callback_log.error(
                    ("callback", name), "exception in MQTT callback %s (client %s): %s: %s%s; the MQTT network "
                    "thread goes on (%d in this callback so far)", name, self.client_id, type(exc).__name__, exc,
                    where, self.callback_errors[name], reason="callback_error",
                )

        return guarded

    def _handle_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        code = reason.value if hasattr(reason, "value") else int(reason)
        if code == 0:
            self.last_error = ""
            self._attempt = 0
            self.broker_receive_maximum = getattr(_props, "ReceiveMaximum", None) if _props is not None else None
            self.connected.set()
            log.info(
                "connected to MQTT broker %s:%d (MQTT %s)", self.settings.host, self.settings.port,
                self.protocol_name, extra={"session_present": bool(getattr(flags, "session_present", False))},
            )
            if self._on_connected:
                self._on_connected(bool(getattr(flags, "session_present", False)))
            return
        if code in _UNSUPPORTED_PROTOCOL and self.protocol == paho.MQTTv5 and self.settings.protocol == "auto":
            log.warning("broker %s:%d refused MQTT 5; falling back to MQTT 3.1.1", self.settings.host,
                        self.settings.port)
            self._fallback_pending = True
            threading.Thread(target=self._fall_back, name="mqtt-fallback", daemon=True).start()
            return
        self.last_error = str(reason)
        log.warning("MQTT broker %s:%d refused the connection: %s", self.settings.host, self.settings.port, reason)

    def _fall_back(self) -> None:
        with self._lock:
            old = self.client
            old.disconnect()
            old.loop_stop()
            self.protocol = paho.MQTTv311
            self.client = self._new_client()
            self._fallback_pending = False
            if not self._stopping:
                self.start()

    def _next_delay(self, client: paho.Client) -> None:
        """The jittered wait before paho's next reconnect attempt (paho calls on_disconnect / on_connect_fail
        before it waits; setting min = max makes it wait exactly that, however often it failed)."""
        s = self.settings
        delay = reconnect_delay(self._attempt, float(s.reconnect_min), float(s.reconnect_max), self._rand)
        self._attempt += 1
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # paho takes any number of seconds

    def _handle_connect_fail(self, client: paho.Client, _u: Any) -> None:
        self._next_delay(client)
        # paho calls this inside its `except OSError` around the connect: the exception is still the current one
        # (paho does not pass it). It says what an operator needs: refused, unreachable, TLS, DNS.
        exc = sys.exc_info()[1]
        self.last_error = f"connection failed: {exc}" if exc is not None and str(exc) else "connection failed"
        self._failures.warning(
            "connect", "cannot reach MQTT broker %s:%d (%s); retrying with backoff up to %ss",
            self.settings.host, self.settings.port, self.last_error, int(self.settings.reconnect_max),
        )

    def _handle_disconnect(self, client: paho.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._next_delay(client)
        if self._stopping or (self._fallback_pending and not was_connected):
            return
        if was_connected:
            log.warning("disconnected from MQTT broker %s:%d: %s; reconnecting", self.settings.host,
                        self.settings.port, reason)
        if self._on_disconnected:
            self._on_disconnected(str(reason))
