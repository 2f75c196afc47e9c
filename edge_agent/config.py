"""agent.toml: validated once at start-up; every error names the file and the key path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from edge_agent.meters.config import METER_KINDS, Cjt188Device, Dlt645Device, MbusDevice, MeterDevice, bus_key
from edge_agent.modbus.config import ModbusBus, ModbusDevice, ModbusTcpDevice
from edge_agent.serial.config import SerialDevice
from wire import config as wconfig
from wire.config import Duration, Size, invalid
from wire.metrics import MetricsSettings
from wire.mqttlink import MqttSettings
from wire.schema import GATEWAY_ID_PATTERN
from wire.status import ALT_RANGE, LAT_RANGE, LON_RANGE

if TYPE_CHECKING:
    from edge_agent.profiles import Profile

GatewayId = Annotated[
    str,
    msgspec.Meta(pattern=GATEWAY_ID_PATTERN, extra={"expect": "1-64 letters, digits, '.', '_' or '-'"}),
]

# Every device kind, selected by `kind = "..."`.
Device = ModbusDevice | ModbusTcpDevice | SerialDevice | Dlt645Device | Cjt188Device | MbusDevice
ModbusKind = ModbusDevice | ModbusTcpDevice
BusDevice = ModbusDevice | MeterDevice  # attached to a [[buses]] entry


class Location(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where the gateway is (WGS 84), for the fleet inventory: `location = {lat = 52.37, lon = 4.89, alt = 2}`.
    A GPS source (an NMEA device) with a fix takes precedence (wire/status.py location_source)."""

    lat: Annotated[float, msgspec.Meta(ge=LAT_RANGE[0], le=LAT_RANGE[1],
                                       extra={"expect": "degrees north, -90..90"})]
    lon: Annotated[float, msgspec.Meta(ge=LON_RANGE[0], le=LON_RANGE[1],
                                       extra={"expect": "degrees east, -180..180"})]
    alt: Annotated[float, msgspec.Meta(ge=ALT_RANGE[0], le=ALT_RANGE[1],
                                       extra={"expect": "metres above mean sea level, -1000..20000"})] | None = None


class GatewaySection(msgspec.Struct, forbid_unknown_fields=True):
    id: GatewayId
    state_dir: str = "/var/lib/citynerve"
    location: Location | None = None


class UplinkSection(msgspec.Struct, forbid_unknown_fields=True):
    # The cycle: every interval (aligned to the wall clock) the readings of the interval are committed to the
    # outbox in one transaction and sent. A power cut loses at most the readings of the current cycle.
    publish_interval: Duration = Duration(5)
    # Readings waiting in RAM for the end of the cycle; beyond, the oldest are dropped (counted and logged).
    # Only reached if a commit stalls for long (a failing SD card).
    max_buffered_readings: Annotated[int, msgspec.Meta(ge=1)] = 50_000
    max_message_readings: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 5_000
    # A message not acknowledged end to end (stored in InfluxDB) within ack_timeout is sent again; while
    # nothing is acknowledged at all, the timeout doubles up to ack_timeout_max.
    ack_timeout: Duration = Duration(30)
    ack_timeout_max: Duration = Duration(600)
    # Messages sent and not yet acknowledged, backlog included: bounds what the broker queues for the collectors
    # per gateway (keep it below mosquitto's max_queued_messages, docs/operations.md). Live messages are always
    # sent; the backlog drains oldest-first into what is left.
    max_unacked_messages: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 200
    # The retained status is republished with the outbox and device health this often.
    heartbeat_interval: Duration = Duration(60)
    # Publish (the cycle's end and the heartbeat) at a fixed offset within each interval taken from the gateway
    # id, so that a fleet's gateways do not all send at the same second (edge_agent/schedule.py). Polls stay
    # aligned. false: every gateway at :00, :10, ... as before.
    publish_spread: bool = True

    def __post_init__(self) -> None:
        for key in ("publish_interval", "ack_timeout", "heartbeat_interval"):
            if getattr(self, key) <= 0:
                raise invalid(key, "expected a duration greater than 0")
        if self.ack_timeout_max < self.ack_timeout:
            raise invalid("ack_timeout_max", f"expected at least ack_timeout ({float(self.ack_timeout):g} s)")


