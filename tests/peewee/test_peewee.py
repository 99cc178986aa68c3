"""greenpool's Peewee adapter (`greenpool.peewee`) against real servers.

Every behaviour runs against PostgreSQL (`PooledPostgresqlDatabase`, and the
`PooledPsycopg3Database` / `PooledPostgresqlExtDatabase` variants where it
matters), MariaDB (`PooledMySQLDatabase`) and SQLite (`PooledSqliteDatabase`)
where it applies, through the `backend` fixture.

How each environment is exercised:

- Plain OS threads (no gevent hub): in this process.
- Greenlets without monkey-patching: in this process for PostgreSQL (greenpool
  connects psycopg through gevent's hub) and SQLite (no I/O to wait for).
  The pytest process itself is never monkey-patched.
- Greenlets with `gevent.monkey.patch_all()`, import-order scenarios and every
  MariaDB-under-gevent scenario (pymysql only cooperates on patched sockets):
  in subprocesses, through conftest's `run_python`.

Every test is bounded: greenlets by `gevent.Timeout`/`joinall(timeout=...)`,
subprocesses by `run_python(timeout=...)` plus a faulthandler watchdog in the
child, and the whole test by a SIGALRM deadline. Timing assertions are gross
(e.g. "10 x 0.2 s over 10 connections in well under 2 s").

Notes on greenpool's knobs used here:

- A pooled connection is probed (`SELECT 1` / `ping`) at checkout only when it
  has been idle for `check_idle` seconds or more (default 0.5 s). Tests that
  kill a backend and expect the next checkout to get a working connection
  either pass `check_idle=0` or wait past `check_idle`; one test documents
  what happens when the dead connection is reused within `check_idle`.
- The leak report and the proactive replacement of stale connections run in
  the pool's housekeeper, whose tick is `min(stale_timeout, max_idle) / 20`
  clamped to [0.05, 1] s: the leak test passes `max_idle=2` (0.1 s tick).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import gevent
import gevent.event
import helpers
import peewee
import psycopg
import pymysql
import pytest
from helpers import deadline, destroy_main_hub, pg_params, unique, wait_until
from playhouse.db_url import connect as url_connect
from playhouse.postgres_ext import PostgresqlExtDatabase, Psycopg3Database
from psycopg.conninfo import make_conninfo

import greenpool.peewee as gpw
from greenpool.pg import GeventConnection
from greenpool.testing.proxy import Proxy, parse_dsn_host_port

#: Every test must end well within this (seconds); a hang fails the test.
TEST_DEADLINE = 90


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """Fresh hub state, and fail (rather than hang) a test that overruns."""
    destroy_main_hub()
    with deadline(TEST_DEADLINE, dump_after=TEST_DEADLINE * 2):
        yield


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def run_greenlets(fn: Callable[[int], Any], n: int, timeout: float = 15.0) -> list[Any]:
    """Run `fn(i)` in `n` greenlets; re-raise the first failure; bounded."""
    greenlets = [gevent.spawn(fn, i) for i in range(n)]
    done = gevent.joinall(greenlets, timeout=timeout)
    if len(done) < n:
        gevent.killall(greenlets, timeout=2)
        pytest.fail(f"only {len(done)} of {n} greenlets finished within {timeout} s")
    for g in greenlets:
        if g.exception is not None:
            raise g.exception
    return [g.value for g in greenlets]


def run_threads(fn: Callable[[int], Any], n: int, timeout: float = 15.0) -> list[Any]:
    """Run `fn(i)` in `n` OS threads; re-raise the first failure; bounded."""
    results, errors = helpers.run_threads(fn, n, timeout)
    if errors:
        raise errors[0]
    return results


@contextlib.contextmanager
def counting_calls(owner: type, name: str) -> Iterator[list[None]]:
    """Count the calls to the method `owner.name` made in the block."""
    calls: list[None] = []
    real = getattr(owner, name)

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return real(self, *args, **kwargs)

    with mock.patch.object(owner, name, spy):
        yield calls


def timed_sleepers(
    db: Any,
    run: Callable[..., list[Any]],
    sql: str = "select pg_sleep(0.2)",
    then: Callable[[], Any] = lambda: None,
) -> tuple[float, list[Any]]:
    """Run 10 workers through `run` (run_greenlets or run_threads), each
    running `sql` on its own connection of `db`, then `then()` on it; return
    the time they took and the values of `then()`."""

    def sleeper(i: int) -> Any:
        with db.connection_context():
            db.execute_sql(sql).fetchall()
            return then()

    t0 = time.monotonic()
    values = run(sleeper, 10)
    return time.monotonic() - t0, values


# --------------------------------------------------------------------------
# Servers and backends
# --------------------------------------------------------------------------


class Server:
    """An unpooled connection to observe (and act on) the server under test."""

    def __init__(self, kind: str, params: dict[str, Any], path: Path | None = None) -> None:
        self.kind = kind
        self.path = path
        self.conn: Any = None
        if kind == "pg":
            self.conn = psycopg.connect(autocommit=True, **params)
            self.conn.execute("set lock_timeout = '5s'")
        elif kind == "mysql":
            self.conn = pymysql.connect(autocommit=True, connect_timeout=5, **params)
            self.query("set session lock_wait_timeout = 5")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return helpers.server_query(self.kind, self.conn, self.path, sql, params, sqlite_timeout=1)

    def create_items_table(self, table: str) -> None:
        if self.kind == "pg":
            self.query(f"create table {table} (id serial primary key, value integer not null)")
        elif self.kind == "mysql":
            self.query(
                f"create table {table} (id integer auto_increment primary key, value integer not null) engine=innodb"
            )
        else:
            self.query(f"create table {table} (id integer primary key autoincrement, value integer not null)")

    def count(self, table: str) -> int:
        return int(self.query(f"select count(*) from {table}")[0][0])

    def alive(self, ident: int) -> bool:
        """Is the server connection `ident` (pid / connection id) still there?"""
        if self.kind == "pg":
            return bool(self.query("select 1 from pg_stat_activity where pid = %s", (ident,)))
        return bool(self.query("select 1 from information_schema.processlist where id = %s", (ident,)))

    def running_query(self, ident: int) -> bool:
        """Is the server connection `ident` executing a statement right now?"""
        if self.kind == "pg":
            return bool(self.query("select 1 from pg_stat_activity where pid = %s and state = 'active'", (ident,)))
        return bool(
            self.query("select 1 from information_schema.processlist where id = %s and command = 'Query'", (ident,))
        )

    def kill(self, ident: int) -> None:
        """Kill a server connection and wait until it is gone."""
        if self.kind == "pg":
            self.query("select pg_terminate_backend(%s)", (ident,))
        else:
            self.query(f"kill {int(ident)}")
        wait_until(lambda: not self.alive(ident), what=f"server connection {ident} to go")

    def app_connections(self, app: str) -> int:
        return int(self.query("select count(*) from pg_stat_activity where application_name = %s", (app,))[0][0])

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class Backend:
    """One database flavour: how to make pooled databases and observe the server."""

    name: str
    kind: str  # "pg", "mysql" or "sqlite"
    cls: type
    plain: type
    database: str
    params: dict[str, Any]
    server: Server
    app: str = ""
    dbs: list[Any] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def make(self, cls: type | None = None, **kwargs: Any) -> Any:
        """A pooled database of `cls` (default: greenpool's), closed at teardown."""
        params = dict(self.params)
        if self.kind == "pg":
            params["application_name"] = self.app
        params.update(kwargs)
        db = (cls or self.cls)(self.database, **params)
        self.dbs.append(db)
        return db

    def proxy(self) -> Proxy:
        """A started fault-injection proxy in front of the server (not SQLite)."""
        if self.kind == "pg":
            host, port = parse_dsn_host_port(make_conninfo(**self.params))
        else:
            host, port = self.params["host"], self.params["port"]
        return Proxy(host, port).start()

    @property
    def ident_sql(self) -> str:
        return "select pg_backend_pid()" if self.kind == "pg" else "select connection_id()"

    def ident(self, db: Any) -> int:
        """Server id of the calling greenlet's connection (id() of it for SQLite)."""
        if self.kind == "sqlite":
            return id(db.connection())
        return int(db.execute_sql(self.ident_sql).fetchone()[0])

    def sleep_sql(self, seconds: float) -> str:
        return f"select pg_sleep({seconds})" if self.kind == "pg" else f"select sleep({seconds})"

    def table(self) -> str:
        name = unique("gp_pw")
        self.server.create_items_table(name)
        self.tables.append(name)
        return name

    def model(self, db: Any, table: str | None = None) -> type[peewee.Model]:
        """A model `(id, value)` on a fresh table (created outside the pool)."""
        table_name = table or self.table()

        class Item(peewee.Model):
            value = peewee.IntegerField()

            class Meta:
                database = db

        Item._meta.table_name = table_name
        return Item

    def cleanup(self) -> None:
        helpers.close_dbs(self.dbs)
        helpers.drop_tables(self.server.query, self.tables)
        self.server.close()


GREEN_CLASSES = {
    "pg": (gpw.PooledPostgresqlDatabase, peewee.PostgresqlDatabase, "pg"),
    "psycopg3": (gpw.PooledPsycopg3Database, Psycopg3Database, "pg"),
    "pgext": (gpw.PooledPostgresqlExtDatabase, PostgresqlExtDatabase, "pg"),
    "mysql": (gpw.PooledMySQLDatabase, peewee.MySQLDatabase, "mysql"),
    "sqlite": (gpw.PooledSqliteDatabase, peewee.SqliteDatabase, "sqlite"),
}


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path, _bounded: None) -> Iterator[Backend]:
    """Parametrized indirectly with a key of GREEN_CLASSES."""
    name = request.param
    cls, plain, kind = GREEN_CLASSES[name]
    if kind == "pg":
        params = pg_params(request.getfixturevalue("pg_dsn"))
        database = params.pop("dbname")
        server = Server("pg", {"dbname": database, **params})
    elif kind == "mysql":
        params = dict(request.getfixturevalue("mysql_params"))
        database = params.pop("database", "test")
        server = Server("mysql", {"database": database, **params})
    else:
        params = {}
        database = str(tmp_path / "greenpool.db")
        server = Server("sqlite", {}, Path(database))
    be = Backend(name, kind, cls, plain, database, params, server, app=unique("gp_pw"))
    yield be
    be.cleanup()


def backends(*names: str) -> Any:
    return pytest.mark.parametrize("backend", names, indirect=True)


ALL = ("pg", "psycopg3", "pgext", "mysql", "sqlite")
SERVERS = ("pg", "mysql")


# --------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------

