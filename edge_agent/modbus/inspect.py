"""Raw registers shown every way they could be meant: for a technician finding a meter's types and word order.

Pure: registers in, rows out. `edge-agent read --table ... --address ... --count ...` prints these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from edge_agent.modbus.decode import Missing, make_decoder

ORDERS_32 = ("ABCD", "CDAB", "BADC", "DCBA")


def _show(value: Any) -> Any:
    if isinstance(value, Missing):  # a sentinel in this reading (e.g. a float32 NaN): nothing to show, also in JSON
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return float(f"{value:.7g}")
    return value


def register_rows(address: int, registers: Sequence[int]) -> list[dict[str, Any]]:
    """One row per register: address, hex, uint16, int16, and its ASCII bytes."""
    rows = []
    for i, reg in enumerate(registers):
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in (reg >> 8, reg & 0xFF))
        rows.append({"address": address + i, "hex": f"0x{reg:04X}", "uint16": reg,
                     "int16": reg - 65536 if reg > 32767 else reg, "ascii": text})
    return rows


def pair_rows(address: int, registers: Sequence[int]) -> list[dict[str, Any]]:
    """One row per register pair starting at each address: float32 in all four orders, int32/uint32 in both
    word orders."""
    # BADC/DCBA matter for floats (byte-swapping gateways); for integers the two word orders are what differ.
    kinds = [("float32", o) for o in ORDERS_32] + [(t, o) for t in ("int32", "uint32") for o in ("ABCD", "CDAB")]
    decoders = {kind: make_decoder(*kind) for kind in kinds}
    rows = []
    for i in range(len(registers) - 1):
        pair = registers[i : i + 2]
        row: dict[str, Any] = {"address": address + i}
        for (type_, order), decode in decoders.items():
            row[f"{type_} {order}"] = _show(decode(pair))
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[str(c) for c in columns]] + [[str(_none(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) for row in cells)


def _none(value: Any) -> Any:
    return "-" if value is None else value