class OutboxSection(msgspec.Struct, forbid_unknown_fields=True):
    """The durable outbox (docs/operations.md): SQLite in the state directory unless `path` says otherwise."""

    path: str = ""
    # Bounds: beyond either, the oldest messages are dropped (counted, logged, reported in the heartbeat).
    max_size: Size = Size(1_000_000_000)
    max_age: Duration = Duration(30 * 86400)

    def __post_init__(self) -> None:
        if self.max_size < 1_000_000:
            raise invalid("max_size", f"expected at least 1MB, got {int(self.max_size)} bytes")
        if self.max_age <= 0:
            raise invalid("max_age", "expected a duration greater than 0")


class ClockSection(msgspec.Struct, forbid_unknown_fields=True):
    """A gateway without a real-time clock (docs/operations.md "Time on gateways without an RTC"): `rtc = false`
    holds readings stamped while the kernel clock is not synchronised and corrects them (edge_agent/clock.py)."""

    rtc: bool = True
    correct_from_acks: bool = True  # learn the offset from an acknowledgement's collector time (sealed only)
    max_ack_error: Duration = Duration(2)  # half the round trip an acknowledgement's offset may be off by

    def __post_init__(self) -> None:
        if self.max_ack_error <= 0:
            raise invalid("max_ack_error", "expected a duration greater than 0")


class SecuritySection(msgspec.Struct, forbid_unknown_fields=True):
    """End-to-end sealing of every uplink message (docs/security.md, docs/enrollment.md)."""

    identity_key: str  # identity.key from `edge-agent enroll`
    collector_key: str  # collector.pub from `edge-collector keys init` (the key the gateway seals to)
    rotate_after_messages: Annotated[int, msgspec.Meta(ge=1)] = 1_000_000
    rotate_after: Duration = Duration(86400)
    # The operator CA's public key (PEM): commands and configurations signed by its operators are accepted
    # (docs/control.md). Empty: this gateway accepts none.
    operator_ca: str = ""

    def __post_init__(self) -> None:
        for key in ("identity_key", "collector_key", "operator_ca"):
            path = getattr(self, key)
            if key == "operator_ca" and not path:
                continue
            if not os.access(path, os.R_OK):
                raise invalid(key, f"{path} {'is not readable' if os.path.exists(path) else 'does not exist'}")
        if self.rotate_after <= 0:
            raise invalid("rotate_after", "expected a duration greater than 0")


