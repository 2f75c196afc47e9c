"""The retained gateway status message on <prefix>/<gateway_id>/status: small JSON for humans and dashboards.

The birth message says "online" with details; the last will says "offline". Both are retained so that a
subscriber arriving later learns the current state at once.
"""

from __future__ import annotations

import json
from typing import Any

ONLINE = "online"
OFFLINE = "offline"


def encode_status(state: str, **details: Any) -> bytes:
    return json.dumps({"state": state, **details}, separators=(",", ":"), sort_keys=True).encode()


def decode_status(payload: bytes) -> dict[str, Any]:
    """Raises ValueError for anything that is not a JSON object with a string "state"."""
    doc = json.loads(payload)
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), str):
        raise ValueError('expected a JSON object with a string "state"')
    return doc
