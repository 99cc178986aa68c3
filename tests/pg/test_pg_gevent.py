"""greenpool.ConnectionPool under gevent, against a real PostgreSQL.

Two ways to run gevent code here:

- In this (pytest) process, *without* monkey-patching: greenlets made with
  `gevent.spawn`, and greenpool's default `GeventConnection` waiting on the
  hub. The pytest process must stay unpatched, so that is all we do here; a
  fixture destroys the hub after each test so that later tests (which drive
  pools from plain threads) don't find one in the main thread.
- In a child interpreter (`run_python`), for everything that needs
  `monkey.patch_all()` or a particular import order.

Every test is bounded: greenlets are joined with timeouts (and killed if
late), child interpreters have a timeout, and a last-resort faulthandler
timer ends the process if the hub itself gets blocked.

Timing assertions are about gross effects only (e.g. 20 x 0.2 s queries over
20 connections finish in well under the 4 s they take when serialized).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import helpers
import psycopg
import pytest
from greenlet import GreenletExit
from helpers import close_pools, last_resort_deadline, open_pool, unique

import greenpool
from greenpool.testing.proxy import Proxy

GREEN = greenpool.ConnectionPool

#: A test (or a child interpreter) must end within this many seconds.
TEST_DEADLINE = 60

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _last_resort_deadline() -> Iterator[None]:
    """If the hub is blocked so that no gevent timeout can fire, dump the
    stacks and end the process instead of hanging forever."""
    with last_resort_deadline(TEST_DEADLINE * 3):
        yield


@pytest.fixture
def hub() -> Iterator[Any]:
    """This thread's gevent hub, destroyed after the test.

    Created before any pool, so pools opened in the test run their
    background jobs as greenlets of this hub.
    """
    the_hub = gevent.get_hub()
    yield the_hub
    the_hub.destroy(destroy_loop=True)


@pytest.fixture
def make_pool(hub: Any, pg_dsn: str) -> Iterator[Callable[..., Any]]:
    """`make_pool(conninfo=None, **kwargs)`: an open greenpool pool with a
    unique application_name (`pool.test_app_name`); closed at teardown,
    before the hub is destroyed."""
    pools: list[Any] = []

    def factory(conninfo: str | None = None, wait: bool = True, **kwargs: Any) -> Any:
        app = f"gp_gevent_{uuid.uuid4().hex[:12]}"
        kwargs.setdefault("kwargs", {"application_name": app})
        pool = open_pool(pools, GREEN, pg_dsn if conninfo is None else conninfo, wait=wait, **kwargs)
        pool.test_app_name = app
        return pool

    yield factory
    close_pools(pools)


def run_green(fn: Callable[[], Any], timeout: float = TEST_DEADLINE) -> Any:
    """Run `fn` in a greenlet; fail the test if it isn't done in `timeout`."""
    return helpers.run_green(fn, timeout)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll cooperatively until `predicate()` is truthy."""
    return helpers.wait_until(predicate, timeout, what, interval=0.005)


def settle(pool: Any, available: int, timeout: float = 10.0) -> dict[str, int]:
    def ready() -> Any:
        stats = pool.get_stats()
        return stats if stats["pool_available"] == available and not stats["requests_waiting"] else None

    return dict(wait_until(ready, timeout, f"pool_available == {available}"))


def active_queries(monitor: psycopg.Connection[Any], app: str, like: str) -> list[tuple[Any, ...]]:
    """Queries still running on the server for the pool's connections."""
    return monitor.execute(
        "select pid, state, query from pg_stat_activity"
        " where application_name = %s and state <> 'idle' and query like %s",
        (app, like),
    ).fetchall()


def record_outcome(
    outcomes: list[str], fn: Callable[[], Any], completed: str, interrupted: dict[type[BaseException], str]
) -> None:
    """Run `fn` and append to `outcomes` `completed`, or the label that
    `interrupted` maps the class of the exception `fn` raised to (a
    GreenletExit is re-raised after that, so the greenlet still dies)."""
    try:
        fn()
    except tuple(interrupted) as ex:
        outcomes.append(next(label for cls, label in interrupted.items() if isinstance(ex, cls)))
        if isinstance(ex, GreenletExit):
            raise
    else:
        outcomes.append(completed)


def run_child(run_python: RunPython, code: str, timeout: float = 90) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; return the JSON it prints last."""
    proc = run_python(textwrap.dedent(code), timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"child printed no result:\n{proc.stdout}\n{proc.stderr}"
    return dict(json.loads(lines[-1]))


# --------------------------------------------------------------------------
# Import orders (child interpreters)
# --------------------------------------------------------------------------

_CONCURRENCY_CHILD = """
import json, os, sys, time

ORDER = {order!r}
OPEN_IN_GREENLET = {open_in_greenlet!r}
if ORDER == "patch_first":
    from gevent import monkey
    monkey.patch_all()
import psycopg
import greenpool
from greenpool import ConnectionPool
if ORDER == "patch_after":
    from gevent import monkey
    monkey.patch_all()
import gevent
import gevent.monkey

DSN = os.environ["GREENPOOL_TEST_DSN"]


def make_pool():
    pool = ConnectionPool(DSN, min_size=20, open=False)
    pool.open(wait=True, timeout=20)
    return pool


def query(pool, i):
    with pool.connection(timeout=10) as conn:
        return list(conn.execute(
            "select %s::int, pg_backend_pid() from pg_sleep(0.2)", (i,)
        ).fetchone())


def main():
    pool = gevent.spawn(make_pool).get() if OPEN_IN_GREENLET else make_pool()
    try:
        t0 = time.monotonic()
        greenlets = [gevent.spawn(query, pool, i) for i in range(20)]
        gevent.joinall(greenlets, timeout=30, raise_error=True)
        elapsed = time.monotonic() - t0
        rows = [g.value for g in greenlets]
        stats = pool.get_stats()
    finally:
        pool.close()
    print(json.dumps({{
        "elapsed": elapsed,
        "values": [r[0] for r in rows],
        "pids": len({{r[1] for r in rows}}),
        "patched": gevent.monkey.is_module_patched("socket"),
        "psycopg_wait": __import__("psycopg.waiting").waiting.wait.__name__,
        "psycopg_impl": psycopg.pq.__impl__,
        "requests_num": stats["requests_num"],
    }}))


