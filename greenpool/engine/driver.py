"""The driver contract: how a pool makes, tests, cleans and closes connections.

The engine knows no database driver. Each pool is given a `Driver`, and that
is the whole of what it knows about its connections; adapters (the psycopg
pool, the Peewee backends, your own) implement one. The split follows
SQLAlchemy's creator/dialect and psycopg_pool's `abc`: the pool decides when,
the driver knows how.

Rules the engine keeps, so a driver needn't:

- No method is called under a pool lock. `connect()`, `close()`, `clean()`
  and `ping()` may do network I/O and may switch greenlets; they run in the
  pool's background jobs (except `ping()`, which `Pool.check()` calls, and
  a `check` callback at checkout).
- `status()` runs on every checkout and return: it must be cheap and do no
  I/O.
"""

from __future__ import annotations

from typing import Final, Generic, TypeVar

C = TypeVar("C")

#: `Driver.status()`: the connection is idle and reusable as it is.
OK: Final = 0
#: `Driver.status()`: reusable once `Driver.clean()` ran (a transaction open, a query running).
DIRTY: Final = 1
#: `Driver.status()`: closed or unusable; the pool closes and replaces it.
BROKEN: Final = 2


class Driver(Generic[C]):
    """How one kind of connection is made, tested, cleaned and closed.

    Subclass it and implement `connect()`, `close()` and `status()`;
    `clean()` and `ping()` have defaults that do nothing. The class
    attributes state what the engine must allow for.
    """

    #: Connections can only be used in the gevent hub that made them (a
    #: patched pymysql socket belongs to its hub): the background jobs of a
    #: patched program's other threads run in its main hub, not in threads
    #: of their own.
    hub_bound: bool = False

    #: A connect that fails fails the first queued request with its error, as
    #: a client making its own connect would see it (playhouse's behaviour).
    #: False: requests wait on, for their timeout, while some connection may
    #: come back (psycopg_pool's).
    connect_error_fails_a_request: bool = False

    #: Closing a connection does no network I/O and must not leave the
    #: caller (SQLite: a close racing a use in another thread can crash the
    #: process): the pool closes in the caller, not in the background.
    closes_inline: bool = False

    def connect(self) -> C:
        """Make a new connection; raise on failure (the pool retries with backoff)."""
        raise NotImplementedError

    def close(self, conn: C) -> None:
        """Close a connection; errors are logged and otherwise ignored."""
        raise NotImplementedError

    def status(self, conn: C) -> int:
        """`OK`, `DIRTY` or `BROKEN`, from local state only (no I/O)."""
        raise NotImplementedError

    def checkout_status(self, conn: C) -> int:
        """`status()` of a connection taken from the idle bag, to be lent.

        A driver that can tell without a round trip whether the server closed
        the connection, or sent it an error, while it sat idle (a zero-timeout
        poll of its socket: readable means it did) says `BROKEN` then, and the
        pool lends another. Not asked of a connection handed straight from a
        return to a waiting request. Default: `status()`.
        """
        return self.status(conn)

    def clean(self, conn: C) -> None:
        """Bring a `DIRTY` connection back to `OK` (roll back, cancel), or raise."""

    def busy(self, conn: C) -> bool:
        """Whether a query interrupted mid-flight still runs on `conn` (no I/O).

        Asked of a `DIRTY` connection before `clean()`, for the stats: one
        that can't be cleaned is then counted as closed for "returned_active"
        rather than "broken". Default: False.
        """
        return False

    def ping(self, conn: C) -> None:
        """Check with a round trip that `conn` works; raise if it doesn't."""

    def is_permanent(self, error: BaseException) -> bool:
        """Whether a connect's `error` is a configuration error that retrying won't fix soon
        (authentication failed, unknown database or role): `wait()` and `open(wait=True)`
        then fail at once with it, and retries slow to the longest backoff step. Default: False."""
        return False

    def is_failover(self, error: BaseException) -> bool:
        """Whether `error`, raised by a query on a pooled connection, says its server is no
        longer the primary (shutting down, crashed, read-only): then the pool replaces
        every connection of that server (`Pool.failover()`). Default: False."""
        return False
