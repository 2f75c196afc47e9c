"""collector.toml: validated once at start-up; every error names the file and the key path."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from collector.admission import Limits as AdmissionLimits
from collector.guard import GuardLimits
from collector.influx.config import InfluxConfig
from collector.web.config import WebSettings
from wire import config as wconfig
from wire.config import Duration, Size, check_client_tls, invalid
from wire.metrics import MetricsSettings
from wire.mqttlink import MqttSettings
from wire.topics import DEFAULT_PREFIX, is_valid_mount, is_valid_prefix, nats_unsupported

_SHARE_GROUP = r"^[A-Za-z0-9._-]{1,64}$"


class CollectorMqtt(MqttSettings, forbid_unknown_fields=True):
    # How long the broker keeps this collector's session (subscriptions and queued messages) while it is away.
    session_expiry: Duration = Duration(7 * 86400)
    # MQTT 5 flow control: how many unacknowledged messages the broker may send. Messages are acknowledged only
    # after InfluxDB stored them, so this bounds the collector's RAM and what a crash can leave unacknowledged.
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1000
    # Several collector instances share the load through $share/<group>/...; empty: a plain subscription.
    shared_group: Annotated[str, msgspec.Meta(pattern=r"^$|" + _SHARE_GROUP)] = ""
    # The mount point of the broker's gateways' listener (deploy/mosquitto/citynerve.conf mount_point): the
    # collector subscribes to <gateway_mount><topic_prefix>/+/up and hands on the gateways' own topics. Empty: the
    # gateways' topics are not mounted (a plain broker).
    gateway_mount: str = "gw/"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_valid_mount(self.gateway_mount):
            raise invalid("gateway_mount", 'expected "" or topic levels ending in "/" (no + #, empty level or leading $), '
                          f'e.g. "gw/", got "{self.gateway_mount}"')


# JetStream stream and consumer names: no '.', '*', '>' or white space (they appear in API subjects).
_NATS_NAME = r"^[A-Za-z0-9_-]{1,64}$"
_NATS_URL = re.compile(r"^(nats|tls)://[^\s/]+:\d{1,5}$")


class CollectorNats(msgspec.Struct, forbid_unknown_fields=True):
    """[nats]: the clustered broker tier (deploy/nats, docs/scaling.md "Clustered broker tier"), an alternative
    to [mqtt]. Gateways speak MQTT to a NATS JetStream cluster; every collector instance takes the uplink from one
    durable pull consumer of one stream, and acknowledges a message there only once InfluxDB stored it."""

    # Some or all nodes of the cluster (the client learns the others from the server): tls://nats-1:4222
    servers: list[str] = msgspec.field(default_factory=lambda: ["tls://127.0.0.1:4222"])
    tls: bool = True
    ca_file: str | None = None  # None: the system's CA store
    # client certificate (mutual TLS, CN collector-<name>, signed by the collector CA): the server maps it to
    # its user and permissions (deploy/nats/README.md)
    cert_file: str | None = None
    key_file: str | None = None
    name: str | None = None  # connection name shown by the server; default citynerve-collector-<host>
    # the gateways' MQTT topic prefix; the stream takes <prefix as subject>.*.{up,status,report}
    topic_prefix: str = DEFAULT_PREFIX
    stream: Annotated[str, msgspec.Meta(pattern=_NATS_NAME)] = "CITYNERVE_UP"
    consumer: Annotated[str, msgspec.Meta(pattern=_NATS_NAME)] = "collectors"
    # Create the stream and consumer when missing and bring their settings to these (keep [nats] the same on
    # every collector). false: they are the operator's (made with the nats CLI), only used here.
    manage: bool = True
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 3
    # The stream's bounds: messages no collector took within max_age, or beyond max_bytes (oldest first), are
    # dropped; so is a gateway's oldest once it has max_msgs_per_gateway waiting on one of its subjects (one
    # gateway's flood cannot push out another's). The gateways keep everything until acknowledged end to end,
    # so a dropped message is sent again, not lost.
    max_age: Duration = Duration(7 * 86400)
    max_bytes: Size = Size(10 * 2**30)
    max_msgs_per_gateway: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    # A message taken and not acknowledged within ack_wait goes to another collector (a collector that died).
    # Messages held longer (InfluxDB slow or down) are marked in progress every ack_wait / 3.
    ack_wait: Duration = Duration(30)
    # messages taken and not yet acknowledged, all collectors together (the consumer's max_ack_pending)
    max_ack_pending: Annotated[int, msgspec.Meta(ge=1)] = 20_000
    # this collector's share of it (as receive_maximum in [mqtt]): bounds its RAM
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1000
    fetch_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 250
    # Acknowledgements and downlinks: 1 stores them in the server's $MQTT_msgs stream, delivered at QoS 1 to a
    # gateway's QoS 1 subscription; 0 is a plain NATS publish, delivered at QoS 0 to a gateway connected then.
    downlink_qos: Literal[0, 1] = 1
    connect_timeout: Duration = Duration(10)
    reconnect_wait: Duration = Duration(2)

    def __post_init__(self) -> None:
        if not self.servers:
            raise invalid("servers", 'expected at least one server, e.g. ["tls://nats-1.example.net:4222"]')
        for i, url in enumerate(self.servers):
            if not _NATS_URL.match(url):
                raise invalid(f"servers[{i}]", f'expected nats://HOST:PORT or tls://HOST:PORT, got "{url}"')
        check_client_tls(self)
        if not is_valid_prefix(self.topic_prefix):
            raise invalid("topic_prefix", f'expected topic levels without + # or empty levels, got "{self.topic_prefix}"')
        if (why := nats_unsupported(self.topic_prefix)) is not None:
            raise invalid("topic_prefix", f'"{self.topic_prefix}": {why}')
        if self.max_inflight > self.max_ack_pending:
            raise invalid("max_inflight", f"expected at most max_ack_pending ({self.max_ack_pending}): the consumer "
                          "would never hand this collector that many")
        if self.fetch_batch > self.max_inflight:
            raise invalid("fetch_batch", f"expected at most max_inflight ({self.max_inflight})")
        if not self.ack_wait >= 1:
            raise invalid("ack_wait", f'expected a duration of at least 1s such as "30s", got {float(self.ack_wait):g}')
        if not self.max_age > 0:
            raise invalid("max_age", f'expected a duration > 0 such as "7d", got {float(self.max_age):g}')


class ValidationSection(msgspec.Struct, forbid_unknown_fields=True):
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=64, le=256 * 1024 * 1024)] = 4 * 1024 * 1024
    # A sample time further in the future than this (gateway clock ahead) is suspect.
    max_future: Duration = Duration(300)
    # A sample time before this is suspect: a gateway without a real-time clock before NTP sync starts in 1970.
    min_time: dt.datetime = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    # A sample time older than this (before the receive time) is suspect too: no reading is written into an
    # InfluxDB shard far in the past. Keep it above the agents' outbox.max_age (default 30 days); 0: no bound
    # (replaying old captures).
    max_past: Duration = Duration(45 * 86400)
    suspect_measurement: str = "citynerve_suspect_time"

    def __post_init__(self) -> None:
        if self.min_time.tzinfo is None:
            raise invalid("min_time", "expected a date-time with a time zone, e.g. 2020-01-01T00:00:00Z")


class SecuritySection(msgspec.Struct, forbid_unknown_fields=True):
    """End-to-end sealing (docs/security.md). Without this section the collector accepts plain payloads only."""

    # collector.key (current), collector-next.key (rotation) and retired/*.key from `edge-collector keys init`
    keys_dir: str
    # the gateway registry of `edge-collector gateways add|revoke`; re-read on change, no restart needed
    registry: str
    # accept unsealed (format 0x01) payloads too, e.g. while gateways are being enrolled one by one
    accept_plain: bool = False
    # how long a gateway's previous session stays valid after a newer one appeared
    session_grace: Duration = Duration(300)
    replay_window: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] = 4096

    def __post_init__(self) -> None:
        if not os.path.isdir(self.keys_dir):
            raise invalid("keys_dir", f"{self.keys_dir} is not a directory (run: edge-collector keys init --dir DIR)")
        if not os.path.exists(self.registry):
            raise invalid("registry", f"{self.registry} does not exist (run: edge-collector gateways add ...)")


class QuarantineSection(msgspec.Struct, forbid_unknown_fields=True):
    # Rejected payloads are kept here for `edge-collector quarantine list|show`, oldest dropped first.
    path: str = "/var/lib/citynerve-collector/quarantine.db"
    max_entries: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1000
    max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 16 * 1024 * 1024


class InventorySection(msgspec.Struct, forbid_unknown_fields=True):
    """The fleet inventory (collector/inventory.py) that `edge-collector gateways list|show` reads."""

    path: str = "/var/lib/citynerve-collector/inventory.db"
    # A change of state, version, configuration, location or devices is written within a second; health,
    # backlog and last-seen times this often.
    flush_interval: Duration = Duration(60)
    # citynerve_gateway_info / citynerve_device_info points: on every change, and at least this often.
    info_interval: Duration = Duration(3600)
    # citynerve_gateway_health / citynerve_device_health points: when a state, a restart, drops, re-sends, an
    # outbox reset or a device's errors changed, with every heartbeat while the gateway has a backlog, and
    # otherwise this often ("0s": every heartbeat). Keep it well below [web] stale_after (5 min): the fleet page
    # calls a gateway stale when no health point came for that long.
    health_interval: Duration = Duration(120)
    max_gateways: Annotated[int, msgspec.Meta(ge=1)] = 100_000

    def __post_init__(self) -> None:
        for key in ("flush_interval", "info_interval"):
            if not getattr(self, key) > 0:
                raise invalid(key, f'expected a duration > 0 such as "60s", got {float(getattr(self, key)):g}')
        if self.health_interval < 0:
            raise invalid("health_interval", f'expected a duration >= 0 such as "2m", got {float(self.health_interval):g}')


class AcksSection(msgspec.Struct, forbid_unknown_fields=True):
    """End-to-end acknowledgements to the gateways (docs/wire-format.md#acknowledgements)."""

    # Seqs stored since the last acknowledgement go out together after at most this long: one small message per
    # gateway and interval, however many messages were stored. The agent's re-send timeout must be longer.
    interval: Duration = Duration(1)

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise invalid("interval", f'expected a duration > 0 such as "1s" or "500ms", got {float(self.interval):g}')


Positive = Annotated[int, msgspec.Meta(ge=1)]
_ADMISSION, _GUARD = AdmissionLimits(), GuardLimits()


class LimitsSection(msgspec.Struct, forbid_unknown_fields=True):
    """What one gateway may take of the collector and of the store (docs/operations.md#limits).

    A message over a rate or queue limit is acknowledged to the broker and not end to end: the gateway keeps it
    and sends it again. A reading over a cardinality budget likewise. The defaults let a gateway with 200
    devices drain a day of backlog at full speed; the store's own limits (max-values-per-tag,
    max-series-per-database) must exceed gateways x max_devices and gateways x max_series."""

    # The defaults are the pure cores' (collector/admission.py Limits, collector/guard.py GuardLimits): one place.
    # the collector as a whole: messages and bytes received and not yet processed
    max_messages: Positive = _ADMISSION.max_messages
    max_bytes: Positive = _ADMISSION.max_bytes
    # per gateway: what may wait, and how fast it may come (token buckets)
    gateway_messages: Positive = _ADMISSION.gateway_messages
    gateway_bytes: Positive = _ADMISSION.gateway_bytes
    messages_per_second: Annotated[float, msgspec.Meta(gt=0)] = _ADMISSION.rate
    messages_burst: Annotated[float, msgspec.Meta(ge=1)] = _ADMISSION.burst
    bytes_per_second: Annotated[float, msgspec.Meta(gt=0)] = _ADMISSION.byte_rate
    bytes_burst: Annotated[float, msgspec.Meta(ge=1)] = _ADMISSION.byte_burst
    # per gateway: lines waiting for the InfluxDB writer before its next message is taken up
    gateway_pending_lines: Positive = _ADMISSION.gateway_pending_lines
    gateway_pending_bytes: Positive = _ADMISSION.gateway_pending_bytes
    # all gateways' lines and payloads waiting for the writer (with max_bytes: what the collector holds)
    max_pending_bytes: Positive = _ADMISSION.max_pending_bytes
    # per gateway and window: new series, devices, field names and measurements; and in all
    window: Duration = Duration(_GUARD.window)
    new_series: Positive = _GUARD.new_series
    new_devices: Positive = _GUARD.new_devices
    new_fields: Positive = _GUARD.new_fields
    new_measurements: Positive = _GUARD.new_measurements
    max_series: Positive = _GUARD.max_series
    max_devices: Positive = _GUARD.max_devices
    # messages processed at once (each by a different gateway)
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4

    def __post_init__(self) -> None:
        if not self.window > 0:
            raise invalid("window", f'expected a duration > 0 such as "1h", got {float(self.window):g}')
        if self.gateway_messages > self.max_messages:
            raise invalid("gateway_messages", f"expected at most max_messages ({self.max_messages})")

    def admission(self) -> AdmissionLimits:
        return AdmissionLimits(
            max_messages=self.max_messages, max_bytes=self.max_bytes, gateway_messages=self.gateway_messages,
            gateway_bytes=self.gateway_bytes, rate=self.messages_per_second, burst=self.messages_burst,
            byte_rate=self.bytes_per_second, byte_burst=self.bytes_burst,
            gateway_pending_lines=self.gateway_pending_lines, gateway_pending_bytes=self.gateway_pending_bytes,
            max_pending_bytes=self.max_pending_bytes,
        )

    def guard(self) -> GuardLimits:
        return GuardLimits(
            window=float(self.window), new_series=self.new_series, new_devices=self.new_devices,
            new_fields=self.new_fields, new_measurements=self.new_measurements, max_series=self.max_series,
            max_devices=self.max_devices,
        )


FieldType = Literal["float", "integer", "boolean", "string"]
FieldTypes = dict[str, dict[str, FieldType]]


class SchemaSection(msgspec.Struct, forbid_unknown_fields=True):
    """Field types declared by the operator (docs/operations.md#field-types). InfluxDB fixes a field's type per
    shard by its first write; a declared type is fixed before any gateway writes, so no gateway can claim
    another one, even in an empty store or a new shard. Undeclared fields take the store's type, or the first
    one a gateway writes."""

    # a TOML file of tables per measurement: [electricity] power = "float"
    field_types: str | None = None
    # how often the types and tag keys the store holds are read again (several collectors learn each other's)
    refresh: Duration = Duration(60)

    def __post_init__(self) -> None:
        if self.field_types is not None and not os.path.isfile(self.field_types):
            raise invalid("field_types", f"{self.field_types} does not exist")
        if not self.refresh > 0:
            raise invalid("refresh", f'expected a duration > 0 such as "60s", got {float(self.refresh):g}')

    def declared(self) -> FieldTypes:
        """The declared types; ConfigError naming the file and key for a mistake in it."""
        if self.field_types is None:
            return {}
        raw = wconfig.read_toml(self.field_types)
        kinds = ("float", "integer", "boolean", "string")
        for measurement, fields in raw.items():
            if not isinstance(fields, dict):
                raise wconfig.ConfigError(self.field_types, measurement,
                                          'expected a table of field = "type", e.g. [electricity] power = "float"')
            for name, kind in fields.items():
                if kind not in kinds:
                    raise wconfig.ConfigError(self.field_types, f"{measurement}.{name}",
                                              f"expected one of {', '.join(kinds)}, got {kind!r}")
        return raw


class ControlSection(msgspec.Struct, forbid_unknown_fields=True):
    """The control plane on the collector's side (docs/control.md): the store of desired configurations and
    commands, the audit log, and what the relay sends with every downlink. Needs [security]: a downlink is
    sealed to the gateway's newest verified session (wire/seal.py 0x04)."""

    # desired configurations, commands, reports: written by `edge-collector config|command`, read and updated by
    # the running collector(s) (SQLite, WAL: several processes may share it)
    store: str = "/var/lib/citynerve-collector/control.db"
    # the hash-chained audit log (`edge-collector audit verify`); only running collectors append to it
    audit_log: str = "/var/lib/citynerve-collector/audit.log"
    # the current operator revocation list, written by `edge-collector operators revoke|crl` (an armoured
    # "OPERATOR CRL"); relayed with every downlink, re-read when it changes. Nothing is sent while it is missing.
    crl: str = "/etc/citynerve/operators/operators.crl"
    # the operator CA's public key: the CLI refuses early what every gateway would refuse (it decides nothing)
    operator_ca: str = "/etc/citynerve/operators/operator-ca.pub"
    # a document not yet final on its gateway is sent again after this long (same id, same signatures)
    resend_interval: Duration = Duration(30)
    # how often the store is looked at for work (new commands and configurations, expiry, audit entries)
    poll_interval: Duration = Duration(1)
    # per gateway: commands sent and not yet final; further ones wait in the store
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    # downlinks sent per poll, all gateways together
    max_sends: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 200

    def __post_init__(self) -> None:
        for key in ("resend_interval", "poll_interval"):
            if not getattr(self, key) > 0:
                raise invalid(key, f'expected a duration > 0 such as "30s", got {float(getattr(self, key)):g}')


class LogSection(msgspec.Struct, forbid_unknown_fields=True):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    stats_interval: Duration = Duration(60)


class CollectorMetricsSettings(MetricsSettings, forbid_unknown_fields=True):
    """`[metrics]` of the collector (docs/operations.md "Metrics"). per_gateway: one series per gateway with its
    last-seen time (citynerve_gateway_last_seen_timestamp_seconds), what the GatewayOffline alert needs; false
    keeps the collector's series independent of the fleet's size."""

    per_gateway: bool = True


class CollectorConfig(msgspec.Struct, forbid_unknown_fields=True):
    mqtt: CollectorMqtt = msgspec.field(default_factory=CollectorMqtt)
    influx: InfluxConfig = msgspec.field(default_factory=InfluxConfig)
    validation: ValidationSection = msgspec.field(default_factory=ValidationSection)
    quarantine: QuarantineSection = msgspec.field(default_factory=QuarantineSection)
    inventory: InventorySection = msgspec.field(default_factory=InventorySection)
    security: SecuritySection | None = None
    acks: AcksSection = msgspec.field(default_factory=AcksSection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    schema: SchemaSection = msgspec.field(default_factory=SchemaSection)
    control: ControlSection | None = None
    log: LogSection = msgspec.field(default_factory=LogSection)
    metrics: CollectorMetricsSettings | None = None  # Prometheus /metrics, when configured
    # The fleet page (collector/web/, docs/dashboards.md): off unless the section is there.
    web: WebSettings | None = None
    nats: CollectorNats | None = None  # the clustered broker tier instead of [mqtt]

    def __post_init__(self) -> None:
        if self.web is not None and self.influx.api != "v1":
            raise invalid("web", 'the fleet page reads InfluxDB with InfluxQL: it needs [influx] api = "v1" '
                          "(InfluxDB 1.x, or 2.x through its 1.x API with a token)")

    @property
    def topic_prefix(self) -> str:
        """The gateways' topic prefix, from the section the collector takes its input from."""
        return self.nats.topic_prefix if self.nats is not None else self.mqtt.topic_prefix

    @property
    def gateway_mount(self) -> str:
        """The mount point in front of the gateways' topics as the input names them ("" on NATS: none)."""
        return "" if self.nats is not None else self.mqtt.gateway_mount


def load(path: str | Path) -> CollectorConfig:
    raw = wconfig.read_toml(path)
    if isinstance(raw.get("nats"), dict) and "mqtt" in raw:
        raise wconfig.ConfigError(str(path), "nats", "[nats] and [mqtt] are alternatives (the clustered tier or "
                                  "one mosquitto): keep one of them")
    cfg = wconfig.convert(raw, CollectorConfig, str(path))
    cfg.schema.declared()  # a mistake in the field-types file is a configuration error too, naming that file
    if cfg.control is not None and cfg.security is None:
        raise wconfig.ConfigError(str(path), "control", "needs a [security] section: commands and configurations "
                                  "are sealed to the gateways' verified sessions (docs/control.md)")
    return cfg


def default_client_id() -> str:
    return f"citynerve-collector-{socket.gethostname()}"[:64]
