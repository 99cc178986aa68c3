"""Plain helper functions shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from greenpool.testing import ReplicatedCluster


class DeadlineExceeded(BaseException):
    """Raised in the main thread when a test overruns its deadline."""


def destroy_main_hub() -> None:
    """Drop the gevent hub of this thread, if any.

    greenpool decides "greenlets or threads?" by looking for a hub in the
    calling thread: a hub left over by an in-process gevent test would turn
    the next plain-thread test into a greenlet test.
    """
    hub_local = sys.modules.get("gevent._hub_local")
    if hub_local is not None:
        hub = hub_local.get_hub_if_exists()
        if hub is not None:
            hub.destroy(destroy_loop=True)


def hub_exists() -> bool:
    """Whether this thread has a gevent hub (without importing gevent needlessly)."""
    hub_local = sys.modules.get("gevent._hub_local")
    return hub_local is not None and hub_local.get_hub_if_exists() is not None


@contextlib.contextmanager
def deadline(seconds: float, dump_after: float) -> Iterator[None]:
    """Raise DeadlineExceeded in the main thread after `seconds`; as a last
    resort, dump the stacks and end the process after `dump_after` seconds."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise DeadlineExceeded(f"test still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(dump_after, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def no_hub_and_deadline(seconds: float, dump_after: float | None = None) -> Iterator[None]:
    """No gevent hub in this thread when the block starts, nor when it ends (see
    `destroy_main_hub`), and the block bounded by `deadline(seconds, dump_after)`
    (`dump_after` defaults to twice `seconds`)."""
    destroy_main_hub()
    with deadline(seconds, dump_after=seconds * 2 if dump_after is None else dump_after):
        yield
    destroy_main_hub()


@contextlib.contextmanager
def last_resort_deadline(dump_after: float) -> Iterator[None]:
    """Dump the stacks and end the process if still running after `dump_after` s."""
    faulthandler.dump_traceback_later(dump_after, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def wait_until(
    predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition", interval: float = 0.02
) -> Any:
    """Poll `predicate` until truthy (cooperatively under a hub); fail after `timeout` s."""
    limit = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= limit:
            pytest.fail(f"timed out after {timeout} s waiting for {what} (last value: {value!r})")
        if hub_exists():
            import gevent

            gevent.sleep(interval)
        else:
            time.sleep(interval)


@contextlib.contextmanager
def replicated_cluster() -> Iterator[ReplicatedCluster]:
    """A new `ReplicatedCluster`, closed after; skip (fail in CI) without PostgreSQL's server programs."""
    from conftest import skip_or_fail

    from greenpool.testing import PostgresNotFound, ReplicatedCluster

    try:
        cluster = ReplicatedCluster()
    except PostgresNotFound as ex:
        skip_or_fail(f"needs PostgreSQL's server programs: {ex}")
    try:
        yield cluster
    finally:
        cluster.close()


def run_green(fn: Callable[[], Any], timeout: float) -> Any:
    """Run `fn` in a greenlet of this thread's hub; its result, or its error raised.

    Fails the test (killing the greenlet) if it isn't done in `timeout` seconds.
    """
    import gevent

    g = gevent.spawn(fn)
    g.join(timeout)
    if not g.ready():
        g.kill(block=True, timeout=5)
        pytest.fail(f"test body still running after {timeout} s")
    return g.get()


def run_threads(fn: Callable[[int], Any], n: int, timeout: float) -> tuple[list[Any], list[BaseException]]:
    """Run `fn(i)` in `n` daemon threads; return (results, exceptions).

    Fails the test if a thread is still running after `timeout` seconds.
    """
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as ex:  # noqa: BLE001 - returned to the caller
            errors.append(ex)

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    limit = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, limit - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        pytest.fail(f"threads still running after {timeout} s: {alive}")
    return results, errors


def open_pool(pools: list[Any], cls: type, conninfo: str, wait: bool = True, **kwargs: Any) -> Any:
    """Make a `cls` pool on `conninfo`, record it in `pools` (for teardown), open it."""
    pool = cls(conninfo, open=False, **kwargs)
    pools.append(pool)
    pool.open(wait=wait, timeout=20)
    return pool


def close_pools(pools: list[Any]) -> None:
    for pool in pools:
        pool.close()


def backends(monitor: Any, app: str) -> set[int]:
    """Server pids of the connections with application_name `app`."""
    rows = monitor.execute("select pid from pg_stat_activity where application_name = %s", (app,)).fetchall()
    return {row[0] for row in rows}


def server_query(
    kind: str, conn: Any, path: Any, sql: str, params: tuple[Any, ...] = (), sqlite_timeout: float = 1.0
) -> list[tuple[Any, ...]]:
    """Run `sql` on the server under test: through the unpooled `conn` for
    "pg" (psycopg) and "mysql" (pymysql), on a fresh connection to the file
    `path` for "sqlite"; return the rows (none for a statement)."""
    if kind == "pg":
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []
    if kind == "mysql":
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    lite = sqlite3.connect(str(path), timeout=sqlite_timeout, isolation_level=None)
    try:
        return lite.execute(sql, params).fetchall()
    finally:
        lite.close()


def pg_params(pg_dsn: str) -> dict[str, Any]:
    """`pg_dsn` as keyword arguments (those with a value)."""
    from psycopg.conninfo import conninfo_to_dict

    return {k: v for k, v in conninfo_to_dict(pg_dsn).items() if v is not None}


def close_dbs(dbs: list[Any]) -> None:
    """Best-effort teardown of Peewee pooled databases: close the calling
    thread's connection, the idle and stale ones, then the engine's pool."""
    for db in dbs:
        try:
            db.close()
        except Exception:  # noqa: BLE001 - e.g. still in a transaction
            pass
        for step in (db.close_idle, lambda db=db: db.close_stale(0)):
            try:
                step()
            except Exception:  # noqa: BLE001
                pass
        pool = getattr(db, "pool", None)  # greenpool's engine
        if pool is not None:
            pool.close()


def drop_tables(query: Callable[[str], Any], tables: list[str]) -> None:
    """Best-effort `drop table if exists` of each of `tables` through `query`."""
    for table in tables:
        try:
            query(f"drop table if exists {table}")
        except Exception:  # noqa: BLE001
            pass
