"""Configuration of Modbus devices, as they appear in the agent's config file under [[devices]]."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from wire.config import Duration, invalid
from wire.names import NAME_PATTERN
from wire.schema import ConfigName as Name
from wire.schema import ConfigTagValue as TagValue

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Unit = Annotated[int, msgspec.Meta(ge=0, le=255)]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=r"^[^\s\x00-\x1f\x7f-\x9f]+\Z")]
DeviceId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        pattern=NAME_PATTERN,  # the one name rule (wire/names.py): the id becomes the device tag
        extra={"expect": "a device id: 1..128 characters, no control characters"},
    ),
]
WORKAROUNDS = ("one_request_per_point", "no_gap_reads")
Workaround = Literal["one_request_per_point", "no_gap_reads"]
ProfileRef = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=NAME_PATTERN)]


class ModbusTcpDevice(
    msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="modbus-tcp", tag_field="kind"
):
    """A meter reached over Modbus TCP, directly or through an RS-485 gateway.

    [[devices]]
    kind = "modbus-tcp"
    id = "sdm630-hall-a"
    profile = "eastron_sdm630"       # shipped profile name, or a path to a profile file
    host = "192.0.2.10"
    unit = 1                         # Modbus unit id; TCP gateways often expect the RS-485 address here,
                                     # TCP-native devices often use 0 or 255
    interval = "10s"
    tags = { site = "hall-a" }
    writable = ["demand_period"]      # points operators may write (writable in the profile); default none
    """

    id: DeviceId
    profile: ProfileRef
    host: Host
    port: Port = 502
    unit: Unit = 1
    interval: Duration = Duration(10.0)
    timeout: Duration = Duration(2.0)
    tags: dict[Name, TagValue] = {}
    measurement: Name | None = None  # overrides the profile's default measurement
    workarounds: list[Workaround] = []
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=125)] | None = None  # overrides the profile's limit
    writable: list[Name] = []  # opt-in: the profile's writable points operators may write (docs/control.md)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise invalid("interval", "must be more than 0 s")
        if self.timeout <= 0:
            raise invalid("timeout", "must be more than 0 s")
        _unique_points(self.writable)


BAUD_RATES = (300, 600, 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
_TCP_TARGET = re.compile(r"^(tcp|rtu-over-tcp)://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


class BusTarget(msgspec.Struct, frozen=True):
    """Where a bus is: a serial port, or a TCP endpoint speaking Modbus TCP (MBAP) or RTU frames."""

    kind: Literal["serial", "tcp", "rtu-over-tcp"]
    path: str = ""  # serial
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, target: str) -> BusTarget:
        match = _TCP_TARGET.match(target)
        if match:
            port = int(match.group(3))
            if not 1 <= port <= 65535:
                raise ValueError(f"TCP port {port} is outside 1..65535")
            return cls(match.group(1), host=match.group(2).strip("[]"), port=port)  # type: ignore[arg-type]
        if target.startswith("/") and not any(c.isspace() for c in target):
            return cls("serial", path=target)
        raise ValueError(f'expected "tcp://HOST:PORT", "rtu-over-tcp://HOST:PORT" or a serial port such as '
                         f'"/dev/ttyUSB0", got "{target}"')

    def __str__(self) -> str:
        return self.path if self.kind == "serial" else f"{self.kind}://{self.host}:{self.port}"


class ModbusBus(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One serial port or TCP endpoint: the unit of scheduling. One transaction at a time on it.

    [[buses]]
    id = "rs485-1"
    target = "/dev/ttyUSB0"          # or "tcp://192.0.2.5:502", "rtu-over-tcp://192.0.2.9:4001"
    framing = "rtu"                  # serial: "rtu" or "ascii"
    baud = 9600
    parity = "N"                     # "N", "E", "O"
    pause_between_requests = "50ms"  # some meters need 50-500 ms between requests
    """

    id: DeviceId
    target: str
    framing: Literal["rtu", "ascii"] = "rtu"  # Modbus devices' framing; the meters' protocols bring their own
    # Not given: 9600 8N1 (Modbus's usual line), or 2400 8E1 on a bus of DL/T 645, CJ/T 188 and M-Bus meters only
    # (see `resolved`); a bus shared by both must say (edge_agent/config.py).
    baud: int | None = None
    parity: Literal["N", "E", "O"] | None = None
    data_bits: Literal[7, 8] = 8
    stop_bits: Literal[1, 2] = 1
    timeout: Duration = Duration(1.0)
    pause_after_connect: Duration = Duration(0.0)
    pause_between_requests: Duration = Duration(0.0)
    busy_retries: Annotated[int, msgspec.Meta(ge=0, le=20)] = 3
    busy_pause: Duration = Duration(0.2)
    backoff_max: Duration = Duration(300.0)
    reconnect_max: Duration = Duration(60.0)

    def __post_init__(self) -> None:
        try:
            where = BusTarget.parse(self.target)
        except ValueError as exc:
            raise invalid("target", str(exc)) from None
        if self.baud is not None and self.baud not in BAUD_RATES:
            raise invalid("baud", f"expected one of {', '.join(map(str, BAUD_RATES))}, got {self.baud}")
        if where.kind != "serial" and self.framing == "ascii":
            raise invalid("framing", 'ASCII framing needs a serial port; for RTU frames over TCP use '
                                     'target "rtu-over-tcp://HOST:PORT"')
        if self.timeout <= 0:
            raise invalid("timeout", "must be more than 0 s")

    @property
    def where(self) -> BusTarget:
        return BusTarget.parse(self.target)

    def resolved(self, meters_only: bool = False) -> ModbusBus:
        """This bus with the line settings it does not give filled in: Modbus's usual 9600 8N1, or on a bus that
        carries only DL/T 645, CJ/T 188 and M-Bus meters their standards' 2400 8E1 (DL/T 645-2007 §4.1: 2400
        baud is the default rate, even parity; CJ/T 188 and EN 13757-2 meters usually come set to 2400 8E1)."""
        if self.baud is not None and self.parity is not None:
            return self
        baud, parity = (2400, "E") if meters_only else (9600, "N")
        return msgspec.structs.replace(self, baud=self.baud or baud, parity=self.parity or parity)

    def describe_line(self) -> str:
        """"/dev/ttyUSB0 2400 8E1", or the TCP target."""
        if self.where.kind != "serial":
            return self.target
        return f"{self.target} {self.baud} {self.data_bits}{self.parity}{self.stop_bits}"


class ModbusDevice(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="modbus", tag_field="kind"):
    """A Modbus unit on a configured bus.

    [[devices]]
    kind = "modbus"
    id = "sdm120-flat-3"
    bus = "rs485-1"
    unit = 3
    profile = "eastron_sdm120"      # or "sunspec": discover the SunSpec model chain at start-up
    interval = "10s"
    writable = []                   # points operators may write (writable in the profile); default none
    """

    id: DeviceId
    bus: DeviceId
    profile: ProfileRef
    unit: Unit = 1
    interval: Duration = Duration(10.0)
    tags: dict[Name, TagValue] = {}
    measurement: Name | None = None
    workarounds: list[Workaround] = []
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=125)] | None = None  # overrides the profile's limit
    writable: list[Name] = []  # opt-in: the profile's writable points operators may write (docs/control.md)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise invalid("interval", "must be more than 0 s")
        _unique_points(self.writable)


def _unique_points(names: list[str]) -> None:
    for index, name in enumerate(names):
        if name in names[:index]:
            raise invalid(f"writable[{index}]", f'"{name}" is listed already')
