"""The readings of the cycle in progress, until the cycle's commit moves them into the durable outbox. Pure.

Bounded by a count of readings, dropping the oldest (counted) — a bound reached only when commits stall (a
failing SD card), since every cycle empties it. A commit that fails puts its readings back at the front.
"""

from __future__ import annotations

from collections import deque

from wire.schema import Reading


class UplinkBuffer:
    def __init__(self, max_readings: int, max_message_readings: int) -> None:
        self.max_readings = max_readings
        self.max_message_readings = max_message_readings
        self._readings: deque[Reading] = deque()
        self.dropped_total = 0

    def __len__(self) -> int:
        return len(self._readings)

    def add(self, readings: list[Reading]) -> int:
        """Queue readings; returns how many of the oldest had to be dropped to stay within the bound."""
        self._readings.extend(readings)
        overflow = len(self._readings) - self.max_readings
        if overflow <= 0:
            return 0
        for _ in range(overflow):
            self._readings.popleft()
        self.dropped_total += overflow
        return overflow

    def take(self) -> list[Reading]:
        """Up to one message's worth of the oldest readings."""
        count = min(len(self._readings), self.max_message_readings)
        return [self._readings.popleft() for _ in range(count)]

    def put_back(self, readings: list[Reading]) -> None:
        """Return readings that could not be handed to the uplink, keeping their order at the front."""
        self._readings.extendleft(reversed(readings))
