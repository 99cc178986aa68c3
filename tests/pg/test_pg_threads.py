"""greenpool.ConnectionPool used from plain OS threads (no gevent hub in them).

The same pool must work for threads exactly as psycopg_pool's does: every
request served, nothing leaked, `max_size` respected. The hammering test is
parametrized over both pools to show parity; the others exercise greenpool's
thread paths (lock-based wakeups, background cleaning in threads) and the
mixed case of one pool shared by OS threads and greenlets.

Every thread is joined with a timeout (a hang fails the test), and a
last-resort faulthandler timer ends the process if something blocks the main
thread itself.
"""

from __future__ import annotations

import gc
import json
import random
import textwrap
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import helpers
import psycopg
import psycopg_pool
import pytest
from helpers import close_pools, destroy_main_hub, last_resort_deadline, open_pool

import greenpool

GREEN = greenpool.ConnectionPool
POOLS = [pytest.param(psycopg_pool.ConnectionPool, id="psycopg_pool"), pytest.param(GREEN, id="greenpool")]

TEST_DEADLINE = 60


@pytest.fixture(autouse=True)
def _last_resort_deadline() -> Iterator[None]:
    with last_resort_deadline(TEST_DEADLINE * 3):
        yield


@pytest.fixture(autouse=True)
def _no_gevent_hub() -> None:
    """These tests are about plain threads: drop a gevent hub that an
    in-process gevent test may have left in the main thread."""
    destroy_main_hub()


@pytest.fixture
def make_pool(pg_dsn: str) -> Iterator[Callable[..., Any]]:
    """`make_pool(cls=GREEN, **kwargs)`: an opened pool; closed at teardown."""
    pools: list[Any] = []

    def factory(cls: type = GREEN, **kwargs: Any) -> Any:
        kwargs.setdefault("kwargs", {"application_name": f"gp_threads_{uuid.uuid4().hex[:12]}"})
        return open_pool(pools, cls, pg_dsn, **kwargs)

    yield factory
    close_pools(pools)


def run_threads(target: Callable[[int], None], n: int, timeout: float = 30.0) -> list[BaseException]:
    """Run `target(i)` in `n` daemon threads; return their exceptions.

    Fails the test if a thread is still running after `timeout` seconds.
    """
    _, errors = helpers.run_threads(target, n, timeout)
    return errors


