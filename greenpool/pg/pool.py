"""psycopg 3 pools on the greenpool engine: drop-ins for psycopg_pool's.

`ConnectionPool` takes psycopg_pool's constructor parameters with the same
defaults, has the same methods and raises the same errors (see
`greenpool.pg.errors`). `Lease` is what `connection()` returns: the hot path
of a checkout, kept beside the pool it serves.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import psycopg
from psycopg import errors as e

from .._runtime.hub import getcurrent
from ..engine import GONE, OK, OUT, Pool, Slot, options
from ..retry import PoolRetrying
from .connection import GeventConnection
from .driver import (
    ACTIVE,
    IDLE,
    ConninfoParam,
    KwargsParam,
    PsycopgDriver,
    ResettingPsycopgDriver,
    call_pooled,
    check_connection,
)
from .errors import PoolClosed, PoolTimeout, TooManyRequests

CT = TypeVar("CT", bound="psycopg.Connection[Any]")

#: `max_size` of a NullConnectionPool without a limit.
_UNLIMITED = 2**31 - 1

logger = logging.getLogger("greenpool.pg")

_new_object = object.__new__


class ConnectionPool(Pool[CT], Generic[CT]):
    """A pool of psycopg connections, drop-in for `psycopg_pool.ConnectionPool`.

    Parameters are psycopg_pool's, with the same defaults, plus the engine's
    `lifetime_jitter`, `segments`, `check_idle` and `leak_threshold` (see the
    docs). `connection_class` defaults to `GeventConnection`, which behaves
    as `psycopg.Connection` outside gevent and cooperates with gevent inside.
    """

    PoolTimeout = PoolTimeout
    PoolClosed = PoolClosed
    TooManyRequests = TooManyRequests

    #: Keep returned connections idle for reuse (`NullConnectionPool`: close them).
    retain_idle: ClassVar[bool] = True

    def __init__(
        self,
        conninfo: ConninfoParam = "",
        *,
        connection_class: type[CT] = GeventConnection,  # type: ignore[assignment]  # CT's default
        kwargs: KwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: Callable[[CT], None] | None = None,
        check: Callable[[CT], None] | None = None,
        reset: Callable[[CT], None] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Callable[[Any], None] | None = None,
        num_workers: int = 3,
        lifetime_jitter: float = 0.1,
        segments: int = 4,
        check_idle: float = 0.0,
        leak_threshold: float | None = None,
    ) -> None:
        if not (isinstance(conninfo, str) or callable(conninfo)):
            raise TypeError(f"conninfo must be a string or a callable, got {conninfo!r}")
        if not (isinstance(connection_class, type) and issubclass(connection_class, psycopg.Connection)):
            raise TypeError(f"connection_class must be a psycopg.Connection subclass, got {connection_class!r}")
        if kwargs is not None and not (isinstance(kwargs, dict) or callable(kwargs)):
            raise TypeError(f"kwargs must be a dict or a callable, got {kwargs!r}")
        if open is not None and not isinstance(open, bool):
            raise TypeError(f"open must be True, False or None, got {open!r}")
        if not isinstance(close_returns, bool):
            raise TypeError(f"close_returns must be True or False, got {close_returns!r}")
        for pname, value in (("configure", configure), ("reset", reset)):
            if value is not None and not callable(value):
                raise TypeError(f"{pname} must be callable or None, got {value!r}")
        self.close_returns = close_returns
        driver_class = PsycopgDriver if reset is None else ResettingPsycopgDriver
        self._psycopg = driver_class(self, conninfo, kwargs, connection_class, configure, reset)
        super().__init__(
            self._psycopg,
            min_size=min_size,
            max_size=max_size,
            name=name,
            timeout=timeout,
            max_waiting=max_waiting,
            max_lifetime=max_lifetime,
            lifetime_jitter=lifetime_jitter,
            max_idle=max_idle,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            num_workers=num_workers,
            segments=segments,
            check=functools.partial(call_pooled, self, check) if callable(check) else check,
            check_idle=check_idle,
            leak_threshold=leak_threshold,
            retain_idle=self.retain_idle,
        )
        #: The driver's status of an idle connection, if it is always the same; None: ask.
        self._idle_status: int | None = OK if reset is None else None
        self._open_implicit = open is None
        if open is None or open:
            self.open()

    # -- engine hooks ----------------------------------------------------

    # -- where connections come from (psycopg_pool's attributes) --------

    @property
    def conninfo(self) -> ConninfoParam:
        """The connection string, or a callable returning one (called for each connect)."""
        return self._psycopg.conninfo

    @conninfo.setter
    def conninfo(self, value: ConninfoParam) -> None:
        self._psycopg.conninfo = value

    @property
    def kwargs(self) -> KwargsParam | None:
        """Extra `connect()` arguments, or a callable returning them."""
        return self._psycopg.kwargs

    @kwargs.setter
    def kwargs(self, value: KwargsParam | None) -> None:
        self._psycopg.kwargs = value

    @property
    def connection_class(self) -> type[CT]:
        """The `psycopg.Connection` subclass connections are made with."""
        return self._psycopg.connection_class

    @connection_class.setter
    def connection_class(self, value: type[CT]) -> None:
        self._psycopg.connection_class = value

    check_connection = staticmethod(check_connection)

    # -- psycopg_pool API ------------------------------------------------

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool and fill it in the background (see `wait()`)."""
        super().open(wait=wait, timeout=timeout)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until `min_size` connections are ready (see the engine's `wait()`)."""
        if self._open_implicit:
            self._warn_open_implicit()
        super().wait(timeout)

    def __enter__(self) -> ConnectionPool[CT]:
        self._open_implicit = False
        self.open()
        return self

    def connection(self, timeout: float | None = None) -> Lease[CT]:
        """Context manager lending a connection, returned on exit.

        The connection's own context applies: commit on success, roll back
        on error. Wait up to `timeout` (default `self.timeout`) seconds.
        """
        # No __init__: calling into Python from C is the dearest part of a
        # small object's creation, and one is made per checkout.
        lease = _new_object(Lease)
        lease._pool = self
        lease._timeout = timeout
        return lease

    def getconn(self, timeout: float | None = None) -> CT:
        """Lend a connection; you must give it back with `putconn()`.

        A lease without a block: the lending is the same as `connection()`'s.
        """
        if self._open_implicit:
            self._warn_open_implicit()  # here: its stacklevel names the caller, not `lend()`
        lease: Lease[CT] = _new_object(Lease)
        lease._pool = self
        lease._timeout = timeout
        conn = lease.lend()
        lent: Any = conn
        lent._pool_lease = None  # no block to end it: putconn() gives it back
        lent._pool_owner = getcurrent()  # for `reclaim()`
        return conn

    def reclaim(self, owner: Any = None) -> int:
        """Give back the connections `getconn()` lent to `owner` and not `putconn()`-ed yet.

        `owner` is a greenlet (or a thread's main greenlet), by default the
        caller's. Each is given back as `putconn()` would: rolled back, or
        its query cancelled on the server if one still runs. Return how
        many were. The Celery integration calls it after each task.
        """
        owner = getcurrent() if owner is None else owner
        with self._lock:
            held = [
                s.conn
                for s in self._slots
                if s.state is OUT
                and getattr(s.conn, "_pool", None) is self
                and getattr(s.conn, "_pool_lease", self) is None
                and getattr(s.conn, "_pool_owner", None) is owner
            ]
        for conn in held:
            logger.warning("%r still held a connection of %r: giving it back", owner, self.name)
            try:
                self.putconn(conn)
            except ValueError:
                pass  # given back meanwhile
        return len(held)

    def _warn_open_implicit(self) -> None:
        """psycopg_pool's warning, before the first checkout of a pool opened implicitly."""
        self._open_implicit = False
        warnings.warn(
            f"the default for the {type(self).__name__} 'open' parameter will become 'False'"
            " in a future release. Please use open={True|False} explicitly, or use the pool"
            f" as context manager using: `with {type(self).__name__}(...) as pool: ...`",
            DeprecationWarning,
            stacklevel=3,
        )

    def putconn(self, conn: CT) -> None:
        """Give back a connection obtained with `getconn()`."""
        lent: Any = conn
        pool = getattr(lent, "_pool", None)
        if pool is not self:
            if pool is not None:
                where = f"it comes from pool {pool.name!r}"
            elif getattr(lent, "_pool_slot", None) in self._slots:
                where = "it was given back already"
            else:
                where = "it doesn't come from any pool"
            raise ValueError(f"can't return connection to pool {self.name!r}, {where}: {conn}")
        slot = lent._pool_slot
        lent._pool = None
        lent._pool_lease = None
        lent._pool_owner = None
        if slot is not None:  # else closed by the pool (`close_lent()`) since `_pool` was read
            self.release(slot)

    # -- retrying (greenpool.retry) ------------------------------------------

    def retry(self, func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """`greenpool.retry(...)` for blocks using this pool: a decorator and an iterable of attempts.

        `@pool.retry(attempts=3)` around a function doing a whole `with
        pool.connection()` block, or `for attempt in pool.retry(): with
        attempt: ...`; bare `@pool.retry` takes the defaults. Parameters (see
        `greenpool.retry.Retrying`): `attempts` (3), `deadline` (30.0 s),
        `base_delay` (0.05 s), `max_delay` (2.0 s), `retry_serialization`
        (False), `on_retry` (None).
        """
        policy = PoolRetrying(self, **options)
        return policy if func is None else policy(func)


class Lease(Generic[CT]):
    """What `pool.connection()` returns: lends a connection for a `with` block.

    A class, not a generator, to keep the hot path short; `getconn()` uses
    its `lend()` too.
    """

    __slots__ = ("_pool", "_timeout", "_slot")

    _pool: ConnectionPool[CT]
    _timeout: float | None
    _slot: Slot[CT]

    def lend(self) -> CT:
        """Take a connection from the pool, marked as lent by this lease."""
        pool = self._pool
        if pool._open_implicit:
            pool._warn_open_implicit()
        self._slot = slot = pool.acquire(self._timeout)
        conn = slot.conn
        lent: Any = conn  # psycopg's types don't know the pool's attributes
        lent._pool = pool
        lent._pool_slot = slot
        # Whose lending this is: given back inside the block (`putconn()`,
        # `close()` with `close_returns`), it may be lent again before the
        # block ends, and is then someone else's to commit and return.
        lent._pool_lease = self
        return conn

    __enter__ = lend

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conn: Any = self._slot.conn  # psycopg types `_pool` as one of psycopg_pool's
        pool = self._pool
        if conn._pool_lease is not self or conn._pool is not pool:
            self._given_back(conn)
            return
        status = None
        uncommitted = False
        try:
            # Commit/rollback like `with conn:`. Nothing to do on an idle
            # connection outside pipeline mode (then the status read is the
            # pool's too); nothing possible on a busy one (an interrupted
            # query): the pool cancels it, and rolls back.
            pgstatus = conn.pgconn.transaction_status
            if exc_type is None and pgstatus == IDLE and not conn._pipeline:
                status = pool._idle_status
            elif pgstatus != ACTIVE:
                if exc_type is not None and pool.driver.is_failover(exc):
                    pool.failover(self._slot, exc)
                try:
                    conn.__exit__(exc_type, exc, tb)
                except Exception as ex:  # the COMMIT's error: the block's too
                    if pool.driver.is_failover(ex):
                        pool.failover(self._slot, ex)
                    raise
            else:
                # A block ending normally must commit: say it can't.
                uncommitted = exc_type is None and not conn.autocommit
        finally:
            conn._pool_lease = None  # the lending is over (and no cycle through this lease)
            if conn._pool is pool:
                conn._pool = None
                pool.release(self._slot, status)
            # else closed by the pool (`close_lent()`) meanwhile: nothing to give back
        if uncommitted:
            raise e.OperationalError(
                "the 'with' block ended while a query was still running on its connection"
                " (interrupted, and the interruption caught?): its transaction can't be"
                " committed, and is rolled back"
            )

    def _given_back(self, conn: Any) -> None:
        """The block's connection isn't its own any more: raise, unless the pool closed it."""
        if conn._pool_lease is self and self._slot.state is GONE:
            conn._pool_lease = None
            return  # closed by the pool (`close_lent()`), as its borrower sees
        raise ValueError(
            f"can't return connection to pool {self._pool.name!r}: it was given back inside"
            f" the 'with' block already (putconn(), or close() with close_returns): {conn}"
        )


class NullConnectionPool(ConnectionPool[CT]):
    """A pool that keeps no idle connection: drop-in for psycopg_pool's.

    Each request opens a connection (in the background) and each return
    closes it, unless a request is waiting for it. `max_size` bounds how many
    exist at once; `min_size` must be 0.
    """

    retain_idle = False

    # psycopg_pool's parameters spelled out, as ConnectionPool's, for
    # inspect.signature(), IDEs and type checkers; only min_size differs.
    def __init__(
        self,
        conninfo: ConninfoParam = "",
        *,
        connection_class: type[CT] = GeventConnection,  # type: ignore[assignment]  # CT's default
        kwargs: KwargsParam | None = None,
        min_size: int = 0,
        max_size: int | None = None,
        open: bool | None = None,
        configure: Callable[[CT], None] | None = None,
        check: Callable[[CT], None] | None = None,
        reset: Callable[[CT], None] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Callable[[Any], None] | None = None,
        num_workers: int = 3,
        lifetime_jitter: float = 0.1,
        segments: int = 4,
        check_idle: float = 0.0,
        leak_threshold: float | None = None,
    ) -> None:
        min_size, max_size = _null_sizes(min_size, max_size)
        super().__init__(
            conninfo,
            connection_class=connection_class,
            kwargs=kwargs,
            min_size=min_size,
            max_size=max_size,
            open=open,
            configure=configure,
            check=check,
            reset=reset,
            name=name,
            close_returns=close_returns,
            timeout=timeout,
            max_waiting=max_waiting,
            max_lifetime=max_lifetime,
            max_idle=max_idle,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            num_workers=num_workers,
            lifetime_jitter=lifetime_jitter,
            segments=segments,
            check_idle=check_idle,
            leak_threshold=leak_threshold,
        )

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change `max_size` (`min_size` must stay 0; `max_size` None or 0: unlimited)."""
        self._check_not_closed()  # first, as the engine's resize(): a closed pool says so
        super().resize(*_null_sizes(min_size, max_size))

    @property
    def max_size(self) -> int:
        """Most connections open at once; 0 if unlimited (as psycopg_pool says)."""
        return 0 if self._max_size == _UNLIMITED else self._max_size

    def get_stats(self) -> dict[str, int]:
        """The engine's stats, `pool_max` 0 if unlimited (as psycopg_pool's)."""
        stats = super().get_stats()
        stats["pool_max"] = self.max_size
        return stats

    def wait(self, timeout: float = 30.0) -> None:
        """Check that a connection can be made within `timeout`, then close it.

        The trial connection is one request in the stats. A failed connect
        fails it at once, with the driver's error; a connect that doesn't
        answer, after `timeout`.
        """
        self._check_open()
        timeout = options.positive("timeout", timeout)
        if self._open_implicit:
            self._warn_open_implicit()
        try:
            slot = self.acquire(timeout)
        except PoolTimeout as ex:
            self.close()
            cause = ex.__cause__
            suffix = f": {cause}" if cause is not None else ""
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec{suffix}") from cause
        self.release(slot)


def _null_sizes(min_size: int, max_size: int | None) -> tuple[int, int]:
    """A null pool's sizes: `min_size` 0, `max_size` None or 0 for unlimited."""
    if min_size != 0:
        raise ValueError(f"min_size must be 0 for a NullConnectionPool, got {min_size!r}")
    if max_size is None or max_size == 0:
        max_size = _UNLIMITED
    return min_size, max_size
