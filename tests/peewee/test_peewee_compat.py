"""Black-box compatibility: `greenpool.peewee` behaves like `playhouse.pool`.

Every scenario runs once with playhouse.pool's class and once with
greenpool's class of the same name, against PostgreSQL, MariaDB and SQLite
(where it applies), and asserts the same observable behaviour: the scenarios
peewee's own pool tests check (reuse, max_connections and timeout, stale
connections, close_idle / close_stale / close_all / manual_close, rollback at
check-in, dead connections, dispose), driven from plain OS threads (no gevent).

Setup shared by both implementations: PostgreSQL through psycopg 3 (the only
driver installed); SQLite with `check_same_thread=False` for both
(greenpool's default, as its connections are made and closed by background
jobs; playhouse needs it to close other threads' connections in
close_stale / close_all, else `_close_raw` silently fails).

Intended differences, asserted as such (greenpool's side is tested):

- `stale_timeout` is a randomized lifetime in
  `[stale_timeout * (1 - lifetime_jitter), stale_timeout]` (jitter 0.1 by
  default) instead of exactly `stale_timeout`; tests use a tolerance.
- Stale connections are replaced proactively by a background housekeeper:
  an idle stale connection is closed without waiting for a checkout
  (playhouse closes it at the next checkout that finds it).
- Negative `stale_timeout` and `max_connections` are refused with
  `ValueError` naming the parameter; playhouse accepts them, and a negative
  `max_connections` makes every connect fail. (`stale_timeout=0` means
  "never stale" in both.)
- Liveness probe at checkout: playhouse probes (`SELECT 1` / `ping`) every
  idle connection it hands out; greenpool only those idle for `check_idle`
  seconds or more (default 0.5 s). The dead-connection scenario passes
  `check_idle=0` to greenpool (test_peewee.py covers the default).
- Rollback of a connection returned in a transaction, and closing
  connections (close_idle, close_stale, close_all, stale at check-in), happen
  in the background in greenpool, inline in playhouse: tests wait (bounded)
  for the server to show the effect.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers
import peewee
import playhouse.pool as ph
import psycopg
import pymysql
import pytest
from helpers import deadline, destroy_main_hub, pg_params, unique, wait_until

import greenpool.peewee as gpw

TEST_DEADLINE = 60

IMPLS = {
    "playhouse": {
        "pg": ph.PooledPostgresqlDatabase,
        "mysql": ph.PooledMySQLDatabase,
        "sqlite": ph.PooledSqliteDatabase,
    },
    "greenpool": {
        "pg": gpw.PooledPostgresqlDatabase,
        "mysql": gpw.PooledMySQLDatabase,
        "sqlite": gpw.PooledSqliteDatabase,
    },
}


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """No gevent hub in this thread (pure thread mode); fail a test that overruns."""
    destroy_main_hub()
    with deadline(TEST_DEADLINE, dump_after=TEST_DEADLINE * 2):
        yield


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------


@dataclass
class Conn:
    """A connection seen through the pool: the driver object and its server id."""

    obj: Any
    ident: int


@dataclass
class Backend:
    impl: str  # "playhouse" or "greenpool"
    kind: str  # "pg", "mysql" or "sqlite"
    database: str
    params: dict[str, Any]
    monitor: Any = None
    path: Path | None = None
    dbs: list[Any] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    raw_conns: list[Conn] = field(default_factory=list)

    @property
    def cls(self) -> type:
        return IMPLS[self.impl][self.kind]

    @property
    def green(self) -> bool:
        return self.impl == "greenpool"

    def make(self, *, green: dict[str, Any] | None = None, database: Any = "", **kwargs: Any) -> Any:
        """The implementation's pooled database; `green` kwargs go to greenpool only."""
        params = dict(self.params)
        params.update(kwargs)
        if self.green and green:
            params.update(green)
        db = self.cls(self.database if database == "" else database, **params)
        self.dbs.append(db)
        return db

    # -- observing the server --------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return helpers.server_query(self.kind, self.monitor, self.path, sql, params, sqlite_timeout=0.5)

    def current(self, db: Any) -> Conn:
        """The calling thread's connection (checked out if needed)."""
        obj = db.connection()
        if self.kind == "pg":
            ident = int(db.execute_sql("select pg_backend_pid()").fetchone()[0])
        elif self.kind == "mysql":
            ident = int(db.execute_sql("select connection_id()").fetchone()[0])
        else:
            ident = id(obj)
        conn = Conn(obj, ident)
        self.raw_conns.append(conn)  # keeps obj alive: id() stays unique
        return conn

    def is_open(self, conn: Conn) -> bool:
        """Is the connection still open (on the server for PG/MariaDB)?"""
        if self.kind == "pg":
            return bool(self.query("select 1 from pg_stat_activity where pid = %s", (conn.ident,)))
        if self.kind == "mysql":
            return bool(self.query("select 1 from information_schema.processlist where id = %s", (conn.ident,)))
        try:
            _ = conn.obj.total_changes
        except sqlite3.ProgrammingError:
            return False
        return True

    def wait_closed(self, *conns: Conn, timeout: float = 5.0) -> None:
        for conn in conns:
            wait_until(lambda conn=conn: not self.is_open(conn), timeout, f"{conn} to be closed")

    def kill(self, conn: Conn) -> None:
        if self.kind == "pg":
            self.query("select pg_terminate_backend(%s)", (conn.ident,))
        else:
            self.query(f"kill {int(conn.ident)}")
        self.wait_closed(conn)

    def in_transaction(self, conn: Conn) -> bool:
        """Does the server (or the SQLite file) see an open transaction of `conn`?"""
        if self.kind == "pg":
            rows = self.query("select state from pg_stat_activity where pid = %s", (conn.ident,))
            return bool(rows) and str(rows[0][0]).startswith("idle in transaction")
        if self.kind == "mysql":
            # InnoDB refreshes its information_schema.innodb_trx cache only
            # when it hasn't been read for 100 ms: polled faster, it would
            # show the same (stale) snapshot forever.
            time.sleep(0.15)
            rows = self.query(
                "select count(*) from information_schema.innodb_trx where trx_mysql_thread_id = %s", (conn.ident,)
            )
            return bool(rows[0][0])
        try:  # a write lock held by an open transaction blocks writers
            self.query("begin immediate")  # rolled back as query() closes
        except sqlite3.OperationalError:
            return True
        return False

    def table(self) -> str:
        name = unique("gp_pwc")
        if self.kind == "pg":
            self.query(f"create table {name} (id serial primary key, value integer)")
        elif self.kind == "mysql":
            self.query(f"create table {name} (id integer auto_increment primary key, value integer) engine=innodb")
        else:
            self.query(f"create table {name} (id integer primary key autoincrement, value integer)")
        self.tables.append(name)
        return name

    def count(self, table: str) -> int:
        return int(self.query(f"select count(*) from {table}")[0][0])

    def cleanup(self) -> None:
        helpers.close_dbs(self.dbs)
        # Connections a test let go of without closing them (dispose()).
        for conn in self.raw_conns:
            try:
                if self.kind == "sqlite":
                    conn.obj.close()
                elif self.is_open(conn):
                    self.kill(conn)
            except Exception:  # noqa: BLE001
                pass
        helpers.drop_tables(self.query, self.tables)
        if self.monitor is not None:
            self.monitor.close()


