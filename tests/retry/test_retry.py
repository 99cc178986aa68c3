"""`greenpool.retry`, `ConnectionPool.retry()` and `PooledDatabase.retry()` against real servers.

Failures are real: a backend terminated with `pg_terminate_backend()`, a
MariaDB connection `KILL`ed, connections reset by the fault-injection proxy,
the proxy refusing connections, two SERIALIZABLE transactions colliding.
Nothing on the server side is mocked.

Greenlets run in this process without monkey-patching (psycopg waits on the
hub through `GeventConnection`); pymysql runs from the main thread with no hub
(it cooperates only on patched sockets). An autouse fixture drops the
main thread's hub before and after each test, so "thread" tests don't find
one, and bounds each test with a SIGALRM deadline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import peewee
import psycopg
import pymysql
import pytest
from greenlet import GreenletExit
from helpers import no_hub_and_deadline, open_pool, pg_params, unique, wait_until
from psycopg import errors as e

import greenpool
import greenpool.peewee as gpw
from greenpool.retry import CONNECTION, READ_ONLY, SERIALIZATION, Attempt, Retrying, classify
from greenpool.testing.proxy import Proxy

TEST_DEADLINE = 60

#: Short backoffs: the tests are about what is retried, not how long it sleeps.
FAST = {"base_delay": 0.01, "max_delay": 0.05}


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    with no_hub_and_deadline(TEST_DEADLINE):
        yield


@pytest.fixture
def pools() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for pool in made:
        pool.close()


@pytest.fixture
def table(monitor: Any) -> Iterator[str]:
    """A table `(id int primary key, value int)` with the row `(1, 0)`, dropped afterwards."""
    name = unique("gp_retry")
    monitor.execute(f"create table {name} (id int primary key, value int not null)")
    monitor.execute(f"insert into {name} values (1, 0)")
    yield name
    monitor.execute(f"drop table if exists {name}")


def make_pool(pools: list[Any], conninfo: str, wait: bool = True, **kwargs: Any) -> Any:
    kwargs.setdefault("min_size", 1)
    kwargs.setdefault("max_size", 2)
    return open_pool(pools, greenpool.ConnectionPool, conninfo, wait=wait, **kwargs)


def in_mode(mode: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """`fn()` from this thread ("thread") or from a greenlet ("greenlet"), its result or error."""
    if mode == "thread":
        return fn()
    g = gevent.spawn(fn)
    g.join(timeout)
    if not g.ready():
        g.kill(timeout=2)
        pytest.fail(f"greenlet still running after {timeout} s")
    return g.get()


def pg_alive(monitor: Any, pid: int) -> bool:
    return bool(monitor.execute("select 1 from pg_stat_activity where pid = %s", [pid]).fetchall())


def terminate(monitor: Any, pid: int) -> None:
    """Terminate backend `pid` from the monitor connection and wait until it is gone."""
    monitor.execute("select pg_terminate_backend(%s)", [pid])
    wait_until(lambda: not pg_alive(monitor, pid), what=f"backend {pid} to go")


def backend_pid(conn: Any) -> int:
    return int(conn.execute("select pg_backend_pid()").fetchone()[0])


# --------------------------------------------------------------------------
# (1) a terminated backend
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "greenlet"])
def test_terminated_backend_retried_on_a_new_backend(pg_dsn: str, monitor: Any, pools: list[Any], mode: str) -> None:
    pool = make_pool(pools, pg_dsn)
    pids: list[int] = []

    @pool.retry(attempts=3, **FAST)
    def work() -> int:
        with pool.connection() as conn:
            pids.append(backend_pid(conn))
            if len(pids) == 1:
                terminate(monitor, pids[0])  # its own backend, mid-block
            return int(conn.execute("select 42").fetchone()[0])

    assert in_mode(mode, work) == 42
    assert len(pids) == 2, "the block ran twice"
    assert pids[0] != pids[1], "the retry ran on a new backend"
    assert not pg_alive(monitor, pids[0])
    assert pool.get_stats()["returns_bad"] >= 1, "the dead connection was discarded at its return"
    with pool.connection() as conn:
        conn.execute("select 1")


def test_iterator_form_callback_and_log(
    pg_dsn: str, monitor: Any, pools: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(pools, pg_dsn)
    calls: list[tuple[int, type, float]] = []
    pids: list[int] = []
    caplog.set_level(logging.INFO, logger="greenpool.retry")

    def on_retry(attempt: int, error: Exception, delay: float) -> None:
        calls.append((attempt, type(error), delay))

    numbers = []
    for attempt in greenpool.retry(attempts=3, base_delay=0.02, on_retry=on_retry):
        assert isinstance(attempt, Attempt)
        numbers.append(attempt.number)
        with attempt:
            with pool.connection() as conn:
                pids.append(backend_pid(conn))
                if attempt.number == 1:
                    terminate(monitor, pids[0])
                conn.execute("select 1")
    assert numbers == [1, 2]
    assert len(pids) == 2 and pids[0] != pids[1]
    assert len(calls) == 1
    number, error_type, delay = calls[0]
    assert number == 1 and issubclass(error_type, psycopg.OperationalError)
    assert 0 <= delay <= 0.02  # full jitter: uniform(0, base_delay) before the first retry
    records = [r for r in caplog.records if r.name == "greenpool.retry"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "attempt 1 of 3 failed" in records[0].getMessage()


# --------------------------------------------------------------------------
# (2) a dropped network
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "greenlet"])
def test_dropped_network_retried(pg_dsn: str, proxy: Proxy, pools: list[Any], mode: str) -> None:
    pool = make_pool(pools, proxy.dsn(pg_dsn), min_size=2, max_size=2)
    runs = 0
    errors: list[Exception] = []

    @pool.retry(attempts=3, on_retry=lambda n, error, d: errors.append(error), **FAST)
    def work() -> int:
        nonlocal runs
        runs += 1
        with pool.connection() as conn:
            conn.execute("select 1")
            if runs == 1:
                assert proxy.kill_connections() >= 1  # every connection, the idle one too
            return int(conn.execute("select 2").fetchone()[0])

    assert in_mode(mode, work) == 2
    assert runs == 2
    assert len(errors) == 1 and classify(errors[0]) == CONNECTION
    assert errors[0].sqlstate is None  # type: ignore[attr-defined]  # a lost connection: no SQLSTATE


# --------------------------------------------------------------------------
# (3) a serialization conflict
# --------------------------------------------------------------------------


@pytest.mark.parametrize("retry_serialization", [True, False])
def test_serialization_conflict(
    pg_dsn: str, monitor: Any, pools: list[Any], table: str, retry_serialization: bool
) -> None:
    pool = make_pool(pools, pg_dsn, min_size=2, max_size=2)
    policy = pool.retry(attempts=3, retry_serialization=retry_serialization, **FAST)
    both_read = gevent.event.Event()
    reads = 0
    runs: list[str] = []

    def transaction(name: str) -> None:
        @policy
        def increment() -> None:
            nonlocal reads
            runs.append(name)
            with pool.connection() as conn:
                conn.execute("set transaction isolation level serializable")
                value = conn.execute(f"select value from {table} where id = 1").fetchone()[0]
                reads += 1
                if reads == 2:
                    both_read.set()
                assert both_read.wait(10), "the other transaction never read"
                conn.execute(f"update {table} set value = %s where id = 1", [value + 1])

        increment()

    greenlets = [gevent.spawn(transaction, name) for name in ("a", "b")]
    gevent.joinall(greenlets, timeout=20)
    assert all(g.ready() for g in greenlets)
    failed = [g.exception for g in greenlets if g.exception is not None]
    value = monitor.execute(f"select value from {table} where id = 1").fetchone()[0]
    if retry_serialization:
        assert failed == []
        assert value == 2, "both increments counted"
        assert sorted(runs) in (["a", "a", "b"], ["a", "b", "b"]), "the loser ran twice"
    else:
        assert len(failed) == 1
        assert isinstance(failed[0], e.SerializationFailure)
        assert failed[0].sqlstate == "40001"
        assert not hasattr(failed[0], "greenpool_attempts"), "propagated at once, untouched"
        assert value == 1
        assert sorted(runs) == ["a", "b"], "each ran once"


# --------------------------------------------------------------------------
# (4) SQL errors are never retried
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("select 1 / 0", e.DivisionByZero),
        ("insert into {table} values (1, 1)", e.UniqueViolation),
        ("selec 1", e.SyntaxError),
        ("select * from {table} where value = 'x'", e.InvalidTextRepresentation),
    ],
)
def test_sql_error_never_retried(pg_dsn: str, pools: list[Any], table: str, sql: str, error: type) -> None:
    pool = make_pool(pools, pg_dsn)
    runs = 0

    @pool.retry(attempts=5, retry_serialization=True, **FAST)
    def work() -> None:
        nonlocal runs
        runs += 1
        with pool.connection() as conn:
            conn.execute(sql.format(table=table))

    with pytest.raises(error) as info:
        work()
    assert runs == 1
    assert not hasattr(info.value, "greenpool_attempts")
    assert not getattr(info.value, "__notes__", None)


def test_sql_error_after_a_retry_carries_the_attempts(pg_dsn: str, monitor: Any, pools: list[Any]) -> None:
    pool = make_pool(pools, pg_dsn)
    runs = 0

    @pool.retry(attempts=5, **FAST)
    def work() -> None:
        nonlocal runs
        runs += 1
        with pool.connection() as conn:
            if runs == 1:
                terminate(monitor, backend_pid(conn))
            conn.execute("select 1 / 0")

    with pytest.raises(e.DivisionByZero) as info:
        work()
    assert runs == 2, "retried the lost connection, not the SQL error"
    attempts = info.value.greenpool_attempts  # type: ignore[attr-defined]
    assert len(attempts) == 2
    assert "DivisionByZero" in attempts[1][0] and attempts[0][1] <= attempts[1][1]
    assert "not retryable" in info.value.__notes__[0]


# --------------------------------------------------------------------------
# (5) gevent.Timeout and other BaseExceptions are never retried
# --------------------------------------------------------------------------


def test_gevent_timeout_not_retried(pg_dsn: str, pools: list[Any]) -> None:
    pool = make_pool(pools, pg_dsn)
    runs = 0

    @pool.retry(attempts=5, **FAST)
    def work() -> None:
        nonlocal runs
        runs += 1
        with pool.connection() as conn:
            conn.execute("select pg_sleep(5)")

    def limited() -> None:
        with gevent.Timeout(0.3):  # as a Celery time limit does, from outside the block
            work()

    g = gevent.spawn(limited)
    g.join(10)
    assert g.ready()
    assert isinstance(g.exception, gevent.Timeout)
    assert runs == 1
    assert not hasattr(g.exception, "greenpool_attempts")
    with pool.connection(timeout=10) as conn:  # the interrupted connection was repaired or replaced
        assert conn.execute("select 1").fetchone()[0] == 1


@pytest.mark.parametrize("error", [KeyboardInterrupt, GreenletExit, SystemExit])
def test_base_exceptions_not_retried(error: type[BaseException]) -> None:
    runs = 0

    @greenpool.retry(attempts=5, **FAST)
    def work() -> None:
        nonlocal runs
        runs += 1
        raise error()

    with pytest.raises(error):
        work()
    assert runs == 1


# --------------------------------------------------------------------------
# (6) attempts or deadline exhausted
# --------------------------------------------------------------------------


def test_attempts_exhausted_raise_the_last_error(pg_dsn: str, monitor: Any, pools: list[Any]) -> None:
    pool = make_pool(pools, pg_dsn)
    pids: list[int] = []

    @pool.retry(attempts=3, **FAST)
    def work() -> None:
        with pool.connection() as conn:
            pids.append(backend_pid(conn))
            terminate(monitor, pids[-1])
            conn.execute("select 1")

    with pytest.raises(psycopg.OperationalError) as info:
        work()
    assert len(pids) == 3 and len(set(pids)) == 3
    error = info.value
    attempts = error.greenpool_attempts  # type: ignore[attr-defined]
    assert len(attempts) == 3
    assert attempts[-1][0] == repr(error), "the last error is the one raised"
    assert [seconds for _, seconds in attempts] == sorted(seconds for _, seconds in attempts)
    assert any("failed after 3 attempts" in note and "attempts exhausted" in note for note in error.__notes__)


def test_deadline_exhausted_while_the_database_refuses(pg_dsn: str, proxy: Proxy, pools: list[Any]) -> None:
    proxy.pause()  # refuses connections: the pool fails fast with the connect error
    pool = make_pool(pools, proxy.dsn(pg_dsn), wait=False, min_size=1)
    runs = 0

    @pool.retry(attempts=1000, deadline=1.0, base_delay=0.05, max_delay=0.2)
    def work() -> None:
        nonlocal runs
        runs += 1
        with pool.connection(timeout=10):
            pass

    t0 = time.monotonic()
    with pytest.raises(greenpool.PoolTimeout) as info:
        work()
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0, "gave up at the deadline, not after 1000 attempts nor the pool's timeout"
    assert runs >= 2
    error = info.value
    assert isinstance(error.__cause__, psycopg.OperationalError), "failed fast with the connect error"
    assert classify(error) == CONNECTION
    attempts = error.greenpool_attempts  # type: ignore[attr-defined]
    assert len(attempts) == runs and all(seconds < 1.5 for _, seconds in attempts)
    assert any("deadline of 1 s reached" in note for note in error.__notes__)

    proxy.resume()
    assert work() is None  # the same policy works once the database is back


# --------------------------------------------------------------------------
# (7) Peewee: PostgreSQL and MariaDB
# --------------------------------------------------------------------------


@pytest.fixture
def pg_db(pg_dsn: str, monitor: Any, table: str) -> Iterator[tuple[Any, type[peewee.Model]]]:
    params = pg_params(pg_dsn)
    name = params.pop("dbname")
    db = gpw.PooledPostgresqlDatabase(name, max_connections=4, check_idle=0, **params)

    class Item(peewee.Model):
        value = peewee.IntegerField()

        class Meta:
            database = db
            table_name = table

    yield db, Item
    db.close()
    db.pool.close()


@pytest.mark.parametrize("mode", ["thread", "greenlet"])
def test_peewee_pg_atomic_after_terminate(pg_db: tuple[Any, type[peewee.Model]], monitor: Any, mode: str) -> None:
    db, item = pg_db
    pids: list[int] = []

    @db.retry(attempts=3, **FAST)
    def work() -> None:
        with db.atomic():
            pids.append(int(db.execute_sql("select pg_backend_pid()").fetchone()[0]))
            item.create(id=10, value=len(pids))
            if len(pids) == 1:
                terminate(monitor, pids[0])
            item.update(value=item.value + 100).where(item.id == 10).execute()

    def run() -> None:
        try:
            work()
        finally:
            db.close()  # the greenlet's connection (atomic() connected for it)

    in_mode(mode, run)
    assert len(pids) == 2 and pids[0] != pids[1]
    assert [(r.id, r.value) for r in item.select().where(item.id == 10)] == [(10, 102)], "the block's work once"
    assert db.pool.get_stats()["returns_bad"] >= 1


def test_peewee_pg_inside_connection_context(pg_db: tuple[Any, type[peewee.Model]], monitor: Any) -> None:
    db, item = pg_db
    pids: list[int] = []
    with db.connection_context():
        outer = int(db.execute_sql("select pg_backend_pid()").fetchone()[0])
        for attempt in db.retry(attempts=3, **FAST):
            with attempt, db.atomic():
                pids.append(int(db.execute_sql("select pg_backend_pid()").fetchone()[0]))
                if attempt.number == 1:
                    terminate(monitor, pids[0])
                item.create(id=20, value=attempt.number)
        assert not db.is_closed(), "the enclosing context still has a connection"
        assert int(db.execute_sql("select pg_backend_pid()").fetchone()[0]) == pids[1]
    assert db.is_closed(), "the enclosing context closed normally"
    assert pids[0] == outer and pids[1] != outer
    assert [r.value for r in item.select().where(item.id == 20)] == [2]


def test_peewee_not_retried_inside_a_transaction(pg_db: tuple[Any, type[peewee.Model]], monitor: Any) -> None:
    db, item = pg_db
    runs = 0

    @db.retry(attempts=3, **FAST)
    def work() -> None:
        nonlocal runs
        runs += 1
        terminate(monitor, int(db.execute_sql("select pg_backend_pid()").fetchone()[0]))
        item.create(id=30, value=1)

    with pytest.raises(peewee.OperationalError), db.atomic():
        work()
    assert runs == 1, "the enclosing transaction is lost: only the whole of it may run again"
    db.close()


@pytest.fixture
def mysql_db(mysql_params: dict[str, Any]) -> Iterator[tuple[Any, type[peewee.Model], Any]]:
    params = dict(mysql_params)
    name = params.pop("database", "test")
    server = pymysql.connect(autocommit=True, connect_timeout=5, database=name, **params)
    table = unique("gp_retry")
    with server.cursor() as cur:
        cur.execute(f"create table {table} (id integer primary key, value integer not null) engine=innodb")
    db = gpw.PooledMySQLDatabase(name, max_connections=4, check_idle=0, **params)

    class Item(peewee.Model):
        value = peewee.IntegerField()

        class Meta:
            database = db
            table_name = table

    yield db, Item, server
    db.close()
    db.pool.close()
    with server.cursor() as cur:
        cur.execute(f"drop table if exists {table}")
    server.close()


def test_peewee_mariadb_atomic_after_kill(mysql_db: tuple[Any, type[peewee.Model], Any]) -> None:
    db, item, server = mysql_db
    ids: list[int] = []
    errors: list[Exception] = []

    def mysql_alive(ident: int) -> bool:
        with server.cursor() as cur:
            cur.execute("select 1 from information_schema.processlist where id = %s", (ident,))
            return bool(cur.fetchall())

    @db.retry(attempts=3, on_retry=lambda n, error, d: errors.append(error), **FAST)
    def work() -> None:
        with db.atomic():
            ids.append(int(db.execute_sql("select connection_id()").fetchone()[0]))
            item.create(id=1, value=len(ids))
            if len(ids) == 1:
                with server.cursor() as cur:
                    cur.execute(f"kill {ids[0]}")
                wait_until(lambda: not mysql_alive(ids[0]), what="the killed connection to go")
            item.update(value=item.value + 100).where(item.id == 1).execute()

    work()
    assert len(ids) == 2 and ids[0] != ids[1]
    assert [(r.id, r.value) for r in item.select()] == [(1, 102)], "the first attempt was rolled back"
    assert len(errors) == 1
    assert isinstance(errors[0], (peewee.OperationalError, peewee.InterfaceError))
    assert isinstance(errors[0].orig, pymysql.err.Error)  # type: ignore[attr-defined]
    assert classify(errors[0]) == CONNECTION


# --------------------------------------------------------------------------
# (8) failover: to come with the failover test. A 25006 (READ_ONLY) is
# retried; `greenpool.retry.PoolRetrying._before_retry` is the hook for
# replacing the pool's connections to a demoted primary.
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Classification, backoff and arguments (no server)
# --------------------------------------------------------------------------


def test_classify() -> None:
    lost = psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
    assert classify(lost) == CONNECTION
    assert classify(e.AdminShutdown()) == CONNECTION
    assert classify(e.CrashShutdown()) == CONNECTION
    assert classify(e.CannotConnectNow()) == CONNECTION
    assert classify(e.ConnectionFailure()) == CONNECTION  # class 08
    assert classify(psycopg.InterfaceError("cannot execute operations: the connection is in status 2")) == CONNECTION
    assert classify(e.ReadOnlySqlTransaction()) == READ_ONLY
    assert classify(e.SerializationFailure()) is None
    assert classify(e.SerializationFailure(), retry_serialization=True) == SERIALIZATION
    assert classify(e.DeadlockDetected(), retry_serialization=True) == SERIALIZATION
    for error in (
        e.QueryCanceled(),
        e.UniqueViolation(),
        e.DivisionByZero(),
        e.InvalidPassword(),
        e.PipelineAborted(),
        psycopg.InterfaceError("the cursor is closed"),
        psycopg.OperationalError("the 'with' block ended while a query was still running on its connection"),
        ValueError("x"),
        OSError("x"),
    ):
        assert classify(error, retry_serialization=True) is None, error
    for base in (KeyboardInterrupt(), GreenletExit(), gevent.Timeout()):
        assert classify(base) is None

    # Pool errors: only a timeout whose cause is a connection failure (fail-fast).
    fast = greenpool.PoolTimeout("the pool has no connection")
    fast.__cause__ = psycopg.OperationalError("connection refused")
    assert classify(fast) == CONNECTION
    assert classify(greenpool.PoolTimeout("couldn't get a connection after 1.00 sec")) is None
    wrong_password = greenpool.PoolTimeout("no connection")
    wrong_password.__cause__ = e.InvalidPassword()
    assert classify(wrong_password) is None
    assert classify(greenpool.PoolClosed("closed")) is None
    assert classify(greenpool.TooManyRequests("too many")) is None

    # MySQL, and Peewee's wrappers.
    for code in (2006, 2013, 1927, 1053, 2003):
        assert classify(pymysql.err.OperationalError(code, "x")) == CONNECTION
    assert classify(pymysql.err.InterfaceError(0, "")) == CONNECTION
    assert classify(pymysql.err.OperationalError(1213, "deadlock")) is None
    assert classify(pymysql.err.OperationalError(1213, "deadlock"), retry_serialization=True) == SERIALIZATION
    assert classify(pymysql.err.IntegrityError(1062, "duplicate")) is None
    assert classify(pymysql.err.OperationalError(1045, "access denied")) is None
    wrapped = peewee.OperationalError(pymysql.err.OperationalError(2013, "lost"))
    assert classify(wrapped) == CONNECTION
    assert classify(peewee.InterfaceError(pymysql.err.InterfaceError(0, ""))) == CONNECTION
    assert classify(peewee.OperationalError(e.AdminShutdown())) == CONNECTION
    assert classify(peewee.IntegrityError(pymysql.err.IntegrityError(1062, "dup"))) is None
    assert classify(peewee.OperationalError("Connection already opened.")) is None
    caused = peewee.OperationalError("x")
    caused.__cause__ = psycopg.OperationalError("lost")
    assert classify(caused) == CONNECTION


def test_full_jitter_backoff() -> None:
    policy = Retrying(base_delay=0.1, max_delay=0.5)
    for n in range(8):
        cap = min(0.5, 0.1 * 2**n)
        delays = [policy.delay(n) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # spread over the whole range
    assert Retrying(base_delay=0).delay(5) == 0
    assert 0 <= Retrying().delay(5000) <= 2.0  # no overflow with huge attempt counts


def test_on_retry_error_ends_the_run() -> None:
    runs = 0

    def on_retry(attempt: int, error: Exception, delay: float) -> None:
        raise RuntimeError("from on_retry")

    @greenpool.retry(attempts=5, on_retry=on_retry, **FAST)
    def work() -> None:
        nonlocal runs
        runs += 1
        raise psycopg.OperationalError("connection lost")

    with pytest.raises(RuntimeError, match="from on_retry"):
        work()
    assert runs == 1


def test_defaults_and_repr() -> None:
    policy = greenpool.retry()
    assert isinstance(policy, Retrying)
    assert (policy.attempts, policy.deadline, policy.base_delay, policy.max_delay) == (3, 30.0, 0.05, 2.0)
    assert policy.retry_serialization is False and policy.on_retry is None
    assert greenpool.retry(deadline=None).deadline == math.inf
    assert "attempts=3" in repr(policy)
    assert "retry" in greenpool.__all__


def test_bare_decorator_keeps_the_function() -> None:
    @greenpool.retry
    def double(x: int) -> int:
        """Doc."""
        return 2 * x

    assert double(21) == 42
    assert double.__name__ == "double" and double.__doc__ == "Doc."


def test_run_gives_up_on_deadline_without_sleeping_past_it() -> None:
    runs = 0

    @greenpool.retry(attempts=100, deadline=0.3, base_delay=0.2, max_delay=0.2)
    def work() -> None:
        nonlocal runs
        runs += 1
        raise psycopg.OperationalError("connection refused")

    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        work()
    assert time.monotonic() - t0 < 0.45  # no sleep ends past the deadline
    assert runs >= 1
    assert len(info.value.greenpool_attempts) == runs  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"attempts": 0}, ValueError, "attempts must be >= 1"),
        ({"attempts": 2.0}, TypeError, "attempts must be an int"),
        ({"attempts": True}, TypeError, "attempts must be an int"),
        ({"deadline": 0}, ValueError, "deadline must be > 0"),
        ({"deadline": -1}, ValueError, "deadline must be > 0"),
        ({"deadline": "30"}, TypeError, "deadline must be a number"),
        ({"base_delay": -0.1}, ValueError, "base_delay must be >= 0"),
        ({"base_delay": math.nan}, ValueError, "base_delay must be >= 0"),
        ({"max_delay": "2"}, TypeError, "max_delay must be a number"),
        ({"retry_serialization": 1}, TypeError, "retry_serialization must be True or False"),
        ({"on_retry": 5}, TypeError, "on_retry must be callable or None"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        greenpool.retry(**kwargs)
    with pytest.raises(error, match=words):
        Retrying(**kwargs)


def test_bad_arguments_of_pool_and_database(pg_dsn: str) -> None:
    pool = greenpool.ConnectionPool(pg_dsn, open=False)
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        pool.retry(attempts=0)
    db = gpw.PooledSqliteDatabase(":memory:")
    with pytest.raises(TypeError, match="on_retry must be callable"):
        db.retry(on_retry="log")
    with pytest.raises(TypeError, match="decorates a callable"):
        greenpool.retry(5)  # type: ignore[call-overload]


def test_import_greenpool_stays_light(run_python: Callable[..., Any]) -> None:
    proc = run_python(
        "import sys, greenpool\n"
        "assert callable(greenpool.retry)\n"
        "heavy = [m for m in ('psycopg', 'peewee', 'pymysql', 'gevent') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n",
        env={"GREENPOOL_TEST_DSN": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
