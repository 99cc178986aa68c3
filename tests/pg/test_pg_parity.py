"""Black-box parity: `greenpool.ConnectionPool` behaves like `psycopg_pool.ConnectionPool`.

Every scenario here runs against a real PostgreSQL, once with psycopg_pool's
class and once with greenpool's (and with the Null pools where they are
relevant), and asserts the same observable behaviour. The pools are driven
from the plain pytest thread, with no gevent hub: greenpool then works with
OS threads, like psycopg_pool.

Intended differences, asserted as such:

- Errors: greenpool's `PoolTimeout`/`PoolClosed`/`TooManyRequests` are
  subclasses of `psycopg.OperationalError` *and* of psycopg_pool's classes, so
  `except psycopg_pool.PoolTimeout` catches both pools' errors.
- Stats: psycopg_pool omits counters that are zero; greenpool always includes
  every counter, plus `returns_reset` and wait-time percentiles
  (`requests_wait_p50_us`, ...). Values are compared with `.get(key, 0)`.
- Unreachable database: greenpool puts the driver's error message in the
  `PoolTimeout` text, and when a connect has failed and no connection is
  alive, `getconn()` fails fast with `PoolTimeout` instead of waiting for the
  full timeout (psycopg_pool waits the full timeout, then says nothing about
  the cause). A greenpool `NullConnectionPool.wait()` fails on the first
  failed connect instead of retrying until the timeout; its trial connection
  counts as a request in the stats.
- Constructor validation: greenpool validates more parameters than
  psycopg_pool (negative timeouts, `lifetime_jitter`, non-callable callbacks,
  non-int sizes). Those checks are tested on greenpool only.
- Cleaning a returned connection (rollback, `reset`) happens in the background
  in both pools when `reset` is set; greenpool also rolls back in the
  background, psycopg_pool inline. Tests wait for the pool to settle. Likewise
  a greenpool null pool closes a returned connection in the background.
- `connection_class` defaults to `greenpool.GeventConnection` (a
  `psycopg.Connection` subclass) instead of `psycopg.Connection`.
- Connections nearing `max_lifetime` are replaced ahead of time by greenpool,
  on return by psycopg_pool; either way `max_size` stays a hard cap and
  requests are served up to it (test_max_size_* / test_requests_served_*).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import helpers
import psycopg
import psycopg_pool
import pytest
from helpers import backends, deadline, destroy_main_hub, run_threads, unique

import greenpool
from greenpool import pg as gp

GREEN = greenpool.ConnectionPool
GREEN_NULL = greenpool.NullConnectionPool
PS = psycopg_pool.ConnectionPool
PS_NULL = psycopg_pool.NullConnectionPool

POOLS = [pytest.param(PS, id="psycopg_pool"), pytest.param(GREEN, id="greenpool")]
NULL_POOLS = [pytest.param(PS_NULL, id="psycopg_pool-null"), pytest.param(GREEN_NULL, id="greenpool-null")]
ALL_POOLS = POOLS + NULL_POOLS

#: Every test must end well within this (seconds); a hang fails the test.
TEST_DEADLINE = 60

#: The counters psycopg_pool documents (it omits those that are zero).
PSYCOPG_POOL_STATS = {
    "pool_min",
    "pool_max",
    "pool_size",
    "pool_available",
    "requests_waiting",
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_errors",
    "usage_ms",
    "returns_bad",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
}


@pytest.fixture(autouse=True)
def _deadline() -> Iterator[None]:
    """Fail (rather than hang) a test that overruns; hard-exit as a last resort."""
    with deadline(TEST_DEADLINE, dump_after=TEST_DEADLINE * 3):
        yield


@pytest.fixture(autouse=True)
def _no_gevent_hub() -> None:
    """These tests drive the pools from a plain thread.

    A gevent hub left in the main thread by an in-process gevent test would
    make greenpool treat this thread as a greenlet thread; drop it.
    """
    destroy_main_hub()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def is_green(cls: type) -> bool:
    return issubclass(cls, gp.ConnectionPool)


def is_null(cls: type) -> bool:
    return issubclass(cls, (PS_NULL, GREEN_NULL))


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until truthy; fail the test after `timeout` seconds."""
    return helpers.wait_until(predicate, timeout, what, interval=0.01)


@pytest.fixture
def table(monitor: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh table `(x int)`, dropped at teardown."""
    name = unique("gp_parity")
    monitor.execute(f"create table {name} (x int)")
    yield name
    monitor.execute(f"drop table if exists {name}")


@pytest.fixture
def make_pool(pg_dsn: str) -> Iterator[Callable[..., Any]]:
    """`make_pool(cls, **kwargs)`: a pool on `pg_dsn` (not opened unless
    `open=True`), with a unique `application_name`; closed at teardown."""
    pools: list[Any] = []

    def factory(cls: type, conninfo: str | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("open", False)
        app = unique("gp_pool")
        kwargs.setdefault("kwargs", {"application_name": app})
        pool = cls(pg_dsn if conninfo is None else conninfo, **kwargs)
        pool.test_app_name = app
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        pool.close()


def terminate(monitor: psycopg.Connection[Any], pid: int) -> None:
    """Kill a backend and wait until the server has let it go."""
    assert monitor.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    wait_until(
        lambda: not monitor.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone(),
        what=f"backend {pid} to exit",
    )


def count_rows(monitor: psycopg.Connection[Any], table: str) -> int:
    row = monitor.execute(f"select count(*) from {table}").fetchone()
    assert row is not None
    return int(row[0])


def settle(pool: Any, available: int, timeout: float = 10.0) -> dict[str, int]:
    """Wait until `available` connections are idle and nobody waits."""

    def ready() -> dict[str, int] | None:
        stats = pool.get_stats()
        if stats.get("pool_available", 0) == available and not stats.get("requests_waiting"):
            return dict(stats)
        return None

    return dict(wait_until(ready, timeout, f"pool_available == {available}"))


def assert_usable(conns: list[Any]) -> None:
    """Each of `conns` runs a query (then commits)."""
    for c in conns:
        assert c.execute("select 1").fetchone() == (1,)
        c.commit()


def opened(pool: Any) -> Any:
    """`pool`, opened: waits (10 s at most) for its min_size connections."""
    pool.open(wait=True, timeout=10)
    return pool


def hold_all(pool: Any, n: int) -> list[Any]:
    return [pool.getconn(timeout=5) for _ in range(n)]


def sizes(cls: type, min_size: int, max_size: int) -> dict[str, int]:
    """Size arguments; a null pool's min_size is always 0."""
    return {"min_size": 0 if is_null(cls) else min_size, "max_size": max_size}


def pid_of(conn: Any) -> int:
    return int(conn.info.backend_pid)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local port bound but not listening: connects get ECONNREFUSED."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield int(sock.getsockname()[1])
    sock.close()


# --------------------------------------------------------------------------
# Transactions and checkout
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_connection_commits_on_success_rolls_back_on_error(
    cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any], table: str
) -> None:
    pool = opened(make_pool(cls, **sizes(cls, 1, 2)))

    with pool.connection() as conn:
        conn.execute(f"insert into {table} values (1)")
    assert count_rows(monitor, table) == 1

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with pool.connection() as conn:
            conn.execute(f"insert into {table} values (2)")
            raise Boom()
    assert count_rows(monitor, table) == 1
    assert monitor.execute(f"select array_agg(x) from {table}").fetchone() == ([1],)

    # The pool still works after the error.
    with pool.connection() as conn:
        assert conn.execute("select 42").fetchone() == (42,)


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_getconn_putconn(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, **sizes(cls, 2, 2)))
    conn = pool.getconn()
    assert conn.execute("select 1").fetchone() == (1,)
    conn.commit()
    pool.putconn(conn)
    if is_null(cls):
        # A null pool closes returned connections nobody waits for
        # (greenpool closes it in the background).
        wait_until(lambda: conn.closed, what="the returned connection to be closed")
    else:
        settle(pool, 2)
        assert not conn.closed
    again = pool.getconn()
    assert again.execute("select 2").fetchone() == (2,)
    pool.putconn(again)


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_pool_is_context_manager(cls: type, pg_dsn: str) -> None:
    with cls(pg_dsn, **sizes(cls, 1, 2), open=False) as pool:
        assert not pool.closed
        with pool.connection() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    assert pool.closed
    with pytest.raises(psycopg_pool.PoolClosed):
        pool.getconn()