@pytest.fixture(
    params=[(impl, kind) for kind in ("pg", "mysql", "sqlite") for impl in IMPLS], ids=lambda p: f"{p[0]}-{p[1]}"
)
def backend(request: pytest.FixtureRequest, tmp_path: Path, _bounded: None) -> Iterator[Backend]:
    impl, kind = request.param
    if kind == "pg":
        params = pg_params(request.getfixturevalue("pg_dsn"))
        database = params.pop("dbname")
        monitor = psycopg.connect(autocommit=True, dbname=database, **params)
        monitor.execute("set lock_timeout = '5s'")
        params["application_name"] = unique("gp_pwc")
        be = Backend(impl, kind, database, params, monitor)
    elif kind == "mysql":
        params = dict(request.getfixturevalue("mysql_params"))
        database = params.pop("database", "test")
        monitor = pymysql.connect(autocommit=True, database=database, connect_timeout=5, **params)
        be = Backend(impl, kind, database, params, monitor)
        be.query("set session lock_wait_timeout = 5")
    else:
        path = tmp_path / "compat.db"
        be = Backend(impl, kind, str(path), {"check_same_thread": False}, path=path)
    yield be
    be.cleanup()


def only(*kinds: str) -> Any:
    """Restrict a test to some backends (e.g. killing a server connection)."""
    return pytest.mark.parametrize(
        "backend",
        [pytest.param((impl, kind), id=f"{impl}-{kind}") for kind in kinds for impl in IMPLS],
        indirect=True,
    )


