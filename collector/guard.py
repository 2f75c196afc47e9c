"""What one gateway's readings may write into the store that every gateway shares. Pure: time is passed in.

InfluxDB keeps per measurement, for all gateways together: the type of each field (fixed per shard by the
first write, a conflicting line refused), the tag keys and values (`max-values-per-tag`, default 100,000 per
tag key) and the series (`max-series-per-database`, default 1,000,000). Without a guard, one gateway could
claim a field's type, exhaust a tag's values or the series budget, and every other gateway's readings would
be refused. So before a line is made:

- **Reserved names.** A measurement named `citynerve_*` belongs to the collector (ingest records, health). A
  field may not be named like a tag key of its measurement (`gateway`, `device`, the `measurement` tag of the
  suspect measurement, every tag key the store or this collector has seen for that measurement, and the
  reading's own tags): InfluxQL resolves an unqualified name in WHERE to the field, so a field `gateway`
  would hide the real series from `WHERE gateway = '...'`. A quality flag may not shadow a field of the same
  reading (`x_quality` is made from the flag of `x`).
- **Types.** The collector knows the type of every field it has seen (the store's `SHOW FIELD KEYS` at
  start-up, every line it accepted since, and the conflicts InfluxDB reported). A value of another type is
  left out of the point and the message is quarantined (Reason.FIELD_TYPE_CONFLICT). An integer where the
  store holds a float is written as a float (lossless up to 2**53): the same number, not a conflict.
  A field nobody wrote before takes the type of its first value: a gateway can claim only names that are
  new to the whole store, and only `new_fields` of them per window.
- **Cardinality.** Per gateway and window (`window`): at most `new_series` series, `new_devices` device ids,
  `new_fields` field names and `new_measurements` measurements that this collector has not seen from it
  before, and at most `max_series`/`max_devices` in total. A reading over a budget is held back (not stored,
  not acknowledged end to end: the gateway sends it again when the window allows). Size the totals so that
  gateways x max_devices stays under max-values-per-tag and gateways x max_series under
  max-series-per-database (docs/operations.md).

State is per gateway and bounded by the totals; the set of known field types is bounded by the (limited)
number of new names each gateway may introduce.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from collector.reasons import Reason

RESERVED_MEASUREMENT_PREFIX = "citynerve_"
# Tag keys the collector sets on points (ingest) and on the suspect measurement.
COLLECTOR_TAGS = frozenset({"gateway", "device", "measurement"})
QUALITY_SUFFIX = "_quality"

FLOAT, INTEGER, BOOLEAN, STRING = "float", "integer", "boolean", "string"
_MAX_EXACT_FLOAT_INT = 2**53


def value_type(value: Any) -> str:
    kind = type(value)
    if kind is float:
        return FLOAT
    if kind is bool:
        return BOOLEAN
    if kind is int:
        return INTEGER
    if kind is str:
        return STRING
    # wire.schema decodes only these four: anything else is a programming error upstream
    raise TypeError(f"unsupported field value type {kind.__name__}")


@dataclass(frozen=True)
class GuardLimits:
    window: float = 3600.0
    new_series: int = 2000
    new_devices: int = 200
    new_fields: int = 500
    new_measurements: int = 50
    max_series: int = 10_000
    max_devices: int = 1000


@dataclass
class Verdict:
    """The fields to write for one reading (None: the reading is not written), and what was declined."""

    fields: dict[str, Any] | None
    declined: list[tuple[Reason, str]] = field(default_factory=list)


class _Window:
    __slots__ = ("count", "start")

    def __init__(self) -> None:
        self.start = float("-inf")
        self.count = 0

    def take(self, now: float, window: float, limit: int) -> bool:
        if now - self.start >= window:
            self.start, self.count = now, 0
        if self.count >= limit:
            return False
        self.count += 1
        return True


@dataclass
class _GatewayState:
    series: set[int] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    new_series: _Window = field(default_factory=_Window)
    new_devices: _Window = field(default_factory=_Window)
    new_fields: _Window = field(default_factory=_Window)
    new_measurements: _Window = field(default_factory=_Window)


# InfluxDB 1.x: 'partial write: field type conflict: input field "v" on measurement "m" is type string, already
# exists as type float dropped=1' (tsdb/shard.go). The store knows better than we did: learn it.
_CONFLICT = re.compile(
    r'input field "((?:[^"\\]|\\.)*)" on measurement "((?:[^"\\]|\\.)*)" is type \w+, already exists as type (\w+)')


class Guard:
    def __init__(self, limits: GuardLimits = GuardLimits()) -> None:
        self.limits = limits
        self._types: dict[str, dict[str, str]] = {}  # measurement -> field -> type
        self._declared: set[tuple[str, str]] = set()  # declared by the operator: nothing overrides them
        self._tag_keys: dict[str, set[str]] = {}  # measurement -> tag keys seen
        self._gateways: dict[str, _GatewayState] = {}

    # -- what the store already holds ---------------------------------------------------------------------------

    def declare(self, measurement: str, name: str, kind: str) -> None:
        """A type the operator declared ([schema] field_types): fixed before any gateway writes, so no gateway can
        claim another type for the field even in a new, empty store or shard."""
        if kind not in (FLOAT, INTEGER, BOOLEAN, STRING):
            raise ValueError(f'{measurement}.{name}: unknown type "{kind}" (float, integer, boolean or string)')
        self._types.setdefault(measurement, {})[name] = kind
        self._declared.add((measurement, name))

    def learn_field(self, measurement: str, name: str, kind: str) -> bool:
        """A type the store holds (SHOW FIELD KEYS, a conflict InfluxDB reported): it wins over our guess, not
        over a declaration. True when this changed what the guard believed."""
        if kind not in (FLOAT, INTEGER, BOOLEAN, STRING) or (measurement, name) in self._declared:
            return False
        types = self._types.setdefault(measurement, {})
        changed = types.get(name) != kind
        types[name] = kind
        return changed

    def learn_tag_key(self, measurement: str, key: str) -> None:
        self._tag_keys.setdefault(measurement, set()).add(key)

    def learn_from_refusal(self, reason: str) -> int:
        """Types named in an InfluxDB field-type-conflict message; returns how many the guard believed otherwise
        (then the line passed the guard in good faith: the conflict came from another writer, e.g. another
        collector's gateway that claimed the field first in a new shard)."""
        changed = 0
        for name, measurement, kind in _CONFLICT.findall(reason):
            changed += self.learn_field(measurement.replace('\\"', '"'), name.replace('\\"', '"'), kind)
        return changed

    def field_type(self, measurement: str, name: str) -> str | None:
        return self._types.get(measurement, {}).get(name)

    @property
    def known_fields(self) -> int:
        return sum(len(f) for f in self._types.values())

    # -- one reading --------------------------------------------------------------------------------------------

    def check(self, gateway: str, measurement: str, tags: Mapping[str, str], fields: Mapping[str, Any],
              quality: Mapping[str, str], now: float, *, owned: bool = False) -> Verdict:
        """`tags` are the point's tags (the reading's plus gateway and device); `fields` the reading's values,
        `quality` its flags (stored as `<name>_quality`). `owned`: the collector writes this measurement for
        the gateway (the suspect measurement), so its reserved name is no reason to decline."""
        if measurement.startswith(RESERVED_MEASUREMENT_PREFIX) and not owned:
            return Verdict(None, [(Reason.RESERVED_NAME,
                                   f"measurement {measurement!r}: names starting with "
                                   f"{RESERVED_MEASUREMENT_PREFIX!r} belong to the collector")])
        lim = self.limits
        gw = self._gateways.get(gateway)
        if gw is None:
            gw = self._gateways[gateway] = _GatewayState()
        declined: list[tuple[Reason, str]] = []
        types = self._types.get(measurement)
        if types is None:
            if not gw.new_measurements.take(now, lim.window, lim.new_measurements):
                return Verdict(None, [(Reason.MEASUREMENT_LIMIT,
                                       f"measurement {measurement!r}: more than {lim.new_measurements} new "
                                       f"measurements from this gateway within {lim.window:g} s")])
            types = self._types[measurement] = {}
        known_tags = self._tag_keys.get(measurement, ())
        device = tags.get("device", "")
        if not self._device_fits(gw, device, now):
            return Verdict(None, [(Reason.DEVICE_LIMIT,
                                   f"device {device!r}: over this gateway's budget of {lim.new_devices} new "
                                   f"devices per {lim.window:g} s ({lim.max_devices} in all)")])
        key = hash((measurement, *sorted(tags.items())))
        if key not in gw.series:
            if len(gw.series) >= lim.max_series or not gw.new_series.take(now, lim.window, lim.new_series):
                return Verdict(None, [(Reason.SERIES_LIMIT,
                               f"{measurement} {dict(sorted(tags.items()))}: over this gateway's budget of "
                               f"{lim.new_series} new series per {lim.window:g} s ({lim.max_series} in all)")])
            gw.series.add(key)
        out: dict[str, Any] = {}
        values = [*fields.items(), *((f"{k}{QUALITY_SUFFIX}", v) for k, v in quality.items())]
        for index, (name, value) in enumerate(values):
            is_flag = index >= len(fields)
            if name in tags or name in COLLECTOR_TAGS or name in known_tags:
                declined.append((Reason.RESERVED_NAME, f"{measurement}.{name}: a tag of this measurement has "
                                 "that name; a field so named would hide the series from queries by tag"))
                continue
            if is_flag and name in fields:
                declined.append((Reason.RESERVED_NAME, f"{measurement}.{name}: the quality flag of "
                                 f"{name[:-len(QUALITY_SUFFIX)]!r} would overwrite the field of that name"))
                continue
            kind = value_type(value)
            if kind == FLOAT and value - value != 0.0:
                out[name] = value  # NaN/inf: never written (lineproto leaves it out), so it claims nothing
                continue
            known = types.get(name)
            if known is None:
                if not gw.new_fields.take(now, lim.window, lim.new_fields):
                    declined.append((Reason.FIELD_LIMIT, f"{measurement}.{name}: more than {lim.new_fields} new "
                                     f"field names from this gateway within {lim.window:g} s"))
                    continue
                types[name] = kind
            elif known != kind:
                if known == FLOAT and kind == INTEGER and -_MAX_EXACT_FLOAT_INT <= value <= _MAX_EXACT_FLOAT_INT:
                    value = float(value)
                else:
                    declined.append((Reason.FIELD_TYPE_CONFLICT,
                                     f"{measurement}.{name}: {kind} value, the store holds {known}"))
                    continue
            out[name] = value
        if not out:
            return Verdict(None, declined)
        tag_keys = self._tag_keys.setdefault(measurement, set())
        if not tag_keys.issuperset(tags):
            tag_keys.update(tags)
        return Verdict(out, declined)

    def check_devices(self, gateway: str, devices: Collection[str], now: float) -> tuple[list[str], int]:
        """Device ids of a health document that fit this gateway's device budget, and how many do not."""
        gw = self._gateways.setdefault(gateway, _GatewayState())
        ok = [device for device in devices if self._device_fits(gw, device, now)]
        return ok, len(devices) - len(ok)

    def _device_fits(self, gw: _GatewayState, device: str, now: float) -> bool:
        """A device this gateway already has, or a new one within its budget (then it has it from now on)."""
        if device in gw.devices:
            return True
        lim = self.limits
        if len(gw.devices) >= lim.max_devices or not gw.new_devices.take(now, lim.window, lim.new_devices):
            return False
        gw.devices.add(device)
        return True


SCHEMA_QUERY = "SHOW FIELD KEYS; SHOW TAG KEYS"


def learn_from_show_keys(guard: Guard, doc: Mapping[str, Any]) -> tuple[int, int]:
    """Feed InfluxDB 1.x's answer to SCHEMA_QUERY into the guard; returns (fields, tag keys) learnt.

    A field that has different types in different shards is listed once per type: the type of the newest
    shard is not knowable from this answer, so the first listed is kept and a conflicting write is found out
    by the store itself (and then learnt from its refusal)."""
    fields = tags = 0
    results = doc.get("results") if isinstance(doc, Mapping) else None
    for result in results if isinstance(results, list) else []:
        for series in (result.get("series") or []) if isinstance(result, Mapping) else []:
            if not isinstance(series, Mapping):
                continue
            measurement = series.get("name")
            columns = series.get("columns") or []
            values = series.get("values") or []
            if not isinstance(measurement, str) or not isinstance(values, list):
                continue
            for row in values:
                if not isinstance(row, list) or not row or not isinstance(row[0], str):
                    continue
                if columns[:2] == ["fieldKey", "fieldType"] and len(row) >= 2:
                    if guard.field_type(measurement, row[0]) is None:
                        guard.learn_field(measurement, row[0], str(row[1]))
                        fields += 1
                elif columns[:1] == ["tagKey"]:
                    guard.learn_tag_key(measurement, row[0])
                    tags += 1
    return fields, tags