@pytest.mark.parametrize("cls", POOLS)
def test_min_size_connections_after_open_wait(
    cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]
) -> None:
    pool = opened(make_pool(cls, min_size=3, max_size=5))
    stats = pool.get_stats()
    assert stats["pool_size"] == 3
    assert stats["pool_available"] == 3
    assert len(backends(monitor, pool.test_app_name)) == 3
    conns = hold_all(pool, 3)
    try:
        assert len({pid_of(c) for c in conns}) == 3
        # Nothing new was needed for those three.
        assert pool.get_stats()["connections_num"] == 3
    finally:
        for c in conns:
            pool.putconn(c)


# --------------------------------------------------------------------------
# Limits: timeout, max_waiting
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_timeout_when_exhausted(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, **sizes(cls, 1, 1), timeout=0.3))
    held = pool.getconn()
    try:
        for kwargs in ({}, {"timeout": 0.3}):  # the pool's timeout, then an explicit one
            t0 = time.monotonic()
            with pytest.raises(psycopg_pool.PoolTimeout) as info:
                pool.getconn(**kwargs)
            elapsed = time.monotonic() - t0
            assert 0.25 <= elapsed < 2.0, elapsed
            assert isinstance(info.value, psycopg.OperationalError)
            if is_green(cls):
                assert isinstance(info.value, greenpool.PoolTimeout)
        with pytest.raises(psycopg_pool.PoolTimeout):
            with pool.connection(timeout=0.1):
                pass
        # A budget already spent (`deadline - now`): a timeout, at once.
        t0 = time.monotonic()
        with pytest.raises(psycopg_pool.PoolTimeout):
            pool.getconn(timeout=-1)
        assert time.monotonic() - t0 < 1
    finally:
        pool.putconn(held)
    with pool.connection(timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    stats = pool.get_stats()
    # psycopg_pool doesn't count the spent budget's timeout among its errors.
    assert stats["requests_errors"] == (4 if is_green(cls) else 3)
    assert stats.get("requests_waiting", 0) == 0


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_max_waiting_raises_too_many_requests(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, **sizes(cls, 1, 1), max_waiting=2))
    held = pool.getconn()
    results: list[Any] = []

    def waiter() -> None:
        try:
            with pool.connection(timeout=10) as conn:
                results.append(conn.execute("select 1").fetchone())
        except BaseException as ex:  # pragma: no cover - reported below
            results.append(ex)

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: pool.get_stats().get("requests_waiting") == 2, what="2 queued requests")
        t0 = time.monotonic()
        with pytest.raises(psycopg_pool.TooManyRequests) as info:
            pool.getconn(timeout=10)
        assert time.monotonic() - t0 < 1.0, "TooManyRequests must not wait"
        assert isinstance(info.value, psycopg.OperationalError)
        if is_green(cls):
            assert isinstance(info.value, greenpool.TooManyRequests)
    finally:
        pool.putconn(held)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert results == [(1,), (1,)]
    assert pool.get_stats()["requests_errors"] == 1


# --------------------------------------------------------------------------
# Misuse: wrong putconn, closed pool
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_putconn_foreign_connection(cls: type, make_pool: Callable[..., Any], pg_dsn: str) -> None:
    pool = make_pool(cls, **sizes(cls, 1, 1))
    other = make_pool(cls, **sizes(cls, 1, 1))
    pool.open(wait=True, timeout=10)
    other.open(wait=True, timeout=10)

    # A connection of another pool.
    foreign = other.getconn()
    with pytest.raises(ValueError, match="pool"):
        pool.putconn(foreign)
    assert foreign.execute("select 1").fetchone() == (1,)
    foreign.commit()
    other.putconn(foreign)  # still returnable to its own pool

    # A connection of no pool.
    with psycopg.connect(pg_dsn) as plain:
        with pytest.raises(ValueError, match="pool"):
            pool.putconn(plain)
        assert not plain.closed

    # Both pools intact: each still lends its single connection.
    for p in (pool, other):
        with p.connection(timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        stats = p.get_stats()
        assert stats.get("returns_bad", 0) == 0
        if not is_null(cls):
            settle(p, 1)


@pytest.mark.parametrize("cls", NULL_POOLS)
def test_null_pool_hands_returned_connection_to_waiter(cls: type, make_pool: Callable[..., Any]) -> None:
    """A null pool closes a returned connection, unless a request waits for it."""
    pool = opened(make_pool(cls, max_size=1))
    held = pool.getconn()
    pid = pid_of(held)
    got: list[Any] = []

    def waiter() -> None:
        with pool.connection(timeout=10) as conn:
            got.append((pid_of(conn), conn.execute("select 1").fetchone()))

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wait_until(lambda: pool.get_stats().get("requests_waiting") == 1, what="a queued request")
    pool.putconn(held)
    thread.join(10)
    assert not thread.is_alive()
    assert got == [(pid, (1,))]  # the same connection, handed over
    wait_until(lambda: held.closed, what="the connection to be closed once nobody waits")


def test_implicit_open_warning_raised_as_error_leaks_no_connection(make_pool: Callable[..., Any]) -> None:
    """psycopg_pool's DeprecationWarning for an implicit open comes before the
    checkout: with warnings as errors (pytest's `-W error`), nothing is lent."""
    pool = make_pool(gp.ConnectionPool, min_size=1, max_size=1, timeout=1, open=None)
    # Not wait(): it gives the (one) warning too, as psycopg_pool's.
    wait_until(lambda: pool.get_stats()["pool_available"] == 1, what="the pool to fill")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DeprecationWarning, match="'open' parameter"):
            pool.getconn()
    conn = pool.getconn()
    pool.putconn(conn)
    assert pool.get_stats()["pool_available"] == 1


