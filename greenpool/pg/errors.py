"""The psycopg pools' errors: greenpool's, and psycopg_pool's too.

Each is a subclass of `greenpool.errors`' class and, when psycopg_pool is
installed, of psycopg_pool's class of the same name (else of
`psycopg.OperationalError`, as psycopg_pool's are), so existing
`except psycopg_pool.PoolTimeout` clauses keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg import errors as e

from .. import errors

if TYPE_CHECKING:
    from psycopg_pool import PoolClosed as _PoolClosed
    from psycopg_pool import PoolTimeout as _PoolTimeout
    from psycopg_pool import TooManyRequests as _TooManyRequests
else:
    try:
        from psycopg_pool import PoolClosed as _PoolClosed
        from psycopg_pool import PoolTimeout as _PoolTimeout
        from psycopg_pool import TooManyRequests as _TooManyRequests
    except ImportError:  # pragma: no cover - psycopg_pool is optional
        _PoolClosed = _PoolTimeout = _TooManyRequests = e.OperationalError


class PoolTimeout(errors.PoolTimeout, _PoolTimeout):
    """The pool couldn't provide a connection in acceptable time."""


class PoolClosed(errors.PoolClosed, _PoolClosed):
    """Attempt to get a connection from a closed pool."""


class TooManyRequests(errors.TooManyRequests, _TooManyRequests):
    """Too many requests in the queue waiting for a connection from the pool."""
