"""What both programs tell systemd: ready, status, reloading, stopping, and "still alive" (the watchdog).

The protocol of sd_notify(3), spoken in pure Python (no libsystemd): one datagram of newline-separated
VARIABLE=value assignments to the AF_UNIX socket named by $NOTIFY_SOCKET; a name starting with "@" is in the
abstract namespace (the "@" becomes a NUL byte). Without $NOTIFY_SOCKET (a shell, a test, Type=exec)
everything here does nothing.

    READY=1        start-up finished (Type=notify): the agent has its outbox open and its buses and serial
                   sources polling (not "connected": a gateway without network still polls and keeps every
                   reading, so a broker that cannot be reached must not fail its start); the collector has its
                   subscriptions acknowledged by the broker (before that it does nothing useful).
    STATUS=...     one line for `systemctl status`, sent when it changes.
    RELOADING=1    a SIGHUP reload began; READY=1 again when it is done (systemd.service(5) Type=notify).
    STOPPING=1     a clean stop began (the agent's last outbox commit, the collector's drain and final acks).
    WATCHDOG=1     the program is healthy, every WATCHDOG_USEC/2 (sd_watchdog_enabled(3) recommends half).

The watchdog is only worth something if a ping means health, so WATCHDOG=1 is sent

- from the event loop (a task on it): a loop that is blocked sends nothing;
- only while every watched part made progress recently (`WatchdogCore`, pure): the single-thread executors
  the loop hands its blocking work to (the agent's outbox thread, the collector's registry thread) answer
  a no-op within `allowed` seconds, and the periodic tasks that call their `beacon` do so in time.

A stuck part therefore stops the pings; after WatchdogSec systemd kills the service with SIGABRT (WatchdogSignal=)
and, with Restart=on-failure, starts it again. `faulthandler` is enabled when a watchdog is set, so that
SIGABRT first writes every thread's stack to stderr (the journal): where it was stuck.
The watchdog starts counting only when start-up is finished (READY=1, systemd.service(5) WatchdogSec=), so
a long start (an outbox check) is bounded by TimeoutStartSec= instead.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

log = logging.getLogger("citynerve.systemd")

# How often STATUS= is refreshed without a watchdog (with one: at every ping).
_STATUS_EVERY = 5.0


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address of $NOTIFY_SOCKET: a path, or an abstract name ("@name" -> b"\\0name"); None if unset or
    of a kind this module does not speak (vsock:, sd_notify(3) since systemd 254)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """WatchdogSec= as systemd passes it (sd_watchdog_enabled(3)): $WATCHDOG_USEC, for this process only if
    $WATCHDOG_PID is set to another one. None: no watchdog."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 1e6


