"""Peewee: pooled databases on the greenpool engine, drop-ins for `playhouse.pool`.

`class MyDB(PooledDatabase, PostgresqlDatabase)` works as with peewee's
mixin, and the ready classes keep playhouse's names. Differences that matter:

- Each greenlet (or thread) has its own connection state, whatever the import
  order: peewee's `threading.local` state, bound before `monkey.patch_all()`,
  would make every greenlet share one connection.
- No lock is held around connecting, probing, rolling back or closing;
  connects happen in the background and waiters are served first come,
  first served.
- `stale_timeout` is a randomized lifetime and stale connections are replaced
  before they expire, never closed inline by an unlucky checkout.
- A connection is probed (`SELECT 1` / `ping`) at checkout only when idle for
  `check_idle` seconds or more, outside any lock.
- A greenlet that ends holding a connection gives it back (rolled back, or
  its query cancelled on the server).
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import peewee
from playhouse.pool import MaxConnectionsExceeded

from . import errors
from ._compat import getcurrent
from .engine import BROKEN, DIRTY, OK, Pool, Slot, _check_count

logger = logging.getLogger("greenpool.peewee")

__all__ = [
    "MaxConnectionsExceeded",
    "PooledDatabase",
    "PooledMySQLDatabase",
    "PooledPostgresqlDatabase",
    "PooledPostgresqlExtDatabase",
    "PooledPsycopg3Database",
    "PooledSqliteDatabase",
]

_UNLIMITED = 2**31 - 1

#: Seconds a request waits for a new connection: `timeout` only bounds the
#: wait for one in use by someone else (None: no wait), as in playhouse.
CONNECT_WAIT = 30.0


def _number(name: str, value: Any) -> float | None:
    """Peewee accepts numbers as strings (they come from URLs): parse them."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {value!r}")
    if value < 0 or value != value:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _own_copy(error: Exception) -> Exception:
    """A new `error` for one caller to raise (`error` itself if it can't be copied).

    The pool's last connect error is every failing caller's while the
    database is down: raising that one object in each greenlet would chain
    all their frames onto its one traceback, and keep them alive.
    """
    try:
        return copy.copy(error)
    except Exception:
        return error


class _ConnectionState(peewee._ConnectionState):
    """Peewee's connection state, one per database and greenlet (or thread)."""


def _past_mixin(cls: type) -> tuple[type, ...]:
    """The classes after `PooledDatabase` in `cls`'s method resolution order."""
    mro = cls.__mro__
    return mro[mro.index(PooledDatabase) + 1 :]


@functools.cache
def _lean_paths(cls: type) -> bool:
    """Whether `cls` may take the short paths (see `PooledDatabase.connect`)."""
    reads_state = ("is_closed", "in_transaction")
    bypassed = ("connect", "close")
    overridden = any(getattr(cls, name) is not getattr(peewee.Database, name) for name in reads_state)
    shadowed = any(name in vars(base) for base in _past_mixin(cls) if base is not peewee.Database for name in bypassed)
    return not (overridden or shadowed)


def _inherits(cls: type, name: str, owner: type) -> bool:
    """Whether `cls`'s method `name` past the mixin is `owner`'s own."""
    found = next(vars(base)[name] for base in _past_mixin(cls) if name in vars(base))
    return found is vars(owner)[name]


@functools.cache
def _plain_cursor(cls: type) -> bool:
    """Whether `cls`'s `cursor()` past the mixin is peewee's own (see `PooledDatabase.cursor`)."""
    return _inherits(cls, "cursor", peewee.Database)


@functools.cache
def _plain_mysql_connect(cls: type) -> bool:
    """Whether `cls` connects with `MySQLDatabase._connect()` itself (see `_MySQLBackend.connect`)."""
    return _inherits(cls, "_connect", peewee.MySQLDatabase)


#: Peewee's translation of driver errors into its own (a dunder name mypy won't see).
_EXCEPTION_WRAPPER: Any = vars(peewee)["__exception_wrapper__"]


