"""Wait-time percentiles over a sliding window of recent requests."""

from __future__ import annotations


class WaitTimes:
    """A ring of the last `size` queued requests' wait times, for percentiles.

    Sorting happens only when stats are read.
    """

    __slots__ = ("_ring", "_mask", "_count")

    def __init__(self, size: int = 4096) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"size must be a power of two, got {size}")
        self._ring = [0.0] * size
        self._mask = size - 1
        self._count = 0

    def add(self, seconds: float) -> None:
        """Record one request's wait."""
        self._ring[self._count & self._mask] = seconds
        self._count += 1

    def clear(self) -> None:
        """Forget every recorded wait."""
        self._count = 0

    def percentiles(self, requests: int, queued: int) -> dict[str, int]:
        """p50/p90/p99/max wait in microseconds, over all requests.

        Only queued requests are recorded (the fast path stays free), so the
        `requests - queued` that never waited count as zeros.
        """
        n = min(self._count, len(self._ring))
        if not requests:
            return {}
        waits = sorted(self._ring[:n])
        immediate = max(0.0, (requests - queued) / requests)
        result = {}
        for label, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
            if q < immediate or not n:
                value = 0.0
            else:
                value = waits[min(n - 1, int((q - immediate) / (1 - immediate) * n))]
            result[f"requests_wait_{label}_us"] = int(value * 1e6)
        result["requests_wait_max_us"] = int(waits[-1] * 1e6) if n else 0
        return result