class LogSection(msgspec.Struct, forbid_unknown_fields=True):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    gateway: GatewaySection
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    uplink: UplinkSection = msgspec.field(default_factory=UplinkSection)
    outbox: OutboxSection = msgspec.field(default_factory=OutboxSection)
    log: LogSection = msgspec.field(default_factory=LogSection)
    clock: ClockSection = msgspec.field(default_factory=ClockSection)
    security: SecuritySection | None = None
    metrics: MetricsSettings | None = None  # Prometheus /metrics; off unless configured (docs/operations.md)
    buses: list[ModbusBus] = []
    devices: list[Device] = []

    def __post_init__(self) -> None:
        _unique_ids("buses", self.buses)
        _unique_ids("devices", self.devices)
        buses = {bus.id: bus for bus in self.buses}
        for index, device in enumerate(self.devices):
            if isinstance(device, ModbusDevice | METER_KINDS):
                bus = buses.get(device.bus)
                if bus is None:
                    known = ", ".join(f'"{b}"' for b in buses) or "none configured"
                    raise invalid(f"devices[{index}].bus", f'no bus "{device.bus}" in [[buses]] (known: {known})')
            if isinstance(device, ModbusDevice):
                if bus.where.kind == "serial" and not 1 <= device.unit <= 247:
                    raise invalid(f"devices[{index}].unit", f"expected a unit id 1..247 on serial bus {bus.id}, "
                                                            f"got {device.unit}")
            elif isinstance(device, METER_KINDS) and bus.where.kind != "serial":
                kind = type(device).__struct_config__.tag
                raise invalid(f"devices[{index}].bus", f'device "{device.id}" (kind "{kind}") needs a serial bus: '
                                                       f'bus "{bus.id}" is {bus.target}')
        self._check_meter_addresses()
        self._resolve_lines()
        serial_ports = {b.where.path: f"buses[{i}]" for i, b in enumerate(self.buses) if b.where.kind == "serial"}
        for index, device in enumerate(self.devices):
            if isinstance(device, SerialDevice):
                if device.port in serial_ports:
                    raise invalid(f"devices[{index}].port", f"{device.port} is already used by {serial_ports[device.port]}")
                serial_ports[device.port] = f"devices[{index}]"
        on_bus: dict[tuple[str, int], int] = {}
        for index, device in enumerate(self.devices):
            if not isinstance(device, ModbusDevice | ModbusTcpDevice):
                continue
            key = (device.bus if isinstance(device, ModbusDevice) else f"tcp://{device.host}:{device.port}",
                   device.unit)
            if key in on_bus:
                raise invalid(f"devices[{index}].unit", f"unit {device.unit} on bus {key[0]} is already "
                                                        f"devices[{on_bus[key]}]")
            on_bus[key] = index

    def _check_meter_addresses(self) -> None:
        """Two meters of one protocol on one bus cannot share an address: both would answer."""
        seen: dict[tuple[str, str, str], int] = {}
        for index, device in enumerate(self.devices):
            if not isinstance(device, METER_KINDS):
                continue
            what, address = bus_key(device)
            key = (device.bus, what, address)
            if key in seen:
                field = "secondary" if isinstance(device, MbusDevice) and device.secondary else "address"
                raise invalid(f"devices[{index}].{field}", f'device "{device.id}": {what} {address} on bus '
                                                           f'{device.bus} is already devices[{seen[key]}]')
            seen[key] = index

    def _resolve_lines(self) -> None:
        """A bus's baud rate and parity when not given: the usual line of what it carries (ModbusBus.resolved).
        A line shared by Modbus units and meters has no common default: it must say."""
        for index, bus in enumerate(self.buses):
            on_it = [d for d in self.devices if isinstance(d, ModbusDevice | METER_KINDS) and d.bus == bus.id]
            meters = sorted({type(d).__struct_config__.tag for d in on_it if isinstance(d, METER_KINDS)})
            modbus = any(isinstance(d, ModbusDevice) for d in on_it)
            if meters and modbus:
                for key in ("baud", "parity"):
                    if getattr(bus, key) is None:
                        raise invalid(f"buses[{index}].{key}", f'bus "{bus.id}" carries Modbus units and '
                                      f"{', '.join(meters)} meters: give its {key} (every device on a line uses "
                                      f"the same; Modbus meters usually come set to 9600 8N1, DL/T 645 to 2400 8E1)")
            self.buses[index] = bus.resolved(meters_only=bool(meters) and not modbus)

    @property
    def modbus_devices(self) -> list[ModbusKind]:
        return [d for d in self.devices if isinstance(d, ModbusDevice | ModbusTcpDevice)]

    @property
    def bus_devices(self) -> list[ModbusKind | MeterDevice]:
        """Every device polled by a bus engine: Modbus units (a `modbus-tcp` device's endpoint is a bus of its own)
        and DL/T 645, CJ/T 188, M-Bus meters, in configuration order."""
        return [d for d in self.devices if not isinstance(d, SerialDevice)]

    @property
    def meter_devices(self) -> list[MeterDevice]:
        return [d for d in self.devices if isinstance(d, METER_KINDS)]

    @property
    def serial_devices(self) -> list[SerialDevice]:
        return [d for d in self.devices if isinstance(d, SerialDevice)]

    @property
    def outbox_path(self) -> Path:
        return Path(self.outbox.path) if self.outbox.path else Path(self.gateway.state_dir) / "outbox.sqlite3"

    def bus_of(self, device: ModbusKind | MeterDevice) -> ModbusBus:
        """The bus a device is polled on; a `modbus-tcp` device's endpoint is a bus of its own, shared by
        every device with the same host and port (one TCP connection, one transaction at a time)."""
        if isinstance(device, ModbusDevice | METER_KINDS):
            return next(b for b in self.buses if b.id == device.bus)
        return ModbusBus(id=f"tcp://{device.host}:{device.port}", target=f"tcp://{device.host}:{device.port}",
                         timeout=device.timeout)


