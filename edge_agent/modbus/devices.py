"""From configuration and firmware profile to what the bus engine polls: plans built once, at start-up."""

from __future__ import annotations

from collections.abc import Collection

from edge_agent.config import AgentConfig, Device
from edge_agent.meters.config import METER_KINDS, MeterDevice
from edge_agent.meters.readers import reader_for
from edge_agent.modbus.bus import BusEngine, PolledDevice
from edge_agent.modbus.config import ModbusBus, ModbusDevice
from edge_agent.modbus.plan import Unreadable, plan_reads
from edge_agent.profiles import Profile, load_profile


def plan_for(device: Device, profile: Profile) -> list:
    """The device's request plan within the profile's limits, its workarounds and the device's overrides."""
    # A modbus-tcp shorthand device has no workarounds or limit overrides of its own.
    workarounds = set(profile.workarounds) | set(getattr(device, "workarounds", ()))
    max_registers = getattr(device, "max_registers", None) or profile.max_registers
    return plan_reads(
        profile.point_specs(device.measurement),
        max_registers,
        0 if "no_gap_reads" in workarounds else profile.max_gap,
        max_bits=profile.max_bits,
        unreadable=[Unreadable(u.table, u.start, u.end) for u in profile.unreadable],
        one_request_per_point="one_request_per_point" in workarounds,
    )


SUNSPEC_DISCOVERY = "sunspec"


def polled_device(device: Device, profile: Profile | None) -> PolledDevice:
    """`profile` None: the device is SunSpec and its plan comes from discovery on the first poll."""
    if profile is None:
        return PolledDevice(id=device.id, unit=device.unit, interval=float(device.interval), plan=[],
                            tags={"model": "SunSpec", **device.tags}, discover=_sunspec_discovery(device))
    return PolledDevice(
        id=device.id,
        unit=device.unit,
        interval=float(device.interval),
        plan=plan_for(device, profile),
        tags={"model": profile.model, **device.tags},
        # only what the device opted in to (edge-agent check refused anything else): by default nothing
        writes={name: profile.write_point(name) for name in device.writable},
        points=frozenset(p.name for p in profile.points),
        profile_writable=frozenset(profile.writable_points()),
    )


def polled_meter(device: MeterDevice, bus: ModbusBus) -> PolledDevice:
    """A DL/T 645, CJ/T 188 or M-Bus meter as the engine polls it: by its protocol's dialogue at the bus's baud."""
    assert bus.baud is not None  # a configuration's buses are resolved (AgentConfig._resolve_lines)
    reader = reader_for(device, bus.baud)
    return PolledDevice(id=device.id, unit=0, interval=float(device.interval), plan=[],
                        tags={"protocol": reader.protocol, **device.tags}, meter=reader)


def bus_engines(cfg: AgentConfig, only: Collection[str] | None = None) -> list[BusEngine]:
    """One engine per bus; devices sharing a serial port or TCP endpoint share its engine, whatever their
    protocol (Modbus units and DL/T 645, CJ/T 188, M-Bus meters), in configuration order. `only`: the engines
    of these bus ids (a live reconfiguration builds what it starts)."""
    grouped: dict[str, tuple[ModbusBus, list[PolledDevice]]] = {}
    for device in cfg.bus_devices:
        bus = cfg.bus_of(device)
        if only is not None and bus.id not in only:
            continue
        if isinstance(device, METER_KINDS):
            polled = polled_meter(device, bus)
        else:
            profile = None if device.profile == SUNSPEC_DISCOVERY else load_profile(device.profile)
            polled = polled_device(device, profile)
        grouped.setdefault(bus.id, (bus, []))[1].append(polled)
    return [BusEngine(bus, devices) for bus, devices in grouped.values()]


def _sunspec_discovery(device: Device):
    async def discover(read_holding):
        from edge_agent.sunspec.discovery import discover as walk_chain
        from edge_agent.sunspec.discovery import profile_for

        smap = await walk_chain(read_holding)
        profile = profile_for(smap, device.measurement or "sunspec")
        # model 1 (common) also names the manufacturer, serial number and version: the inventory's
        found = {name: str(smap.common[key]).strip() for key, name in
                 (("Mn", "vendor"), ("SN", "serial"), ("Vr", "revision")) if str(smap.common.get(key, "")).strip()}
        return plan_for(device, profile), profile.model, found

    return discover


__all__ = ["ModbusDevice", "bus_engines", "plan_for", "polled_device", "polled_meter"]
