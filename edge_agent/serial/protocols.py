"""The serial protocols the agent speaks: their usual line settings, measurement, and decoder.

One table, used by the running source, `poll-once` and `edge-agent decode`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.serial.sensors import MHZ19B_QUERY

if TYPE_CHECKING:
    from edge_agent.serial.base import StreamDecoder
    from edge_agent.serial.config import SerialDevice


@dataclass(frozen=True)
class ProtocolInfo:
    name: str
    baud: int
    data_bits: int
    parity: str
    stop_bits: int
    measurement: str
    make: Callable[[Any], StreamDecoder]  # device (or None for `decode`) -> a fresh decoder
    query: bytes | None = None  # sent every interval (query protocols)
    dialogue: Callable[..., Awaitable[None]] | None = None  # a protocol that drives the port itself
    description: str = ""
    # {measurement ("" = the device's): {field: unit}} of every field the decoder can give: the data catalogue
    # (docs/catalog.md); None where the device's settings name them (ascii)
    fields: Callable[[], dict[str, dict[str, str]]] | None = None

    def make_decoder(self, device: SerialDevice | None) -> StreamDecoder:
        return self.make(device)

    def line_settings(self, device: SerialDevice) -> tuple[int, int, str, int]:
        return (device.baud or self.baud, device.data_bits or self.data_bits, device.parity or self.parity,
                device.stop_bits or self.stop_bits)


def _dsmr(_device: Any) -> StreamDecoder:
    from edge_agent.serial.dsmr import DsmrDecoder

    return DsmrDecoder()


def _nmea(_device: Any) -> StreamDecoder:
    from edge_agent.serial.nmea import NmeaDecoder

    return NmeaDecoder()


def _iec(_device: Any) -> StreamDecoder:
    from edge_agent.serial.iec62056_21 import Iec62056ReadoutDecoder

    return Iec62056ReadoutDecoder()


def _sensor(name: str) -> Callable[[Any], StreamDecoder]:
    def make(_device: Any) -> StreamDecoder:
        from edge_agent.serial import sensors

        return sensors.DECODERS[name]()

    return make


def _ascii(device: Any) -> StreamDecoder:
    from edge_agent.serial.ascii_line import AsciiLineDecoder

    if device is None or device.ascii is None:
        raise ValueError("the ascii protocol needs its settings (a regex); use a config file")
    return AsciiLineDecoder(device.ascii)


def _dsmr_fields() -> dict[str, dict[str, str]]:
    from edge_agent.serial.obis import dsmr_fields

    fields = dsmr_fields()
    return {"" if m == "electricity" else m: f for m, f in fields.items()}  # the meter's own: the device's


def _iec_fields() -> dict[str, dict[str, str]]:
    from edge_agent.serial.iec62056_21 import known_fields

    return {"": known_fields()}


def _nmea_fields() -> dict[str, dict[str, str]]:
    from edge_agent.serial.nmea import FIELDS

    return {"": dict(FIELDS)}


def _sensor_fields(name: str) -> Callable[[], dict[str, dict[str, str]]]:
    def fields() -> dict[str, dict[str, str]]:
        from edge_agent.serial import sensors

        return {"": dict(sensors.DECODERS[name].FIELDS)}

    return fields


async def _iec_dialogue(source: Any, decoder: Any, emit: Callable[[list], None]) -> None:
    from edge_agent.serial.iec62056_21 import run_dialogue

    await run_dialogue(source, emit)




PROTOCOLS: dict[str, ProtocolInfo] = {
    "dsmr": ProtocolInfo("dsmr", 115200, 8, "N", 1, "electricity", _dsmr, fields=_dsmr_fields,
                         description="DSMR P1 smart meter telegrams (4.x/5.0/e-MUCS; 2.2/3.0: baud 9600, 7E1)"),
    "iec62056-21": ProtocolInfo("iec62056-21", 300, 7, "E", 1, "electricity", _iec, dialogue=_iec_dialogue,
                                fields=_iec_fields,
                                description="IEC 62056-21 mode C readout over an optical head"),
    "nmea": ProtocolInfo("nmea", 9600, 8, "N", 1, "gps", _nmea, fields=_nmea_fields,
                         description="NMEA 0183 GPS (GGA, RMC)"),
    "sds011": ProtocolInfo("sds011", 9600, 8, "N", 1, "air_quality", _sensor("sds011"),
                           fields=_sensor_fields("sds011"),
                           description="Nova SDS011 PM2.5/PM10"),
    "pmsx003": ProtocolInfo("pmsx003", 9600, 8, "N", 1, "air_quality", _sensor("pmsx003"),
                            fields=_sensor_fields("pmsx003"),
                            description="Plantower PMS x003 particulate sensor"),
    "mhz19b": ProtocolInfo("mhz19b", 9600, 8, "N", 1, "air_quality", _sensor("mhz19b"),
                           query=MHZ19B_QUERY, fields=_sensor_fields("mhz19b"), description="Winsen MH-Z19B CO2 (queried)"),
    "ascii": ProtocolInfo("ascii", 9600, 8, "N", 1, "sensor", _ascii,
                          description="generic ASCII lines, parsed with a regular expression"),
}


def protocol_info(name: str) -> ProtocolInfo:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown serial protocol {name!r}: expected one of {', '.join(PROTOCOLS)}") from None
