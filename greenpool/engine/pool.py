"""The pool engine: connections made by a driver, lent to greenlets and threads.

The engine knows no database driver: each pool is given a `Driver` (see
`greenpool.engine.driver`). This module holds the pool proper, its lifecycle
and the hot path, checkout and check-in, kept together so that a checkout is
as few calls as it can be:

- A caller takes an idle connection from the idle bag (`greenpool.engine.idle`).
  One that finds none joins one FIFO queue and is handed the next connection
  that comes back or is created.
- The accept handshake: a request waits in the queue until, under the pool
  lock, exactly one of these happens: a check-in takes it off the queue and
  sets its `slot`; it takes itself off the queue when it gives up; the pool
  closes or fails it. So a connection is never handed to a request that gave
  up, and a request that gave up never loses one handed to it.
- No lock is held across a driver call, network I/O or a greenlet switch:
  slots are reserved under a lock, connections are made, checked, cleaned
  and closed outside it, in the background (`greenpool.engine.connector`,
  `greenpool.engine.housekeeper`).
"""

from __future__ import annotations

import os
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any, Generic, TypeVar

from .._runtime.executor import Executor
from .._runtime.hub import INFINITY, allocate_lock, get_thread_ident, getcurrent, gevent_hub, sleep
from .._runtime.timer import DeadlineTimer
from .._runtime.waiters import CANCELLED, Failed, GreenRequest, ThreadRequest
from . import instances, options
from .connector import BACKOFF_FIRST, Connector
from .driver import BROKEN, DIRTY, OK, Driver
from .events import describe, fire
from .housekeeper import Housekeeper
from .idle import GONE, IDLE, OUT, IdleBag, Slot
from .stats import PoolStats, WaitTimes

C = TypeVar("C")


