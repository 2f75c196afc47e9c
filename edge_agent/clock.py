"""Time on a gateway without a real-time clock (docs/operations.md "Time on gateways without an RTC").

A Raspberry Pi boots with a wrong wall clock (1970, or fake-hwclock's last shutdown) until NTP sets it. With
`[clock] rtc = false` every reading is also stamped with CLOCK_BOOTTIME (which counts from boot, suspend
included, and is never stepped) and the boot id; a reading stamped while the kernel says its clock is not
synchronised is held in the outbox (its `held` table) with that stamp, and converted once the offset
wall - boottime of its boot is known:

- NTP: the kernel's clock becomes synchronised (adjtimex(2) STA_UNSYNC clear, or systemd-timesyncd's
  /run/systemd/timesync/synchronized); the offset is read then (error: the kernel's, microseconds to ms);
- an acknowledgement: a sealed downlink carries the collector's time in ms (wire/seal.py); an ack of a message
  first sent at boottime s and received at boottime r was sealed between the two, so the offset is
  collector - (s + r) / 2 within +-(r - s) / 2, accepted when that is at most `clock.max_ack_error`.

Converted readings carry the quality flag time = "corrected_ntp" / "corrected_ack" (wire.schema
TIME_QUALITY); held readings of an earlier boot, whose offset can no longer be learned, are sent with time =
"uncorrectable" and their wall stamp, and the collector sets them aside in citynerve_suspect_time.

`ClockCorrection` is the pure decision core (events in, decisions out, no clock read); `SystemClock` the reads.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import msgspec

from wire.schema import TIME_CORRECTED_ACK, TIME_CORRECTED_NTP, TIME_QUALITY, TIME_UNCORRECTABLE, Reading

# A reading's boottime is derived from its wall stamp and the (wall, boottime) pair read when it reaches the
# agent, a few ms later; beyond this gap (a poll cannot take that long: the wall clock was stepped in between)
# the pair's own boottime is used instead.
MAX_STAMP_GAP_NS = 600 * 10**9


class Stamp(NamedTuple):
    wall_ns: int
    boot_ns: int


class Offset(NamedTuple):
    """wall = boottime + offset_ns for one boot, within +-error_ns."""

    offset_ns: int
    error_ns: int
    source: str  # "ntp" | "ack"


class ClockCorrection:
    """The decisions (pure). `hold`: the gateway has no RTC (`[clock] rtc = false`); otherwise everything is
    sent as stamped, as before."""

    def __init__(self, boot_id: str, *, hold: bool, from_acks: bool = True, max_ack_error_ns: int = 2 * 10**9):
        self.boot_id = boot_id
        self.hold = hold
        self.from_acks = from_acks
        self.max_ack_error_ns = max_ack_error_ns
        self.offset: Offset | None = None  # of this boot, once learned

    def synchronised(self, now: Stamp) -> Offset:
        """The kernel clock is synchronised now: its wall clock is right, and so is this boot's offset."""
        self.offset = Offset(now.wall_ns - now.boot_ns, 0, "ntp")
        return self.offset

    def acked(self, collector_ns: int, first_sent_boot_ns: int, received_boot_ns: int) -> Offset | None:
        """An authentic acknowledgement sealed at collector_ns (the collector's clock) of a message first sent at
        boottime first_sent_boot_ns, received at received_boot_ns. The new offset if it is taken."""
        if not self.from_acks or received_boot_ns < first_sent_boot_ns:
            return None
        error = (received_boot_ns - first_sent_boot_ns + 1) // 2
        if error > self.max_ack_error_ns:
            return None  # too slow a round trip to bound the error
        if self.offset is not None and self.offset.source == "ntp":
            return None  # the kernel's own synchronisation is better
        self.offset = Offset(collector_ns - (first_sent_boot_ns + received_boot_ns) // 2, error, "ack")
        return self.offset

    def stamped(self, synchronised: bool) -> Offset | bool:
        """What to do with readings stamped now: True = send as stamped (the wall clock is right, or the gateway
        has an RTC); an Offset = restamp them with it; False = hold them with their boottime."""
        if not self.hold or synchronised:
            return True
        return self.offset if self.offset is not None else False

    def release(self, boot_id: str) -> Offset | bool:
        """What to do with held readings of `boot_id` now: an Offset = convert; False = keep holding; True = send
        them as uncorrectable (an earlier boot: its boottime means nothing any more)."""
        if boot_id != self.boot_id:
            return True
        return self.offset if self.offset is not None else False


def boot_stamp(reading_ns: int, now: Stamp) -> int:
    """The boottime of a reading wall-stamped reading_ns, from the pair read just after (MAX_STAMP_GAP_NS)."""
    gap = now.wall_ns - reading_ns
    return now.boot_ns - gap if 0 <= gap <= MAX_STAMP_GAP_NS else now.boot_ns


def corrected(held: Iterable[tuple[int, Reading]], offset: Offset) -> list[Reading]:
    flag = TIME_CORRECTED_NTP if offset.source == "ntp" else TIME_CORRECTED_ACK
    return [msgspec.structs.replace(r, time_ns=boot_ns + offset.offset_ns, quality={**r.quality, TIME_QUALITY: flag})
            for boot_ns, r in held]


def uncorrectable(held: Iterable[tuple[int, Reading]]) -> list[Reading]:
    return [msgspec.structs.replace(r, quality={**r.quality, TIME_QUALITY: TIME_UNCORRECTABLE}) for _, r in held]


_held_encoder = msgspec.msgpack.Encoder()
_held_decoder = msgspec.msgpack.Decoder(list[tuple[int, Reading]])


def encode_held(held: list[tuple[int, Reading]]) -> bytes:
    """A held row's body (edge_agent/outbox.py `held`): [boottime ns, Reading] pairs."""
    return _held_encoder.encode(held)


def decode_held(body: bytes) -> list[tuple[int, Reading]]:
    return _held_decoder.decode(body)


# -- the system's clocks ---------------------------------------------------------------------------------------

_TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")  # systemd-timesyncd, once it has synchronised


class SystemClock:
    """The reads (the agent's shell). labkit/fake_clock.py replaces it, and time.time, for the tests."""

    def now(self) -> Stamp:
        return Stamp(time.time_ns(), time.clock_gettime_ns(time.CLOCK_BOOTTIME))

    def synchronised(self) -> bool:
        state = kernel_clock()
        return (state is not None and state[0]) or _TIMESYNCD_FLAG.exists()

    def boot_id(self) -> str:
        try:
            return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return ""


system = SystemClock()


# -- the kernel's clock state ------------------------------------------------------------------------------------

_STA_UNSYNC = 0x0040  # <linux/timex.h>: the clock is not synchronised
_TIME_ERROR = 5


class _Timex(ctypes.Structure):
    # The head of struct timex (adjtimex(2)), then room for the rest of it, whatever its size on this platform.
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("_rest", ctypes.c_char * 256)]


_adjtimex = None


def kernel_clock() -> tuple[bool, float, float] | None:
    """(synchronised, maximum error s, estimated error s) from adjtimex(2) with modes 0 (a read: no privilege
    needed, no blocking); None off Linux. Whichever daemon sets the clock (systemd-timesyncd, chrony, ntpd),
    the kernel's status says whether it is synchronised."""
    global _adjtimex
    if not sys.platform.startswith("linux"):
        return None
    if _adjtimex is None:
        try:
            _adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
        except (OSError, AttributeError):
            return None
    timex = _Timex()
    state = _adjtimex(ctypes.byref(timex))
    if state < 0:
        return None
    # TIME_ERROR (5), the return value, also says "not synchronised" (adjtimex(2) RETURN VALUE)
    return not (timex.status & _STA_UNSYNC or state == _TIME_ERROR), timex.maxerror / 1e6, timex.esterror / 1e6
