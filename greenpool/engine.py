"""The pool engine: connections made by hooks, lent to greenlets and threads.

The engine knows no driver. An adapter subclasses `Pool` and implements the
connection hooks (`_open_connection`, `_close_connection`, `_status`,
`_clean`, `_ping`); everything else lives here:

- Idle connections sit in *segments*, each with its own lock. A caller starts
  at its own segment (so a greenlet tends to get back the connection it used
  last) and steals from the others. A caller that finds nothing joins one FIFO
  queue and is handed the next connection that comes back or is created.
- No lock is held across a hook, a network operation or a greenlet switch:
  slots are reserved under a lock, connections are made, checked, cleaned and
  closed outside it.
- A background *housekeeper* keeps `min_size` connections, replaces the ones
  nearing their (randomized) lifetime before they expire, closes idle surplus
  and reports leaks. All connecting and closing happens in the background.
"""

from __future__ import annotations

import logging
import numbers
import os
import random
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any, Generic, TypeVar

from . import _compat, errors
from ._compat import (
    INFINITY,
    DeadlineTimer,
    Executor,
    ThreadRequest,
    allocate_lock,
    get_thread_ident,
    getcurrent,
    gevent_hub,
    sleep,
)
from .stats import WaitTimes

logger = logging.getLogger("greenpool")

C = TypeVar("C")

# Slot states.
IDLE, OUT, GONE = "idle", "out", "gone"

# What `_status()` says of a connection.
OK, DIRTY, BROKEN = 0, 1, 2

# Reconnection backoff while connects fail: from first to max delay, doubling.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 1.0


class Slot(Generic[C]):
    """A pooled connection and its bookkeeping."""

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
    )

    def __init__(self, conn: C, now: float, lifetime: float) -> None:
        self.conn = conn
        self.created_at = now
        self.expire_at = now + lifetime
        self.last_used = now
        self.taken_at = now
        self.state = IDLE
        self.segment: _Segment | None = None
        # A replacement has been reserved for this connection.
        self.replacing = False
        self.stack: list[traceback.FrameSummary] | None = None
        self.leak_reported = False
        # Handed straight from a check-in that found it OK: no need to
        # look at its status again.
        self.handed_fresh = False

    def retire(self) -> None:
        """Close this connection as soon as it is not in use."""
        self.expire_at = 0.0

    def __repr__(self) -> str:
        return f"<Slot {self.state} {self.conn!r}>"


class _Segment:
    """A shard of idle connections with its own lock."""

    __slots__ = ("lock", "idle")

    def __init__(self) -> None:
        self.lock = allocate_lock()
        self.idle: list[Slot[Any]] = []


# A request (`GreenRequest` or `ThreadRequest`) waits in the pool's queue
# until, under the pool lock, exactly one of these happens: a check-in takes
# it off the queue and sets its `slot`; it takes itself off the queue when it
# gives up; the pool closes or fails it, and sets its `slot` to a `_Failed`.
# That is the accept handshake: a connection is never handed to a request
# that gave up, and a request that gave up never loses one handed to it.
_Request = Any


class _Failed:
    """A request's `slot` when it got none: cancelled, or failed by a connect's error."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


#: The request gave up, or the pool closed.
_CANCELLED = _Failed(None)


def _describe(error: BaseException) -> str:
    return f": {type(error).__name__}: {error}"


def _check_number(name: str, value: Any) -> float:
    """`value` as a float, if it is a number: not a string or a bool, which no one means."""
    # The ABC's isinstance() is slow: the common types first.
    if (
        type(value) is not float
        and type(value) is not int
        and (not isinstance(value, numbers.Real) or isinstance(value, bool))
    ):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_positive(name: str, value: float, *, allow_zero: bool = True) -> float:
    number = _check_number(name, value)
    if number < 0 or (number == 0 and not allow_zero) or number != number:
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def _seconds_left(timeout: Any) -> float:
    """A checkout's `timeout`, checked; one < 0 (a deadline already past) counts as 0."""
    number = _check_number("timeout", timeout)
    return 0.0 if number < 0 else _check_positive("timeout", number)


