"""What a reload of collector.toml (SIGHUP, `systemctl reload edge-collector`) changes at once, and what waits for
a restart. Pure: two loaded configurations in, a plan out; collector/app.py applies it.

Applied at once, because each is read afresh for every message or round and holds no state that depends on it:

    [log]         level and format (unless --log-level/--log-format override them), stats_interval (while on)
    [limits]      every rate, burst, queue bound and budget, except `workers`; known gateways keep their tokens
    [validation]  payload size, time plausibility, the suspect measurement
    [acks]        interval
    [schema]      field types declared in the file (added to those known; a declaration removed from the file
                  stays until a restart, as the store holds that type anyway), refresh
    [security]    accept_plain
    [inventory]   flush_interval, info_interval, health_interval (the next write of each is due by the new value)

Everything else needs a restart, and the reload says which keys changed and wait for it: [mqtt] or [nats] (the
broker session, the subscription or the consumer), [influx] (the writer and its pending lines), [quarantine] and
inventory.path and max_gateways (open files, bounds of what is held), [security] keys_dir, registry,
session_grace, replay_window (the opener's keys and sessions), limits.workers, turning log.stats_interval on or
off. The gateway registry itself is re-opened and re-read on every reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from collector.config import CollectorConfig
from wire.config import Secret

_INVENTORY_APPLIED = ("flush_interval", "info_interval", "health_interval")
_APPLIED = ("log.", "limits.", "validation.", "acks.", "schema.", "security.accept_plain",
            *(f"inventory.{key}" for key in _INVENTORY_APPLIED))
_RESTART = ("limits.workers",)


@dataclass(frozen=True)
class ReloadPlan:
    config: CollectorConfig  # what runs from now on: the new values of what is applied, the old of the rest
    applied: list[str]  # key paths changed and in effect now
    restart: list[str]  # key paths changed that take effect at the next start


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted key paths whose values differ (a whole section when it appears or disappears)."""
    if isinstance(old, msgspec.Struct) and type(old) is type(new):
        paths: list[str] = []
        for name in old.__struct_fields__:
            paths += changed_keys(getattr(old, name), getattr(new, name), f"{prefix}{name}.")
        return paths
    return [] if _same(old, new) else [prefix.rstrip(".")]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Secret) or isinstance(b, Secret):
        return isinstance(a, Secret) and isinstance(b, Secret) and (a.origin, a.value) == (b.origin, b.value)
    return type(a) is type(b) and a == b


def plan(old: CollectorConfig, new: CollectorConfig) -> ReloadPlan:
    applied, restart = [], []
    stats_toggled = (float(old.log.stats_interval) > 0) != (float(new.log.stats_interval) > 0)
    for key in changed_keys(old, new):
        now = key.startswith(_APPLIED) and not key.startswith(_RESTART)
        if key == "log.stats_interval" and stats_toggled:
            now = False  # the stats task exists only while it is on
        (applied if now else restart).append(key)
    replace = msgspec.structs.replace
    log = new.log if not stats_toggled else replace(new.log, stats_interval=old.log.stats_interval)
    security = old.security
    if old.security is not None and new.security is not None:
        security = replace(old.security, accept_plain=new.security.accept_plain)
    inventory = replace(old.inventory, **{key: getattr(new.inventory, key) for key in _INVENTORY_APPLIED})
    config = replace(old, log=log, limits=replace(new.limits, workers=old.limits.workers), validation=new.validation,
                     acks=new.acks, schema=new.schema, security=security, inventory=inventory)
    return ReloadPlan(config, applied, restart)
