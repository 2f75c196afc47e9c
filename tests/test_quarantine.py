"""The quarantine keeps rejected payloads within its bounds, oldest dropped first, readable by another process."""

from __future__ import annotations

from collector.quarantine import Quarantine, hexdump


def test_bounded_by_entries_and_bytes(tmp_path) -> None:
    q = Quarantine(tmp_path / "q.db", max_entries=5, max_bytes=1000, max_payload=300)
    for i in range(8):
        q.add("gw-1", "citynerve/v1/gw-1/up", "bad_tag", f"attempt {i}", bytes([i]) * 100)
    assert [e.detail for e in q.list()] == [f"attempt {i}" for i in range(7, 2, -1)]
    q.add("gw-2", "t", "too_large", "big", b"x" * 10_000)
    big = q.list(gateway="gw-2")[0]
    assert big.size == 10_000 and len(q.get(big.id).payload) == 300  # kept truncated
    assert sum(len(q.get(e.id).payload) for e in q.list()) <= 1000
    assert [e.reason for e in q.list(reason="bad_tag")] == ["bad_tag"] * 4
    other = Quarantine(tmp_path / "q.db")  # the CLI reads while the collector writes
    assert [e.id for e in other.list()] == [e.id for e in q.list()]


def test_hexdump() -> None:
    assert hexdump(b"\x01\x94AB") == "00000000  01 94 41 42" + " " * 36 + "  ..AB"
