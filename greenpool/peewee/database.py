"""`PooledDatabase`: the mixin making a Peewee database class pooled, as `playhouse.pool`'s.

`class MyDB(PooledDatabase, PostgresqlDatabase)` works as with playhouse's
mixin. Differences that matter:

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import peewee
from playhouse.pool import MaxConnectionsExceeded

from .. import errors
from .._runtime.hub import getcurrent, gevent_hub, note_hub
from ..engine import Pool, Slot, options
from ..retry import DatabaseRetrying
from .drivers import driver_for, while_busy

logger = logging.getLogger("greenpool.peewee")

if TYPE_CHECKING:
    # peewee has no type hints: to the type checker the mixin is a Database.
    _DatabaseBase = peewee.Database
else:
    _DatabaseBase = object

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


class _Savepoint(peewee._savepoint):
    """`db.savepoint()` (and a nested `atomic()`): peewee's, but no rollback on a busy connection.

    See `PooledDatabase.rollback`.
    """

    def rollback(self, begin: bool = True) -> None:
        """Roll back to the savepoint, unless an interrupted query still runs."""
        if not self.db._busy():
            super().rollback(begin)


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


class PooledDatabase(_DatabaseBase):
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
        options.count("min_connections", min_connections, 0)
        max_size = self._max_size(max_connections, min_connections)
        # The database class's own connect and close, looked up at each call.
        self._driver = driver_for(self, super())
        self._pool: Pool[Any] = Pool(
            self._driver,
            check=self._driver.ping,
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
        cls: type = type(self)
        self._lean = _lean_paths(cls)
        self._lean_cursor = self._lean and _plain_cursor(cls)
        super().__init__(database, **kwargs)
        if self.thread_safe:
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
        if self.thread_safe:
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
        self._driver.configure(connect_kwargs)
        try:
            super().init(database, **connect_kwargs)
        finally:
            # Also if it raised (an open transaction): peewee may have made
            # its own adapter by then.
            self._driver.adopt(self)
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
            return super().connect(reuse_if_open)
        if self.deferred:
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
            if self.server_version is None:
                self._set_server_version(conn)  # type: ignore[attr-defined]  # not in peewee's stubs
            self._initialize_connection(conn)  # type: ignore[attr-defined]  # not in peewee's stubs
        except BaseException:
            _reraise_as_peewee()
        return True

    def close(self) -> bool:
        """Give the calling greenlet's connection back (peewee's semantics)."""
        if not self._lean:
            return super().close()
        if self.deferred:
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
            return super().cursor(named_cursor)  # type: ignore[no-untyped-call]  # untyped in peewee's stubs
        state = self._state  # one lookup, where peewee's makes two
        if state.closed:
            if not self.autoconnect:
                raise peewee.InterfaceError("Error, database connection not opened.")
            self.connect()
        return state.conn.cursor()

    def connection_context(self) -> _ConnectionContext:
        """Context manager (and decorator) holding a connection, as peewee's."""
        return _ConnectionContext(self)

    def rollback(self) -> None:
        """Roll back the calling greenlet's transaction, as peewee's; not while a query runs.

        An `atomic()` block cut by a `gevent.Timeout` or a kill (a Celery time
        limit, a revoke) rolls back on its way out while the cut query still
        runs: the server would refuse the ROLLBACK ("another command is
        already in progress") and that error would replace the Timeout or
        the GreenletExit, which a task's `except DatabaseError` could then
        swallow. So nothing is sent: the connection is busy, and its return
        to the pool cancels the query and rolls back (playhouse raises).
        """
        if not self._busy():
            super().rollback()

    def begin(self, *args: Any, **kwargs: Any) -> None:
        """Begin a transaction on the calling greenlet's connection, as the database class does.

        Its error may say the server is no longer the primary (57P01: the
        session ended since its checkout): a failover, as a query's (peewee
        runs BEGIN past `_execute_cursor()`).
        """
        try:
            super().begin(*args, **kwargs)
        except Exception as ex:
            self._failover_if(ex)
            raise

    def commit(self) -> None:
        """Commit the calling greenlet's transaction, as peewee's.

        Its error may say the server is no longer the primary (57P01 during
        the COMMIT): a failover, as a query's (peewee runs COMMIT past
        `_execute_cursor()`).
        """
        try:
            super().commit()
        except Exception as ex:
            self._failover_if(ex)
            raise

    def savepoint(self) -> Any:
        """A savepoint, as peewee's (see `rollback()`)."""
        return _Savepoint(self)

    def _busy(self) -> bool:
        conn = self._state.conn
        return conn is not None and self._driver.busy(conn)

    # -- peewee's connection hooks --------------------------------------

    def _connect(self) -> Any:
        pool = self._pool
        if pool.closed:
            pool.open()
        wait = self._wait_timeout
        connecting = False
        if pool.failing:
            # The database is down: wait for a connect attempt made since this
            # request came (the engine's probe) and fail with its error, as
            # playhouse's own connect would; an idle connection, or one given
            # back meanwhile, still serves.
            timeout = CONNECT_WAIT
            connecting = True
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
                if self._driver.hub_bound:
                    # Where jobs asked for by other threads make its connections
                    # (a housekeeper started before patch_all() is an OS thread):
                    # this greenlet's hub, if it is the main one.
                    hub = gevent_hub()
                    if hub is not None:
                        note_hub(hub)
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

    # -- playhouse's backend hooks (its names) ----------------------------

    def _is_closed(self, conn: Any) -> bool:
        """Round-trip probe at checkout of a connection idle `check_idle` or more."""
        return self._driver.is_closed(conn)

    def _can_reuse(self, conn: Any) -> bool:
        """Roll back a returned connection; False if it can't be reused."""
        return self._driver.can_reuse(conn)

    def _execute_cursor(self, sql: str, params: Any, **options: Any) -> Any:
        execute = super()._execute_cursor  # type: ignore[misc]  # peewee's stubs lack its private methods
        try:
            if not self._driver.marks_busy:
                return execute(sql, params, **options)
            if self.is_closed() and self.autoconnect:
                self.connect()
            conn = self._state.conn
            if conn is None:
                return execute(sql, params, **options)
            return while_busy(conn, execute, sql, params, **options)
        except Exception as ex:
            self._failover_if(ex)
            raise

    def _failover_if(self, error: Exception) -> None:
        """Declare a failover if `error`, of the calling greenlet's connection, says so."""
        if self._driver.is_failover(error):
            entry = self._lent.get(id(self._state.conn))
            self._pool.failover(None if entry is None else entry[0], error)

    # -- playhouse.pool's API --------------------------------------------

    def manual_close(self) -> bool | None:
        """Close the calling greenlet's connection instead of returning it."""
        if self.is_closed():
            return False
        # close() refuses inside a transaction: refuse before forgetting the
        # connection, or its slot would stay lent for good. (playhouse forgets
        # it first, then raises, and never closes nor reuses it.)
        if self.in_transaction():
            raise peewee.OperationalError("Attempting to close database while transaction is open.")
        conn = self.connection()  # type: ignore[no-untyped-call]  # untyped in peewee's stubs
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
        super().dispose()
        self._pool.forget_all()
        self._lent.clear()

    # -- retrying (greenpool.retry) ------------------------------------------

    def retry(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """`greenpool.retry(...)` for blocks using this database: a decorator and an iterable of attempts.

        `@db.retry(attempts=3)` around a function doing a whole `with
        db.atomic()` block, or `for attempt in db.retry(): with attempt:
        ...`; bare `@db.retry` takes the defaults. Between attempts the
        greenlet's connection goes back to the pool (see
        `greenpool.retry.DatabaseRetrying`); inside an enclosing transaction
        nothing is retried. Parameters (see `greenpool.retry.Retrying`):
        `attempts` (3), `deadline` (30.0 s), `base_delay` (0.05 s),
        `max_delay` (2.0 s), `retry_serialization` (False), `on_retry` (None).
        """
        policy = DatabaseRetrying(self, **options)
        return policy if func is None else policy(func)


# -- backends ----------------------------------------------------------------
