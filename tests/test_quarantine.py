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


def test_trim_keeps_the_newest_within_both_bounds(tmp_path) -> None:
    from collector.quarantine import Quarantine

    q = Quarantine(tmp_path / "q.db", max_entries=50, max_bytes=10_000)
    q.add_many([("gw", "t", "r", "d", bytes(100), i) for i in range(80)])
    entries = q.list(limit=1000)
    assert len(entries) == 50 and entries[-1].received_ns == 30  # the 30 oldest went
    q.add_many([("gw", "t", "r", "d", bytes(3000), 100 + i) for i in range(3)])
    entries = q.list(limit=1000)
    assert sum(e.size for e in entries) <= 10_000 and entries[0].received_ns == 102
    q.close()


def test_the_sink_keeps_a_sample_per_gateway_and_reason_and_never_blocks(tmp_path) -> None:
    import asyncio

    from collector.quarantine import Quarantine, QuarantineSink

    async def main() -> QuarantineSink:
        sink = QuarantineSink(tmp_path / "q.db", 1000, 1 << 24, max_rows=100)
        task = asyncio.create_task(sink.run())
        now = 1_800_000_000 * 10**9
        kept = [sink.add("flood", "t", "bad_tag", "x", b"p", now + i) for i in range(500)]
        kept += [sink.add("other", "t", "bad_tag", "x", b"p", now)]
        assert kept.count(True) == QuarantineSink.SAMPLE + 1 and sink.sampled_out == 500 - QuarantineSink.SAMPLE
        # a minute later the flood gets a new sample
        assert sink.add("flood", "t", "bad_tag", "x", b"p", now + 61 * 10**9)
        while sink.written < QuarantineSink.SAMPLE + 2:
            await asyncio.sleep(0.01)
        # what the file holds, as the metrics show it (read on the sink's thread after the write)
        assert (sink.stored_entries, sink.stored_bytes) == (QuarantineSink.SAMPLE + 2, QuarantineSink.SAMPLE + 2)
        task.cancel()
        await sink.close()
        return sink

    asyncio.run(main())
    q = Quarantine(tmp_path / "q.db")
    assert len(q.list(limit=1000, gateway="flood")) == QuarantineSink.SAMPLE + 1
    assert len(q.list(limit=1000, gateway="other")) == 1
