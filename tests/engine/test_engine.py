"""Pool-logic unit tests of the engine with a fake in-memory driver.

These check the engine's own rules (validation, FIFO handoff, the accept
handshake, lifetimes, replacement, shrinking, failure handling) in
isolation. Everything a user runs against a server is tested against the
real PostgreSQL in the test_pg_* modules.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable

import gevent
import pytest
from fake_driver import FakeConn, FakeDriver, FakePool, make_pool
from helpers import wait_until

from greenpool import errors
from greenpool.engine import DIRTY, OK


@pytest.fixture
def pool():
    p = make_pool(min_size=2, max_size=2, timeout=2)
    yield p
    p.close()


def idle_conns(p: FakePool) -> set[FakeConn]:
    """The pool's idle connections, seen through its public `check()`: it
    pings each (the fake driver records them) and parks it again."""
    p.driver.pinged.clear()
    p.check()
    return set(p.driver.pinged)


class StatusThen(FakeDriver):
    """A fake driver that, once, runs `then()` right after a status read: what
    another thread could do just then."""

    then: Callable[[], None] | None = None

    def status(self, conn: FakeConn) -> int:
        status = super().status(conn)
        then, self.then = self.then, None
        if then is not None:
            then()
        return status


# -- validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"min_size": -1}, "min_size"),
        ({"min_size": 4, "max_size": 2}, "max_size"),
        ({"min_size": 0, "max_size": 0}, "max_size"),
        ({"min_size": 1.5}, "min_size"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"max_lifetime": 0}, "max_lifetime"),
        ({"max_lifetime": -5}, "max_lifetime"),
        ({"max_idle": -1}, "max_idle"),
        ({"timeout": "5"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"lifetime_jitter": "0.1"}, "lifetime_jitter"),
        ({"max_size": "8"}, "max_size"),
        ({"max_waiting": None}, "max_waiting"),
        ({"num_workers": 2.0}, "num_workers"),
        ({"segments": "2"}, "segments"),
        ({"lifetime_jitter": 1.0}, "lifetime_jitter"),
        ({"lifetime_jitter": -0.1}, "lifetime_jitter"),
        ({"reconnect_timeout": -1}, "reconnect_timeout"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"num_workers": 0}, "num_workers"),
        ({"segments": 0}, "segments"),
        ({"check": 42}, "check"),
        ({"reconnect_failed": "x"}, "reconnect_failed"),
        ({"check_idle": -1}, "check_idle"),
        ({"leak_threshold": 0}, "leak_threshold"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, param):
    with pytest.raises((ValueError, TypeError), match=param):
        FakePool(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"timeout": True}, TypeError),
        ({"segments": 2.0}, TypeError),
        ({"max_waiting": "1"}, TypeError),
        ({"num_workers": 0}, ValueError),
        ({"timeout": -1}, ValueError),
    ],
)
def test_wrong_types_are_type_errors_wrong_values_value_errors(kwargs, error):
    with pytest.raises(error):
        FakePool(**kwargs)


@pytest.mark.parametrize("timeout, error", [(float("nan"), ValueError), ("1", TypeError), (True, TypeError)])
def test_bad_acquire_timeout_is_refused_before_queueing(pool, timeout, error):
    held = [pool.acquire(), pool.acquire()]
    with pytest.raises(error, match="timeout must be"):
        pool.acquire(timeout=timeout)
    assert pool.get_stats()["requests_waiting"] == 0
    for s in held:
        pool.release(s)


@pytest.mark.parametrize("timeout", [-1, 0])
def test_a_timeout_already_past_takes_an_idle_connection_or_times_out_at_once(pool, timeout):
    """A budget already spent (`deadline - now` < 0) is a timeout, as in
    psycopg_pool, not a ValueError; an idle connection is still taken."""
    slot = pool.acquire(timeout=timeout)
    held = pool.acquire()
    t0 = time.monotonic()
    with pytest.raises(errors.PoolTimeout, match="after 0.00 sec"):
        pool.acquire(timeout=timeout)
    assert time.monotonic() - t0 < 1
    for s in (slot, held):
        pool.release(s)


@pytest.mark.parametrize("method", ["open", "close"])
def test_open_and_close_check_their_timeout_even_when_unused(method):
    p = FakePool(min_size=1)
    with pytest.raises(TypeError, match="timeout must be a number"):
        getattr(p, method)(timeout="x")
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        getattr(p, method)(timeout=-1)
    assert p.closed


def test_wait_percentiles_are_there_before_any_request(pool):
    pool.pop_stats()
    stats = pool.get_stats()
    assert stats["requests_num"] == 0
    assert {k: v for k, v in stats.items() if k.startswith("requests_wait_")} == {
        "requests_wait_ms": 0,
        "requests_wait_p50_us": 0,
        "requests_wait_p90_us": 0,
        "requests_wait_p99_us": 0,
        "requests_wait_max_us": 0,
    }


def test_closed_pool_refuses_everything(pool):
    slot = pool.acquire()
    pool.close()
    with pytest.raises(errors.PoolClosed):
        pool.acquire()
    with pytest.raises(errors.PoolClosed):
        pool.open()
    pool.release(slot)  # a lent connection comes back and is closed
    assert slot.conn.closed


def test_not_open_yet():
    p = FakePool(min_size=1)
    with pytest.raises(errors.PoolClosed, match="not open"):
        p.acquire()


def test_release_twice_is_an_error_and_pool_stays_intact(pool):
    slot = pool.acquire()
    pool.release(slot)
    with pytest.raises(ValueError, match="not lent"):
        pool.release(slot)
    slots = [pool.acquire(), pool.acquire()]
    assert len({s.conn.id for s in slots}) == 2
    for s in slots:
        pool.release(s)


@pytest.mark.parametrize("give_back", ["release", "discard"])
def test_giving_back_a_connection_closed_while_lent_does_nothing(pool, give_back):
    """`close_lent()` may close a connection (Peewee's `close_stale()` in
    another thread) just as its borrower gives it back: no error, and the
    closed connection reaches no one."""
    slot = pool.acquire()
    held = pool.acquire()
    waiter = gevent.spawn(pool.acquire, timeout=5)
    gevent.sleep(0.01)  # queued: the next good return is handed to it
    assert set(pool.close_lent(0)) == {slot, held}
    getattr(pool, give_back)(slot)
    pool.release(held)
    handed = waiter.get(timeout=5)  # a replacement
    assert handed.conn not in (slot.conn, held.conn) and not handed.conn.closed
    pool.release(handed)


@pytest.mark.parametrize("status", [OK, DIRTY])
def test_a_return_racing_close_lent_parks_nothing(status):
    """`close_lent()` in another thread may close a connection after its
    borrower's `release()` found it lent: the return must not mark it idle
    again and park it (it would be lent on, closed under its next borrower),
    nor clean it."""
    pool = FakePool(StatusThen(), min_size=2, max_size=2, timeout=2)
    pool.open(wait=True, timeout=5)
    slot = pool.acquire()
    slot.conn.status = status

    def closed_by_another_thread() -> None:
        assert pool.close_lent(0) == [slot]

    pool.driver.then = closed_by_another_thread  # after the return read the status
    pool.release(slot)
    assert slot.state == "gone"
    assert slot.conn not in idle_conns(pool)
    assert pool.get_stats().get("returns_reset", 0) == 0
    taken = [pool.acquire(), pool.acquire()]
    assert slot not in taken and not any(s.conn.closed for s in taken)
    for s in taken:
        pool.release(s)
    pool.close()


def _release_all(pool, slots):
    for slot in slots:
        pool.release(slot)


@pytest.mark.slow
def test_returns_racing_close_lent_in_threads_park_no_closed_slot():
    """The same race with real threads: `close_lent()` picks and marks lent
    slots under the lock while a thread returns them; none may end up both
    closed and parked idle (it would be lent on). 3 % of the runs did."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(200):
            p = FakePool(min_size=200, max_size=200, timeout=1)
            p.open(wait=True)
            slots = [p.acquire() for _ in range(200)]
            for slot in slots:
                slot.taken_at -= 10
            returner = threading.Thread(target=functools.partial(_release_all, p, slots))
            returner.start()
            closed = p.close_lent(1)
            returner.join()
            assert all(s.state == "gone" for s in closed)  # none marked idle again...
            assert not idle_conns(p) & {s.conn for s in closed}  # ... nor parked
            p.close()
    finally:
        sys.setswitchinterval(switch_interval)