#: Common start of a child script: no gevent, no driver imported yet, so the
#: script decides when `patch_all()` happens relative to the imports.
CHILD_PRELUDE = """
import faulthandler, json, os, sys, time
faulthandler.dump_traceback_later({watchdog}, exit=True)
PG = json.loads(os.environ["GP_TEST_PG"])
MY = json.loads(os.environ["GP_TEST_MY"])

def result(**values):
    print("RESULT:" + json.dumps(values), flush=True)

def make_db(module, kind, **kwargs):
    if kind == "pg":
        params = dict(PG)
        name = params.pop("dbname")
        return module.PooledPostgresqlDatabase(name, **params, **kwargs)
    params = dict(MY)
    name = params.pop("database", "test")
    return module.PooledMySQLDatabase(name, **params, **kwargs)

IDENT = {{"pg": "select pg_backend_pid()", "mysql": "select connection_id()"}}
def sleep_sql(kind, seconds):
    return f"select pg_sleep({{seconds}})" if kind == "pg" else f"select sleep({{seconds}})"
"""

#: A cooperative `wait_until(pred, timeout) -> bool` for children that import gevent.
CHILD_GREEN_WAIT_UNTIL = """
def wait_until(pred, timeout):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.02)
    return True
"""

#: Child code (patched, gpw and pymysql imported): a pooled MariaDB database
#: `db`, a monitor query `q(sql, *args)`, a fresh `table` and the `out` dict.
CHILD_MYSQL_SCRATCH = """
db = make_db(gpw, "mysql", max_connections=2)
mon = pymysql.connect(autocommit=True, **MY)
def q(sql, *args):
    cur = mon.cursor(); cur.execute(sql, args); return cur.fetchall()
table = "gp_pw_scratch_%d" % os.getpid()
q(f"create table {table} (id integer auto_increment primary key, value integer) engine=innodb")
out = {}
"""

#: Greenlet checks run in a child once gevent is imported (patched or not).
CHILD_GREENLET_CHECKS = """
import gevent, gevent.event

def distinct_check(db, kind, out, n=10):
    ids = []
    everyone_in = gevent.event.Event()

    def hold(i):
        try:
            with db.connection_context():
                ids.append(db.execute_sql(IDENT[kind]).fetchone()[0])
                if len(ids) == n:
                    everyone_in.set()
                everyone_in.wait(3)
        except Exception as ex:
            out["errors"].append(repr(ex))

    gevent.joinall([gevent.spawn(hold, i) for i in range(n)], timeout=15)
    out["held"] = len(ids)
    out["distinct"] = len(set(ids))

def sleep_check(db, kind, out, n=10):
    def sleeper(i):
        try:
            with db.connection_context():
                db.execute_sql(sleep_sql(kind, 0.2)).fetchall()
        except Exception as ex:
            out["errors"].append(repr(ex))

    t0 = time.monotonic()
    gevent.joinall([gevent.spawn(sleeper, i) for i in range(n)], timeout=15)
    out["elapsed"] = time.monotonic() - t0

def greenlet_checks(db, kind, sleep_first=False):
    out = {"errors": []}
    checks = [distinct_check, sleep_check]
    for check in reversed(checks) if sleep_first else checks:
        check(db, kind, out)
    out["errors"] = out["errors"][:3]
    return out
"""


