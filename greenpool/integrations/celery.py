"""Celery: greenpool's pools in a worker, set up in one call.

In the module that makes the Celery app::

    from greenpool.celery import setup

    app = Celery("tasks", broker=...)
    app.conf.worker_pool = "gevent"        # or `celery worker -P gevent`
    pool = ConnectionPool(DSN, max_size=20, open=False)
    db = PooledPostgresqlDatabase("app", max_connections=20)
    setup(app, pool, db)

`setup()` connects Celery signal handlers that, in a worker of `app`:

- make `worker_pool = "gevent"` in the configuration work: Celery patches
  only for `-P gevent` on its command line, so a worker configured that way
  would run unpatched (queries block the hub, the worker serializes or
  hangs). The worker is re-executed once with `--pool=gevent` before any task
  runs; where that can't be done (`app.worker_main()` in another program) it
  stops with an error saying what to do;
- open the pools when the worker starts (and wait up to `open_timeout` for
  `min_size` connections) and close them once its running tasks were joined
  at shutdown; in each prefork child, forget the connections inherited from
  the parent (never closing the parent's) and open fresh ones;
- after every task, give back what the task still holds: a `getconn()`
  never `putconn()`-ed, a Peewee connection opened by autoconnect and never
  closed (rolled back, or its query cancelled if one still runs), counted
  in `Integration.reclaimed` and logged;
- log one line when the worker is ready: pools, sizes, the task pool and its
  concurrency, and the patch state, with a warning when a pool's `max_size`
  exceeds the connections the worker can use at once, or the connections
  the pools may open exceed the server's `max_connections`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

from celery import signals

from .._runtime.import_order import gevent_patched, import_traps
from ..engine import Pool

logger = logging.getLogger("greenpool.celery")

#: Set in the environment of a worker re-executed with `--pool=gevent`.
REEXEC_MARKER = "GREENPOOL_CELERY_REEXECUTED"
#: Seconds the start line's check waits for one of a pool's connections to ask the server its limit.
SERVER_LIMIT_TIMEOUT = 5.0

__all__ = ["Integration", "integration_for", "setup"]

#: The `Integration` of each app's latest `setup()` (for `python -m greenpool doctor`).
_integrations: weakref.WeakKeyDictionary[Any, Integration] = weakref.WeakKeyDictionary()


def setup(app: Any, *pools: Any, open_timeout: float = 10.0, metrics_port: int | None = None) -> Integration:
    """Look after `pools` (greenpool pools and pooled Peewee databases) in `app`'s workers.

    `open_timeout` (default 10 s) bounds the wait for `min_size` connections
    when a worker (or prefork child) starts; a pool not ready by then goes
    on connecting in the background, with a warning. `metrics_port`
    (default None: none) serves the pools' Prometheus metrics on that port
    from the worker (`greenpool.integrations.prometheus.serve_worker_metrics`;
    the `prometheus` extra). Return the `Integration`, whose `reclaimed`
    counts connections given back after tasks. Calling it again for the
    same app replaces the earlier setup.
    """
    if isinstance(open_timeout, bool) or not isinstance(open_timeout, (int, float)) or not open_timeout >= 0:
        raise ValueError(f"open_timeout must be a number of seconds >= 0, got {open_timeout!r}")
    if metrics_port is not None:
        if isinstance(metrics_port, bool) or not isinstance(metrics_port, int) or not 0 < metrics_port < 65536:
            raise ValueError(f"metrics_port must be a TCP port (1-65535) or None, got {metrics_port!r}")
        from . import prometheus  # noqa: F401 - without prometheus_client, fail here rather than in the worker
    integration = Integration(app, [Member(p) for p in pools], float(open_timeout), metrics_port)
    integration.connect()
    _integrations[app] = integration
    return integration


def integration_for(app: Any) -> Integration | None:
    """The `Integration` the latest `setup()` for `app` returned, or None if it was never set up."""
    return _integrations.get(app)


class Member:
    """One pool, or pooled Peewee database, an `Integration` looks after."""

    def __init__(self, pooled: Any) -> None:
        engine = pooled if isinstance(pooled, Pool) else getattr(pooled, "pool", None)
        if not isinstance(engine, Pool):
            raise TypeError(
                "setup() takes greenpool pools (greenpool.ConnectionPool) and pooled Peewee"
                f" databases (greenpool.peewee.PooledDatabase), got {pooled!r}"
            )
        self.pooled = pooled
        self.engine: Pool[Any] = engine
        self.database = None if pooled is engine else pooled

    def __repr__(self) -> str:
        kind = "peewee" if self.database is not None else "psycopg"
        return f"{self.engine.name!r} ({kind}, {self.engine.min_size}-{self.engine.max_size} connections)"

    def open(self) -> None:
        """Open the pool (a no-op if it is open)."""
        self.engine.open()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them."""
        if self.database is not None:
            self.database.dispose()
        else:
            self.engine.forget_all()

    def reclaim(self) -> int:
        """Give back what the calling greenlet (or thread) still holds; return how many."""
        if self.database is None:
            reclaim = getattr(self.pooled, "reclaim", None)
            return int(reclaim()) if reclaim is not None else 0
        db = self.database
        if db.is_closed():
            return 0
        logger.warning("a task left a connection of %r open: closing it", self.engine.name)
        db.close()
        return 1

    def close(self) -> None:
        """Close the pool: idle connections now, lent ones when they come back."""
        if self.database is not None:
            self.database.close_idle()
        self.engine.close()

    def server_limit(self) -> int | None:
        """The server's `max_connections` minus its reserved ones, or None if unknown.

        Asked on one of the pool's own connections, so that the question
        never takes the server past the pool's `max_size`; a pool with
        `min_size` 0 closes it afterwards rather than keep it idle.
        """
        try:
            slot = self.engine.acquire(timeout=SERVER_LIMIT_TIMEOUT)
        except Exception as ex:
            logger.debug("couldn't ask %r's server its connection limit: %s", self.engine.name, ex)
            return None
        try:
            module = type(slot.conn).__module__
            if module.startswith(("psycopg", "greenpool")):
                sql = (
                    "select current_setting('max_connections')::int"
                    " - current_setting('superuser_reserved_connections')::int"
                )
            elif module.startswith("pymysql"):
                sql = "select @@max_connections"
            else:
                return None
            cur = slot.conn.cursor()
            cur.execute(sql)
            row = cur.fetchone()
            return int(row[0]) if row else None
        except Exception as ex:
            logger.debug("couldn't ask %r's server its connection limit: %s", self.engine.name, ex)
            return None
        finally:
            if self.engine.min_size:
                self.engine.release(slot)  # rolled back there if the query left a transaction open
            else:
                self.engine.discard(slot)  # a pool kept empty stays empty: no connection idles for this


