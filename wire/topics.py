"""MQTT topic layout: <prefix>/<gateway_id>/up | status | down/<kind>. Pure functions."""

from __future__ import annotations

import re

from wire.schema import GATEWAY_ID_PATTERN

DEFAULT_PREFIX = "citynerve/v1"
UP = "up"
STATUS = "status"
DOWN = "down"

_GATEWAY_ID = re.compile(GATEWAY_ID_PATTERN)


def is_valid_gateway_id(gateway_id: str) -> bool:
    return bool(_GATEWAY_ID.match(gateway_id))


def up(prefix: str, gateway_id: str) -> str:
    return f"{prefix}/{gateway_id}/{UP}"


def status(prefix: str, gateway_id: str) -> str:
    return f"{prefix}/{gateway_id}/{STATUS}"


def down(prefix: str, gateway_id: str, kind: str) -> str:
    return f"{prefix}/{gateway_id}/{DOWN}/{kind}"


def subscription(prefix: str, leaf: str) -> str:
    """What a collector subscribes to for one leaf of every gateway, e.g. citynerve/v1/+/up."""
    return f"{prefix}/+/{leaf}"


def parse(prefix: str, topic: str) -> tuple[str, str] | None:
    """(gateway_id, leaf) of a topic under prefix, or None if the topic is not one of ours."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    gateway_id, sep, leaf = topic[len(head):].partition("/")
    if not sep or not is_valid_gateway_id(gateway_id) or not leaf:
        return None
    return gateway_id, leaf


def is_valid_prefix(prefix: str) -> bool:
    """A prefix is literal topic levels: no wildcards, no empty level, no NUL, no leading/trailing '/'."""
    return bool(prefix) and not any(c in prefix for c in "+#\x00") and "" not in prefix.split("/")