# --------------------------------------------------------------------------
# Threads holding connections
# --------------------------------------------------------------------------


class Holder:
    """A thread that checks out a connection and holds it until `release()`.

    `then` runs in the thread after release, before `db.close()`.
    """

    def __init__(self, backend: Backend, db: Any, then: Callable[[], Any] | None = None) -> None:
        self.backend, self.db, self.then = backend, db, then
        self.ready = threading.Event()
        self._go = threading.Event()
        self.conn: Conn | None = None
        self.error: BaseException | None = None
        self.then_result: Any = None
        self.then_error: BaseException | None = None
        self.close_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Holder:
        self.thread.start()
        assert self.ready.wait(10), "holder thread didn't get going"
        if self.error is not None:
            raise self.error
        return self

    def _run(self) -> None:
        try:
            self.db.connect()
            self.conn = self.backend.current(self.db)
        except BaseException as ex:  # noqa: BLE001
            self.error = ex
            self.ready.set()
            return
        self.ready.set()
        self._go.wait(30)
        if self.then is not None:
            try:
                self.then_result = self.then()
            except BaseException as ex:  # noqa: BLE001
                self.then_error = ex
        try:
            self.db.close()
        except BaseException as ex:  # noqa: BLE001
            self.close_error = ex

    def release(self) -> Holder:
        self._go.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "holder thread didn't finish"
        return self


class Attempt:
    """A thread that tries `db.connect()`: how long it took and what it got."""

    def __init__(self, backend: Backend, db: Any) -> None:
        self.backend, self.db = backend, db
        self.elapsed: float | None = None
        self.conn: Conn | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = threading.Event()

    def start(self) -> Attempt:
        self.thread.start()
        assert self.started.wait(5)
        return self

    def _run(self) -> None:
        self.started.set()
        t0 = time.monotonic()
        try:
            self.db.connect()
            self.elapsed = time.monotonic() - t0
            self.conn = self.backend.current(self.db)
            self.db.close()
        except BaseException as ex:  # noqa: BLE001
            self.elapsed = time.monotonic() - t0
            self.error = ex

    def join(self, timeout: float = 15) -> Attempt:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "connect() still blocked"
        return self


# --------------------------------------------------------------------------
# Reuse
# --------------------------------------------------------------------------


def test_same_connection_after_close_and_connect(backend: Backend) -> None:
    db = backend.make()
    assert db.connect() is True
    first = backend.current(db)
    assert db.connection() is first.obj
    with pytest.raises(peewee.OperationalError):
        db.connect()
    assert db.connect(reuse_if_open=True) is False
    db.close()
    assert db.is_closed()
    db.connect()
    assert db.connection() is first.obj
    db.close()
    # Autoconnect through a query, too.
    assert backend.current(db).ident == first.ident
    db.close()


def test_threads_get_their_own_connections_and_reuse_them(backend: Backend) -> None:
    db = backend.make()
    holders = [Holder(backend, db).start() for _ in range(5)]
    first_round = {h.conn.ident for h in holders if h.conn}
    assert len(first_round) == 5
    for h in holders:
        h.release()
    holders = [Holder(backend, db).start() for _ in range(5)]
    second_round = {h.conn.ident for h in holders if h.conn}
    for h in holders:
        h.release()
    assert second_round == first_round, "the 5 idle connections are reused"


