"""Commit confirmed for pushed configurations: which version may be tried, when it is confirmed, when it is rolled
back, and what a start-up finds. Pure: versions, sequence numbers and times in, decisions out (no clock, no files).

The shell is edge_agent/remote_config.py; the behaviour is docs/control.md "Remote configuration":

- A version must exceed every version this gateway has run or tried (`floor`): a configuration cannot be
  brought back by replaying it, not even one that was rolled back. The same version as the one running (or
  being tried) is a redelivery: its report is repeated, nothing is done again.
- One configuration is tried at a time. A newer one that arrives meanwhile waits in a one-place queue and is
  tried next (the newest wins: one it replaces is refused `busy`).
- Tried = applied live; confirmed by the first end-to-end acknowledgement of a message numbered from
  `fresh_from` on (a message committed after the apply: it travelled through the new configuration's uplink,
  collector and InfluxDB); rolled back when the confirm timeout passes first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from wire.control import ControlReason

T = TypeVar("T")  # whatever the shell queues with a version (the verified document and its operators)


@dataclass(frozen=True)
class Accept:
    """Try this version now."""


@dataclass(frozen=True)
class Refuse:
    reason: ControlReason
    detail: str


@dataclass(frozen=True)
class Repeat:
    """A redelivery of the version running or being tried: say its state again ("confirmed" or "applied")."""

    state: str


@dataclass(frozen=True)
class Queued:
    """Tried once the one being tried is confirmed or rolled back. `replaced`: the version that waited before and
    is now refused `busy` (None if none waited)."""

    replaced: int | None


Decision = Accept | Refuse | Repeat | Queued


@dataclass(frozen=True)
class Trial:
    version: int
    sha256: str
    timeout_s: float
    fresh_from: int | None = None  # set once applied: the first sequence number an acknowledgement must cover
    deadline: float | None = None  # monotonic seconds; set once applied


@dataclass(frozen=True)
class Confirm:
    version: int


@dataclass(frozen=True)
class RollBack:
    version: int
    why: str  # for the report's detail; the shell adds what it knows of the uplink


class Confirmer(Generic[T]):
    def __init__(self, running_version: int, running_sha256: str, floor: int) -> None:
        self.running_version = running_version
        self.running_sha256 = running_sha256
        self.floor = max(floor, running_version)  # the highest version run or tried, persisted by the shell
        self.trial: Trial | None = None
        self._queued: tuple[int, T] | None = None

    # -- a document arrives ----------------------------------------------------------------------------------

    def offer(self, version: int, sha256: str, item: T) -> Decision:
        trial = self.trial
        if trial is not None and version == trial.version:
            return Repeat("applied")
        if version == self.running_version and sha256 == self.running_sha256 and version > 0:
            return Repeat("confirmed")
        if version <= self.floor:
            return Refuse(ControlReason.REPLAYED, f"version {version} is not above {self.floor}, the newest "
                                                  f"version this gateway has run or tried")
        if trial is None:
            return Accept()
        queued = self._queued
        if queued is not None and version <= queued[0]:
            if version == queued[0]:
                return Queued(None)  # a redelivery of the one waiting
            return Refuse(ControlReason.REPLAYED, f"version {version} is older than version {queued[0]}, which "
                                                  f"waits to be tried")
        self._queued = (version, item)
        return Queued(queued[0] if queued is not None else None)

    def take_queued(self) -> T | None:
        """The waiting document, once no trial runs (offer it again: the floor may have moved)."""
        if self.trial is not None or self._queued is None:
            return None
        item = self._queued[1]
        self._queued = None
        return item

    # -- a trial -----------------------------------------------------------------------------------------------

    def begin(self, version: int, sha256: str, timeout_s: float) -> None:
        """The shell checked the document and persists `floor` (= version) before it writes or applies anything."""
        assert self.trial is None and version > self.floor
        self.floor = version
        self.trial = Trial(version, sha256, timeout_s)

    def applied(self, fresh_from: int, now: float) -> None:
        """Applied live; `fresh_from`: the outbox's next sequence number once the apply was done."""
        assert self.trial is not None
        t = self.trial
        self.trial = Trial(t.version, t.sha256, t.timeout_s, fresh_from, now + t.timeout_s)

    def acked(self, ranges: list[tuple[int, int]]) -> Confirm | None:
        t = self.trial
        if t is None or t.fresh_from is None:
            return None
        if any(last >= t.fresh_from for _, last in ranges):
            return Confirm(t.version)
        return None

    def due(self, now: float) -> RollBack | None:
        t = self.trial
        if t is None or t.deadline is None or now < t.deadline:
            return None
        return RollBack(t.version, f"no end-to-end acknowledgement within {t.timeout_s:g} s after applying "
                                   f"version {t.version}")

    @property
    def deadline(self) -> float | None:
        return self.trial.deadline if self.trial is not None else None

    def confirmed(self) -> None:
        """The shell made the trial the confirmed configuration (files written): it runs from now on."""
        assert self.trial is not None
        self.running_version, self.running_sha256 = self.trial.version, self.trial.sha256
        self.trial = None

    def rolled_back(self) -> None:
        """The shell applied the previous configuration again; the tried version stays below the floor."""
        self.trial = None

    def now_running(self, version: int, sha256: str) -> None:
        """What runs after a reload (SIGHUP), outside a trial: the confirmed configuration or the local file."""
        self.running_version, self.running_sha256 = version, sha256
        self.floor = max(self.floor, version)


# --- what a start-up finds ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Saved:
    """The remote configuration's files as found at start: the state file's `floor` and `trying` (a version
    whose trial had begun), the confirmed file's version (None: no usable confirmed file), whether a pending
    file exists."""

    floor: int = 0
    trying: int | None = None
    confirmed: int | None = None
    pending_file: bool = False


@dataclass(frozen=True)
class StartUp:
    run_confirmed: bool  # run the confirmed file (else the local file)
    interrupted: int | None  # a trial cut short by a crash or kill -9: report it rolled back, reason interrupted
    remove_pending: bool  # a pending file to delete
    clear_trying: bool  # the state file's `trying` to clear


def at_start(saved: Saved) -> StartUp:
    """The gateway always starts on a consistent configuration: the last confirmed one (or the local file)."""
    confirmed_now = saved.trying is not None and saved.trying == saved.confirmed  # killed after the rename
    interrupted = saved.trying if saved.trying is not None and not confirmed_now else None
    return StartUp(run_confirmed=saved.confirmed is not None, interrupted=interrupted,
                   remove_pending=saved.pending_file, clear_trying=saved.trying is not None)
