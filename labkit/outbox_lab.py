"""Lab helpers for the agent's durable outbox (bench/outbox_fsync.py, bench/agent_rss.py, bench/backlog_drain.py):
realistic readings, an outbox prefilled with a backlog before the agent starts, the agent under strace, and
what /proc says about a process.

Readings are what the agent makes from the `eastron_sdm630` profile: measurement "electricity", the 30 fields
of the profile (float32 values from labkit.meter_sim's MeterModel), tag model=SDM630; one message is one
msgpack Batch, as edge_agent/app.py encodes it.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.outbox import NewMessage, Outbox
from labkit.meter_sim import SDM630_INPUT, MeterModel
from labkit.process import ServerProcess
from wire.schema import Batch, Reading, encode_batch

SDM630_FIELDS = tuple(SDM630_INPUT)  # the profile's field names, in the order the agent produces them
FSYNC_CALLS = ("fsync", "fdatasync", "sync_file_range")


def _f32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


class ReadingMaker:
    """One simulated SDM630 per device; readings(t) is one poll of every device at about time t."""

    def __init__(self, devices: int, *, prefix: str = "meter", seed: int = 1) -> None:
        self.names = [f"{prefix}-{i:03d}" for i in range(devices)]
        self.models = [MeterModel(random.Random(seed * 100_003 + i)) for i in range(devices)]

    def readings(self, time_ns: int) -> list[Reading]:
        out = []
        for i, (name, model) in enumerate(zip(self.names, self.models, strict=True)):
            t = time_ns + i * 1_000_000  # devices answer one after the other, ~1 ms apart
            values = model.measure(t / 1e9)
            out.append(Reading(name, "electricity", t, {f: _f32(values[f]) for f in SDM630_FIELDS},
                               {"model": "SDM630"}))
        return out


@dataclass(frozen=True)
class Prefilled:
    first_seq: int
    last_seq: int
    messages: int
    readings: int
    body_bytes: int
    file_bytes: int
    first_created_ns: int
    last_created_ns: int


def backlog_messages(gateway: str, maker: ReadingMaker, count: int, first_seq: int, first_ns: int,
                     step_ns: int, polls_per_message: int = 1) -> Iterator[NewMessage]:
    """`count` messages as the agent would have made them: message i is created at first_ns + i * step_ns and
    holds `polls_per_message` polls of every device made during the step before it."""
    for i in range(count):
        created = first_ns + i * step_ns
        readings: list[Reading] = []
        for p in range(polls_per_message):
            readings += maker.readings(created - step_ns + p * step_ns // polls_per_message)
        seq = first_seq + i
        body = encode_batch(Batch(gateway=gateway, seq=seq, sent_ns=created, readings=readings))
        yield NewMessage(seq, created, len(readings), body)


def prefill_outbox(state_dir: Path, messages: Iterator[NewMessage], *, max_bytes: int, max_age_s: float,
                   per_commit: int = 200) -> Prefilled:
    """Commit `messages` to <state_dir>/outbox.sqlite3 with the agent's own Outbox (the agent must not be running)
    and set <state_dir>/sequence past them, as the agent would have left it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "outbox.sqlite3"
    outbox = Outbox(path, max_bytes, max_age_s)
    first = last = None
    n = readings = size = 0
    first_ns = last_ns = 0
    chunk: list[NewMessage] = []

    def flush() -> None:
        dropped = outbox.commit(chunk)
        if dropped.messages:
            raise RuntimeError(f"the outbox bounds dropped {dropped.messages} prefilled messages: raise max_size")
        chunk.clear()

    for m in messages:
        if first is None:
            first, first_ns = m.seq, m.created_ns
        last, last_ns = m.seq, m.created_ns
        n += 1
        readings += m.readings
        size += len(m.body)
        chunk.append(m)
        if len(chunk) >= per_commit:
            flush()
    if chunk:
        flush()
    outbox.close()
    assert first is not None and last is not None
    (state_dir / "sequence").write_text(f"{last + 1}\n")
    file_bytes = sum(p.stat().st_size for p in state_dir.glob("outbox.sqlite3*"))
    return Prefilled(first, last, n, readings, size, file_bytes, first_ns, last_ns)


# -- strace ---------------------------------------------------------------------------------------------------------


def strace_available() -> bool:
    return shutil.which("strace") is not None


def under_strace(process: ServerProcess, out: Path, calls: tuple[str, ...] = FSYNC_CALLS) -> ServerProcess:
    """The same process, started under `strace -f` recording `calls` with wall-clock times and fd paths."""
    process.argv = ["strace", "-f", "-y", "-ttt", "--seccomp-bpf", "-e", f"trace={','.join(calls)}",
                    "-o", str(out), *process.argv]
    return process


@dataclass(frozen=True)
class SyscallEvent:
    time: float  # wall clock, seconds
    pid: int
    call: str
    path: str  # what the file descriptor pointed to ("" if strace could not tell)
    result: str


_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((\d+)(?:<([^>]*)>)?.*\)\s+=\s+(-?\d+.*)$")


def parse_strace(path: Path) -> list[SyscallEvent]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if m:
            events.append(SyscallEvent(float(m.group(2)), int(m.group(1)), m.group(3), m.group(5) or "",
                                       m.group(6)))
    return events


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# -- /proc ------------------------------------------------------------------------------------------------------------


def proc_status_kb(pid: int) -> dict[str, int]:
    """The Vm*/Rss* lines of /proc/<pid>/status, in kB (VmHWM: peak resident set size)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def server_pid(server: object) -> int:
    """The process id of a labkit LabServer (mosquitto, influxd) that is running."""
    process = getattr(server, "_process", None)
    if process is None or process.proc is None:
        raise RuntimeError(f"{server!r} is not running")
    return process.proc.pid


def cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
