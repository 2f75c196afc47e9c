"""Configuration of Modbus devices, as they appear in the agent's config file under [[devices]]."""

from __future__ import annotations

from typing import Annotated

import msgspec

from wire.config import Duration, invalid
from wire.schema import ConfigName as Name
from wire.schema import ConfigTagValue as TagValue

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Unit = Annotated[int, msgspec.Meta(ge=0, le=255)]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
DeviceId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        extra={"expect": "a device id: 1..128 characters, no control characters"},
    ),
]
ProfileRef = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$")]


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

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise invalid("interval", "must be more than 0 s")
        if self.timeout <= 0:
            raise invalid("timeout", "must be more than 0 s")
