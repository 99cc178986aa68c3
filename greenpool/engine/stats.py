"""A pool's statistics: counters, and wait-time percentiles over recent requests."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TypeVar

from .idle import OUT
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

    def window(self) -> list[float]:
        """The recorded waits in seconds, oldest first (a copy)."""
        return list(self._window)

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


#: The counters `get_stats()` reports as they are: psycopg_pool's keys, then greenpool's own.
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
    "connections_created",
    "requests_timeouts",
    "leaks",
)

#: Why the pool closed a connection, as counted in `connections_closed_<reason>`:
#: its lifetime ended ("lifetime"); idle above `min_size` for `max_idle`
#: ("idle"); found broken at checkout or return, or failing the `check`
#: callback, its clean-up or a ping ("broken"); returned with a query running
#: that couldn't be cancelled and cleaned up ("returned_active"); retired by
#: `failover()` ("failover") or by `resize()` ("resize"). Closes for other
#: reasons (`close()`, `drain()`, `close_idle()`, `close_lent()`, `discard()`,
#: a null pool's returns) are not counted.
CLOSE_REASONS = ("lifetime", "idle", "broken", "returned_active", "failover", "resize")


@dataclass(frozen=True)
class MetricsSample:
    """One pool's numbers for a metrics exporter, read at once by `PoolStats.metrics_sample()`.

    `counters` has `get_stats()`'s counters and `connections_closed_<reason>`
    keys; `returns` is derived (lends that ended with a return: requests
    served minus connections lent now and lendings closed without a return)
    and may lag or lead by a request or two while others run; `waits` is the
    recent wait window, oldest first. `generation` changes when `pop_stats()`
    resets the counters.
    """

    name: str
    min_size: int
    max_size: int
    idle: int
    used: int
    connecting: int
    closing: int
    waiting: int
    counters: dict[str, int]
    usage_seconds: float
    returns: int
    wait_seconds: float
    waits: list[float]
    generation: int


class PoolStats(PoolState[C]):
    """The part of `Pool` that keeps and reports its statistics.

    The counters are plain attributes of the pool, bumped where things
    happen (on the hot path, a `+= 1`): they are read only here.
    """

    def _reset_counters(self) -> None:
        for key in COUNTERS:
            setattr(self, key, 0)
        self._closed_by = dict.fromkeys(CLOSE_REASONS, 0)  # connections closed, by reason
        self._wait_total = 0.0  # seconds queued requests waited
        self._usage = 0.0  # seconds connections spent lent
        self._lent_closed = 0  # lendings that ended without a return: discard(), close_lent()
        self._stats_generation = getattr(self, "_stats_generation", -1) + 1

    def _record_wait(self, waited: float) -> None:
        self._wait_times.add(waited)
        self._wait_total += waited

    def get_stats(self) -> dict[str, int]:
        """Return counters (psycopg_pool's keys) and immediate measures."""
        stats = {key: getattr(self, key) for key in COUNTERS}
        for reason, n in self._closed_by.items():
            stats[f"connections_closed_{reason}"] = n
        stats["usage_ms"] = int(self._usage * 1000)
        stats["requests_wait_ms"] = int(self._wait_total * 1000)
        stats.update(self._wait_times.percentiles(self.requests_num, self.requests_queued))
        stats.update(
            pool_min=self._min_size,
            pool_max=self._max_size,
            pool_size=self._planned(closing=False),
            pool_available=self._idle.count(),
            pool_connecting=self._pending(),
            pool_closing=self._closing,
            requests_waiting=len(self._waiters),
        )
        return stats

    def metrics_sample(self) -> MetricsSample:
        """The pool's numbers for a metrics exporter (`greenpool.integrations.prometheus`).

        Read without the pool's lock, as `get_stats()` is: each number is
        current, the set of them nearly consistent.
        """
        slots = list(self._slots)
        lent = sum(1 for slot in slots if slot.state == OUT)
        idle = self._idle.count()
        waiting = len(self._waiters)
        counters = {key: getattr(self, key) for key in COUNTERS}
        for reason, n in self._closed_by.items():
            counters[f"connections_closed_{reason}"] = n
        served = self.requests_num - self.requests_errors - waiting
        return MetricsSample(
            name=self.name,
            min_size=self._min_size,
            max_size=self._max_size,
            idle=idle,
            used=max(0, len(slots) - idle),
            connecting=self._pending(),
            closing=self._closing,
            waiting=waiting,
            counters=counters,
            usage_seconds=self._usage,
            returns=max(0, served - lent - self._lent_closed),
            wait_seconds=self._wait_total,
            waits=self._wait_times.window(),
            generation=self._stats_generation,
        )

    def pop_stats(self) -> dict[str, int]:
        """Return the stats, then reset the counters and wait-time window."""
        stats = self.get_stats()
        self._reset_counters()
        self._wait_times.clear()
        return stats