def _unique_ids(key: str, items: list) -> None:
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.id in seen:
            raise invalid(f"{key}[{index}].id", f'"{item.id}" is already used by {key}[{seen[item.id]}]')
        seen[item.id] = index




def load(path: str | Path) -> AgentConfig:
    """Parse and validate agent.toml, then resolve every device's firmware profile (also validated)."""
    # A profile given as a relative path is relative to the config file, not to wherever the agent starts.
    return _resolve(wconfig.load(path, AgentConfig), str(path), Path(path).resolve().parent)


def load_text(text: str, source: str, base: Path) -> AgentConfig:
    """The same checks as load() (and `edge-agent check`) for a configuration given as text (a pushed remote
    configuration, docs/control.md); `source` names it in errors, relative profile paths are relative to `base`."""
    return _resolve(wconfig.convert(wconfig.parse_toml(text, source), AgentConfig, source), source, base)


def _resolve(cfg: AgentConfig, source: str, base: Path) -> AgentConfig:
    from edge_agent.profiles import load_profile

    cfg.devices = [
        msgspec.structs.replace(d, profile=str(base / d.profile))
        if isinstance(d, ModbusDevice | ModbusTcpDevice) and _is_relative_path(d.profile) else d
        for d in cfg.devices
    ]
    if cfg.security is not None:
        from wire.keys import collector_key_from_pem, identity_from_pem, operator_ca_from_pem

        for key, read in (("identity_key", identity_from_pem), ("collector_key", collector_key_from_pem),
                          ("operator_ca", operator_ca_from_pem)):
            if not getattr(cfg.security, key):
                continue
            try:
                read(Path(getattr(cfg.security, key)).read_bytes())
            except (ValueError, TypeError) as exc:
                raise wconfig.ConfigError(source, f"security.{key}", f"not a usable key file: {exc}") from None
    for index, device in enumerate(cfg.devices):
        if not isinstance(device, ModbusDevice | ModbusTcpDevice):
            continue
        if device.profile == "sunspec":  # discovered on the device itself at start-up
            if device.writable:
                raise wconfig.ConfigError(source, f"devices[{index}].writable[0]", f'device "{device.id}": a '
                                          "SunSpec device's points are discovered at start-up; none can be written")
            continue
        try:
            profile = load_profile(device.profile)
        except wconfig.ConfigError as exc:
            raise wconfig.ConfigError(source, f"devices[{index}].profile", str(exc)) from None
        except LookupError as exc:
            raise wconfig.ConfigError(source, f"devices[{index}].profile", str(exc)) from None
        _check_writable(source, index, device, profile)
    return cfg


def _check_writable(path: str, index: int, device: ModbusKind, profile: Profile) -> None:
    """A device may opt in only to points its profile declares writable (docs/control.md)."""
    writable = profile.writable_points()
    for j, name in enumerate(device.writable):
        if name in writable:
            continue
        offer = f"writable points: {', '.join(writable)}" if writable else "it declares no writable point"
        why = "has no point" if all(p.name != name for p in profile.points) else "does not declare writable the point"
        raise wconfig.ConfigError(path, f"devices[{index}].writable[{j}]",
                                  f'device "{device.id}": profile {device.profile} {why} "{name}" ({offer})')


def _is_relative_path(profile: str) -> bool:
    return ("/" in profile or profile.endswith(".toml")) and not Path(profile).is_absolute()
