"""What a new configuration changes in a running agent, and what must stop and start for it. Pure.

A running agent is reconfigured live (edge_agent/app.py `Agent.reconfigure`, after SIGHUP or a pushed remote
configuration, docs/control.md "Remote configuration"): the outbox is never touched, and a bus or serial
source whose configuration did not change keeps running (no gap in its polling). This module only decides:

    shape(cfg, profile_of) -> Shape    what a configuration runs: buses (settings + devices + their profiles'
                                       content), serial sources, MQTT settings, bounds
    plan(running, wanted)  -> Plan     which buses and sources to keep, stop and start; whether the MQTT link
                                       restarts; which bounds change
    fixed_change(old, new) -> key      a key that no live reconfiguration may change (FIXED_KEYS), or None

A bus is known by its id (a `modbus-tcp` device's endpoint is a bus of its own, `tcp://host:port`) and is
unchanged only if its settings, its devices (in order: Modbus units and DL/T 645, CJ/T 188, M-Bus meters) and the
content of their profiles are all equal: a profile file edited on disk rebuilds the buses that use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from edge_agent.config import AgentConfig
from edge_agent.meters.config import METER_KINDS
from wire.config import Secret

# Keys a running agent cannot change without a restart, and that a pushed configuration may not change at all:
# the gateway's identity and where its state lives (the outbox and its sequence numbers, the remote
# configuration's own files), [security], the trust anchors (identity key, collector key, operator CA), and
# [metrics], a listening socket on the gateway (a push must not open one).
FIXED_KEYS = ("gateway.id", "gateway.state_dir", "outbox.path", "security", "metrics", "clock")

class ReconfigureFailed(Exception):
    """A new configuration could not be built (found before anything running was changed)."""


# A value fit for comparison: structs as builtins, secrets by their value (a Secret has no equality of its own).
Canonical = Any


def canonical(value: Any) -> Canonical:
    def enc(obj: Any) -> Any:
        if isinstance(obj, Secret):
            return ["secret", obj.value]
        if isinstance(obj, float):  # Duration
            return float(obj)
        if isinstance(obj, int):  # Size
            return int(obj)
        raise NotImplementedError(f"cannot compare {type(obj).__name__}")

    return msgspec.to_builtins(value, enc_hook=enc)


def fixed_change(old: AgentConfig, new: AgentConfig) -> str | None:
    """The key path of the first FIXED_KEYS difference between `old` and `new` (e.g. "security.identity_key"),
    or None."""
    for key, a, b in (("gateway.id", old.gateway.id, new.gateway.id),
                      ("gateway.state_dir", old.gateway.state_dir, new.gateway.state_dir),
                      ("outbox.path", str(old.outbox_path), str(new.outbox_path))):
        if a != b:
            return key
    for section in ("security", "metrics", "clock"):
        a, b = getattr(old, section), getattr(new, section)
        if (a is None) != (b is None):
            return section
        if a is not None:
            a, b = canonical(a), canonical(b)
            for name in sorted(a.keys() | b.keys()):
                if a.get(name) != b.get(name):
                    return f"{section}.{name}"
    return None


@dataclass(frozen=True)
class Shape:
    """What a configuration runs, in comparable form. `buses`: bus id -> (bus settings, its devices, their
    profiles' content); `serial`: device id -> its settings."""

    buses: Mapping[str, Canonical]
    serial: Mapping[str, Canonical]
    mqtt: Canonical
    uplink: Canonical
    outbox_bounds: Canonical
    log: Canonical


def shape(cfg: AgentConfig, profile_of: Callable[[str], Any]) -> Shape:
    """`profile_of(name_or_path)`: the profile's content (any comparable value; None for SunSpec discovery).
    The shell passes edge_agent/profiles.py `load_profile`; tests pass what they like."""
    buses: dict[str, list[Any]] = {}
    for device in cfg.bus_devices:
        bus = cfg.bus_of(device)
        entry = buses.setdefault(bus.id, [canonical(bus)])
        # a DL/T 645, CJ/T 188 or M-Bus meter has no profile file: its identifier tables ship with the agent
        content = None if isinstance(device, METER_KINDS) else canonical(profile_of(device.profile))
        entry.append((canonical(device), content))
    return Shape(
        buses={bus_id: tuple(entry) for bus_id, entry in buses.items()},
        serial={d.id: canonical(d) for d in cfg.serial_devices},
        mqtt=canonical(cfg.mqtt),
        uplink=canonical(cfg.uplink),
        outbox_bounds=(int(cfg.outbox.max_size), float(cfg.outbox.max_age)),
        log=canonical(cfg.log),
    )


@dataclass(frozen=True)
class Plan:
    keep_buses: tuple[str, ...] = ()
    stop_buses: tuple[str, ...] = ()  # removed or changed: their task is retired, their transport closed
    start_buses: tuple[str, ...] = ()  # new or changed: built from the new configuration
    keep_serial: tuple[str, ...] = ()
    stop_serial: tuple[str, ...] = ()
    start_serial: tuple[str, ...] = ()
    restart_link: bool = False  # MQTT settings changed: a new connection (outbox and window kept)
    uplink: bool = False  # cycle, heartbeat, buffer, window or ack timeouts changed
    outbox_bounds: bool = False
    log: bool = False

    @property
    def changes_nothing(self) -> bool:
        return not (self.stop_buses or self.start_buses or self.stop_serial or self.start_serial
                    or self.restart_link or self.uplink or self.outbox_bounds or self.log)

    def describe(self) -> str:
        """One line for the log, e.g. "buses: kept tcp://10.0.0.5:502, rebuilt rs485-1; MQTT link restarted"."""
        parts = [p for p in (_describe("buses", self.keep_buses, self.stop_buses, self.start_buses),
                             _describe("serial sources", self.keep_serial, self.stop_serial, self.start_serial))
                 if p]
        if self.restart_link:
            parts.append("MQTT link restarted")
        changed = [name for name, flag in (("uplink", self.uplink), ("outbox bounds", self.outbox_bounds),
                                           ("log", self.log)) if flag]
        if changed:
            parts.append(f"{', '.join(changed)} applied")
        return "; ".join(parts) if parts else "nothing changed"


def _describe(what: str, keep: tuple[str, ...], stop: tuple[str, ...], start: tuple[str, ...]) -> str:
    rebuilt = [x for x in stop if x in start]
    items = [("kept", keep), ("rebuilt", tuple(rebuilt)), ("stopped", tuple(x for x in stop if x not in rebuilt)),
             ("started", tuple(x for x in start if x not in rebuilt))]
    said = [f"{verb} {', '.join(names)}" for verb, names in items if names]
    return f"{what}: {'; '.join(said)}" if said else ""


def plan(running: Shape, wanted: Shape) -> Plan:
    """What to do to go from `running` to `wanted`. Everything stopped is stopped before anything starts (a
    serial port may pass from a removed source to a new bus)."""
    keep_b, stop_b, start_b = _diff(running.buses, wanted.buses)
    keep_s, stop_s, start_s = _diff(running.serial, wanted.serial)
    return Plan(keep_b, stop_b, start_b, keep_s, stop_s, start_s,
                restart_link=running.mqtt != wanted.mqtt,
                uplink=running.uplink != wanted.uplink,
                outbox_bounds=running.outbox_bounds != wanted.outbox_bounds,
                log=running.log != wanted.log)


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    keep = tuple(k for k in new if k in old and old[k] == new[k])
    stop = tuple(k for k in old if k not in keep)
    start = tuple(k for k in new if k not in keep)
    return keep, stop, start