with gevent.Timeout(50):
    main()
"""


@pytest.mark.parametrize(
    "order, open_in_greenlet",
    [
        pytest.param("patch_first", False, id="patch_all-then-import"),
        pytest.param("patch_after", False, id="import-then-patch_all"),
        pytest.param("never", False, id="never-patched"),
        pytest.param("never", True, id="never-patched-opened-in-greenlet"),
    ],
)
def test_import_order_concurrency(run_python: RunPython, order: str, open_in_greenlet: bool) -> None:
    """20 greenlets x `pg_sleep(0.2)` over 20 connections run concurrently,
    whatever the import order and whether gevent patched anything."""
    result = run_child(run_python, _CONCURRENCY_CHILD.format(order=order, open_in_greenlet=open_in_greenlet))
    assert result["values"] == list(range(20))
    assert result["pids"] == 20  # 20 queries on 20 distinct connections at once
    assert result["requests_num"] == 20
    assert result["patched"] is (order != "never")
    if order == "patch_after" and result["psycopg_impl"] in ("binary", "c"):
        # The problem greenpool works around: psycopg picked its blocking C
        # wait function before the patch.
        assert result["psycopg_wait"] == "wait_c"
    # Serialized, that's 20 x 0.2 = 4 s.
    assert result["elapsed"] < 2.0, result


_SERIALIZED_CHILD = """
import json, os, time
import psycopg
import psycopg_pool
from gevent import monkey
monkey.patch_all()
import gevent

DSN = os.environ["GREENPOOL_TEST_DSN"]


def timed(fn, n):
    t0 = time.monotonic()
    greenlets = [gevent.spawn(fn, i) for i in range(n)]
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    assert [g.value for g in greenlets] == list(range(n))
    return time.monotonic() - t0


def main():
    pool = psycopg_pool.ConnectionPool(DSN, min_size=20, open=False)
    pool.open(wait=True, timeout=20)

    def via_pool(i):
        with pool.connection() as conn:
            return conn.execute("select %s::int from pg_sleep(0.2)", (i,)).fetchone()[0]

    try:
        psycopg_pool_elapsed = timed(via_pool, 20)
    finally:
        pool.close()

    conns = [psycopg.connect(DSN, autocommit=True) for _ in range(10)]

    def plain(i):
        return conns[i].execute("select %s::int from pg_sleep(0.2)", (i,)).fetchone()[0]

    try:
        plain_elapsed = timed(plain, 10)
    finally:
        for conn in conns:
            conn.close()
    print(json.dumps({"psycopg_pool": psycopg_pool_elapsed, "plain": plain_elapsed}))


with gevent.Timeout(50):
    main()