@pytest.fixture
def child(run_python: Callable[..., Any], pg_dsn: str, mysql_params: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """`child(*parts, timeout=60, watchdog=45)`: run a child Python with
    CHILD_PRELUDE then the `parts` (each dedented); return its `result(...)`
    dict. The child's faulthandler watchdog exits it after `watchdog` s."""
    env = {
        "GP_TEST_PG": json.dumps(pg_params(pg_dsn)),
        "GP_TEST_MY": json.dumps(mysql_params),
    }

    def run(*parts: str, timeout: float = 60, watchdog: float = 45) -> dict[str, Any]:
        code = CHILD_PRELUDE.format(watchdog=watchdog) + "".join(textwrap.dedent(part) for part in parts)
        proc = run_python(code, env=env, timeout=timeout)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT:"):
                values: dict[str, Any] = json.loads(line[len("RESULT:") :])
                values["_returncode"] = proc.returncode
                values["_stderr"] = proc.stderr[-3000:]
                return values
        pytest.fail(f"child gave no result (exit {proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")

    return run


# --------------------------------------------------------------------------
# Models through the pool (plain thread)
# --------------------------------------------------------------------------


@backends(*ALL)
def test_models_create_insert_select_atomic(backend: Backend) -> None:
    db = backend.make(max_connections=3)

    class Note(peewee.Model):
        text = peewee.CharField()
        n = peewee.IntegerField(default=0)

        class Meta:
            database = db
            table_name = unique("gp_pw_note")

    backend.tables.append(Note._meta.table_name)
    db.create_tables([Note])
    assert Note.table_exists()
    Note.create(text="a", n=1)
    Note.insert_many([{"text": "b", "n": 2}, {"text": "c", "n": 3}]).execute()
    assert [n.text for n in Note.select().order_by(Note.n)] == ["a", "b", "c"]

    with db.atomic():
        Note.create(text="committed")
    with pytest.raises(RuntimeError):
        with db.atomic():
            Note.create(text="rolled back")
            raise RuntimeError("boom")
    with db.atomic() as outer:
        Note.create(text="outer")
        with db.atomic() as inner:  # a savepoint
            Note.create(text="inner")
            inner.rollback()
        assert outer is not None
    texts = {n.text for n in Note.select()}
    assert texts == {"a", "b", "c", "committed", "outer"}
    assert backend.server.count(Note._meta.table_name) == 5  # committed for everyone
    db.close()
    assert db.pool_stats()["pool_available"] >= 1


@backends(*ALL)
def test_nested_connection_context_shares_one_connection(backend: Backend) -> None:
    db = backend.make(max_connections=3)
    Item = backend.model(db)
    assert db.is_closed()
    with db.connection_context():
        assert not db.is_closed()
        outer = db.connection()
        Item.create(value=1)
        with db.connection_context():
            assert db.connection() is outer
            Item.create(value=2)
        assert not db.is_closed(), "the inner context must not close the outer's connection"
        assert db.connection() is outer
    assert db.is_closed()
    assert db.pool_stats()["pool_available"] == 1
    with db.connection_context():
        assert db.connection() is outer, "the connection went back to the pool and is reused"
        assert Item.select().count() == 2


@backends(*ALL)
def test_with_db_is_a_transaction_and_gives_the_connection_back(backend: Backend) -> None:
    db = backend.make(max_connections=3)
    Item = backend.model(db)
    with db:
        assert db.in_transaction()
        Item.create(value=1)
    assert db.is_closed()
    with pytest.raises(ValueError):
        with db:
            Item.create(value=2)
            raise ValueError("roll back")
    assert db.is_closed()
    assert backend.server.count(Item._meta.table_name) == 1
    assert db.pool_stats()["pool_available"] == 1


@backends(*ALL)
def test_autoconnect(backend: Backend) -> None:
    db = backend.make(max_connections=3)
    Item = backend.model(db)
    assert db.is_closed()
    Item.create(value=1)  # connects on its own
    assert not db.is_closed()
    assert db.close() is True
    assert db.is_closed()
    assert db.close() is False  # nothing to close

    manual = backend.make(max_connections=3, autoconnect=False)
    ManualItem = backend.model(manual, Item._meta.table_name)
    with pytest.raises(peewee.InterfaceError):
        ManualItem.select().count()
    manual.connect()
    assert ManualItem.select().count() == 1
    manual.close()


@backends(*ALL)
def test_connect_reuse_if_open(backend: Backend) -> None:
    db = backend.make(max_connections=3)
    assert db.connect() is True
    conn = db.connection()
    with pytest.raises(peewee.OperationalError, match="already opened"):
        db.connect()
    assert db.connect(reuse_if_open=True) is False
    assert db.connection() is conn
    assert db.pool_stats()["requests_num"] == 1  # no second checkout
    db.close()


@backends(*ALL)
def test_close_returns_connection_to_pool(backend: Backend) -> None:
    db = backend.make(max_connections=3)
    db.connect()
    first = backend.ident(db)
    assert db.pool_stats()["pool_available"] == 0
    db.close()
    assert db.is_closed()
    assert db.pool_stats()["pool_available"] == 1
    db.connect()
    assert backend.ident(db) == first
    assert db.pool_stats()["connections_num"] == 1
    db.close()


@backends(*ALL)
@pytest.mark.parametrize("method", ["close", "manual_close"])
def test_closing_with_open_transaction_raises_and_loses_nothing(backend: Backend, method: str) -> None:
    db = backend.make(max_connections=1)
    Item = backend.model(db)
    with db.atomic():
        Item.create(value=1)
        first = backend.ident(db)
        with pytest.raises(peewee.OperationalError, match="transaction is open"):
            getattr(db, method)()
        assert not db.is_closed()
        Item.create(value=2)  # still this greenlet's, still usable
    assert backend.server.count(Item._meta.table_name) == 2
    assert db.close() is True
    # Back in the pool (its only slot), not lost: the next checkout gets it.
    with db.connection_context():
        assert backend.ident(db) == first
    stats = db.pool_stats()
    assert (stats["pool_size"], stats["pool_available"]) == (1, 1)


@backends(*ALL)
def test_manual_transaction_left_open_is_rolled_back_at_close(backend: Backend) -> None:
    """`db.begin()` isn't tracked by peewee: close() accepts it, the pool rolls back."""
    db = backend.make(max_connections=3)
    Item = backend.model(db)
    db.begin()
    Item.create(value=1)
    db.close()
    wait_until(lambda: db.pool_stats()["pool_available"] == 1, what="the connection to come back")
    assert backend.server.count(Item._meta.table_name) == 0
    with db.connection_context():
        Item.create(value=2)  # autocommit again: visible to others at once
    assert backend.server.count(Item._meta.table_name) == 1


# --------------------------------------------------------------------------
# The mixin with plain peewee classes
# --------------------------------------------------------------------------


@backends("pg", "mysql", "sqlite")
def test_mixin_with_plain_peewee_class(backend: Backend) -> None:
    class MyDB(gpw.PooledDatabase, backend.plain):  # type: ignore[misc, name-defined]
        pass

    db = backend.make(MyDB, max_connections=3)
    assert isinstance(db, peewee.Database)
    Item = backend.model(db)
    with db.atomic():
        Item.create(value=1)
    db.close()
    # Another thread gets a connection from the same pool and can use it.
    assert run_threads(lambda i: Item.select().count(), 1)[0] == 1
    assert Item.select().count() == 1
    db.close()
    assert db.pool_stats()["pool_available"] >= 1


@backends("sqlite")
def test_mixin_hooks_between_pooled_database_and_peewee_are_called(backend: Backend) -> None:
    """A class between the mixin and peewee's overriding connect/close/
    is_closed/in_transaction is called as with peewee's own methods (the
    mixin's short paths bypass them otherwise)."""
    calls: list[str] = []

    class Hooks:
        def connect(self, reuse_if_open: bool = False) -> bool:
            calls.append("connect")
            return super().connect(reuse_if_open)  # type: ignore[misc, no-any-return]

        def close(self) -> bool:
            calls.append("close")
            return super().close()  # type: ignore[misc, no-any-return]

        def is_closed(self) -> bool:
            calls.append("is_closed")
            return super().is_closed()  # type: ignore[misc, no-any-return]

    class MyDB(gpw.PooledDatabase, Hooks, peewee.SqliteDatabase):  # type: ignore[misc]
        pass

    db = backend.make(MyDB, max_connections=3)
    calls.clear()
    with db.connection_context():
        db.execute_sql("select 1")
    assert calls == ["is_closed", "connect", "is_closed", "close"]
    assert db.pool_stats()["pool_available"] == 1


@backends("mysql")
def test_mysql_class_connecting_its_own_way_is_used(backend: Backend) -> None:
    """A class between the mixin and `MySQLDatabase` with its own `_connect()`
    makes the pool's connections (greenpool's shared-TLS-context shortcut is
    only for `MySQLDatabase._connect()` itself)."""

    class Tagged(peewee.MySQLDatabase):
        def _connect(self) -> Any:
            conn = super()._connect()
            conn.cursor().execute("set @app = 'tagged'")
            return conn

    class MyDB(gpw.PooledDatabase, Tagged):  # type: ignore[misc]
        pass

    db = backend.make(MyDB, max_connections=2)
    with db.connection_context():
        assert db.execute_sql("select @app").fetchone() == ("tagged",)


@backends("pg")
def test_init_stale_timeout_applies_to_live_connections(backend: Backend) -> None:
    db = backend.make(max_connections=2, timeout=5)
    with db.connection_context():
        first = backend.ident(db)
    db.init(backend.database, stale_timeout=0.3)
    time.sleep(0.6)
    with db.connection_context():
        assert backend.ident(db) != first  # playhouse too: the old one is stale now


@backends("pg")
def test_manual_close_closes_at_once(backend: Backend) -> None:
    db = backend.make(max_connections=2)
    db.connect()
    conn = db.connection()
    assert db.manual_close() is None
    assert conn.closed  # not later, in the background: as playhouse's


@backends("pg")
def test_instance_hooks_are_asked_at_use(backend: Backend) -> None:
    """playhouse's backend hooks (`_can_reuse`, `_is_closed`) are looked up
    on the database at each use, as methods: patching one on an instance
    takes effect."""
    db = backend.make(max_connections=3)
    db.connect()
    db.connection().execute("begin")  # a transaction left open: the return needs cleaning
    with mock.patch.object(db, "_can_reuse", lambda conn: False):
        db.close()
        wait_until(lambda: db.pool_stats()["returns_bad"] == 1, what="the connection to be refused reuse")
    assert db.pool_stats()["pool_size"] == 0


@backends("pg", "sqlite")
def test_class_connect_is_looked_up_at_each_connect(backend: Backend) -> None:
    """The database class's own `_connect()` (past the mixin) is looked up when
    a connection is made, as peewee's `connect()` and playhouse's mixin do:
    patched on the class after the database was made, the patch makes it."""
    db = backend.make(max_connections=2)
    made: list[Any] = []
    real_connect = backend.plain._connect

    def spy(self: Any) -> Any:
        conn = real_connect(self)
        made.append(conn)
        return conn

    with mock.patch.object(backend.plain, "_connect", spy):
        with db.connection_context():
            assert made == [db.connection()]


@backends("pg", "mysql", "sqlite")
def test_class_close_is_looked_up_at_each_close(backend: Backend) -> None:
    """Likewise the class's own `_close(conn)`, when the pool closes a connection."""
    db = backend.make(max_connections=2)
    closed: list[Any] = []
    real_close = peewee.Database._close

    def spy(self: Any, conn: Any) -> None:
        closed.append(conn)
        real_close(self, conn)

    db.connect()
    conn = db.connection()
    with mock.patch.object(peewee.Database, "_close", spy):
        db.manual_close()  # closes it at once
    assert closed == [conn]


@backends("pg")
def test_shared_state_connection_outlives_the_greenlet_that_opened_it(backend: Backend) -> None:
    """`thread_safe=False`: one state, so one connection, for every greenlet.
    The greenlet that opened it ending must not give it back while the
    shared state still uses it (a greenlet-local state's connection is)."""
    db = backend.make(max_connections=3, thread_safe=False)
    gevent.spawn(db.connect).join()
    assert not db.is_closed()
    gevent.sleep(0.05)
    stats = db.pool_stats()
    assert (stats["pool_size"], stats["pool_available"]) == (1, 0)
    db.execute_sql("select 1")
    db.close()
    assert db.pool_stats()["pool_available"] == 1


@backends("pgext", "psycopg3")
def test_ext_database_named_cursor_is_peewee_s(backend: Backend) -> None:
    """PostgresqlExtDatabase's own cursor() (server-side, named) is not bypassed;
    connecting still takes the mixin's short path, not peewee's `connect()`."""
    db = backend.make(max_connections=2)
    with (
        counting_calls(PostgresqlExtDatabase, "cursor") as cursors,
        counting_calls(peewee.Database, "connect") as connects,
    ):
        with db.connection_context():
            cursor = db.cursor(named_cursor=True)
            assert cursor.name  # a server-side cursor
            cursor.execute("select generate_series(1, 3)")
            assert [row[0] for row in cursor.fetchall()] == [1, 2, 3]
            cursor.close()
            assert db.execute_sql("select 1").fetchone() == (1,)
    assert (len(cursors), len(connects)) == (2, 0)


@backends("pg", "mysql", "sqlite")
def test_cursor_autoconnects_or_refuses_like_peewee(backend: Backend) -> None:
    """...through the mixin's short path: peewee's `cursor()` is never called."""
    db = backend.make(max_connections=2)
    strict = backend.make(max_connections=2, autoconnect=False)
    with counting_calls(peewee.Database, "cursor") as peewee_cursors:
        assert db.execute_sql("select 1").fetchone() == (1,)  # autoconnect
        assert not db.is_closed()
        db.close()
        with pytest.raises(peewee.InterfaceError, match="not opened"):
            strict.cursor()
        with strict.connection_context():
            assert strict.execute_sql("select 1").fetchone() == (1,)
    assert peewee_cursors == []


@backends("pg")
def test_mixin_with_plain_postgresql_uses_gevent_connection(backend: Backend) -> None:
    class MyDB(gpw.PooledDatabase, peewee.PostgresqlDatabase):
        pass

    db = backend.make(MyDB, max_connections=3)
    assert isinstance(db.connection(), GeventConnection)
    db.close()


@backends("pg")
def test_mixin_with_plain_postgresql_greenlets_run_concurrently(backend: Backend) -> None:
    """The user-visible consequence: unpatched greenlets on a mixin database."""

    class MyDB(gpw.PooledDatabase, peewee.PostgresqlDatabase):
        pass

    db = backend.make(MyDB, max_connections=10, timeout=10)

    elapsed, _ = timed_sleepers(db, run_greenlets)
    assert elapsed < 1.0, f"10 x 0.2 s took {elapsed:.2f} s: greenlets serialized"


# --------------------------------------------------------------------------
# db_url
# --------------------------------------------------------------------------


def check_url_db(db: Any, cls: type, pool_settings: tuple[float, float], what: str = "") -> None:
    """`db` (from a URL) is a `cls` whose pool has (max_size, max_lifetime)
    `pool_settings` and which runs a query; its pool is closed afterwards."""
    try:
        assert type(db) is cls, what
        assert (db.pool.max_size, db.pool.max_lifetime) == pool_settings
        assert db.execute_sql("select 1").fetchone() == (1,)
        db.close()
    finally:
        db.close_all()
        db.pool.close()


class _NamingAdapter(peewee.Psycopg3Adapter):  # type: ignore[misc]
    """An adapter setting each new connection up, as peewee 4 lets one."""

    def connect(self, db: Any, **params: Any) -> Any:
        conn = super().connect(db, **params)
        conn.execute("set application_name = 'gp_own_adapter'")
        conn.commit()
        return conn


class _NamingPostgresql(peewee.PostgresqlDatabase):
    psycopg3_adapter = _NamingAdapter


class _PooledNamingPostgresql(gpw.PooledDatabase, _NamingPostgresql):
    pass


def test_an_adapter_s_own_connect_is_kept(pg_dsn: str) -> None:
    """A psycopg 3 adapter with a connect() of its own still runs it, on a
    connection made by GeventConnection (peewee's connect, beneath it)."""
    params = pg_params(pg_dsn)
    db = _PooledNamingPostgresql(params.pop("dbname"), max_connections=2, **params)
    try:
        with db.connection_context():
            assert db.execute_sql("show application_name").fetchone() == ("gp_own_adapter",)
            assert isinstance(db.connection(), GeventConnection)
    finally:
        db.close_all()
        db.pool.close()


def test_db_url_postgres(pg_dsn: str) -> None:
    params = pg_params(pg_dsn)
    host, port, user = params.get("host", "127.0.0.1"), params.get("port", "5432"), params.get("user", "postgres")
    db = url_connect(
        f"greenpool+postgres://{user}@{host}:{port}/{params['dbname']}?max_connections=5&stale_timeout=300"
    )
    try:
        assert type(db) is gpw.PooledPostgresqlDatabase
        assert db.pool.max_size == 5
        assert db.pool.max_lifetime == 300
        assert db.execute_sql("select 1").fetchone() == (1,)
        assert isinstance(db.connection(), GeventConnection)
        db.close()
    finally:
        db.close_all()
        db.pool.close()

    for scheme, cls in (
        ("greenpool+postgresql", gpw.PooledPostgresqlDatabase),
        ("greenpool+postgresext", gpw.PooledPostgresqlExtDatabase),
        ("greenpool+postgresqlext", gpw.PooledPostgresqlExtDatabase),
        ("greenpool+psycopg3", gpw.PooledPsycopg3Database),
    ):
        db = url_connect(f"{scheme}://{user}@{host}:{port}/{params['dbname']}?max_connections=2&stale_timeout=2.5")
        check_url_db(db, cls, (2, 2.5), scheme)


def test_db_url_mysql(mysql_params: dict[str, Any]) -> None:
    p = mysql_params
    auth = p["user"] + (f":{p['password']}" if p.get("password") else "")
    url = f"greenpool+mysql://{auth}@{p['host']}:{p['port']}/{p.get('database', 'test')}"
    db = url_connect(url + "?max_connections=5&stale_timeout=300&timeout=2")
    check_url_db(db, gpw.PooledMySQLDatabase, (5, 300))


class _NoArgPing(pymysql.connections.Connection):  # type: ignore[misc]
    """As MariaDB's own connector: `ping()` takes no argument."""

    def ping(self) -> None:  # type: ignore[override]
        super().ping(False)


class _NoArgPingMySQL(peewee.MySQLDatabase):
    def _connect(self) -> Any:
        return _NoArgPing(database=self.database, autocommit=True, **self.connect_params)


class _PooledNoArgPingMySQL(gpw.PooledDatabase, _NoArgPingMySQL):
    pass


def test_checkout_probe_of_a_driver_whose_ping_takes_no_argument(mysql_params: dict[str, Any]) -> None:
    """The probe tries `ping()` when `ping(False)` is refused (as playhouse
    does): a working connection must not be taken for a dead one."""
    params = dict(mysql_params)
    db = _PooledNoArgPingMySQL(params.pop("database", "test"), max_connections=2, check_idle=0, **params)
    try:
        for _ in range(3):
            with db.connection_context():
                assert db.execute_sql("select 1").fetchone() == (1,)
        stats = db.pool_stats()
        assert (stats["connections_num"], stats["connections_lost"]) == (1, 0)
    finally:
        db.close_all()
        db.pool.close()


def test_db_url_sqlite(tmp_path: Path) -> None:
    db = url_connect(f"greenpool+sqlite:///{tmp_path}/url.db?max_connections=5&stale_timeout=300")
    assert db.database == f"{tmp_path}/url.db"
    check_url_db(db, gpw.PooledSqliteDatabase, (5, 300))


# --------------------------------------------------------------------------
# Constructor and init() semantics (no connection needed)
# --------------------------------------------------------------------------

UNLIMITED = 2**31 - 1


@pytest.mark.parametrize("cls", [gpw.PooledSqliteDatabase, gpw.PooledPostgresqlDatabase, gpw.PooledMySQLDatabase])
@pytest.mark.parametrize("value", [0, None, "0"])
def test_max_connections_zero_or_none_is_unlimited(cls: type, value: Any) -> None:
    db = cls("unused", max_connections=value)
    assert db.pool.max_size >= UNLIMITED


@pytest.mark.parametrize("value", [0, None, "0"])
def test_stale_timeout_zero_or_none_is_no_limit(value: Any) -> None:
    """As in playhouse, where a falsy `stale_timeout` skips the stale check."""
    db = gpw.PooledSqliteDatabase("unused", stale_timeout=value)
    assert db.pool.max_lifetime == math.inf


def test_unlimited_max_connections_lends_many(tmp_path: Path) -> None:
    db = gpw.PooledSqliteDatabase(str(tmp_path / "many.db"), max_connections=0)
    try:
        barrier = threading.Barrier(25)

        def hold(i: int) -> int:
            db.connect()
            try:
                barrier.wait(10)
                return id(db.connection())
            finally:
                db.close()

        assert len(set(run_threads(hold, 25))) == 25  # more than the default 20
    finally:
        db.close_all()
        db.pool.close()


def test_string_values_accepted() -> None:
    db = gpw.PooledSqliteDatabase("unused", max_connections="7", stale_timeout="2.5", timeout="3")
    assert db.pool.max_size == 7
    assert db.pool.max_lifetime == 2.5
    db = gpw.PooledSqliteDatabase("unused", max_connections="7.0", stale_timeout="300")
    assert (db.pool.max_size, db.pool.max_lifetime) == (7, 300)


def test_string_timeout_is_honoured(tmp_path: Path) -> None:
    db = gpw.PooledSqliteDatabase(str(tmp_path / "t.db"), max_connections="1", timeout="0.3")
    try:
        db.connect()
        t0 = time.monotonic()
        with pytest.raises(gpw.MaxConnectionsExceeded, match="timed out"):
            run_threads(lambda i: db.connect(), 1)
        assert 0.2 <= time.monotonic() - t0 < 3
        db.close()
    finally:
        db.close_all()
        db.pool.close()


class _SlowConnectSqlite(peewee.SqliteDatabase):
    def _connect(self) -> Any:
        time.sleep(0.3)  # a remote database's connect, or TLS
        return super()._connect()


class _PooledSlowConnectSqlite(gpw.PooledDatabase, _SlowConnectSqlite):
    pass


def test_timeout_bounds_the_wait_for_a_connection_in_use_not_for_a_connect(tmp_path: Path) -> None:
    """As in playhouse, `timeout` is how long to wait for a connection someone
    else uses: a connect slower than that, for a pool with room, is waited
    for. With the pool full, `timeout` applies."""
    db = _PooledSlowConnectSqlite(str(tmp_path / "t.db"), max_connections=4, timeout=0.1)
    try:
        run_threads(lambda i: db.connection_context().__enter__(), 3)  # three connects, none fails
        assert db.pool_stats()["pool_size"] == 3
        db.connect()
        t0 = time.monotonic()
        with pytest.raises(gpw.MaxConnectionsExceeded, match="timed out"):
            run_threads(lambda i: db.connect(), 1)  # held by the threads that ended, and by us
        assert time.monotonic() - t0 < 1
    finally:
        db.close_all()
        db.pool.close()


def test_init_reconfigures_pool(tmp_path: Path) -> None:
    path = str(tmp_path / "init.db")
    db = gpw.PooledSqliteDatabase(path, max_connections=5, stale_timeout=None, timeout=None)
    try:
        db.init(path, max_connections="2", stale_timeout="30", timeout="0.3")
        assert db.pool.max_size == 2
        assert db.pool.max_lifetime == 30
        db.init(path)  # no pool options: the previous ones stay
        assert (db.pool.max_size, db.pool.max_lifetime) == (2, 30)

        # max_connections=2, timeout=0.3: a third request waits, then fails.
        db.connect()
        held = threading.Event()
        release = threading.Event()

        def holder(i: int) -> None:
            db.connect()
            held.set()
            release.wait(10)
            db.close()

        t = threading.Thread(target=holder, args=(0,), daemon=True)
        t.start()
        assert held.wait(5)
        t0 = time.monotonic()
        with pytest.raises(gpw.MaxConnectionsExceeded, match="timed out"):
            run_threads(lambda i: db.connect(), 1)
        assert 0.2 <= time.monotonic() - t0 < 3

        # timeout=0: wait as long as it takes.
        db.init(path, timeout=0)
        assert db.is_closed()  # init() closes the caller's connection
        db.connect()
        timer = threading.Timer(0.5, release.set)
        timer.start()
        t0 = time.monotonic()
        assert run_threads(lambda i: (db.connect(), db.close())[0], 1) == [True]
        assert time.monotonic() - t0 >= 0.4
        t.join(5)
        timer.join(5)

        db.init(path, max_connections=0)
        assert db.pool.max_size >= UNLIMITED
    finally:
        try:
            db.close()
        finally:
            db.close_idle()
            db.close_stale(0)
            db.pool.close()


def test_init_with_another_database_replaces_pooled_connections(tmp_path: Path) -> None:
    first, second = str(tmp_path / "first.db"), str(tmp_path / "second.db")
    db = gpw.PooledSqliteDatabase(first, max_connections=2)
    try:
        db.connect()
        db.execute_sql("create table only_in_first (x integer)")
        old = db.connection()
        db.close()
        assert db.pool.get_stats()["pool_available"] == 1

        db.init(second)
        db.connect()
        assert db.connection() is not old
        tables = [row[0] for row in db.execute_sql("select name from sqlite_master").fetchall()]
        assert tables == []
        db.close()
        db.init(second, timeout=1)  # same database and parameters: connections kept
        db.connect()
        kept = db.connection()
        db.close()
        db.connect()
        assert db.connection() is kept
        db.close()
    finally:
        db.close_all()
        db.pool.close()


BAD_ARGUMENTS = [
    pytest.param({"max_connections": -1}, ValueError, "max_connections", id="max_connections=-1"),
    pytest.param({"max_connections": "-3"}, ValueError, "max_connections", id="max_connections='-3'"),
    pytest.param({"max_connections": "abc"}, ValueError, "max_connections", id="max_connections='abc'"),
    pytest.param({"max_connections": 2.5}, ValueError, "max_connections", id="max_connections=2.5"),
    pytest.param({"max_connections": [1]}, TypeError, "max_connections", id="max_connections=[1]"),
    pytest.param({"max_connections": True}, TypeError, "max_connections", id="max_connections=True"),
    pytest.param({"max_connections": 2, "min_connections": 3}, ValueError, "max_connections", id="max<min"),
    pytest.param({"min_connections": -1}, ValueError, "min_connections", id="min_connections=-1"),
    pytest.param({"min_connections": 2.0}, TypeError, "min_connections", id="min_connections=2.0"),
    pytest.param({"min_connections": "2"}, TypeError, "min_connections", id="min_connections='2'"),
    pytest.param({"stale_timeout": -1}, ValueError, "stale_timeout", id="stale_timeout=-1"),
    pytest.param({"stale_timeout": "soon"}, ValueError, "stale_timeout", id="stale_timeout='soon'"),
    pytest.param({"stale_timeout": "nan"}, ValueError, "stale_timeout", id="stale_timeout='nan'"),
    pytest.param({"timeout": -1}, ValueError, "timeout", id="timeout=-1"),
    pytest.param({"timeout": "x"}, ValueError, "timeout", id="timeout='x'"),
    pytest.param({"timeout": object()}, TypeError, "timeout", id="timeout=object()"),
]


@pytest.mark.parametrize("kwargs, exc, name", BAD_ARGUMENTS)
def test_bad_constructor_arguments(kwargs: dict[str, Any], exc: type, name: str) -> None:
    with pytest.raises(exc, match=name):
        gpw.PooledSqliteDatabase("unused", **kwargs)


@pytest.mark.parametrize("kwargs, exc, name", [p for p in BAD_ARGUMENTS if "min_connections" not in p.values[0]])
def test_bad_init_arguments_leave_pool_settings_alone(
    kwargs: dict[str, Any], exc: type, name: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "db.sqlite")
    db = gpw.PooledSqliteDatabase(path, max_connections=4, stale_timeout=60, timeout=1)
    with db.connection_context():
        pass  # one connection made, idle
    params = dict(db.connect_params)
    with pytest.raises(exc, match=name):
        db.init("other", pragmas={"cache_size": 100}, **kwargs)
    assert (db.pool.max_size, db.pool.max_lifetime) == (4, 60)
    assert (db.database, db.connect_params) == (path, params)  # not half reconfigured either
    assert db.pool.get_stats()["pool_size"] == 1


@pytest.mark.parametrize("value", [float("inf"), "inf"])
def test_infinite_max_connections_is_unlimited_or_a_value_error(value: Any) -> None:
    """inf is either accepted as "unlimited" or refused naming the parameter —
    never a bare OverflowError from `int(inf)`."""
    try:
        db = gpw.PooledSqliteDatabase("unused", max_connections=value)
    except (ValueError, TypeError) as ex:
        assert "max_connections" in str(ex)
    else:
        assert db.pool.max_size >= UNLIMITED


# --------------------------------------------------------------------------
# Many greenlets (in-process: PostgreSQL and SQLite; MariaDB in a child)
# --------------------------------------------------------------------------


@backends("pg", "psycopg3", "pgext", "sqlite")
def test_greenlets_each_hold_their_own_connection(backend: Backend) -> None:
    db = backend.make(max_connections=10, timeout=10)
    Item = backend.model(db)
    everyone_in = gevent.event.Event()
    held: list[int] = []
    conns: list[Any] = []  # keep the objects alive: id() stays unique

    def work(i: int) -> int:
        with db.connection_context():
            Item.create(value=i)
            conns.append(db.connection())
            held.append(backend.ident(db))
            if len(held) == 10:
                everyone_in.set()
            assert everyone_in.wait(5), "the greenlets didn't all hold a connection at once"
            assert Item.select().where(Item.value == i).count() == 1
            return held[-1]

    run_greenlets(work, 10)
    assert len(set(held)) == 10, "concurrently held connections must be distinct"
    assert backend.server.count(Item._meta.table_name) == 10
    assert db.pool_stats()["pool_available"] == 10


@backends("pg", "sqlite")
def test_greenlets_never_exceed_max_connections(backend: Backend) -> None:
    db = backend.make(max_connections=5, timeout=10)
    Item = backend.model(db)
    holding = 0
    peak = 0
    idents: set[int] = set()
    sizes: list[int] = []
    conns: list[Any] = []

    def work(i: int) -> None:
        nonlocal holding, peak
        with db.connection_context():
            holding += 1
            try:
                peak = max(peak, holding)
                conns.append(db.connection())
                idents.add(backend.ident(db))
                Item.create(value=i)
                gevent.sleep(0.01)
                assert Item.select().where(Item.value == i).count() == 1
                sizes.append(db.pool_stats()["pool_size"])
            finally:
                holding -= 1

    run_greenlets(work, 40)
    assert peak <= 5
    assert len(idents) <= 5
    assert max(sizes) <= 5
    assert backend.server.count(Item._meta.table_name) == 40
    if backend.kind == "pg":
        assert backend.server.app_connections(backend.app) <= 5


@backends("pg", "psycopg3")
def test_greenlet_queries_run_concurrently(backend: Backend) -> None:
    db = backend.make(max_connections=10, timeout=10)

    elapsed, _ = timed_sleepers(db, run_greenlets)
    assert elapsed < 1.0, f"10 x 0.2 s over 10 connections took {elapsed:.2f} s"


def test_mysql_greenlets_patched(child: Callable[..., dict[str, Any]]) -> None:
    """MariaDB under gevent (patch_all first): own connections, cap, no serialization."""
    out = child(
        """
        from gevent import monkey; monkey.patch_all()
        import greenpool.peewee as gpw
        import pymysql
        """,
        CHILD_GREENLET_CHECKS,
        """
        db = make_db(gpw, "mysql", max_connections=10, timeout=10)
        checks = greenlet_checks(db, "mysql")

        # 40 greenlets through max_connections=5.
        capped = make_db(gpw, "mysql", max_connections=5, timeout=10)
        state = {"holding": 0, "peak": 0, "ids": set(), "errors": [], "rows": 0}
        table = "gp_pw_child_%d" % os.getpid()
        mon = pymysql.connect(autocommit=True, **MY)
        mon.cursor().execute(
            f"create table {table} (id integer auto_increment primary key, value integer) engine=innodb"
        )

        def work(i):
            try:
                with capped.connection_context():
                    state["holding"] += 1
                    state["peak"] = max(state["peak"], state["holding"])
                    state["ids"].add(capped.execute_sql("select connection_id()").fetchone()[0])
                    capped.execute_sql(f"insert into {table} (value) values (%s)", (i,))
                    gevent.sleep(0.01)
                    n = capped.execute_sql(f"select count(*) from {table} where value = %s", (i,)).fetchone()[0]
                    assert n == 1
                    state["holding"] -= 1
            except Exception as ex:
                state["errors"].append(repr(ex))

        gevent.joinall([gevent.spawn(work, i) for i in range(40)], timeout=20)
        cur = mon.cursor()
        cur.execute(f"select count(*) from {table}")
        rows = cur.fetchone()[0]
        cur.execute(f"drop table {table}")
        result(checks=checks, peak=state["peak"], distinct=len(state["ids"]), errors=state["errors"][:3], rows=rows)
        """,
    )
    checks = out["checks"]
    assert checks["errors"] == []
    assert checks["held"] == 10 and checks["distinct"] == 10, checks
    assert checks["elapsed"] < 1.0, f"10 x sleep(0.2) took {checks['elapsed']:.2f} s"
    assert out["errors"] == []
    assert out["rows"] == 40
    assert out["peak"] <= 5 and out["distinct"] <= 5, out


@backends("pg")
def test_pool_opened_before_any_greenlet_serves_greenlets(backend: Backend) -> None:
    """Used from the plain main thread first (no hub yet), then by greenlets."""
    db = backend.make(max_connections=10, timeout=10)
    assert db.execute_sql("select 1").fetchone() == (1,)
    db.close()

    elapsed, idents = timed_sleepers(db, run_greenlets, then=lambda: backend.ident(db))
    assert elapsed < 1.0, f"10 x 0.2 s over 10 connections took {elapsed:.2f} s"
    assert len(set(idents)) == 10


@pytest.mark.parametrize("how", ["kill", "timeout"])
@backends("pg", "sqlite")
def test_greenlet_giving_up_while_waiting_for_a_connection(backend: Backend, how: str) -> None:
    """A greenlet killed (or timed out) while queued for a connection leaves
    no trace: the connection freed later goes to the next request."""
    db = backend.make(max_connections=1, timeout=10)
    held = gevent.event.Event()
    release = gevent.event.Event()

    def holder(i: int) -> None:
        with db.connection_context():
            held.set()
            release.wait(10)

    def waiter() -> Any:
        with db.connection_context():
            return db.execute_sql("select 7").fetchone()

    h = gevent.spawn(holder, 0)
    assert held.wait(5)
    if how == "kill":
        w = gevent.spawn(waiter)
        wait_until(lambda: db.pool_stats()["requests_waiting"] == 1, what="the waiter to queue")
        w.kill(block=True, timeout=5)
        assert w.dead
    else:

        def impatient() -> None:
            with gevent.Timeout(0.2):
                waiter()

        w = gevent.spawn(impatient)
        w.join(5)
        assert isinstance(w.exception, gevent.Timeout)
    assert db.pool_stats()["requests_waiting"] == 0
    release.set()
    h.join(5)
    wait_until(lambda: db.pool_stats()["pool_available"] == 1, what="the connection back")
    late = gevent.spawn(waiter)
    assert late.get(timeout=5) == (7,)
    assert db.pool_stats()["pool_size"] == 1


# --------------------------------------------------------------------------
# Plain OS threads
# --------------------------------------------------------------------------


@backends("pg", "mysql", "sqlite")
def test_threads_each_hold_their_own_connection(backend: Backend) -> None:
    db = backend.make(max_connections=10, timeout=10)
    Item = backend.model(db)
    barrier = threading.Barrier(10)
    conns: list[Any] = []

    def work(i: int) -> int:
        with db.connection_context():
            Item.create(value=i)
            conns.append(db.connection())
            ident = backend.ident(db)
            barrier.wait(10)
            assert Item.select().where(Item.value == i).count() == 1
            return ident

    idents = run_threads(work, 10)
    assert len(set(idents)) == 10
    assert backend.server.count(Item._meta.table_name) == 10
    assert db.pool_stats()["pool_available"] == 10
    assert db.pool_stats()["pool_size"] <= 10


@backends("pg", "mysql")
def test_thread_queries_run_concurrently(backend: Backend) -> None:
    db = backend.make(max_connections=10, timeout=10)
    elapsed, _ = timed_sleepers(db, run_threads, sql=backend.sleep_sql(0.2))
    assert elapsed < 1.0, f"10 x 0.2 s over 10 connections took {elapsed:.2f} s"


@backends("pg", "sqlite")
def test_threads_never_exceed_max_connections(backend: Backend) -> None:
    db = backend.make(max_connections=3, timeout=10)
    Item = backend.model(db)
    lock = threading.Lock()
    state = {"holding": 0, "peak": 0}

    def work(i: int) -> None:
        with db.connection_context():
            with lock:
                state["holding"] += 1
                state["peak"] = max(state["peak"], state["holding"])
            try:
                Item.create(value=i)
                time.sleep(0.01)
            finally:
                with lock:
                    state["holding"] -= 1

    run_threads(work, 12)
    assert state["peak"] <= 3
    assert db.pool_stats()["pool_size"] <= 3
    assert backend.server.count(Item._meta.table_name) == 12


# --------------------------------------------------------------------------
# Import orders (subprocesses)
# --------------------------------------------------------------------------


#: Child code: patch everything with gevent.
CHILD_PATCH_ALL = """
from gevent import monkey; monkey.patch_all()
"""

#: Child code: a greenpool Peewee database `db` (format with `kind`).
CHILD_GPW_DB = """
import peewee
import greenpool.peewee as gpw
db = make_db(gpw, {kind!r}, max_connections=10, timeout=10)
"""


def check_greenlets_in_child(
    child: Callable[..., dict[str, Any]], kind: str, *parts: str, sleep_first: bool = False
) -> None:
    """Run `parts` then CHILD_GREENLET_CHECKS in a child, and `greenlet_checks`
    on its `db`: 10 greenlets must hold 10 distinct connections at once,
    without errors, in well under a second.

    With `sleep_first`, sleepers go first: greenlets that each find a
    pre-patch connection idle would all run on it."""
    options = ", sleep_first=True" if sleep_first else ""
    out = child(*parts, CHILD_GREENLET_CHECKS, f"result(**greenlet_checks(db, {kind!r}{options}))\n")
    assert out["errors"] == []
    assert out["held"] == 10 and out["distinct"] == 10, out
    assert out["elapsed"] < 1.0, out


@pytest.mark.parametrize("kind", ["pg", "mysql"])
def test_import_order_patch_all_first(child: Callable[..., dict[str, Any]], kind: str) -> None:
    check_greenlets_in_child(child, kind, CHILD_PATCH_ALL, CHILD_GPW_DB.format(kind=kind))


@pytest.mark.parametrize("kind", ["pg", "mysql"])
def test_import_order_database_created_before_patch_all(child: Callable[..., dict[str, Any]], kind: str) -> None:
    check_greenlets_in_child(child, kind, CHILD_GPW_DB.format(kind=kind), CHILD_PATCH_ALL)


@pytest.mark.parametrize("kind", ["pg", "mysql"])
def test_import_order_pool_used_before_patch_all(child: Callable[..., dict[str, Any]], kind: str) -> None:
    """Worse than (b): the database is used (the pool opened, a connection
    made and returned) before patch_all(), e.g. create_tables() at import
    time. Connections made before patching must not stall greenlets later."""
    used = 'db.execute_sql("select 1")\ndb.close()\n'
    check_greenlets_in_child(child, kind, CHILD_GPW_DB.format(kind=kind), used, CHILD_PATCH_ALL, sleep_first=True)


@pytest.mark.parametrize("kind", ["pg", "mysql"])
def test_import_order_pool_used_before_patch_all_replaces_stale_connections(
    child: Callable[..., dict[str, Any]], kind: str
) -> None:
    """The housekeeper of a pool opened before patch_all() is an OS thread:
    the successors of stale connections it starts after the patch must be
    usable by the greenlets (made in the main hub: a patched pymysql socket
    belongs to the hub that made it), and made at all (as greenlets of that
    thread's hub they never ran: the pool wedged)."""
    out = child(
        f"""
        import peewee
        import greenpool.peewee as gpw
        db = make_db(gpw, {kind!r}, max_connections=10, timeout=10, stale_timeout=0.5)
        db.execute_sql("select 1")
        db.close()
        """,
        CHILD_PATCH_ALL,
        f"""
        import gevent

        def query():
            try:
                with db.connection_context():
                    db.execute_sql(sleep_sql({kind!r}, 0.2))
                return "ok"
            except Exception as ex:
                return repr(ex)

        outcomes = set()
        for _ in range(3):
            greenlets = [gevent.spawn(query) for _ in range(10)]
            gevent.joinall(greenlets, timeout=15)
            outcomes.update(str(g.value) for g in greenlets)
            gevent.sleep(0.8)  # every connection goes stale and is replaced
        result(outcomes=sorted(outcomes), connections=db.pool_stats()["connections_num"])
        """,
    )
    assert out["outcomes"] == ["ok"], out
    assert out["connections"] > 10, out  # replaced


def test_mysql_replacement_made_by_a_pre_patch_housekeeper_is_not_lent_to_greenlets(
    child: Callable[..., dict[str, Any]],
) -> None:
    """A pool used before patch_all() keeps an OS-thread housekeeper; a stale
    connection it replaces before any greenlet used the pool is made in a
    throwaway thread's hub, whose patched socket greenlets can't use ("cannot
    switch to a different thread"). Such a connection is seen at checkout
    and replaced in the greenlets' hub."""
    out = child(
        """
        import peewee
        import greenpool.peewee as gpw
        db = make_db(gpw, "mysql", max_connections=10, timeout=10, stale_timeout=0.5)
        db.execute_sql("select 1")
        db.close()
        """,
        CHILD_PATCH_ALL,
        """
        import gevent
        gevent.sleep(1.2)  # only the housekeeper acts: the stale connection is replaced

        def query():
            try:
                with db.connection_context():
                    db.execute_sql("select sleep(0.05)")
                return "ok"
            except Exception as ex:
                return repr(ex)

        greenlets = [gevent.spawn(query) for _ in range(3)]
        gevent.joinall(greenlets, timeout=15)
        result(outcomes=sorted({str(g.value) for g in greenlets}))
        """,
    )
    assert out["outcomes"] == ["ok"], out


def test_contrast_playhouse_pool_created_before_patch_all_postgres(child: Callable[..., dict[str, Any]]) -> None:
    """The bug greenpool fixes: playhouse.pool's database made before
    patch_all() keeps a real `threading.local` (every greenlet shares one
    connection state) and psycopg blocks the hub: greenlets share one
    connection and run one after the other."""
    out = child(
        """
        import peewee
        import playhouse.pool
        db = make_db(playhouse.pool, "pg", max_connections=10, timeout=10)
        from gevent import monkey; monkey.patch_all()
        """,
        CHILD_GREENLET_CHECKS,
        """
        result(**greenlet_checks(db, "pg"))
        """,
    )
    assert out["distinct"] == 1 or out["elapsed"] >= 1.8, out


def test_contrast_playhouse_pool_created_before_patch_all_mysql(child: Callable[..., dict[str, Any]]) -> None:
    """With pymysql the same mistake deadlocks: the first greenlet holds
    peewee's real `threading.Lock` across a (now cooperative) socket wait and
    the second blocks the whole thread on it. The child's watchdog ends it."""
    body = (
        """
        import peewee
        import playhouse.pool
        db = make_db(playhouse.pool, "mysql", max_connections=10, timeout=10)
        from gevent import monkey; monkey.patch_all()
        """,
        CHILD_GREENLET_CHECKS,
        """
        result(**greenlet_checks(db, "mysql"))
        """,
    )
    try:
        out = child(*body, timeout=30, watchdog=5)
    except pytest.fail.Exception as ex:
        # No result: the faulthandler watchdog killed a deadlocked child.
        assert "Timeout" in str(ex) and "exit 1" in str(ex), str(ex)
    else:
        assert out["distinct"] == 1 or out["elapsed"] >= 1.8 or out["errors"], out


# --------------------------------------------------------------------------
# A greenlet that ends holding a connection gives it back
# --------------------------------------------------------------------------


@backends("pg", "sqlite")
def test_greenlet_ending_without_close_returns_connection(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    db = backend.make(max_connections=2)
    Item = backend.model(db)

    def forgetful(i: int) -> int:
        Item.create(value=i)  # autoconnect, never closed
        return backend.ident(db)

    with caplog.at_level(logging.WARNING, logger="greenpool"):
        ident = run_greenlets(forgetful, 1)[0]
        wait_until(lambda: db.pool_stats()["pool_available"] == 1, timeout=3, what="the connection back in the pool")
    assert any("ended holding a connection" in r.getMessage() for r in caplog.records)
    assert db.is_closed()  # the main greenlet's state is its own
    with db.connection_context():
        assert backend.ident(db) == ident
    assert backend.server.count(Item._meta.table_name) == 1


@backends("pg", "sqlite")
def test_greenlet_ending_in_transaction_is_rolled_back(backend: Backend) -> None:
    db = backend.make(max_connections=2)
    Item = backend.model(db)

    def abandons_transaction(i: int) -> None:
        db.begin()
        Item.create(value=1)

    run_greenlets(abandons_transaction, 1)
    wait_until(lambda: db.pool_stats()["pool_available"] == 1, timeout=3, what="the connection back in the pool")
    assert backend.server.count(Item._meta.table_name) == 0
    if backend.kind == "sqlite":
        # Rolled back: another connection may write at once.
        backend.server.query(f"insert into {Item._meta.table_name} (value) values (2)")
    with db.connection_context():
        assert not db.in_transaction()
        Item.create(value=3)
    assert backend.server.count(Item._meta.table_name) == (2 if backend.kind == "sqlite" else 1)


def _returned_or_replaced(db: Any, max_connections: int) -> Callable[[], Any]:
    def check() -> Any:
        stats = db.pool_stats()
        return stats["pool_available"] + (max_connections - stats["pool_size"]) >= 1 and stats

    return check


@pytest.mark.parametrize("how", ["autoconnect", "connection_context", "atomic"])
@backends("pg")
def test_killed_greenlet_mid_query_leaves_no_orphan(backend: Backend, how: str) -> None:
    db = backend.make(max_connections=2)
    Item = backend.model(db)
    idents: list[int] = []

    def long_query(i: int) -> None:
        if how == "autoconnect":
            idents.append(backend.ident(db))
            db.execute_sql("select pg_sleep(10)")
            return
        with db.connection_context():
            if how == "atomic":
                with db.atomic():
                    Item.create(value=1)
                    idents.append(backend.ident(db))
                    db.execute_sql("select pg_sleep(10)")
            else:
                idents.append(backend.ident(db))
                db.execute_sql("select pg_sleep(10)")

    g = gevent.spawn(long_query, 0)
    wait_until(lambda: idents and backend.server.running_query(idents[0]), what="the query to run")
    g.kill(block=True, timeout=5)
    assert g.dead and g.exception is None  # GreenletExit, also inside atomic() (see the next test)
    t0 = time.monotonic()
    wait_until(lambda: not backend.server.running_query(idents[0]), timeout=3, what="the orphaned query to stop")
    assert time.monotonic() - t0 < 3
    stats = wait_until(_returned_or_replaced(db, 2), timeout=3, what="the connection returned or replaced")
    assert stats["pool_size"] <= 2
    assert backend.server.count(Item._meta.table_name) == 0
    with db.connection_context():
        assert db.execute_sql("select 42").fetchone() == (42,)


@pytest.mark.parametrize("query_again", [False, True], ids=["exit", "query-again-then-exit"])
@backends("pg")
def test_timeout_mid_query_leaves_no_orphan(backend: Backend, query_again: bool) -> None:
    """A `gevent.Timeout` interrupts a query; the greenlet lives on (maybe
    trying another query on the now unusable connection) and leaves the
    context: the server query is stopped and the pool stays healthy."""
    db = backend.make(max_connections=2)
    seen: dict[str, Any] = {}

    def request(i: int) -> None:
        with db.connection_context():
            seen["ident"] = backend.ident(db)
            with pytest.raises(gevent.Timeout):
                with gevent.Timeout(0.5):
                    db.execute_sql("select pg_sleep(10)")
            if query_again:
                try:
                    db.execute_sql("select 1")
                except peewee.DatabaseError as ex:  # the connection is mid-query
                    seen["second"] = ex

    run_greenlets(request, 1)
    t0 = time.monotonic()
    wait_until(lambda: not backend.server.running_query(seen["ident"]), timeout=3, what="the query to stop")
    assert time.monotonic() - t0 < 3
    with db.connection_context():
        assert db.execute_sql("select 42").fetchone() == (42,)


@pytest.mark.parametrize("nested", [False, True], ids=["atomic", "savepoint"])
@pytest.mark.parametrize("cut", ["timeout", "kill"])
@backends("pg")
def test_a_cut_inside_atomic_lets_the_interruption_through(backend: Backend, cut: str, nested: bool) -> None:
    """A time limit or a kill cutting a query inside `atomic()` (a Celery hard
    time limit, a revoke): the block's rollback must not run on the busy
    connection and replace the Timeout/GreenletExit with "another command is
    already in progress", which a task catching database errors would take
    for an ordinary one and live on."""
    db = backend.make(max_connections=2)
    Item = backend.model(db)
    idents: list[int] = []
    seen: dict[str, BaseException] = {}

    def query() -> None:
        idents.append(backend.ident(db))
        if cut == "timeout":
            with gevent.Timeout(0.3):
                db.execute_sql(backend.sleep_sql(10))
        else:
            db.execute_sql(backend.sleep_sql(10))

    def work(i: int) -> None:
        try:
            with db.connection_context():
                with db.atomic():
                    Item.create(value=1)
                    if nested:
                        with db.atomic():
                            query()
                    else:
                        query()
        except peewee.DatabaseError as ex:  # as a task that handles database errors
            seen["database_error"] = ex
        except gevent.Timeout as ex:
            seen["timeout"] = ex

    g = gevent.spawn(work, 0)
    if cut == "kill":
        wait_until(lambda: idents and backend.server.running_query(idents[0]), what="the query to run")
        g.kill(block=True, timeout=5)
    g.join(5)
    assert g.dead and "database_error" not in seen, seen
    if cut == "timeout":
        assert "timeout" in seen
    else:
        assert isinstance(g.value, gevent.GreenletExit)
    wait_until(lambda: not backend.server.running_query(idents[0]), timeout=3, what="the cut query to stop")
    wait_until(_returned_or_replaced(db, 2), timeout=3, what="the connection returned or replaced")
    assert backend.server.count(Item._meta.table_name) == 0  # rolled back
    with db.connection_context():
        assert db.execute_sql("select 42").fetchone() == (42,)


def test_mysql_cut_inside_atomic_lets_the_interruption_through(child: Callable[..., dict[str, Any]]) -> None:
    """MariaDB, patched: as test_a_cut_inside_atomic_lets_the_interruption_through."""
    out = child(
        """
        from gevent import monkey; monkey.patch_all()
        import gevent, peewee, pymysql
        import greenpool.peewee as gpw
        """,
        CHILD_GREEN_WAIT_UNTIL,
        CHILD_MYSQL_SCRATCH,
        """
        for cut in ("timeout", "kill"):
            for nested in (False, True):
                ids, seen = [], {}
                def query():
                    ids.append(db.execute_sql("select connection_id()").fetchone()[0])
                    if cut == "timeout":
                        with gevent.Timeout(0.3):
                            db.execute_sql("select sleep(10)")
                    else:
                        db.execute_sql("select sleep(10)")
                def work():
                    try:
                        with db.connection_context():
                            with db.atomic():
                                db.execute_sql(f"insert into {table} (value) values (1)")
                                if nested:
                                    with db.atomic():
                                        query()
                                else:
                                    query()
                    except peewee.DatabaseError as ex:
                        seen["database_error"] = repr(ex)
                    except gevent.Timeout:
                        seen["timeout"] = True
                def running():
                    sql = "select 1 from information_schema.processlist where id = %s and command = 'Query'"
                    return bool(ids) and bool(q(sql, ids[0]))
                g = gevent.spawn(work)
                if cut == "kill":
                    wait_until(running, 5)
                    g.kill(block=True, timeout=5)
                g.join(5)
                key = f"{cut}_{'savepoint' if nested else 'atomic'}"
                out[key] = {
                    "database_error": seen.get("database_error"),
                    "interrupted": (
                        seen.get("timeout", False) if cut == "timeout" else isinstance(g.value, gevent.GreenletExit)
                    ),
                    "orphan_gone": wait_until(lambda: not running(), 3),
                    "rows": q(f"select count(*) from {table}")[0][0],
                }
        with db.connection_context():
            out["works"] = db.execute_sql("select 42").fetchone()[0] == 42
        q(f"drop table {table}")
        result(**out)
        """,
    )
    assert out.pop("works"), out
    for key, seen in out.items():
        if key.startswith("_"):
            continue  # the child's own (exit status)
        assert seen == {"database_error": None, "interrupted": True, "orphan_gone": True, "rows": 0}, (key, seen)


@backends("pg", "mysql")
def test_a_connection_the_server_closed_while_idle_is_not_handed_out(backend: Backend) -> None:
    """Terminated (pg_terminate_backend, KILL) while idle and used less than
    `check_idle` ago: the next connect() sees the socket readable, without a
    round trip, and gets a fresh connection (it got the dead one)."""
    db = backend.make(max_connections=1, check_idle=60)
    with db.connection_context():
        victim = backend.ident(db)
    backend.server.kill(victim)
    with db.connection_context():
        assert backend.ident(db) != victim
        assert db.execute_sql("select 42").fetchone() == (42,)
    assert db.pool_stats()["connections_lost"] == 1


def test_a_sqlite_connection_is_closed_in_the_caller(tmp_path: Path) -> None:
    """close_idle() closes SQLite connections in the caller: a misuse of the
    returned connection after it gets sqlite3's ProgrammingError, never a
    close in another thread racing the use (a segmentation fault)."""
    import sqlite3

    db = gpw.PooledSqliteDatabase(str(tmp_path / "inline.db"), max_connections=2)
    try:
        db.connect()
        conn = db.connection()
        db.close()
        assert db.close_idle() is None
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("select 1")
    finally:
        db.close_all()
        db.pool.close()


def test_mysql_timeout_mid_query_patched(child: Callable[..., dict[str, Any]]) -> None:
    """MariaDB, patched: as test_timeout_mid_query_leaves_no_orphan, also for
    a query sent through `db.cursor()` rather than `execute_sql()`."""
    out = child(
        """
        from gevent import monkey; monkey.patch_all()
        import gevent, pymysql
        import greenpool.peewee as gpw
        """,
        CHILD_GREEN_WAIT_UNTIL,
        """
        mon = pymysql.connect(autocommit=True, **MY)
        def running(ident):
            cur = mon.cursor()
            cur.execute("select 1 from information_schema.processlist where id = %s and command = 'Query'", (ident,))
            return bool(cur.fetchall())

        out = {}
        for query_again, through_cursor in ((False, False), (True, False), (False, True)):
            db = make_db(gpw, "mysql", max_connections=2)
            seen = {}
            def request():
                with db.connection_context():
                    seen["ident"] = db.execute_sql("select connection_id()").fetchone()[0]
                    try:
                        with gevent.Timeout(0.5):
                            if through_cursor:
                                db.cursor().execute("select sleep(10)")
                            else:
                                db.execute_sql("select sleep(10)")
                    except gevent.Timeout:
                        seen["timed_out"] = True
                    if query_again:
                        try:
                            db.execute_sql("select 1")
                        except Exception as ex:
                            seen["second"] = repr(ex)
            gevent.spawn(request).join(10)
            key = "query_again" if query_again else "cursor" if through_cursor else "exit"
            out[key + "_timed_out"] = seen.get("timed_out", False)
            out[key + "_orphan_gone"] = wait_until(lambda: not running(seen["ident"]), 3)
            with db.connection_context():
                out[key + "_works"] = db.execute_sql("select 42").fetchone()[0] == 42
            db.close_all()
        result(**out)
        """,
    )
    for key in ("exit", "query_again", "cursor"):
        assert out[f"{key}_timed_out"], out
        assert out[f"{key}_orphan_gone"], f"{key}: sleep(10) still running 3 s after the timeout: {out}"
        assert out[f"{key}_works"], out


def test_mysql_greenlet_death_patched(child: Callable[..., dict[str, Any]]) -> None:
    """MariaDB under patch_all: the same three cases as above, in a child."""
    out = child(
        """
        from gevent import monkey; monkey.patch_all()
        import gevent, pymysql
        import greenpool.peewee as gpw
        """,
        CHILD_GREEN_WAIT_UNTIL,
        CHILD_MYSQL_SCRATCH,
        """

        # 1. autoconnect, then the greenlet ends.
        g = gevent.spawn(lambda: db.execute_sql("select connection_id()").fetchone()[0])
        g.join(5)
        first = g.value
        out["returned"] = wait_until(lambda: db.pool_stats()["pool_available"] == 1, 3)
        with db.connection_context():
            out["reused"] = db.execute_sql("select connection_id()").fetchone()[0] == first

        # 2. a manual transaction left open by a greenlet that ends.
        def abandons():
            db.begin()
            db.execute_sql(f"insert into {table} (value) values (1)")
        gevent.spawn(abandons).join(5)
        out["returned_after_txn"] = wait_until(lambda: db.pool_stats()["pool_available"] >= 1, 3)
        out["rows_after_txn"] = q(f"select count(*) from {table}")[0][0]
        time.sleep(0.15)  # innodb_trx is a cache refreshed when unread for 100 ms
        out["open_txns"] = q(
            "select count(*) from information_schema.innodb_trx where trx_mysql_thread_id = %s", first
        )[0][0]

        # 3. killed in the middle of a long query.
        ids = []
        def long_query():
            ids.append(db.execute_sql("select connection_id()").fetchone()[0])
            db.execute_sql("select sleep(10)")
        g = gevent.spawn(long_query)
        def running():
            sql = "select 1 from information_schema.processlist where id = %s and command = 'Query'"
            return bool(ids) and bool(q(sql, ids[0]))
        out["started"] = wait_until(running, 5)
        g.kill(block=True, timeout=5)
        t0 = time.monotonic()
        out["orphan_gone"] = wait_until(lambda: not running(), 3)
        out["orphan_gone_after"] = time.monotonic() - t0
        def recovered():
            stats = db.pool_stats()
            return stats["pool_available"] + 2 - stats["pool_size"] >= 1  # returned or replaced
        out["recovered"] = wait_until(recovered, 3)
        with db.connection_context():
            out["works"] = db.execute_sql("select 42").fetchone()[0] == 42

        # 4. killed in the middle of a long query inside atomic().
        ids.clear()
        def in_atomic():
            with db.connection_context():
                with db.atomic():
                    db.execute_sql(f"insert into {table} (value) values (4)")
                    ids.append(db.execute_sql("select connection_id()").fetchone()[0])
                    db.execute_sql("select sleep(10)")
        g = gevent.spawn(in_atomic)
        out["atomic_started"] = wait_until(running, 5)
        g.kill(block=True, timeout=5)
        out["atomic_orphan_gone"] = wait_until(lambda: not running(), 3)
        out["atomic_rows"] = q(f"select count(*) from {table}")[0][0]
        out["atomic_recovered"] = wait_until(recovered, 3)
        q(f"drop table {table}")
        result(**out)
        """,
    )
    assert out["returned"] and out["reused"], out
    assert out["returned_after_txn"] and out["rows_after_txn"] == 0 and out["open_txns"] == 0, out
    assert out["started"], out
    assert out["orphan_gone"], f"sleep(10) still running 3 s after its greenlet was killed: {out}"
    assert out["recovered"] and out["works"], out
    assert out["atomic_started"] and out["atomic_orphan_gone"], out
    assert out["atomic_rows"] == 0 and out["atomic_recovered"], out


# --------------------------------------------------------------------------
# A dead connection is discarded at checkout
# --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["check_idle=0", "idle past check_idle"])
@backends("pg", "mysql")
def test_dead_idle_connection_discarded_at_checkout(backend: Backend, how: str) -> None:
    """greenpool probes a connection at checkout only when it has been idle
    for `check_idle` s or more (default 0.5 s): either probe always, or let
    the connection sit idle past the default."""
    db = backend.make(max_connections=3, **({"check_idle": 0} if how == "check_idle=0" else {}))
    with db.connection_context():
        dead = backend.ident(db)
    backend.server.kill(dead)
    if how != "check_idle=0":
        time.sleep(0.6)
    with db.connection_context():
        assert db.execute_sql("select 1").fetchone() == (1,)
        assert backend.ident(db) != dead
    assert db.pool_stats()["connections_lost"] >= 1


@backends("mysql", "pg")
def test_a_restart_under_load_fails_no_request_made_after_it(backend: Backend) -> None:
    """A server restart (every connection dropped, connects refused, then
    accepted) under load from 8 threads: no request that starts after the
    server accepts again fails."""
    proxy = backend.proxy()
    db = backend.make(max_connections=4, timeout=10, host=proxy.host, port=proxy.port)
    outcomes: list[tuple[float, str]] = []
    up_again: list[float] = []
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                with db.connection_context():
                    db.execute_sql("select 1").fetchall()
                outcomes.append((start, "ok"))
            except peewee.DatabaseError as ex:
                outcomes.append((start, type(ex).__name__))
                time.sleep(0.01)

    try:
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        proxy.pause()
        proxy.kill_connections()
        time.sleep(1.5)
        proxy.resume()
        up_again.append(time.monotonic())
        time.sleep(1.5)
        stop.set()
        for thread in threads:
            thread.join(15)
    finally:
        stop.set()
        proxy.stop()
    assert [kind for start, kind in outcomes if start > up_again[0] and kind != "ok"] == []
    assert any(kind != "ok" for _, kind in outcomes)  # it did go down
    assert sum(1 for start, kind in outcomes if start > up_again[0] and kind == "ok") > 8


def _traceback_depth(error: BaseException) -> int:
    depth, tb = 0, error.__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    return depth


@backends("pg", "mysql")
def test_database_down_raises_the_drivers_error_at_once_then_recovers(backend: Backend) -> None:
    """With the server down and no connection alive, connect() raises the
    driver's error (wrapped by peewee, as a failed connect of its own is) at
    once, not after `timeout`. Each caller gets an error object of its own:
    one shared object raised by every caller would pile all their frames onto
    its one traceback. Once the server answers again, connect() works."""
    proxy = backend.proxy()
    try:
        proxy.pause()
        db = backend.make(max_connections=2, timeout=20, host=proxy.host, port=proxy.port)
        errors = []
        t0 = time.monotonic()
        for _ in range(4):
            with pytest.raises(peewee.OperationalError) as info:
                db.connect()
            errors.append(info.value)
        assert time.monotonic() - t0 < 10  # the first waits for a connect to fail; then at once
        drivers = [error.__context__ for error in errors]
        assert all(isinstance(d, (psycopg.OperationalError, pymysql.OperationalError)) for d in drivers)
        assert all("refused" in str(d).lower() or "can't connect" in str(d).lower() for d in drivers), drivers
        assert len({id(d) for d in drivers}) == len(drivers)
        assert len({_traceback_depth(error) for error in errors[1:]}) == 1  # no pile-up

        proxy.resume()

        def connects() -> bool:
            try:
                db.connect()
            except peewee.OperationalError:
                return False
            return True

        wait_until(connects, timeout=10, what="connect() to work again")
        assert db.execute_sql("select 1").fetchone() == (1,)
        db.close()
    finally:
        proxy.stop()


@backends("pg", "mysql")
@pytest.mark.parametrize("timeout", [None, 20])
def test_database_down_with_a_connection_lent_raises_at_once_and_stops_trying(backend: Backend, timeout: Any) -> None:
    """A connection lent elsewhere doesn't make connect() wait (up to 30 s)
    for connects to a server that is down: the first failed connect is its
    error, as playhouse's own connect would be. And once nothing asks for a
    connection, the pool stops trying (it retried forever, every second)."""
    proxy = backend.proxy()
    try:
        db = backend.make(max_connections=5, timeout=timeout, host=proxy.host, port=proxy.port)
        held = threading.Event()
        done = threading.Event()

        def hold() -> None:
            with db.connection_context():
                held.set()
                done.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        proxy.pause()
        t0 = time.monotonic()
        with pytest.raises(peewee.OperationalError, match="(?i)refused|can't connect"):
            db.connect()
        assert time.monotonic() - t0 < 5
        gevent.sleep(1.5)  # a retry or two after its requester got the error
        errors_then = db.pool_stats()["connections_errors"]
        gevent.sleep(2.5)
        assert db.pool_stats()["connections_errors"] == errors_then
        done.set()
        holder.join(10)
        proxy.resume()
        with db.connection_context():  # the next request tries again
            assert db.execute_sql("select 1").fetchone() == (1,)
    finally:
        proxy.stop()


@backends("pg")
def test_a_connect_too_slow_is_not_called_max_connections(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool with room whose connect doesn't finish in time says so; the cap
    was never the problem (it said "Max connections exceeded")."""
    monkeypatch.setattr(gpw.database, "CONNECT_WAIT", 0.3)
    proxy = backend.proxy()
    try:
        proxy.set_connect_delay(1.0)
        db = backend.make(max_connections=5, host=proxy.host, port=proxy.port)
        with pytest.raises(peewee.OperationalError, match="no connection could be made within 0.3 s"):
            db.connect()
    finally:
        proxy.stop()


@backends("pg", "mysql")
def test_a_database_back_up_serves_the_next_connect(backend: Backend) -> None:
    """Once no one retries a failed connect, the pool is not "failing" any
    more: the next connect() makes its own attempt (it raised the old error
    at once, without trying)."""
    proxy = backend.proxy()
    try:
        db = backend.make(max_connections=4, host=proxy.host, port=proxy.port)
        proxy.pause()
        with pytest.raises(peewee.OperationalError):
            db.connect()
        time.sleep(1.5)  # past the retries, if any
        proxy.resume()
        db.connect()
        assert db.execute_sql("select 1").fetchone() == (1,)
        db.close()
    finally:
        proxy.stop()


@backends("pg")
def test_init_that_raises_keeps_the_gevent_aware_connections(backend: Backend) -> None:
    """peewee's init() makes a new psycopg adapter before it may raise (here:
    a transaction open): the pool must still connect with GeventConnection."""
    db = backend.make(max_connections=3)
    with db.atomic():
        with pytest.raises(peewee.OperationalError, match="transaction is open"):
            db.init(backend.database, **backend.params, application_name="x")
    db.close_idle()
    with db.connection_context():
        assert isinstance(db.connection(), GeventConnection)


@pytest.mark.parametrize("age, exc", [("x", ValueError), (-1, ValueError), (None, TypeError), ([1], TypeError)])
def test_close_stale_checks_its_age(age: Any, exc: type) -> None:
    db = gpw.PooledSqliteDatabase(":memory:")
    with pytest.raises(exc, match="age"):
        db.close_stale(age)
    assert db.close_stale("0") == 0  # strings, as everywhere in peewee


def test_without_psycopg_the_error_says_what_to_install(run_python: Callable[..., Any]) -> None:
    proc = run_python(
        "import sys; sys.modules['psycopg'] = None\n"
        "import greenpool\n"
        "try:\n    greenpool.ConnectionPool\nexcept ModuleNotFoundError as ex:\n    print(ex)\n",
        env={"GREENPOOL_TEST_DSN": ""},
    )
    assert "pip install 'greenpool[psycopg]'" in proc.stdout, proc.stdout + proc.stderr


def test_idle_connections_are_kept_as_in_playhouse() -> None:
    """playhouse never closes an idle connection (only stale ones): with
    SQLite's `:memory:` that would lose the database."""
    db = gpw.PooledSqliteDatabase(":memory:")
    assert db.pool.max_idle == math.inf
    assert gpw.PooledSqliteDatabase(":memory:", max_idle=60).pool.max_idle == 60


# --------------------------------------------------------------------------
# Leak visibility
# --------------------------------------------------------------------------


@backends("pg", "mysql", "sqlite")
def test_leak_warning_names_where_the_connection_was_taken(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    # max_idle=2 makes the housekeeper tick every 0.1 s (see module docstring).
    db = backend.make(max_connections=3, leak_threshold=0.2, max_idle=2)

    def hold_connection_for_a_second() -> None:
        db.connect()
        time.sleep(1.0)
        db.close()

    with caplog.at_level(logging.WARNING, logger="greenpool"):
        hold_connection_for_a_second()
    pool_name = repr(db.pool.name)  # reports of this pool only
    leaks = [
        r
        for r in caplog.records
        if r.name.startswith("greenpool") and "leak_threshold" in r.getMessage() and pool_name in r.getMessage()
    ]
    assert leaks, [r.getMessage() for r in caplog.records]
    for record in leaks:  # one report, naming where the connection was taken
        assert "hold_connection_for_a_second" in record.getMessage()
        assert record.levelno == logging.WARNING


# --------------------------------------------------------------------------
# stale_timeout: a randomized lifetime, replaced before expiry
# --------------------------------------------------------------------------


@backends("pg", "mysql", "sqlite")
def test_stale_timeout_randomized_and_replaced_without_waiting(backend: Backend) -> None:
    stale = 1.0
    db = backend.make(max_connections=50, stale_timeout=stale, timeout=10)
    jitter = db.pool.lifetime_jitter
    assert 0 < jitter < 1

    # Warm up 8 connections.
    barrier = threading.Barrier(8)

    def hold(i: int) -> None:
        with db.connection_context():
            barrier.wait(10)

    run_threads(hold, 8)
    # Private, here and below: every connection's drawn lifetime, replacements
    # made and retired between checkouts included, is only on the pool's
    # slots; lending them (`db.pool.acquire()`) would probe them and change
    # the checkouts this test times.
    initial = [s.conn for s in db.pool._slots]
    assert len(initial) == 8
    # Keep every slot seen alive, so that id() keys stay unique.
    seen: dict[int, tuple[Any, float]] = {id(s): (s, s.expire_at - s.created_at) for s in db.pool._slots}

    queued_before = db.pool_stats()["requests_queued"]
    made_before = db.pool_stats()["connections_num"]
    slowest = 0.0
    t_end = time.monotonic() + 3 * stale
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        db.connect()
        slowest = max(slowest, time.monotonic() - t0)
        db.execute_sql("select 1")
        db.close()
        for s in list(db.pool._slots):
            if id(s) not in seen and s.expire_at > 0:  # expire_at 0: retired
                seen[id(s)] = (s, s.expire_at - s.created_at)
        time.sleep(0.01)

    lifetimes = [lifetime for _, lifetime in seen.values()]
    assert len(lifetimes) > 8
    low, high = stale * (1 - jitter), stale
    out_of_range = [v for v in lifetimes if not low - 1e-6 <= v <= high + 1e-6]
    assert not out_of_range, f"lifetimes outside [{low}, {high}]: {out_of_range}"
    assert len({round(v, 6) for v in lifetimes}) > 1, "lifetimes are not randomized"
    stats = db.pool_stats()
    assert stats["connections_num"] - made_before >= 8, "connections were not replaced"
    current = [s.conn for s in db.pool._slots]
    assert not any(c is old for c in current for old in initial), "an original connection outlived 3 x stale_timeout"
    assert stats["requests_queued"] == queued_before, "a checkout had to wait for a replacement"
    assert slowest < 0.5
