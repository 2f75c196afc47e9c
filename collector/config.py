"""collector.toml: validated once at start-up; every error names the file and the key path."""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from collector.influx.config import InfluxConfig
from wire import config as wconfig
from wire.config import Duration, invalid
from wire.mqttlink import MqttSettings

_SHARE_GROUP = r"^[A-Za-z0-9._-]{1,64}$"


class CollectorMqtt(MqttSettings, forbid_unknown_fields=True):
    # How long the broker keeps this collector's session (subscriptions and queued messages) while it is away.
    session_expiry: Duration = Duration(7 * 86400)
    # MQTT 5 flow control: how many unacknowledged messages the broker may send. Messages are acknowledged only
    # after InfluxDB stored them, so this bounds the collector's RAM and what a crash can leave unacknowledged.
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1000
    # Several collector instances share the load through $share/<group>/...; empty: a plain subscription.
    shared_group: Annotated[str, msgspec.Meta(pattern=r"^$|" + _SHARE_GROUP)] = ""


class ValidationSection(msgspec.Struct, forbid_unknown_fields=True):
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=64, le=256 * 1024 * 1024)] = 4 * 1024 * 1024
    # A sample time further in the future than this (gateway clock ahead) is suspect.
    max_future: Duration = Duration(300)
    # A sample time before this is suspect: a gateway without a real-time clock before NTP sync starts in 1970.
    min_time: dt.datetime = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
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


class LogSection(msgspec.Struct, forbid_unknown_fields=True):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    stats_interval: Duration = Duration(60)


class CollectorConfig(msgspec.Struct, forbid_unknown_fields=True):
    mqtt: CollectorMqtt = msgspec.field(default_factory=CollectorMqtt)
    influx: InfluxConfig = msgspec.field(default_factory=InfluxConfig)
    validation: ValidationSection = msgspec.field(default_factory=ValidationSection)
    quarantine: QuarantineSection = msgspec.field(default_factory=QuarantineSection)
    security: SecuritySection | None = None
    acks: AcksSection = msgspec.field(default_factory=AcksSection)
    log: LogSection = msgspec.field(default_factory=LogSection)


def load(path: str | Path) -> CollectorConfig:
    return wconfig.load(path, CollectorConfig)


def default_client_id() -> str:
    return f"citynerve-collector-{socket.gethostname()}"[:64]
