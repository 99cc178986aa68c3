"""greenpool: a gevent-aware connection pool for psycopg 3 and Peewee.

`from greenpool import ConnectionPool` is a drop-in for
`psycopg_pool.ConnectionPool` that never serializes greenlets on a lock,
replaces connections before they expire and survives interrupted queries.
"""

from __future__ import annotations

from typing import Any

from .errors import PoolError
from .retry import retry

__version__ = "0.1.0"

__all__ = [
    "ConnectionPool",
    "GeventConnection",
    "NullConnectionPool",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "TooManyRequests",
    "__version__",
    "retry",
]

_PSYCOPG_NAMES = {
    "ConnectionPool": "pg",
    "NullConnectionPool": "pg",
    "PoolClosed": "pg",
    "PoolTimeout": "pg",
    "TooManyRequests": "pg",
    "GeventConnection": "pg",
}


def __getattr__(name: str) -> Any:
    # psycopg is an optional extra: import the psycopg pool only when asked,
    # so `import greenpool` works for Peewee/MySQL users without psycopg.
    module = _PSYCOPG_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'greenpool' has no attribute {name!r}")
    from importlib import import_module

    try:
        imported = import_module(f".{module}", __name__)
    except ModuleNotFoundError as ex:
        if ex.name not in ("psycopg", "psycopg_pool"):
            raise
        raise ModuleNotFoundError(
            f"greenpool.{name} needs psycopg 3: pip install 'greenpool[psycopg]' ({ex})", name=ex.name
        ) from ex
    value = getattr(imported, name)
    globals()[name] = value
    return value