def _check_count(name: str, value: int, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _check_callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {value!r}")


class Pool(Generic[C]):
    """A driver-agnostic pool of connections for greenlets and threads.

    Adapters subclass it and implement the connection hooks. See the README
    for the meaning and default of each parameter.
    """

    # Adapters replace these with their driver-flavoured subclasses.
    PoolTimeout: type[errors.PoolTimeout] = errors.PoolTimeout
    PoolClosed: type[errors.PoolClosed] = errors.PoolClosed
    TooManyRequests: type[errors.TooManyRequests] = errors.TooManyRequests

    _num_pool = 0

    #: Keep returned connections for reuse; a "null" pool closes them.
    _retain_idle = True

    #: Connections can only be used in the gevent hub that made them (a
    #: patched pymysql socket): background jobs of a patched program's
    #: other threads run in its main hub, not in threads of their own.
    _hub_bound_connections = False

    #: A connect that fails fails the first queued request with its error,
    #: as a client making its own connect would see it. Otherwise requests
    #: wait on (for their timeout) while some connection may come back.
    _connect_error_fails_a_request = False

    def __init__(
        self,
        *,
        min_size: int = 4,
        max_size: int | None = None,
        name: str | None = None,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        lifetime_jitter: float = 0.1,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Callable[[Any], None] | None = None,
        num_workers: int = 3,
        segments: int = 4,
        check: Callable[[C], None] | None = None,
        check_idle: float = 0.0,
        leak_threshold: float | None = None,
    ) -> None:
        self._min_size, self._max_size = self._check_size(min_size, max_size)
        self.timeout = _check_positive("timeout", timeout)
        self.max_waiting = _check_count("max_waiting", max_waiting, 0)
        self.max_lifetime = _check_positive("max_lifetime", max_lifetime, allow_zero=False)
        self.lifetime_jitter = _check_positive("lifetime_jitter", lifetime_jitter)
        if not self.lifetime_jitter < 1:
            raise ValueError(f"lifetime_jitter must be in [0, 1), got {lifetime_jitter!r}")
        self.max_idle = _check_positive("max_idle", max_idle)
        self.reconnect_timeout = _check_positive("reconnect_timeout", reconnect_timeout)
        _check_callable("reconnect_failed", reconnect_failed)
        self._reconnect_failed = reconnect_failed
        self.num_workers = _check_count("num_workers", num_workers, 1)
        _check_count("segments", segments, 1)
        _check_callable("check", check)
        self._check = check
        self.check_idle = _check_positive("check_idle", check_idle)
        if leak_threshold is not None:
            leak_threshold = _check_positive("leak_threshold", leak_threshold, allow_zero=False)
        self.leak_threshold = leak_threshold

        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {name!r}")
        if not name:
            Pool._num_pool += 1
            name = f"pool-{Pool._num_pool}"
        self.name = name

        self._lock = allocate_lock()
        self._segments = [_Segment() for _ in range(segments)]
        self._waiters: deque[_Request] = deque()
        # One DeadlineTimer per hub whose greenlets queue here; the last one
        # used is kept at hand (the common case is a single hub), as one
        # (hub, timer) pair: threads with hubs of their own read and replace
        # it at once, never one half of each.
        self._timers: weakref.WeakKeyDictionary[Any, DeadlineTimer] = weakref.WeakKeyDictionary()
        self._last_timer: tuple[Any, Any] = (None, None)
        self._slots: set[Slot[C]] = set()  # live connections
        # Reserved connects: None to grow, or the Slot being replaced.
        self._todo: deque[Slot[C] | None] = deque()
        self._connecting = 0  # connector jobs running
        self._inflight = 0  # reservations taken from _todo, being connected
        self._cleaning = 0  # returned connections being cleaned in the background
        # Forgotten connections not closed yet: the server still has them,
        # and max_size caps what it has.
        self._closing = 0
        # Background jobs update the counters above only in the epoch they
        # were started in: a forked child starts a new one (`forget_all()`).
        self._epoch = 0
        self._failing_since: float | None = None
        self._last_error: BaseException | None = None
        self._reconnect_reported = False
        self._connect_ewma = 0.05  # seconds, seeds replacement lead times
        self._drains = 0  # drain() calls: a connect begun before one is stale

        self._opened = False
        self._closed = True
        self._executor: Executor | None = None
        self._pid = os.getpid()  # of the process the pool's background jobs run in

        self._wait_times = WaitTimes()
        self._reset_counters()

    # -- hooks an adapter implements -------------------------------------

    def _open_connection(self) -> C:
        """Make a new connection (network I/O; never called under a lock)."""
        raise NotImplementedError

    def _close_connection(self, conn: C) -> None:
        """Close a connection (may do network I/O)."""
        raise NotImplementedError

    def _status(self, conn: C) -> int:
        """Cheap local test, no I/O: `OK`, `DIRTY` (needs `_clean()`) or `BROKEN`."""
        raise NotImplementedError

    def _clean(self, conn: C) -> None:
        """Bring a returned connection back to a reusable state, or raise."""

    def _ping(self, conn: C) -> None:
        """Round trip to the server; raise if the connection is unusable."""

    # -- sizes and state -------------------------------------------------

    @staticmethod
    def _check_size(min_size: int, max_size: int | None) -> tuple[int, int]:
        if max_size is None:
            max_size = min_size
        _check_count("min_size", min_size, 0)
        _check_count("max_size", max_size, 0)
        if max_size < min_size:
            raise ValueError(f"max_size must be >= min_size ({min_size}), got {max_size}")
        if max_size == 0:
            raise ValueError("max_size must be > 0 (it defaults to min_size, here 0)")
        return min_size, max_size

    @property
    def min_size(self) -> int:
        """Connections the pool keeps open even when idle."""
        return self._min_size

    @property
    def max_size(self) -> int:
        """Most connections the pool lends at once."""
        return self._max_size

    @property
    def closed(self) -> bool:
        """True if the pool is closed (or not opened yet)."""
        return self._closed

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} {self.name!r} at 0x{id(self):x}>"

    # -- open, wait, close -----------------------------------------------

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool and start filling it in the background.

        With `wait`, block until `min_size` connections are ready (see
        `wait()`). Opening an open pool is a no-op; a closed pool can't
        be reopened.
        """
        _check_positive("timeout", timeout)  # here, not only when it is used
        with self._lock:
            if self._closed and self._opened:
                raise self.PoolClosed(f"the pool {self.name!r} was closed and cannot be reopened")
            starting = self._closed
            if starting:
                self._pid = os.getpid()
                self._executor = executor = Executor(self._hub_bound_connections)
                self._closed = False
                self._opened = True
        if starting:
            executor.submit(self._housekeeper, weakref.ref(self), self._epoch)
            self._fill()
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until `min_size` connections are ready.

        Close the pool and raise `PoolTimeout`, with the last connection
        error, if it isn't ready within `timeout` seconds.
        """
        self._check_open()
        timeout = _check_positive("timeout", timeout)
        deadline = monotonic() + timeout
        step = 0.001
        while len(self._slots) < self._min_size:
            if self._closed:
                raise self.PoolClosed(f"the pool {self.name!r} is closed")
            if monotonic() >= deadline:
                self.close()
                raise self.PoolTimeout(
                    f"pool initialization incomplete after {timeout} sec" + self._error_suffix()
                ) from self._last_error
            sleep(step)
            step = min(step * 2, 0.05)

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: fail waiting and future requests with `PoolClosed`.

        Idle connections are closed now; lent ones when they come back, and
        those being made as soon as they are. Nothing waits for that:
        `timeout` (psycopg_pool's wait for its worker threads) is checked,
        then unused.
        """
        _check_positive("timeout", timeout)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiters)
            self._waiters.clear()
            self._todo.clear()
            for req in waiting:
                req.slot = _CANCELLED
        for req in waiting:
            req.fire()
        for slot in self._take_all_idle():
            self._discard(slot, close_now=True)

    def __enter__(self: Any) -> Any:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            state = "closed" if self._opened else "not open yet"
            raise self.PoolClosed(f"the pool {self.name!r} is {state}")

    def _check_not_closed(self) -> None:
        """Raise after `close()`; a pool not open yet may still be configured."""
        if self._closed and self._opened:
            raise self.PoolClosed(f"the pool {self.name!r} is closed")

    # -- checkout --------------------------------------------------------

    def _pop_idle(self) -> Slot[C] | None:
        """Take an idle connection, own segment first; no global lock."""
        # On the hot path, explicit acquire/release: `with lock` costs twice as much.
        segments = self._segments
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

    def acquire(self, timeout: float | None = None, *, fail_if_full: bool = False) -> Slot[C]:
        """Lend a connection's slot; wait up to `timeout` (default `self.timeout`).

        A `timeout` <= 0 takes an idle connection if there is one and
        doesn't wait (psycopg_pool raises `PoolTimeout` for any). Raise
        `PoolTimeout` if none is available in time, `TooManyRequests`
        if `max_waiting` requests already wait (or, with `fail_if_full`, if
        no connection is idle and the pool can't grow for this request),
        `PoolClosed` if closed. `timeout` may be `math.inf`.
        """
        if self._closed:
            self._check_open()
        if timeout is None:
            timeout = self.timeout
        elif type(timeout) is not float or not timeout >= 0:
            timeout = _seconds_left(timeout)
        self.requests_num += 1
        now = monotonic()
        # Don't overtake queued requests: FIFO fairness.
        if not self._waiters:
            slot = self._pop_idle()
            while slot is not None:
                if self._lend(slot, now):
                    return slot
                slot = self._pop_idle()
        return self._acquire_queued(now, timeout, fail_if_full)

    def _acquire_queued(self, start: float, timeout: float, fail_if_full: bool) -> Slot[C]:
        # The hot path when connections are scarce: every bytecode here runs
        # once per contended checkout, so helpers are inlined.
        deadline = start + timeout
        queued = False  # once: a request queued again is counted and timed once
        while True:
            hub = gevent_hub()
            req: Any
            if hub is None:
                req = ThreadRequest()
            else:
                req = _compat.GreenRequest(hub)
                req.deadline = deadline  # before it's queued: _expire_due reads it
            req.slot = None
            lock = self._lock
            first = None  # set once the request is past `_refuse()`
            # Queued inside the `try`: an exception raised into this greenlet
            # (a KeyboardInterrupt) as soon as the request is queued must not
            # leave it there, to be handed a connection no one takes.
            try:
                lock.acquire()
                try:
                    if self._closed or self.max_waiting or fail_if_full or self._failing_since is not None:
                        self._refuse(fail_if_full)
                    waiters = self._waiters
                    first = not waiters
                    waiters.append(req)
                finally:
                    lock.release()
                if not queued:
                    self.requests_queued += 1
                # A full pool's slots alone reach max_size: one len() says so.
                nslots = len(self._slots)
                if (
                    nslots < self._max_size
                    and nslots + len(self._todo) + self._inflight + self._closing < self._max_size
                ):
                    self._fill()
                if first:
                    # A connection parked idle while the queue was empty: its
                    # returner saw no one to hand it to. Behind another request
                    # there is none such (see `_park`), so only the first looks.
                    for seg in self._segments:
                        if seg.idle:
                            self._rebalance()
                            break
                if hub is None:
                    req.wait(deadline - monotonic())
                else:
                    # Also without a deadline the timer holds the loop: a
                    # connection may come back from another thread, whose
                    # wake-up alone wouldn't keep the loop running.
                    last_hub, timer = self._last_timer
                    if last_hub is not hub:
                        timer = self._deadline_timer(hub)
                    timer.waiting += 1
                    if deadline < timer.at:
                        timer.arm(deadline)
                    elif not timer.held:
                        timer.hold()
                    try:
                        if req.slot is None:
                            req.get()
                    finally:
                        timer.waiting -= 1
                        if not timer.waiting:
                            timer.let_go()
            except BaseException:
                if first is None:
                    raise  # refused by `_refuse()` (which counted it), or never queued
                # Killed, interrupted or timed out from outside while queued:
                # keep a connection handed to us in the meantime for the others.
                slot = self._cancel(req)
                if slot is not None:
                    self._release(slot, slot.handed_fresh)
                self.requests_errors += 1
                self._record_wait(monotonic() - start)
                raise
            slot = req.slot
            failed = type(slot) is _Failed  # by close(), or by a connect's error
            if slot is None or failed:
                failure = slot
                slot = self._cancel(req)
            now = monotonic()
            if slot is None:
                self._record_wait(now - start)
                self.requests_errors += 1
                self._check_open()
                if failed:
                    # The error it was failed with: the pool's own may be
                    # cleared or replaced by now.
                    error = failure.error
                    what = f"the pool {self.name!r} has no connection" + (_describe(error) if error else "")
                else:
                    error = self._last_error
                    what = f"couldn't get a connection after {timeout:.2f} sec" + self._error_suffix()
                raise self.PoolTimeout(what) from error
            queued = True
            if slot.state is not OUT:
                continue  # closed (`close_lent()`) while handed to us: queue again
            # `_lend()`'s checks, when a returner just found it OK (so recently
            # used that a `check` callback would not run either).
            if (
                slot.handed_fresh
                and now < slot.expire_at
                and (self._check is None or now - slot.last_used < self.check_idle)
                and self.leak_threshold is None
            ):
                slot.taken_at = now
                self._record_wait(now - start)
                return slot
            if self._lend(slot, now):
                self._record_wait(now - start)
                return slot

    def _deadline_timer(self, hub: Any) -> DeadlineTimer:
        timer = self._timers.get(hub)
        if timer is None:
            hub_ref = weakref.ref(hub)  # the timer is the hub's weak-keyed value
            timer = self._timers[hub] = DeadlineTimer(hub, lambda now: self._expire_due(hub_ref(), now))
        self._last_timer = (hub, timer)
        return timer

    def _expire_due(self, hub: Any, now: float) -> float:
        """Wake `hub`'s queued requests whose deadline passed (in `hub`'s thread).

        Return the earliest deadline of its requests left waiting.
        """
        if hub is None:
            return INFINITY  # the hub is gone, and its greenlets with it
        due = []
        earliest = INFINITY
        with self._lock:
            for req in self._waiters:
                if req.hub is hub:  # queued requests have no slot yet
                    deadline = req.deadline
                    if deadline <= now:
                        due.append(req)
                    elif deadline < earliest:
                        earliest = deadline
        for req in due:
            req.fire()  # each settles its own timeout
        return earliest

    def _record_wait(self, waited: float) -> None:
        self._wait_times.add(waited)
        self._wait_total += waited

    def _refuse(self, fail_if_full: bool) -> None:
        """Raise if a request may not queue (called under the lock)."""
        self._check_open()
        waiting = len(self._waiters)
        if self.max_waiting and waiting >= self.max_waiting:
            self.requests_errors += 1
            raise self.TooManyRequests(f"the pool {self.name!r} has already {waiting} requests waiting")
        if fail_if_full and self.full():
            self.requests_errors += 1
            raise self.TooManyRequests(f"the pool {self.name!r} has {self._max_size} connections in use")
        if self._failing_since is not None and not self._slots and not self._inflight and self._todo:
            # The database is unreachable, nothing can come back and a retry
            # is due: fail fast with the driver's error instead of a long
            # wait. (With a connect under way, wait for it: one failure may
            # be a fluke; with none due, this request's own connect is tried.)
            self.requests_errors += 1
            raise self.PoolTimeout(
                f"the pool {self.name!r} has no connection" + self._error_suffix()
            ) from self._last_error

    @property
    def failing(self) -> bool:
        """Whether connects have been failing since the last one that worked."""
        return self._failing_since is not None

    def full(self) -> bool:
        """Whether a request queued now waits for a connection in use (none can be made for it).

        Each request queued takes a pending connect or the next returned
        connection; what's left of `max_size` would be made for this one.
        Connections being cleaned after their return count as free.
        """
        return len(self._slots) - self._cleaning + len(self._waiters) >= self._max_size

    def _cancel(self, req: _Request) -> Slot[C] | None:
        """Settle the handshake: return the handed slot, or mark cancelled."""
        with self._lock:
            slot = req.slot
            if slot is None:
                req.slot = _CANCELLED
                try:
                    self._waiters.remove(req)  # rare: no need for O(1)
                except ValueError:
                    pass  # interrupted before it was queued
        return None if type(slot) is _Failed else slot

    def _lend(self, slot: Slot[C], now: float) -> bool:
        """Lend `slot` if the local checks (and the `check` callback) pass.

        Otherwise discard it (its replacement is on the way) and return False.
        """
        if now >= slot.expire_at:
            self._discard(slot)
            return False
        # `taken_at` first: `close_lent()` in another thread must never see
        # this lending with the last one's time.
        slot.taken_at = now
        slot.state = OUT
        if slot.handed_fresh:
            slot.handed_fresh = False
        elif self._status(slot.conn) == BROKEN:
            self.connections_lost += 1
            self._discard(slot)
            return False
        if self._check is not None and now - slot.last_used >= self.check_idle:
            try:
                self._check(slot.conn)
            except Exception as ex:
                logger.info("connection failed check in %r: %s", self.name, ex)
                self.connections_lost += 1
                self._discard(slot)
                return False
            except BaseException:
                self.release(slot)
                raise
        if self.leak_threshold is not None:
            stack = traceback.extract_stack()
            while stack and stack[-1].filename == __file__:
                stack.pop()  # the engine's own frames
            slot.stack = stack
            slot.leak_reported = False
        return True

    # -- checkin ---------------------------------------------------------

    def release(self, slot: Slot[C], status: int | None = None) -> None:
        """Take back a lent slot: clean it if needed, then reuse or retire it.

        `status` is the connection's `_status()` if the caller just read it.
        A connection the pool closed while lent (`close_lent()`) is no
        longer the pool's: giving it back does nothing.
        """
        if slot.state != OUT:
            if slot.state == GONE:
                return
            raise ValueError(f"can't return {slot.conn!r} to pool {self.name!r}: it is not lent")
        now = monotonic()
        self._usage += now - slot.taken_at
        if status is None:
            status = self._status(slot.conn)
        if status == OK and now < slot.expire_at and not self._closed:
            slot.last_used = now
            self._release(slot)
            return
        if not self._unlent(slot):
            return
        if self._closed and status != DIRTY:  # a dirty one may run a query on: cancel it first
            self._discard(slot, close_now=True)
        elif status == BROKEN:
            self.returns_bad += 1
            logger.warning("discarding closed connection returned to %r: %s", self.name, slot.conn)
            self._discard(slot)
        elif status == DIRTY:
            self.returns_reset += 1
            with self._lock:
                self._cleaning += 1
                epoch = self._epoch
            assert self._executor is not None
            self._executor.submit(self._clean_then_release, slot, epoch)
        else:
            self._discard(slot)

    def _clean_then_release(self, slot: Slot[C], epoch: int) -> None:
        try:
            self._clean(slot.conn)
        except Exception as ex:
            logger.warning("discarding connection that failed reset in %r: %s", self.name, ex)
            self.returns_bad += 1
            self._discard(slot)
            return
        except BaseException:
            # Killed or timed out mid-reset: the connection's state is
            # unknown, and the slot would otherwise stay counted for good.
            self.returns_bad += 1
            self._discard(slot)
            raise
        finally:
            with self._lock:
                if self._epoch == epoch:
                    self._cleaning -= 1
        slot.last_used = monotonic()
        if slot.last_used >= slot.expire_at:
            self._discard(slot)
        else:
            self._release(slot)

    def _release(self, slot: Slot[C], fresh: bool = True) -> None:
        """Hand a good slot to the first waiter, or park it idle.

        `fresh`: its status was checked moments ago (by `release()`, a
        cleaner, a connector), the taker needn't look again.
        """
        if self._waiters:
            lock = self._lock
            lock.acquire()
            try:
                if slot.state == GONE:
                    # Closed by `close_lent()` in another thread as it came
                    # back: not for a waiter. (Parked, the lend's status
                    # check would find it closed.)
                    return
                req = self._hand_locked(slot, fresh) if self._waiters else None
            finally:
                lock.release()
            if req is not None:
                req.fire()
                return
        self._park(slot)

    def _park(self, slot: Slot[C]) -> None:
        """Put a good slot in the caller's idle segment (or close it)."""
        if self._closed or not self._retain_idle:
            self._discard(slot, close_now=self._closed)
            return
        if not self._unlent(slot):
            return
        slot.handed_fresh = False  # may sit idle for long: look again when lent
        segments = self._segments
        seg = slot.segment = segments[hash(getcurrent()) % len(segments)]
        lock = seg.lock
        lock.acquire()
        try:
            seg.idle.append(slot)
        finally:
            lock.release()
        # Re-check after publishing: a request may have queued meanwhile
        # (the first request to queue re-checks the segments after queuing,
        # so one of us sees the other; with a request already queued, this
        # check sees it). So no connection stays idle while a request waits.
        if self._waiters:
            self._rebalance()
        elif self._closed:
            for idle in self._take_all_idle():
                self._discard(idle, close_now=True)

    def _unlent(self, slot: Slot[C]) -> bool:
        """Mark a slot coming back IDLE; False if the pool closed it meanwhile.

        `close_lent()` in another thread marks a lent slot GONE under the
        lock: once this one marked it IDLE, that one leaves it alone; if
        that one was first, the slot is not the pool's any more.
        """
        lock = self._lock
        lock.acquire()
        try:
            if slot in self._slots:
                slot.state = IDLE
                return True
            slot.state = GONE
            return False
        finally:
            lock.release()

    def _hand_locked(self, slot: Slot[C], fresh: bool = False) -> _Request:
        """Hand `slot` to the first waiting request (under the pool lock; one waits).

        `fresh`: its status was just checked, the taker needn't look again.
        """
        req = self._waiters.popleft()
        slot.state = OUT
        # Lent from its return on, not since its last borrower took it: that
        # one's old `taken_at` would let `close_lent()` close it under its
        # new borrower before they even run.
        slot.taken_at = slot.last_used
        slot.handed_fresh = fresh
        req.slot = slot
        return req

    def _rebalance(self) -> None:
        """Hand idle connections to waiting requests."""
        handed = []
        with self._lock:
            while self._waiters:
                slot = self._pop_idle()
                if slot is None:
                    break
                if slot.state != GONE:  # see `_release`
                    handed.append(self._hand_locked(slot))
        for req in handed:
            req.fire()

    def _take_all_idle(self) -> list[Slot[C]]:
        taken: list[Slot[C]] = []
        for seg in self._segments:
            with seg.lock:
                taken.extend(seg.idle)
                seg.idle.clear()
        return taken

    def _take_idle(self, slot: Slot[C]) -> bool:
        """Take a specific slot out of its segment if it is still idle there."""
        seg = slot.segment
        if seg is None or slot.state != IDLE:
            return False
        with seg.lock:
            try:
                seg.idle.remove(slot)
            except ValueError:
                return False
        return True

    # -- discarding and connecting ---------------------------------------

    def _discard_if_idle(self, slot: Slot[C]) -> None:
        """Close a retired slot now if it sits idle; a lent one is closed when it comes back."""
        if self._take_idle(slot):
            self._discard(slot)

    def _discard(self, slot: Slot[C], close_now: bool = False) -> None:
        """Forget a slot, close its connection, and refill if needed."""
        if slot.state == GONE:
            return
        with self._lock:
            if slot.state == GONE:
                return  # by another thread, meanwhile
            self._forget_locked(slot)
            epoch = self._epoch
        self._close_forgotten(slot, epoch, close_now)

    def _forget_locked(self, slot: Slot[C]) -> None:
        """Take a slot from the pool, its connection to be closed (under the lock)."""
        slot.state = GONE
        self._slots.discard(slot)
        self._closing += 1

    def _close_forgotten(self, slot: Slot[C], epoch: int, close_now: bool = False) -> None:
        """Close a forgotten slot's connection (in the background), then refill if needed."""
        if close_now or self._executor is None:
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
            self._close_connection(conn)
        except Exception as ex:
            logger.debug("error closing connection in %r: %s", self.name, ex)

    def _fill(self) -> None:
        """Reserve connects up to `min_size`, and for waiters up to `max_size`."""
        pending = len(self._todo) + self._inflight
        size = len(self._slots) + pending + self._closing
        if size >= self._min_size and (size >= self._max_size or len(self._waiters) <= pending):
            return  # nothing to do: the common case, decided without the lock
        with self._lock:
            if self._closed:
                return
            pending = len(self._todo) + self._inflight
            size = len(self._slots) + pending + self._closing
            want = max(
                self._min_size - size,
                min(len(self._waiters) - pending, self._max_size - size),
            )
            self._todo.extend([None] * want)
        self._start_connectors()

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

    def _connector(self, epoch: int) -> None:
        """Background job: make the reserved connections, retrying on failure.

        A connector of another epoch (the parent's, copied by a fork) stops.
        """
        delay = _BACKOFF_FIRST
        replaces: Slot[C] | None = None
        reserved = False  # holding a reservation popped from _todo
        try:
            while True:
                with self._lock:
                    if self._epoch != epoch:
                        return
                    limit = 1 if self._failing_since is not None else self.num_workers
                    if self._closed or not self._todo or self._connecting > limit:
                        self._connecting -= 1
                        return
                    replaces = self._todo.popleft()
                    reserved = True
                    self._inflight += 1
                    drains = self._drains
                t0 = monotonic()
                try:
                    self.connections_num += 1
                    conn = self._open_connection()
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
                        pending = len(self._todo) + self._inflight
                        # Still asked for by a request left waiting, or by
                        # min_size? Else not retried: the next request tries again.
                        wanted = (
                            replaces is not None
                            or len(self._slots) + pending < self._min_size
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
                    if not retry_due:
                        continue
                    # Also before others' connects queued meanwhile: under
                    # load they would follow each other without a pause.
                    assert self._executor is not None
                    self._executor.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                elapsed = monotonic() - t0
                self.connections_ms += int(elapsed * 1000)
                self._connect_ewma += (elapsed - self._connect_ewma) * 0.2
                delay = _BACKOFF_FIRST
                recovered = self._failing_since is not None
                if recovered:
                    logger.warning("pool %r reconnected", self.name)
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
                if reserved:
                    self._inflight -= 1
                    if not self._closed:
                        self._todo.appendleft(replaces)
                self._connecting -= 1
            raise

    def _connect_failed(self, ex: Exception, t0: float) -> None:
        logger.warning("error connecting in %r: %s", self.name, ex)
        self._last_error = ex
        if self._failing_since is None:
            self._failing_since = t0
        with self._lock:
            if not self._slots and not self._inflight:
                # Nothing alive can come back to the waiters, and no other
                # connect is under way that might succeed: fail them now.
                failed = list(self._waiters)
                self._waiters.clear()
            elif self._connect_error_fails_a_request and self._waiters:
                failed = [self._waiters.popleft()]
            else:
                return
            failure = _Failed(ex)
            for req in failed:
                req.slot = failure
        for req in failed:
            req.fire()

    def _add_connection(self, conn: C, replaces: Slot[C] | None, drains: int, epoch: int) -> None:
        """Put a new connection to use; `drains` is `_drains` when its connect began."""
        now = monotonic()
        slot = Slot(conn, now, self._draw_lifetime())
        slot.state = OUT
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
            replaces.retire()
            self._discard_if_idle(replaces)
        self._release(slot)

    def _error_suffix(self) -> str:
        if self._failing_since is None or self._last_error is None:
            return ""
        return _describe(self._last_error)

    # -- housekeeping ----------------------------------------------------

    def _tick(self) -> float:
        return min(1.0, max(0.05, min(self.max_lifetime, self.max_idle) / 20))

    @staticmethod
    def _housekeeper(pool_ref: weakref.ref[Pool[Any]], epoch: int) -> None:
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
            logger.warning("reconnection attempts in pool %r failing for %s sec", self.name, self.reconnect_timeout)
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
            headroom = self._max_size - len(self._slots) - len(self._todo) - self._inflight - self._closing
            missing = self._missing_locked(now)  # afresh: another caller may have retired some since
            for slot in due:
                if slot.replacing or slot not in self._slots:
                    continue  # seen to since the first look, by another caller
                if headroom > 0:
                    headroom -= 1
                    self._todo.append(slot)
                elif missing < self.num_workers:
                    missing += 1
                    slot.retire()  # under the lock: counted as missing by the next look
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
        return len(self._todo) + self._inflight + self._closing + retired

    def _shrink_idle(self, now: float) -> None:
        surplus = len(self._slots) - self._min_size
        if surplus <= 0:
            return
        for seg in self._segments:
            for slot in list(seg.idle):
                if surplus <= 0:
                    return
                if now - slot.last_used >= self.max_idle and self._take_idle(slot):
                    logger.info("closing connection idle for %s sec in %r", self.max_idle, self.name)
                    surplus -= 1
                    self._discard(slot)

    def _report_leaks(self, now: float) -> None:
        threshold = self.leak_threshold
        assert threshold is not None
        for slot in list(self._slots):
            if slot.state == OUT and not slot.leak_reported and now - slot.taken_at >= threshold:
                slot.leak_reported = True
                where = "".join(traceback.format_list(slot.stack or []))
                logger.warning(
                    "connection %r lent by %r for %.1f sec (leak_threshold=%s), taken at:\n%s",
                    slot.conn,
                    self.name,
                    now - slot.taken_at,
                    threshold,
                    where,
                )

    def _draw_lifetime(self) -> float:
        return self.max_lifetime * (1.0 - self.lifetime_jitter * random.random())

    # -- maintenance API -------------------------------------------------

    def set_max_lifetime(self, max_lifetime: float) -> None:
        """Change `max_lifetime`: live connections draw their lifetime anew.

        A connection already older than its new lifetime is replaced as if
        it had expired.
        """
        self.max_lifetime = _check_positive("max_lifetime", max_lifetime, allow_zero=False)
        with self._lock:
            for slot in self._slots:
                if slot.expire_at:  # not retired
                    slot.expire_at = slot.created_at + self._draw_lifetime()

    def reconnect_failed(self) -> None:
        """Called when reconnection failed for longer than `reconnect_timeout`.

        Calls the `reconnect_failed` callback given to the constructor, if
        any; a subclass may override it instead.
        """
        if self._reconnect_failed is not None:
            self._reconnect_failed(self)

    def discard(self, slot: Slot[C]) -> None:
        """Close a lent connection now instead of returning it; a new one may replace it."""
        if slot.state == GONE:
            return  # closed by the pool already (`close_lent()`)
        if slot.state != OUT:
            raise ValueError(f"can't discard {slot.conn!r} from pool {self.name!r}: it is not lent")
        self._discard(slot, close_now=True)

    def close_idle(self) -> int:
        """Close every idle connection now; return how many.

        Those being cleaned after their return are closed once cleaned.
        """
        with self._lock:
            for slot in self._slots:
                if slot.state == IDLE:  # parked, or in a cleaner's hands
                    slot.retire()
        idle = self._take_all_idle()
        for slot in idle:
            self._discard(slot)
        return len(idle)

    def close_lent(self, older_than: float) -> list[Slot[C]]:
        """Close connections lent more than `older_than` seconds ago, in use or not.

        Their borrowers' next use fails; returning them is then a no-op for
        the caller to handle. Return the slots closed.
        """
        cutoff = monotonic() - _check_positive("older_than", older_than)
        with self._lock:
            # Marked GONE as they are found: a borrower giving one back
            # meanwhile sees it is not the pool's any more (`_unlent()`).
            stale = [s for s in self._slots if s.state == OUT and s.taken_at <= cutoff]
            for slot in stale:
                self._forget_locked(slot)
            epoch = self._epoch
        for slot in stale:
            self._close_forgotten(slot, epoch)
        return stale

    def forget_all(self) -> None:
        """Drop every connection without closing it (e.g. in a forked child).

        In a child forked since the pool opened, the pool starts afresh: its
        locks are made anew (another thread of the parent may have held one),
        the work of its background jobs is forgotten (threads are not copied
        by a fork; greenlets are, and stop, their epoch over) and a new
        housekeeper starts.
        """
        forked = self._pid != os.getpid()
        if forked:
            self._pid = os.getpid()
            self._lock = allocate_lock()
            for seg in self._segments:
                seg.lock = allocate_lock()
        self._take_all_idle()
        with self._lock:
            for slot in self._slots:
                slot.state = GONE
            self._slots.clear()
            if forked:
                self._epoch += 1
                self._todo.clear()
                self._inflight = self._connecting = self._cleaning = self._closing = 0
                # Only this thread was copied: the others' requests wait no more.
                me = get_thread_ident()
                self._waiters = deque(r for r in self._waiters if r.hub is not None and r.hub.thread_ident == me)
        if forked and not self._closed:
            assert self._executor is not None
            self._executor.submit(self._housekeeper, weakref.ref(self), self._epoch)
            self._fill()  # for this thread's requests still waiting

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's size limits at runtime.

        Below the connections there are, connects not begun are called off
        and the surplus retired: idle connections close now, lent ones when
        they come back.
        """
        self._check_not_closed()
        min_size, max_size = self._check_size(min_size, max_size)
        with self._lock:
            self._min_size, self._max_size = min_size, max_size
            excess = len(self._slots) + len(self._todo) + self._inflight - max_size
            while excess > 0 and self._todo:
                called_off = self._todo.pop()
                if called_off is not None:
                    called_off.replacing = False  # the housekeeper sees to it again
                excess -= 1
            # Idle ones first (False sorts first).
            surplus = sorted(self._slots, key=lambda slot: slot.state != IDLE)[: max(excess, 0)]
            for slot in surplus:
                slot.retire()
        for slot in surplus:
            self._discard_if_idle(slot)
        self._fill()

    def drain(self) -> None:
        """Replace every connection: idle ones now, lent ones on return.

        Connections being made when it is called are closed and made again.
        """
        self._check_not_closed()
        with self._lock:
            self._drains += 1
            for slot in self._slots:
                slot.retire()
        for slot in self._take_all_idle():
            self._discard(slot)

    def check(self) -> None:
        """Ping every idle connection now; discard and replace broken ones."""
        self._check_open()
        idle = deque(self._take_all_idle())
        try:
            while idle:
                slot = idle[0]
                slot.state = OUT
                try:
                    self._ping(slot.conn)
                except Exception as ex:
                    idle.popleft()
                    logger.warning("discarding broken connection in %r: %s", self.name, ex)
                    self.connections_lost += 1
                    self._discard(slot)
                    continue
                idle.popleft()
                slot.last_used = monotonic()
                self._release(slot)
        finally:
            # Interrupted (a gevent.Timeout, a kill): the connection being
            # pinged goes back through the return path, which cleans it if the
            # ping was cut short; the others go back unchecked.
            if idle and idle[0].state == OUT:
                self.release(idle.popleft())
            for slot in idle:
                self._release(slot, fresh=False)

    # -- stats -----------------------------------------------------------

    _COUNTERS = (
        "requests_num",
        "requests_queued",
        "requests_errors",
        "returns_bad",
        "returns_reset",
        "connections_num",
        "connections_ms",
        "connections_errors",
        "connections_lost",
    )

    def _reset_counters(self) -> None:
        self.requests_num = 0
        self.requests_queued = 0
        self._wait_total = 0.0  # seconds queued requests waited
        self.requests_errors = 0
        self.returns_bad = 0
        self.returns_reset = 0
        self.connections_num = 0
        self.connections_ms = 0
        self.connections_errors = 0
        self.connections_lost = 0
        self._usage = 0.0  # seconds connections spent lent

    def get_stats(self) -> dict[str, int]:
        """Return counters (psycopg_pool's keys) and immediate measures."""
        stats = {key: getattr(self, key) for key in self._COUNTERS}
        stats["usage_ms"] = int(self._usage * 1000)
        stats["requests_wait_ms"] = int(self._wait_total * 1000)
        stats.update(self._wait_times.percentiles(self.requests_num, self.requests_queued))
        stats.update(
            pool_min=self._min_size,
            pool_max=self._max_size,
            pool_size=len(self._slots) + len(self._todo) + self._inflight,
            pool_available=sum(len(seg.idle) for seg in self._segments),
            requests_waiting=len(self._waiters),
        )
        return stats

    def pop_stats(self) -> dict[str, int]:
        """Return the stats, then reset the counters and wait-time window."""
        stats = self.get_stats()
        self._reset_counters()
        self._wait_times.clear()
        return stats