"""


@pytest.mark.slow
def test_psycopg_imported_before_patching_serializes(run_python: RunPython) -> None:
    """Documents the problem greenpool solves: psycopg imported before
    `patch_all()` blocks the hub on every query, so psycopg_pool (and plain
    psycopg connections) serialize greenlets: 20 x 0.2 s take ~4 s, 10 x 0.2 s
    on 10 plain connections take ~2 s (compare test_import_order_concurrency)."""
    result = run_child(run_python, _SERIALIZED_CHILD)
    assert result["psycopg_pool"] >= 2.0, result
    assert result["plain"] >= 1.5, result


# --------------------------------------------------------------------------
# No lock held across a connect
# --------------------------------------------------------------------------


def test_checkouts_not_blocked_by_slow_connect(
    make_pool: Callable[..., Any], make_proxy: Callable[..., Proxy], pg_dsn: str
) -> None:
    """While the pool grows through a slow (0.3 s) connect, other greenlets
    keep checking idle connections in and out without waiting for it."""
    proxy = make_proxy(connect_delay=0.3)

    def body() -> None:
        pool = make_pool(proxy.dsn(pg_dsn), min_size=2, max_size=4)
        h1, h2 = pool.getconn(), pool.getconn()
        accepted = proxy.stats()["accepted"]
        # The pool is exhausted: this request makes it grow.
        grower = gevent.spawn(pool.getconn, 5)
        wait_until(lambda: proxy.stats()["accepted"] > accepted, 2.0, "the pool to start a connect")
        connect_started = time.monotonic()
        pool.putconn(h1)  # goes to the queued request...
        pool.putconn(grower.get(timeout=1))  # ...which gives it straight back
        pool.putconn(h2)
        # Two idle connections now, a third one still connecting.
        assert pool.get_stats()["pool_available"] == 2
        window_end = connect_started + 0.25
        latencies: list[float] = []

        def hammer() -> None:
            while time.monotonic() < window_end:
                t0 = time.monotonic()
                conn = pool.getconn(timeout=2)
                latencies.append(time.monotonic() - t0)
                pool.putconn(conn)
                gevent.sleep(0)

        # Three hammers for two idle connections: some requests queue too.
        hammers = [gevent.spawn(hammer) for _ in range(3)]
        gevent.joinall(hammers, timeout=5, raise_error=True)
        hammer_done = time.monotonic()
        connect_time = proxy.connect_delay
        assert hammer_done - connect_started < connect_time, "inconclusive: the hammering outlasted the connect"
        assert len(latencies) >= 50, f"only {len(latencies)} checkouts in 0.25 s: the hub was blocked"
        assert max(latencies) < 0.1, f"a checkout waited {max(latencies):.3f} s behind the connect"
        # The connect did complete, after the hammering.
        wait_until(lambda: pool.get_stats()["pool_available"] >= 3, 5.0, "the new connection")
        assert time.monotonic() - connect_started >= 0.25

    run_green(body)


# --------------------------------------------------------------------------
# Interrupted queries
# --------------------------------------------------------------------------


def _check_pool_recovered(pool: Any, monitor: psycopg.Connection[Any], size: int) -> None:
    """All `size` connections usable at once within 2 s, nothing still running."""
    t0 = time.monotonic()
    pids: set[int] = set()
    all_in = gevent.event.Event()

    def user() -> None:
        with pool.connection(timeout=2) as conn:
            row = conn.execute("select pg_backend_pid()").fetchone()
            pids.add(row[0])
            if len(pids) == size:
                all_in.set()
            assert all_in.wait(2), "not all connections usable at once"

    users = [gevent.spawn(user) for _ in range(size)]
    gevent.joinall(users, timeout=5, raise_error=True)
    assert all(u.ready() for u in users)
    assert len(pids) == size
    assert time.monotonic() - t0 < 2.5
    assert active_queries(monitor, pool.test_app_name, "%pg_sleep%") == []
    settle(pool, size)


@pytest.mark.parametrize("sleep", [0.5, 30], ids=["pg_sleep-0.5", "pg_sleep-30"])
@pytest.mark.parametrize("how", ["gevent.Timeout", "gevent.kill"])
def test_interrupted_queries_are_cancelled(
    make_pool: Callable[..., Any], monitor: psycopg.Connection[Any], how: str, sleep: float
) -> None:
    """The field notes' scenario: 20 greenlets on a pool of 4, each query
    interrupted (by `gevent.Timeout(0.05)` or `gevent.kill`) while running
    or while queued. With `pg_sleep(30)` only a server-side cancel can give
    the connections back within the 2 s allowed."""

    def body() -> None:
        pool = make_pool(min_size=4, max_size=4)
        outcomes: list[str] = []

        def query() -> None:
            if how == "gevent.Timeout":
                with gevent.Timeout(0.05):
                    with pool.connection() as conn:
                        conn.execute(f"select pg_sleep({sleep})")
            else:
                with pool.connection() as conn:
                    conn.execute(f"select pg_sleep({sleep})")

        def worker() -> None:
            record_outcome(outcomes, query, "completed", {gevent.Timeout: "interrupted", GreenletExit: "interrupted"})

        workers = [gevent.spawn(worker) for _ in range(20)]
        if how == "gevent.kill":
            gevent.sleep(0.05)
            gevent.killall(workers, block=True, timeout=5)
        else:
            gevent.joinall(workers, timeout=5)
        assert all(w.ready() for w in workers)
        assert outcomes == ["interrupted"] * 20

        _check_pool_recovered(pool, monitor, 4)
        stats = pool.get_stats()
        assert stats["returns_reset"] >= 4  # the 4 interrupted mid-query were cleaned
        assert stats["returns_bad"] == 0
        assert stats["connections_lost"] == 0
        assert stats["connections_num"] == 4  # cancelled and kept, not replaced
        # Each request gave up while queued (an error) or was interrupted
        # mid-query (a reset). Usually that is 16 and 4; on a loaded machine
        # the 20 timeouts may not fall in one loop iteration, and a waiter
        # may get a cleaned connection before its own timeout.
        assert stats["requests_errors"] + stats["returns_reset"] == 20

    run_green(body)


_CANCEL_PATCHED_CHILD = """
import json, os, time
from gevent import monkey
monkey.patch_all()
import gevent, gevent.event
import psycopg
import greenpool

DSN = os.environ["GREENPOOL_TEST_DSN"]
APP = "gp_cancel_child_%d" % os.getpid()


def main():
    pool = greenpool.ConnectionPool(DSN, min_size=4, max_size=4, open=False, kwargs={"application_name": APP})
    pool.open(wait=True, timeout=20)
    outcomes = []

    def worker():
        try:
            with gevent.Timeout(0.05):
                with pool.connection() as conn:
                    conn.execute("select pg_sleep(30)")
            outcomes.append("completed")
        except gevent.Timeout:
            outcomes.append("interrupted")

    gevent.joinall([gevent.spawn(worker) for _ in range(20)], timeout=5)
    t0 = time.monotonic()
    pids = set()
    all_in = gevent.event.Event()

    def user():
        with pool.connection(timeout=2) as conn:
            pids.add(conn.execute("select pg_backend_pid()").fetchone()[0])
            if len(pids) == 4:
                all_in.set()
            all_in.wait(2)

    gevent.joinall([gevent.spawn(user) for _ in range(4)], timeout=5, raise_error=True)
    recovered = time.monotonic() - t0
    with psycopg.connect(DSN, autocommit=True) as mon:
        running = mon.execute(
            "select count(*) from pg_stat_activity where application_name = %s"
            " and state <> 'idle' and query like '%%pg_sleep%%'", (APP,)
        ).fetchone()[0]
    stats = pool.get_stats()
    pool.close()
    print(json.dumps({"outcomes": outcomes, "pids": len(pids), "recovered": recovered,
                      "running": running, "stats": stats}))


with gevent.Timeout(50):
    main()
"""


def test_interrupted_queries_are_cancelled_monkey_patched(run_python: RunPython) -> None:
    """The same under `monkey.patch_all()` (threads are greenlets there)."""
    result = run_child(run_python, _CANCEL_PATCHED_CHILD)
    assert result["outcomes"] == ["interrupted"] * 20
    assert result["pids"] == 4
    assert result["recovered"] < 2.5
    assert result["running"] == 0
    assert result["stats"]["returns_reset"] >= 4
    assert result["stats"]["connections_num"] == 4


_OLD_LIBPQ_CANCEL_CHILD = """
import json, os, time
import gevent, psycopg
from greenpool import ConnectionPool
from greenpool.testing.proxy import Proxy, parse_dsn_host_port

DSN = os.environ["GREENPOOL_TEST_DSN"]