class Integration:
    """The signal handlers `setup()` connects for one Celery app (see the module docstring)."""

    def __init__(
        self, app: Any, members: Iterable[Member], open_timeout: float, metrics_port: int | None = None
    ) -> None:
        self.app = app
        self.members = list(members)
        self.open_timeout = open_timeout
        self.metrics_port = metrics_port
        #: Connections given back after tasks that still held them.
        self.reclaimed = 0
        #: The task pool ("gevent", "prefork", "threads", "solo", ...) and its concurrency, once a worker starts.
        self.task_pool: str | None = None
        self.concurrency: int | None = None
        self._pid = os.getpid()

    def connect(self) -> None:
        """Connect the signal handlers (replacing those of an earlier setup for this app)."""
        uid = f"greenpool-{id(self.app):x}"
        for signal, handler in (
            (signals.worker_init, self.on_worker_init),
            (signals.worker_process_init, self.on_worker_process_init),
            (signals.worker_ready, self.on_worker_ready),
            (signals.task_postrun, self.on_task_postrun),
            (signals.worker_process_shutdown, self.on_worker_process_shutdown),
            (signals.worker_shutdown, self.on_worker_shutdown),
        ):
            signal.disconnect(dispatch_uid=uid)
            signal.connect(handler, weak=False, dispatch_uid=uid)

    # -- worker start ------------------------------------------------------

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """The worker is set up, no task runs yet: patch (re-execute) if needed, open the pools."""
        if getattr(sender, "app", None) is not self.app:
            return
        self.task_pool = task_pool_name(getattr(sender, "pool_cls", None))
        self.concurrency = getattr(sender, "concurrency", None)
        if self.task_pool == "gevent":
            if not gevent_patched():
                reexecute_with_gevent_pool()
            # Celery warns that `worker_pool` can't select gevent: here it did.
            warnings.filterwarnings("ignore", message=r"\s*The worker_pool setting shouldn't be used")
        if self.task_pool != "prefork":  # the children open their own (worker_process_init)
            self._open_all()
        if self.metrics_port is not None:
            from .prometheus import serve_worker_metrics

            serve_worker_metrics(self.metrics_port, self.task_pool)

    def on_worker_process_init(self, **_: Any) -> None:
        """A prefork child (or the solo pool's process) starts: fresh connections of its own."""
        if os.getpid() != self._pid:
            for member in self.members:
                member.after_fork()
        self._open_all()

    def _open_all(self) -> None:
        for member in self.members:
            member.open()
        for member in self.members:
            if not member.engine.wait_ready(self.open_timeout):
                logger.warning(
                    "pool %r has not its %d connections after %s s; it goes on connecting in the background",
                    member.engine.name,
                    member.engine.min_size,
                    self.open_timeout,
                )

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        """Log the setup once, with warnings about sizes."""
        if getattr(sender, "app", None) is not self.app:
            return
        for line, level in self.report():
            logger.log(level, "%s", line)

    def report(self) -> list[tuple[str, int]]:
        """The start-up lines: the setup, then warnings about sizes (each with its log level)."""
        processes = self.concurrency if self.task_pool == "prefork" and self.concurrency else 1
        # Each task (greenlet, thread, process) uses one connection of a pool at a time.
        at_once = 1 if self.task_pool == "prefork" else (self.concurrency or 1)
        lines = [
            (
                f"greenpool: {len(self.members)} pool(s) in a {self.task_pool} worker, concurrency"
                f" {self.concurrency}, {patch_state()}: " + ", ".join(map(repr, self.members)),
                logging.INFO,
            )
        ]
        for member in self.members:
            if member.engine.max_size > at_once and member.engine.max_size != 2**31 - 1:
                lines.append(
                    (
                        f"greenpool: pool {member.engine.name!r} may open {member.engine.max_size} connections,"
                        f" but a {self.task_pool} worker of concurrency {self.concurrency} uses at most"
                        f" {at_once} at once per process: lower max_size",
                        logging.WARNING,
                    )
                )
        planned = processes * sum(m.engine.max_size for m in self.members)
        for member in self.members:
            limit = member.server_limit()
            if limit is not None and planned > limit:
                lines.append(
                    (
                        f"greenpool: the pools may open {planned} connections ({processes} process(es)),"
                        f" but the server of {member.engine.name!r} accepts {limit}: lower max_size or"
                        " use PgBouncer",
                        logging.WARNING,
                    )
                )
                break
        return lines

    # -- tasks -------------------------------------------------------------

    def on_task_postrun(self, sender: Any = None, task_id: Any = None, **_: Any) -> None:
        """A task ended (in its own greenlet or thread, also after a time limit or a revoke)."""
        if getattr(sender, "app", None) is not self.app:
            return
        for member in self.members:
            reclaimed = member.reclaim()
            if reclaimed:
                self.reclaimed += reclaimed
                logger.warning(
                    "task %s[%s] ended holding %d connection(s) of %r: given back",
                    getattr(sender, "name", sender),
                    task_id,
                    reclaimed,
                    member.engine.name,
                )

    # -- worker stop -------------------------------------------------------

    def on_worker_process_shutdown(self, **_: Any) -> None:
        """A prefork child stops."""
        if os.getpid() != self._pid:
            self._close_all()

    def on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        """The worker stops, its running tasks joined: close the pools."""
        if getattr(sender, "app", None) is self.app:
            self._close_all()

    def _close_all(self) -> None:
        for member in self.members:
            try:
                member.close()
            except Exception:
                logger.exception("closing %r failed", member.engine.name)


