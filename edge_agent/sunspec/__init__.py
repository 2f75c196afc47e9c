"""SunSpec: discovery of a device's model chain and its point map from the SunSpec model definitions.

See docs/sunspec.md. `discovery` holds the sans-IO walker and the mapping to firmware-profile points,
`models` the model-file reader and SunSpec's value rules.
"""

from edge_agent.sunspec.discovery import (
    DEFAULT_BASES,
    MappedPoint,
    ModelInstance,
    Probe,
    SunSpecMap,
    SunSpecNotFound,
    SunSpecWalker,
    discover,
    mapped_points,
    point_settings,
    point_specs_for,
    points_for,
    profile_for,
    register_reader,
    walk,
)
from edge_agent.sunspec.models import ModelDef, ModelLibrary, PointDef, decode_value, shipped_models

__all__ = [
    "DEFAULT_BASES",
    "MappedPoint",
    "ModelDef",
    "ModelInstance",
    "ModelLibrary",
    "PointDef",
    "Probe",
    "SunSpecMap",
    "SunSpecNotFound",
    "SunSpecWalker",
    "decode_value",
    "discover",
    "mapped_points",
    "point_settings",
    "point_specs_for",
    "points_for",
    "profile_for",
    "register_reader",
    "shipped_models",
    "walk",
]
