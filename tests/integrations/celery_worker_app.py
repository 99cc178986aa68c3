"""The Celery app the integration tests run real workers of.

Configured by the environment, so one module serves every test:

GREENPOOL_TEST_DSN        the PostgreSQL the pools use
CELERY_BROKER_URL         the broker (Redis or RabbitMQ)
CELERY_RESULT_BACKEND     the result backend (Redis)
GP_QUEUE                  the queue this worker consumes (one per test)
GP_APP_NAME               application_name of the pools' connections
GP_POOL_SIZE              max_size of the psycopg pool (default 10)
GP_CONFIG_POOL            if set, `worker_pool` in the configuration
GP_OPEN_AT_IMPORT         if set, the psycopg pool opens at import (in the
                          prefork parent) and writes its backend pids to
                          the file named by GP_PARENT_PIDS
GP_METRICS_PORT           if set, `setup()`'s `metrics_port`
"""

from __future__ import annotations

import os

import peewee
from celery import Celery
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import greenpool.celery
from greenpool import ConnectionPool
from greenpool.peewee import PooledPostgresqlDatabase

APP_NAME = os.environ.get("GP_APP_NAME", "gp_celery_test")
DSN = make_conninfo(os.environ["GREENPOOL_TEST_DSN"], application_name=APP_NAME)
POOL_SIZE = int(os.environ.get("GP_POOL_SIZE", "10"))

app = Celery("gp_celery_test", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_RESULT_BACKEND"])
app.conf.task_default_queue = os.environ["GP_QUEUE"]
app.conf.worker_prefetch_multiplier = 1
app.conf.broker_connection_retry_on_startup = True
if os.environ.get("GP_CONFIG_POOL"):
    app.conf.worker_pool = os.environ["GP_CONFIG_POOL"]

pool = ConnectionPool(DSN, min_size=2, max_size=POOL_SIZE, open=False, name="tasks", timeout=30)
params = conninfo_to_dict(DSN)
db = PooledPostgresqlDatabase(params.pop("dbname"), max_connections=POOL_SIZE, timeout=30, **params)
METRICS_PORT = int(os.environ["GP_METRICS_PORT"]) if os.environ.get("GP_METRICS_PORT") else None
integration = greenpool.celery.setup(app, pool, db, metrics_port=METRICS_PORT)

if os.environ.get("GP_OPEN_AT_IMPORT"):
    pool.open(wait=True, timeout=20)
    with open(os.environ["GP_PARENT_PIDS"], "w") as out:
        held = [pool.getconn() for _ in range(2)]
        out.write(" ".join(str(c.info.backend_pid) for c in held))
        for conn in held:
            pool.putconn(conn)


class Item(peewee.Model):
    n = peewee.IntegerField()

    class Meta:
        database = db
        table_name = "gp_celery_item"


@app.task
def hold(seconds: float) -> int:
    """Hold a connection of the psycopg pool for `seconds` (on the server); return its backend pid."""
    with pool.connection() as conn:
        conn.execute("select pg_sleep(%s)", [seconds])
        return int(conn.info.backend_pid)


@app.task
def peewee_hold(seconds: float) -> int:
    """The same through Peewee, in a connection_context()."""
    with db.connection_context():
        db.execute_sql("select pg_sleep(%s)", (seconds,))
        return int(db.connection().info.backend_pid)


@app.task
def peewee_autoconnect() -> int:
    """A query through autoconnect, the connection never closed."""
    return int(db.execute_sql("select 1").fetchone()[0])


@app.task
def getconn_and_forget() -> int:
    """`getconn()` without `putconn()`."""
    conn = pool.getconn()
    return int(conn.info.backend_pid)


@app.task
def pool_state() -> dict[str, object]:
    """The pools' stats and what the integration saw, in this worker process."""
    return {
        "pool": pool.get_stats(),
        "db": db.pool_stats(),
        "reclaimed": integration.reclaimed,
        "task_pool": integration.task_pool,
        "concurrency": integration.concurrency,
        "pid": os.getpid(),
        "patched": greenpool.integrations.celery.gevent_patched(),
    }