class Pool(PoolStats[C], Housekeeper[C], Connector[C], Generic[C]):
    """A driver-agnostic pool of connections for greenlets and threads.

    `driver` makes, tests, cleans and closes the connections; the options
    are the pool's (docs/configuration.md gives each one's meaning). An
    adapter (the psycopg pool) may subclass it to add its own API; the
    class attributes `PoolTimeout`, `PoolClosed` and `TooManyRequests` name
    the error classes it raises, and an adapter may set its own subclasses
    of `greenpool.errors`' classes there.
    """

    _num_pool = 0
    _num_made = 0

    def __init__(
        self,
        driver: Driver[C],
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
        retain_idle: bool = True,
    ) -> None:
        if not isinstance(driver, Driver):
            raise TypeError(f"driver must be a greenpool.engine.Driver, got {driver!r}")
        self.driver = driver
        # Read on every checkout and return: one attribute, not two.
        self._status = driver.status
        overridden = type(driver).checkout_status is not Driver.checkout_status
        self._checkout_status = driver.checkout_status if overridden else driver.status
        self._min_size, self._max_size = options.sizes(min_size, max_size)
        self.timeout = options.positive("timeout", timeout)
        self.max_waiting = options.count("max_waiting", max_waiting, 0)
        self.max_lifetime = options.positive("max_lifetime", max_lifetime, allow_zero=False)
        self.lifetime_jitter = options.positive("lifetime_jitter", lifetime_jitter)
        if not self.lifetime_jitter < 1:
            raise ValueError(f"lifetime_jitter must be in [0, 1), got {lifetime_jitter!r}")
        self.max_idle = options.positive("max_idle", max_idle)
        self.reconnect_timeout = options.positive("reconnect_timeout", reconnect_timeout)
        options.callable_or_none("reconnect_failed", reconnect_failed)
        self._reconnect_failed = reconnect_failed
        self.num_workers = options.count("num_workers", num_workers, 1)
        options.count("segments", segments, 1)
        options.callable_or_none("check", check)
        self._check = check
        self.check_idle = options.positive("check_idle", check_idle)
        if leak_threshold is not None:
            leak_threshold = options.positive("leak_threshold", leak_threshold, allow_zero=False)
        self.leak_threshold = leak_threshold
        if not isinstance(retain_idle, bool):
            raise TypeError(f"retain_idle must be True or False, got {retain_idle!r}")
        # Keep returned connections for reuse; a "null" pool closes them.
        self._retain_idle = retain_idle

        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {name!r}")
        Pool._num_made += 1
        self._serial = Pool._num_made  # the order pools were made in, for exporters
        if not name:
            Pool._num_pool += 1
            name = f"pool-{Pool._num_pool}"
        self.name = name

        self._lock = allocate_lock()
        self._idle = IdleBag(segments)
        self._waiters = deque()
        # One DeadlineTimer per hub whose greenlets queue here; the last one
        # used is kept at hand (the common case is a single hub), as one
        # (hub, timer) pair: threads with hubs of their own read and replace
        # it at once, never one half of each.
        self._timers = weakref.WeakKeyDictionary()
        self._last_timer = (None, None)
        self._slots = set()  # live connections
        # Reserved connects: None to grow, or the Slot being replaced.
        self._todo = deque()
        self._connecting = 0  # connector jobs running
        self._inflight = 0  # reservations taken from _todo, being connected
        self._cleaning = 0  # returned connections being cleaned in the background
        # Forgotten connections not closed yet: the server still has them,
        # and max_size caps what it has.
        self._closing = 0
        # Background jobs update the counters above only in the epoch they
        # were started in: a forked child starts a new one (`forget_all()`).
        self._epoch = 0
        self._failing_since = None
        self._last_error = None
        self._last_failure = 0.0  # when the last failed connect ended
        self._outage_attempts = 0
        self._outage_lost = 0
        self._retry_delay = BACKOFF_FIRST  # the next failure's backoff
        self._probing = False  # a request's probe was started, and has not begun its connect
        # Bumped by a probe: the connector sleeping out its backoff then stops.
        self._backoff_generation = 0
        self._reconnect_reported = False
        self._connect_ewma = 0.05  # seconds, seeds replacement lead times
        self._drains = 0  # drain() calls: a connect begun before one is stale

        self._opened = False
        self._closed = True
        self._executor = None
        self._pid = os.getpid()  # of the process the pool's background jobs run in

        self._wait_times = WaitTimes()
        self._reset_counters()
        instances.add(self)  # for metrics exporters (greenpool.integrations.prometheus)

    # -- sizes and state -------------------------------------------------

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
        options.positive("timeout", timeout)  # here, not only when it is used
        with self._lock:
            if self._closed and self._opened:
                raise self.PoolClosed(f"the pool {self.name!r} was closed and cannot be reopened")
            starting = self._closed
            if starting:
                self._pid = os.getpid()
                self._executor = executor = Executor(self.driver.hub_bound)
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
        timeout = options.positive("timeout", timeout)
        try:
            ready = self.wait_ready(timeout)
        except self.PoolTimeout:  # a permanent error: say so now
            self.close()
            raise
        if not ready:
            self.close()
            raise self.PoolTimeout(
                f"pool initialization incomplete after {timeout} sec" + self._error_suffix()
            ) from self._last_error

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Block until `min_size` connections are ready, or `timeout` seconds pass.

        Return whether they are ready. Unlike `wait()`, the pool stays open
        either way (its connects go on in the background).
        """
        self._check_open()
        timeout = options.positive("timeout", timeout)
        deadline = monotonic() + timeout
        step = 0.001
        while len(self._slots) < self._min_size:
            if self._closed:
                raise self.PoolClosed(f"the pool {self.name!r} is closed")
            error = self._last_error
            if error is not None and self.driver.is_permanent(error):
                # No point waiting out the timeout: say what to fix now.
                raise self.PoolTimeout(f"the pool {self.name!r} can't connect" + describe(error)) from error
            if monotonic() >= deadline:
                return False
            sleep(step)
            step = min(step * 2, 0.05)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: fail waiting and future requests with `PoolClosed`.

        Idle connections are closed now; lent ones when they come back, and
        those being made as soon as they are. Nothing waits for that:
        `timeout` (psycopg_pool's wait for its worker threads) is checked,
        then unused.
        """
        options.positive("timeout", timeout)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiters)
            self._waiters.clear()
            self._todo.clear()
            for req in waiting:
                req.slot = CANCELLED
        for req in waiting:
            req.fire()
        for slot in self._idle.take_all():
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
            timeout = options.seconds_left(timeout)
        self.requests_num += 1
        now = monotonic()
        # Don't overtake queued requests: FIFO fairness.
        if not self._waiters:
            slot = self._idle.pop()
            while slot is not None:
                if self._lend(slot, now):
                    return slot
                slot = self._idle.pop()
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
                req = GreenRequest(hub)
                req.deadline = deadline  # before it's queued: _expire_due reads it
            req.slot = None
            req.since = start  # an attempt to connect begun before can't fail it
            lock = self._lock
            first = None  # set once the request is past `_refuse()`
            probe = False
            # Queued inside the `try`: an exception raised into this greenlet
            # (a KeyboardInterrupt) as soon as the request is queued must not
            # leave it there, to be handed a connection no one takes.
            try:
                lock.acquire()
                try:
                    if self._closed or self.max_waiting or fail_if_full or self._failing_since is not None:
                        probe = self._refuse(fail_if_full)
                    waiters = self._waiters
                    first = not waiters
                    waiters.append(req)
                finally:
                    lock.release()
                if probe:
                    self._start_probe()
                if not queued:
                    self.requests_queued += 1
                # A full pool's slots alone reach max_size: one len() says so.
                if len(self._slots) < self._max_size and self._planned() < self._max_size:
                    self._fill()
                if first:
                    # A connection parked idle while the queue was empty: its
                    # returner saw no one to hand it to. Behind another request
                    # there is none such (see `_park`), so only the first looks.
                    for seg in self._idle.segments:
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
            failed = type(slot) is Failed  # by close(), or by a connect's error
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
                    what = f"the pool {self.name!r} has no connection" + (describe(error) if error else "")
                else:
                    error = self._last_error
                    what = f"couldn't get a connection after {timeout:.2f} sec" + self._error_suffix()
                    self.requests_timeouts += 1
                    fire(self, "request_timed_out", now - start)
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

    def _refuse(self, fail_if_full: bool) -> bool:
        """Raise if a request may not queue; return whether it must start a probe (under the lock).

        While every connect fails and nothing is alive, a request waits for a
        connect attempt made (or under way) since it came: it never fails on
        older evidence, which may be stale (the server back, a replica
        promoted). See `greenpool.engine.connector.PROBE_INTERVAL`.
        """
        self._check_open()
        waiting = len(self._waiters)
        if self.max_waiting and waiting >= self.max_waiting:
            self.requests_errors += 1
            raise self.TooManyRequests(f"the pool {self.name!r} has already {waiting} requests waiting")
        if fail_if_full and self.full():
            self.requests_errors += 1
            raise self.TooManyRequests(f"the pool {self.name!r} has {self._max_size} connections in use")
        return self._probe_due_locked()

    def full(self) -> bool:
        """Whether a request queued now waits for a connection in use (none can be made for it).

        Each request queued takes a pending connect or the next returned
        connection; what's left of `max_size` would be made for this one.
        Connections being cleaned after their return count as free.
        """
        return len(self._slots) - self._cleaning + len(self._waiters) >= self._max_size

    def _cancel(self, req: Any) -> Slot[C] | None:
        """Settle the handshake: return the handed slot, or mark cancelled."""
        with self._lock:
            slot = req.slot
            if slot is None:
                req.slot = CANCELLED
                try:
                    self._waiters.remove(req)  # rare: no need for O(1)
                except ValueError:
                    pass  # interrupted before it was queued
        return None if type(slot) is Failed else slot

    def _lend(self, slot: Slot[C], now: float) -> bool:
        """Lend `slot` if the local checks (and the `check` callback) pass.

        Otherwise discard it (its replacement is on the way) and return False.
        """
        if now >= slot.expire_at:
            self._discard(slot, reason=slot.end_reason())
            return False
        # `taken_at` first: `close_lent()` in another thread must never see
        # this lending with the last one's time.
        slot.taken_at = now
        slot.state = OUT
        if slot.handed_fresh:
            slot.handed_fresh = False
        elif self._checkout_status(slot.conn) == BROKEN:
            self.connections_lost += 1
            fire(self, "connection_lost", "closed while idle", None)
            self._discard(slot, reason="broken")
            return False
        if self._check is not None and now - slot.last_used >= self.check_idle:
            try:
                self._check(slot.conn)
            except Exception as ex:
                self.connections_lost += 1
                fire(self, "connection_lost", "failed check", ex)
                self._discard(slot, reason="broken")
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

        `status` is the connection's `driver.status()` if the caller just read it.
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
            fire(self, "connection_lost", "broken at return", None)
            self._discard(slot, reason="broken")
        elif status == DIRTY:
            self.returns_reset += 1
            with self._lock:
                self._cleaning += 1
                epoch = self._epoch
            assert self._executor is not None
            self._executor.submit(self._clean_then_release, slot, epoch)
        else:  # OK, and expired or retired
            self._discard(slot, reason=slot.end_reason())

    def _clean_then_release(self, slot: Slot[C], epoch: int) -> None:
        busy = False  # returned with a query running: a failed clean-up closes it as "returned_active"
        try:
            busy = self.driver.busy(slot.conn)
            self.driver.clean(slot.conn)
        except Exception as ex:
            self.returns_bad += 1
            fire(self, "connection_lost", "failed reset", ex)
            self._discard(slot, reason="returned_active" if busy else "broken")
            return
        except BaseException:
            # Killed or timed out mid-reset: the connection's state is
            # unknown, and the slot would otherwise stay counted for good.
            self.returns_bad += 1
            self._discard(slot, reason="returned_active" if busy else "broken")
            raise
        finally:
            with self._lock:
                if self._epoch == epoch:
                    self._cleaning -= 1
        slot.last_used = monotonic()
        if slot.last_used >= slot.expire_at:
            self._discard(slot, reason=slot.end_reason())
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
        segments = self._idle.segments
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
            for idle in self._idle.take_all():
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

    def _hand_locked(self, slot: Slot[C], fresh: bool = False) -> Any:
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
                slot = self._idle.pop()
                if slot is None:
                    break
                if slot.state != GONE:  # see `_release`
                    handed.append(self._hand_locked(slot))
        for req in handed:
            req.fire()

    # -- maintenance API -------------------------------------------------

    def set_max_lifetime(self, max_lifetime: float) -> None:
        """Change `max_lifetime`: live connections draw their lifetime anew.

        A connection already older than its new lifetime is replaced as if
        it had expired.
        """
        self.max_lifetime = options.positive("max_lifetime", max_lifetime, allow_zero=False)
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
        self._lent_closed += 1  # a lending that ends without a return (the metrics' count of returns)
        self._discard(slot, close_now=True)

    def close_idle(self) -> int:
        """Close every idle connection now; return how many.

        Those being cleaned after their return are closed once cleaned.
        """
        with self._lock:
            for slot in self._slots:
                if slot.state == IDLE:  # parked, or in a cleaner's hands
                    slot.retire()
        idle = self._idle.take_all()
        for slot in idle:
            self._discard(slot)
        return len(idle)

    def close_lent(self, older_than: float) -> list[Slot[C]]:
        """Close connections lent more than `older_than` seconds ago, in use or not.

        Their borrowers' next use fails; returning them is then a no-op for
        the caller to handle. Return the slots closed.
        """
        cutoff = monotonic() - options.positive("older_than", older_than)
        with self._lock:
            # Marked GONE as they are found: a borrower giving one back
            # meanwhile sees it is not the pool's any more (`_unlent()`).
            stale = [s for s in self._slots if s.state == OUT and s.taken_at <= cutoff]
            for slot in stale:
                self._forget_locked(slot)
            self._lent_closed += len(stale)
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
            self._idle.renew_locks()
        self._idle.take_all()
        with self._lock:
            for slot in self._slots:
                if slot.state == OUT:
                    self._lent_closed += 1
                slot.state = GONE
            self._slots.clear()
            if forked:
                self._epoch += 1
                self._todo.clear()
                self._inflight = self._connecting = self._cleaning = self._closing = 0
                self._probing = False
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
        min_size, max_size = options.sizes(min_size, max_size)
        with self._lock:
            self._min_size, self._max_size = min_size, max_size
            excess = self._planned(closing=False) - max_size
            while excess > 0 and self._todo:
                called_off = self._todo.pop()
                if called_off is not None:
                    called_off.replacing = False  # the housekeeper sees to it again
                excess -= 1
            # Idle ones first (False sorts first).
            surplus = sorted(self._slots, key=lambda slot: slot.state != IDLE)[: max(excess, 0)]
            for slot in surplus:
                slot.retire("resize")
        for slot in surplus:
            self._discard_if_idle(slot)
        self._fill()

    def drain(self) -> None:
        """Replace every connection: idle ones now, lent ones on return.

        Connections being made when it is called are closed and made again.
        """
        self._check_not_closed()
        with self._lock:
            self._retire_all_locked(None)
        self._discard_idle()

    def _discard_idle(self) -> None:
        """Close the idle connections (in the background); a new one may replace each."""
        for slot in self._idle.take_all():
            self._discard(slot, reason=slot.retired_for)

    def _retire_all_locked(self, reason: str | None) -> None:
        """A new generation: retire every connection (for `reason`), and those being made (under the lock)."""
        self._drains += 1
        for slot in self._slots:
            slot.retire(reason)

    def failover(self, slot: Slot[C] | None = None, error: BaseException | None = None) -> bool:
        """The server is no longer the primary: replace every connection made before now.

        As `drain()` (idle connections now, lent ones when they come back,
        those being made made again), counted in the stats' `failovers`.
        `slot` is the connection whose `error` said so (see
        `Driver.is_failover()`); one made after an earlier failover was
        declared (a replacement already) does nothing, so a burst of errors
        from one server counts once. Return whether it was declared.
        """
        with self._lock:
            if self._closed or (slot is not None and slot.generation != self._drains):
                return False
            self.failovers += 1
            self._retire_all_locked("failover")
        fire(self, "failover", error)
        self._discard_idle()
        return True

    def check(self) -> None:
        """Ping every idle connection now; discard and replace broken ones."""
        self._check_open()
        idle = deque(self._idle.take_all())
        try:
            while idle:
                slot = idle[0]
                slot.state = OUT
                try:
                    self.driver.ping(slot.conn)
                except Exception as ex:
                    idle.popleft()
                    self.connections_lost += 1
                    fire(self, "connection_lost", "failed ping", ex)
                    self._discard(slot, reason="broken")
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
