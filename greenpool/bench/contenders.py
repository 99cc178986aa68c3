"""The contenders: ways of giving greenlets database access, and their registry `CONTENDERS`.

Contenders (in table order), with the backends they run on:

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

Adding a contender is one class::

    @contender("mypool", storm=True, backends=("postgres",))
    class MyPool(BorrowingContender):
        '''One line shown by --list and in the report header.'''
        def open(self) -> None: ...      # connect config.pool_size connections
        def borrow(self): ...            # context manager yielding a connection
        def close(self) -> None: ...
        # optionally: execute(conn, sql) for another API, reset_stats(), stats()

psycopg, psycopg_pool, peewee and pymysql are imported inside the methods,
after the monkey-patch.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gevent
import gevent.event
import gevent.hub
import gevent.lock

from .backends import BACKENDS, MYSQL, POSTGRES, Backend, PostgresBackend
from .scenarios import CALM_LIFETIME, CELERY_CONTENDERS, SCALEOUT_CONTENDERS, Scenario
from .workload import Workload, perf_counter, run_parallel

#: Peewee pools' `timeout`: generous, so that they wait rather than raise.
PEEWEE_TIMEOUT = 60.0


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

        run_parallel([client] * work.greenlets)


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
        """Whether it runs in `scenario` (its backend; storms only if `storm`; scale-outs and Celery: their own)."""
        if scenario.is_scaleout and self.name not in SCALEOUT_CONTENDERS:
            return False
        if scenario.is_celery and self.name not in CELERY_CONTENDERS:
            return False
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
        run_parallel([one] * count)
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

        run_parallel([hold] * size)
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

        run_parallel([partial(owner, conn) for conn in self.conns])


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
