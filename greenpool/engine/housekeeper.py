"""The part of `Pool` that looks after it in the background: the housekeeper.

One job per open pool (HikariCP's HouseKeeper, psycopg_pool's maintenance
tasks) wakes every tick to replace connections nearing their randomized
lifetime before they expire, close idle surplus above `min_size`, report
leaks and long outages, and keep `min_size` connections.
"""

from __future__ import annotations

import logging
import random
import weakref
from time import monotonic
from typing import Any, TypeVar

from .events import fire
from .idle import IDLE, OUT
from .state import PoolState

logger = logging.getLogger("greenpool.engine")

C = TypeVar("C")


class Housekeeper(PoolState[C]):
    """The part of `Pool` run by its background housekeeper (see the module docstring)."""

    def _tick(self) -> float:
        return min(1.0, max(0.05, min(self.max_lifetime, self.max_idle) / 20))

    @staticmethod
    def _housekeeper(pool_ref: weakref.ref[Housekeeper[Any]], epoch: int) -> None:
        """Background job: periodic maintenance until the pool closes or is dropped.

        It holds the pool only while at work, so a pool dropped without
        `close()` is collected, its connections with it (as psycopg_pool's).
        """
        woke = False  # from a tick's sleep: time to work
        while True:
            pool = pool_ref()
            if pool is None or pool._closed or pool._epoch != epoch:
                return
            if woke:
                try:
                    pool._housekeep(monotonic())
                except Exception:
                    logger.exception("housekeeping failed in %r", pool.name)
            executor, tick = pool._executor, pool._tick()
            assert executor is not None
            del pool  # not held while asleep
            executor.sleep(tick)
            woke = True

    def _housekeep(self, now: float) -> None:
        self._replace_expiring(now)
        self._shrink_idle(now)
        if self.leak_threshold is not None:
            self._report_leaks(now)
        if (
            self._failing_since is not None
            and not self._reconnect_reported
            and now - self._failing_since >= self.reconnect_timeout
        ):
            self._reconnect_reported = True
            fire(self, "reconnect_failed")
            self.reconnect_failed()
        self._fill()
        # Reservations a connector left behind when it was killed (or a
        # callback of it raised a BaseException) have no one making them.
        self._start_connectors()

    def _replace_expiring(self, now: float) -> None:
        """Start replacements early enough that connections never expire.

        Earliest deadline first: with `num_workers` parallel connects of
        about `_connect_ewma` seconds each, the i-th connection to expire
        must have its replacement started `(i // num_workers + 1)` connect
        times (plus a tick) before it expires. Below `max_size` the new
        connection is opened first and the old one retired when idle; at
        `max_size` (a hard cap on server connections) the old one is retired
        when idle and the refill opens its successor, `num_workers` at a time.
        Called by the housekeeper every tick and by a connector after each
        connect, so a cohort expiring together is replaced back to back, not
        `num_workers` per tick.
        """
        if self._failing_since is not None or not self._retain_idle:
            return  # a pool keeping nothing idle would close the successor at once
        with self._lock:
            candidates = [s for s in self._slots if not s.replacing and s.expire_at > 0]
            # Retired, yet parked idle: a return that read its lifetime just
            # before another thread retired it. Close it now, not when next lent.
            stranded = [s for s in self._slots if s.expire_at == 0 and s.state == IDLE]
            backlog = self._missing_locked(now)
        for slot in stranded:
            self._discard_if_idle(slot)
        candidates.sort(key=lambda s: s.expire_at)
        lead = self._tick() + self._connect_ewma
        due = []
        for i, slot in enumerate(candidates):
            batches = (i + backlog) // self.num_workers + 1
            if slot.expire_at - lead - self._connect_ewma * batches > now:
                break
            due.append(slot)
        if not due:
            return
        retiring = []
        with self._lock:
            if self._closed:
                return
            headroom = self._max_size - self._planned()
            missing = self._missing_locked(now)  # afresh: another caller may have retired some since
            for slot in due:
                if slot.replacing or slot not in self._slots:
                    continue  # seen to since the first look, by another caller
                if headroom > 0:
                    headroom -= 1
                    self._todo.append(slot)
                elif missing < self.num_workers:
                    missing += 1
                    slot.retire("lifetime")  # under the lock: counted as missing by the next look
                    retiring.append(slot)
                else:
                    break
                slot.replacing = True
        for slot in retiring:
            self._discard_if_idle(slot)
        self._start_connectors()

    def _missing_locked(self, now: float) -> int:
        """Connections gone or going whose successors are to be made, and connects queued.

        At max_size each is one connection fewer to lend: at most
        `num_workers` at a time. A connection retired for replacement counts
        from when it is retired until it is closed (below max_size its
        successor exists already: counting it only starts the next
        replacements a little earlier); but one lent for longer than a tick
        may be held for good (a LISTEN loop, a leak), and serves until it
        comes back: it doesn't count, lest it stop the others' replacement.
        """
        held_long = now - self._tick()
        retired = sum(
            1 for s in self._slots if s.replacing and s.expire_at == 0 and (s.state != OUT or s.taken_at > held_long)
        )
        return self._pending() + self._closing + retired

    def _shrink_idle(self, now: float) -> None:
        surplus = len(self._slots) - self._min_size
        if surplus <= 0:
            return
        for seg in self._idle.segments:
            for slot in list(seg.idle):
                if surplus <= 0:
                    return
                if now - slot.last_used >= self.max_idle and self._idle.take(slot):
                    logger.info("closing connection idle for %s sec in %r", self.max_idle, self.name)
                    surplus -= 1
                    self._discard(slot, reason="idle")

    def _report_leaks(self, now: float) -> None:
        threshold = self.leak_threshold
        assert threshold is not None
        for slot in list(self._slots):
            if slot.state == OUT and not slot.leak_reported and now - slot.taken_at >= threshold:
                slot.leak_reported = True
                self.leaks += 1
                fire(self, "leak", slot, now - slot.taken_at)

    def _draw_lifetime(self) -> float:
        return self.max_lifetime * (1.0 - self.lifetime_jitter * random.random())