@pytest.mark.parametrize("entry", ["getconn", "connection", "wait"])
def test_implicit_open_warning_names_the_callers_line(entry: str, make_pool: Callable[..., Any]) -> None:
    """greenpool's DeprecationWarning points at the caller's line, whichever the
    entry point (psycopg_pool's points into psycopg_pool): Python shows it by
    default in `__main__`, and `-W error::DeprecationWarning:module` filters work."""
    pool = make_pool(gp.ConnectionPool, min_size=1, max_size=1, timeout=5, open=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if entry == "getconn":
            pool.putconn(pool.getconn())
        elif entry == "connection":
            with pool.connection():
                pass
        else:
            pool.wait(timeout=10)
    assert [(w.category, w.filename) for w in caught] == [(DeprecationWarning, __file__)]


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_putconn_twice(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, **sizes(cls, 2, 2)))
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(ValueError, match="given back already" if cls is GREEN else ""):
        pool.putconn(conn)
    # Pool intact: not returned twice, both connections distinct and working.
    if not is_null(cls):
        settle(pool, 2)
    a, b = hold_all(pool, 2)
    try:
        assert a is not b
        assert pid_of(a) != pid_of(b)
        assert a.execute("select 1").fetchone() == b.execute("select 1").fetchone() == (1,)
        with pytest.raises(psycopg_pool.PoolTimeout):
            pool.getconn(timeout=0.2)
    finally:
        pool.putconn(a)
        pool.putconn(b)


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_use_before_open_and_after_close(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = make_pool(cls, **sizes(cls, 1, 1))
    with pytest.raises(psycopg_pool.PoolClosed):
        pool.getconn()
    pool.open(wait=True, timeout=10)
    pool.open()  # opening an open pool is a no-op
    with pool.connection() as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    pool.close()
    pool.close()  # idempotent
    assert pool.closed
    with pytest.raises(psycopg_pool.PoolClosed) as info:
        pool.getconn()
    assert isinstance(info.value, psycopg.OperationalError)
    if is_green(cls):
        assert isinstance(info.value, greenpool.PoolClosed)
    with pytest.raises(psycopg_pool.PoolClosed):
        with pool.connection():
            pass
    # A closed pool can't be reopened.
    with pytest.raises(psycopg_pool.PoolClosed):
        pool.open()
    with pytest.raises(psycopg_pool.PoolClosed):
        pool.open(wait=True, timeout=1)


@pytest.mark.parametrize("cls", POOLS)
def test_close_fails_waiting_requests_and_closes_lent_on_return(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, min_size=1, max_size=1))
    held = pool.getconn()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.getconn(timeout=10)
        except BaseException as ex:
            errors.append(ex)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wait_until(lambda: pool.get_stats().get("requests_waiting") == 1, what="a queued request")
    pool.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], psycopg_pool.PoolClosed), errors
    pool.putconn(held)
    wait_until(lambda: held.closed, what="the lent connection to be closed on return")


# --------------------------------------------------------------------------
# Callbacks: configure, reset, check
# --------------------------------------------------------------------------


def _tag(conn: Any) -> str:
    row = conn.execute("select current_setting('greenpool.tag', true)").fetchone()
    conn.commit()
    return row[0] or ""


def _recording(sql: str, calls: list[Any]) -> Callable[[Any], None]:
    """A configure/reset callback: run `sql` and commit, then record the connection."""

    def callback(conn: Any) -> None:
        conn.execute(sql)
        conn.commit()
        calls.append(conn)

    return callback


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_configure_applied_to_each_new_connection(cls: type, make_pool: Callable[..., Any]) -> None:
    configured: list[Any] = []
    configure = _recording("select set_config('greenpool.tag', 'configured', false)", configured)
    pool = opened(make_pool(cls, **sizes(cls, 2, 4), configure=configure))
    conns = hold_all(pool, 4)  # 2 from open, 2 more made on demand
    try:
        for conn in conns:
            assert any(conn is c for c in configured)
            assert _tag(conn) == "configured"
    finally:
        for conn in conns:
            pool.putconn(conn)


@pytest.mark.parametrize("cls", POOLS)
def test_configure_leaving_a_transaction_discards_the_connection(cls: type, make_pool: Callable[..., Any]) -> None:
    def configure(conn: Any) -> None:
        conn.execute("select 1")  # opens a transaction, never committed

    pool = make_pool(cls, min_size=1, configure=configure)
    with pytest.raises(psycopg_pool.PoolTimeout):
        pool.open(wait=True, timeout=1.0)
    assert pool.closed


# A null pool only resets a connection it hands to a waiter (psycopg_pool
# closes the others right away), so `reset` is tested on the pools proper.
@pytest.mark.parametrize("cls", POOLS)
def test_reset_called_on_return(cls: type, make_pool: Callable[..., Any]) -> None:
    resets: list[Any] = []
    reset = _recording("reset greenpool.tag", resets)
    pool = opened(make_pool(cls, min_size=1, max_size=1, reset=reset))
    conn = pool.getconn()
    pid = pid_of(conn)
    conn.execute("select set_config('greenpool.tag', 'dirty', false)")
    conn.commit()
    pool.putconn(conn)
    wait_until(lambda: len(resets) == 1, what="reset to be called")
    assert resets[0] is conn
    with pool.connection(timeout=5) as again:
        assert pid_of(again) == pid  # the same connection, reset
        assert _tag(again) == ""
    wait_until(lambda: len(resets) == 2, what="reset to be called on the second return")


