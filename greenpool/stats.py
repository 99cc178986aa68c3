"""Wait-time percentiles over a sliding window of recent requests."""

from __future__ import annotations

from collections import deque


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
