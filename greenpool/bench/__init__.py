"""Benchmark greenpool against psycopg_pool, peewee's pool and no-pool baselines, under gevent.

Run it as ``python -m greenpool bench`` (see ``--help``). The CLI monkey-patches
before importing this module; it imports gevent at the top, and psycopg,
pymysql, peewee, the pools and the embedded server only inside functions, so
nothing here binds an unpatched object.

Contenders (`CONTENDERS`, in table order), with the backends they run on:

``greenpool``         `greenpool.ConnectionPool` (PostgreSQL)
``psycopg_pool``      `psycopg_pool.ConnectionPool` (PostgreSQL)
``peewee-greenpool``  `greenpool.peewee`'s PooledPostgresqlDatabase /
                      PooledMySQLDatabase (both)
``peewee-playhouse``  `playhouse.pool`'s PooledPostgresqlDatabase /
                      PooledMySQLDatabase, peewee's own pool (both)
``bare-pool``         a featureless FIFO pool (an idle list and a gevent
                      `Waiter` handoff): what lending P connections to G
                      greenlets costs at the least (both)
``dedicated``         P greenlets each owning one connection: the same driver
                      with no pool, the upper bound (both)
``peewee-dedicated``  P greenlets each owning one connected, non-pooled Peewee
                      database: the upper bound through Peewee (both)
``shared``            one connection behind a gevent lock, used by all G
                      greenlets (PostgreSQL)

The psycopg pools, ``bare-pool``, ``dedicated`` and ``shared`` use the same connection class
and autocommit, so differences come from the pools, not the driver. The Peewee
contenders run one query per borrow the way Peewee code does,
``with db.connection_context(): db.execute_sql(sql).fetchall()``; greenpool's
adapter connects with the same gevent-aware class, playhouse with peewee's own
``psycopg.connect`` (psycopg 3; its default wait function cooperates once
``select`` is patched). ``peewee-dedicated`` connects as greenpool's adapter
does and runs ``db.execute_sql(sql).fetchall()`` on its own open connection,
so Peewee's per-query CPU is in it too. On MySQL everything is pymysql, which
cooperates on the patched ``socket``.

The fixed-work report compares every contender with ``dedicated`` (q/s, and
p99 against the FIFO ideal G/P x its median latency), and the ``peewee-*``
ones also with ``peewee-dedicated`` (`BOUNDS`). Adding a contender is one
class::

    @contender("mypool", storm=True, backends=("postgres",))
    class MyPool(BorrowingContender):
        '''One line shown by --list and in the report header.'''
        def open(self) -> None: ...      # connect config.pool_size connections
        def borrow(self): ...            # context manager yielding a connection
        def close(self) -> None: ...
        # optionally: execute(conn, sql) for another API, reset_stats(), stats()

Scenarios (`SCENARIOS`) run on one backend (`Scenario.backend`: ``postgres``
or ``mysql``, the ``mysql-`` ones) with the contenders supporting it. They
either give each of G greenlets a fixed number of queries (``steady``,
``overhead``, ``scale``), or run them for a fixed time (``storm``). ``storm``
measures each pool twice through a slow-connecting TCP proxy: with connections
expiring every few seconds, and with a long lifetime; only the contenders
registered with ``storm=True`` take part. A scenario may leave a contender out
(`Scenario.skip`, e.g. ``shared`` in ``scale``) unless ``--contender`` names it.
MySQL scenarios are skipped, with a note, when no MySQL server answers.

A query's latency runs from asking for a connection to having the result, so
it includes the wait for the pool.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import gevent
import gevent.event
import gevent.hub
import gevent.lock
from gevent import monkey

perf_counter = time.perf_counter

#: Environment variable holding the DSN, as for the test suite.
DSN_ENV = "GREENPOOL_DSN"
#: Environment variable holding the MySQL/MariaDB URL.
MYSQL_ENV = "GREENPOOL_MYSQL"
#: Where a MySQL server is looked for when neither --mysql nor $GREENPOOL_MYSQL is set.
MYSQL_DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"
#: Seconds the MySQL probe (and every pymysql connect) may take to connect.
MYSQL_CONNECT_TIMEOUT = 10
#: Every contender's connections are opened with these.
CONNECT_KWARGS: Mapping[str, Any] = {"autocommit": True}
#: Lifetime of the "no storm" runs: longer than any run.
CALM_LIFETIME = 3600.0
#: Untimed queries each client greenlet runs before a timed run.
WARMUP_QUERIES = 2
#: Pool `timeout` (getconn) and `open(wait=True)` timeout, in seconds.
POOL_TIMEOUT = 30.0
#: Peewee pools' `timeout`: generous, so that they wait rather than raise.
PEEWEE_TIMEOUT = 60.0
#: Bound on closing one contender's pool or connections.
CLOSE_TIMEOUT = 30.0
#: After a run's gevent.Timeout, how long the OS-level watchdog waits before
#: dumping every stack and exiting: it only fires if the gevent hub is blocked
#: (then no gevent.Timeout can fire and the benchmark would hang forever).
WATCHDOG_GRACE = 60.0

SLEEP_SQL = "select pg_sleep(0.002)"
MYSQL_SLEEP_SQL = "select sleep(0.002)"

#: Backend names, as in `Scenario.backend` and `contender(backends=...)`.
POSTGRES = "postgres"
MYSQL = "mysql"


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Phase:
    """One measured configuration of a scenario; `storm` has two of them."""

    name: str
    max_lifetime: float


@dataclass(frozen=True)
class Scenario:
    """A workload: G greenlets sharing P connections, running `sql`.

    Exactly one of `queries_each` (fixed work) and `duration` (fixed time, in
    seconds) is set. With `storm_lifetime` set the scenario runs twice per
    contender, with that connection lifetime and with `CALM_LIFETIME`, both
    through a TCP proxy delaying each new connection by `connect_delay` seconds.
    It runs on the `backend` server, with the contenders supporting it, but
    those named in `skip` (with the reason), unless --contender names them.
    """

    name: str
    greenlets: int
    pool_size: int
    sql: str
    queries_each: int | None = None
    duration: float | None = None
    storm_lifetime: float | None = None
    connect_delay: float = 0.0
    backend: str = POSTGRES
    skip: tuple[tuple[str, str], ...] = ()

    @property
    def is_storm(self) -> bool:
        """True for a lifetime-storm scenario (calm vs storm comparison)."""
        return self.storm_lifetime is not None

    @property
    def phases(self) -> tuple[Phase, ...]:
        """The configurations each contender is measured in."""
        if self.storm_lifetime is None:
            return (Phase("run", CALM_LIFETIME),)
        return (Phase("calm", CALM_LIFETIME), Phase("storm", self.storm_lifetime))

    def describe(self) -> str:
        """One line for the report."""
        text = f"G={self.greenlets} greenlets, P={self.pool_size} connections, `{self.sql}`"
        if self.queries_each is not None:
            total = self.queries_each * self.greenlets
            text += f", {self.queries_each} queries each ({total} total)"
        else:
            text += f", for {self.duration:g} s"
        if self.storm_lifetime is not None:
            text += (
                f"; max_lifetime {self.storm_lifetime:g} s vs {CALM_LIFETIME:g} s,"
                f" via a proxy delaying connects by {self.connect_delay * 1000:g} ms"
            )
        return text


_STEADY = Scenario("steady", greenlets=200, pool_size=20, sql=SLEEP_SQL, queries_each=50)
_SCALE = Scenario(
    "scale",
    greenlets=2000,
    pool_size=50,
    sql=SLEEP_SQL,
    queries_each=10,
    # Like the field notes: one connection for 2000 greenlets only shows again
    # that a lone connection serializes everyone, at ~50 s a round.
    skip=(("shared", "one connection for 2000 greenlets takes ~50 s a round and shows nothing new"),),
)
_STORM = Scenario(
    "storm",
    greenlets=300,
    pool_size=100,
    sql=SLEEP_SQL,
    duration=10.0,
    storm_lifetime=3.0,
    connect_delay=0.03,
)
_MYSQL_STEADY = replace(_STEADY, name="mysql-steady", sql=MYSQL_SLEEP_SQL, backend=MYSQL)
# Half the PostgreSQL storm's pool: MariaDB allows 151 connections by default.
_MYSQL_STORM = replace(_STORM, name="mysql-storm", greenlets=150, pool_size=50, sql=MYSQL_SLEEP_SQL, backend=MYSQL)

#: name -> (full scenario, --quick scenario)
SCENARIOS: dict[str, tuple[Scenario, Scenario]] = {
    "steady": (_STEADY, replace(_STEADY, queries_each=5)),
    "overhead": (
        replace(_STEADY, name="overhead", sql="select 1"),
        replace(_STEADY, name="overhead", sql="select 1", queries_each=5),
    ),
    "scale": (_SCALE, replace(_SCALE, queries_each=2)),
    # --quick: half the pool, so that opening it (50 connects, 3 at a time,
    # 30 ms each) stays well within the 1 s lifetime and the run short.
    "storm": (_STORM, replace(_STORM, greenlets=150, pool_size=50, duration=2.0, storm_lifetime=1.0)),
    "mysql-steady": (_MYSQL_STEADY, replace(_MYSQL_STEADY, queries_each=5)),
    "mysql-overhead": (
        replace(_MYSQL_STEADY, name="mysql-overhead", sql="select 1"),
        replace(_MYSQL_STEADY, name="mysql-overhead", sql="select 1", queries_each=5),
    ),
    "mysql-storm": (
        _MYSQL_STORM,
        replace(_MYSQL_STORM, greenlets=60, pool_size=20, duration=2.0, storm_lifetime=1.0),
    ),
}


# ---------------------------------------------------------------- workload


@dataclass
class Workload:
    """What to run in one timed (or warm-up) phase, and the latencies seen."""

    sql: str
    greenlets: int
    queries_each: int | None
    duration: float | None
    latencies: list[float] = field(default_factory=list)
    _remaining: int = 0
    _deadline: float = math.inf

    def start(self) -> None:
        """Start the budget: the clock for fixed-time, the shared count otherwise."""
        if self.duration is not None:
            self._deadline = perf_counter() + self.duration
        else:
            assert self.queries_each is not None
            self._remaining = self.queries_each * self.greenlets

    def more(self, done: int) -> bool:
        """Whether a client greenlet that has run `done` queries runs another."""
        if self.duration is not None:
            return perf_counter() < self._deadline
        assert self.queries_each is not None
        return done < self.queries_each

    def take(self) -> bool:
        """Claim one query from the shared budget (for workers that don't map to clients).

        No lock needed: greenlets only switch on I/O, never inside this method.
        """
        if self.duration is not None:
            return perf_counter() < self._deadline
        if self._remaining <= 0:
            return False
        self._remaining -= 1
        return True


def _run_parallel(jobs: Sequence[Callable[[], None]]) -> None:
    """Run each job in its own greenlet until all return.

    The first failure kills the other greenlets and is raised here; killing
    the greenlets also happens when this caller is interrupted (its
    gevent.Timeout), so no client outlives its run.
    """
    failures: list[BaseException] = []
    finished = gevent.event.Event()
    pending = len(jobs)

    def guarded(job: Callable[[], None]) -> None:
        nonlocal pending
        try:
            job()
        except gevent.GreenletExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - a pool's own gevent.Timeout too
            failures.append(exc)
            finished.set()
        finally:
            pending -= 1
            if pending == 0:
                finished.set()

    if not jobs:
        return
    greenlets = [gevent.spawn(guarded, job) for job in jobs]
    try:
        finished.wait()
    finally:
        gevent.killall(greenlets, block=True, timeout=CLOSE_TIMEOUT)
    if failures:
        raise failures[0]


# ---------------------------------------------------------------- backends


class Backend(ABC):
    """A kind of database server: how to reach it, connect, query and describe it.

    `dsn` is a libpq connection string for PostgreSQL, a ``mysql://`` URL for
    MySQL. Drivers are imported in the methods, after the monkey-patch.
    """

    #: `Scenario.backend` / `contender(backends=...)` name.
    name: str
    #: For the report.
    title: str

    @abstractmethod
    def connect(self, config: ContenderConfig) -> Any:
        """A new driver connection in autocommit (for the no-pool contenders)."""

    @abstractmethod
    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` on a driver connection and fetch the result."""

    @abstractmethod
    def server_info(self, dsn: str, connection_class: type[Any] | None = None) -> dict[str, Any]:
        """Version, ``max_connections`` and other clients' connections, read once.

        `connection_class`: the psycopg class to connect with (PostgreSQL).
        """

    @abstractmethod
    def tcp_target(self, dsn: str) -> tuple[str, int]:
        """Host and port of the server, for the storm proxy (TCP only)."""

    @abstractmethod
    def via_proxy(self, dsn: str, host: str, port: int) -> str:
        """`dsn` rewritten to connect to `host`:`port` (the storm proxy)."""

    @abstractmethod
    def peewee_params(self, dsn: str) -> tuple[str, dict[str, Any]]:
        """Database name and connect keywords of a Peewee `Database` for `dsn`."""

    @abstractmethod
    def masked(self, dsn: str) -> str:
        """`dsn` without its password, for printing and JSON."""


class PostgresBackend(Backend):
    """PostgreSQL through psycopg 3."""

    name = POSTGRES
    title = "PostgreSQL"

    def connect(self, config: ContenderConfig) -> Any:
        """A psycopg connection of the config's `connection_class`, with its `connect_kwargs` (autocommit)."""
        return config.connection_class.connect(config.dsn, **config.connect_kwargs)

    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` with psycopg's ``conn.execute()`` and fetch every row."""
        conn.execute(sql).fetchall()

    def server_info(self, dsn: str, connection_class: type[Any] | None = None) -> dict[str, Any]:
        """One query for version, ``max_connections`` and other client backends (``pg_stat_activity``)."""
        if connection_class is None:
            import psycopg

            connection_class = psycopg.Connection
        with connection_class.connect(dsn, **CONNECT_KWARGS) as conn:
            version, max_conn, clients = conn.execute(
                "select current_setting('server_version'), current_setting('max_connections')::int,"
                " (select count(*) from pg_stat_activity"
                "  where backend_type = 'client backend' and pid <> pg_backend_pid())"
            ).fetchone()
        return {"version": version, "max_connections": max_conn, "client_connections": clients}

    def tcp_target(self, dsn: str) -> tuple[str, int]:
        """The DSN's single TCP host (``hostaddr`` first) and port, defaulting to ``PGHOST``/``PGPORT``/5432."""
        return _tcp_target(dsn)

    def via_proxy(self, dsn: str, host: str, port: int) -> str:
        """The DSN with `host` and `port` set and ``hostaddr`` dropped, as a conninfo string."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
        params.pop("hostaddr", None)
        params.update(host=host, port=str(port))
        return make_conninfo("", **params)

    def peewee_params(self, dsn: str) -> tuple[str, dict[str, Any]]:
        """The DSN's ``dbname`` (else the user, as libpq) and its other parameters, plus ``prefer_psycopg3``."""
        from psycopg.conninfo import conninfo_to_dict

        params: dict[str, Any] = dict(conninfo_to_dict(dsn))
        # libpq's default database is the user name.
        database = str(
            params.pop("dbname", None)
            or os.environ.get("PGDATABASE")
            or params.get("user")
            or os.environ.get("PGUSER")
            or ""
        )
        if not database:
            raise ValueError("the DSN names no database (dbname) nor user")
        # peewee 4 picks psycopg 3 only when psycopg2 is absent, unless told.
        params["prefer_psycopg3"] = True
        return database, params

    def masked(self, dsn: str) -> str:
        """The DSN with its password replaced by ``***``."""
        return _masked(dsn)


class MySQLBackend(Backend):
    """MySQL or MariaDB through pymysql (pure Python on the patched `socket`)."""

    name = MYSQL
    title = "MySQL"

    def connect(self, config: ContenderConfig) -> Any:
        """A pymysql connection from the URL's parameters, in utf8mb4 and autocommit as Peewee connects."""
        import pymysql

        database, params = self.peewee_params(config.dsn)
        # As peewee's MySQLDatabase connects (utf8mb4, autocommit).
        params.setdefault("charset", "utf8mb4")
        return pymysql.connect(database=database, autocommit=True, **params)

    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` on a new pymysql cursor and fetch every row."""
        cursor = conn.cursor()
        cursor.execute(sql)
        cursor.fetchall()

    def server_info(self, dsn: str, connection_class: type[Any] | None = None) -> dict[str, Any]:
        """Version, ``@@max_connections`` and ``Threads_connected`` less this probe's own connection."""
        import pymysql

        database, params = self.peewee_params(dsn)
        conn = pymysql.connect(database=database, autocommit=True, **params)
        try:
            cursor = conn.cursor()
            cursor.execute("select version(), @@max_connections")
            version, max_conn = cursor.fetchone()
            cursor.execute("show global status like 'Threads_connected'")
            (_, connected) = cursor.fetchone()
        finally:
            conn.close()
        return {"version": version, "max_connections": int(max_conn), "client_connections": int(connected) - 1}

    def tcp_target(self, dsn: str) -> tuple[str, int]:
        """The URL's host and port; a ``unix_socket`` parameter raises `ValueError`."""
        _, params = self.peewee_params(dsn)
        if "unix_socket" in params:
            raise ValueError("storm needs a TCP host in the MySQL URL, got a unix_socket")
        return str(params["host"]), int(params["port"])

    def via_proxy(self, dsn: str, host: str, port: int) -> str:
        """The URL with `host` and `port` in place of its own, user and password kept."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def peewee_params(self, dsn: str) -> tuple[str, dict[str, Any]]:
        """Database and pymysql keywords of a ``mysql://user:password@host:port/db?k=v`` URL.

        Query parameters are passed to pymysql, whole numbers as `int` and
        true/false/yes/no/on/off as `bool` (e.g. ``?ssl_disabled=true``).
        """
        from urllib.parse import parse_qsl, unquote, urlsplit

        parts = urlsplit(dsn)
        if parts.scheme not in ("mysql", "mariadb", "mysql+pymysql"):
            raise ValueError(f"expected a mysql:// URL, got {self.masked(dsn)!r}")
        params: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 3306,
            "user": unquote(parts.username) if parts.username else "root",
            "connect_timeout": MYSQL_CONNECT_TIMEOUT,
        }
        if parts.password is not None:
            params["password"] = unquote(parts.password)
        params.update((key, _url_value(value)) for key, value in parse_qsl(parts.query))
        database = unquote(parts.path.lstrip("/"))
        if not database:
            raise ValueError(f"the MySQL URL names no database: {self.masked(dsn)!r}")
        return database, params

    def masked(self, dsn: str) -> str:
        """The URL with its password replaced by ``***``, or as is if it has none."""
        from urllib.parse import urlsplit, urlunsplit

        try:
            parts = urlsplit(dsn)
            if parts.password is None:
                return dsn
            user, _, hostport = parts.netloc.rpartition("@")
            user = user.partition(":")[0]
            return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
        except ValueError:  # never fail on printing
            return "(unparsable URL)"


def _url_value(text: str) -> Any:
    """A URL query value as pymysql wants it: int, bool or str."""
    if text.isdigit():
        return int(text)
    words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
    return words.get(text.lower(), text)


#: Backend name -> backend.
BACKENDS: dict[str, Backend] = {b.name: b for b in (PostgresBackend(), MySQLBackend())}


# ---------------------------------------------------------------- contenders


@dataclass(frozen=True)
class ContenderConfig:
    """What a contender factory gets for one run."""

    dsn: str
    pool_size: int
    max_lifetime: float
    #: The psycopg connection class every psycopg contender must use.
    connection_class: type[Any]
    connect_kwargs: Mapping[str, Any]
    #: For pools: their getconn timeout and open(wait=True) timeout.
    timeout: float
    #: The server's kind; `dsn` is in its format.
    backend: Backend = field(default_factory=PostgresBackend)

    @property
    def stale_timeout(self) -> float | None:
        """`max_lifetime` as a Peewee pool's `stale_timeout`: None for a calm (long) lifetime."""
        return None if self.max_lifetime >= CALM_LIFETIME else self.max_lifetime


class Contender(ABC):
    """One way of giving greenlets database access; one instance per run."""

    def __init__(self, config: ContenderConfig) -> None:
        self.config = config

    @abstractmethod
    def open(self) -> None:
        """Open `config.pool_size` connections and wait until they are ready."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection; called even if `open()` failed halfway."""

    @abstractmethod
    def drive(self, work: Workload) -> None:
        """Run `work` to completion, appending each query's latency to it."""

    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` on `conn` and fetch the result (the backend's driver API by default)."""
        self.config.backend.execute(conn, sql)

    def reset_stats(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Forget statistics gathered so far (called after the warm-up)."""

    def stats(self) -> dict[str, Any] | None:
        """Pool statistics of the timed phase (`get_stats()`), if any."""
        return None


class BorrowingContender(Contender):
    """A contender lending connections: G client greenlets each borrow per query."""

    @abstractmethod
    def borrow(self) -> AbstractContextManager[Any]:
        """A context manager lending a connection for one query."""

    def drive(self, work: Workload) -> None:
        """Run G client greenlets, each borrowing a connection per query."""
        sql, record, borrow, execute = work.sql, work.latencies.append, self.borrow, self.execute

        def client() -> None:
            done = 0
            while work.more(done):
                start = perf_counter()
                with borrow() as conn:
                    execute(conn, sql)
                record(perf_counter() - start)
                done += 1

        _run_parallel([client] * work.greenlets)


@dataclass(frozen=True)
class ContenderSpec:
    """A registered contender."""

    name: str
    factory: Callable[[ContenderConfig], Contender]
    #: Whether it takes part in lifetime-storm scenarios (pools only).
    storm: bool
    description: str
    #: The `Scenario.backend` values it runs on.
    backends: frozenset[str] = frozenset({POSTGRES})

    def takes_part(self, scenario: Scenario) -> bool:
        """Whether it runs in `scenario` (its backend; storms only if `storm`)."""
        return scenario.backend in self.backends and (self.storm or not scenario.is_storm)

    def label(self) -> str:
        """Description plus where it runs, for --list and the report header."""
        where = ", ".join(BACKENDS[b].title for b in BACKENDS if b in self.backends)
        return f"{self.description} [{where}{'' if self.storm else '; not in storm'}]"


#: Registered contenders, in report order.
CONTENDERS: dict[str, ContenderSpec] = {}


def contender(
    name: str, *, storm: bool, backends: Iterable[str] = (POSTGRES,)
) -> Callable[[Callable[[ContenderConfig], Contender]], Callable[[ContenderConfig], Contender]]:
    """Class decorator registering a contender factory under `name`.

    `storm` says whether it takes part in lifetime-storm scenarios, `backends`
    which servers (`BACKENDS` names) it can run on. The first line of the
    factory's docstring describes it in the report.
    """
    supported = frozenset(backends)
    unknown = supported - set(BACKENDS)
    if unknown or not supported:
        raise ValueError(f"contender {name!r}: backends must be among {sorted(BACKENDS)}, got {sorted(supported)}")

    def register(
        factory: Callable[[ContenderConfig], Contender],
    ) -> Callable[[ContenderConfig], Contender]:
        doc = (factory.__doc__ or name).strip().splitlines()[0]
        CONTENDERS[name] = ContenderSpec(name, factory, storm, doc, supported)
        return factory

    return register


def _connect_many(connect: Callable[[], Any], count: int) -> list[Any]:
    """What `count` concurrent `connect()` calls return: connections, or anything with a ``close()``.

    If one call fails, those already made are closed.
    """
    conns: list[Any] = []

    def one() -> None:
        conns.append(connect())

    try:
        _run_parallel([one] * count)
    except BaseException:
        _close_all(conns)
        raise
    return conns


def _close_all(conns: Sequence[Any]) -> None:
    """Close every connection, even if closing one fails; raise the first failure."""
    failures = []
    for conn in conns:
        try:
            conn.close()
        except Exception as exc:  # noqa: BLE001 - close the others first
            failures.append(exc)
    if failures:
        raise failures[0]


class PsycopgStylePool(BorrowingContender):
    """A pool with `psycopg_pool.ConnectionPool`'s API, opened full (min = max = P)."""

    pool: Any = None

    @abstractmethod
    def pool_class(self) -> type[Any]:
        """The pool class; imported here, after the monkey-patch."""

    def open(self) -> None:
        """Create the pool with min = max = P and the config's connections and lifetime, and wait until it is full."""
        config = self.config
        self.pool = self.pool_class()(
            config.dsn,
            connection_class=config.connection_class,
            kwargs=dict(config.connect_kwargs),
            min_size=config.pool_size,
            max_size=config.pool_size,
            max_lifetime=config.max_lifetime,
            timeout=config.timeout,
            open=False,
            name=f"bench-{type(self).__name__}",
        )
        self.pool.open(wait=True, timeout=config.timeout)

    def close(self) -> None:
        """Close the pool, if it was created."""
        if self.pool is not None:
            self.pool.close()

    def borrow(self) -> AbstractContextManager[Any]:
        """The pool's ``connection()`` context manager."""
        return self.pool.connection()  # type: ignore[no-any-return]

    def reset_stats(self) -> None:
        """Zero the pool's counters with ``pop_stats()``, if it has one."""
        # pop_stats() returns the counters and zeroes them (psycopg_pool API).
        if self.pool is not None and hasattr(self.pool, "pop_stats"):
            self.pool.pop_stats()

    def stats(self) -> dict[str, Any] | None:
        """The pool's ``get_stats()``, or None if it was never created."""
        return dict(self.pool.get_stats()) if self.pool is not None else None


@contender("greenpool", storm=True)
class GreenpoolContender(PsycopgStylePool):
    """greenpool.ConnectionPool."""

    def pool_class(self) -> type[Any]:
        """`greenpool.ConnectionPool`."""
        from greenpool import ConnectionPool

        pool_class: type[Any] = ConnectionPool
        return pool_class


@contender("psycopg_pool", storm=True)
class PsycopgPoolContender(PsycopgStylePool):
    """psycopg_pool.ConnectionPool (its worker threads are greenlets once patched)."""

    def pool_class(self) -> type[Any]:
        """`psycopg_pool.ConnectionPool`; `RuntimeError` if it was imported before the monkey-patch."""
        import psycopg_pool

        # psycopg_pool binds threading/time objects when imported: imported
        # before the monkey-patch it would block the hub. Refuse to measure that.
        bound_sleep = getattr(sys.modules.get("psycopg_pool._acompat"), "sleep", time.sleep)
        if bound_sleep is not time.sleep:
            raise RuntimeError(
                "psycopg_pool was imported before gevent monkey-patching; "
                "run through `python -m greenpool bench` or `python -m gevent.monkey`"
            )
        pool_class: type[Any] = psycopg_pool.ConnectionPool
        return pool_class


class PeeweeContender(BorrowingContender):
    """A pooled Peewee database, used as Peewee code does: one query per borrow.

    A borrow is ``db.connection_context()``, the query
    ``db.execute_sql(sql).fetchall()``. The database takes the DSN's host,
    port, user, database (and the rest), so it goes through the storm proxy
    too; `stale_timeout` is the phase's lifetime (None when calm) and
    `timeout` `PEEWEE_TIMEOUT`, so that a saturated pool waits rather than
    raises.
    """

    db: Any = None

    @abstractmethod
    def database(self, database: str, params: dict[str, Any]) -> Any:
        """The Peewee database for `config.backend`, not connected yet."""

    @abstractmethod
    def warm(self) -> None:
        """Open `config.pool_size` connections, so the pool starts full."""

    def open(self) -> None:
        """Create the database from the backend's `peewee_params` for the DSN, then `warm()` its pool."""
        database, params = self.config.backend.peewee_params(self.config.dsn)
        self.db = self.database(database, params)
        self.warm()

    def borrow(self) -> AbstractContextManager[Any]:
        """The database's ``connection_context()`` (it yields None)."""
        return self.db.connection_context()  # type: ignore[no-any-return]

    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` with ``db.execute_sql()`` on the greenlet's connection and fetch every row; `conn` is unused."""
        # `conn` is None: connection_context() yields nothing, the database
        # knows the greenlet's connection.
        self.db.execute_sql(sql).fetchall()


@contender("peewee-greenpool", storm=True, backends=(POSTGRES, MYSQL))
class PeeweeGreenpool(PeeweeContender):
    """greenpool.peewee.PooledPostgresqlDatabase / PooledMySQLDatabase (min_connections = max_connections = P)."""

    def database(self, database: str, params: dict[str, Any]) -> Any:
        """A `greenpool.peewee` pooled database for the backend, with min_connections = max_connections = P."""
        from greenpool import peewee as gpw

        classes = {POSTGRES: gpw.PooledPostgresqlDatabase, MYSQL: gpw.PooledMySQLDatabase}
        config = self.config
        return classes[config.backend.name](
            database,
            max_connections=config.pool_size,
            stale_timeout=config.stale_timeout,
            timeout=PEEWEE_TIMEOUT,
            min_connections=config.pool_size,
            **params,
        )

    def warm(self) -> None:
        """Open the greenpool engine and wait until its P connections are ready."""
        self.db.pool.open(wait=True, timeout=self.config.timeout)

    def close(self) -> None:
        """Close every connection of the database, then its greenpool engine."""
        if self.db is not None:
            self.db.close_all()
            self.db.pool.close()

    def reset_stats(self) -> None:
        """Zero the engine's counters (``pool.pop_stats()``)."""
        if self.db is not None:
            self.db.pool.pop_stats()

    def stats(self) -> dict[str, Any] | None:
        """The engine's stats (``db.pool_stats()``), or None without a database."""
        return dict(self.db.pool_stats()) if self.db is not None else None


@contender("peewee-playhouse", storm=True, backends=(POSTGRES, MYSQL))
class PeeweePlayhouse(PeeweeContender):
    """playhouse.pool.PooledPostgresqlDatabase / PooledMySQLDatabase, Peewee's own pool (P pre-opened)."""

    def database(self, database: str, params: dict[str, Any]) -> Any:
        """A playhouse pooled database for the backend, counting its connects; psycopg 3 required on PostgreSQL."""
        config = self.config
        db = _playhouse_class(config.backend.name)(
            database,
            max_connections=config.pool_size,
            stale_timeout=config.stale_timeout,
            timeout=PEEWEE_TIMEOUT,
            **params,
        )
        if config.backend.name == POSTGRES:
            _require_psycopg3(db)
        return db

    def warm(self) -> None:
        """Check out P connections at once from P greenlets, then return them all.

        playhouse has no minimum size: each greenlet holds its connection
        until all P are open, so none is reused and P end up idle. With a
        `stale_timeout` shorter than opening P one after the other (playhouse
        connects under its lock), the oldest are closed as stale on return:
        then fewer are left, as a real playhouse pool would have.
        """
        db, size = self.db, self.config.pool_size
        all_open = gevent.event.Event()
        opened = 0

        def hold() -> None:
            nonlocal opened
            try:
                db.connect()
                opened += 1
                if opened == size:
                    all_open.set()
                all_open.wait()
            finally:
                if not db.is_closed():
                    db.close()

        _run_parallel([hold] * size)
        idle = len(getattr(db, "_connections", ()))
        if idle != size and self.config.stale_timeout is None:
            raise RuntimeError(f"pre-opened {idle} idle connections, expected {size}")

    def close(self) -> None:
        """Close every connection of the pool with playhouse's ``close_all()``."""
        if self.db is not None:
            self.db.close_all()

    def reset_stats(self) -> None:
        """Zero the database's connect counter."""
        if self.db is not None:
            self.db.bench_connects = 0

    def stats(self) -> dict[str, Any] | None:
        """``connections_num``: the connects counted since `reset_stats()` (playhouse keeps no statistics)."""
        # playhouse keeps no statistics: count the connects ourselves.
        return {"connections_num": self.db.bench_connects} if self.db is not None else None


def _require_psycopg3(db: Any) -> None:
    """Refuse a Peewee PostgreSQL database whose adapter is not psycopg 3's."""
    import peewee

    if not isinstance(db._adapter, peewee.Psycopg3Adapter):
        raise RuntimeError(f"peewee chose {type(db._adapter).__name__}, not psycopg 3")


_PLAYHOUSE_CLASSES: dict[str, type[Any]] = {}


def _playhouse_class(backend: str) -> type[Any]:
    """playhouse.pool's pooled class for `backend`, counting the connections it opens.

    The subclass only slips a counter between playhouse's pool mixin and
    Peewee's database class (its `_connect` opens a new driver connection);
    the pool code is playhouse's own.
    """
    if backend not in _PLAYHOUSE_CLASSES:
        import peewee
        from playhouse import pool

        pooled, plain = {
            POSTGRES: (pool.PooledPostgresqlDatabase, peewee.PostgresqlDatabase),
            MYSQL: (pool.PooledMySQLDatabase, peewee.MySQLDatabase),
        }[backend]

        def _connect(self: Any) -> Any:
            conn = super(counting, self)._connect()
            self.bench_connects += 1
            return conn

        counting: type[Any] = type(f"Counting{plain.__name__}", (plain,), {"_connect": _connect, "bench_connects": 0})
        # MRO: pooled, its mixin, PooledDatabase, counting, plain, Database:
        # PooledDatabase's super()._connect() reaches the counter.
        _PLAYHOUSE_CLASSES[backend] = type(f"Bench{pooled.__name__}", (pooled, counting), {})
    return _PLAYHOUSE_CLASSES[backend]


@contender("bare-pool", storm=False, backends=(POSTGRES, MYSQL))
class BarePool(BorrowingContender):
    """A featureless FIFO pool (idle list, gevent Waiter handoff): the least a pool costs."""

    # No timeout, lifetime, stats, return checks, thread safety or handshake:
    # the gap between it and `dedicated` is what any pool of P connections
    # for G greenlets costs on this machine (a parked greenlet woken per
    # query), the gap between greenpool and it what greenpool's features do.
    # Without the handshake a borrower killed while queued loses the next
    # connection returned: only a run that is failing anyway kills them.

    def open(self) -> None:
        """Open P connections at once, all idle, with no greenlet waiting yet."""
        self.conns = _connect_many(partial(self.config.backend.connect, self.config), self.config.pool_size)
        self.idle = list(self.conns)
        self.waiters: deque[Any] = deque()
        self.loop = gevent.get_hub().loop

    def close(self) -> None:
        """Close every connection opened, if any."""
        _close_all(getattr(self, "conns", ()))

    def borrow(self) -> AbstractContextManager[Any]:
        """A `_BareLease`: an idle connection, or a FIFO wait for the next one returned."""
        return _BareLease(self)


class _BareLease:
    __slots__ = ("pool", "conn")

    def __init__(self, pool: BarePool) -> None:
        self.pool = pool

    def __enter__(self) -> Any:
        pool = self.pool
        if pool.idle and not pool.waiters:
            self.conn = pool.idle.pop()
        else:
            waiter = gevent.hub.Waiter()
            pool.waiters.append(waiter)
            self.conn = waiter.get()
        return self.conn

    def __exit__(self, *exc: object) -> None:
        pool = self.pool
        if pool.waiters:
            pool.loop.run_callback(pool.waiters.popleft().switch, self.conn)
        else:
            pool.idle.append(self.conn)


@contender("dedicated", storm=False, backends=(POSTGRES, MYSQL))
class DedicatedConnections(Contender):
    """P greenlets each owning a connection, no pool: the upper bound."""

    #: What each worker owns: a driver connection here (`connect()`), opened up front.
    conns: list[Any]

    def open(self) -> None:
        """Open the P workers' connections at once, each with `connect()`."""
        self.conns = _connect_many(self.connect, self.config.pool_size)

    def connect(self) -> Any:
        """One open connection (or anything `execute()` takes and with a ``close()``)."""
        return self.config.backend.connect(self.config)

    def close(self) -> None:
        """Close every worker's connection, if any was opened."""
        _close_all(getattr(self, "conns", ()))

    def drive(self, work: Workload) -> None:
        """P workers, one per connection, pull queries from the shared budget until it is spent.

        The budget is G x queries_each, so the total matches the pools' runs.
        """
        sql, record, execute = work.sql, work.latencies.append, self.execute

        def owner(conn: Any) -> None:
            while work.take():
                start = perf_counter()
                execute(conn, sql)
                record(perf_counter() - start)

        _run_parallel([partial(owner, conn) for conn in self.conns])


@contender("peewee-dedicated", storm=False, backends=(POSTGRES, MYSQL))
class PeeweeDedicated(DedicatedConnections):
    """P greenlets each owning a connected, non-pooled Peewee database: the upper bound through Peewee."""

    def database(self) -> Any:
        """A Peewee database for one worker only, not connected yet.

        ``thread_safe=False``: one plain connection state, not one per
        greenlet (it is connected in `open()` and used by the worker
        greenlets of each run); ``autoconnect=False``: a lost connection
        fails the run rather than being reopened silently. On PostgreSQL it
        is psycopg 3 (the DSN's parameters say ``prefer_psycopg3``) and the
        adapter connects with `GeventConnection`, as `greenpool.peewee`'s does.
        """
        import peewee

        config = self.config
        database, params = config.backend.peewee_params(config.dsn)
        if config.backend.name == MYSQL:
            return peewee.MySQLDatabase(database, thread_safe=False, autoconnect=False, **params)
        from greenpool.peewee.postgres import gevent_adapter

        db = peewee.PostgresqlDatabase(database, thread_safe=False, autoconnect=False, **params)
        _require_psycopg3(db)
        db._adapter.__class__ = gevent_adapter(type(db._adapter))  # type: ignore[attr-defined]
        return db

    def connect(self) -> Any:
        """One worker's database, connected."""
        db = self.database()
        db.connect()
        return db

    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` with ``execute_sql()`` on `conn`, the worker's own database, and fetch every row."""
        # `conn` is the worker's database; no connection_context(): it keeps its connection.
        conn.execute_sql(sql).fetchall()


@contender("shared", storm=False)
class SharedConnection(BorrowingContender):
    """One connection behind a gevent lock, used by all G greenlets."""

    conn: Any = None

    def open(self) -> None:
        """Open the one connection and create the (non-FIFO) gevent lock guarding it."""
        # gevent's lock is not FIFO: a greenlet releasing it and asking again
        # without yielding gets it back. That is what naive code gets, so keep it.
        self.lock = gevent.lock.BoundedSemaphore(1)
        (self.conn,) = _connect_many(partial(self.config.backend.connect, self.config), 1)

    def close(self) -> None:
        """Close the connection, if it was opened."""
        if self.conn is not None:
            self.conn.close()

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        """Hold the lock and yield the one connection."""
        with self.lock:
            yield self.conn


# ---------------------------------------------------------------- runs


@dataclass
class RunResult:
    """Figures of one contender in one phase of one round (latencies in ms)."""

    scenario: str
    phase: str
    contender: str
    round: int
    ok: bool = False
    error: str | None = None
    traceback: str | None = None
    open_s: float | None = None
    queries: int = 0
    seconds: float = 0.0
    qps: float = math.nan
    mean_ms: float = math.nan
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    p999_ms: float = math.nan
    max_ms: float = math.nan
    pool_stats: dict[str, Any] | None = None


class RunTimedOut(Exception):
    """A contender run exceeded its time bound."""


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _record_latencies(result: RunResult, latencies: Sequence[float]) -> None:
    ordered = sorted(latencies)
    result.queries = len(ordered)
    result.qps = len(ordered) / result.seconds if result.seconds > 0 else math.nan
    if ordered:
        result.mean_ms = statistics.fmean(ordered) * 1000
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            setattr(result, f"{name}_ms", _percentile(ordered, fraction) * 1000)
        result.max_ms = ordered[-1] * 1000


def _describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def run_once(
    spec: ContenderSpec,
    scenario: Scenario,
    phase: Phase,
    round_no: int,
    config: ContenderConfig,
    time_limit: float,
) -> RunResult:
    """Open, warm up, time and close one contender; never raises (but Ctrl-C).

    The opening and warm-up are not timed. The whole run is bounded by
    `time_limit` seconds (a gevent.Timeout), closing by `CLOSE_TIMEOUT`.
    """
    result = RunResult(scenario.name, phase.name, spec.name, round_no)
    instance: Contender | None = None
    deadline = gevent.Timeout(time_limit)
    # Last resort if the hub itself is blocked: dump all stacks and exit.
    faulthandler.dump_traceback_later(time_limit + CLOSE_TIMEOUT + WATCHDOG_GRACE, exit=True)
    deadline.start()
    try:
        instance = spec.factory(config)
        started = perf_counter()
        instance.open()
        result.open_s = perf_counter() - started

        # Warm-up, untimed: the scenario's greenlets run WARMUP_QUERIES each,
        # so that each connection is past its first queries (server caches,
        # psycopg's prepared statements) and the timed part is steady state.
        warmup = Workload(scenario.sql, scenario.greenlets, WARMUP_QUERIES, None)
        warmup.start()
        instance.drive(warmup)
        instance.reset_stats()

        work = Workload(scenario.sql, scenario.greenlets, scenario.queries_each, scenario.duration)
        work.start()
        started = perf_counter()
        instance.drive(work)
        result.seconds = perf_counter() - started
        _record_latencies(result, work.latencies)
        result.pool_stats = instance.stats()
        result.ok = True
    except gevent.Timeout as exc:
        if exc is not deadline:
            result.error = _describe_error(exc)
        else:
            result.error = f"timed out after {time_limit:g} s (--timeout)"
        result.traceback = traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - a failing contender must not stop the others
        result.error = _describe_error(exc)
        result.traceback = traceback.format_exc()
    finally:
        deadline.close()
        if instance is not None:
            _close_bounded(instance, result)
        faulthandler.cancel_dump_traceback_later()
    return result


def _close_bounded(instance: Contender, result: RunResult) -> None:
    """Close `instance` within `CLOSE_TIMEOUT`; a failure there fails the run."""
    try:
        with gevent.Timeout(CLOSE_TIMEOUT, RunTimedOut(f"close took over {CLOSE_TIMEOUT:g} s")):
            instance.close()
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking
        if result.ok:
            result.ok = False
            result.error = f"closing: {_describe_error(exc)}"
            result.traceback = traceback.format_exc()
        else:
            result.error = f"{result.error}; closing also failed: {_describe_error(exc)}"


# ---------------------------------------------------------------- summaries


@dataclass
class Summary:
    """Medians over the successful rounds of one contender in one phase."""

    contender: str
    phase: str
    rounds_ok: int
    rounds: int
    qps: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    #: Connections the pool opened during the timed phase (`connections_num`).
    new_connections: float = math.nan
    errors: list[str] = field(default_factory=list)


def summarize(results: Sequence[RunResult], contender_name: str, phase: str) -> Summary:
    """Median q/s and latencies of `contender_name` in `phase` over its rounds."""
    mine = [r for r in results if r.contender == contender_name and r.phase == phase]
    good = [r for r in mine if r.ok]
    summary = Summary(contender_name, phase, len(good), len(mine))
    summary.errors = [f"round {r.round}: {r.error}" for r in mine if not r.ok]
    if good:
        summary.qps = statistics.median(r.qps for r in good)
        summary.p50_ms = statistics.median(r.p50_ms for r in good)
        summary.p99_ms = statistics.median(r.p99_ms for r in good)
        summary.max_ms = statistics.median(r.max_ms for r in good)
        opened = [r.pool_stats["connections_num"] for r in good if r.pool_stats and "connections_num" in r.pool_stats]
        if opened:
            summary.new_connections = statistics.median(opened)
    return summary


def paired_ratios(
    results: Sequence[RunResult],
    name: str,
    phase: str,
    base_name: str,
    base_phase: str,
    figure: Callable[[RunResult, RunResult], float],
) -> list[float]:
    """`figure(run, base_run)` of each round having both runs, in round order (NaNs left out)."""
    runs = {r.round: r for r in results if r.contender == name and r.phase == phase and r.ok}
    bases = {r.round: r for r in results if r.contender == base_name and r.phase == base_phase and r.ok}
    ratios = [figure(runs[n], bases[n]) for n in sorted(runs.keys() & bases.keys())]
    return [x for x in ratios if not math.isnan(x)]


def median_ratio(ratios: Sequence[float]) -> float:
    """The median of per-round ratios (`paired_ratios`); NaN if there are none.

    The machine drifts by 10-20 % between rounds (the bound's own q/s
    does), more than some of the gaps measured; the runs of one round are
    seconds apart, so a ratio within a round cancels most of the drift
    that a ratio of medians over all rounds keeps.
    """
    return statistics.median(ratios) if ratios else math.nan


def ratio_range(ratios: Sequence[float]) -> str:
    """The lowest and highest of per-round ratios as "lo-hi"; "-" with fewer than two."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-"


PAIRED_LEGEND = (
    "ratios: the median over rounds of each round's own ratio (rounds: the lowest and highest of those);"
    " q/s, latencies: medians over rounds"
)


def _qps_ratio(run: RunResult, base: RunResult) -> float:
    return _ratio(run.qps, base.qps)


def _max_ratio(run: RunResult, base: RunResult) -> float:
    return _ratio(run.max_ms, base.max_ms)


def _fmt(value: float, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text table: first column left-aligned, the others right-aligned.

    A row with a single cell (an error) spans the rest of the line.
    """
    widths = [len(h) for h in headers]
    widths[0] = max([widths[0], *(len(row[0]) for row in rows)])
    for row in rows:
        if len(row) == len(headers):
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=False)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _row_note(summary: Summary) -> str:
    if summary.rounds_ok == summary.rounds:
        return ""
    return f"{summary.rounds_ok}/{summary.rounds} rounds ok"


@dataclass(frozen=True)
class Bound:
    """A no-pool upper bound the fixed-work report compares contenders with."""

    #: The bound's contender.
    contender: str
    #: What the report calls the FIFO ideal derived from its median latency.
    ideal: str
    #: The contenders compared with it: those whose name starts with this.
    prefix: str = ""

    def covers(self, name: str) -> bool:
        """Whether `name`'s row is compared with this bound."""
        return name.startswith(self.prefix)

    def describe(self) -> str:
        """One line for --list."""
        who = "every contender" if not self.prefix else f"the {self.prefix}* contenders"
        return f"{who}: q/s vs {self.contender}, p99 vs {self.ideal} (G/P x {self.contender} median latency)"


#: The upper bounds of the fixed-work report, in column order: the raw driver,
#: and Peewee without a pool (so that Peewee's own per-query CPU is not
#: counted against the Peewee pools).
BOUNDS: tuple[Bound, ...] = (
    Bound("dedicated", "FIFO ideal"),
    Bound("peewee-dedicated", "peewee FIFO ideal", prefix="peewee-"),
)


def report_fixed(
    scenario: Scenario,
    results: Sequence[RunResult],
    names: Sequence[str],
    skipped: Mapping[str, str] | None = None,
) -> str:
    """Table of a fixed-work scenario, relative to each of `BOUNDS` and its FIFO ideal.

    A bound's columns are filled for the rows it covers ("-" for the others):
    q/s relative to the bound's (1.00x for the bound itself), and p99
    relative to its FIFO ideal, G/P x the bound's median latency (a fair FIFO
    pool makes each query wait for G/P queries ahead of it; "-" for the
    bounds, which never wait). Each ratio is the median of the ratios
    within each round (`paired_ratios`, `median_ratio`), with their range
    against the first bound; the absolute figures are medians. Each bound
    covering a row gets a line under the table giving its ideal. Contenders
    in `skipped` (name -> why) get a "not run" row.
    """
    skipped = skipped or {}
    summaries = {name: summarize(results, name, "run") for name in names}
    bound_names = {b.contender for b in BOUNDS}
    fifo_wait = scenario.greenlets / scenario.pool_size
    headers = [
        "contender",
        "q/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        *(f"q/s vs {b.contender}" for b in BOUNDS),
        f"rounds vs {BOUNDS[0].contender}",
        *(f"p99 vs {b.ideal}" for b in BOUNDS),
        "",
    ]

    def over_ideal(run: RunResult, base: RunResult) -> float:
        return _ratio(run.p99_ms, fifo_wait * base.p50_ms)

    rows = []
    for name, s in summaries.items():
        if name in skipped:
            rows.append([name, f"not run: {skipped[name]}"])
            continue
        if s.rounds_ok == 0:
            rows.append([name, f"ERROR {s.errors[0] if s.errors else ''}"])
            continue
        vs_qps = [
            _fmt(median_ratio(paired_ratios(results, name, "run", b.contender, "run", _qps_ratio)), ".2f", "x")
            if b.covers(name)
            else "-"
            for b in BOUNDS
        ]
        vs_ideal = [
            _fmt(median_ratio(paired_ratios(results, name, "run", b.contender, "run", over_ideal)), ".2f", "x")
            if b.covers(name) and name not in bound_names
            else "-"
            for b in BOUNDS
        ]
        rows.append(
            [
                name,
                _fmt(s.qps, ".0f"),
                _fmt(s.p50_ms, ".2f"),
                _fmt(s.p99_ms, ".2f"),
                _fmt(s.max_ms, ".2f"),
                *vs_qps,
                ratio_range(paired_ratios(results, name, "run", BOUNDS[0].contender, "run", _qps_ratio))
                if name != BOUNDS[0].contender
                else "-",
                *vs_ideal,
                _row_note(s),
            ]
        )
    lines = [_table(headers, rows)]
    for bound in BOUNDS:
        if not any(bound.covers(name) for name in names):
            continue
        base = summaries.get(bound.contender)
        if base is None or math.isnan(base.p50_ms):
            lines.append(f"{bound.ideal} p99: unknown (needs a successful `{bound.contender}` run)")
        else:
            lines.append(
                f"{bound.ideal} p99 = G/P x {bound.contender} median latency = {scenario.greenlets}/"
                f"{scenario.pool_size} x {base.p50_ms:.2f} ms = {fifo_wait * base.p50_ms:.1f} ms"
            )
    lines.append(PAIRED_LEGEND)
    lines += _error_lines(summaries.values())
    return "\n".join(lines)


def report_storm(
    scenario: Scenario,
    results: Sequence[RunResult],
    names: Sequence[str],
    skipped: Mapping[str, str] | None = None,
) -> str:
    """Table of a storm scenario: each pool's storm figures relative to its calm ones.

    Contenders in `skipped` (name -> why) get a "not run" row.
    """
    skipped = skipped or {}
    headers = [
        "contender",
        "calm q/s",
        "storm q/s",
        "storm/calm q/s",
        "rounds",
        "calm p99 ms",
        "storm p99 ms",
        "calm max ms",
        "storm max ms",
        "storm/calm max",
        "storm new conns",
        "",
    ]
    rows = []
    all_summaries: list[Summary] = []
    for name in names:
        if name in skipped:
            rows.append([name, f"not run: {skipped[name]}"])
            continue
        calm = summarize(results, name, "calm")
        storm = summarize(results, name, "storm")
        all_summaries += [calm, storm]
        if calm.rounds_ok == 0 and storm.rounds_ok == 0:
            rows.append([name, f"ERROR {(calm.errors or storm.errors or [''])[0]}"])
            continue
        notes = [f"{p}: {_row_note(s)}" for p, s in (("calm", calm), ("storm", storm)) if _row_note(s)]
        qps_ratios = paired_ratios(results, name, "storm", name, "calm", _qps_ratio)
        rows.append(
            [
                name,
                _fmt(calm.qps, ".0f"),
                _fmt(storm.qps, ".0f"),
                _fmt(median_ratio(qps_ratios), ".2f"),
                ratio_range(qps_ratios),
                _fmt(calm.p99_ms, ".1f"),
                _fmt(storm.p99_ms, ".1f"),
                _fmt(calm.max_ms, ".1f"),
                _fmt(storm.max_ms, ".1f"),
                _fmt(median_ratio(paired_ratios(results, name, "storm", name, "calm", _max_ratio)), ".2f", "x"),
                _fmt(storm.new_connections, ".0f"),
                "; ".join(notes),
            ]
        )
    legend = "storm new conns: connections the pool opened during the timed storm phase (from get_stats())"
    return "\n".join([_table(headers, rows), legend, PAIRED_LEGEND, *_error_lines(all_summaries)])


def _error_lines(summaries: Iterable[Summary]) -> list[str]:
    lines: list[str] = []
    for s in summaries:
        phase = "" if s.phase == "run" else f" ({s.phase})"
        for error in s.errors:
            line = f"  {s.contender}{phase} failed, {error}"
            if line not in lines:  # e.g. one proxy failure seen by every run
                lines.append(line)
    return lines


def summaries_for_json(scenario: Scenario, results: Sequence[RunResult], names: Sequence[str]) -> list[dict[str, Any]]:
    """Median figures of every contender and phase, as plain dicts."""
    return [asdict(summarize(results, name, phase.name)) for name in names for phase in scenario.phases]


# ---------------------------------------------------------------- environment


@dataclass(frozen=True)
class Server:
    """A database server the benchmark runs against."""

    backend: Backend
    dsn: str
    #: Where `dsn` came from (--dsn, $GREENPOOL_DSN, ...), for the report.
    source: str
    #: `Backend.server_info()`.
    info: dict[str, Any]

    def describe(self) -> str:
        """One line for the report."""
        info = self.info
        return (
            f"{self.backend.title} {info['version']} at {self.backend.masked(self.dsn)} ({self.source});"
            f" max_connections {info['max_connections']},"
            f" {info['client_connections']} client connections open"
        )


@dataclass(frozen=True)
class Environment:
    """What every run shares: servers (by backend name), connection class, limits."""

    servers: Mapping[str, Server]
    connection_class: type[Any]
    connection_class_name: str
    run_timeout: float


def resolve_dsn(explicit: str | None) -> tuple[str, str]:
    """The DSN to use and where it came from: --dsn, $GREENPOOL_DSN or embedded."""
    if explicit:
        return explicit, "--dsn"
    if os.environ.get(DSN_ENV):
        return os.environ[DSN_ENV], f"${DSN_ENV}"
    from greenpool.testing.embedded import resolve_dsn as embedded_dsn

    return embedded_dsn(None, DSN_ENV), "embedded throw-away pgserver"


def resolve_mysql(explicit: str | None) -> tuple[str, str, bool]:
    """The MySQL URL to use, where it came from, and whether it was asked for.

    --mysql, else $GREENPOOL_MYSQL, else the `MYSQL_DEFAULT_URL` probe.
    """
    if explicit:
        return explicit, "--mysql", True
    if os.environ.get(MYSQL_ENV):
        return os.environ[MYSQL_ENV], f"${MYSQL_ENV}", True
    return MYSQL_DEFAULT_URL, "default", False


def connect_mysql(explicit: str | None) -> Server | None:
    """The MySQL server, or None (with a note printed) if none answers at the default URL.

    No server at the default URL never fails the run: its scenarios are
    skipped. A URL given (--mysql, $GREENPOOL_MYSQL) that doesn't work
    ends the run with its error: a mistyped one must not pass for a run.
    """
    url, source, asked = resolve_mysql(explicit)
    backend = BACKENDS[MYSQL]
    try:
        info = backend.server_info(url)
    except Exception as exc:  # noqa: BLE001 - skip the MySQL scenarios, run the rest
        if asked:
            raise SystemExit(f"no MySQL server at {backend.masked(url)} ({source}): {_describe_error(exc)}") from None
        print(f"MySQL scenarios skipped: no server (set {MYSQL_ENV})", flush=True)
        return None
    return Server(backend, url, source, info)


def resolve_connection_class() -> tuple[type[Any], str]:
    """greenpool's gevent-aware connection class if importable, else psycopg's."""
    try:
        from greenpool.pg import GeventConnection
    except Exception as exc:  # noqa: BLE001 - any import problem means: fall back
        import psycopg

        return psycopg.Connection, (
            f"psycopg.Connection (greenpool.GeventConnection unavailable: {_describe_error(exc)})"
        )
    return GeventConnection, "greenpool.GeventConnection"


def _masked(dsn: str) -> str:
    """The DSN without its password, for printing and JSON."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - never fail on printing
        return "(unparsable DSN)"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def _tcp_target(dsn: str) -> tuple[str, int]:
    """Host and port of the server, for the storm proxy (TCP only)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST") or "")
    if not host or host.startswith("/") or "," in host:
        raise ValueError(f"storm needs a single TCP host in the DSN, got host={host!r}")
    port = int(str(params.get("port") or os.environ.get("PGPORT") or 5432))
    return host, port


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("gevent", "psycopg", "psycopg-binary", "psycopg-pool", "peewee", "pymysql"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


# ---------------------------------------------------------------- driver


def run_scenario(scenario: Scenario, names: Sequence[str], rounds: int, env: Environment) -> list[RunResult]:
    """All rounds of one scenario; contenders (and phases) alternate between rounds."""
    proxy = None
    server = env.servers[scenario.backend]
    backend, dsn = server.backend, server.dsn
    results: list[RunResult] = []
    if scenario.is_storm:
        try:
            from greenpool.testing.proxy import Proxy

            host, port = backend.tcp_target(server.dsn)
            proxy = Proxy(host, port, connect_delay=scenario.connect_delay)
            proxy.start()
            dsn = backend.via_proxy(server.dsn, proxy.host, proxy.port)
        except Exception as exc:  # noqa: BLE001 - the other scenarios still run
            if proxy is not None:
                proxy.stop()
            error = f"proxy: {_describe_error(exc)}"
            print(f"  {error}", flush=True)
            return [
                RunResult(
                    scenario.name,
                    phase.name,
                    name,
                    1,
                    error=error,
                    traceback=traceback.format_exc(),
                )
                for name in names
                for phase in scenario.phases
            ]
    try:
        for round_no in range(1, rounds + 1):
            # Rotate the order so no contender always runs first (cold caches,
            # load from the previous run) or always last.
            shift = (round_no - 1) % len(names)
            order = [*names[shift:], *names[:shift]]
            phases = scenario.phases if round_no % 2 else scenario.phases[::-1]
            for name in order:
                for phase in phases:
                    config = ContenderConfig(
                        dsn=dsn,
                        pool_size=scenario.pool_size,
                        max_lifetime=phase.max_lifetime,
                        connection_class=env.connection_class,
                        connect_kwargs=CONNECT_KWARGS,
                        timeout=POOL_TIMEOUT,
                        backend=backend,
                    )
                    limit = env.run_timeout + (scenario.duration or 0.0)
                    result = run_once(CONTENDERS[name], scenario, phase, round_no, config, limit)
                    results.append(result)
                    _print_progress(result, rounds)
    finally:
        if proxy is not None:
            proxy.stop()
    return results


def _print_progress(result: RunResult, rounds: int) -> None:
    phase = "" if result.phase == "run" else f" {result.phase}"
    head = f"  round {result.round}/{rounds} {result.contender}{phase}:"
    if result.ok:
        print(
            f"{head} {result.qps:.0f} q/s, p50 {result.p50_ms:.2f} p99 {result.p99_ms:.2f}"
            f" max {result.max_ms:.2f} ms ({result.queries} queries in {result.seconds:.2f} s,"
            f" open {result.open_s:.2f} s)",
            flush=True,
        )
    else:
        print(f"{head} FAILED {result.error}", flush=True)


def _selected(requested: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    if not requested:
        return list(known)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    # Keep the registry order, drop duplicates.
    return [name for name in known if name in requested]


def _write_json(path: str, document: dict[str, Any]) -> None:
    # NaN is not JSON: write null instead.
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(clean(document), out, indent=2, default=str)
        out.write("\n")
    os.replace(tmp, path)


def print_catalogue(quick: bool) -> None:
    """Print the scenarios (full or --quick sizes), the registered contenders and the report's bounds."""
    print("scenarios:")
    for name, sizes in SCENARIOS.items():
        scenario = sizes[1 if quick else 0]
        print(f"  {name:<16} {scenario.describe()} [{BACKENDS[scenario.backend].title}]")
        for skipped, reason in scenario.skip:
            print(f"  {'':<16} without {skipped}: {reason}")
    print("contenders:")
    for spec in CONTENDERS.values():
        print(f"  {spec.name:<16} {spec.label()}")
    print("upper bounds (fixed-work reports):")
    for bound in BOUNDS:
        print(f"  {bound.contender:<16} {bound.describe()}")


def plan(
    scenario: Scenario, contender_names: Sequence[str], requested: Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    """The contenders that run in `scenario`, and those it leaves out on purpose (with why).

    A contender not supporting the scenario's backend (or not a storm
    contender in a storm) is simply not part of it. One the scenario skips
    still runs when --contender names it.
    """
    skip = dict(scenario.skip)
    names: list[str] = []
    skipped: dict[str, str] = {}
    for name in contender_names:
        if not CONTENDERS[name].takes_part(scenario):
            continue
        if name in skip and name not in (requested or ()):
            skipped[name] = skip[name]
        else:
            names.append(name)
    return names, skipped


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by the ``bench`` CLI options; exit status.

    The status is 1 if any contender run failed, so a smoke run can gate CI.
    A missing MySQL server is not a failure: its scenarios are skipped.
    """
    if not monkey.is_module_patched("socket"):
        # Called from Python rather than the CLI: patch now, late but needed.
        monkey.patch_all()
    if getattr(args, "list", False):
        print_catalogue(quick=args.quick)
        return 0
    scenario_names = _selected(args.scenario, list(SCENARIOS), "scenario")
    contender_names = _selected(args.contender, list(CONTENDERS), "contender")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise SystemExit(f"--timeout must be a number of seconds > 0, got {args.timeout!r}")
    if args.json:
        try:
            open(args.json, "a").close()  # now, not after the first scenario's minutes
        except OSError as exc:
            raise SystemExit(f"--json: can't write {args.json}: {exc.strerror or exc}") from None
    size = 1 if args.quick else 0
    backends_needed = {SCENARIOS[name][size].backend for name in scenario_names}

    load_start = _load()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} ({os.cpu_count()} CPUs)")
    versions = _versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))

    conn_class, conn_class_name = resolve_connection_class()
    servers: dict[str, Server] = {}
    if POSTGRES in backends_needed:
        dsn, dsn_source = resolve_dsn(args.dsn)
        try:
            info = BACKENDS[POSTGRES].server_info(dsn, conn_class)
        except Exception as exc:  # noqa: BLE001 - a bad --dsn: one line, not a traceback
            raise SystemExit(f"no PostgreSQL at {_masked(dsn)} ({dsn_source}): {_describe_error(exc)}") from None
        servers[POSTGRES] = Server(BACKENDS[POSTGRES], dsn, dsn_source, info)
        print(f"server: {servers[POSTGRES].describe()}")
    if MYSQL in backends_needed:
        mysql = connect_mysql(getattr(args, "mysql", None))
        if mysql is not None:
            servers[MYSQL] = mysql
            print(f"server: {mysql.describe()}")
    env = Environment(servers, conn_class, conn_class_name, args.timeout)
    if POSTGRES in servers:
        import psycopg.waiting

        wait_name = getattr(psycopg.waiting.wait, "__name__", repr(psycopg.waiting.wait))
        print(
            f"PostgreSQL connection class: {conn_class_name}"
            " (all contenders but peewee-playhouse, which connects with psycopg.connect)"
        )
        print(
            f"psycopg default wait function: {wait_name}"
            " (peewee-playhouse's psycopg.Connection; unused by gevent-aware classes)"
        )
    print(f"rounds: {rounds}{' (quick)' if args.quick else ''}; contenders:")
    for name in contender_names:
        print(f"  {name:<16} {CONTENDERS[name].label()}")

    postgres = servers.get(POSTGRES)
    mysql = servers.get(MYSQL)
    document: dict[str, Any] = {
        "meta": {
            "argv": sys.argv,
            "quick": args.quick,
            "rounds": rounds,
            "dsn": _masked(postgres.dsn) if postgres else None,
            "dsn_source": postgres.source if postgres else None,
            "server": postgres.info if postgres else None,
            "mysql_url": mysql.backend.masked(mysql.dsn) if mysql else None,
            "mysql_source": mysql.source if mysql else None,
            "mysql_server": mysql.info if mysql else None,
            "connection_class": conn_class_name,
            "versions": versions,
            "cpus": os.cpu_count(),
            "load_start": load_start,
        },
        "scenarios": {},
    }
    failed = False
    for scenario_name in scenario_names:
        scenario = SCENARIOS[scenario_name][size]
        server = servers.get(scenario.backend)
        if server is None:
            document["scenarios"][scenario.name] = {"scenario": asdict(scenario), "skipped": "no server"}
            continue  # its skip was announced with the server
        names, skipped = plan(scenario, contender_names, args.contender)
        print(f"\n== {scenario.name}: {scenario.describe()}", flush=True)
        for name, reason in skipped.items():
            print(f"  {name}: not run ({reason}; --contender {name} runs it)")
        if not names:
            print("  (no selected contender takes part)")
            continue
        info = server.info
        if scenario.is_storm and scenario.pool_size + info["client_connections"] >= info["max_connections"]:
            print(
                f"  warning: P={scenario.pool_size} plus {info['client_connections']} open connections"
                f" is at or over max_connections={info['max_connections']}: replacements may be refused"
            )
        results = run_scenario(scenario, names, rounds, env)
        failed |= any(not r.ok for r in results)
        report = report_storm if scenario.is_storm else report_fixed
        print()
        shown = [name for name in contender_names if name in names or name in skipped]
        print(report(scenario, results, shown, skipped), flush=True)
        document["scenarios"][scenario.name] = {
            "scenario": asdict(scenario),
            "backend": scenario.backend,
            "contenders": names,
            "skipped": skipped,
            "runs": [asdict(r) for r in results],
            "medians": summaries_for_json(scenario, results, names),
        }
        if args.json:
            _write_json(args.json, document)  # after each scenario: keep partial results

    load_end = _load()
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    document["meta"]["load_end"] = load_end
    if args.json:
        _write_json(args.json, document)
        print(f"figures written to {args.json}")
    return 1 if failed else 0