def task_pool_name(pool_cls: Any) -> str:
    """Celery's name of a task pool class (or alias): gevent, prefork, threads, solo, eventlet."""
    if isinstance(pool_cls, str):
        name = pool_cls.rpartition(":")[0] or pool_cls
    else:
        name = getattr(pool_cls, "__module__", "")
    name = name.rpartition(".")[2]
    return {"thread": "threads", "processes": "prefork"}.get(name, name or "?")


def patch_state() -> str:
    """The gevent patch state, and the import-order traps greenpool copes with."""
    if not gevent_patched():
        return "not patched by gevent"
    notes = [f"{trap.library} imported before patching ({trap.handled})" for trap in import_traps() if trap.coped_with]
    return "patched by gevent" + "".join(f"; {note}" for note in notes)


def started_by_celery_command() -> bool:
    """Whether this process is the `celery` command (or `python -m celery`) running a worker."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    by_command = getattr(spec, "name", None) == "celery.__main__" or os.path.basename(sys.argv[0]) == "celery"
    return by_command and "worker" in sys.argv


def reexecute_with_gevent_pool() -> None:
    """Replace this worker process with the same command and `--pool=gevent`, which Celery patches for.

    Raise SystemExit, saying what to do, where it can't (a worker started
    by `app.worker_main()`, or one re-executed already and still unpatched).
    """
    fix = (
        "start the worker with `celery -A <app> worker -P gevent`, or call"
        " `gevent.monkey.patch_all()` before anything else is imported"
    )
    if os.environ.get(REEXEC_MARKER):
        raise SystemExit(f"greenpool: the worker uses the gevent pool but gevent has not patched it: {fix}")
    if not started_by_celery_command():
        raise SystemExit(
            "greenpool: worker_pool = 'gevent', but this worker (app.worker_main() or an embedding"
            f" program) is not monkey-patched by gevent, and its queries would block every task: {fix}"
        )
    argv = without_pool_option(sys.argv[1:]) + ["--pool=gevent"]
    print(
        "greenpool: worker_pool = 'gevent' is not enough for Celery to patch the process:"
        " running the worker again with --pool=gevent",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[REEXEC_MARKER] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "celery", *argv])


def without_pool_option(argv: list[str]) -> list[str]:
    """`argv` without its `-P X`, `-PX`, `--pool X` and `--pool=X` options."""
    result = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-P", "--pool"):
            skip = True
        elif not arg.startswith("--pool=") and not (arg.startswith("-P") and len(arg) > 2):
            result.append(arg)
    return result
