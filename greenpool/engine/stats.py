"""A pool's statistics: counters, and wait-time percentiles over recent requests."""

from __future__ import annotations

from collections import deque
from typing import TypeVar

from .state import PoolState

C = TypeVar("C")


class WaitTimes:
    """The last `size` queued requests' wait times, for percentiles.

    `add(seconds)` records one request's wait; it is a bound `deque.append`,
    so recording costs no Python call. Sorting happens only when stats are
    read.
    """

    __slots__ = ("_window", "add")

    def __init__(self, size: int = 4096) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        self._window: deque[float] = deque(maxlen=size)
        self.add = self._window.append

    def clear(self) -> None:
        """Forget every recorded wait."""
        self._window.clear()

    def percentiles(self, requests: int, queued: int) -> dict[str, int]:
        """p50/p90/p99/max wait in microseconds, over all requests (0 without any).

        Only queued requests are recorded (the fast path stays free), so the
        `requests - queued` that never waited count as zeros.
        """
        waits = sorted(self._window)
        n = len(waits)
        immediate = max(0.0, (requests - queued) / requests) if requests else 1.0
        result = {}
        for label, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
            if q < immediate or not n:
                value = 0.0
            else:
                value = waits[min(n - 1, int((q - immediate) / (1 - immediate) * n))]
            result[f"requests_wait_{label}_us"] = int(value * 1e6)
        result["requests_wait_max_us"] = int(waits[-1] * 1e6) if n else 0
        return result


#: The counters `get_stats()` reports as they are (psycopg_pool's keys, and `returns_reset`).
COUNTERS = (
    "requests_num",
    "requests_queued",
    "requests_errors",
    "returns_bad",
    "returns_reset",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
    "failovers",
)


class PoolStats(PoolState[C]):
    """The part of `Pool` that keeps and reports its statistics.

    The counters are plain attributes of the pool, bumped where things
    happen (on the hot path, a `+= 1`): they are read only here.
    """

    def _reset_counters(self) -> None:
        for key in COUNTERS:
            setattr(self, key, 0)
        self._wait_total = 0.0  # seconds queued requests waited
        self._usage = 0.0  # seconds connections spent lent

    def _record_wait(self, waited: float) -> None:
        self._wait_times.add(waited)
        self._wait_total += waited

    def get_stats(self) -> dict[str, int]:
        """Return counters (psycopg_pool's keys) and immediate measures."""
        stats = {key: getattr(self, key) for key in COUNTERS}
        stats["usage_ms"] = int(self._usage * 1000)
        stats["requests_wait_ms"] = int(self._wait_total * 1000)
        stats.update(self._wait_times.percentiles(self.requests_num, self.requests_queued))
        stats.update(
            pool_min=self._min_size,
            pool_max=self._max_size,
            pool_size=self._planned(closing=False),
            pool_available=self._idle.count(),
            requests_waiting=len(self._waiters),
        )
        return stats

    def pop_stats(self) -> dict[str, int]:
        """Return the stats, then reset the counters and wait-time window."""
        stats = self.get_stats()
        self._reset_counters()
        self._wait_times.clear()
        return stats