class Notifier:
    """Datagrams to the service manager's socket. Never blocks, never raises: a lost notification must not cost
    the program anything (the socket is local; if it is full, systemd is too busy to read it anyway)."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self.failures = 0

    def send(self, *assignments: str) -> bool:
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            self.failures += 1
            if self.failures == 1:  # once: the socket vanished or refuses; the program goes on without systemd
                log.warning("cannot notify the service manager at %r: %s", self.address, exc)
            return False
        return True

    def close(self) -> None:
        self._sock.close()


@dataclass
class _Watched:
    allowed: float
    last: float


class WatchdogCore:
    """Whether the program may say it is alive. Pure: time is passed in.

    Each watched part must make progress at least every `allowed` seconds (a beacon call, an executor's
    no-op answered); `stale(now)` names those that did not, in the order they were watched."""

    def __init__(self) -> None:
        self._watched: dict[str, _Watched] = {}

    def watch(self, name: str, allowed: float, now: float) -> None:
        self._watched[name] = _Watched(allowed, now)

    def unwatch(self, name: str) -> None:
        self._watched.pop(name, None)

    def progress(self, name: str, now: float) -> None:
        watched = self._watched.get(name)
        if watched is not None:
            watched.last = max(watched.last, now)

    def stale(self, now: float) -> list[tuple[str, float]]:
        """(name, seconds since its last progress) of every part late beyond its allowance."""
        return [(name, now - w.last) for name, w in self._watched.items() if now - w.last > w.allowed]


class Service:
    """One program's conversation with systemd. Build it with `from_env()`; all of it is inert without
    $NOTIFY_SOCKET."""

    def __init__(self, notifier: Notifier | None, watchdog: float | None = None) -> None:
        self.notifier = notifier
        self.watchdog = watchdog if notifier is not None else None  # seconds (WatchdogSec=)
        self.core = WatchdogCore()
        self.pings = 0
        self._executors: dict[str, Executor] = {}
        self._probing: set[str] = set()
        self._status = ""
        self._withheld: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Service:
        env = os.environ if environ is None else environ
        address = notify_address(env.get("NOTIFY_SOCKET"))
        if address is None:
            return cls(None)
        watchdog = watchdog_seconds(env, os.getpid())
        if watchdog is not None and not faulthandler.is_enabled():
            faulthandler.enable(sys.stderr, all_threads=True)  # SIGABRT from the watchdog: every stack, first
        return cls(Notifier(address), watchdog)

    @property
    def active(self) -> bool:
        return self.notifier is not None

    # -- the states -------------------------------------------------------------------------------------------

    def send(self, *assignments: str) -> None:
        if self.notifier is not None:
            self.notifier.send(*assignments)

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def reloading(self, status: str = "reloading the configuration") -> None:
        # MONOTONIC_USEC: systemd >= 253 (Type=notify-reload) wants it with RELOADING=1; older ones ignore it.
        self._status = status
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"STATUS={status}", f"MONOTONIC_USEC={now_usec}")

    def stopping(self, status: str = "stopping") -> None:
        self._status = status
        self.send("STOPPING=1", f"STATUS={status}")

    # -- what the watchdog watches ----------------------------------------------------------------------------

    def watch_executor(self, name: str, executor: Executor, allowed: float) -> None:
        """`executor` (a single-thread one the loop hands blocking work to) must run a no-op within `allowed`
        seconds of it being queued, each round: a thread stuck in a call (an SD card that stopped answering
        fsync) stops the pings."""
        self._executors[name] = executor
        self.core.watch(name, allowed, time.monotonic())

    def beacon(self, name: str, allowed: float) -> Callable[[], None]:
        """A periodic task calls the returned function at every round; missing it for `allowed` seconds stops the
        pings."""
        self.core.watch(name, allowed, time.monotonic())

        def beat() -> None:
            self.core.progress(name, time.monotonic())

        return beat

    # -- the task ---------------------------------------------------------------------------------------------

    def tasks(self, status: Callable[[], str]) -> list[asyncio.Task[None]]:
        """The task to run under the program's supervisor (none without systemd)."""
        if self.notifier is None:
            return []
        return [asyncio.create_task(self.run(status), name="systemd")]

    async def run(self, status: Callable[[], str]) -> None:
        every = self.watchdog / 2 if self.watchdog else _STATUS_EVERY
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            self.status(status())
            if self.watchdog:
                self.tick(loop, time.monotonic())

    def tick(self, loop: asyncio.AbstractEventLoop, now: float) -> bool:
        """One round (on the loop): probe the executors, then ping if nothing is stale. True if pinged."""
        for name, executor in self._executors.items():
            if name in self._probing:
                continue  # the last probe is still queued: the core sees how long it has been
            try:
                probe = loop.run_in_executor(executor, _noop)
            except RuntimeError:  # shut down: the program is stopping
                continue
            self._probing.add(name)
            probe.add_done_callback(lambda _done, name=name: self._probed(name))
        stale = self.core.stale(now)
        names = tuple(name for name, _ in stale)
        if names != self._withheld:
            self._withheld = names
            if stale:
                log.error("not telling systemd that all is well: %s; the watchdog restarts the service after "
                          "WatchdogSec=%gs", ", ".join(f"{n} made no progress for {age:.0f} s" for n, age in stale),
                          self.watchdog or 0, extra={"reason": "watchdog"})
            else:
                log.info("all watched parts answer again; watchdog pings resumed")
        if stale:
            return False
        self.send("WATCHDOG=1")
        self.pings += 1
        return True

    def _probed(self, name: str) -> None:
        self._probing.discard(name)
        self.core.progress(name, time.monotonic())


def _noop() -> None:
    return None