@pytest.mark.parametrize("role", ["configure", "check", "reset"])
@pytest.mark.parametrize("cls", POOLS)
def test_callbacks_see_the_connection_as_pooled(cls: type, make_pool: Callable[..., Any], role: str) -> None:
    """A callback may use `with conn:`: on a pooled connection that commits
    (or rolls back) instead of closing it."""
    calls: list[int] = []

    def callback(conn: Any) -> None:
        with conn:
            calls.append(pid_of(conn))

    pool = opened(make_pool(cls, min_size=0, max_size=1, **{role: callback}))
    for _ in range(2):
        with pool.connection(timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    wait_until(lambda: len(calls) >= 1, what=f"{role} to be called")
    assert pool.get_stats().get("connections_num", 1) == 1  # never closed and remade


@pytest.mark.parametrize("cls", POOLS)
def test_check_callback_replaces_failing_connection(
    cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]
) -> None:
    checked: list[int] = []

    def check(conn: Any) -> None:
        checked.append(pid_of(conn))
        cls.check_connection(conn)  # type: ignore[attr-defined]

    pool = opened(make_pool(cls, min_size=2, max_size=2, check=check))
    pids = {pid_of(c) for c in _hold_and_return(pool, 2)}
    assert len(pids) == 2
    checked.clear()
    victim = min(pids)
    terminate(monitor, victim)

    conns = hold_all(pool, 2)
    try:
        lent = {pid_of(c) for c in conns}
        assert victim not in lent
        assert len(lent) == 2
        assert_usable(conns)
    finally:
        for c in conns:
            pool.putconn(c)
    if cls is PS:
        assert victim in checked  # the check saw the dead connection...
        assert len(checked) >= 3  # ...and the replacement was checked too
    else:
        # greenpool saw it first, without a round trip: its socket was readable.
        assert victim not in checked and len(checked) >= 2
    assert pool.get_stats()["connections_lost"] == 1


def _hold_and_return(pool: Any, n: int) -> list[Any]:
    conns = hold_all(pool, n)
    for c in conns:
        pool.putconn(c)
    return conns


# --------------------------------------------------------------------------
# Returned connections in a bad state
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", POOLS)
def test_returned_in_transaction_is_rolled_back(
    cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any], table: str
) -> None:
    pool = opened(make_pool(cls, min_size=1, max_size=1))

    conn = pool.getconn()
    conn.execute(f"insert into {table} values (1)")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    pool.putconn(conn)
    settle(pool, 1)
    assert count_rows(monitor, table) == 0

    # INERROR too.
    conn = pool.getconn()
    with pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("select * from no_such_table_gp")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    pool.putconn(conn)
    settle(pool, 1)

    with pool.connection(timeout=5) as again:
        assert again is conn  # kept, not replaced
        assert again.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert again.execute(f"select count(*) from {table}").fetchone() == (0,)
    stats = pool.get_stats()
    assert stats.get("returns_bad", 0) == 0
    assert stats["connections_num"] == 1


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_returned_closed_is_replaced(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, **sizes(cls, 2, 2)))
    conn = pool.getconn()
    conn.close()
    pool.putconn(conn)
    if not is_null(cls):
        settle(pool, 2)
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    conns = hold_all(pool, 2)
    try:
        assert all(c is not conn and not c.closed for c in conns)
        assert [c.execute("select 1").fetchone() for c in conns] == [(1,), (1,)]
    finally:
        for c in conns:
            pool.putconn(c)
    if not is_null(cls):
        assert pool.get_stats()["connections_num"] == 3


@pytest.mark.parametrize("cls", POOLS)
def test_terminated_backend_discarded_by_check(
    cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]
) -> None:
    pool = opened(make_pool(cls, min_size=2, max_size=2))
    pids = {pid_of(c) for c in _hold_and_return(pool, 2)}
    victim = min(pids)
    terminate(monitor, victim)

    pool.check()
    settle(pool, 2)
    assert pool.get_stats()["connections_lost"] == 1
    conns = hold_all(pool, 2)
    try:
        lent = {pid_of(c) for c in conns}
        assert victim not in lent and len(lent) == 2
        assert lent - pids  # a new backend replaced the dead one
        assert_usable(conns)
    finally:
        for c in conns:
            pool.putconn(c)
    assert backends(monitor, pool.test_app_name) == lent


@pytest.mark.parametrize("cls", POOLS)
def test_check_uses_an_overridden_check_connection(cls: type, make_pool: Callable[..., Any]) -> None:
    """`check()` checks each idle connection with the pool's `check_connection()`:
    a subclass overriding it (a different probe, say) is obeyed."""
    checked: list[int] = []

    class Checking(cls):  # type: ignore[valid-type, misc]
        @staticmethod
        def check_connection(conn: Any) -> None:
            checked.append(pid_of(conn))
            if len(checked) == 1:
                raise psycopg.OperationalError("failed the subclass's probe")

    pool = opened(make_pool(Checking, min_size=2, max_size=2))
    pids = {pid_of(c) for c in _hold_and_return(pool, 2)}
    pool.check()
    assert set(checked) == pids and len(checked) == 2
    settle(pool, 2)
    assert pool.get_stats()["connections_lost"] == 1
    conns = hold_all(pool, 2)
    try:
        assert checked[0] not in {pid_of(c) for c in conns}  # the one it failed was replaced
    finally:
        for c in conns:
            pool.putconn(c)


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_terminated_backend_discarded_on_return(
    cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]
) -> None:
    pool = opened(make_pool(cls, **sizes(cls, 2, 2)))
    with pytest.raises(psycopg.OperationalError):
        with pool.connection() as conn:
            victim = pid_of(conn)
            terminate(monitor, victim)
            conn.execute("select 1")
    assert conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN
    if not is_null(cls):
        settle(pool, 2)
    assert pool.get_stats()["returns_bad"] == 1
    conns = hold_all(pool, 2)
    try:
        assert victim not in {pid_of(c) for c in conns}
        assert [c.execute("select 1").fetchone() for c in conns] == [(1,), (1,)]
    finally:
        for c in conns:
            pool.putconn(c)


