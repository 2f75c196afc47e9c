"""What the agent tells the collector about itself besides its health (wire/status.py): where it is and what
devices it has. Pure: built from the configuration and the loop's own state, no I/O.

- **Location**: the newest position fix of an NMEA source (`location_source` "gps"), else `[gateway] location`
  from agent.toml ("config"), else none. A GPS fix wins because it is measured where the gateway is now.
- **Devices**: per device id its kind, bus, unit (Modbus) or address (DL/T 645, CJ/T 188, M-Bus), protocol,
  profile and model from the configuration and the profile, and what the device said about itself: a Modbus
  device's Read Device Identification (edge_agent/modbus/identify.py), a SunSpec device's model 1
  (manufacturer, serial number, version), an M-Bus meter's manufacturer, a serial meter's or sensor's
  identification from its frames (edge_agent/serial/source.py IDENTITY_TAGS).

Every text is cut to the schema's bounds and cleaned of control characters here, so that one odd device cannot
make the collector refuse the whole heartbeat (it validates the status strictly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.modbus.bus import BusEngine, PolledDevice
from edge_agent.modbus.identify import Identified
from edge_agent.serial.source import SerialSource
from wire.names import BAD_CHARACTER
from wire.status import ALT_RANGE, MAX_BUS_CHARS, MAX_TEXT_CHARS

# A serial device that sent nothing for this long (and for three of its intervals) is failing.
SERIAL_SILENCE = 60.0


def text(value: object, limit: int = MAX_TEXT_CHARS) -> str:
    return BAD_CHARACTER.sub(" ", str(value)).strip()[:limit].rstrip()


def profile_name(profile: str) -> str:
    """A shipped profile's name as configured; a profile file by its name without directory and suffix."""
    return Path(profile).stem if "/" in profile or profile.endswith(".toml") else profile


def location(cfg: AgentConfig, sources: list[SerialSource]) -> tuple[dict[str, Any] | None, str | None]:
    """(location, location_source) for the status."""
    fixes = [s.fix for s in sources if s.fix is not None]
    if fixes:
        fix = max(fixes, key=lambda f: f.time_ns)
        alt = fix.alt if fix.alt is not None and ALT_RANGE[0] <= fix.alt <= ALT_RANGE[1] else None
        return {"lat": fix.lat, "lon": fix.lon, "alt": alt, "time_ns": fix.time_ns}, "gps"
    configured = cfg.gateway.location
    if configured is not None:
        return {"lat": configured.lat, "lon": configured.lon, "alt": configured.alt}, "config"
    return None, None


def devices(cfg: AgentConfig, buses: list[BusEngine], sources: list[SerialSource]) -> dict[str, dict[str, Any]]:
    """The inventory: {device id: DeviceInfo as a dict} (wire/status.py)."""
    configured = {d.id: d for d in cfg.devices}
    out: dict[str, dict[str, Any]] = {}
    for engine in buses:
        for polled in engine.devices:
            device = configured.get(polled.id)
            entry: dict[str, Any] = {"kind": kind_of(device), "bus": text(engine.bus.id, MAX_BUS_CHARS)}
            if polled.meter is not None:  # DL/T 645, CJ/T 188, M-Bus: an address, and its protocol's name
                entry["protocol"] = entry["kind"]
                address = getattr(device, "address", None)
                address = getattr(device, "secondary", None) if address is None else address
                if address is not None:
                    entry["address"] = text(address)
            else:
                entry["unit"] = polled.unit
                profile = getattr(device, "profile", None)
                if profile:
                    entry["profile"] = text(profile_name(profile))
                entry["modbus_id"] = modbus_id(polled)
            if polled.tags.get("model"):
                entry["model"] = text(polled.tags["model"])
            entry.update({k: text(v) for k, v in polled.discovered.items() if v})
            out[polled.id] = entry
    for source in sources:
        entry = {"kind": "serial", "bus": text(source.device.port, MAX_BUS_CHARS), "protocol": source.device.protocol}
        entry.update({k: text(v) for k, v in source.identity.items() if v})
        out[source.device.id] = entry
    return out


def kind_of(device: object) -> str:
    """A device's `kind` as agent.toml says it (the tag of its configuration struct)."""
    tag = getattr(type(device), "__struct_config__", None)
    return str(tag.tag) if tag is not None and tag.tag is not None else "modbus-tcp"


def modbus_id(polled: PolledDevice) -> dict[str, Any]:
    state = polled.identify_state
    found: dict[str, Any] = {"state": state}
    if isinstance(polled.identification, Identified):
        found["conformity"] = polled.identification.conformity
        found.update({name: text(value) for name, value in polled.identification.named().items()})
    elif polled.identify_error and state != "not_offered":
        found["error"] = text(polled.identify_error, 512)
    return found


def serial_failing(source: SerialSource, now: float, started: float) -> bool:
    """No sample for SERIAL_SILENCE seconds and three of the device's intervals (since the agent started)."""
    quiet = max(SERIAL_SILENCE, 3 * float(source.device.interval))
    return now - (source.last_sample or started) > quiet
