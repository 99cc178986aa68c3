"""The Celery app of the benchmark's ``celery`` scenario (see `greenpool.bench.celery_scenario`).

The scenario starts a real worker on it, ``python -m celery -A
greenpool.bench.celery_worker worker -P gevent -c 200 ...``, with its
configuration in the environment variable ``GREENPOOL_BENCH_CELERY`` (a JSON
object): ``broker`` (URL), ``transport_options``, ``queue``, ``contender``
(a `greenpool.bench.contenders.CONTENDERS` name, or ``none`` for tasks
that touch no database), ``dsn``, ``pool_size``, ``kwargs`` (the
connections' psycopg keywords), ``timeout`` (the pool's) and ``results``
(a file path).

Importing the module (in the worker, after Celery's monkey-patch) opens the
contender full, as an application opens its pools at start; greenpool's
pools are also handed to `greenpool.celery.setup`, as the integration's
users do. The one task, `run_task`, borrows a connection for the whole task
(the way a task's code holds one), runs its queries on it, and appends one
line to the results file: ``<start> <acquired> <released> <end>``
(`time.monotonic()`, one clock for every process of the machine: the
task's start, the connection's borrow and return, the task's end). One
`os.write` of a short line to a file opened with ``O_APPEND`` is atomic,
so the task greenlets need no lock. The scenario reads the
lines; nothing goes through a result backend (``task_ignore_result``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from .celery_scenario import CONFIG_VARIABLE, NO_DATABASE, TASK_NAME


def _config() -> dict[str, Any]:
    raw = os.environ.get(CONFIG_VARIABLE)
    if not raw:
        raise RuntimeError(f"{CONFIG_VARIABLE} is not set: this app is started by `python -m greenpool bench`")
    config: dict[str, Any] = json.loads(raw)
    return config


def _open_contender(config: dict[str, Any]) -> Any:
    """The configured contender, opened full; None for `NO_DATABASE`."""
    if config["contender"] == NO_DATABASE:
        return None
    from .backends import resolve_connection_class
    from .contenders import CONTENDERS, ContenderConfig
    from .scenarios import CALM_LIFETIME

    contender = CONTENDERS[config["contender"]].factory(
        ContenderConfig(
            dsn=config["dsn"],
            pool_size=int(config["pool_size"]),
            max_lifetime=CALM_LIFETIME,
            connection_class=resolve_connection_class()[0],
            connect_kwargs=dict(config["kwargs"]),
            timeout=float(config["timeout"]),
        )
    )
    contender.open()
    return contender


CONFIG = _config()
app = Celery("greenpool-bench", broker=CONFIG["broker"], set_as_current=True)
app.conf.update(
    broker_transport_options=CONFIG.get("transport_options") or {},
    task_default_queue=CONFIG["queue"],
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
)
CONTENDER = _open_contender(CONFIG)
if CONFIG["contender"] in ("greenpool", "peewee-greenpool"):
    import greenpool.celery

    # As the integration's users run it: what a task leaves held is given back after it.
    greenpool.celery.setup(app, CONTENDER.pool if CONFIG["contender"] == "greenpool" else CONTENDER.db)
_RESULTS = os.open(CONFIG["results"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


@app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
def run_task(sql: str, queries: int) -> None:
    """Run `queries` x `sql` on one borrowed connection; append its times to the results file."""
    start = acquired = released = time.monotonic()
    if queries:
        assert CONTENDER is not None, "a worker without a database got a task with queries"
        execute = CONTENDER.execute
        with CONTENDER.borrow() as conn:
            acquired = time.monotonic()
            for _ in range(queries):
                execute(conn, sql)
            released = time.monotonic()
    os.write(_RESULTS, f"{start:.6f} {acquired:.6f} {released:.6f} {time.monotonic():.6f}\n".encode())