@pytest.mark.parametrize("cls", POOLS)
def test_close_returns(cls: type, make_pool: Callable[..., Any]) -> None:
    """With close_returns=True, conn.close() gives the connection back."""
    pool = opened(make_pool(cls, min_size=1, max_size=1, close_returns=True))
    conn = pool.getconn()
    pid = pid_of(conn)
    conn.close()
    assert not conn.closed
    settle(pool, 1)
    with pool.connection(timeout=5) as again:
        assert pid_of(again) == pid
    stats = pool.get_stats()
    assert stats.get("returns_bad", 0) == 0 and stats["connections_num"] == 1


# --------------------------------------------------------------------------
# Connection parameters
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_conninfo_and_kwargs_callables(
    cls: type, make_pool: Callable[..., Any], pg_dsn: str, monitor: psycopg.Connection[Any]
) -> None:
    app = unique("gp_callable")
    calls: list[str] = []

    def conninfo() -> str:
        calls.append("conninfo")
        return pg_dsn

    def kwargs() -> dict[str, Any]:
        calls.append("kwargs")
        return {"application_name": app}

    pool = opened(make_pool(cls, conninfo, kwargs=kwargs, **sizes(cls, 1, 2)))
    conns = hold_all(pool, 2)
    try:
        assert backends(monitor, app) == {pid_of(c) for c in conns}
    finally:
        for c in conns:
            pool.putconn(c)
    assert calls.count("conninfo") >= 2 and calls.count("kwargs") >= 2


class _MyConnection(psycopg.Connection[Any]):
    pass


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_connection_class(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, connection_class=_MyConnection, **sizes(cls, 1, 1)))
    with pool.connection() as conn:
        assert type(conn) is _MyConnection
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_connection_attributes_set_after_construction(cls: type, make_pool: Callable[..., Any], pg_dsn: str) -> None:
    """`conninfo`, `kwargs` and `connection_class` are psycopg_pool's plain
    attributes: set on a pool, they make its next connections."""
    pool = make_pool(cls, "host=203.0.113.1 connect_timeout=1", **sizes(cls, 1, 1))
    pool.conninfo = pg_dsn
    pool.kwargs = kwargs = {"application_name": "gp_attrs"}
    pool.connection_class = _MyConnection
    assert (pool.conninfo, pool.kwargs, pool.connection_class) == (pg_dsn, kwargs, _MyConnection)
    opened(pool)
    with pool.connection(timeout=10) as conn:
        assert type(conn) is _MyConnection
        assert conn.execute("select current_setting('application_name')").fetchone() == ("gp_attrs",)


def test_greenpool_default_connection_class_is_a_psycopg_connection(make_pool: Callable[..., Any]) -> None:
    """greenpool's default class is GeventConnection, a psycopg.Connection
    (psycopg_pool's default is psycopg.Connection itself)."""
    pool = opened(make_pool(GREEN, min_size=1))
    with pool.connection() as conn:
        assert isinstance(conn, greenpool.GeventConnection)
        assert isinstance(conn, psycopg.Connection)


@pytest.mark.parametrize("cls", POOLS)
def test_reconnect_failed_called(cls: type, make_pool: Callable[..., Any], pg_dsn: str, refused_port: int) -> None:
    called = threading.Event()
    seen: list[Any] = []

    def reconnect_failed(pool: Any) -> None:
        seen.append(pool)
        called.set()

    dsn, _ = _bad_dsns(pg_dsn, refused_port)["unreachable"]
    pool = make_pool(cls, dsn, min_size=1, reconnect_timeout=0.5, reconnect_failed=reconnect_failed)
    pool.open()
    assert called.wait(10), "reconnect_failed not called"
    assert seen[0] is pool


# --------------------------------------------------------------------------
# Maintenance: resize, drain
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", POOLS)
def test_resize(cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]) -> None:
    pool = opened(make_pool(cls, min_size=1, max_size=1))

    pool.resize(3, 4)
    assert (pool.min_size, pool.max_size) == (3, 4)
    stats = settle(pool, 3)
    assert (stats["pool_min"], stats["pool_max"], stats["pool_size"]) == (3, 4, 3)
    conns = hold_all(pool, 4)  # the 4th is made on demand, up to the new max
    try:
        assert len({pid_of(c) for c in conns}) == 4
        with pytest.raises(psycopg_pool.PoolTimeout):
            pool.getconn(timeout=0.2)
    finally:
        for c in conns:
            pool.putconn(c)

    pool.resize(2)  # max_size defaults to min_size
    assert (pool.min_size, pool.max_size) == (2, 2)
    stats = pool.get_stats()
    assert (stats["pool_min"], stats["pool_max"]) == (2, 2)

    # Bad sizes are refused and leave the pool as it was.
    with pytest.raises(ValueError, match="min_size"):
        pool.resize(-1)
    with pytest.raises(ValueError, match="max_size"):
        pool.resize(3, 2)
    assert (pool.min_size, pool.max_size) == (2, 2)
    with pool.connection(timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("cls", NULL_POOLS)
def test_resize_null_pool(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, max_size=1))
    pool.resize(0, 3)
    assert (pool.min_size, pool.max_size) == (0, 3)
    with pytest.raises(ValueError, match="min_size"):
        pool.resize(1, 3)
    conns = hold_all(pool, 3)
    try:
        assert len({pid_of(c) for c in conns}) == 3
    finally:
        for c in conns:
            pool.putconn(c)


@pytest.mark.parametrize("new", [(1, 3), (0, 3)])
def test_resize_closed_null_pool_raises_pool_closed_first(new: tuple[int, int], make_pool: Callable[..., Any]) -> None:
    """greenpool only (psycopg_pool's resize() doesn't look): after close(), a
    null pool's resize() says it is closed, whatever the sizes, as a pool's does."""
    pool = opened(make_pool(GREEN_NULL, max_size=1))
    pool.close()
    with pytest.raises(psycopg_pool.PoolClosed, match="is closed"):
        pool.resize(*new)


@pytest.mark.parametrize("cls", POOLS)
def test_drain_replaces_connections(cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]) -> None:
    pool = opened(make_pool(cls, min_size=3, max_size=3))
    before = {pid_of(c) for c in _hold_and_return(pool, 3)}
    assert len(before) == 3
    settle(pool, 3)

    lent = pool.getconn()
    pool.drain()
    settle(pool, 2)  # the idle ones are replaced now...
    assert not lent.closed
    assert lent.execute("select 1").fetchone() == (1,)
    lent.commit()
    pool.putconn(lent)  # ...the lent one when it comes back
    wait_until(lambda: lent.closed, what="the drained lent connection to be closed")
    settle(pool, 3)

    after = {pid_of(c) for c in _hold_and_return(pool, 3)}
    assert len(after) == 3
    assert not after & before
    wait_until(lambda: backends(monitor, pool.test_app_name) == after, what="old backends to be gone")


