"""One deadline timer per hub for all the greenlets a pool has parked."""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import Any

from .hub import INFINITY

#: Longest a `DeadlineTimer` sleeps: for a request that waits without a
#: deadline it only holds the loop, and wakes now and then to go on doing so.
_HOLD_AT_MOST = 3600.0


class DeadlineTimer:
    """Wakes the queued greenlets of one hub whose requests reached their deadline.

    A pool keeps one per hub instead of a libev timer per wait: making,
    starting and closing a timer for every queued checkout, with hundreds
    of them in libev's heap, cost 5-10 % of the contended checkout's
    throughput. Requests mostly queue in deadline order (they share the
    pool's timeout), so the timer stays armed for the earliest deadline it
    has been shown; when it fires, `expire(now)` wakes the requests that are
    due and returns the earliest deadline left, which it re-arms for.

    Like the per-wait timers it replaces, it keeps the hub's loop alive only
    while a request waits. The pool's contended checkout drives it inline,
    without a call per wait: before parking a request it counts itself in
    `waiting`, then `arm()`s for an earlier deadline than `at` or `hold()`s
    the loop if not `held`; after, it counts itself out and, the last one
    out, calls `let_go()`. All of it runs in the hub's thread.
    """

    __slots__ = ("at", "waiting", "held", "_loop", "_timer", "_expire")

    def __init__(self, hub: Any, expire: Callable[[float], float]) -> None:
        self._loop = hub.loop
        self._expire = expire
        self._timer: Any = None
        self.waiting = 0  # requests of this hub parked
        self.held = False  # the timer keeps the loop alive
        self.at = INFINITY  # the deadline armed for

    def arm(self, deadline: float) -> None:
        """Fire at `deadline` instead (it is earlier than `at`); hold the loop.

        `INFINITY`: only hold the loop (a request waits for good).
        """
        if self._timer is not None:
            self._timer.close()
        self.at = deadline
        now = monotonic()
        self._timer = self._loop.timer(max(min(deadline, now + _HOLD_AT_MOST) - now, 0.0))
        self._timer.start(self._fire)
        self.held = True

    def hold(self) -> None:
        """Keep the loop alive until the armed deadline (a request waits)."""
        if self._timer is None:
            self.arm(INFINITY)
            return
        self._timer.ref = True
        self.held = True

    def let_go(self) -> None:
        """No request waits any more: stop keeping the loop alive."""
        if self.held:
            self._timer.ref = False
            self.held = False

    def _fire(self) -> None:
        self._timer.close()
        self._timer = None
        self.held = False
        self.at = INFINITY
        deadline = self._expire(monotonic())
        if deadline != INFINITY or self.waiting:
            self.arm(deadline)