def main(proxy):
    pool = ConnectionPool(proxy.dsn(DSN), min_size=1, max_size=1, open=True)
    pool.wait(10)
    proxy.set_connect_delay(1.5)  # the cancel request's own connection is slow
    gaps = []

    def ticker():
        last = time.monotonic()
        while True:
            gevent.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = gevent.spawn(ticker)
    try:
        with gevent.Timeout(0.1), pool.connection() as conn:
            conn.execute("select pg_sleep(5)")
    except gevent.Timeout:
        pass
    with pool.connection(timeout=10) as conn:  # cancelled, drained, reused
        one = conn.execute("select 1").fetchone()[0]
    tick.kill()
    stats = pool.get_stats()
    pool.close()
    return dict(
        libpq=psycopg.pq.version(),
        cancel_safe=psycopg.capabilities.has_cancel_safe(),
        stall=max(gaps),
        one=one,
        connections_num=stats["connections_num"],
    )


with Proxy(*parse_dsn_host_port(DSN)) as proxy:
    print(json.dumps(gevent.spawn(main, proxy).get()))
"""


def test_a_cancel_through_an_old_libpq_blocks_no_hub(run_python: RunPython) -> None:
    """With a libpq older than 17 (psycopg's Python implementation on the
    system's libpq, here 15) psycopg cancels with the blocking PQcancel: a
    connect and a send. The repair of an interrupted query runs it in the
    hub's thread pool, so a slow cancel connection stalls no greenlet."""
    proc = run_python(_OLD_LIBPQ_CANCEL_CHILD, env={"PSYCOPG_IMPL": "python"}, timeout=60)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["one"] == 1 and result["connections_num"] == 1, result  # the connection was kept
    assert result["stall"] < 0.75, result  # the cancel's 1.5 s connect held up nothing


_THREADPOOL_RETURN_CHILD = """
import json, os
from gevent import monkey; monkey.patch_all()
import gevent
from greenpool import ConnectionPool

pool = ConnectionPool(os.environ["GREENPOOL_TEST_DSN"], min_size=1, max_size=1, open=True)
pool.wait(10)

def job():
    conn = pool.getconn(5)
    conn.execute("select 1")  # left in a transaction: its return needs a rollback job
    pool.putconn(conn)

gevent.get_hub().threadpool.apply(job)
with pool.connection(timeout=5) as conn:
    one = conn.execute("select 1").fetchone()[0]
stats = pool.get_stats()
pool.close()
print(json.dumps({"one": one, "returns_reset": stats.get("returns_reset", 0)}))
"""


def test_a_rollback_asked_for_by_an_os_thread_of_a_patched_program_runs(run_python: RunPython) -> None:
    """After `patch_all()`, `threading.Thread.start()` makes greenlets: the
    rollback job of a connection a real OS thread (gevent's thread pool)
    returned inside a transaction must still run in a real thread, not in
    that thread's hub, which never runs again."""
    result = run_child(run_python, _THREADPOOL_RETURN_CHILD, timeout=60)
    assert result == {"one": 1, "returns_reset": 1}


_OPENED_BEFORE_PATCHING_CHILD = """
import json, logging, time
from greenpool import ConnectionPool

logging.getLogger("greenpool").setLevel(logging.CRITICAL)
# Refused at once: a connector greenlet would spin and sleep with time.sleep.
pool = ConnectionPool("host=127.0.0.1 port=1 user=postgres dbname=test", min_size=0, max_size=2, open=True)
from gevent import monkey; monkey.patch_all()

t0 = time.monotonic()
try:
    pool.getconn(timeout=2)
    error = None
except Exception as ex:
    error = type(ex).__name__
print(json.dumps({"error": error, "took": time.monotonic() - t0}))
"""


def test_a_pool_opened_before_patching_keeps_its_jobs_in_threads(run_python: RunPython) -> None:
    """A pool opened before `patch_all()` has no hub: its connectors run in
    OS threads, and back off there, also once the program is patched. (As
    greenlets of the main hub, sleeping with the real `time.sleep`, they froze
    it: `getconn(timeout=2)` never returned.)"""
    result = run_child(run_python, _OPENED_BEFORE_PATCHING_CHILD, timeout=30)
    assert result["error"] == "PoolTimeout" and result["took"] < 2.5, result


_OPENED_IN_A_THREADPOOL_WORKER_CHILD = """
import json, os, time
from gevent import monkey; monkey.patch_all()
import gevent
from greenpool import ConnectionPool

pool = ConnectionPool(os.environ["GREENPOOL_TEST_DSN"], min_size=2, max_size=2, open=False)
gevent.get_hub().threadpool.apply(pool.open)  # a worker's hub runs only while it waits
t0 = time.monotonic()
with pool.connection(timeout=10) as conn:
    one = conn.execute("select 1").fetchone()[0]
took = time.monotonic() - t0
pool.close()
print(json.dumps({"one": one, "took": took}))
"""


def test_a_pool_opened_in_a_thread_pool_worker_of_a_patched_program_connects(run_python: RunPython) -> None:
    """Its jobs must not be greenlets of the worker's hub, which doesn't run
    once the worker returns: the connects never happened."""
    result = run_child(run_python, _OPENED_IN_A_THREADPOOL_WORKER_CHILD, timeout=60)
    assert result["one"] == 1 and result["took"] < 5, result


_MAIN_HUB_BLOCKED_CHILD = """
import json, os, threading, time
go = threading.Event()
done = threading.Lock()  # real: made before the patch
done.acquire()
outcome = []

def worker():  # a real OS thread: started before the patch
    go.wait()
    try:
        with pool.connection(timeout=5) as conn:
            outcome.append(conn.execute("select 1").fetchone()[0])
    except Exception as ex:
        outcome.append(repr(ex))
    done.release()

threading.Thread(target=worker, daemon=True).start()
from gevent import monkey; monkey.patch_all()
from greenpool import ConnectionPool

pool = ConnectionPool(os.environ["GREENPOOL_TEST_DSN"], min_size=0, max_size=2, open=True)
go.set()
done.acquire()  # the main thread blocks for real: its hub doesn't run
print(json.dumps({"outcome": outcome[0]}))
"""


def test_connects_a_thread_waits_for_dont_wait_for_a_blocked_main_hub(run_python: RunPython) -> None:
    """psycopg connections go to any hub: the connect a real thread of a
    patched program asks for runs in a thread, not in the main hub, which
    doesn't run while the main thread is blocked."""
    result = run_child(run_python, _MAIN_HUB_BLOCKED_CHILD, timeout=60)
    assert result["outcome"] == 1, result


def test_query_interrupted_while_sending_is_recovered(
    make_pool: Callable[..., Any], make_proxy: Callable[..., Proxy], pg_dsn: str
) -> None:
    """A query interrupted while its (large) parameters are still being sent.

    The proxy is frozen (SIGSTOP) once the transaction has begun, so the
    8 MB query can't be sent in full; `gevent.Timeout` interrupts it
    mid-send; the proxy is thawed. The connection must be usable again
    promptly and kept: the unsent rest of the query has to be flushed
    before waiting for the server's answer (the server ignores a cancel
    while it is still reading a query, and never answers a query it hasn't
    fully received).
    """
    proxy = make_proxy()
    proxy_pid = proxy._child.pid  # type: ignore[union-attr]  # private: Proxy has no public pid to SIGSTOP
    blob = "x" * (8 * 1024 * 1024)

    def body() -> None:
        pool = make_pool(proxy.dsn(pg_dsn), min_size=1, max_size=1)
        outcome: list[str] = []

        def sender() -> None:
            try:
                with gevent.Timeout(0.3):
                    with pool.connection() as conn:
                        conn.execute("select 1")  # BEGIN and a round trip, proxy running
                        os.kill(proxy_pid, signal.SIGSTOP)
                        conn.execute("select length(%s::text)", (blob,))
                outcome.append("completed")
            except gevent.Timeout:
                outcome.append("interrupted")

        try:
            gevent.spawn(sender).join(5)
        finally:
            os.kill(proxy_pid, signal.SIGCONT)
        assert outcome == ["interrupted"]
        t0 = time.monotonic()
        with pool.connection(timeout=3) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert time.monotonic() - t0 < 3
        stats = pool.get_stats()
        assert stats["returns_bad"] == 0 and stats["connections_num"] == 1, stats

    run_green(body)


def test_check_interrupted_never_lends_an_autocommit_connection(
    make_pool: Callable[..., Any], make_proxy: Callable[..., Proxy], pg_dsn: str
) -> None:
    """`check=ConnectionPool.check_connection` switches a connection to
    autocommit for its round trip. Interrupted by `gevent.Timeout` during it
    (the proxy frozen), the connection is ACTIVE and psycopg refuses to
    switch back: it must be discarded, not cleaned and lent on in autocommit,
    where the next borrower's transactions would commit statement by
    statement."""
    proxy = make_proxy()
    proxy_pid = proxy._child.pid  # type: ignore[union-attr]  # private: Proxy has no public pid to SIGSTOP

    def body() -> None:
        pool = make_pool(proxy.dsn(pg_dsn), min_size=1, max_size=1, check=GREEN.check_connection)
        os.kill(proxy_pid, signal.SIGSTOP)
        try:
            with pytest.raises(gevent.Timeout):
                with gevent.Timeout(0.3):
                    pool.getconn()
        finally:
            os.kill(proxy_pid, signal.SIGCONT)
        with pool.connection(timeout=5) as conn:
            assert conn.autocommit is False
            conn.execute("create temporary table t (x int)")
            conn.execute("insert into t values (1)")
            conn.rollback()
            assert conn.execute("select to_regclass('pg_temp.t')").fetchone() == (None,)
        assert pool.get_stats()["connections_num"] == 2  # a new connection replaced it

    run_green(body)


def test_rollback_of_a_returned_connection_gives_up_on_a_silent_server(
    make_pool: Callable[..., Any], make_proxy: Callable[..., Proxy], pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection returned in a transaction is rolled back in the
    background; if the server stops answering (the proxy frozen), the
    rollback gives up after `SETTLE_TIMEOUT` and the connection is replaced,
    instead of pinning its slot (and a cleaner) for good."""
    monkeypatch.setattr(greenpool.pg.driver, "SETTLE_TIMEOUT", 0.3)
    proxy = make_proxy()
    proxy_pid = proxy._child.pid  # type: ignore[union-attr]  # private: Proxy has no public pid to SIGSTOP

    def body() -> None:
        pool = make_pool(proxy.dsn(pg_dsn), min_size=1, max_size=1)
        conn = pool.getconn()
        conn.execute("select 1")  # INTRANS: needs a rollback
        os.kill(proxy_pid, signal.SIGSTOP)
        try:
            pool.putconn(conn)
            helpers.wait_until(
                lambda: pool.get_stats().get("returns_bad", 0) == 1, timeout=5, what="the rollback to give up"
            )
        finally:
            os.kill(proxy_pid, signal.SIGCONT)
        with pool.connection(timeout=5) as again:
            assert again is not conn and again.execute("select 1").fetchone() == (1,)

    run_green(body)


def test_a_lent_connection_closed_by_the_pool_fails_its_borrower_plainly(make_pool: Callable[..., Any]) -> None:
    """`close_lent(0)` closes a connection mid-query: its borrower sees the
    driver's error, not a confusing "can't return connection" from the
    `with` block, and the pool serves on."""

    def body() -> None:
        pool = make_pool(min_size=1, max_size=1)
        errors: list[BaseException] = []

        def borrower() -> None:
            try:
                with pool.connection() as conn:
                    conn.execute("select pg_sleep(1)")
            except Exception as ex:
                errors.append(ex)

        g = gevent.spawn(borrower)
        gevent.sleep(0.2)
        assert len(pool.close_lent(0)) == 1
        g.join(5)
        assert len(errors) == 1 and isinstance(errors[0], psycopg.Error), errors  # the driver's
        with pool.connection(timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)

    run_green(body)


@pytest.mark.parametrize("give_back", ["close", "putconn"])
def test_a_block_whose_connection_was_given_back_leaves_its_next_borrower_alone(
    make_pool: Callable[..., Any], give_back: str
) -> None:
    """Given back inside its `with` block (`close()` with close_returns, or
    `putconn()`), the connection may be lent again before the block ends:
    the block's exit must neither commit nor return the new borrower's
    connection. It raises, as psycopg_pool's, saying what happened."""

    def body() -> None:
        pool = make_pool(min_size=1, max_size=1, close_returns=True)
        seen: list[Any] = []

        def first() -> None:
            try:
                with pool.connection() as conn:
                    conn.close() if give_back == "close" else pool.putconn(conn)
                    gevent.sleep(0.2)  # `second` borrows it meanwhile
            except ValueError as ex:
                seen.append(ex)

        def second() -> None:
            with pool.connection(timeout=5) as conn:
                conn.execute("create temp table gp_given_back (x int)")
                gevent.sleep(0.4)  # `first`'s block ends now
                seen.append(conn.info.transaction_status)
                conn.execute("select count(*) from gp_given_back")

        gevent.joinall([gevent.spawn(first), gevent.spawn(second)], raise_error=True)
        assert "given back inside the 'with' block already" in str(seen[0])
        assert seen[1] == psycopg.pq.TransactionStatus.INTRANS  # not committed by `first`
        assert settle(pool, 1)["returns_bad"] == 0

    run_green(body)


@pytest.mark.parametrize("autocommit", [False, True])
def test_a_block_ending_normally_on_a_busy_connection_says_it_did_not_commit(
    make_pool: Callable[..., Any], monitor: psycopg.Connection[Any], autocommit: bool
) -> None:
    """A query interrupted inside the block, the interruption caught: the block
    ends normally but its transaction can't be committed. It raises (as
    psycopg_pool's commit does) instead of letting the repair roll it back
    silently; in autocommit nothing is lost, and nothing is raised."""
    table = unique("gp_busy_exit")
    monitor.execute(f"create table {table} (x int)")

    def body() -> None:
        pool = make_pool(min_size=1, max_size=1, kwargs={"autocommit": autocommit})
        raised: list[BaseException] = []
        try:
            with pool.connection() as conn:
                conn.execute(f"insert into {table} values (1)")
                with contextlib.suppress(gevent.Timeout), gevent.Timeout(0.1):
                    conn.execute("select pg_sleep(2)")
        except psycopg.OperationalError as ex:
            raised.append(ex)
        settle(pool, 1)
        with pool.connection(timeout=5) as conn:  # repaired and reused
            assert conn.execute("select 1").fetchone() == (1,)
        assert len(raised) == (0 if autocommit else 1), raised
        if raised:
            assert "can't be committed" in str(raised[0])

    try:
        run_green(body)
        assert monitor.execute(f"select count(*) from {table}").fetchone() == ((1 if autocommit else 0),)
    finally:
        monitor.execute(f"drop table {table}")


def test_a_query_interrupted_after_close_is_cancelled_too(
    make_pool: Callable[..., Any], monitor: psycopg.Connection[Any]
) -> None:
    """close() while a borrower's query runs; the borrower is then timed out:
    the connection comes back busy to a closed pool, which still cancels the
    query before closing the connection (closing alone leaves it running)."""

    def body() -> None:
        pool = make_pool(min_size=1, max_size=1)

        def borrower() -> None:
            with contextlib.suppress(gevent.Timeout), gevent.Timeout(0.5), pool.connection() as conn:
                conn.execute("select pg_sleep(10)")

        g = gevent.spawn(borrower)
        gevent.sleep(0.2)
        pool.close()
        g.join(5)
        wait_until(lambda: not active_queries(monitor, pool.test_app_name, "%pg_sleep%"), 5, "no query left")
        assert pool.get_stats()["pool_size"] == 0

    run_green(body)


def test_a_connect_to_several_hosts_reports_every_failure_as_psycopg_does() -> None:
    """Through the hub, a multi-host connect string that fails everywhere
    raises what psycopg's own connect raises: every attempt's error."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(2)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))  # bound, not listening: refused
        ports = [sock.getsockname()[1] for sock in socks]
        dsn = f"host=127.0.0.1,127.0.0.1 port={ports[0]},{ports[1]} dbname=test connect_timeout=5"

        def message(cls: type) -> str:
            with pytest.raises(psycopg.OperationalError) as info:
                cls.connect(dsn)
            return str(info.value)

        plain = message(psycopg.Connection)
        assert "Multiple connection attempts failed" in plain
        assert run_green(lambda: message(greenpool.GeventConnection)) == plain


def test_zero_timeout_waits_poll_once(pg_dsn: str) -> None:
    """`timeout=0` means "don't wait" to psycopg (`notifies()` also passes it
    once its deadline has passed), not "no timeout"."""

    def body() -> None:
        with greenpool.GeventConnection.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("listen greenpool_zero_timeout")
            t0 = time.monotonic()
            assert list(conn.notifies(timeout=0)) == []
            assert list(conn.notifies(timeout=0.2)) == []
            assert time.monotonic() - t0 < 2

    run_green(body, timeout=10)


# --------------------------------------------------------------------------
# Waiters that give up
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["gevent.kill", "gevent.Timeout", "pool-timeout", "kill-while-handing-over"])
def test_waiters_giving_up_dont_swallow_connections(make_pool: Callable[..., Any], how: str) -> None:
    """max_size=2, both held, 10 requests queued; the queued requests give up
    (killed, timed out). Afterwards both connections are available and a new
    request is served at once. In "kill-while-handing-over" the waiters are
    killed right after the holders returned the connections, before the
    first two waiters could run: the connections handed to them must not be
    lost."""

    def body() -> None:
        pool = make_pool(min_size=2, max_size=2)
        h1, h2 = pool.getconn(), pool.getconn()
        outcomes: list[str] = []

        def request() -> None:
            if how == "gevent.Timeout":
                with gevent.Timeout(0.1):
                    pool.getconn(timeout=10)
            elif how == "pool-timeout":
                pool.getconn(timeout=0.1)
            else:
                with pool.connection(timeout=10):
                    gevent.sleep(10)

        def waiter() -> None:
            record_outcome(
                outcomes,
                request,
                "served",
                {gevent.Timeout: "timeout", greenpool.PoolTimeout: "pool-timeout", GreenletExit: "killed"},
            )

        waiters = [gevent.spawn(waiter) for _ in range(10)]
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 10, 5.0, "10 queued requests")
        if how == "gevent.kill":
            gevent.killall(waiters, block=True, timeout=5)
        elif how in ("gevent.Timeout", "pool-timeout"):
            gevent.joinall(waiters, timeout=5)
        assert pool.get_stats()["requests_waiting"] == (10 if how == "kill-while-handing-over" else 0)
        pool.putconn(h1)
        pool.putconn(h2)
        if how == "kill-while-handing-over":
            gevent.killall(waiters, block=True, timeout=5)
        assert all(w.ready() for w in waiters)
        assert len(outcomes) == 10 and "served" not in outcomes, outcomes

        stats = settle(pool, 2)
        assert stats["requests_waiting"] == 0
        t0 = time.monotonic()
        a, b = pool.getconn(timeout=1), pool.getconn(timeout=1)
        assert time.monotonic() - t0 < 0.05, "not served at once"
        assert a is not b
        pool.putconn(a)
        pool.putconn(b)
        assert pool.get_stats()["pool_size"] == 2

    run_green(body)


# --------------------------------------------------------------------------
# Fairness
# --------------------------------------------------------------------------


def test_waiters_served_in_fifo_order(make_pool: Callable[..., Any]) -> None:
    """max_size=1: waiters get the connection in the order they queued, and
    a request arriving while others wait doesn't overtake them."""

    def body() -> None:
        pool = make_pool(min_size=1, max_size=1)
        held = pool.getconn()
        order: list[Any] = []

        def waiter(tag: Any) -> None:
            with pool.connection(timeout=10):
                order.append(tag)
                gevent.sleep(0.001)

        greenlets = []

        def queued(n: int) -> Callable[[], bool]:
            return lambda: bool(pool.get_stats()["requests_waiting"] == n)

        for i in range(10):
            greenlets.append(gevent.spawn(waiter, i))
            wait_until(queued(i + 1), 5.0, f"waiter {i} queued")
        pool.putconn(held)
        greenlets.append(gevent.spawn(waiter, "late"))  # arrives after the release
        gevent.joinall(greenlets, timeout=10, raise_error=True)
        assert order == [*range(10), "late"]

    run_green(body)


def test_round_robin_under_contention(make_pool: Callable[..., Any]) -> None:
    """5 greenlets take turns on a single connection, 40 times each: FIFO
    hands it round-robin, and nobody starves."""

    def body() -> None:
        pool = make_pool(min_size=1, max_size=1)
        owners: list[int] = []

        def worker(i: int) -> None:
            for _ in range(40):
                conn = pool.getconn(timeout=5)
                owners.append(i)
                gevent.sleep(0)
                pool.putconn(conn)

        workers = [gevent.spawn(worker, i) for i in range(5)]
        gevent.joinall(workers, timeout=20, raise_error=True)
        assert sorted(owners) == sorted(list(range(5)) * 40)
        # Once all five are queued, each window of 5 turns serves all five.
        windows = [set(owners[k : k + 5]) for k in range(5, len(owners) - 5)]
        unfair = [k for k, w in enumerate(windows) if len(w) != 5]
        assert not unfair, owners

    run_green(body)


# --------------------------------------------------------------------------
# Throughput and data volume
# --------------------------------------------------------------------------


def test_throughput_many_greenlets(make_pool: Callable[..., Any]) -> None:
    """200 greenlets x 5 `pg_sleep(0.01)` over 20 connections: far faster
    than the 10 s serialized time, max_size respected, all results right."""

    def body() -> None:
        pool = make_pool(min_size=20, max_size=20)
        lent = 0
        peak = 0
        pids: set[int] = set()
        values: list[int] = []

        def worker(i: int) -> None:
            nonlocal lent, peak
            for j in range(5):
                with pool.connection(timeout=20) as conn:
                    lent += 1
                    peak = max(peak, lent)
                    try:
                        value, pid = conn.execute(
                            "select %s::int, pg_backend_pid() from pg_sleep(0.01)", (i * 5 + j,)
                        ).fetchone()
                    finally:
                        lent -= 1
                values.append(value)
                pids.add(pid)

        t0 = time.monotonic()
        workers = [gevent.spawn(worker, i) for i in range(200)]
        gevent.joinall(workers, timeout=30, raise_error=True)
        elapsed = time.monotonic() - t0
        assert sorted(values) == list(range(1000))
        assert peak <= 20 and len(pids) <= 20
        assert elapsed < 4.0, f"{elapsed:.2f} s (serialized: 10 s, ideal: 0.5 s)"
        stats = settle(pool, 20)
        assert stats["requests_num"] == 1000
        assert stats["requests_errors"] == 0

    run_green(body)


def test_large_payloads_concurrently(make_pool: Callable[..., Any]) -> None:
    """Big parameters and results (read/write waits on the hub) in several
    greenlets at once, while a ticker greenlet keeps running."""

    def body() -> None:
        pool = make_pool(min_size=4, max_size=4)
        size = 4 * 1024 * 1024
        ticks = 0
        stop = False

        def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                gevent.sleep(0.001)

        def worker(i: int) -> tuple[int, int]:
            blob = chr(ord("a") + i) * size
            with pool.connection(timeout=10) as conn:
                sent = conn.execute("select length(%s::text)", (blob,)).fetchone()[0]
                got = conn.execute("select repeat(%s, %s)", (chr(ord("a") + i), size)).fetchone()[0]
            assert got == blob
            return sent, len(got)

        tick = gevent.spawn(ticker)
        workers = [gevent.spawn(worker, i) for i in range(4)]
        gevent.joinall(workers, timeout=30, raise_error=True)
        stop = True
        tick.join(1)
        assert [w.value for w in workers] == [(size, size)] * 4
        assert ticks > 0

    run_green(body)


# --------------------------------------------------------------------------
# Dead networks
# --------------------------------------------------------------------------


def test_network_defaults_are_set_unless_given(make_pool: Callable[..., Any], pg_dsn: str) -> None:
    """connect_timeout and TCP keepalives: greenpool's defaults where the
    conninfo or kwargs say nothing, theirs where they do."""

    def options(pool: Any) -> dict[str, str]:
        with pool.connection() as conn:
            return {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info}

    plain = run_green(lambda: options(make_pool(min_size=1)))
    assert {k: plain[k] for k in greenpool.pg.driver.NETWORK_DEFAULTS} == greenpool.pg.driver.NETWORK_DEFAULTS
    given = psycopg.conninfo.make_conninfo(pg_dsn, connect_timeout=3)
    chosen = run_green(lambda: options(make_pool(given, min_size=1, kwargs={"keepalives_idle": 5})))
    assert (chosen["connect_timeout"], chosen["keepalives_idle"], chosen["keepalives_count"]) == ("3", "5", "3")


def test_a_server_that_never_answers_fails_requests_at_connect_timeout(
    make_pool: Callable[..., Any], make_proxy: Callable[..., Proxy], pg_dsn: str
) -> None:
    """A server that accepts and never answers (a blackhole): connects end at
    connect_timeout, and requests fail with that error instead of hanging."""
    proxy = make_proxy()
    proxy.blackhole()
    pool = make_pool(proxy.dsn(pg_dsn), wait=False, min_size=0, max_size=2, kwargs={"connect_timeout": 1})

    def request() -> float:
        t0 = time.monotonic()
        with pytest.raises(greenpool.PoolTimeout, match="timeout"):
            with pool.connection(timeout=30):
                pass
        return time.monotonic() - t0

    assert run_green(request) < 10  # connect_timeout (1 s), not the request's 30 s
    proxy.blackhole(False)
    run_green(lambda: wait_until(lambda: _serves(pool), timeout=20, what="the pool to serve again"))


def test_a_query_cut_by_a_dead_network_leaves_the_pool_healthy(
    make_pool: Callable[..., Any], make_proxy: Callable[..., Proxy], pg_dsn: str
) -> None:
    """A query in flight when the network dies, bounded by the caller (a
    gevent.Timeout, a Celery time limit): the connection can't be repaired
    through the dead network; it is replaced, and the pool serves again once
    the network is back."""
    proxy = make_proxy()
    pool = make_pool(proxy.dsn(pg_dsn), min_size=1, max_size=1)

    def cut() -> None:
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.5):
                with pool.connection() as conn:
                    proxy.blackhole()
                    conn.execute("select 1")

    run_green(cut)
    proxy.blackhole(False)
    run_green(lambda: wait_until(lambda: _serves(pool), timeout=30, what="the pool to serve again"))


def _serves(pool: Any) -> bool:
    try:
        with pool.connection(timeout=2) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.Error:
        return False


# --------------------------------------------------------------------------
# Faults under load
# --------------------------------------------------------------------------


def test_a_restart_fails_no_request_made_after_the_server_accepts_again(
    make_pool: Callable[..., Any], make_proxy: Callable[..., Proxy], pg_dsn: str
) -> None:
    """A restart (every connection dropped, connects refused, then accepted):
    requests with a 5 s timeout fail fast while the server refuses, and none
    that starts after it accepts again fails."""
    proxy = make_proxy()
    pool = make_pool(proxy.dsn(pg_dsn), min_size=4, max_size=4, timeout=5)
    outcomes: list[tuple[float, str]] = []
    up_again: list[float] = []
    stop = gevent.event.Event()

    def client() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                with pool.connection() as conn:
                    conn.execute("select 1")
                outcomes.append((start, "ok"))
            except psycopg.Error as ex:
                outcomes.append((start, type(ex).__name__))
                gevent.sleep(0.01)

    def scenario() -> None:
        clients = [gevent.spawn(client) for _ in range(20)]
        gevent.sleep(0.3)
        proxy.pause()  # the server goes down...
        proxy.kill_connections()
        gevent.sleep(1.5)
        proxy.resume()  # ...and accepts again
        up_again.append(time.monotonic())
        gevent.sleep(1.5)
        stop.set()
        gevent.joinall(clients, timeout=15)

    run_green(scenario)
    failed_after = [kind for start, kind in outcomes if start > up_again[0] and kind != "ok"]
    assert failed_after == []
    assert any(kind != "ok" for _, kind in outcomes)  # it did go down
    assert sum(1 for start, kind in outcomes if start > up_again[0] and kind == "ok") > 20


def test_every_backend_terminated_at_once_under_load(make_pool: Callable[..., Any], pg_dsn: str, monitor: Any) -> None:
    """pg_terminate_backend() of every pooled backend at once under 200
    greenlets: every request made afterwards is served, and the stats account
    for every connection lost (broken at return or seen closed at checkout)."""
    pool = make_pool(min_size=10, max_size=10, timeout=10)
    app = pool.test_app_name
    killed: list[int] = []
    late: list[str] = []
    stop = gevent.event.Event()

    def client(after_kill: bool) -> None:
        while not stop.is_set():
            try:
                with pool.connection() as conn:
                    conn.execute("select pg_sleep(0.002)")
                if after_kill:
                    late.append("ok")
            except psycopg.Error as ex:
                if after_kill:
                    late.append(type(ex).__name__)

    def scenario() -> None:
        early = [gevent.spawn(client, False) for _ in range(200)]
        gevent.sleep(0.5)
        rows = monitor.execute(
            "select pg_terminate_backend(pid), pid from pg_stat_activity where application_name = %s", [app]
        ).fetchall()
        killed.extend(pid for ok, pid in rows if ok)
        gevent.sleep(0.5)  # the early ones meet the dead connections
        stop.set()
        gevent.joinall(early, timeout=20)
        stop.clear()
        after = [gevent.spawn(client, True) for _ in range(200)]
        gevent.sleep(1.0)
        stop.set()
        gevent.joinall(after, timeout=20)

    run_green(scenario)
    assert len(killed) == 10
    assert late and set(late) == {"ok"}  # every later request served
    stats = pool.get_stats()
    assert stats["returns_bad"] + stats["connections_lost"] >= 10  # each dead one seen, and counted
    assert stats["pool_size"] == 10
