"""Serial meters and sensors in agent.toml: `kind = "serial"` devices."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from edge_agent.modbus.config import BAUD_RATES, DeviceId
from edge_agent.serial.ascii_line import AsciiLineSettings
from wire.config import Duration, invalid
from wire.schema import ConfigName as Name
from wire.schema import ConfigTagValue as TagValue

Protocol = Literal["dsmr", "iec62056-21", "nmea", "sds011", "pmsx003", "mhz19b", "ascii"]


class SerialDevice(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag="serial", tag_field="kind"):
    """A meter or sensor on a serial port of its own (P1 cable, optical head, GPS, sensor UART).

    [[devices]]
    kind = "serial"
    id = "p1"
    port = "/dev/ttyUSB1"
    protocol = "dsmr"          # dsmr, iec62056-21, nmea, sds011, pmsx003, mhz19b, ascii
    # baud / data_bits / parity / stop_bits default to the protocol's usual settings
    """

    id: DeviceId
    port: Annotated[str, msgspec.Meta(pattern=r"^/\S+$", extra={"expect": 'a serial port path such as "/dev/ttyUSB0"'})]
    protocol: Protocol
    baud: int | None = None
    data_bits: Literal[7, 8] | None = None
    parity: Literal["N", "E", "O"] | None = None
    stop_bits: Literal[1, 2] | None = None
    measurement: Name | None = None
    # query protocols (mhz19b, iec62056-21): how often to ask; streaming protocols send on their own
    interval: Duration = Duration(10.0)
    tags: dict[Name, TagValue] = {}
    # iec62056-21: the meter's device address in the sign-on request ("" = any meter on the optical head)
    address: Annotated[str, msgspec.Meta(max_length=32, pattern=r"^[0-9A-Za-z ]*$")] = ""
    # iec62056-21: the highest baud rate to switch to after sign-on
    max_baud: int = 9600
    # ascii: how to read each line
    ascii: AsciiLineSettings | None = None

    def __post_init__(self) -> None:
        if self.baud is not None and self.baud not in BAUD_RATES:
            raise invalid("baud", f"expected one of {', '.join(map(str, BAUD_RATES))}, got {self.baud}")
        if self.protocol == "ascii" and self.ascii is None:
            raise invalid("ascii", 'required when protocol = "ascii": a table with at least a regex')
        if self.protocol != "ascii" and self.ascii is not None:
            raise invalid("ascii", f'only for protocol = "ascii", not "{self.protocol}"')
        if self.interval <= 0:
            raise invalid("interval", "must be more than 0 s")
        if self.max_baud not in (300, 600, 1200, 2400, 4800, 9600, 19200):
            raise invalid("max_baud", "expected one of 300, 600, 1200, 2400, 4800, 9600, 19200 (IEC 62056-21)")
