"""`playhouse.db_url` schemes for the pooled databases."""

from __future__ import annotations

from playhouse.db_url import register_database

from .databases import (
    PooledMySQLDatabase,
    PooledPostgresqlDatabase,
    PooledPostgresqlExtDatabase,
    PooledPsycopg3Database,
    PooledSqliteDatabase,
)

#: Scheme -> class, as `register_urls()` registers them.
SCHEMES = {
    "greenpool+postgres": PooledPostgresqlDatabase,
    "greenpool+postgresql": PooledPostgresqlDatabase,
    "greenpool+postgresext": PooledPostgresqlExtDatabase,
    "greenpool+postgresqlext": PooledPostgresqlExtDatabase,
    "greenpool+psycopg3": PooledPsycopg3Database,
    "greenpool+mysql": PooledMySQLDatabase,
    "greenpool+sqlite": PooledSqliteDatabase,
}


def register_urls() -> None:
    """Let `playhouse.db_url.connect()` make pooled databases from `greenpool+...://` URLs.

    `greenpool+postgres://user@host/db?max_connections=20` and the other
    `SCHEMES`. Importing `greenpool.peewee` calls it; calling it again is
    harmless.
    """
    for scheme, database_class in SCHEMES.items():
        register_database(database_class, scheme)
