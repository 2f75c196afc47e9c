"""Where a Go server spends its CPU: a CPU profile from its /debug/pprof/profile endpoint (influxd 1.x serves it on
its HTTP port, pprof-enabled = true by default), summed per function.

The profile is gzip-compressed protobuf (github.com/google/pprof proto/profile.proto). Go binaries carry their
function names (pclntab) even when stripped, so the profile names them while perf cannot. Decoded here with the
few fields needed (Profile.sample 2, location 4, function 5, string_table 6), so that no Go toolchain is needed.

    python -m labkit.pprof URL [--seconds 30] [--top 30]
"""

from __future__ import annotations

import argparse
import gzip
import urllib.request
from collections import Counter
from collections.abc import Iterator


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one message: varints as int, length-delimited as bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, wire, value
        elif wire == 2:
            length, i = _varint(buf, i)
            yield number, wire, buf[i:i + length]
            i += length
        elif wire == 1:
            yield number, wire, buf[i:i + 8]
            i += 8
        elif wire == 5:
            yield number, wire, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"profile: wire type {wire} at byte {i}")


def _ints(wire: int, value: int | bytes) -> list[int]:
    """A repeated int64 field: packed (bytes) or one varint."""
    if wire == 0:
        assert isinstance(value, int)
        return [value]
    assert isinstance(value, bytes)
    out, i = [], 0
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


def summarize(raw: bytes) -> tuple[Counter[str], Counter[str], int]:
    """(flat samples per function, cumulative samples per function, total samples) of a CPU profile."""
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    strings: list[str] = []
    samples: list[tuple[list[int], int]] = []
    locations: dict[int, list[int]] = {}
    functions: dict[int, int] = {}
    for number, _wire, value in _fields(data):
        if number == 6:
            assert isinstance(value, bytes)
            strings.append(value.decode("utf-8", "replace"))
        elif number == 2:
            assert isinstance(value, bytes)
            locs: list[int] = []
            vals: list[int] = []
            for n2, w2, v2 in _fields(value):
                if n2 == 1:
                    locs += _ints(w2, v2)
                elif n2 == 2:
                    vals += _ints(w2, v2)
            samples.append((locs, vals[0] if vals else 0))
        elif number == 4:
            assert isinstance(value, bytes)
            loc_id, funcs = 0, []
            for n2, _w2, v2 in _fields(value):
                if n2 == 1:
                    assert isinstance(v2, int)
                    loc_id = v2
                elif n2 == 4:
                    assert isinstance(v2, bytes)
                    for n3, _w3, v3 in _fields(v2):
                        if n3 == 1:
                            assert isinstance(v3, int)
                            funcs.append(v3)
            locations[loc_id] = funcs
        elif number == 5:
            assert isinstance(value, bytes)
            fn_id = name = 0
            for n2, _w2, v2 in _fields(value):
                if n2 == 1:
                    assert isinstance(v2, int)
                    fn_id = v2
                elif n2 == 2:
                    assert isinstance(v2, int)
                    name = v2
            functions[fn_id] = name
    flat: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    total = 0
    for locs, count in samples:
        total += count
        names = [strings[functions[f]] for loc in locs for f in locations.get(loc, []) if f in functions]
        if names:
            flat[names[0]] += count  # the innermost frame (the first location, its first line is the leaf)
        for name in set(names):
            cum[name] += count
    return flat, cum, total


def profile(url: str, seconds: int) -> bytes:
    with urllib.request.urlopen(f"{url}/debug/pprof/profile?seconds={seconds}", timeout=seconds + 30) as resp:
        return resp.read()


def report(raw: bytes, top: int = 30) -> str:
    flat, cum, total = summarize(raw)
    if not total:
        return "no samples"
    out = [f"{'flat %':>7} {'cum %':>7}  function"]
    for name, count in cum.most_common(top):
        out.append(f"{100 * flat[name] / total:7.1f} {100 * count / total:7.1f}  {name}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    print(report(profile(args.url, args.seconds), args.top))


if __name__ == "__main__":
    main()