def test_with_db_and_nested_connection_context(backend: Backend) -> None:
    db = backend.make()
    table = backend.table()
    with db.connection_context():
        conn = db.connection()
        with db.connection_context():
            assert db.connection() is conn
        assert not db.is_closed()
        with db:
            db.execute_sql(f"insert into {table} (value) values (1)")
            assert db.connection() is conn
        assert not db.is_closed()
    assert db.is_closed()
    with pytest.raises(ZeroDivisionError):  # rolled back, then closed
        with db:
            db.execute_sql(f"insert into {table} (value) values (2)")
            raise ZeroDivisionError
    assert db.is_closed()
    assert backend.count(table) == 1
    with db.connection_context():
        assert db.connection() is conn


def test_error_then_reuse(backend: Backend) -> None:
    """peewee's test_bad_connection: a failed query doesn't spoil the connection."""
    db = backend.make()
    first = backend.current(db)
    with pytest.raises(peewee.DatabaseError):
        db.execute_sql("select * from gp_no_such_table_here")
    db.close()
    db.connect()
    assert db.execute_sql("select 1").fetchone() == (1,)
    assert backend.current(db).ident == first.ident
    db.close()


# --------------------------------------------------------------------------
# max_connections and timeout
# --------------------------------------------------------------------------


def test_max_connections_exceeded_is_a_value_error() -> None:
    assert gpw.MaxConnectionsExceeded is ph.MaxConnectionsExceeded
    assert issubclass(ph.MaxConnectionsExceeded, ValueError)


def test_max_connections_without_timeout_fails_at_once(backend: Backend) -> None:
    db = backend.make(max_connections=2)
    holders = [Holder(backend, db).start() for _ in range(2)]
    try:
        t0 = time.monotonic()
        with pytest.raises(ph.MaxConnectionsExceeded) as info:
            db.connect()
        assert time.monotonic() - t0 < 0.5
        assert type(info.value) is ph.MaxConnectionsExceeded
        assert isinstance(info.value, ValueError)
        assert str(info.value) == "Exceeded maximum connections."
        assert db.is_closed()
    finally:
        for h in holders:
            h.release()
    db.connect()  # one is free again
    db.close()


def test_timeout_waits_then_fails_with_peewee_message(backend: Backend) -> None:
    db = backend.make(max_connections=1, timeout=0.5)
    holder = Holder(backend, db).start()
    try:
        attempt = Attempt(backend, db).start().join()
    finally:
        holder.release()
    assert isinstance(attempt.error, ph.MaxConnectionsExceeded), attempt.error
    assert str(attempt.error) == "Max connections exceeded, timed out attempting to connect."
    assert attempt.elapsed is not None and 0.4 <= attempt.elapsed < 3


def test_connection_freed_while_waiting_is_handed_over(backend: Backend) -> None:
    db = backend.make(max_connections=1, timeout=5)
    db.connect()
    mine = backend.current(db)
    attempt = Attempt(backend, db).start()
    time.sleep(0.3)
    assert attempt.thread.is_alive(), "the request must wait for the busy connection"
    db.close()
    attempt.join()
    assert attempt.error is None, attempt.error
    assert attempt.conn is not None and attempt.conn.ident == mine.ident
    assert attempt.elapsed is not None and 0.2 <= attempt.elapsed < 2


def test_timeout_zero_waits_until_freed(backend: Backend) -> None:
    db = backend.make(max_connections=1, timeout=0)
    db.connect()
    attempt = Attempt(backend, db).start()
    time.sleep(1.3)  # past playhouse's 1 s re-check
    assert attempt.thread.is_alive(), "timeout=0 waits as long as it takes"
    db.close()
    attempt.join()
    assert attempt.error is None, attempt.error
    assert attempt.elapsed is not None and attempt.elapsed >= 1.2


def test_string_parameters(backend: Backend) -> None:
    db = backend.make(max_connections="2", stale_timeout="30", timeout="1")
    holders = [Holder(backend, db).start() for _ in range(2)]
    try:
        attempt = Attempt(backend, db).start().join()
    finally:
        for h in holders:
            h.release()
    assert isinstance(attempt.error, ph.MaxConnectionsExceeded)
    assert attempt.elapsed is not None and 0.8 <= attempt.elapsed < 4


def assert_exhausted_while_held(backend: Backend, db: Any) -> None:
    """While a Holder holds db's only connection, `db.connect()` fails."""
    holder = Holder(backend, db).start()
    try:
        with pytest.raises(ph.MaxConnectionsExceeded):
            db.connect()
    finally:
        holder.release()


