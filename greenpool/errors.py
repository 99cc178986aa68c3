"""Errors raised by the pool engine.

The engine knows no driver. Adapters subclass these together with their
driver's base error (the psycopg adapter makes them `psycopg.OperationalError`
subclasses, like psycopg_pool's) and tell the engine which classes to raise.
"""

from __future__ import annotations


class PoolError(Exception):
    """Base class of the errors the pool raises."""


class PoolTimeout(PoolError):
    """The pool couldn't provide a connection in acceptable time."""


class PoolClosed(PoolError):
    """Attempt to use a pool that is closed or not open yet."""


class TooManyRequests(PoolError):
    """Too many requests already wait for a connection (`max_waiting`)."""