def _reraise_as_peewee() -> NoReturn:
    """Re-raise the exception being handled as peewee translates driver errors.

    `with __exception_wrapper__:` costs two calls even when nothing is
    raised; called from an `except` block, this costs them only then.
    """
    with _EXCEPTION_WRAPPER:
        raise  # noqa: PLE0704 - re-raises the exception being handled


#: Distinguishes successive state sets of one database (see `PooledDatabase._state`).
_state_generations = itertools.count()


class _ConnectionContext(peewee.ConnectionContext):
    """`db.connection_context()`: peewee's, looking the greenlet's state up once each way."""

    __slots__ = ()

    def __enter__(self) -> None:
        db = self.db
        if not db._lean:
            super().__enter__()
            return
        state = db._state  # `connect()` fills this same object in
        if state.closed:
            db.connect()
        state.ctx.append(self)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        db = self.db
        if not db._lean:
            super().__exit__(exc_type, exc_val, exc_tb)
            return
        ctx = db._state.ctx
        ctx.pop()
        if not ctx:
            db.close()


class _DatabasePool(Pool[Any]):
    """The engine, its hooks calling one peewee database's."""

    # playhouse connects in the caller: a connect's error is a request's.
    _connect_error_fails_a_request = True

    def __init__(self, db: PooledDatabase, **kwargs: Any) -> None:
        self._db = db
        super().__init__(check=self._probe, **kwargs)

    def _open_connection(self) -> Any:
        return self._db._connect_raw()

    def _close_connection(self, conn: Any) -> None:
        self._db._close_raw(conn)

    def _status(self, conn: Any) -> int:
        return self._db._conn_status(conn)

    def _clean(self, conn: Any) -> None:
        if not self._db._can_reuse(conn):
            raise errors.PoolError("connection can't be reused")

    def _ping(self, conn: Any) -> None:
        self._probe(conn)

    def _probe(self, conn: Any) -> None:
        if self._db._is_closed(conn):
            raise errors.PoolError("connection is closed")