# --------------------------------------------------------------------------
# max_size while connections expire
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", POOLS)
def test_max_size_holds_while_lent_connections_expire(
    cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]
) -> None:
    """`max_size` caps the connections lent at once, even past max_lifetime.

    Both connections of a max_size=2 pool are held past their max_lifetime;
    a third request must time out (psycopg_pool: expired connections are
    replaced only when they come back), and the server never sees more than
    max_size backends of the pool.
    """
    extra = {"lifetime_jitter": 0.0} if is_green(cls) else {}
    pool = opened(make_pool(cls, min_size=2, max_size=2, max_lifetime=1.0, **extra))
    a, b = hold_all(pool, 2)
    first = {pid_of(a), pid_of(b)}
    try:
        peak = 0
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:
            peak = max(peak, len(backends(monitor, pool.test_app_name)))
            time.sleep(0.05)
        problems = []
        try:
            third = pool.getconn(timeout=0.3)
        except psycopg_pool.PoolTimeout:
            pass
        else:
            problems.append(f"a third connection (pid {pid_of(third)}) was lent while 2 were held")
            pool.putconn(third)
        if peak > 2:
            problems.append(f"{peak} backends of the pool were open at once")
        assert not problems, f"max_size=2 exceeded: {'; '.join(problems)}"
    finally:
        pool.putconn(a)
        pool.putconn(b)
    # The expired connections are replaced once back.
    settle(pool, 2)
    after = {pid_of(c) for c in _hold_and_return(pool, 2)}
    assert not after & first


@pytest.mark.parametrize("cls", POOLS)
def test_requests_served_up_to_max_size_while_lent_connections_expire(
    cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]
) -> None:
    """Below max_size, a request is served even while other connections are
    held past their max_lifetime: a max_size=3 pool with 2 expired
    connections lent still lends a 3rd (and no more than 3 exist)."""
    extra = {"lifetime_jitter": 0.0} if is_green(cls) else {}
    pool = opened(make_pool(cls, min_size=2, max_size=3, max_lifetime=1.0, **extra))
    a, b = hold_all(pool, 2)
    third = fourth = None
    try:
        time.sleep(1.6)  # a and b are past their lifetime now
        t0 = time.monotonic()
        try:
            third = pool.getconn(timeout=1.0)
        except psycopg_pool.PoolTimeout:
            pytest.fail(f"max_size=3 pool could not lend a 3rd connection: {pool.get_stats()}")
        assert time.monotonic() - t0 < 1.0
        assert third.execute("select 1").fetchone() == (1,)
        third.commit()
        with pytest.raises(psycopg_pool.PoolTimeout):
            fourth = pool.getconn(timeout=0.3)
        assert len(backends(monitor, pool.test_app_name)) <= 3
    finally:
        for conn in (a, b, third, fourth):
            if conn is not None:
                pool.putconn(conn)
    settle(pool, pool.get_stats()["pool_size"])


# --------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------


def _stats_workload(pool: Any, monitor: psycopg.Connection[Any]) -> None:
    """The same deterministic workload for both pools (min_size=max_size=2)."""
    for _ in range(3):  # 3 requests served at once
        with pool.connection() as conn:
            conn.execute("select 1")
    a, b = hold_all(pool, 2)  # 2 requests
    with pytest.raises(psycopg_pool.PoolTimeout):  # 1 request, queued, failed
        pool.getconn(timeout=0.3)
    a.close()
    pool.putconn(a)  # 1 bad return -> 1 new connection
    pool.putconn(b)
    settle(pool, 2)
    victim = pid_of(_hold_and_return(pool, 2)[0])  # 2 requests
    terminate(monitor, victim)
    pool.check()  # 1 connection lost -> 1 new connection
    settle(pool, 2)


@pytest.mark.parametrize("cls", POOLS)
def test_stats_keys_and_values(cls: type, make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]) -> None:
    pool = opened(make_pool(cls, min_size=2, max_size=2))
    _stats_workload(pool, monitor)
    stats = pool.get_stats()

    assert all(isinstance(v, int) for v in stats.values()), stats
    if is_green(cls):
        # greenpool always reports every psycopg_pool counter, even when zero.
        assert PSYCOPG_POOL_STATS <= set(stats), PSYCOPG_POOL_STATS - set(stats)
    else:
        assert set(stats) <= PSYCOPG_POOL_STATS, set(stats) - PSYCOPG_POOL_STATS
    expected = {
        "pool_min": 2,
        "pool_max": 2,
        "pool_size": 2,
        "pool_available": 2,
        "requests_waiting": 0,
        "requests_num": 8,
        "requests_queued": 1,
        "requests_errors": 1,
        "returns_bad": 1,
        "connections_num": 4,
        "connections_errors": 0,
        "connections_lost": 1,
    }
    assert {k: stats.get(k, 0) for k in expected} == expected
    assert stats["requests_wait_ms"] >= 250  # the 0.3 s timed-out request
    assert stats["usage_ms"] >= 0 and stats["connections_ms"] >= 0

    popped = pool.pop_stats()
    assert {k: popped.get(k, 0) for k in expected} == expected
    after = pool.get_stats()
    # Counters restart from zero; measures (pool_*) are still there.
    for key in PSYCOPG_POOL_STATS - {"pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting"}:
        assert after.get(key, 0) == 0, (key, after)
    assert (after["pool_min"], after["pool_max"], after["pool_size"], after["pool_available"]) == (2, 2, 2, 2)