def settle(pool: Any, available: int, timeout: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stats = pool.get_stats()
        if stats.get("pool_available", 0) == available and not stats.get("requests_waiting"):
            return dict(stats)
        if time.monotonic() >= deadline:
            pytest.fail(f"pool not settled at pool_available == {available}: {stats}")
        time.sleep(0.01)


class Gauge:
    """Counts connections in use at once, across threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.pids: set[int] = set()

    def enter(self, pid: int) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.pids.add(pid)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


@pytest.mark.parametrize("cls", POOLS)
def test_threads_hammer_the_pool(cls: type, make_pool: Callable[..., Any]) -> None:
    """16 threads x 150 small queries on a pool of 2..6 connections."""
    pool = make_pool(cls, min_size=2, max_size=6)
    gauge = Gauge()
    per_thread = 150

    def worker(i: int) -> None:
        for j in range(per_thread):
            with pool.connection(timeout=20) as conn:
                gauge.enter(conn.info.backend_pid)
                try:
                    row = conn.execute("select %s::int, %s::int", (i, j)).fetchone()
                finally:
                    gauge.leave()
                assert row == (i, j)

    errors = run_threads(worker, 16)
    assert errors == []
    assert gauge.peak <= 6
    assert len(gauge.pids) <= 6
    stats = pool.get_stats()
    size = stats["pool_size"]
    assert 2 <= size <= 6
    stats = settle(pool, size)  # every connection came back
    assert stats.get("requests_errors", 0) == 0
    assert stats.get("returns_bad", 0) == 0


def test_threads_with_short_timeouts_leak_nothing(make_pool: Callable[..., Any]) -> None:
    """16 threads fight for 2 connections with 15 ms timeouts (holding them up
    to 10 ms): many requests time out while connections are being handed
    over; none is lost."""
    pool = make_pool(min_size=2, max_size=2)
    gauge = Gauge()
    served = 0
    timeouts = 0
    counts = threading.Lock()

    def worker(i: int) -> None:
        nonlocal served, timeouts
        rnd = random.Random(i)
        for _ in range(40):
            try:
                conn = pool.getconn(timeout=0.015)
            except psycopg_pool.PoolTimeout:
                with counts:
                    timeouts += 1
                continue
            gauge.enter(conn.info.backend_pid)
            try:
                time.sleep(rnd.random() * 0.01)
            finally:
                gauge.leave()
                pool.putconn(conn)
            with counts:
                served += 1

    errors = run_threads(worker, 16)
    assert errors == []
    assert served > 0 and timeouts > 0, (served, timeouts)
    assert gauge.peak <= 2 and len(gauge.pids) == 2
    stats = settle(pool, 2)
    assert stats["pool_size"] == 2
    t0 = time.monotonic()
    a, b = pool.getconn(timeout=1), pool.getconn(timeout=1)
    assert time.monotonic() - t0 < 0.1
    pool.putconn(a)
    pool.putconn(b)


def test_threads_returning_dirty_and_broken_connections(make_pool: Callable[..., Any]) -> None:
    """Threads return connections idle, in a transaction, in error, or
    closed: the pool rolls back or replaces them, and ends up whole."""
    pool = make_pool(min_size=3, max_size=3)
    closed = 0
    closed_lock = threading.Lock()

    def worker(i: int) -> None:
        nonlocal closed
        rnd = random.Random(i)
        for _ in range(30):
            conn = pool.getconn(timeout=20)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            what = rnd.choice(["commit", "intrans", "inerror", "close"])
            if what == "commit":
                conn.execute("select 1")
                conn.commit()
            elif what == "intrans":
                conn.execute("select 1")
            elif what == "inerror":
                try:
                    conn.execute("select 1/0")
                except psycopg.errors.DivisionByZero:
                    pass
            else:
                conn.close()
                with closed_lock:
                    closed += 1
            pool.putconn(conn)

    errors = run_threads(worker, 8)
    assert errors == []
    stats = settle(pool, 3)
    assert stats["returns_bad"] == closed
    assert stats["connections_num"] == 3 + closed
    with pool.connection(timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_threads_and_greenlets_share_a_pool(make_pool: Callable[..., Any]) -> None:
    """A pool opened in a thread running a gevent hub (its background jobs
    are greenlets of that hub) serves that hub's greenlets and 8 plain OS
    threads at once. The hub's thread keeps running its loop meanwhile (it
    must: that's where the pool connects)."""
    import gevent

    hub = gevent.get_hub()
    try:
        pool = make_pool(min_size=1, max_size=6)
        gauge = Gauge()

        def use(i: int, j: int) -> None:
            with pool.connection(timeout=20) as conn:
                gauge.enter(conn.info.backend_pid)
                try:
                    assert conn.execute("select %s::int", (i * 1000 + j,)).fetchone() == (i * 1000 + j,)
                finally:
                    gauge.leave()

        def thread_worker(i: int) -> None:
            for j in range(100):
                use(i, j)

        def greenlet_worker(i: int) -> None:
            for j in range(100):
                use(100 + i, j)

        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=lambda i=i: _record(errors, thread_worker, i), daemon=True) for i in range(8)
        ]
        for t in threads:
            t.start()
        greenlets = [gevent.spawn(greenlet_worker, i) for i in range(8)]
        gevent.joinall(greenlets, timeout=30, raise_error=True)
        deadline = time.monotonic() + 30
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            gevent.sleep(0.01)  # keep the hub running for the pool's jobs
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert gauge.peak <= 6 and len(gauge.pids) <= 6
        size = pool.get_stats()["pool_size"]
        deadline = time.monotonic() + 10
        while pool.get_stats()["pool_available"] != size and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert pool.get_stats()["pool_available"] == size
        pool.close()
    finally:
        hub.destroy(destroy_loop=True)


