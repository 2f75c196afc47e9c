"""collector.toml: validated once at start-up; every error names the file and the key path."""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from collector.admission import Limits as AdmissionLimits
from collector.guard import GuardLimits
from collector.influx.config import InfluxConfig
from collector.web.config import WebSettings
from wire import config as wconfig
from wire.config import Duration, invalid
from wire.metrics import MetricsSettings
from wire.mqttlink import MqttSettings
from wire.topics import is_valid_mount

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
    security: SecuritySection | None = None
    acks: AcksSection = msgspec.field(default_factory=AcksSection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    schema: SchemaSection = msgspec.field(default_factory=SchemaSection)
    control: ControlSection | None = None
    log: LogSection = msgspec.field(default_factory=LogSection)
    metrics: CollectorMetricsSettings | None = None  # Prometheus /metrics, when configured
    # The fleet page (collector/web/, docs/dashboards.md): off unless the section is there.
    web: WebSettings | None = None

    def __post_init__(self) -> None:
        if self.web is not None and self.influx.api != "v1":
            raise invalid("web", 'the fleet page reads InfluxDB with InfluxQL: it needs [influx] api = "v1" '
                          "(InfluxDB 1.x, or 2.x through its 1.x API with a token)")


def load(path: str | Path) -> CollectorConfig:
    cfg = wconfig.load(path, CollectorConfig)
    cfg.schema.declared()  # a mistake in the field-types file is a configuration error too, naming that file
    if cfg.control is not None and cfg.security is None:
        raise wconfig.ConfigError(str(path), "control", "needs a [security] section: commands and configurations "
                                  "are sealed to the gateways' verified sessions (docs/control.md)")
    return cfg


def default_client_id() -> str:
    return f"citynerve-collector-{socket.gethostname()}"[:64]
