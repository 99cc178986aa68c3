"""A Celery app whose tasks use Peewee models and a psycopg pool through greenpool.

Run a worker (the gevent pool comes from the configuration below; greenpool
re-executes the worker with --pool=gevent so that gevent patches it first):

    celery -A examples.celery_app worker -c 100 --loglevel=info

and send it work from another shell:

    python -c "from examples.celery_app import add_note, count_notes; \
add_note.delay('hello').get(timeout=10); print(count_notes.delay().get(timeout=10))"

Settings come from the environment: GREENPOOL_DSN (a libpq DSN, default
host=127.0.0.1 user=postgres dbname=test), CELERY_BROKER_URL and
CELERY_RESULT_BACKEND (default: Redis on 127.0.0.1:6379).
"""

import os

import peewee
from celery import Celery
from psycopg.conninfo import conninfo_to_dict

from greenpool import ConnectionPool
from greenpool.celery import setup
from greenpool.peewee import PooledPostgresqlDatabase

DSN = os.environ.get("GREENPOOL_DSN", "host=127.0.0.1 user=postgres dbname=test")

app = Celery(
    "greenpool_example",
    broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
)
app.conf.worker_pool = "gevent"  # greenpool makes this work (Celery alone only patches for -P gevent)
app.conf.task_default_queue = os.environ.get("GREENPOOL_EXAMPLE_QUEUE", "greenpool_example")

# The pools: opened by the worker when it starts, closed when it stops.
pool = ConnectionPool(DSN, min_size=2, max_size=20, open=False, name="example")
params = conninfo_to_dict(DSN)
db = PooledPostgresqlDatabase(params.pop("dbname"), max_connections=20, timeout=10, **params)
setup(app, pool, db)


class Note(peewee.Model):
    text = peewee.TextField()

    class Meta:
        database = db
        table_name = "greenpool_celery_note"


@app.task
def add_note(text: str) -> int:
    """Store a note with Peewee; return its id."""
    with db.connection_context():
        db.create_tables([Note], safe=True)
        return Note.create(text=text).id


@app.task
def count_notes() -> int:
    """Count the notes with a plain psycopg query on the pool."""
    with pool.connection() as conn:
        conn.execute("create table if not exists greenpool_celery_note (id serial primary key, text text)")
        row = conn.execute("select count(*) from greenpool_celery_note").fetchone()
        return int(row[0]) if row else 0
