"""Line-protocol encoding: the collector's per-message pure work on the fleet benchmark's messages, with readings of
floats written by msgspec's JSON encoder (collector.influx.lineproto._all_floats, today) against value by value
with repr() (the path every other reading takes, and every reading took before), in the same run.

    python -m bench.encode [--gateways 2000] [--repeats 5]

The messages are the fleet's (labkit.fleet_sim.Meters: three meters per gateway polled every second, ten float32
values each as the agent's decoder gives them, one message of 30 readings per 10 s). Each figure is the best of
`repeats` passes over all messages (the least disturbed): encode_line alone per reading, and the whole of
Ingest.uplink per message (decode, checks, lines, the ingest record) - what the collector spends per message
besides MQTT, TLS, opening the envelope and the store's HTTP. Prints a table and JSON; main(argv) returns the dict.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from collector.influx import lineproto
from collector.ingest import Ingest, TimePolicy
from labkit.fleet_sim import Meters
from wire import topics
from wire.envelope import seal_plain
from wire.schema import Batch

PREFIX = topics.DEFAULT_PREFIX


@contextmanager
def value_by_value() -> Iterator[None]:
    """encode_line without the JSON path: every reading value by value, as before."""
    fast = lineproto._all_floats
    lineproto._all_floats = lambda fields: None  # type: ignore[assignment]
    try:
        yield
    finally:
        lineproto._all_floats = fast  # type: ignore[assignment]


def best(passes: int, work: Callable[[], None]) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gateways", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    end = int(time.time() // 10) * 10 - 10
    receive_ns = (end + 1) * 10**9
    messages, lines = [], []
    for i in range(args.gateways):
        gateway = f"gw-{i:05d}"
        readings = Meters(i, 3, 1.0, 10.0).readings(end)
        messages.append((topics.up(PREFIX, gateway), seal_plain(Batch(gateway, 1, end * 10**9, readings))))
        lines += [(r.measurement, {"gateway": gateway, "device": r.device}, r.fields, r.time_ns) for r in readings]
    ingest = Ingest(PREFIX, 1 << 30, TimePolicy(300 * 10**9, 1_577_836_800 * 10**9), "citynerve_suspect_time")

    def encode_all() -> None:
        for measurement, tags, fields, time_ns in lines:
            lineproto.encode_line(measurement, tags, fields, time_ns)

    def uplink_all() -> None:
        for topic, payload in messages:
            ingest.uplink(topic, payload, receive_ns)

    same = [lineproto.encode_line(*line) for line in lines[:300]]
    with value_by_value():
        before = [lineproto.encode_line(*line) for line in lines[:300]]
    assert all(_values(a) == _values(b) for a, b in zip(same, before, strict=True)), "the two paths disagree"
    result: dict = {"gateways": args.gateways, "readings": len(lines), "messages": len(messages)}
    # Interleaved, so that drift of a shared machine weighs on both alike.
    for name, work, per in (("encode_line", encode_all, len(lines)), ("Ingest.uplink", uplink_all, len(messages))):
        with value_by_value():
            base = best(args.repeats, work)
        now = best(args.repeats, work)
        result[name] = {"unit": "us per reading" if per == len(lines) else "us per message",
                        "value_by_value": round(base / per * 1e6, 2), "json_floats": round(now / per * 1e6, 2),
                        "speed_up": round(base / now, 2)}
    print(f"{'':16} {'value by value':>15} {'floats by JSON':>15} {'speed-up':>9}")
    for name in ("encode_line", "Ingest.uplink"):
        r = result[name]
        print(f"{name:16} {r['value_by_value']:>15} {r['json_floats']:>15} {r['speed_up']:>9}   ({r['unit']})")
    print(json.dumps(result))
    return result


def _values(line: bytes) -> list[float]:
    fields = line.decode().split(" ")[1]
    return [float(part.rpartition("=")[2]) for part in fields.split(",")]


if __name__ == "__main__":
    main()
