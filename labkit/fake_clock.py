"""An edge-agent whose wall clock is off and whose kernel clock state is chosen by a test (tests only).

    python -m labkit.fake_clock CONTROL.json run agent.toml

CONTROL.json: {"offset_s": -157766400.0, "synchronised": false}. The agent's wall clock (time.time,
time.time_ns) is the real one plus offset_s; edge_agent.clock's `synchronised()` answers "synchronised". The
test rewrites the file to set the clock mid-run, as NTP does after a boot without RTC: the offset steps to 0
and the kernel says synchronised. CLOCK_BOOTTIME and the monotonic clocks stay real (they are never stepped).

labkit is not installed with the project: no production configuration can reach this. `unshare --time` (a time
namespace) offsets only CLOCK_MONOTONIC/CLOCK_BOOTTIME, not the wall clock, and faketime would fake boottime
too; hence an injected clock.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_real_time_ns = time.time_ns
_real_monotonic = time.monotonic


class _Control:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.read_at = -1.0
        self.offset_ns = 0
        self.synchronised = False

    def current(self) -> _Control:
        now = _real_monotonic()
        if now - self.read_at >= 0.05:  # re-read at most every 50 ms: time.time is called often
            self.read_at = now
            try:
                doc = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return self  # being rewritten: the previous state
            self.offset_ns = int(float(doc.get("offset_s", 0)) * 1e9)
            self.synchronised = bool(doc.get("synchronised", False))
        return self


def write_control(path: Path, offset_s: float, synchronised: bool) -> None:
    """Set the fake clock (atomically: the agent never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset_s": offset_s, "synchronised": synchronised}))
    tmp.replace(path)


def main(argv: list[str]) -> int:
    control = _Control(Path(argv[0]))

    def fake_time_ns() -> int:
        return _real_time_ns() + control.current().offset_ns

    def fake_time() -> float:
        return fake_time_ns() / 1e9

    # Before the agent's modules are imported: defaults such as GatewaySealer(clock=time.time) bind the fake.
    time.time_ns = fake_time_ns
    time.time = fake_time

    from edge_agent import clock
    from edge_agent.cli import main as agent_main

    class FakeClock(clock.SystemClock):
        def synchronised(self) -> bool:
            return control.current().synchronised

    clock.system = FakeClock()
    return agent_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