def test_threads_each_running_a_gevent_hub(make_pool: Callable[..., Any]) -> None:
    """A pool opened in a plain thread, used by greenlets of 3 OS threads that
    each run their own gevent hub (wakeups cross threads), plus 3 plain
    threads: everyone served, max_size respected."""
    pool = make_pool(min_size=1, max_size=4)
    gauge = Gauge()

    def use(tag: int) -> None:
        with pool.connection(timeout=20) as conn:
            gauge.enter(conn.info.backend_pid)
            try:
                assert conn.execute("select %s::int", (tag,)).fetchone() == (tag,)
            finally:
                gauge.leave()

    def hub_thread(i: int) -> None:
        import gevent

        hub = gevent.get_hub()
        try:

            def green_worker(k: int) -> None:
                for j in range(10):
                    use(i * 1000 + k * 10 + j)

            greenlets = [gevent.spawn(green_worker, k) for k in range(10)]
            gevent.joinall(greenlets, timeout=30, raise_error=True)
            assert all(g.successful() for g in greenlets)
        finally:
            hub.destroy(destroy_loop=True)

    def plain_thread(i: int) -> None:
        for j in range(100):
            use(10_000 + i * 1000 + j)

    errors = run_threads(lambda i: hub_thread(i) if i < 3 else plain_thread(i), 6)
    assert errors == []
    assert gauge.peak <= 4 and len(gauge.pids) <= 4
    size = pool.get_stats()["pool_size"]
    stats = settle(pool, size)
    assert stats["requests_errors"] == 0


def _record(errors: list[BaseException], fn: Callable[[int], None], i: int) -> None:
    try:
        fn(i)
    except BaseException as ex:
        errors.append(ex)


def _borrower(pool: Any, outcomes: list[str], sql: str) -> Callable[[int], None]:
    """A thread's job: borrow, run `sql` (leaving a transaction for the pool to
    roll back), give back; "ok" or "timeout" goes to `outcomes`."""

    def borrow(i: int) -> None:
        try:
            conn = pool.getconn(timeout=3)
        except psycopg_pool.PoolTimeout:
            outcomes.append("timeout")
            return
        conn.execute(sql)
        pool.putconn(conn)
        outcomes.append("ok")

    return borrow


def test_pool_opened_beside_an_idle_gevent_hub_serves_threads(make_pool: Callable[..., Any]) -> None:
    """Bug: a pool opened in a thread where a gevent hub merely *exists*
    (something called `gevent.get_hub()`, `gevent.spawn()`...) but doesn't
    run - like the main thread of a threaded server - does all its
    background work in that hub. Used from plain OS threads, it then never
    rolls back returned connections, never grows, never reconnects: here two
    connections returned in a transaction are never cleaned, and the pool
    starves."""
    import gevent

    hub = gevent.get_hub()  # exists in the main thread, never runs
    try:
        pool = make_pool(min_size=2, max_size=2)
        outcomes: list[str] = []
        worker = _borrower(pool, outcomes, "select 1")
        for _ in range(4):  # one thread after the other; main thread blocked in join()
            assert run_threads(worker, 1, timeout=10) == []
        assert outcomes == ["ok"] * 4
    finally:
        pool.close()
        hub.destroy(destroy_loop=True)


def test_forget_all_in_a_forked_child_starts_afresh(run_python: Callable[..., Any]) -> None:
    """After `os.fork()` only the forking thread exists in the child: a lock
    another thread held, the housekeeper thread and its counts are the
    parent's. `forget_all()` (Peewee's `dispose()`) in the child must not
    deadlock on that lock, and the pool must refill to `min_size` and serve
    from new connections of its own."""
    code = """
        import json, os, signal, threading
        from greenpool import ConnectionPool

        pool = ConnectionPool(os.environ["GREENPOOL_TEST_DSN"], min_size=2, max_size=3, open=True)
        pool.wait(10)
        parent_backends = {c.pgconn.backend_pid for c in [pool.getconn(), pool.getconn()]}
        held, done = threading.Event(), threading.Event()

        def hold_the_lock():
            # Private: the pool's lock held by another thread at the fork; no
            # public call holds it (the driver is never called under it).
            with pool._lock:
                held.set()
                done.wait(30)

        threading.Thread(target=hold_the_lock, daemon=True).start()
        held.wait(10)
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a deadlocked child must not outlive the test
            try:
                pool.forget_all()
                with pool.connection(timeout=10) as conn:
                    backend = conn.pgconn.backend_pid
                for _ in range(200):  # the new housekeeper tops up to min_size
                    if pool.get_stats()["pool_size"] >= 2:
                        break
                    threading.Event().wait(0.05)
                print(json.dumps({"fresh": backend not in parent_backends, "size": pool.get_stats()["pool_size"]}))
                pool.close()
            finally:
                os._exit(0)
        done.set()
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
    """
    result = run_python(textwrap.dedent(code), timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"fresh": True, "size": 2}, result.stderr


