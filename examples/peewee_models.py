"""Peewee models on greenpool's pooled database, under gevent.

python examples/peewee_models.py      # uses PostgreSQL on 127.0.0.1, database test
"""

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
import peewee  # noqa: E402

from greenpool.peewee import PooledPostgresqlDatabase  # noqa: E402

db = PooledPostgresqlDatabase(
    "test", host="127.0.0.1", user="postgres", max_connections=10, stale_timeout=300, timeout=10
)


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
        db.create_tables([Note])
    gevent.joinall([gevent.spawn(add, i) for i in range(100)], raise_error=True)
    with db.connection_context():
        print("notes:", Note.select().count())
        db.drop_tables([Note])
    print("pool:", db.pool_stats())
    db.close_all()


if __name__ == "__main__":
    main()
