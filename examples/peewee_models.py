"""Peewee models on greenpool's pooled database, under gevent.

GREENPOOL_DSN="host=127.0.0.1 user=postgres dbname=test" python examples/peewee_models.py

Your own database class gets the pool the same way: `class MyDB(PooledDatabase, PostgresqlDatabase)`.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

import gevent  # noqa: E402
import peewee  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from greenpool.peewee import PooledDatabase  # noqa: E402


class AppDatabase(PooledDatabase, peewee.PostgresqlDatabase):
    """A project's own database class, pooled (the ready PooledPostgresqlDatabase is the same)."""


params = conninfo_to_dict(os.environ.get("GREENPOOL_DSN", "host=127.0.0.1 user=postgres dbname=test"))
db = AppDatabase(params.pop("dbname"), max_connections=10, stale_timeout=300, timeout=10, **params)


class Note(peewee.Model):
    text = peewee.TextField()

    class Meta:
        database = db
        table_name = "greenpool_example_note"


def add(i: int) -> None:
    with db.connection_context():
        with db.atomic():
            Note.create(text=f"note {i}")


def main() -> None:
    with db.connection_context():
        db.drop_tables([Note])  # a fresh table, whatever an earlier run left
        db.create_tables([Note])
    gevent.joinall([gevent.spawn(add, i) for i in range(100)], raise_error=True)
    with db.connection_context():
        print("notes:", Note.select().count())
        db.drop_tables([Note])
    print("pool:", db.pool_stats())
    db.close_all()


if __name__ == "__main__":
    main()
