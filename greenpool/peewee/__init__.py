"""Peewee on the greenpool engine: pooled databases, drop-ins for `playhouse.pool`'s.

- `database`: the `PooledDatabase` mixin (`class MyDB(PooledDatabase, PostgresqlDatabase)`).
- `databases`: the ready classes, with playhouse's names.
- `drivers`: the engine's drivers, one per server kind (psycopg 3, pymysql, sqlite3).
- `urls`: `register_urls()`, the `greenpool+postgres://`-style schemes of `playhouse.db_url`.

Importing this package registers the URL schemes (`register_urls()`).
"""

from __future__ import annotations

try:
    from playhouse.pool import MaxConnectionsExceeded
except ModuleNotFoundError as ex:  # peewee is an optional extra
    if ex.name not in ("peewee", "playhouse", "playhouse.pool"):
        raise
    raise ModuleNotFoundError(
        f"greenpool.peewee needs peewee: pip install 'greenpool[peewee]' ({ex})", name=ex.name
    ) from ex

from .database import PooledDatabase
from .databases import (
    PooledMySQLDatabase,
    PooledPostgresqlDatabase,
    PooledPostgresqlExtDatabase,
    PooledPsycopg3Database,
    PooledSqliteDatabase,
)
from .urls import register_urls

__all__ = [
    "MaxConnectionsExceeded",
    "PooledDatabase",
    "PooledMySQLDatabase",
    "PooledPostgresqlDatabase",
    "PooledPostgresqlExtDatabase",
    "PooledPsycopg3Database",
    "PooledSqliteDatabase",
    "register_urls",
]

register_urls()