def test_init_reconfigures_max_connections(backend: Backend) -> None:
    db = backend.make(max_connections=5)
    db.init(backend.database, max_connections=1, **backend.params)
    assert_exhausted_while_held(backend, db)


def test_deferred_init(backend: Backend) -> None:
    db = backend.make(database=None)
    with pytest.raises(peewee.InterfaceError):
        db.connect()
    db.init(backend.database, max_connections=1, **backend.params)
    assert db.execute_sql("select 1").fetchone() == (1,)
    db.close()
    assert_exhausted_while_held(backend, db)


# --------------------------------------------------------------------------
# Stale connections
# --------------------------------------------------------------------------

STALE = 0.5


def test_stale_connection_not_reused_at_checkout(backend: Backend) -> None:
    db = backend.make(stale_timeout=STALE)
    first = backend.current(db)
    db.close()  # fresh: back in the pool
    time.sleep(STALE + 0.3)
    second = backend.current(db)
    assert second.ident != first.ident
    db.close()
    backend.wait_closed(first)


def test_stale_connection_closed_at_checkin(backend: Backend) -> None:
    db = backend.make(stale_timeout=STALE)
    first = backend.current(db)
    time.sleep(STALE + 0.3)
    db.close()  # stale by now: closed, not returned
    backend.wait_closed(first)
    second = backend.current(db)
    assert second.ident != first.ident
    db.close()


def test_stale_idle_connection_without_checkout(backend: Backend) -> None:
    """Intended difference: greenpool closes (replaces) an idle stale
    connection in the background; playhouse leaves it open until a checkout
    finds it."""
    db = backend.make(stale_timeout=STALE)
    first = backend.current(db)
    db.close()
    time.sleep(STALE * 3)
    if backend.green:
        assert not backend.is_open(first)
    else:
        assert backend.is_open(first)


# --------------------------------------------------------------------------
# close_idle, close_stale, close_all, manual_close
# --------------------------------------------------------------------------


def test_close_idle(backend: Backend) -> None:
    db = backend.make()
    db.connect()
    mine = backend.current(db)
    holders = [Holder(backend, db).start() for _ in range(3)]
    idle = [h.release().conn for h in holders]
    assert db.close_idle() is None
    backend.wait_closed(*[c for c in idle if c])
    assert backend.is_open(mine)
    assert db.execute_sql("select 1").fetchone() == (1,)  # in use: untouched
    attempt = Attempt(backend, db).start().join()
    assert attempt.conn is not None
    assert attempt.conn.ident not in {c.ident for c in idle if c}
    db.close()


def test_close_stale_closes_old_checkouts_even_in_use(backend: Backend) -> None:
    db = backend.make()
    old = Holder(backend, db, then=lambda: db.execute_sql("select 1").fetchone())
    old.start()
    time.sleep(0.6)
    young = Holder(backend, db, then=lambda: db.execute_sql("select 1").fetchone()).start()
    try:
        assert db.close_stale(age=0.4) == 1
        assert old.conn is not None and young.conn is not None
        backend.wait_closed(old.conn)
        assert backend.is_open(young.conn)
    finally:
        old.release()
        young.release()
    assert old.then_error is not None, "the closed connection can't run a query"
    assert old.close_error is None, "closing a connection closed by close_stale() is quietly ignored"
    assert young.then_error is None and young.then_result == (1,)
    assert db.close_stale(age=0) == 0
    assert db.execute_sql("select 1").fetchone() == (1,)
    db.close()


def test_close_all(backend: Backend) -> None:
    db = backend.make()
    db.connect()
    mine = backend.current(db)
    busy = Holder(backend, db, then=lambda: db.execute_sql("select 1").fetchone()).start()
    idle = Holder(backend, db).start().release()
    try:
        db.close_all()
        assert db.is_closed()
        backend.wait_closed(*(c for c in (mine, busy.conn, idle.conn) if c))
    finally:
        busy.release()
    assert busy.then_error is not None
    assert busy.close_error is None
    fresh = backend.current(db)
    assert fresh.ident not in {c.ident for c in (mine, busy.conn, idle.conn) if c}
    db.close()