class PooledDatabase:
    """Mixin making a peewee `Database` class pooled, like `playhouse.pool`'s.

    `max_connections` (None or 0: unlimited), `stale_timeout` (seconds, the
    most a connection lives, randomized by `lifetime_jitter`; None: forever)
    and `timeout` (None: fail at once when every connection is in use; 0:
    wait forever; > 0: wait that long) mean what they mean in peewee and
    accept strings. The engine's options come as keyword-only arguments.
    """

    def __init__(
        self,
        database: Any,
        max_connections: int | str | None = 20,
        stale_timeout: float | str | None = None,
        timeout: float | str | None = None,
        *,
        min_connections: int = 0,
        lifetime_jitter: float = 0.1,
        max_idle: float | None = None,
        check_idle: float = 0.5,
        segments: int = 4,
        num_workers: int = 3,
        leak_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        _check_count("min_connections", min_connections, 0)
        max_size = self._max_size(max_connections, min_connections)
        self._pool = _DatabasePool(
            self,
            min_size=min_connections,
            max_size=max_size,
            timeout=CONNECT_WAIT,
            max_lifetime=self._lifetime(stale_timeout),
            lifetime_jitter=lifetime_jitter,
            max_idle=math.inf if max_idle is None else max_idle,  # None: never, as playhouse
            check_idle=check_idle,
            segments=segments,
            num_workers=num_workers,
            leak_threshold=leak_threshold,
            name=f"{type(self).__name__}-{id(self):x}",
        )
        self._wait_timeout = self._wait(timeout)
        # id(connection) -> (its slot, the greenlet or thread holding it).
        self._lent: dict[int, tuple[Slot[Any], Any]] = {}
        self._link_key = f"_greenpool_linked_{id(self):x}"
        self._lean = _lean_paths(type(self))  # type: ignore[arg-type]
        self._lean_cursor = self._lean and _plain_cursor(type(self))  # type: ignore[arg-type]
        self._backend = _backend_for(self)
        self._pool._hub_bound_connections = self._backend.hub_bound
        super().__init__(database, **kwargs)  # type: ignore[call-arg]
        if self.thread_safe:  # type: ignore[attr-defined]
            # Greenlet-local state makes peewee's database lock pointless; a
            # real lock taken before patch_all() would freeze the hub.
            self._lock = peewee._NoopLock()

    # -- connection state --------------------------------------------------

    _state_key: str | None = None
    _shared_state: Any = None

    @property
    def _state(self) -> Any:
        """Peewee's connection state of the calling greenlet (or thread).

        With `thread_safe` (peewee's default) each greenlet has its own,
        whatever the import order: kept in the greenlet's `__dict__`, it goes
        with the greenlet. Peewee's `threading.local`, bound before
        `monkey.patch_all()`, would make every greenlet share one connection;
        a `gevent.local` costs a few thousand instructions per attribute
        access with hundreds of greenlets about, and peewee makes ~20 per query.
        """
        key = self._state_key
        if key is None:
            return self._shared_state
        owner = getcurrent().__dict__
        try:
            return owner[key]
        except KeyError:
            state = owner[key] = _ConnectionState()
            return state

    @_state.setter
    def _state(self, state: Any) -> None:
        # Peewee sets it in __init__: a thread-local if `thread_safe`, else
        # one state shared by all.
        if self.thread_safe:  # type: ignore[attr-defined]
            # A new key: every greenlet starts afresh, as with a new thread-local.
            self._state_key = f"_greenpool_state_{id(self):x}_{next(_state_generations)}"
        else:
            self._state_key = None
            self._shared_state = state

    @staticmethod
    def _max_size(max_connections: Any, min_connections: int) -> int:
        value = _number("max_connections", max_connections)
        if not value or value == math.inf:
            return max(_UNLIMITED, min_connections)
        if value != int(value):
            raise ValueError(f"max_connections must be a whole number, got {max_connections!r}")
        if value < min_connections:
            raise ValueError(f"max_connections ({max_connections!r}) must be >= min_connections ({min_connections})")
        return int(value)

    @staticmethod
    def _lifetime(stale_timeout: Any) -> float:
        value = _number("stale_timeout", stale_timeout)
        return value or math.inf  # None or 0: no limit, as in playhouse

    @staticmethod
    def _wait(timeout: Any) -> float | None:
        value = _number("timeout", timeout)
        if value is None:
            return None
        return math.inf if value == 0 else float(value)  # a float: the engine checks others

    def init(
        self,
        database: Any,
        max_connections: int | str | None = None,
        stale_timeout: float | str | None = None,
        timeout: float | str | None = None,
        **connect_kwargs: Any,
    ) -> None:
        """Reconfigure the database; pool options given here replace the old ones.

        If it names another database or passes connect parameters (they may
        be the database class's own, like `encoding` or `pragmas`), the pooled
        connections are replaced: idle ones now, lent ones when they come
        back. playhouse keeps lending the old ones.
        """
        # Checked before anything changes: bad input leaves the database as it was.
        pool = self._pool
        max_size = None if max_connections is None else self._max_size(max_connections, pool.min_size)
        lifetime = None if stale_timeout is None else self._lifetime(stale_timeout)
        wait = None if timeout is None else self._wait(timeout)
        # Peewee's __init__ calls init() too, before `database` exists.
        replace = bool(connect_kwargs) or database != getattr(self, "database", database)
        self._backend.configure(connect_kwargs)
        try:
            super().init(database, **connect_kwargs)  # type: ignore[misc]
        finally:
            # Also if it raised (an open transaction): peewee may have made
            # its own adapter by then.
            self._backend.adopt(self)
        if replace:
            pool.drain()
        if max_size is not None:
            pool.resize(pool.min_size, max_size)
        if lifetime is not None:
            pool.set_max_lifetime(lifetime)
        if wait is not None:
            self._wait_timeout = wait

    @property
    def pool(self) -> Pool[Any]:
        """The greenpool engine behind this database (stats, sizes)."""
        return self._pool

    def pool_stats(self) -> dict[str, int]:
        """The engine's `get_stats()`: psycopg_pool's keys plus wait percentiles."""
        return self._pool.get_stats()

    # -- peewee's connection API ----------------------------------------
    #
    # Peewee's own `connect()`, `close()`, `cursor()` and
    # `connection_context()`, with the same checks, errors and results, minus
    # the database lock (a no-op here) and with the greenlet's state looked up
    # once, not two to four times. They read the state where peewee calls
    # `is_closed()` and `in_transaction()`, so a class that overrides one of
    # those, or puts its own `connect()`/`close()`/`cursor()` between this
    # mixin and peewee's, gets peewee's.

    def connect(self, reuse_if_open: bool = False) -> bool:
        """Take a pooled connection for the calling greenlet (peewee's semantics)."""
        if not self._lean:
            return super().connect(reuse_if_open)  # type: ignore[misc, no-any-return]
        if self.deferred:  # type: ignore[attr-defined]
            raise peewee.InterfaceError("Error, database must be initialized before opening a connection.")
        state = self._state
        if not state.closed:
            if reuse_if_open:
                return False
            raise peewee.OperationalError("Connection already opened.")
        try:
            conn = self._connect()
        except BaseException:
            state.reset()
            _reraise_as_peewee()
        # Sets every field `reset()` would: no reset before it.
        state.set_connection(conn)
        try:
            if self.server_version is None:  # type: ignore[attr-defined]
                self._set_server_version(conn)  # type: ignore[attr-defined]
            self._initialize_connection(conn)  # type: ignore[attr-defined]
        except BaseException:
            _reraise_as_peewee()
        return True

    def close(self) -> bool:
        """Give the calling greenlet's connection back (peewee's semantics)."""
        if not self._lean:
            return super().close()  # type: ignore[misc, no-any-return]
        if self.deferred:  # type: ignore[attr-defined]
            raise peewee.InterfaceError("Error, database must be initialized before opening a connection.")
        state = self._state
        if state.transactions:
            raise peewee.OperationalError("Attempting to close database while transaction is open.")
        is_open = not state.closed
        try:
            if is_open:
                self._close(state.conn)
        except BaseException:
            _reraise_as_peewee()
        finally:
            state.reset()
        return is_open

    def cursor(self, named_cursor: Any = None) -> Any:
        """A cursor on the calling greenlet's connection, connecting first if allowed (peewee's)."""
        if not self._lean_cursor:  # e.g. PostgresqlExtDatabase's, with named cursors
            return super().cursor(named_cursor)  # type: ignore[misc]
        state = self._state  # one lookup, where peewee's makes two
        if state.closed:
            if not self.autoconnect:  # type: ignore[attr-defined]
                raise peewee.InterfaceError("Error, database connection not opened.")
            self.connect()
        return state.conn.cursor()

    def connection_context(self) -> _ConnectionContext:
        """Context manager (and decorator) holding a connection, as peewee's."""
        return _ConnectionContext(self)

    # -- peewee's connection hooks --------------------------------------

    def _connect(self) -> Any:
        pool = self._pool
        if pool.closed:
            pool.open()
        wait = self._wait_timeout
        connecting = False
        if pool.failing:
            # The database is down: no connect to wait for. playhouse would
            # raise the driver's error at once; an idle connection, or one
            # given back within `timeout`, still serves.
            timeout = 0.0 if wait is None or wait == math.inf else wait
        elif wait is None or (wait < CONNECT_WAIT and not pool.full()):
            # `timeout` bounds waiting for a connection in use, as in
            # playhouse: none for one being made.
            timeout = CONNECT_WAIT
            connecting = True  # not full (else TooManyRequests): a timeout is the connect's
        else:
            timeout = wait
        try:
            slot = pool.acquire(timeout, fail_if_full=wait is None)
        except errors.TooManyRequests:
            raise MaxConnectionsExceeded("Exceeded maximum connections.") from None
        except errors.PoolTimeout as ex:
            cause = ex.__cause__
            if isinstance(cause, Exception) and not isinstance(cause, errors.PoolError):
                raise _own_copy(cause) from None  # the database is down: the driver's error
            if connecting:  # the cap was not the problem: the connect was
                raise peewee.OperationalError(f"no connection could be made within {CONNECT_WAIT:g} s") from None
            raise MaxConnectionsExceeded("Max connections exceeded, timed out attempting to connect.") from None
        owner = getcurrent()
        self._lent[id(slot.conn)] = (slot, owner)
        # A gevent greenlet that ends without closing gives its connection
        # back (unless the state, hence the connection, is shared by all).
        # Linked once per greenlet, not per checkout: a rawlink and an unlink
        # per query cost more than the rest of this method.
        linked = owner.__dict__
        if self._link_key not in linked and self._state_key is not None:
            link = getattr(owner, "rawlink", None)
            if link is not None:
                link(self._owner_ended)
                linked[self._link_key] = True
        return slot.conn

    def _owner_ended(self, greenlet: Any) -> None:
        """A linked greenlet ended: give back what it still holds."""
        for key, entry in list(self._lent.items()):
            if entry[1] is greenlet and self._lent.get(key) is entry:
                try:
                    del self._lent[key]
                except KeyError:  # given back meanwhile, from another thread
                    continue
                logger.warning("%r ended holding a connection of %r: returning it", greenlet, self._pool.name)
                self._pool.release(entry[0])

    def _forget_lent(self, conn: Any) -> Slot[Any] | None:
        entry = self._lent.pop(id(conn), None)
        return None if entry is None else entry[0]

    def _close(self, conn: Any, close_conn: bool = False) -> None:
        slot = self._forget_lent(conn)
        if slot is None:
            logger.debug("connection %s not in use, ignoring close", id(conn))
        elif close_conn:
            self._pool.discard(slot)
        else:
            self._pool.release(slot)

    def _connect_raw(self) -> Any:
        conn = self._backend.connect(self)
        return super()._connect() if conn is None else conn  # type: ignore[misc]

    def _close_raw(self, conn: Any) -> None:
        try:
            super()._close(conn)  # type: ignore[misc]
        except Exception:
            logger.debug("error closing connection %s", id(conn), exc_info=True)

    # -- backend hooks (peewee's names where peewee has them) ------------

    def _conn_status(self, conn: Any) -> int:
        """Cheap local check, no I/O: `OK`, `DIRTY` (roll back) or `BROKEN`."""
        return self._backend.status(conn)

    def _is_closed(self, conn: Any) -> bool:
        """Round-trip probe at checkout of a connection idle `check_idle` or more."""
        return self._backend.is_closed(self, conn)

    def _can_reuse(self, conn: Any) -> bool:
        """Roll back a returned connection; False if it can't be reused."""
        return self._backend.can_reuse(self, conn)

    def _execute_cursor(self, sql: str, params: Any, **options: Any) -> Any:
        if not self._backend.marks_busy:
            return super()._execute_cursor(sql, params, **options)  # type: ignore[misc]
        if self.is_closed() and self.autoconnect:  # type: ignore[attr-defined]
            self.connect()
        conn = self._state.conn
        if conn is None:
            return super()._execute_cursor(sql, params, **options)  # type: ignore[misc]
        return _while_busy(conn, super()._execute_cursor, sql, params, **options)  # type: ignore[misc]

    # -- playhouse.pool's API --------------------------------------------

    def manual_close(self) -> bool | None:
        """Close the calling greenlet's connection instead of returning it."""
        if self.is_closed():  # type: ignore[attr-defined]
            return False
        # close() refuses inside a transaction: refuse before forgetting the
        # connection, or its slot would stay lent for good. (playhouse forgets
        # it first, then raises, and never closes nor reuses it.)
        if self.in_transaction():  # type: ignore[attr-defined]
            raise peewee.OperationalError("Attempting to close database while transaction is open.")
        conn = self.connection()  # type: ignore[attr-defined]
        slot = self._forget_lent(conn)
        self.close()
        if slot is not None:
            self._pool.discard(slot)
        return None

    def close_idle(self) -> None:
        """Close every connection not in use."""
        self._pool.close_idle()

    def close_stale(self, age: float = 600) -> int:
        """Close connections checked out more than `age` seconds ago, even in use."""
        seconds = _number("age", age)
        if seconds is None:
            raise TypeError("age must be a number, got None")
        stale = self._pool.close_lent(float(seconds))
        for slot in stale:
            self._forget_lent(slot.conn)
        return len(stale)

    def close_all(self) -> None:
        """Close every connection, idle or in use (in use ones break)."""
        self.close()
        self.close_idle()
        self.close_stale(0)

    def dispose(self) -> None:
        """Forget every connection without closing them (after a fork)."""
        super().dispose()  # type: ignore[misc]
        self._pool.forget_all()
        self._lent.clear()


# -- backends ----------------------------------------------------------------


class _Backend:
    """How the pool treats one driver's connections (any other driver: trust them)."""

    #: Mark connections busy during queries (when the driver can't tell).
    marks_busy = False
    #: Connections usable only in the gevent hub that made them (see the engine's `_hub_bound_connections`).
    hub_bound = False

    def configure(self, connect_kwargs: dict[str, Any]) -> None:
        """Adjust the database's connect parameters before peewee's init()."""

    def adopt(self, db: Any) -> None:
        """Adjust the database after peewee's init()."""

    def connect(self, db: Any) -> Any:
        """Make a connection, or None to use peewee's `_connect()`."""
        return None

    def status(self, conn: Any) -> int:
        """`OK`, `DIRTY` or `BROKEN`, without I/O."""
        return OK

    def is_closed(self, db: Any, conn: Any) -> bool:
        """Probe the connection; True if it is unusable."""
        return False

    def can_reuse(self, db: Any, conn: Any) -> bool:
        """Settle a returned connection; False if it can't be reused."""
        return True


class _PostgresBackend(_Backend):
    """psycopg 3, connected through `GeventConnection`."""

    def __init__(self) -> None:
        # psycopg is an optional extra: import it only for a PostgreSQL database.
        from .pgconn import pool_status, settle

        self.status = pool_status  # type: ignore[method-assign]
        self._settle = settle

    def configure(self, connect_kwargs: dict[str, Any]) -> None:
        connect_kwargs["prefer_psycopg3"] = True

    def adopt(self, db: Any) -> None:
        db._adapter.__class__ = _gevent_adapter(type(db._adapter))

    def is_closed(self, db: Any, conn: Any) -> bool:
        return bool(conn.closed) or bool(db._adapter.is_connection_closed(conn))

    def can_reuse(self, db: Any, conn: Any) -> bool:
        try:
            self._settle(conn)
        except Exception as ex:
            logger.warning("discarding connection: %s", ex)
            return False
        return True


class _GeventPsycopg3Adapter(peewee.Psycopg3Adapter):
    """Peewee's psycopg 3 adapter, connecting with `GeventConnection`."""

    def connect(self, db: Any, **params: Any) -> Any:
        from .pgconn import GeventConnection

        if db._encoding:
            params.setdefault("client_encoding", db._encoding)
        if db.database.startswith("postgresql://"):
            params.setdefault("conninfo", db.database)
        else:
            params.setdefault("dbname", db.database)
        return GeventConnection.connect(params.pop("conninfo", ""), **params)


_ADAPTERS: dict[type, type] = {peewee.Psycopg3Adapter: _GeventPsycopg3Adapter}


def _gevent_adapter(base: type) -> type:
    """`base`, a peewee psycopg 3 adapter class, connecting with `GeventConnection`.

    `_GeventPsycopg3Adapter` comes right after `base` and its own bases in
    the method resolution order, in place of peewee's `connect()`: a `base`
    with a `connect()` of its own that calls `super().connect()` (to set
    something up on each connection) keeps it.
    """
    if base in _ADAPTERS.values():
        return base
    if base not in _ADAPTERS:
        _ADAPTERS[base] = type(f"Gevent{base.__name__}", (base, _GeventPsycopg3Adapter), {})
    return _ADAPTERS[base]


class _MySQLBackend(_Backend):
    """pymysql: pure Python on the `socket` module, so under gevent it
    cooperates once `monkey.patch_all()` has run (before or after import)."""

    marks_busy = True
    hub_bound = True  # patched sockets: gevent's belong to the hub that made them

    def connect(self, db: Any) -> Any:
        # Not for a class with a `_connect()` of its own: it connects its way.
        if (
            _SharedContextConnection is None
            or getattr(peewee, "mysql", None) is not _pymysql()
            or not _plain_mysql_connect(type(db))  # type: ignore[arg-type]
        ):
            return None
        # As peewee's MySQLDatabase._connect, sharing pymysql's TLS context.
        return _SharedContextConnection(database=db.database, autocommit=True, **db.connect_params)

    def status(self, conn: Any) -> int:
        if getattr(conn, "_greenpool_busy", False):
            # A query was interrupted mid-flight (pymysql may have closed the
            # socket already): it still runs on the server until killed.
            return DIRTY
        if not getattr(conn, "open", True) or _blocking_under_gevent(conn):
            return BROKEN
        server_status = getattr(conn, "server_status", 0) or 0
        return DIRTY if server_status & 1 else OK  # SERVER_STATUS_IN_TRANS

    def is_closed(self, db: Any, conn: Any) -> bool:
        try:
            try:
                conn.ping(False)  # never pymysql's silent reconnect
            except TypeError:  # a driver whose ping() takes no argument (MariaDB's), as playhouse
                conn.ping()
        except Exception:
            return True
        return False

    def can_reuse(self, db: Any, conn: Any) -> bool:
        if getattr(conn, "_greenpool_busy", False):
            # The protocol stream is mid-result: stop the query on the server
            # from another connection, and drop this one.
            self._kill_query(db, conn)
            return False
        try:
            conn.rollback()
        except Exception:
            return False
        return True

    @staticmethod
    def _kill_query(db: Any, conn: Any) -> None:
        try:
            killer = db._connect_raw()
            try:
                killer.cursor().execute(f"KILL QUERY {int(conn.thread_id())}")
            finally:
                db._close_raw(killer)
        except Exception as ex:
            logger.warning("couldn't cancel the interrupted query: %s", ex)


class _SqliteBackend(_Backend):
    def configure(self, connect_kwargs: dict[str, Any]) -> None:
        # The pool's background jobs make and close connections.
        connect_kwargs.setdefault("check_same_thread", False)

    def status(self, conn: Any) -> int:
        try:
            return DIRTY if conn.in_transaction else OK
        except Exception:
            return BROKEN

    def is_closed(self, db: Any, conn: Any) -> bool:
        try:
            return conn.total_changes is None  # raises once closed
        except Exception:
            return True

    def can_reuse(self, db: Any, conn: Any) -> bool:
        try:
            if conn.in_transaction:
                conn.rollback()
        except Exception:
            return False
        return True


def _while_busy(conn: Any, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, with `conn` marked busy (for `_MySQLBackend`) until it returns.

    The mark stays only if the call is interrupted (gevent.Timeout, a kill):
    then the connection is mid-result, its query still running on the
    server. A call failing afterwards on that dead connection keeps it.
    """
    was_busy = getattr(conn, "_greenpool_busy", False)
    conn._greenpool_busy = True
    try:
        result = call(*args, **kwargs)
    except Exception:
        conn._greenpool_busy = was_busy
        raise
    conn._greenpool_busy = False
    return result


def _blocking_under_gevent(conn: Any) -> bool:
    """True for a pymysql connection made before `monkey.patch_all()`.

    Its socket blocks the hub: replace it with one made on patched sockets.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return False
    from gevent.socket import socket as green_socket

    sock = getattr(conn, "_sock", None)
    return sock is not None and not isinstance(sock, green_socket)


def _backend_for(db: Any) -> _Backend:
    for base, backend in (
        (peewee.PostgresqlDatabase, _PostgresBackend),
        (peewee.MySQLDatabase, _MySQLBackend),
        (peewee.SqliteDatabase, _SqliteBackend),
    ):
        if isinstance(db, base):
            return backend()
    return _Backend()


def _pymysql() -> Any:
    try:
        import pymysql
    except ImportError:  # pragma: no cover - the mysql extra is optional
        return None
    return pymysql


def _shared_context_connection_class() -> Any:
    pymysql = _pymysql()
    if pymysql is None:  # pragma: no cover
        return None

    class SharedContextConnection(pymysql.connections.Connection):  # type: ignore[misc, name-defined]
        """pymysql's connection, building its default TLS context once, and
        marking itself busy while a query runs (see `_while_busy`).

        With no TLS option pymysql "prefers" TLS and builds a fresh
        `ssl.create_default_context()` (loading the CA store) for every
        connection: about 20 ms of CPU that blocks the gevent hub. The
        context is the same every time and safe to share.
        """

        _default_context: Any = None

        def query(self, sql: Any, unbuffered: bool = False) -> Any:
            # What every cursor's execute() comes down to, `db.cursor()`'s too.
            return _while_busy(self, super().query, sql, unbuffered)

        def _create_ssl_ctx(self, sslp: Any) -> Any:
            if sslp != {}:
                return super()._create_ssl_ctx(sslp)
            cls = type(self)
            if cls._default_context is None:
                cls._default_context = super()._create_ssl_ctx(sslp)
            return cls._default_context

    return SharedContextConnection


_SharedContextConnection = _shared_context_connection_class()


def _postgres_ext() -> tuple[type, type]:
    from playhouse.postgres_ext import PostgresqlExtDatabase, Psycopg3Database

    return PostgresqlExtDatabase, Psycopg3Database


_PostgresqlExtDatabase, _Psycopg3Database = _postgres_ext()


class PooledPostgresqlDatabase(PooledDatabase, peewee.PostgresqlDatabase):  # type: ignore[misc]
    """Pooled `PostgresqlDatabase` (psycopg 3)."""


class PooledPostgresqlExtDatabase(PooledDatabase, _PostgresqlExtDatabase):  # type: ignore[misc, valid-type]
    """Pooled `playhouse.postgres_ext.PostgresqlExtDatabase` (psycopg 3)."""


class PooledPsycopg3Database(PooledDatabase, _Psycopg3Database):  # type: ignore[misc, valid-type]
    """Pooled `playhouse.postgres_ext.Psycopg3Database`."""


class PooledMySQLDatabase(PooledDatabase, peewee.MySQLDatabase):  # type: ignore[misc]
    """Pooled `MySQLDatabase` (pymysql)."""


class PooledSqliteDatabase(PooledDatabase, peewee.SqliteDatabase):  # type: ignore[misc]
    """Pooled `SqliteDatabase`."""


def _register_urls() -> None:
    from playhouse.db_url import register_database

    register_database(PooledPostgresqlDatabase, "greenpool+postgres", "greenpool+postgresql")
    register_database(PooledPostgresqlExtDatabase, "greenpool+postgresext", "greenpool+postgresqlext")
    register_database(PooledPsycopg3Database, "greenpool+psycopg3")
    register_database(PooledMySQLDatabase, "greenpool+mysql")
    register_database(PooledSqliteDatabase, "greenpool+sqlite")


_register_urls()
