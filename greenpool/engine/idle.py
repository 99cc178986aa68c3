"""Slots (a pooled connection and its bookkeeping) and the idle bag they wait in.

Idle connections sit in *segments*, each with its own lock, in the spirit
of HikariCP's `ConcurrentBag`: a caller starts at its own segment (so a
greenlet tends to get back the connection it used last) and steals from the
others. Only the lend and return of one connection touch a segment's lock;
the pool's lock is for the queue of waiting requests and the counts.
"""

from __future__ import annotations

import traceback
from typing import Any, Generic, TypeVar

from .._runtime.hub import allocate_lock, getcurrent

C = TypeVar("C")

#: A slot's `state`: parked in the idle bag, or being cleaned after its return.
IDLE = "idle"
#: Lent to a borrower (or handed to a waiting request).
OUT = "out"
#: No longer the pool's: closed, or being closed.
GONE = "gone"


class Slot(Generic[C]):
    """A pooled connection and its bookkeeping; what `Pool.acquire()` lends."""

    __slots__ = (
        "conn",
        "created_at",
        "expire_at",
        "last_used",
        "taken_at",
        "state",
        "segment",
        "replacing",
        "stack",
        "leak_reported",
        "handed_fresh",
        "generation",
        "retired_for",
    )

    def __init__(self, conn: C, now: float, lifetime: float) -> None:
        self.conn = conn
        self.created_at = now
        self.expire_at = now + lifetime
        self.last_used = now
        self.taken_at = now
        self.state = IDLE
        self.segment: Segment | None = None
        # A replacement has been reserved for this connection.
        self.replacing = False
        self.stack: list[traceback.FrameSummary] | None = None
        self.leak_reported = False
        # Handed straight from a check-in that found it OK: no need to
        # look at its status again.
        self.handed_fresh = False
        # The pool's `drain()` count when its connect began: connections of
        # an older generation are being replaced (see `Pool.failover()`).
        self.generation = 0
        # Why it was retired (a `CLOSE_REASONS` entry, or None), for the stats.
        self.retired_for: str | None = None

    def retire(self, reason: str | None = None) -> None:
        """Close this connection as soon as it is not in use.

        `reason` (default None: not counted) is the stats' reason for the
        close (see `greenpool.engine.stats.CLOSE_REASONS`); a connection
        retired already keeps its first reason.
        """
        if self.expire_at:
            self.retired_for = reason
        self.expire_at = 0.0

    def end_reason(self) -> str | None:
        """Why this connection, found expired, is closed: "lifetime", or the reason it was retired for."""
        return "lifetime" if self.expire_at else self.retired_for

    def __repr__(self) -> str:
        return f"<Slot {self.state} {self.conn!r}>"


class Segment:
    """A shard of idle connections with its own lock."""

    __slots__ = ("lock", "idle")

    def __init__(self) -> None:
        self.lock = allocate_lock()
        self.idle: list[Slot[Any]] = []


class IdleBag(Generic[C]):
    """The idle connections of a pool, in `segments`.

    The pool's return path appends to the caller's segment itself (its
    `_park()`): it is the hot path, and that is three lines.
    """

    __slots__ = ("segments",)

    def __init__(self, segments: int) -> None:
        self.segments = [Segment() for _ in range(segments)]

    def pop(self) -> Slot[C] | None:
        """Take an idle connection, the caller's own segment first."""
        # On the hot path, explicit acquire/release: `with lock` costs twice as much.
        segments = self.segments
        n = len(segments)
        start = hash(getcurrent()) % n
        for i in range(n):
            seg = segments[(start + i) % n]
            if seg.idle:
                lock = seg.lock
                lock.acquire()
                try:
                    if seg.idle:
                        return seg.idle.pop()
                finally:
                    lock.release()
        return None

    def take(self, slot: Slot[C]) -> bool:
        """Take `slot` out of its segment if it is still idle there."""
        seg = slot.segment
        if seg is None or slot.state != IDLE:
            return False
        with seg.lock:
            try:
                seg.idle.remove(slot)
            except ValueError:
                return False
        return True

    def take_all(self) -> list[Slot[C]]:
        """Take every idle connection."""
        taken: list[Slot[C]] = []
        for seg in self.segments:
            with seg.lock:
                taken.extend(seg.idle)
                seg.idle.clear()
        return taken

    def count(self) -> int:
        """How many connections are idle now."""
        return sum(len(seg.idle) for seg in self.segments)

    def renew_locks(self) -> None:
        """Make the locks anew (in a forked child: another thread may have held one)."""
        for seg in self.segments:
            seg.lock = allocate_lock()