@pytest.mark.parametrize("cls", NULL_POOLS)
def test_null_pool_unlimited_size_reads_zero(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = make_pool(cls)
    assert pool.max_size == 0
    assert pool.get_stats()["pool_max"] == 0


@pytest.mark.parametrize("cls", ALL_POOLS)
def test_wait_on_an_implicitly_opened_pool_warns(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = make_pool(cls, open=None, **sizes(cls, 1, 1))
    with pytest.warns(DeprecationWarning, match="open"):
        pool.wait(timeout=10)


@pytest.mark.parametrize("cls", NULL_POOLS)
def test_stats_null_pool(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = opened(make_pool(cls, max_size=1))
    held = pool.getconn()
    with pytest.raises(psycopg_pool.PoolTimeout):
        pool.getconn(timeout=0.2)
    pool.putconn(held)
    stats = pool.get_stats()
    assert stats["pool_min"] == 0 and stats["pool_max"] == 1
    # Intended difference: greenpool's wait() makes its trial connection as a request.
    assert stats["requests_num"] == 2 + is_green(cls)
    assert stats["requests_errors"] == 1
    assert stats.get("requests_waiting", 0) == 0


# --------------------------------------------------------------------------
# Constructor validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", POOLS)
@pytest.mark.parametrize(
    "kwargs, exc, param",
    [
        ({"min_size": -1}, ValueError, "min_size"),
        ({"min_size": 4, "max_size": 2}, ValueError, "max_size"),
        ({"num_workers": 0}, ValueError, "num_workers"),
    ],
)
def test_bad_constructor_input(cls: type, pg_dsn: str, kwargs: dict[str, Any], exc: type, param: str) -> None:
    with pytest.raises(exc, match=param):
        cls(pg_dsn, open=False, **kwargs)


@pytest.mark.parametrize("cls", NULL_POOLS)
def test_bad_constructor_input_null_pool(cls: type, pg_dsn: str) -> None:
    with pytest.raises(ValueError, match="min_size"):
        cls(pg_dsn, min_size=1, open=False)


# psycopg_pool doesn't validate these (it accepts negative timeouts, any
# jitter, non-callable callbacks and fails later, or never): greenpool only.
@pytest.mark.parametrize("cls", [pytest.param(GREEN, id="greenpool"), pytest.param(GREEN_NULL, id="greenpool-null")])
@pytest.mark.parametrize(
    "kwargs, exc, param",
    [
        ({"timeout": -1}, ValueError, "timeout"),
        ({"max_lifetime": -1}, ValueError, "max_lifetime"),
        ({"max_lifetime": 0}, ValueError, "max_lifetime"),
        ({"max_idle": -5}, ValueError, "max_idle"),
        ({"reconnect_timeout": -1}, ValueError, "reconnect_timeout"),
        ({"lifetime_jitter": 1.0}, ValueError, "lifetime_jitter"),
        ({"lifetime_jitter": -0.1}, ValueError, "lifetime_jitter"),
        ({"max_waiting": -1}, ValueError, "max_waiting"),
        ({"max_size": "4"}, TypeError, "max_size"),
        ({"timeout": "soon"}, TypeError, "timeout"),
        ({"configure": "not callable"}, TypeError, "configure"),
        ({"check": 42}, TypeError, "check"),
        ({"reset": object()}, TypeError, "reset"),
        ({"reconnect_failed": "x"}, TypeError, "reconnect_failed"),
        ({"kwargs": ["not", "a", "dict"]}, TypeError, "kwargs"),
        ({"connection_class": dict}, TypeError, "connection_class"),
        ({"open": "no"}, TypeError, "open"),
        ({"close_returns": "yes"}, TypeError, "close_returns"),
        ({"name": 123}, TypeError, "name"),
    ],
)
def test_bad_constructor_input_greenpool_only(
    cls: type, pg_dsn: str, kwargs: dict[str, Any], exc: type, param: str
) -> None:
    with pytest.raises(exc, match=param):
        cls(pg_dsn, **{"open": True, **kwargs})


@pytest.mark.parametrize("cls", [pytest.param(GREEN, id="greenpool"), pytest.param(GREEN_NULL, id="greenpool-null")])
def test_wait_checks_its_timeout(cls: type, make_pool: Callable[..., Any]) -> None:
    pool = make_pool(cls, **sizes(cls, 1, 1))
    pool.open()
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        pool.wait(-1)
    assert not pool.closed


def test_min_size_zero_says_where_max_size_came_from(pg_dsn: str) -> None:
    with pytest.raises(ValueError, match="max_size must be > 0 .*defaults to min_size"):
        GREEN(pg_dsn, min_size=0, open=False)


def test_bad_min_size_type_greenpool_only(pg_dsn: str) -> None:
    with pytest.raises(TypeError, match="min_size"):
        GREEN(pg_dsn, min_size=2.5, open=False)


# --------------------------------------------------------------------------
# Unreachable or wrong database
# --------------------------------------------------------------------------


def _bad_dsns(pg_dsn: str, refused_port: int) -> dict[str, tuple[str, str]]:
    """name -> (dsn, a fragment of the driver's error message)."""
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    unreachable = psycopg.conninfo.make_conninfo(
        "", **{**params, "host": "127.0.0.1", "port": str(refused_port), "connect_timeout": "5"}
    )
    wrong_db = psycopg.conninfo.make_conninfo("", **{**params, "dbname": "greenpool_no_such_db"})
    return {
        "unreachable": (unreachable, "Connection refused"),
        "wrong_dbname": (wrong_db, 'database "greenpool_no_such_db" does not exist'),
    }


@pytest.mark.parametrize("which", ["unreachable", "wrong_dbname"])
@pytest.mark.parametrize("cls", ALL_POOLS)
def test_open_wait_bad_database_raises_pool_timeout(
    cls: type, make_pool: Callable[..., Any], pg_dsn: str, refused_port: int, which: str
) -> None:
    dsn, message = _bad_dsns(pg_dsn, refused_port)[which]
    pool = make_pool(cls, dsn, **sizes(cls, 1, 1))
    t0 = time.monotonic()
    with pytest.raises(psycopg_pool.PoolTimeout) as info:
        pool.open(wait=True, timeout=2)
    elapsed = time.monotonic() - t0
    assert elapsed < 3.5, elapsed
    if not is_null(cls) and not (is_green(cls) and which == "wrong_dbname"):
        assert elapsed >= 1.9, elapsed  # retried until the timeout
    if is_green(cls) and which == "wrong_dbname":
        # Intended difference: a configuration error fails at once.
        assert elapsed < 1.9, elapsed
    assert pool.closed
    if is_green(cls):
        # Intended difference: greenpool tells why.
        assert message in str(info.value)
        assert isinstance(info.value.__cause__, psycopg.OperationalError)


@pytest.mark.parametrize("cls", [GREEN, GREEN_NULL])
def test_open_wait_on_a_server_that_never_answers_respects_the_timeout(
    cls: type, make_pool: Callable[..., Any], pg_dsn: str
) -> None:
    """A listener that accepts and never answers: libpq would wait 130 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        params = {**psycopg.conninfo.conninfo_to_dict(pg_dsn), "host": "127.0.0.1", "port": silent.getsockname()[1]}
        pool = make_pool(cls, psycopg.conninfo.make_conninfo("", **params), **sizes(cls, 1, 1))
        t0 = time.monotonic()
        with pytest.raises(psycopg_pool.PoolTimeout):
            pool.open(wait=True, timeout=1)
        assert time.monotonic() - t0 < 3
        assert pool.closed


@pytest.mark.parametrize("cls", POOLS)
def test_getconn_while_database_unreachable(
    cls: type, make_pool: Callable[..., Any], pg_dsn: str, refused_port: int
) -> None:
    """Intended difference: with no connection alive and connects failing,
    greenpool fails fast (with the driver's error); psycopg_pool waits the
    whole timeout."""
    dsn, message = _bad_dsns(pg_dsn, refused_port)["unreachable"]
    pool = make_pool(cls, dsn, min_size=1, timeout=1.5)
    pool.open()
    if is_green(cls):
        wait_until(lambda: pool.get_stats()["connections_errors"] >= 1, what="a failed connect")
    else:
        time.sleep(0.3)
    t0 = time.monotonic()
    with pytest.raises(psycopg_pool.PoolTimeout) as info:
        pool.getconn()
    elapsed = time.monotonic() - t0
    if is_green(cls):
        assert elapsed < 0.5, elapsed
        assert message in str(info.value)
    else:
        assert 1.4 <= elapsed < 3.0, elapsed


@pytest.mark.parametrize("name", ["ConnectionPool", "NullConnectionPool"])
def test_signature_has_psycopg_pools_parameters_and_defaults(name: str) -> None:
    """`inspect.signature`, IDEs and type checkers see psycopg_pool's parameters (NullConnectionPool took **kwargs)."""
    import inspect

    ours = inspect.signature(getattr(greenpool, name)).parameters
    theirs = inspect.signature(getattr(psycopg_pool, name)).parameters
    for pname, param in theirs.items():
        assert pname in ours, pname
        if pname != "connection_class":  # greenpool's GeventConnection
            assert ours[pname].default == param.default, pname
        assert ours[pname].kind == param.kind, pname


def test_a_connection_the_server_closed_while_idle_is_not_lent(
    make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]
) -> None:
    """A backend terminated while its connection sits idle (a restart, a
    failover, `idle_session_timeout` do it to all of them): the next checkout
    sees the socket readable, without a round trip, and lends another
    (psycopg_pool without `check` lends the dead one)."""
    pool = opened(make_pool(greenpool.ConnectionPool, min_size=1, max_size=1))
    with pool.connection() as conn:
        victim = pid_of(conn)
    terminate(monitor, victim)
    with pool.connection(timeout=10) as conn:
        assert pid_of(conn) != victim
        assert conn.execute("select 1").fetchone() == (1,)
    assert pool.get_stats()["connections_lost"] == 1


def test_a_read_only_error_replaces_every_connection(
    make_pool: Callable[..., Any], monitor: psycopg.Connection[Any], pg_dsn: str, read_only_role: str
) -> None:
    """A write refused with 25006 (the server is a standby, or was demoted): the
    pool retires every connection to it, counted once as a failover."""
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=read_only_role)
    pool = opened(make_pool(greenpool.ConnectionPool, conninfo=dsn, min_size=3, max_size=3))
    held = hold_all(pool, 3)
    before = {pid_of(c) for c in held}
    for conn in held:
        pool.putconn(conn)
    both_lent = threading.Barrier(2, timeout=10)

    def write(i: int) -> None:
        with pool.connection() as conn:
            both_lent.wait()  # both lent before either fails
            conn.execute("create temporary table gp_ro_probe (x int)")

    _, raised = run_threads(write, 2, timeout=20)
    assert [type(ex) for ex in raised] == [psycopg.errors.ReadOnlySqlTransaction] * 2
    assert pool.get_stats()["failovers"] == 1  # two connections to the same server: one failover
    wait_until(lambda: not (backends(monitor, pool.test_app_name) & before), what="the old connections closed")
    settle(pool, 3)


def test_an_unknown_database_fails_open_at_once(make_pool: Callable[..., Any], pg_dsn: str) -> None:
    """A configuration error (3D000) fails open(wait=True) now, with the
    server's message, not after the whole timeout (psycopg_pool waits it out)."""
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, dbname=unique("gp_no_such_db"))
    pool = make_pool(greenpool.ConnectionPool, conninfo=dsn, min_size=1, max_size=1)
    t0 = time.monotonic()
    with pytest.raises(greenpool.PoolTimeout, match="does not exist") as info:
        pool.open(wait=True, timeout=30)
    assert time.monotonic() - t0 < 5
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


@pytest.fixture
def limited_role(monitor: psycopg.Connection[Any]) -> Iterator[str]:
    """A role allowed 2 connections: its third gets "too many connections" (53300)."""
    role = unique("gp_lim")
    monitor.execute(f"create role {role} login connection limit 2")
    yield role
    monitor.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", [role])
    monitor.execute(f"drop role {role}")


def test_a_server_at_its_connection_limit_is_not_hammered(
    make_pool: Callable[..., Any], pg_dsn: str, limited_role: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refuses more connections (53300): the pool serves every
    request from the connections it has, backs off, and says so once."""
    caplog.set_level(logging.DEBUG, logger="greenpool")
    dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=limited_role)
    pool = opened(make_pool(greenpool.ConnectionPool, conninfo=dsn, min_size=1, max_size=4, timeout=20))

    def work(i: int) -> int:
        with pool.connection() as conn:
            time.sleep(0.05)
            return int(conn.execute("select 1").fetchone()[0])

    t0 = time.monotonic()
    results, raised = run_threads(lambda i: [work(i) for _ in range(10)], 8, timeout=60)
    elapsed = time.monotonic() - t0
    assert raised == [] and all(r == [1] * 10 for r in results)  # every request served
    stats = pool.get_stats()
    assert stats["pool_size"] <= 4
    assert stats["connections_errors"] <= 3 + 2 * elapsed  # backed off: a few a second at most
    outage_lines = [r for r in caplog.records if r.levelno >= logging.WARNING and "connects failing" in r.getMessage()]
    # One line an outage, not one an attempt; a connect that succeeds when a
    # backend of the role exits ends it, and the next refusal starts another.
    assert 1 <= len(outage_lines) <= 2
    assert "too many connections" in outage_lines[0].getMessage()