def test_manual_close(backend: Backend) -> None:
    db = backend.make()
    first = backend.current(db)
    assert db.manual_close() is None
    assert db.is_closed()
    backend.wait_closed(first)
    assert db.manual_close() is False  # nothing open
    second = backend.current(db)
    assert second.ident != first.ident
    db.close()
    assert backend.current(db).ident == second.ident
    db.close()


# --------------------------------------------------------------------------
# Transactions at check-in
# --------------------------------------------------------------------------


def test_close_inside_atomic_raises(backend: Backend) -> None:
    db = backend.make()
    table = backend.table()
    with db.atomic():
        db.execute_sql(f"insert into {table} (value) values (1)")
        with pytest.raises(peewee.OperationalError):
            db.close()
    db.close()
    assert backend.count(table) == 1


def test_open_manual_transaction_rolled_back_at_checkin(backend: Backend) -> None:
    """peewee doesn't track `db.begin()`: close() accepts it, the pool rolls back."""
    db = backend.make()
    table = backend.table()
    db.begin()
    db.execute_sql(f"insert into {table} (value) values (1)")
    conn = backend.current(db)
    db.close()
    wait_until(lambda: not backend.in_transaction(conn), what="the transaction to be rolled back")
    assert backend.count(table) == 0
    db.execute_sql(f"insert into {table} (value) values (2)")  # autocommit again
    db.close()
    assert backend.count(table) == 1


def test_rollback_at_checkin_then_immediate_checkout_at_max_connections(backend: Backend) -> None:
    """With every connection in use, `timeout=None` fails at once; a
    connection just given back (even in a transaction) is not in use."""
    db = backend.make(max_connections=1)
    table = backend.table()
    for i in range(20):  # a race in greenpool: repeat to lose it reliably
        db.begin()
        db.execute_sql(f"insert into {table} (value) values (-1)")
        db.close()
        db.connect()  # the only connection was just returned
        assert db.execute_sql(f"select count(*) from {table} where value < 0").fetchone() == (0,)
        db.execute_sql(f"insert into {table} (value) values ({i})")
        db.close()
    assert backend.count(table) == 20


# --------------------------------------------------------------------------
# Dead connections, dispose
# --------------------------------------------------------------------------


@only("pg", "mysql")
def test_dead_connection_discarded_at_checkout(backend: Backend) -> None:
    # greenpool probes only connections idle >= check_idle (default 0.5 s).
    db = backend.make(green={"check_idle": 0})
    first = backend.current(db)
    db.close()
    backend.kill(first)
    db.connect()
    assert db.execute_sql("select 1").fetchone() == (1,)
    assert backend.current(db).ident != first.ident
    db.close()


def test_dispose_forgets_connections_without_closing_them(backend: Backend) -> None:
    db = backend.make()
    idle = backend.current(db)
    db.close()
    busy = Holder(backend, db).start()
    try:
        db.dispose()
        assert db.is_closed()
        fresh = backend.current(db)
        assert busy.conn is not None
        assert fresh.ident not in {idle.ident, busy.conn.ident}
        assert backend.is_open(idle) and backend.is_open(busy.conn), "dispose() closes nothing"
    finally:
        busy.release()
    assert busy.close_error is None
    db.close()
    # The forgotten connections never come back.
    holders = [Holder(backend, db).start() for _ in range(3)]
    seen = {h.conn.ident for h in holders if h.conn}
    for h in holders:
        h.release()
    assert not seen & {idle.ident, busy.conn.ident}


def test_stale_timeout_zero(backend: Backend) -> None:
    db = backend.make(stale_timeout=0)  # never stale
    first = backend.current(db)
    db.close()
    time.sleep(0.1)
    assert backend.current(db).ident == first.ident
    db.close()


# --------------------------------------------------------------------------
# Validation: intended differences
# --------------------------------------------------------------------------


def test_negative_max_connections(backend: Backend) -> None:
    if backend.green:
        with pytest.raises(ValueError, match="max_connections"):
            backend.make(max_connections=-1)
        return
    db = backend.make(max_connections=-1)  # playhouse: accepted, then nothing works
    with pytest.raises(ph.MaxConnectionsExceeded):
        db.connect()
