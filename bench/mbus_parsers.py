"""Which M-Bus parser: citynerve's own sans-IO decoder (edge_agent/mbus) against pyMeterBus, the maintained M-Bus
library on PyPI, on the same 76 telegrams of real meters from libmbus's test suite (labkit/mbus_suite.py).

Two measurements in one run, on this machine:
1. correctness against libmbus's normalised decodings: values that agree, "no valid value" markers (BCD digits
   A-F) that the parser refuses or turns into a number, disagreements, telegrams the parser cannot decode;
2. decoding time per telegram, ratio pyMeterBus / citynerve (each telegram decoded `--rounds` times).

    .venv/bin/python -m bench.mbus_parsers [--rounds 200]

pyMeterBus is installed by `make bench` (the `bench` extra); without it only citynerve's half runs.
"""

from __future__ import annotations

import argparse
import json
import time

from labkit import mbus_suite

# pyMeterBus record type -> (citynerve field name, factor from pyMeterBus's unit to citynerve's)
_PYMETERBUS = {
    "VIFUnit.ENERGY_WH": ("energy", 1e-3), "Energy": ("energy", 1e-3), "VIFUnit.ENERGY_J": ("energy", 1 / 3.6e6),
    "VIFUnit.VOLUME": ("volume", 1.0), "VIFUnit.POWER_W": ("power", 1.0), "VIFUnit.POWER_J_H": ("power", 1 / 3600),
    "VIFUnit.VOLUME_FLOW": ("flow", 1.0), "VIFUnit.FLOW_TEMPERATURE": ("temperature_supply", 1.0),
    "VIFUnit.RETURN_TEMPERATURE": ("temperature_return", 1.0),
    "VIFUnit.TEMPERATURE_DIFFERENCE": ("temperature_difference", 1.0),
    "VIFUnit.EXTERNAL_TEMPERATURE": ("temperature_external", 1.0), "VIFUnitExt.VOLTS": ("voltage", 1.0),
    "VIFUnitExt.AMPERE": ("current", 1.0), "VIFUnit.OPERATING_TIME": ("operating_time", 1.0),
    "VIFUnit.ON_TIME": ("on_time", 1.0), "VIFUnit.AVG_DURATION": ("averaging_duration", 1.0),
    "VIFUnit.ACTUALITY_DURATION": ("actuality_duration", 1.0),
}


def pymeterbus_values(telegram: bytes) -> list[tuple[str, float | None]]:
    import meterbus

    decoded = json.loads(meterbus.load(telegram).to_JSON())
    out: list[tuple[str, float | None]] = []
    for record in decoded["body"]["records"]:
        name, factor = _PYMETERBUS.get(str(record.get("type")), ("other", 1.0))
        value = record.get("value")
        out.append((name, float(value) * factor if isinstance(value, (int, float)) else None))
    return out


def _decode_only_pymeterbus(telegram: bytes) -> object:
    import meterbus

    t = meterbus.load(telegram)
    return [(r.unit, r.value) for r in t.body.bodyPayload.records]


def _decode_only_citynerve(telegram: bytes) -> object:
    from edge_agent.mbus import frames, records

    frame = frames.parse(telegram)
    return records.decode(frame.ci, frame.data).fields()


def _time(decode, telegrams: list[bytes], rounds: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    ok = [t for t in telegrams if _safe(decode, t)]
    start = time.perf_counter()
    for _ in range(rounds):
        for t in ok:
            decode(t)
    return (time.perf_counter() - start) / (rounds * len(ok)), len(ok)


def _safe(decode, telegram: bytes) -> bool:  # type: ignore[no-untyped-def]
    try:
        decode(telegram)
    except Exception:
        return False
    return True


def _report(label: str, s: mbus_suite.Score) -> None:
    print(f"{label:<12} agree {s.agree:4d}  refused-invalid {s.refused:2d}  invented {s.invented:2d}  "
          f"disagree {s.disagree:3d}  telegrams failed {s.failed_telegrams:2d} of {len(CASES)}")


CASES: list[mbus_suite.Case] = []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.mbus_parsers")
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args(argv)
    CASES[:] = mbus_suite.load()
    ours = mbus_suite.score(CASES, mbus_suite.citynerve_values)
    _report("citynerve", ours)
    try:
        import meterbus  # noqa: F401
    except ImportError:
        print("pyMeterBus is not installed (pip install '.[bench]'): no comparison")
        return
    theirs = mbus_suite.score(CASES, pymeterbus_values)
    _report("pyMeterBus", theirs)
    for problem in theirs.problems[:8]:
        print(f"  pyMeterBus: {problem}")
    telegrams = [c.telegram for c in CASES]
    t_ours, n_ours = _time(_decode_only_citynerve, telegrams, args.rounds)
    t_theirs, n_theirs = _time(_decode_only_pymeterbus, telegrams, args.rounds)
    print(f"decode time per telegram: citynerve {t_ours * 1e6:.1f} us ({n_ours} telegrams), pyMeterBus "
          f"{t_theirs * 1e6:.1f} us ({n_theirs}); ratio pyMeterBus / citynerve = {t_theirs / t_ours:.1f}x")


if __name__ == "__main__":
    main()