# -- waiting ----------------------------------------------------------------


def test_timeout_when_exhausted(pool):
    held = [pool.acquire(), pool.acquire()]
    t0 = time.monotonic()
    with pytest.raises(errors.PoolTimeout):
        pool.acquire(timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    for s in held:
        pool.release(s)
    assert pool.get_stats()["requests_errors"] == 1


def test_each_waiter_times_out_at_its_own_deadline(pool):
    """Greenlets share one deadline timer per hub: a later request with a
    shorter timeout must not wait for the earlier, longer one."""
    held = [pool.acquire(), pool.acquire()]
    gave_up: dict[float, float] = {}

    def waiter(timeout: float) -> None:
        t0 = time.monotonic()
        with pytest.raises(errors.PoolTimeout):
            pool.acquire(timeout=timeout)
        gave_up[timeout] = time.monotonic() - t0

    greenlets = [gevent.spawn(waiter, timeout) for timeout in (1.2, 0.8, 0.4, 0.1)]
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    for timeout, waited in gave_up.items():
        assert timeout - 0.05 < waited < timeout + 0.35, (timeout, waited)
    assert pool.get_stats()["requests_waiting"] == 0
    for s in held:
        pool.release(s)


@pytest.mark.parametrize("how", ["greenlet", "main greenlet", "thread", "kill", "close"])
def test_no_timer_holds_the_hub_once_no_request_waits(how):
    """Once no request waits, the pool keeps nothing alive in the gevent
    loop, whoever served or cancelled the last one: `gevent.wait()` returns
    at once, not when the request's deadline passes.

    `gevent.wait()` waits for everything on the loop, so the test runs in a
    thread of its own, whose hub has a loop of its own: the main thread's
    default loop may carry what other tests left on it.
    """
    failures: list[BaseException] = []

    def body() -> None:
        try:
            _no_timer_holds_the_hub(how)
        except BaseException as exc:  # reported in the test's thread
            failures.append(exc)
        finally:
            gevent.get_hub().destroy(destroy_loop=True)

    runner = threading.Thread(target=body)
    runner.start()
    runner.join(30)
    assert not runner.is_alive()
    if failures:
        raise failures[0]


def _no_timer_holds_the_hub(how: str) -> None:
    p = make_pool(min_size=1, max_size=1, timeout=30)
    held = p.acquire()
    waiter = gevent.spawn(p.acquire, timeout=30)
    gevent.sleep(0.01)  # queued
    if how == "greenlet":
        gevent.spawn(p.release, held).join()
    elif how == "main greenlet":
        p.release(held)  # no hub in use here: the test's own greenlet
    elif how == "thread":
        releaser = threading.Thread(target=p.release, args=(held,))
        releaser.start()
        releaser.join()
    elif how == "kill":
        waiter.kill()
    else:
        p.close()
    gevent.joinall([waiter], timeout=2)
    assert waiter.ready()
    t0 = time.monotonic()
    assert gevent.wait(timeout=10)
    assert time.monotonic() - t0 < 2
    if how in ("kill", "close"):
        p.release(held)
    else:
        p.release(waiter.value)
    p.close()


def test_waiters_are_served_in_fifo_order(pool):
    held = [pool.acquire(), pool.acquire()]
    order: list[int] = []

    def waiter(i: int) -> None:
        slot = pool.acquire()
        order.append(i)
        gevent.sleep(0.001)
        pool.release(slot)

    greenlets = []
    for i in range(10):
        greenlets.append(gevent.spawn(waiter, i))
        gevent.sleep(0.001)  # queue them in a known order
    for s in held:
        pool.release(s)
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    assert order == list(range(10))


def test_max_waiting():
    p = make_pool(min_size=1, max_size=1, max_waiting=2, timeout=2)
    held = p.acquire()
    waiters = [gevent.spawn(lambda: p.release(p.acquire())) for _ in range(2)]
    gevent.sleep(0.01)
    with pytest.raises(errors.TooManyRequests):
        p.acquire()
    p.release(held)
    gevent.joinall(waiters, timeout=5, raise_error=True)
    p.close()


@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_interrupted_waiters_never_swallow_connections(pool, how):
    held = [pool.acquire(), pool.acquire()]

    def waiter() -> None:
        if how == "timeout":
            with gevent.Timeout(0.05, False):
                pool.release(pool.acquire())
        else:
            pool.release(pool.acquire())

    greenlets = [gevent.spawn(waiter) for _ in range(10)]
    gevent.sleep(0.02)
    if how == "kill":
        # Return a connection and kill its receiver before it runs: the
        # handshake must hand it on, not lose it.
        pool.release(held.pop())
        gevent.killall(greenlets)
    else:
        gevent.joinall(greenlets, timeout=5)
        pool.release(held.pop())
    pool.release(held.pop())
    stats = pool.get_stats()
    assert stats["pool_available"] == 2
    assert stats["requests_waiting"] == 0
    both = [pool.acquire(timeout=0.1), pool.acquire(timeout=0.1)]
    assert len({s.conn.id for s in both}) == 2


def test_connection_broken_while_idle_is_not_lent_after_an_interrupted_handoff():
    """A connection handed to a waiter that is killed before it runs goes
    back idle; if it breaks there, the next checkout must look at it again."""
    p = make_pool(min_size=1, max_size=1, timeout=2)
    held = p.acquire()
    waiter = gevent.spawn(p.acquire)
    gevent.sleep(0.02)
    waiter.kill(block=False)  # the kill reaches it before the wakeup below
    p.release(held)  # handed to the waiter, which hasn't run yet
    gevent.joinall([waiter], timeout=2)
    assert p.get_stats()["pool_available"] == 1
    held.conn.closed = True  # the server drops it while idle
    fresh = p.acquire(timeout=2)
    assert fresh.conn is not held.conn and not fresh.conn.closed
    p.release(fresh)
    p.close()


def test_failing_checks_count_against_the_timeout():
    def slow_failing_check(conn: FakeConn) -> None:
        gevent.sleep(0.4)
        raise RuntimeError("probe failed")

    p = make_pool(min_size=1, max_size=1, check=slow_failing_check, connect_delay=0.05)
    t0 = time.monotonic()
    with pytest.raises(errors.PoolTimeout):
        p.acquire(timeout=0.5)
    # The check ran once or twice, each fails: the wait still ends near 0.5 s,
    # not after the timeout plus the checks.
    assert time.monotonic() - t0 < 1.0
    p.close()


@pytest.mark.parametrize("check_idle, checked", [(10.0, 0), (0.0, 1)])
def test_check_skips_a_connection_handed_straight_from_a_return(check_idle, checked):
    """Like at any checkout, `check` runs only for a connection idle `check_idle` or more."""
    checks = []
    pool = make_pool(min_size=1, max_size=1, timeout=2, check=checks.append, check_idle=check_idle)
    holder = pool.acquire()
    checks.clear()
    waiter = gevent.spawn(pool.acquire)
    gevent.sleep(0.01)  # queued
    pool.release(holder)  # handed to the waiter
    slot = waiter.get(timeout=2)
    assert slot is holder and len(checks) == checked
    pool.release(slot)
    pool.close()


def test_affinity_returns_a_greenlets_own_connection():
    p = make_pool(min_size=8, max_size=8, segments=4)
    first = p.acquire()
    p.release(first)
    assert p.acquire().conn is first.conn
    p.close()


# -- lifetimes and maintenance ----------------------------------------------


def test_lifetimes_are_jittered_within_range():
    p = make_pool(min_size=50, max_size=50, max_lifetime=100, lifetime_jitter=0.3)
    lifetimes = [s.expire_at - s.created_at for s in [p.acquire() for _ in range(50)]]  # all of them
    assert all(70 <= life <= 100 for life in lifetimes)
    assert max(lifetimes) - min(lifetimes) > 10  # spread, not a cohort
    p.close()


def borrow_until(p: FakePool, deadline: float, hold: float) -> int:
    """Borrow a connection for `hold` seconds, over and over until `deadline`; return how many were lent expired."""
    expired = 0
    while time.monotonic() < deadline:
        slot = p.acquire(timeout=2)
        if time.monotonic() >= slot.expire_at:
            expired += 1
        gevent.sleep(hold)
        p.release(slot)
    return expired


def test_connections_are_replaced_before_they_expire():
    p = make_pool(min_size=5, max_size=5, max_lifetime=0.6, lifetime_jitter=0.2)
    first = set(p.driver.opened)
    assert borrow_until(p, time.monotonic() + 2.0, 0.005) == 0
    assert not first & idle_conns(p)  # all replaced (none is lent now)
    assert p.get_stats()["requests_queued"] == 0  # nobody ever waited for it
    p.close()


def test_close_idle_also_closes_what_is_being_cleaned():
    """A connection returned dirty is not in use while it is rolled back:
    close_idle() (Peewee's close_all()) closes it once clean, not parks it."""
    p = make_pool(min_size=0, max_size=2)
    slots = [p.acquire(), p.acquire()]
    slots[0].conn.status = DIRTY  # cleaned in the background (10 ms)
    for slot in slots:
        p.release(slot)
    assert p.close_idle() == 1
    wait_until(lambda: slots[0].conn.closed, 5, "the cleaned connection closed")
    assert p.get_stats()["pool_size"] == 0
    p.close()


def test_idle_surplus_is_closed_after_max_idle():
    p = make_pool(min_size=1, max_size=4, max_idle=0.3)
    held = [p.acquire() for _ in range(4)]
    for s in held:
        p.release(s)
    assert p.get_stats()["pool_size"] == 4
    deadline = time.monotonic() + 3
    while p.get_stats()["pool_size"] > 1 and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert p.get_stats()["pool_size"] == 1
    p.close()


def test_dirty_connections_are_cleaned_in_the_background(pool):
    slot = pool.acquire()
    slot.conn.status = DIRTY
    t0 = time.monotonic()
    pool.release(slot)
    assert time.monotonic() - t0 < 0.005  # the caller doesn't pay for it
    gevent.sleep(0.05)
    assert slot.conn.cleaned == 1
    assert pool.get_stats()["returns_reset"] == 1
    assert pool.get_stats()["pool_available"] == 2


def test_broken_connections_are_replaced(pool):
    slot = pool.acquire()
    slot.conn.closed = True
    pool.release(slot)
    gevent.sleep(0.05)
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert stats["pool_size"] == 2
    assert slot.state == "gone"  # not the pool's any more


def test_no_lock_across_a_slow_connect():
    p = make_pool(min_size=2, max_size=4, connect_delay=0.0)
    p.driver.connect_delay = 0.3
    p.resize(4, 4)  # two connects start in the background
    gevent.sleep(0.01)
    assert p.driver.connecting == 2
    slowest = 0.0
    t_start = time.monotonic()
    for _ in range(50):
        t0 = time.monotonic()
        slot = p.acquire(timeout=1)
        gevent.sleep(0)
        p.release(slot)
        slowest = max(slowest, time.monotonic() - t0)
    assert time.monotonic() - t_start < 0.2  # all done while connects run
    assert slowest < 0.05
    assert p.driver.connecting == 2
    p.wait(timeout=2)
    p.close()


def test_connect_failures_fail_fast_and_recover():
    p = make_pool(min_size=1, max_size=1)
    slot = p.acquire()
    p.driver.fail_connect = OSError("connection refused (fake)")
    slot.conn.closed = True
    p.release(slot)  # broken: replaced... but connects fail
    gevent.sleep(0.05)
    t0 = time.monotonic()
    with pytest.raises(errors.PoolTimeout, match="connection refused"):
        p.acquire(timeout=5)
    assert time.monotonic() - t0 < 1  # fail fast, not after 5 s
    assert p.get_stats()["connections_errors"] >= 1
    p.driver.fail_connect = None
    slot = acquire_once_recovered(p, within=3)  # back within one backoff period
    assert slot.conn.closed is False
    p.close()


def test_a_queued_request_failed_by_connects_says_so_not_that_it_timed_out():
    """A request queued while connects are still being tried, then failed when
    the last of them fails, says the pool has no connection (and why), not
    "after 5.00 sec": it didn't wait that long."""
    p = make_pool(min_size=0, max_size=1)
    p.driver.fail_connect = OSError("connection refused (fake)")
    p.driver.connect_delay = 0.2
    t0 = time.monotonic()
    with pytest.raises(errors.PoolTimeout) as info:
        p.acquire(timeout=5)
    assert time.monotonic() - t0 < 2
    assert f"the pool {p.name!r} has no connection: OSError: connection refused (fake)" == str(info.value)
    p.close()


def acquire_once_recovered(p: FakePool, within: float):
    """`p.acquire()` once connects succeed again: it fails fast until a
    connector's next try (after its backoff) recovers, at most `within` s."""
    deadline = time.monotonic() + within
    while True:
        try:
            return p.acquire(timeout=5)
        except errors.PoolTimeout:
            assert time.monotonic() < deadline
            gevent.sleep(0.05)


def test_one_failed_connect_fails_no_request_while_other_connects_are_under_way():
    """Fail fast only when nothing can come: with other connects in flight,
    one failure (a fluke, a configure callback's) fails no queued request."""

    class FirstConnectFails(FakeDriver):
        attempts = 0

        def connect(self) -> FakeConn:
            self.attempts += 1
            first = self.attempts == 1
            gevent.sleep(0.02 if first else 0.05)  # fails while the others are under way
            if first:
                raise OSError("the first connect fails (fake)")
            return super().connect()

    p = FakePool(FirstConnectFails(), min_size=0, max_size=3, timeout=5)
    p.open()
    requests = [gevent.spawn(p.acquire) for _ in range(3)]
    slots = [g.get(timeout=10) for g in requests]
    assert len({s.conn.id for s in slots}) == 3
    assert p.get_stats()["connections_errors"] == 1
    for slot in slots:
        p.release(slot)
    p.close()


def test_connects_failing_after_close_are_not_reported(caplog):
    caplog.set_level(logging.DEBUG, logger="greenpool")
    pool = make_pool(min_size=1, max_size=3, timeout=2)
    pool.driver.connect_delay = 0.05
    pool.resize(3, 3)  # two connects in flight
    gevent.sleep(0.01)
    pool.driver.fail_connect = ConnectionError("server gone")
    pool.close()
    gevent.sleep(0.1)
    assert [r for r in caplog.records if "server gone" in r.getMessage()]  # they did fail...
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # ...quietly
    assert pool.connections_errors == 2
    # ...and left no reservation behind for connections that will never be made.
    assert pool.get_stats()["pool_size"] == 0


def test_reconnect_failed_callback():
    called = []
    p = FakePool(min_size=1, reconnect_timeout=0.2, reconnect_failed=called.append)
    p.driver.fail_connect = OSError("down")
    p.open()
    deadline = time.monotonic() + 3
    while not called and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert called == [p]
    p.close()


def test_wait_reports_the_connection_error():
    p = FakePool(min_size=1)
    p.driver.fail_connect = OSError("no route to fake host")
    p.open()
    with pytest.raises(errors.PoolTimeout, match="no route to fake host"):
        p.wait(timeout=0.3)
    assert p.closed


def test_leaks_are_logged_with_the_taking_stack(caplog):
    p = make_pool(min_size=1, max_size=1, leak_threshold=0.1, max_lifetime=2)
    caplog.set_level(logging.WARNING, logger="greenpool")

    def leaky_function() -> None:
        p.acquire()

    leaky_function()
    deadline = time.monotonic() + 3
    while "leak_threshold" not in caplog.text and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert "leaky_function" in caplog.text
    p.close()


def test_drain_replaces_everything(pool):
    before = set(pool.driver.opened)
    held = pool.acquire()
    pool.drain()
    pool.release(held)
    pool.wait(timeout=2)
    now = [pool.acquire() for _ in range(pool.max_size)]  # all of them
    assert not before & {s.conn for s in now}
    for slot in now:
        pool.release(slot)


def test_drain_also_replaces_connections_being_made():
    p = make_pool(min_size=1, max_size=2, connect_delay=0.2)
    first = p.acquire()
    second = gevent.spawn(p.acquire)  # starts a 0.2 s connect
    gevent.sleep(0.05)
    opened_before = len(p.driver.opened)
    p.drain()  # e.g. peewee init() with another database
    p.release(first)
    slot = second.get(timeout=2)
    in_flight = p.driver.opened[opened_before]  # the connect running during drain()
    assert slot.conn is not in_flight and slot.conn is not first.conn
    assert in_flight.closed
    p.release(slot)
    p.close()


def test_resize_grows_the_pool(pool):
    pool.resize(4, 6)
    pool.wait(timeout=2)
    assert pool.get_stats()["pool_size"] == 4
    assert pool.max_size == 6


def test_resize_below_the_connections_calls_off_connects_and_retires_the_surplus():
    """A hard cap: after `resize()` to fewer connections, connects not begun
    are called off, idle surplus closes now and lent surplus on return."""
    p = make_pool(min_size=0, max_size=8, connect_delay=0.2, num_workers=2, timeout=5)
    held = p.acquire()  # made at once: the pool was empty
    waiters = [gevent.spawn(p.acquire) for _ in range(7)]
    gevent.sleep(0.05)  # 7 connects reserved, 2 of them under way
    p.resize(0, 2)
    gevent.joinall(waiters[:1], timeout=2)
    p.release(held)  # retired: over the cap with the connects in flight
    slots = [w.get(timeout=2) for w in waiters[:2]]
    assert p.get_stats()["pool_size"] <= 2  # made, lent and being made
    wait_until(lambda: held.conn.closed, what="the retired connection closed")
    for slot in slots:
        p.release(slot)
    gevent.sleep(0.5)
    assert len(p.driver.opened) <= 3  # the 7 waiters' connects: 2 already under way
    gevent.killall(waiters[2:])
    p.close()


def test_resize_and_drain_after_close_raise_pool_closed(pool):
    p = FakePool(min_size=1, max_size=1)
    p.resize(2, 2)  # configuring a pool not open yet is fine
    p.drain()
    pool.close()
    for call in (lambda: pool.resize(1, 1), pool.drain):
        with pytest.raises(errors.PoolClosed, match="is closed"):
            call()


def test_a_request_queued_again_counts_and_times_once():
    """A queued request whose handed connection fails its check queues
    again: it is still one queued request, and its wait is counted once."""
    checks = []

    def fail_second_check(conn):
        checks.append(conn)
        if len(checks) == 2:
            raise RuntimeError("broken")

    p = make_pool(min_size=1, max_size=1, timeout=5, check=fail_second_check)
    held = p.acquire()
    waiter = gevent.spawn(p.acquire)
    gevent.sleep(0.2)
    p.release(held)  # handed to the waiter, whose check fails: a new connect
    p.release(waiter.get(timeout=5))
    stats = p.get_stats()
    assert stats["requests_queued"] == 1
    assert 150 <= stats["requests_wait_ms"] < 350
    p.close()


def test_a_failed_connect_nothing_waits_for_is_not_retried_and_the_next_request_tries_again():
    """With min_size 0, a connect whose request got its error is not retried
    (it was, every second, for good); the next request makes its own attempt
    instead of failing fast on the old error."""
    p = make_pool(min_size=0, max_size=2, timeout=2)
    p.driver.fail_connect = OSError("db down")
    with pytest.raises(errors.PoolTimeout, match="db down"):
        p.acquire()
    wait_until(lambda: p.get_stats()["pool_size"] == 0, what="no connect left")  # and none made
    time.sleep(0.5)  # longer than the first backoff
    tried = p.get_stats()["connections_num"]
    assert tried == 1  # the request's own attempt: no retry for no one
    p.driver.fail_connect = None
    p.release(p.acquire())  # a connect of its own, which now works
    assert p.get_stats()["connections_num"] == tried + 1
    p.close()


_FORK_CHILD = """
import json, os
from greenpool.engine import Driver, Pool

class Fake(Driver):
    def connect(self):
        gevent.sleep(0.3)
        return object()
    def close(self, conn):
        pass
    def status(self, conn):
        return 0

pool = Pool(Fake(), min_size=0, max_size=2, timeout=5)
pool.open()  # before the patch: its jobs are threads, until the patch makes them greenlets
from gevent import monkey; monkey.patch_all()
import gevent

gevent.spawn(pool.acquire, 5)
gevent.sleep(0.1)  # its connect, a greenlet of the main hub, is under way
read, write = os.pipe()
if os.fork() == 0:
    pool.forget_all()
    gevent.sleep(0.5)  # the copied connect ends
    takers = [gevent.spawn(pool.acquire, 2) for _ in range(3)]
    gevent.sleep(1)
    # Private: the background jobs' counters, which no stats report (they
    # leave out connector jobs, cleanings and closings): what the bug broke.
    counters = [pool._inflight, pool._connecting, pool._cleaning, pool._closing]
    os.write(write, json.dumps({"counters": counters, "slots": pool.get_stats()["pool_size"]}).encode())
    os._exit(0)
os.close(write)
print(os.read(read, 1000).decode())
"""


def test_a_fork_leaves_the_childs_counters_to_its_own_jobs(run_python):
    """Jobs copied by a fork (greenlets of a pool opened before the patch,
    which `forget_all()` counted as lost threads) drove the child's
    counters below zero, and the pool over max_size."""
    proc = run_python(_FORK_CHILD, env={"GREENPOOL_TEST_DSN": ""}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"counters": [0, 0, 0, 0], "slots": 2}, result


def test_failed_connects_keep_their_backoff_under_load():
    """Requests queuing while a connect fails leave connects of their own to
    make: they must wait for the backoff too, not follow each other at once
    (thousands of attempts a second at a down server)."""
    p = make_pool(min_size=0, max_size=4, timeout=0.3)
    p.driver.fail_connect = OSError("db down")

    def hammer() -> None:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                p.release(p.acquire())
            except errors.PoolTimeout:
                pass

    gevent.joinall([gevent.spawn(hammer) for _ in range(8)], timeout=10)
    assert p.get_stats()["connections_errors"] <= 15  # backoff 0.1 s doubling to 1 s
    p.close()


def test_a_connect_failure_no_one_retries_leaves_a_healthy_pool():
    """A failed connect dropped because no one waits for it any more leaves
    no "failing" state behind: no `reconnect_failed` call, no old error in
    a later timeout, no `failing` for Peewee to act on."""
    reported = []
    p = make_pool(min_size=1, max_size=2, timeout=5, reconnect_timeout=1, reconnect_failed=reported.append)
    held = p.acquire()
    p.driver.fail_connect = OSError("db down")
    with pytest.raises(errors.PoolTimeout):
        p.acquire(timeout=0.2)  # its connect fails meanwhile
    p.driver.fail_connect = None
    wait_until(lambda: not p.failing, timeout=5, what="the pool healthy again")
    time.sleep(1.5)  # past reconnect_timeout
    assert reported == []
    second = p.acquire()  # the pool full: the next request times out
    with pytest.raises(errors.PoolTimeout) as info:
        p.acquire(timeout=0.1)
    assert info.value.__cause__ is None and "db down" not in str(info.value)
    p.release(held)
    p.release(second)
    p.close()


_HUB_BOUND_WORKER_CHILD = """
import json
from gevent import monkey; monkey.patch_all()
import gevent, gevent.threadpool
from greenpool.engine import BROKEN, Driver, Pool

class HubBound(Driver):
    hub_bound = True  # as Peewee's pymysql
    def connect(self):
        return {"status": 0}
    def close(self, conn):
        pass
    def status(self, conn):
        return conn["status"]

pool = Pool(HubBound(), min_size=0, max_size=1, timeout=2)
pool.open()
pool.release(pool.acquire())

def in_worker():
    slot = pool.acquire(1)
    slot.conn["status"] = BROKEN  # the server went away meanwhile
    pool.release(slot)  # its close job must not wait for this worker's hub

gevent.threadpool.ThreadPool(1).spawn(in_worker).get()
gevent.sleep(0.5)
try:
    pool.release(pool.acquire(2))
    outcome = "ok"
except Exception as ex:
    outcome = repr(ex)
# Private: closes under way, which count against max_size and which no stats
# report; a count left wrong shows publicly only later, or not at all.
print(json.dumps({"outcome": outcome, "closing": pool._closing}))
"""


def test_hub_bound_jobs_of_a_thread_pool_worker_dont_wait_for_its_hub(run_python):
    """A worker of gevent's thread pool runs its hub only while it waits:
    jobs a hub-bound pool (Peewee's pymysql) spawned there never ran, and
    the connection they were closing counted against max_size for good."""
    proc = run_python(_HUB_BOUND_WORKER_CHILD, env={"GREENPOOL_TEST_DSN": ""}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"outcome": "ok", "closing": 0}


# -- plain threads ----------------------------------------------------------


def test_plain_threads_share_the_pool():
    p = FakePool(min_size=4, max_size=4, timeout=10)
    p.open(wait=True)
    errors_seen: list[BaseException] = []
    in_use = set()
    peak = [0]
    guard = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(200):
                slot = p.acquire()
                with guard:
                    assert slot.conn.id not in in_use
                    in_use.add(slot.conn.id)
                    peak[0] = max(peak[0], len(in_use))
                time.sleep(0.0001)
                with guard:
                    in_use.discard(slot.conn.id)
                p.release(slot)
        except BaseException as ex:  # pragma: no cover - reported below
            errors_seen.append(ex)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors_seen
    assert peak[0] <= 4
    stats = p.get_stats()
    assert stats["pool_available"] == 4
    assert stats["requests_num"] == 16 * 200
    p.close()


def test_a_greenlet_waiting_without_deadline_gets_a_connection_back_from_a_thread():
    """`timeout=inf` in an unpatched program, the only connection held by a
    plain thread: its return wakes the hub from the other thread, which
    alone doesn't keep the loop running. The wait must hold the loop, not
    end in LoopExit (and lose the connection to the dead request)."""
    p = make_pool(min_size=1, max_size=1, timeout=10)
    taken = threading.Event()

    def holder() -> None:
        slot = p.acquire()
        taken.set()
        time.sleep(0.3)
        p.release(slot)

    thread = threading.Thread(target=holder)
    thread.start()
    assert taken.wait(5)
    slot = gevent.spawn(p.acquire, timeout=float("inf")).get()  # no timer of its own holding the loop
    thread.join(5)
    p.release(slot)
    assert p.get_stats()["pool_available"] == 1
    p.close()


def test_jobs_for_a_thread_whose_hub_doesnt_run_run_in_threads():
    """A pool opened in a greenlet, then used from the main greenlet of the
    same (unpatched) thread, which blocks the thread while it waits: the
    connect it waits for, and the cleaning of what it returns, can't run in
    that thread's hub. Nor in the hub of a thread that has ended."""
    p = gevent.spawn(make_pool, min_size=0, max_size=2, timeout=3).get()
    try:
        slot = p.acquire()  # grows the pool: the connect runs in a thread
        slot.conn.status = DIRTY
        p.release(slot)  # cleaned in a thread
        deadline = time.monotonic() + 5
        while p.get_stats()["pool_available"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slot.conn.cleaned == 1
    finally:
        p.close()

    opened: list[FakePool] = []
    opener = threading.Thread(target=lambda: opened.append(gevent.spawn(make_pool, min_size=0, max_size=2).get()))
    opener.start()
    opener.join(10)
    user_ran: list[int] = []

    def user() -> None:  # greenlets of a thread with a hub of its own
        def borrow() -> None:
            slot = opened[0].acquire(timeout=3)
            slot.conn.status = DIRTY
            opened[0].release(slot)
            user_ran.append(slot.conn.cleaned)

        gevent.joinall([gevent.spawn(borrow) for _ in range(2)], raise_error=True)

    users = threading.Thread(target=user)
    users.start()
    users.join(15)
    assert len(user_ran) == 2
    deadline = time.monotonic() + 5
    while opened[0].get_stats()["pool_available"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert opened[0].get_stats()["pool_available"] == 2
    opened[0].close()


def test_replacement_never_exceeds_max_size():
    """At max_size, expiring connections are retired then reopened, never overlapped."""
    p = make_pool(min_size=4, max_size=4, max_lifetime=0.4, lifetime_jitter=0.5)
    peak = 0
    deadline = time.monotonic() + 1.5

    def user() -> None:
        while time.monotonic() < deadline:
            slot = p.acquire(timeout=2)
            gevent.sleep(0.003)
            p.release(slot)

    def watch() -> None:
        nonlocal peak
        while time.monotonic() < deadline:
            peak = max(peak, len(p.driver.opened) - len(p.driver.closed_conns))
            gevent.sleep(0.001)

    gevent.joinall([gevent.spawn(user) for _ in range(3)] + [gevent.spawn(watch)], timeout=5, raise_error=True)
    assert p.get_stats()["connections_num"] > 8  # replaced over and over
    assert peak <= 4
    p.close()


def test_cohort_at_max_size_is_replaced_back_to_back():
    """Connections made together expire together. At max_size the housekeeper
    retires them ahead, and each connect done lets the next retire start, so
    at most num_workers are missing at a time and none is lent expired. (Once
    per tick, 2 of the 12 every 0.1 s, the last ones expired first.)"""
    p = make_pool(min_size=12, max_size=12, num_workers=2, connect_delay=0.01, max_lifetime=2.0, lifetime_jitter=0.0)
    first = set(p.driver.opened)
    fewest = 12
    deadline = time.monotonic() + 2.6

    def watch() -> None:
        nonlocal fewest
        while time.monotonic() < deadline:
            # Private: how many connections the pool has at each instant.
            # Its stats count connects under way too, and idle + lent misses
            # one being handed over: none sees the dip this bounds.
            fewest = min(fewest, len(p._slots))
            gevent.sleep(0.001)

    users = [gevent.spawn(borrow_until, p, deadline, 0.003) for _ in range(6)]
    gevent.joinall([*users, gevent.spawn(watch)], timeout=5, raise_error=True)
    assert not first & idle_conns(p)  # the cohort was replaced (none is lent now)
    assert sum(user.value for user in users) == 0  # none lent expired
    assert fewest >= 12 - 2
    p.close()


def test_a_connection_held_for_good_does_not_stop_replacement_at_max_size():
    """A lent connection retired ahead serves until it comes back: it is not
    one of the num_workers missing, however long it is held (a LISTEN loop,
    a leak), and the others are still replaced before they expire."""
    p = make_pool(min_size=4, max_size=4, num_workers=1, max_lifetime=1.0, lifetime_jitter=0.0)
    held = p.acquire()
    held.expire_at = time.monotonic() + 0.3  # expires first: retired while lent
    others = set(p.driver.opened) - {held.conn}
    gevent.sleep(1.6)  # an idle pool: only the housekeeper replaces
    assert held.expire_at == 0  # retired, still lent
    assert not others & idle_conns(p)  # and no other is lent
    p.release(held)
    p.close()


def test_a_retired_connection_parked_by_a_racing_return_is_closed():
    """A return reads the connection's lifetime, then another thread retires
    it and finds it not idle yet: the return parks it. The housekeeper closes
    it, and it does not hold up the others' replacement."""
    p = make_pool(min_size=3, max_size=3, num_workers=1, max_lifetime=1.0, lifetime_jitter=0.0)
    x = p.acquire()
    x.expire_at = time.monotonic() + 0.06  # due for replacement now
    others = set(p.driver.opened) - {x.conn}
    # Private: the window is between the return's read of the lifetime and
    # its park, where no driver call runs (the status is read before).
    unlent = p._unlent

    def retired_meanwhile(slot):
        p._replace_expiring(time.monotonic())  # as another thread (a connector's, the housekeeper's) would, just then
        return unlent(slot)

    p._unlent = retired_meanwhile  # type: ignore[method-assign]
    p.release(x)
    del p._unlent
    assert x.expire_at == 0 and x.state == "idle"  # retired, yet parked
    wait_until(lambda: x.conn.closed, 2, "the parked retired connection closed")
    gevent.sleep(1.2)
    assert not others & idle_conns(p)  # none is lent
    p.close()


def test_replacement_opens_first_below_max_size():
    """With headroom, the successor is opened before the old connection goes."""
    p = make_pool(min_size=2, max_size=4, max_lifetime=0.5, lifetime_jitter=0.0)
    held = p.acquire()
    old = held.conn
    deadline = time.monotonic() + 2
    while len(p.driver.opened) < 3 and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert len(p.driver.opened) >= 3  # a successor exists while the old one is lent
    assert not old.closed
    p.release(held)
    gevent.sleep(0.05)
    assert old.closed
    assert p.get_stats()["pool_size"] <= 4
    p.close()


def test_check_interrupted_gives_every_connection_back() -> None:
    """`check()` cut short by a gevent.Timeout mid-ping: the connection being
    pinged is cleaned (the ping was cut short) and reused, the unchecked ones
    go back as they were; none is lost."""
    pinged: list[FakeConn] = []

    class SlowPing(FakeDriver):
        def ping(self, conn: FakeConn) -> None:
            pinged.append(conn)
            conn.status = DIRTY  # a round trip in flight
            gevent.sleep(0.2)
            conn.status = OK

    pool = FakePool(SlowPing(), min_size=3, max_size=3, timeout=2)
    pool.open(wait=True, timeout=5)
    try:
        with gevent.Timeout(0.05, False):
            pool.check()
        assert len(pinged) == 1
        slots = [pool.acquire(timeout=1) for _ in range(3)]
        assert {s.conn for s in slots} == set(pool.driver.opened)
        assert pinged[0].cleaned == 1
        assert pool.get_stats()["connections_num"] == 3
        for s in slots:
            pool.release(s)
    finally:
        pool.close()


class Interrupt(BaseException):
    """Not an Exception: what a `gevent.Timeout` or a kill looks like to the pool."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_clean_interrupted_discards_the_connection() -> None:
    """A reset cut short by a BaseException leaves the connection in an
    unknown state: it is closed and replaced, never left counted."""

    class InterruptedClean(FakeDriver):
        def clean(self, conn: FakeConn) -> None:
            raise Interrupt()

    pool = FakePool(InterruptedClean(), min_size=1, max_size=1, timeout=2)
    pool.open(wait=True, timeout=5)
    try:
        slot = pool.acquire()
        slot.conn.status = DIRTY
        pool.release(slot)  # cleaned by a background greenlet, which dies
        fresh = pool.acquire(timeout=2)
        assert fresh.conn is not slot.conn
        wait_until(lambda: slot.conn.closed, 5, "the connection closed (in the background)")
        stats = pool.get_stats()
        assert stats["returns_bad"] == 1 and stats["pool_size"] == 1
        pool.release(fresh)
    finally:
        pool.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_housekeeper_restarts_connects_whose_connector_died() -> None:
    """A connector killed mid-connect leaves its reservation behind; the
    housekeeper starts a new connector for it at its next tick."""

    class DyingOnce(FakeDriver):
        died = False

        def connect(self) -> FakeConn:
            if not self.died:
                self.died = True
                raise Interrupt()
            return super().connect()

    # max_idle / 20 = 0.1 s housekeeping ticks.
    pool = FakePool(DyingOnce(), min_size=1, max_size=1, timeout=2, max_idle=2.0)
    pool.open()
    try:
        slot = pool.acquire(timeout=2)  # alone in the queue: no one else starts a connector
        assert pool.driver.died and pool.get_stats()["pool_size"] == 1
        pool.release(slot)
    finally:
        pool.close()


def test_close_lent_spares_a_connection_being_handed_over(pool) -> None:
    """`close_lent(age)` (Peewee's `close_stale`) closes connections lent for
    longer than `age`; one just returned and handed to a waiter that hasn't
    run yet is in its new borrower's hands, not its old one's."""
    held = [pool.acquire(), pool.acquire()]
    waiter = gevent.spawn(pool.acquire, 2)
    gevent.sleep(0.2)  # the waiter queues; the held slots age
    pool.release(held[0])  # handed to the waiter, which hasn't run yet
    closed = pool.close_lent(0.1)
    assert [s.conn for s in closed] == [held[1].conn]
    slot = waiter.get(timeout=2)
    assert slot.conn is held[0].conn and not slot.conn.closed
    pool.release(slot)


class _InterruptingLock:
    """The pool lock, raising an `Interrupt` right after one release once armed:
    what a signal handler (KeyboardInterrupt) does at that point."""

    def __init__(self, lock: object) -> None:
        self.lock = lock
        self.armed = False

    def acquire(self, *args: object) -> bool:
        return self.lock.acquire(*args)  # type: ignore[attr-defined, no-any-return]

    def release(self) -> None:
        self.lock.release()  # type: ignore[attr-defined]
        if self.armed:
            self.armed = False
            raise Interrupt()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_interrupted_right_after_queuing_leaves_no_request_behind(pool) -> None:
    held = [pool.acquire(), pool.acquire()]
    # Private: the pool's lock is where an exception can be raised into the
    # greenlet right after its request is queued (no public call runs there).
    lock = pool._lock = _InterruptingLock(pool._lock)
    try:
        lock.armed = True  # the next release is the one right after queuing
        with pytest.raises(Interrupt):
            pool.acquire(timeout=1)
        assert pool.get_stats()["requests_waiting"] == 0
        pool.release(held[0])  # not handed to the request that is gone
        assert pool.get_stats()["pool_available"] == 1
    finally:
        pool._lock = lock.lock
    pool.release(held[1])


def test_a_connection_closed_while_handed_over_is_not_given(pool) -> None:
    """`close_lent(0)` (Peewee's `close_all()`) closes every lent connection,
    the one just handed to a waiter too: the waiter queues again and gets a
    new connection, never the closed one."""
    held = [pool.acquire(), pool.acquire()]
    waiter = gevent.spawn(pool.acquire, 2)
    gevent.sleep(0.05)
    pool.release(held[0])  # handed to the waiter, which hasn't run yet
    assert len(pool.close_lent(0)) == 2
    slot = waiter.get(timeout=3)
    assert not slot.conn.closed and slot.conn not in (held[0].conn, held[1].conn)
    pool.release(slot)


def test_a_recovered_connect_error_is_not_a_later_timeout_s_cause() -> None:
    p = make_pool(min_size=0, max_size=1, timeout=1)
    try:
        p.driver.fail_connect = OSError("connection refused (fake)")
        with pytest.raises(errors.PoolTimeout):
            p.acquire(timeout=0.5)
        p.driver.fail_connect = None
        slot = acquire_once_recovered(p, within=5)
        with pytest.raises(errors.PoolTimeout) as info:
            p.acquire(timeout=0.2)  # exhausted: nothing to do with the old error
        assert info.value.__cause__ is None
        p.release(slot)
    finally:
        p.close()


def test_reconnect_failed_method_may_be_overridden() -> None:
    called = threading.Event()

    class Reporting(FakePool):
        def reconnect_failed(self) -> None:
            called.set()

    p = Reporting(min_size=1, max_size=1, reconnect_timeout=0.2, max_idle=1.0)
    p.driver.fail_connect = OSError("connection refused (fake)")
    p.open()
    try:
        assert called.wait(5)
    finally:
        p.close()


def test_a_request_never_fails_on_an_attempt_older_than_itself():
    """The server back while the connector sleeps out its backoff: a request
    that comes then starts a connect (a probe) and is served, where it failed
    at once with the old error."""
    p = make_pool(min_size=1, max_size=1)
    slot = p.acquire()
    p.driver.fail_connect = OSError("connection refused (fake)")
    slot.conn.closed = True
    p.release(slot)  # broken: replaced... but connects fail
    wait_until(lambda: p.get_stats()["connections_errors"] >= 3, what="the backoff to grow")
    p.driver.fail_connect = None  # the server is back, the connector asleep for up to a second
    t0 = time.monotonic()
    served = p.acquire(timeout=5)
    assert time.monotonic() - t0 < 0.5  # a probe: not the next backoff step
    assert served.conn.closed is False
    p.release(served)
    p.close()


def test_requests_during_an_outage_share_one_probe_at_a_time():
    """Fail fast with fresh errors only: each request fails on an attempt
    that began after it, and concurrent requests join one attempt."""
    p = make_pool(min_size=2, max_size=2, timeout=5)
    slots = [p.acquire(), p.acquire()]
    p.driver.fail_connect = OSError("connection refused (fake)")
    for slot in slots:
        slot.conn.closed = True
        p.release(slot)
    wait_until(lambda: p.failing, what="connects failing")
    p.driver.connect_delay = 0.05  # an attempt takes a while: the others join it
    before = p.get_stats()["connections_errors"]
    t0 = time.monotonic()
    requests = [gevent.spawn(p.acquire, 5) for _ in range(20)]
    gevent.joinall(requests, timeout=10)
    assert all(isinstance(g.exception, errors.PoolTimeout) for g in requests)
    assert all("connection refused" in str(g.exception) for g in requests)
    assert time.monotonic() - t0 < 1.0  # failed in a fraction of their timeout
    assert p.get_stats()["connections_errors"] - before <= 3  # not one attempt each
    p.close()


def test_failover_replaces_every_connection_once_per_server():
    """`failover()` replaces the connections made before it (idle now, lent on
    return) and counts once, however many of them report it."""
    p = make_pool(min_size=3, max_size=3)
    slots = [p.acquire() for _ in range(3)]
    old = {s.conn for s in slots}
    assert p.failover(slots[0], RuntimeError("read-only")) is True
    assert p.failover(slots[1], RuntimeError("read-only")) is False  # the same server's connection
    for slot in slots:
        p.release(slot)
    wait_until(lambda: not (old & {s.conn for s in p._slots}) and len(p._slots) == 3, what="the connections replaced")
    fresh = p.acquire()
    assert p.failover(fresh) is True  # a new server's connection: a new failover
    p.release(fresh)
    assert p.get_stats()["failovers"] == 2
    assert all(c.closed for c in old)
    p.close()


# -- events and logging -------------------------------------------------------


def test_events_reach_the_pools_and_the_global_listeners():
    from greenpool.engine import events

    p = make_pool(min_size=1, max_size=1)
    seen: list[tuple[str, object]] = []
    mine = lambda pool, error: seen.append(("mine", error))  # noqa: E731
    everyone = lambda pool, error: seen.append(("everyone", pool))  # noqa: E731
    failing = lambda pool, error: 1 / 0  # noqa: E731 - a listener's error is logged, not raised
    events.listen(p, "failover", mine)
    events.listen(None, "failover", everyone)
    events.listen(None, "failover", failing)
    try:
        error = RuntimeError("read-only")
        assert p.failover(None, error)
        assert seen == [("mine", error), ("everyone", p)]
    finally:
        events.remove(p, "failover", mine)
        events.remove(None, "failover", everyone)
        events.remove(None, "failover", failing)
    with pytest.raises(ValueError, match="name must be one of"):
        events.listen(p, "no such event", mine)
    with pytest.raises(TypeError, match="fn must be callable"):
        events.listen(p, "failover", 42)
    p.close()


def test_an_outage_logs_one_line_when_it_starts_and_one_when_it_ends(caplog):
    """Not a WARNING per failed attempt: one when connects start failing, one
    when they work again (with its duration and attempts); attempts at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="greenpool")
    p = make_pool(min_size=1, max_size=1, timeout=5)
    slot = p.acquire()
    p.driver.fail_connect = OSError("connection refused (fake)")
    slot.conn.closed = True
    p.release(slot)
    wait_until(lambda: p.get_stats()["connections_errors"] >= 4, what="several failed attempts")
    p.driver.fail_connect = None
    p.release(p.acquire(timeout=5))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    started = [m for m in warnings if "connects failing" in m]
    ended = [m for m in warnings if "connects work again" in m]
    assert len(started) == 1 and "connection refused" in started[0]
    assert len(ended) == 1 and "failed attempt" in ended[0], warnings
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "connect failed" in r.getMessage()]
    assert len(debug) >= 4
    p.close()


def test_a_permanent_connect_error_fails_wait_at_once():
    """Authentication failed, an unknown database: open(wait=True) raises that
    error now, not after its timeout; retries go on at the longest step."""

    class Misconfigured(FakeDriver):
        def is_permanent(self, error: BaseException) -> bool:
            return isinstance(error, PermissionError)

    driver = Misconfigured()
    driver.fail_connect = PermissionError("password authentication failed (fake)")
    p = FakePool(driver, min_size=1, max_size=1)
    t0 = time.monotonic()
    with pytest.raises(errors.PoolTimeout, match="password authentication failed") as info:
        p.open(wait=True, timeout=30)
    assert time.monotonic() - t0 < 5
    assert isinstance(info.value.__cause__, PermissionError)
    p.close()


class _VerdictAtStartDriver(FakeDriver):
    """A connect's outcome is what the server said when the attempt began (then it takes `connect_delay`)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def connect(self) -> FakeConn:
        self.attempts += 1
        verdict = self.fail_connect
        gevent.sleep(self.connect_delay)
        if verdict is not None:
            raise verdict
        conn = FakeConn()
        self.opened.append(conn)
        return conn


def test_a_request_never_fails_on_an_attempt_begun_before_it():
    """A request that comes while a connect attempt is under way (the replica
    promoted meanwhile) is not failed by that attempt, whose evidence is older
    than the request: it waits for the next attempt, which serves it."""
    p = FakePool(_VerdictAtStartDriver(), min_size=1, max_size=1, timeout=5)
    p.open(wait=True, timeout=5)
    slot = p.acquire()
    p.driver.fail_connect = OSError("connection refused (fake)")
    slot.conn.closed = True
    p.release(slot)
    wait_until(lambda: p.failing, what="connects failing")
    p.driver.connect_delay = 0.3
    attempts = p.driver.attempts
    early = gevent.spawn(p.acquire, 5)
    wait_until(lambda: p.driver.attempts > attempts, what="an attempt for the early request")
    gevent.sleep(0.05)  # under way: it will fail
    p.driver.fail_connect = None  # the server is back (a replica promoted)
    t0 = time.monotonic()
    late = gevent.spawn(p.acquire, 5)
    gevent.joinall([early, late], timeout=10)
    assert isinstance(early.exception, errors.PoolTimeout)  # its attempt began after it came
    assert late.exception is None, late.exception  # it came after that attempt began
    assert late.value.conn.closed is False
    assert time.monotonic() - t0 < 1.0  # the next attempt came soon: not a backoff step
    p.release(late.value)
    p.close()
