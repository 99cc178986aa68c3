"""The ready pooled database classes, with playhouse's names.

Each takes the pool's options before peewee's connect parameters, as
playhouse's do: so its `init()` differs from peewee's class's, which is what
the type checker's `misc` error here says (and postgres_ext has no type hints).
"""

from __future__ import annotations

import peewee
from playhouse.postgres_ext import PostgresqlExtDatabase, Psycopg3Database

from .database import PooledDatabase


class PooledPostgresqlDatabase(PooledDatabase, peewee.PostgresqlDatabase):  # type: ignore[misc]
    """Pooled `PostgresqlDatabase` (psycopg 3)."""


class PooledPostgresqlExtDatabase(PooledDatabase, PostgresqlExtDatabase):  # type: ignore[misc]
    """Pooled `playhouse.postgres_ext.PostgresqlExtDatabase` (psycopg 3)."""


class PooledPsycopg3Database(PooledDatabase, Psycopg3Database):  # type: ignore[misc]
    """Pooled `playhouse.postgres_ext.Psycopg3Database`."""


class PooledMySQLDatabase(PooledDatabase, peewee.MySQLDatabase):  # type: ignore[misc]
    """Pooled `MySQLDatabase` (pymysql)."""


class PooledSqliteDatabase(PooledDatabase, peewee.SqliteDatabase):  # type: ignore[misc]
    """Pooled `SqliteDatabase`."""