def test_a_pool_dropped_without_close_is_collected(pg_dsn: str, monitor: psycopg.Connection[Any]) -> None:
    """As psycopg_pool's: the background threads hold the pool weakly, so an
    unreachable pool is collected, its connections closed and its threads ended."""
    app = helpers.unique("gp_dropped")
    pool = GREEN(pg_dsn, min_size=2, kwargs={"application_name": app}, open=True)
    pool.wait(10)
    assert len(helpers.backends(monitor, app)) == 2
    ref, workers = weakref.ref(pool), f"{pool.name}-worker"
    del pool
    helpers.wait_until(lambda: gc.collect() >= 0 and ref() is None, what="the pool to be collected")
    helpers.wait_until(lambda: not helpers.backends(monitor, app), what="its connections to close")
    helpers.wait_until(lambda: not any(t.name == workers for t in threading.enumerate()), what="its housekeeper to end")


def test_pool_opened_in_a_greenlet_serves_threads_while_its_hub_is_blocked(make_pool: Callable[..., Any]) -> None:
    """A pool opened by a greenlet does its background work in that greenlet's
    hub, which runs only while its thread waits in gevent. Plain threads
    using the pool while that thread blocks elsewhere (here in `join()`)
    must still get new connections and have returned ones cleaned."""
    import gevent

    made_in: list[tuple[int, bool]] = []  # each connect's OS thread, and whether a hub's greenlet made it

    def configure(conn: Any) -> None:
        made_in.append((threading.get_ident(), gevent.getcurrent().parent is not None))

    pools: list[Any] = []
    gevent.spawn(lambda: pools.append(make_pool(min_size=0, max_size=3, configure=configure))).join()
    pool = pools[0]
    # Its background work is this hub's: a connect a greenlet asks for is made by a greenlet here.
    gevent.spawn(lambda: pool.putconn(pool.getconn(timeout=10))).join(15)
    assert made_in == [(threading.get_ident(), True)]
    outcomes: list[str] = []
    worker = _borrower(pool, outcomes, "select pg_sleep(0.1)")
    try:
        for n in (3, 3):  # all at once: the pool must grow to 3, then reuse
            assert run_threads(worker, n, timeout=10) == []
        assert outcomes == ["ok"] * 6
    finally:
        pool.close()
        destroy_main_hub()


def test_connections_the_pool_closes_are_freed_without_the_cyclic_gc(make_pool: Callable[..., Any]) -> None:
    """A closed connection is freed as soon as the pool drops it, whether it
    was lent by `connection()`, by `getconn()`, or closed while lent
    (`close_lent()`): no reference cycle through its slot or lease leaves
    it, and its psycopg objects, to the cyclic collector."""
    pool = make_pool(min_size=2, max_size=2)
    refs = []
    with pool.connection() as conn:
        conn.execute("select 1")
    refs.append(weakref.ref(conn))
    conn = pool.getconn()
    pool.putconn(conn)
    refs.append(weakref.ref(conn))
    with pool.connection() as conn:
        pool.close_lent(0)
        helpers.wait_until(lambda lent=conn: lent.closed, what="the lent connection to close")
    refs.append(weakref.ref(conn))
    del conn
    gc.disable()
    try:
        pool.drain()
        helpers.wait_until(lambda: all(ref() is None for ref in refs), what="the closed connections to be freed")
    finally:
        gc.enable()


def test_putconn_while_the_pool_closes_the_connection_is_quiet(pg_dsn: str) -> None:
    """`putconn()` of a connection that `close_lent()` (another thread's
    Peewee `close_stale()`) closes just as it is given back: nothing to give
    back, no error from the half-dismantled connection."""

    class ClosedWhileGivenBack(greenpool.GeventConnection):
        close_now: Callable[[Any], None] | None = None

        @property
        def _pool(self) -> Any:
            close_now, type(self).close_now = type(self).close_now, None
            value = self.__dict__.get("_test_pool")
            if close_now is not None:
                close_now(self)  # right after putconn() read it
            return value

        @_pool.setter
        def _pool(self, value: Any) -> None:
            self.__dict__["_test_pool"] = value

    pool = GREEN(pg_dsn, min_size=1, max_size=1, connection_class=ClosedWhileGivenBack, open=True)
    try:
        pool.wait(10)
        conn = pool.getconn()

        def close_lent(c: Any) -> None:
            pool.close_lent(0)
            helpers.wait_until(lambda: c.closed, what="the pool to close it")

        ClosedWhileGivenBack.close_now = close_lent
        pool.putconn(conn)
        assert conn.closed
        with pool.connection(timeout=10) as other:  # its successor serves
            other.execute("select 1")
    finally:
        pool.close()
