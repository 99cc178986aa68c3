"""The part of `Pool` that makes and closes connections.

Connects are reserved under the pool lock (`_todo`: None to grow, or the
slot a new connection replaces) and made by background *connector* jobs,
at most `num_workers` at a time, one while the database is failing. A
failed connect is retried with a jittered backoff only while something
still asks for it (a waiting request, `min_size`, a replacement); the
request it failed may be failed with its error. Closes run in the
background too, and count against `max_size` until done.
"""

from __future__ import annotations

import logging
import random
from time import monotonic
from typing import TypeVar

from .._runtime.waiters import Failed
from .events import describe, fire
from .idle import GONE, OUT, Slot
from .state import PoolState

logger = logging.getLogger("greenpool.engine")

C = TypeVar("C")

# Reconnection backoff while connects fail: from first to max delay, doubling.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 1.0
#: While every connect fails and nothing is alive, a request never fails on
#: an attempt that ended before it began: it joins the attempt under way, or
#: starts one (a probe), at most one at a time and one per this many
#: seconds, so that a busy client's outage costs the server a few attempts a
#: second, not one per request.
PROBE_INTERVAL = 0.2


class Connector(PoolState[C]):
    """The part of `Pool` that makes and closes connections (see the module docstring)."""

    @property
    def failing(self) -> bool:
        """Whether connects have been failing since the last one that worked."""
        return self._failing_since is not None

    def _discard_if_idle(self, slot: Slot[C]) -> None:
        """Close a retired slot now if it sits idle; a lent one is closed when it comes back."""
        if self._idle.take(slot):
            self._discard(slot, reason=slot.retired_for)

    def _discard(self, slot: Slot[C], close_now: bool = False, reason: str | None = None) -> None:
        """Forget a slot, close its connection, and refill if needed.

        `reason` (one of `stats.CLOSE_REASONS`, or None) is counted in the
        stats, once per connection.
        """
        if slot.state == GONE:
            return
        with self._lock:
            if slot.state == GONE:
                return  # by another thread, meanwhile
            self._forget_locked(slot, reason)
            epoch = self._epoch
        self._close_forgotten(slot, epoch, close_now)

    def _forget_locked(self, slot: Slot[C], reason: str | None = None) -> None:
        """Take a slot from the pool, its connection to be closed (under the lock)."""
        slot.state = GONE
        self._slots.discard(slot)
        self._closing += 1
        if reason is not None:
            self._closed_by[reason] += 1

    def _close_forgotten(self, slot: Slot[C], epoch: int, close_now: bool = False) -> None:
        """Close a forgotten slot's connection (in the background), then refill if needed."""
        if close_now or self._executor is None or self.driver.closes_inline:
            self._close_then_fill(slot.conn, epoch)
        else:
            self._executor.submit(self._close_then_fill, slot.conn, epoch)

    def _close_then_fill(self, conn: C, epoch: int) -> None:
        try:
            self._close_quietly(conn)
        finally:
            with self._lock:
                if self._epoch == epoch:
                    self._closing -= 1
        self._fill()

    def _close_quietly(self, conn: C) -> None:
        try:
            self.driver.close(conn)
        except Exception as ex:
            logger.debug("error closing connection in %r: %s", self.name, ex)

    def _fill(self) -> None:
        """Reserve connects up to `min_size`, and for waiters up to `max_size`."""
        pending = self._pending()
        size = self._planned()
        if size >= self._min_size and (size >= self._max_size or len(self._waiters) <= pending):
            return  # nothing to do: the common case, decided without the lock
        with self._lock:
            if self._closed:
                return
            pending = self._pending()
            size = self._planned()
            want = max(
                self._min_size - size,
                min(len(self._waiters) - pending, self._max_size - size),
            )
            self._todo.extend([None] * want)
        self._start_connectors()

    def _probe_due_locked(self) -> bool:
        """Whether a request must start a probe (see `PROBE_INTERVAL`); claim it if so (under the lock).

        Only while every connect fails, nothing is alive, no connect is under
        way but a retry is reserved (the connector sleeps out its backoff),
        and no probe was started already.
        """
        if (
            self._failing_since is None
            or self._slots
            or self._inflight
            or not self._todo
            or self._probing
            or self._closed
        ):
            return False
        self._probing = True
        return True

    def _start_probe(self) -> None:
        """Start a connect now for the requests waiting (see `PROBE_INTERVAL`).

        The connector sleeping out its backoff stops when it wakes: the probe
        takes its place, and its backoff, if it fails too.
        """
        with self._lock:
            self._connecting += 1
            self._backoff_generation += 1
            epoch = self._epoch
            wait = max(0.0, self._last_failure + PROBE_INTERVAL - monotonic())
        assert self._executor is not None
        self._executor.submit(self._connector, epoch, wait)

    def _start_connectors(self) -> None:
        with self._lock:
            if self._closed or not self._todo:
                return
            limit = 1 if self._failing_since is not None else self.num_workers
            n = max(0, min(len(self._todo), limit - self._connecting))
            self._connecting += n
            epoch = self._epoch
        assert self._executor is not None
        for _ in range(n):
            self._executor.submit(self._connector, epoch)

    def _connector(self, epoch: int, probe_after: float | None = None) -> None:
        """Background job: make the reserved connections, retrying on failure.

        A connector of another epoch (the parent's, copied by a fork) stops.
        A probe (see `_start_probe()`) waits `probe_after` seconds, connects
        once whatever the limit on connectors, then goes on as any other.
        """
        replaces: Slot[C] | None = None
        reserved = False  # holding a reservation popped from _todo
        probing = probe_after is not None
        try:
            if probe_after:
                assert self._executor is not None
                self._executor.sleep(probe_after)
            while True:
                with self._lock:
                    if self._epoch != epoch:
                        return
                    if probing:
                        self._probing = False
                    limit = 1 if self._failing_since is not None else self.num_workers
                    if self._closed or not self._todo or (self._connecting > limit and not probing):
                        self._connecting -= 1
                        return
                    probing = False
                    replaces = self._todo.popleft()
                    reserved = True
                    self._inflight += 1
                    drains = self._drains
                t0 = monotonic()
                try:
                    self.connections_num += 1
                    conn = self.driver.connect()
                except Exception as ex:
                    self.connections_errors += 1
                    with self._lock:
                        if self._epoch != epoch:
                            return
                        closed = self._closed
                        self._inflight -= 1
                        reserved = False
                    if closed:
                        # In flight when the pool closed (its server may be going
                        # away with it): nothing waits for it, nothing to report.
                        logger.debug("error connecting in closed %r: %s", self.name, ex)
                        continue  # and return at the top, without a backoff
                    self._connect_failed(ex, t0)  # may fail requests with this error
                    with self._lock:
                        if self._epoch != epoch:
                            return
                        pending = self._pending()
                        # Still asked for by a request left waiting, or by
                        # min_size? Else not retried: the next request tries again.
                        wanted = (
                            replaces is not None
                            or self._planned(closing=False) < self._min_size
                            or len(self._waiters) > pending
                        )
                        if wanted and not self._closed:  # close() cleared the reservations
                            self._todo.appendleft(replaces)
                        elif not pending:
                            # No retry: the next request tries a connect of
                            # its own, and its error is its own.
                            self._failing_since = None
                            self._last_error = None
                        retry_due = bool(self._todo)
                        delay = self._retry_delay
                        self._retry_delay = min(delay * 2, BACKOFF_MAX)
                        generation = self._backoff_generation
                        # Requests that came after this attempt began wait
                        # for the next: as soon as a probe would be allowed.
                        fresh = not self._slots and not self._inflight and any(req.since > t0 for req in self._waiters)
                    if not retry_due:
                        continue
                    # Also before others' connects queued meanwhile: under
                    # load they would follow each other without a pause.
                    assert self._executor is not None
                    self._executor.sleep(PROBE_INTERVAL if fresh else delay * (0.5 + random.random()))
                    with self._lock:
                        if self._epoch == epoch and self._backoff_generation != generation:
                            self._connecting -= 1  # a request's probe took this retry over
                            return
                    continue
                elapsed = monotonic() - t0
                self.connections_created += 1
                self.connections_ms += int(elapsed * 1000)
                self._connect_ewma += (elapsed - self._connect_ewma) * 0.2
                self._retry_delay = BACKOFF_FIRST
                failing_since = self._failing_since
                recovered = failing_since is not None
                if failing_since is not None:
                    fire(
                        self,
                        "outage_ended",
                        monotonic() - failing_since,
                        self._outage_attempts,
                        self.connections_lost + self.returns_bad - self._outage_lost,
                    )
                    self._failing_since = None
                    self._last_error = None  # not the cause of a later timeout
                    self._reconnect_reported = False
                reserved = False  # _add_connection settles the reservation
                self._add_connection(conn, replaces, drains, epoch)
                if recovered:
                    self._start_connectors()
                if self._epoch == epoch:  # a job copied by a fork leaves the child's pool alone
                    self._replace_expiring(monotonic())
        except BaseException:
            with self._lock:
                if self._epoch != epoch:
                    raise
                if probing:
                    self._probing = False
                if reserved:
                    self._inflight -= 1
                    if not self._closed:
                        self._todo.appendleft(replaces)
                self._connecting -= 1
            raise

    def _connect_failed(self, ex: Exception, t0: float) -> None:
        self._last_error = ex
        self._last_failure = monotonic()
        if self.driver.is_permanent(ex):
            self._retry_delay = BACKOFF_MAX  # retried in case it is fixed, no faster
        fire(self, "connect_failed", ex)
        if self._failing_since is None:
            self._failing_since = t0
            self._outage_attempts = 0
            self._outage_lost = self.connections_lost + self.returns_bad
            fire(self, "outage_started", ex)
        self._outage_attempts += 1
        with self._lock:
            waiters = self._waiters
            if not self._slots and not self._inflight:
                # Nothing alive can come back to the waiters, and no other
                # connect is under way that might succeed: fail them now,
                # those that came before this attempt began. Its error is
                # older than the others (the server may be back, a replica
                # promoted): they wait for the next attempt.
                failed = [req for req in waiters if req.since <= t0]
                kept = [req for req in waiters if req.since > t0] if len(failed) < len(waiters) else ()
                waiters.clear()
                waiters.extend(kept)
            elif self.driver.connect_error_fails_a_request and waiters and waiters[0].since <= t0:
                failed = [waiters.popleft()]
            else:
                return
            failure = Failed(ex)
            for req in failed:
                req.slot = failure
        for req in failed:
            req.fire()

    def _add_connection(self, conn: C, replaces: Slot[C] | None, drains: int, epoch: int) -> None:
        """Put a new connection to use; `drains` is `_drains` when its connect began."""
        now = monotonic()
        slot = Slot(conn, now, self._draw_lifetime())
        slot.state = OUT
        slot.generation = drains
        with self._lock:
            if self._epoch != epoch:
                # Begun before a fork: the parent has it too. Not ours to
                # use, nor to close (closing would end the parent's session).
                return
            self._inflight -= 1
            closed = self._closed
            # Made with the settings a drain() since was called to get rid of:
            # make it again.
            stale = not closed and drains != self._drains
            if stale:
                self._todo.appendleft(replaces)
            elif not closed:
                self._slots.add(slot)
        if closed or stale:
            self._close_quietly(conn)
            return
        if replaces is not None:
            # The successor was opened within max_size: both may be in use
            # until the old one, retired, comes back.
            replaces.retire("lifetime")
            self._discard_if_idle(replaces)
        self._release(slot)

    def _error_suffix(self) -> str:
        if self._failing_since is None or self._last_error is None:
            return ""
        return describe(self._last_error)
