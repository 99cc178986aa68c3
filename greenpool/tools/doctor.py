"""``python -m greenpool doctor``: what is wrong with the process a user runs, and how to fix it.

It checks, in this order, and prints one line per finding (``ok``, ``warn`` or ``FAIL``, each
``warn`` and ``FAIL`` with its fix), or a JSON document with ``--json``:

1. gevent: whether this process is monkey-patched, and the import-order traps it holds
   (`greenpool._runtime.import_order`): psycopg's wait function, peewee's thread-local state,
   pymysql's sockets, and what greenpool does about each.
2. With ``--app MODULE[:ATTR]``: the Celery app, found as ``celery -A`` finds it (the module
   may call `greenpool.celery.setup()`): its task pool and concurrency (``--pool`` and
   ``--concurrency`` stand for the worker's ``-P`` and ``-c``), the pools registered with
   greenpool's integration (and greenpool pools in the module that are not), each pool's
   ``min_size``/``max_size``, and the connections one worker may open (prefork: concurrency x
   the sum of ``max_size``; gevent, threads, solo: the sum).
3. The servers: ``--dsn`` (else ``$GREENPOOL_DSN``, else each PostgreSQL pool's own
   connection parameters) and ``--mysql`` (else ``$GREENPOOL_MYSQL``, else each MySQL
   database's): reachable or not, round trip (median of 20 ``select 1``), connect time
   (median of 5 connects), version, ``max_connections`` and the reserved connections against
   the planned total, and on PostgreSQL whether a pooler sits in between.

Pooler detection (PostgreSQL): PgBouncer (as pgcat, Odyssey, Pgpool-II) gives its clients a
cancel key of its own, so the backend pid a connection was told at start-up
(``conn.info.backend_pid``) differs from the server's ``pg_backend_pid()``; a direct connection's
match. When they differ, doctor connects to PgBouncer's admin console (database ``pgbouncer`` on
the same host and port, same user and password: the user must be in PgBouncer's
``admin_users`` or ``stats_users``), checks that its ``server_version`` ends in ``/bouncer``,
and reads ``SHOW CONFIG`` (``pool_mode``, ``default_pool_size``, ``max_client_conn``,
``reserve_pool_size``, ``max_db_connections``, ``max_prepared_statements``). Without the
console, several server pids seen over five ``select pg_backend_pid()`` in autocommit mean
transaction (or statement) pooling. A DSN naming the admin console itself is told by its
``server_version``.

Under the gevent task pool the check runs as the worker would: ``--pool gevent`` patches
before the app is imported, as ``celery worker -P gevent`` does; an app whose configuration
alone says ``worker_pool = "gevent"`` and that greenpool's integration looks after makes doctor
re-execute itself with ``--pool gevent``, as the integration re-executes the worker.

Exit status: 1 if any finding is ``FAIL`` (or, with ``--strict``, ``warn``), 2 for bad input
(one line naming the option), else 0. `diagnose()` runs the same checks from Python, in the
calling process, and returns the findings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from .._runtime.import_order import gevent_patched, import_traps, patched_after
from . import UsageError, one_line_errors, usage_error
from .plan import connections_at_once, processes_per_worker

__all__ = [
    "FAIL",
    "OK",
    "WARN",
    "Finding",
    "Report",
    "add_arguments",
    "diagnose",
    "load_app",
    "run",
]

OK = "ok"
WARN = "warn"
FAIL = "FAIL"

#: The PostgreSQL to check when --dsn is not given.
DSN_ENV = "GREENPOOL_DSN"
#: The MySQL/MariaDB to check when --mysql is not given.
MYSQL_ENV = "GREENPOOL_MYSQL"
#: Set in the environment of a doctor re-executed with --pool gevent.
REEXEC_MARKER = "GREENPOOL_DOCTOR_REEXECUTED"
#: Round trips and connects timed per server.
ROUND_TRIPS = 20
CONNECTS = 5
#: Celery's task pool names (`-P`).
CELERY_POOLS = ("prefork", "processes", "eventlet", "gevent", "solo", "threads", "custom")
#: max_size of an unbounded pool (NullConnectionPool, Peewee max_connections=0).
UNLIMITED = 2**31 - 1

_PROG = "python -m greenpool doctor"
_FLEET = "python -m greenpool plan"


@dataclass
class Finding:
    """One line of the report."""

    #: OK, WARN or FAIL.
    level: str
    #: What was checked: gevent, psycopg, peewee, pymysql, celery, pool, server, pgbouncer, mysql.
    check: str
    message: str
    #: What to do (every WARN and FAIL has one).
    fix: str | None = None
    #: The figures behind the message, for --json.
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """The finding as doctor prints it."""
        text = f"{self.level:<4} {self.check}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text


@dataclass
class Report:
    """The findings of one run."""

    findings: list[Finding]

    def problems(self, strict: bool = False) -> list[Finding]:
        """The FAIL findings, and with `strict` the WARN ones too."""
        levels = (FAIL, WARN) if strict else (FAIL,)
        return [f for f in self.findings if f.level in levels]

    def exit_status(self, strict: bool = False) -> int:
        """1 if there is a problem (see `problems()`), else 0."""
        return 1 if self.problems(strict) else 0

    def to_json(self, strict: bool = False) -> dict[str, Any]:
        """The report as a JSON-able dict: the findings, their counts, and the exit status."""
        counts = {level: sum(f.level == level for f in self.findings) for level in (OK, WARN, FAIL)}
        return {
            "exit_status": self.exit_status(strict),
            "strict": strict,
            "counts": counts,
            "findings": [
                {"level": f.level, "check": f.check, "message": f.message, "fix": f.fix, "data": f.data}
                for f in self.findings
            ],
        }


# ---------------------------------------------------------------- the Celery app


@dataclass
class PoolInfo:
    """A greenpool pool (or pooled Peewee database) the worker would use."""

    name: str
    #: "psycopg" or "peewee".
    adapter: str
    #: "postgresql", "mysql", "sqlite" or "unknown".
    server_kind: str
    min_size: int
    max_size: int
    pooled: Any
    engine: Any
    registered: bool

    def describe(self) -> str:
        """``'name' (psycopg, 2-20)``."""
        top = "unlimited" if self.max_size >= UNLIMITED else str(self.max_size)
        return f"{self.name!r} ({self.adapter}, {self.min_size}-{top})"


@dataclass
class AppInfo:
    """The Celery app under check, as the worker would see it."""

    spec: str
    app: Any = None
    error: str | None = None
    task_pool: str = "prefork"
    pool_source: str = "Celery's default"
    concurrency: int = 1
    concurrency_source: str = "Celery's default: the CPUs"
    integration: Any = None
    pools: list[PoolInfo] = field(default_factory=list)

    @property
    def gevent(self) -> bool:
        """Whether the worker runs the gevent task pool."""
        return self.task_pool == "gevent"


#: `load_app()`'s results (an app or the exception), by spec: a module is imported once.
_loaded: dict[str, Any] = {}


def load_app(spec: str) -> Any:
    """Import the Celery app `spec` (``MODULE[:ATTR]``) as ``celery -A`` does; raise if it can't be.

    The outcome is remembered: asked again, the same app is returned (or the
    same error raised) without importing the module again.
    """
    if spec not in _loaded:
        try:
            from celery import Celery
            from celery.app.utils import find_app

            app = find_app(spec)
            if not isinstance(app, Celery):
                raise TypeError(f"{spec} is a {type(app).__name__}, not a Celery app")
            _loaded[spec] = app
        except Exception as ex:
            _loaded[spec] = ex
    outcome = _loaded[spec]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _app_info(spec: str, app: Any, pool: str | None, pool_source: str | None, concurrency: int | None) -> AppInfo:
    from ..integrations.celery import integration_for, task_pool_name

    info = AppInfo(spec, app)
    if pool is not None:
        info.task_pool, info.pool_source = task_pool_name(pool), pool_source or "--pool"
    else:
        configured = app.conf.worker_pool
        if configured:
            info.task_pool = task_pool_name(configured)
            info.pool_source = "worker_pool in the configuration"
    if concurrency is not None:
        info.concurrency, info.concurrency_source = concurrency, "--concurrency"
    elif app.conf.worker_concurrency:
        info.concurrency = int(app.conf.worker_concurrency)
        info.concurrency_source = "worker_concurrency in the configuration"
    else:
        info.concurrency = os.cpu_count() or 1
    info.integration = integration_for(app)
    seen: set[int] = set()
    if info.integration is not None:
        for member in info.integration.members:
            seen.add(id(member.engine))
            info.pools.append(_pool_info(member.pooled, member.engine, registered=True))
    module = sys.modules.get(spec.partition(":")[0])
    for value in list(vars(module).values()) if module is not None else ():
        engine = _engine_of(value)
        if engine is not None and id(engine) not in seen:
            seen.add(id(engine))
            info.pools.append(_pool_info(value, engine, registered=False))
    return info


def _engine_of(value: Any) -> Any:
    """The greenpool engine behind `value` (a pool or a pooled Peewee database), or None."""
    if not any(c.__module__.startswith("greenpool.") for c in type(value).__mro__):
        return None
    from ..engine import Pool

    if isinstance(value, Pool):
        return value
    engine = getattr(value, "pool", None)
    return engine if isinstance(engine, Pool) else None


def _pool_info(pooled: Any, engine: Any, registered: bool) -> PoolInfo:
    adapter = "psycopg" if pooled is engine else "peewee"
    kind = "unknown"
    pg_pool = sys.modules.get("greenpool.pg.pool")
    peewee = sys.modules.get("peewee")
    if pg_pool is not None and isinstance(pooled, pg_pool.ConnectionPool):
        kind = "postgresql"
    elif peewee is not None and adapter == "peewee":
        for base, name in (
            (peewee.PostgresqlDatabase, "postgresql"),
            (peewee.MySQLDatabase, "mysql"),
            (peewee.SqliteDatabase, "sqlite"),
        ):
            if isinstance(pooled, base):
                kind = name
    return PoolInfo(engine.name, adapter, kind, engine.min_size, engine.max_size, pooled, engine, registered)


def _celery_findings(info: AppInfo) -> list[Finding]:
    findings: list[Finding] = []
    if info.error is not None:
        return [
            Finding(
                FAIL,
                "celery",
                f"--app {info.spec}: can't load the app: {info.error}",
                "give the module (and attribute) `celery -A` is given, run from the directory it runs from",
            )
        ]
    at_once = connections_at_once(info.task_pool, info.concurrency)
    processes = processes_per_worker(info.task_pool, info.concurrency)
    data = {
        "app": info.app.main,
        "task_pool": info.task_pool,
        "pool_source": info.pool_source,
        "concurrency": info.concurrency,
        "concurrency_source": info.concurrency_source,
        "processes": processes,
        "integration": info.integration is not None,
    }
    findings.append(
        Finding(
            OK,
            "celery",
            f"app {info.app.main!r}: task pool {info.task_pool} ({info.pool_source}), concurrency"
            f" {info.concurrency} ({info.concurrency_source})",
            data=data,
        )
    )
    if info.integration is None:
        findings.append(
            Finding(
                WARN,
                "celery",
                f"greenpool.celery.setup() was not called for app {info.app.main!r}: nothing opens the pools at"
                " worker start, gives back what a task leaves held, or closes them at shutdown",
                "call greenpool.celery.setup(app, pool, ...) in the module that makes the app",
            )
        )
    elif info.gevent and info.pool_source.startswith("worker_pool"):
        findings.append(
            Finding(
                OK,
                "celery",
                "worker_pool = 'gevent' in the configuration: greenpool's integration re-executes the worker with"
                " --pool=gevent, so Celery patches it before importing the app",
            )
        )
    if not info.pools:
        findings.append(Finding(OK, "pool", "no greenpool pool found in the app's module or its integration"))
        return findings
    for pool in info.pools:
        findings.extend(_pool_findings(pool, info, at_once))
    sizes = [p.max_size for p in info.pools if p.server_kind != "sqlite"]
    if any(size >= UNLIMITED for size in sizes):
        return findings
    total = processes * sum(sizes)
    how = (
        f"{processes} processes (prefork children) x {sum(sizes)}"
        if processes > 1
        else f"the sum of max_size over {len(sizes)} pool(s)"
    )
    findings.append(
        Finding(
            OK,
            "pool",
            f"one worker may open {total} connections ({how}); for a fleet of workers see `{_FLEET}`",
            data={"planned": total, "processes": processes, "max_sizes": sizes},
        )
    )
    return findings


def _pool_findings(pool: PoolInfo, info: AppInfo, at_once: int) -> list[Finding]:
    findings = []
    data = {
        "name": pool.name,
        "adapter": pool.adapter,
        "server": pool.server_kind,
        "min_size": pool.min_size,
        "max_size": None if pool.max_size >= UNLIMITED else pool.max_size,
        "registered": pool.registered,
    }
    if pool.registered:
        findings.append(Finding(OK, "pool", f"{pool.describe()} on {pool.server_kind}, registered", data=data))
    else:
        findings.append(
            Finding(
                WARN,
                "pool",
                f"{pool.describe()} on {pool.server_kind} is in the app's module but not registered with"
                " greenpool.celery.setup()",
                "pass it to greenpool.celery.setup(app, ...) so that the worker opens, repairs and closes it",
                data=data,
            )
        )
    if pool.max_size >= UNLIMITED:
        findings.append(
            Finding(
                WARN,
                "pool",
                f"{pool.name!r} has no max_size: only the server's limit bounds its connections",
                f"give it a max_size (at most {at_once}: what a process uses at once)",
                data=data,
            )
        )
    elif pool.max_size > at_once and pool.server_kind != "sqlite":
        findings.append(
            Finding(
                WARN,
                "pool",
                f"{pool.name!r} may open {pool.max_size} connections, but a {info.task_pool} worker of"
                f" concurrency {info.concurrency} uses at most {at_once} at once per process",
                f"lower max_size to {at_once} or less",
                data=data,
            )
        )
    connection_class = getattr(pool.pooled, "connection_class", None)
    if pool.adapter == "psycopg" and connection_class is not None and (info.gevent or gevent_patched()):
        from ..pg.connection import GeventConnection

        wait_c = "psycopg" in {trap.library for trap in import_traps()}
        if not issubclass(connection_class, GeventConnection) and (wait_c or not gevent_patched()):
            findings.append(
                Finding(
                    FAIL,
                    "pool",
                    f"{pool.name!r} makes connections of {connection_class.__qualname__}, not derived from"
                    " GeventConnection, and psycopg's wait function blocks the hub in this process: its queries run"
                    " one at a time",
                    "derive the class from greenpool.GeventConnection (or leave connection_class out)",
                    data=data,
                )
            )
    return findings


# ---------------------------------------------------------------- gevent and import order


def _process_findings(app: AppInfo | None, reexec_note: str | None) -> list[Finding]:
    findings = []
    patched = gevent_patched()
    intended = app is not None and app.error is None and app.gevent
    traps = {trap.library: trap for trap in import_traps()}
    if patched:
        how = f" ({app.pool_source})" if intended and app is not None else ""
        findings.append(Finding(OK, "gevent", f"the process is monkey-patched{how}", data={"patched": True}))
    elif intended and app is not None:
        if reexec_note is not None:
            findings.append(Finding(WARN, "gevent", reexec_note, f"run `{_PROG} --app {app.spec}` from a shell"))
        else:
            fix = "start the worker with -P gevent" + (
                ""
                if app.integration is not None
                else ", or call greenpool.celery.setup(app, ...) (it re-executes the worker with --pool=gevent)"
            )
            findings.append(
                Finding(
                    FAIL,
                    "gevent",
                    f"the worker runs the gevent task pool ({app.pool_source}) but nothing monkey-patches it:"
                    " Celery patches only for -P gevent on its command line; queries and the broker block the hub",
                    fix,
                    data={"patched": False},
                )
            )
    else:
        findings.append(
            Finding(
                OK,
                "gevent",
                "the process is not monkey-patched: fine for plain threads and processes (a program running"
                " greenlets calls gevent.monkey.patch_all() first)",
                data={"patched": False},
            )
        )
    for library in ("psycopg", "peewee", "pymysql"):
        if library not in sys.modules:
            continue
        trap = traps.get(library)
        if trap is None:
            findings.append(Finding(OK, library, _fine(library, patched), data={"trap": False}))
        else:
            # psycopg, peewee: greenpool copes, plain use doesn't. pymysql (an unpatched
            # process): fine in threads, a problem in a gevent worker, fatal for its MySQL pools.
            mysql_pools = app is not None and any(p.server_kind == "mysql" for p in app.pools)
            if trap.coped_with:
                level = WARN
            else:
                level = (FAIL if mysql_pools else WARN) if intended else OK
            message = f"{trap.found}: {trap.effect}; {trap.handled}"
            findings.append(Finding(level, library, message, trap.fix if level != OK else None, data={"trap": True}))
    return findings


def _fine(library: str, patched: bool) -> str:
    if library == "psycopg":
        if patched and patched_after("psycopg") is None:
            return "imported; psycopg.waiting not loaded yet, it will choose a cooperative wait"
        if patched:
            return "imported after gevent patched the process: its wait function cooperates"
        return (
            "imported, gevent not patching: its C wait function blocks (fine outside gevent; greenpool's"
            " GeventConnection waits cooperatively under a hub anyway)"
        )
    if library == "peewee":
        if patched:
            return "imported after gevent patched the process: its state is per greenlet"
        return "imported, gevent not patching: its state is per thread (greenpool's databases: per greenlet anyway)"
    return "sockets patched by gevent: cooperative"


# ---------------------------------------------------------------- servers


@dataclass
class Target:
    """A server to check, and the pools whose connections go there."""

    #: "postgresql" or "mysql".
    kind: str
    #: Where it comes from, password masked: "--dsn host=...", "pool 'tasks'".
    label: str
    connect: Callable[[], Any]
    close: Callable[[Any], None]
    pools: list[PoolInfo] = field(default_factory=list)


@dataclass
class ServerFacts:
    """What doctor learned of one server."""

    kind: str
    address: str
    label: str
    max_connections: int | None = None
    reserved: int = 0
    others: int | None = None
    pooler: bool = False
    pgbouncer: dict[str, str] | None = None
    pools: list[PoolInfo] = field(default_factory=list)

    @property
    def available(self) -> int | None:
        """Connections clients may open: max_connections minus the reserved ones."""
        return None if self.max_connections is None else self.max_connections - self.reserved


def _one_line(ex: BaseException) -> str:
    text = " ".join(str(ex).split())
    return f"{type(ex).__name__}: {text}" if text else type(ex).__name__


def _masked_dsn(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def _mysql_params(url: str, source: str = "--mysql") -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb", "mysql+pymysql") or not parts.netloc:
        raise UsageError(f"{source} must be a mysql://user:password@host:port/database URL, got {_masked_url(url)!r}")
    try:
        port = parts.port or 3306
    except ValueError:
        raise UsageError(f"{source} has a bad port: {_masked_url(url)!r}") from None
    params: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": port,
        "user": unquote(parts.username) if parts.username else "root",
        "password": unquote(parts.password) if parts.password else "",
    }
    if parts.path.strip("/"):
        params["database"] = unquote(parts.path.strip("/"))
    return params


def _masked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _pg_target(dsn: str, label: str, timeout: float) -> Target:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in conninfo_to_dict(dsn):
        kwargs["connect_timeout"] = max(2, round(timeout))
    return Target("postgresql", label, lambda: psycopg.connect(dsn, **kwargs), lambda c: c.close())


def _mysql_target(url: str, label: str, timeout: float) -> Target:
    import pymysql

    params = _mysql_params(url)
    return Target(
        "mysql",
        label,
        lambda: pymysql.connect(connect_timeout=timeout, autocommit=True, **params),
        lambda c: c.close(),
    )


def _pool_target(pool: PoolInfo, timeout: float) -> Target:
    driver = pool.engine.driver
    connect = driver.connect
    if pool.adapter == "psycopg" and hasattr(driver, "connection_class"):
        from psycopg.conninfo import conninfo_to_dict

        def connect() -> Any:
            conninfo = driver.conninfo() if callable(driver.conninfo) else driver.conninfo
            kwargs = dict(driver.kwargs() if callable(driver.kwargs) else (driver.kwargs or {}))
            if "connect_timeout" not in conninfo_to_dict(conninfo) and "connect_timeout" not in kwargs:
                kwargs["connect_timeout"] = max(2, round(timeout))
            return driver.connection_class.connect(conninfo, **kwargs)

    return Target(pool.server_kind, f"pool {pool.name!r}", connect, driver.close, [pool])


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = call()
    return value, (time.perf_counter() - start) * 1000.0


def _query(conn: Any, sql: str) -> Any:
    cur = conn.cursor()
    try:
        cur.execute(sql)
        return cur.fetchone()
    finally:
        cur.close()


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def _check_server(target: Target, seen: dict[str, ServerFacts]) -> tuple[list[Finding], ServerFacts | None]:
    """Connect to `target`; unless its server was seen already, time it and read its limits."""
    check = "server" if target.kind == "postgresql" else "mysql"
    try:
        conn, first = _timed(target.connect)
    except Exception as ex:
        return [
            Finding(
                FAIL,
                check,
                f"{target.label}: unreachable: {_one_line(ex)}",
                "check that the server runs and listens there, and the host, port, user, password and database",
                data={"target": target.label, "error": _one_line(ex)},
            )
        ], None
    try:
        if target.kind == "postgresql":
            address = f"{conn.info.host}:{conn.info.port}"
        else:
            address = f"{conn.host}:{conn.port}"
        if address in seen:
            seen[address].pools.extend(target.pools)
            return [], None
        facts = ServerFacts(target.kind, address, target.label, pools=list(target.pools))
        seen[address] = facts
        try:
            if target.kind == "postgresql":
                return _check_postgres(target, conn, first, facts), facts
            return _check_mysql(target, conn, first, facts), facts
        except Exception as ex:
            return [
                Finding(
                    FAIL,
                    check,
                    f"{target.label}: connected, but a query failed: {_one_line(ex)}",
                    "read the error: the user may lack rights to read settings, or a proxy in between rejects queries",
                    data={"target": target.label, "error": _one_line(ex)},
                )
            ], None
    finally:
        try:
            target.close(conn)
        except Exception:  # noqa: BLE001 - closing a check's connection
            pass


@dataclass
class _Latencies:
    """How fast a server answers (median milliseconds), and why a repeated connect failed (None: none did)."""

    round_trip: float
    connect: float
    connect_error: str | None

    def data(self, target: Target, facts: ServerFacts, version: Any, **more: Any) -> dict[str, Any]:
        """A server finding's data: where, which version, how fast, then `more`."""
        return {
            "target": target.label,
            "address": facts.address,
            "version": version,
            "round_trip_ms": round(self.round_trip, 3),
            "connect_ms": round(self.connect, 3),
            **more,
        }

    def finding(
        self, check: str, server: str, target: Target, facts: ServerFacts, version: Any, data: dict[str, Any]
    ) -> Finding:
        """The OK finding naming the `server` ("PostgreSQL"), its version and address, and how fast it answers."""
        return Finding(
            OK,
            check,
            f"{target.label}: {server} {version} at {facts.address}; round trip {_ms(self.round_trip)} (median of"
            f" {ROUND_TRIPS} select 1), connect {_ms(self.connect)} (median of {CONNECTS})",
            data=data,
        )

    def connect_error_findings(self, check: str, target: Target, advice: str, data: dict[str, Any]) -> list[Finding]:
        """A warning if a repeated connect failed, with `advice`; else nothing."""
        if self.connect_error is None:
            return []
        return [
            Finding(
                WARN,
                check,
                f"{target.label}: a repeated connect failed: {self.connect_error}",
                advice,
                data=data,
            )
        ]


def _latencies(target: Target, conn: Any, first: float) -> _Latencies:
    connects = [first]
    error = None
    for _ in range(CONNECTS - 1):
        try:
            extra, ms = _timed(target.connect)
        except Exception as ex:
            error = _one_line(ex)
            break
        connects.append(ms)
        target.close(extra)
    trips = [_timed(lambda: _query(conn, "select 1"))[1] for _ in range(ROUND_TRIPS)]
    return _Latencies(statistics.median(trips), statistics.median(connects), error)


def _check_postgres(target: Target, conn: Any, first: float, facts: ServerFacts) -> list[Finding]:
    findings: list[Finding] = []
    version_param = conn.info.parameter_status("server_version") or ""
    if version_param.endswith("/bouncer"):
        return [
            Finding(
                FAIL,
                "server",
                f"{target.label} is PgBouncer's admin console ({version_param}), not a database",
                "name the application's database (dbname) in the DSN",
            )
        ]
    try:
        conn.autocommit = True  # each statement its own transaction: a pooler may move it (see below)
    except Exception:  # noqa: BLE001 - a connection handed over in a transaction: its pids stay put
        pass
    # No prepared statements of doctor's own: behind a transaction-mode pooler they
    # would land on server connections that have them already, or don't.
    try:
        conn.prepare_threshold = None
    except AttributeError:  # not psycopg 3
        pass
    latencies = _latencies(target, conn, first)
    row = _query(
        conn,
        "select current_setting('server_version'), current_setting('max_connections')::int,"
        " current_setting('superuser_reserved_connections')::int,"
        " coalesce(current_setting('reserved_connections', true), '0')::int,"
        " (select count(*) from pg_stat_activity where backend_type = 'client backend')::int",
    )
    version, max_connections, superuser, reserved, clients = row
    pids = {_query(conn, "select pg_backend_pid()")[0] for _ in range(5)}
    facts.max_connections = int(max_connections)
    facts.reserved = int(superuser) + int(reserved)
    facts.others = max(0, int(clients) - 1)
    facts.pooler = conn.info.backend_pid not in pids
    data = latencies.data(
        target,
        facts,
        version,
        max_connections=facts.max_connections,
        superuser_reserved_connections=int(superuser),
        reserved_connections=int(reserved),
        available=facts.available,
        other_connections=facts.others,
    )
    findings.append(latencies.finding("server", "PostgreSQL", target, facts, version, data))
    findings.extend(
        latencies.connect_error_findings(
            "server", target, "check the server's connection limits and authentication rate limits", data
        )
    )
    reserved_text = f"superuser_reserved_connections {superuser}" + (
        f" + reserved_connections {reserved}" if int(reserved) else ""
    )
    findings.append(
        Finding(
            OK,
            "server",
            f"max_connections {facts.max_connections} - {reserved_text} = {facts.available} for clients;"
            f" {facts.others} other client connection(s) now",
            data=data,
        )
    )
    findings.extend(_pooler_findings(target, conn, pids, facts))
    return findings


def _pooler_findings(target: Target, conn: Any, pids: set[int], facts: ServerFacts) -> list[Finding]:
    if not facts.pooler:
        return [
            Finding(
                OK,
                "pgbouncer",
                "not detected: the server's pid is the one the connection was given (a direct connection)",
                data={"detected": False},
            )
        ]
    import psycopg

    params = {k: v for k, v in conn.info.get_parameters().items() if k != "dbname"}
    if conn.info.password:
        params["password"] = conn.info.password
    params.setdefault("connect_timeout", "5")
    config: dict[str, str] = {}
    try:
        with psycopg.connect(
            dbname="pgbouncer", autocommit=True, cursor_factory=psycopg.ClientCursor, **params
        ) as admin:
            bouncer_version = admin.info.parameter_status("server_version") or ""
            if not bouncer_version.endswith("/bouncer"):
                raise RuntimeError(
                    f"the 'pgbouncer' database there is not PgBouncer's (server_version {bouncer_version})"
                )
            for config_row in admin.execute("SHOW CONFIG").fetchall():
                config[str(config_row[0])] = str(config_row[1])
            config["version"] = bouncer_version.partition("/")[0]
    except Exception as ex:
        mode = "transaction or statement pooling" if len(pids) > 1 else "pool mode unknown"
        return [
            Finding(
                WARN,
                "pgbouncer",
                f"a pooler sits between (the server's pid differs from the connection's; {mode}), but its admin"
                f" console doesn't answer: {_one_line(ex)}",
                "add the user to PgBouncer's stats_users (or admin_users) so that doctor can read its pool_mode"
                " and limits, and compare the planned connections with max_client_conn yourself",
                data={"detected": True, "server_pids": len(pids), "error": _one_line(ex)},
            )
        ]
    facts.pgbouncer = config
    mode = config.get("pool_mode", "?")
    data = {"detected": True, **config}
    findings = [
        Finding(
            OK,
            "pgbouncer",
            f"PgBouncer {config['version']}: pool_mode {mode}, default_pool_size {config.get('default_pool_size')},"
            f" max_client_conn {config.get('max_client_conn')}, reserve_pool_size {config.get('reserve_pool_size')},"
            f" max_db_connections {config.get('max_db_connections')}",
            data=data,
        )
    ]
    if mode == "statement":
        findings.append(
            Finding(
                FAIL,
                "pgbouncer",
                "pool_mode statement forbids transactions of more than one statement: pooled connections'"
                " transactions, rollbacks and Peewee's atomic() break",
                "use pool_mode = transaction",
                data=data,
            )
        )
    elif mode == "session":
        findings.append(
            Finding(
                WARN,
                "pgbouncer",
                "pool_mode session: each client connection holds a server connection for its life, so PgBouncer"
                " shares nothing among the workers' pooled connections",
                "use pool_mode = transaction (see docs/sizing.md), or connect to the server directly",
                data=data,
            )
        )
    elif mode == "transaction" and config.get("max_prepared_statements", "0") in ("0", "") and _prepares(target):
        findings.append(
            Finding(
                WARN,
                "pgbouncer",
                "pool_mode transaction without max_prepared_statements: psycopg prepares a query run 5 times"
                " (prepare_threshold), and a later transaction lands on a server connection without it (or with"
                " one of the same name): errors such as 'prepared statement \"_pg3_0\" already exists'",
                "pass kwargs=greenpool.pg.pgbouncer_kwargs() ({'prepare_threshold': None}) to the pools, or set"
                " max_prepared_statements (PgBouncer >= 1.22, with libpq >= 17): see docs/pgbouncer.md",
                data=data,
            )
        )
    return findings


def _prepares(target: Target) -> bool:
    """Whether connections to `target` may prepare statements: any of its psycopg pools, or no pool known."""
    pools = [p for p in target.pools if p.adapter == "psycopg"]
    if not target.pools:
        return True
    for pool in pools:
        kwargs = pool.pooled.kwargs
        kwargs = kwargs() if callable(kwargs) else (kwargs or {})
        if kwargs.get("prepare_threshold", 5) is not None:
            return True
    return False


def _check_mysql(target: Target, conn: Any, first: float, facts: ServerFacts) -> list[Finding]:
    latencies = _latencies(target, conn, first)
    version, max_connections = _query(conn, "select version(), @@max_connections")
    threads = _query(conn, "show global status like 'Threads_connected'")
    facts.max_connections = int(max_connections)
    facts.others = max(0, int(threads[1]) - 1) if threads else None
    data = latencies.data(target, facts, version, max_connections=facts.max_connections, other_connections=facts.others)
    return [
        latencies.finding("mysql", "MySQL/MariaDB", target, facts, version, data),
        Finding(
            OK,
            "mysql",
            f"max_connections {facts.max_connections}; {facts.others} other client connection(s) now",
            data=data,
        ),
        *latencies.connect_error_findings("mysql", target, "check max_connections and max_connect_errors", data),
    ]


def _capacity_findings(facts: ServerFacts, app: AppInfo) -> list[Finding]:
    """The planned connections of the pools on `facts`' server against its limits."""
    pools = facts.pools
    if not pools or facts.available is None or any(p.max_size >= UNLIMITED for p in pools):
        return []  # an unbounded pool has a finding of its own
    check = "server" if facts.kind == "postgresql" else "mysql"
    processes = processes_per_worker(app.task_pool, app.concurrency)
    planned = processes * sum(p.max_size for p in pools)
    names = ", ".join(p.describe() for p in pools)
    how = f"{processes} prefork processes x {sum(p.max_size for p in pools)}" if processes > 1 else names
    data = {"planned": planned, "available": facts.available, "others": facts.others, "address": facts.address}
    if facts.pgbouncer is not None:
        limit = int(facts.pgbouncer.get("max_client_conn", "0") or 0)
        findings = []
        if limit and planned > limit:
            findings.append(
                Finding(
                    FAIL,
                    "pgbouncer",
                    f"one worker's pools may open {planned} client connections ({how}), more than PgBouncer's"
                    f" max_client_conn {limit}",
                    f"raise max_client_conn, or lower max_size (`{_FLEET} --pgbouncer ...`)",
                    data={**data, "max_client_conn": limit},
                )
            )
        server_side = int(facts.pgbouncer.get("default_pool_size", "0") or 0) + int(
            facts.pgbouncer.get("reserve_pool_size", "0") or 0
        )
        if server_side > facts.available:
            findings.append(
                Finding(
                    FAIL,
                    "pgbouncer",
                    f"default_pool_size + reserve_pool_size = {server_side} server connections per database and"
                    f" user, more than the {facts.available} the server accepts",
                    f"lower default_pool_size (`{_FLEET} --pgbouncer ...`) or raise max_connections",
                    data={**data, "server_side": server_side},
                )
            )
        if not findings:
            findings.append(
                Finding(OK, "pgbouncer", f"one worker's {planned} client connections fit max_client_conn {limit}")
            )
        return findings
    if facts.pooler:
        return []  # the pooler's limits are unknown: its finding said so
    if planned > facts.available:
        fit = facts.available // processes
        return [
            Finding(
                FAIL,
                check,
                f"one worker's pools may open {planned} connections ({how}), but {facts.address} accepts"
                f" {facts.available} (max_connections {facts.max_connections} - {facts.reserved} reserved)",
                f"lower max_size (at most {fit} in all per process, for this worker alone; `{_FLEET}` sizes a fleet)"
                " or put PgBouncer in between",
                data=data,
            )
        ]
    if facts.others is not None and planned + facts.others > facts.available:
        return [
            Finding(
                WARN,
                check,
                f"one worker's pools may open {planned} connections and {facts.others} are open now (other clients"
                f" and workers): more than the {facts.available} {facts.address} accepts",
                f"lower max_size (`{_FLEET}` sizes a fleet) or put PgBouncer in between",
                data=data,
            )
        ]
    return [
        Finding(
            OK,
            check,
            f"one worker's pools may open {planned} of the {facts.available} connections {facts.address} accepts",
            data=data,
        )
    ]


def _server_findings(
    dsn: str | None, mysql: str | None, app: AppInfo | None, timeout: float, env: Mapping[str, str]
) -> list[Finding]:
    pools = app.pools if app is not None else []
    targets: list[Target] = []
    dsn_source = "--dsn" if dsn else f"${DSN_ENV}"
    dsn = dsn or env.get(DSN_ENV) or None
    mysql_source = "--mysql" if mysql else f"${MYSQL_ENV}"
    mysql = mysql or env.get(MYSQL_ENV) or None
    # Bad input is found only now: psycopg and pymysql are imported after the import-order checks.
    if dsn:
        _check_dsn(dsn, dsn_source)
    if mysql:
        _mysql_params(mysql, mysql_source)
    # Each kind of server: the one given (with the pools on that kind), else each pool's own.
    for kind, given, source, make_target, masked in (
        ("postgresql", dsn, dsn_source, _pg_target, _masked_dsn),
        ("mysql", mysql, mysql_source, _mysql_target, _masked_url),
    ):
        kind_pools = [p for p in pools if p.server_kind == kind]
        if given:
            target = make_target(given, f"{source} {masked(given)}", timeout)
            target.pools = kind_pools
            targets.append(target)
        else:
            targets.extend(_pool_target(p, timeout) for p in kind_pools)
    if not targets:
        return [
            Finding(
                OK,
                "server",
                f"no server checked: give --dsn or --mysql, set ${DSN_ENV}, or --app with pools",
            )
        ]
    findings: list[Finding] = []
    seen: dict[str, ServerFacts] = {}
    checked: list[ServerFacts] = []
    for target in targets:
        found, facts = _check_server(target, seen)
        findings.extend(found)
        if facts is not None:
            checked.append(facts)
    if app is not None and app.error is None:
        for facts in checked:
            findings.extend(_capacity_findings(facts, app))
    return findings


# ---------------------------------------------------------------- entry points


def diagnose(
    *,
    dsn: str | None = None,
    mysql: str | None = None,
    app: Any = None,
    pool: str | None = None,
    concurrency: int | None = None,
    connect_timeout: float = 5.0,
    env: Mapping[str, str] | None = None,
    _pool_source: str | None = None,
    _reexec_note: str | None = None,
) -> Report:
    """Check this process as it is, the Celery `app` (an app, or ``MODULE[:ATTR]``) and the servers.

    `pool` and `concurrency` stand for the worker's ``-P`` and ``-c``; this
    function patches nothing (the CLI's ``--pool gevent`` does, first).
    `env` (default `os.environ`) provides ``GREENPOOL_DSN`` and
    ``GREENPOOL_MYSQL`` when `dsn` or `mysql` is not given. A DSN or URL
    that doesn't parse raises `greenpool.tools.UsageError`; everything else
    wrong (an app that can't be imported, a server that doesn't answer) is
    a finding. `_pool_source` and `_reexec_note` are the CLI's.
    """
    env = os.environ if env is None else env
    info: AppInfo | None = None
    if app is not None:
        spec = app if isinstance(app, str) else str(getattr(app, "main", None) or "?")
        if isinstance(app, str):
            try:
                app = load_app(app)
            except Exception as ex:  # noqa: BLE001 - the user's module: reported, not raised
                info = AppInfo(spec, error=_one_line(ex))
        if info is None:
            info = _app_info(spec, app, pool, _pool_source, concurrency)
    findings = _process_findings(info, _reexec_note)
    if info is not None:
        findings += _celery_findings(info)
    findings += _server_findings(dsn, mysql, info, connect_timeout, env)
    return Report(findings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``doctor``'s options to its sub-parser."""
    one_line_errors(parser)
    parser.add_argument(
        "--dsn",
        help=f"libpq connection string of the PostgreSQL to check (default: ${DSN_ENV}, else each pool's own)",
    )
    parser.add_argument(
        "--mysql",
        metavar="URL",
        help=f"mysql://user:password@host:port/database to check (default: ${MYSQL_ENV}, else each MySQL"
        " database's own)",
    )
    parser.add_argument(
        "--app",
        metavar="MODULE[:ATTR]",
        help="the Celery app, as given to `celery -A`: its task pool, concurrency and greenpool pools",
    )
    parser.add_argument(
        "--pool",
        "-P",
        metavar="POOL",
        help="the worker's -P (default: the app's worker_pool); gevent patches first, as `celery worker -P"
        " gevent` does",
    )
    parser.add_argument(
        "--concurrency", "-c", metavar="N", help="the worker's -c (default: the app's worker_concurrency)"
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", default="5", help="connect timeout for each server (default: 5)"
    )
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--strict", action="store_true", help="warnings fail too (exit status 1)")


def _checked_options(args: argparse.Namespace) -> tuple[int | None, float]:
    concurrency = None
    if args.concurrency is not None:
        try:
            concurrency = int(args.concurrency)
        except ValueError:
            concurrency = 0
        if concurrency < 1:
            raise UsageError(f"--concurrency must be a whole number >= 1, got {args.concurrency!r}")
    try:
        timeout = float(args.timeout)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout < 3600:
        raise UsageError(f"--timeout must be a number of seconds > 0, got {args.timeout!r}")
    if args.pool is not None and args.pool not in CELERY_POOLS:
        raise UsageError(f"--pool must be one of {', '.join(CELERY_POOLS)}, got {args.pool!r}")
    if args.mysql:
        _mysql_params(args.mysql)
    return concurrency, timeout


def _check_dsn(dsn: str, source: str) -> None:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except ProgrammingError as ex:
        raise UsageError(f"{source} is not a libpq connection string: {_one_line(ex)}") from None


def run(args: argparse.Namespace, invocation: Any = None) -> int:
    """Run ``doctor``: print the findings; exit status 1 on a problem, 2 for bad input."""
    try:
        concurrency, timeout = _checked_options(args)
    except UsageError as ex:
        usage_error(_PROG, str(ex))
    reexecuted = bool(os.environ.pop(REEXEC_MARKER, ""))
    pool_source = None
    if args.pool == "gevent":
        pool_source = (
            "worker_pool = 'gevent' in the configuration: greenpool re-executes the worker with --pool=gevent"
            if reexecuted
            else "-P gevent"
        )
        if not gevent_patched():
            from gevent import monkey

            monkey.patch_all()  # as `celery worker -P gevent` does, before the app is imported
    app: Any = args.app
    reexec_note = None
    if args.app is not None:
        try:
            loaded = load_app(args.app)
        except Exception:  # noqa: BLE001 - diagnose() reports it (load_app remembers the error)
            pass
        else:
            reexec_note = _maybe_reexec(loaded, args, invocation, reexecuted)
    try:
        report = diagnose(
            dsn=args.dsn,
            mysql=args.mysql,
            app=app,
            pool=args.pool,
            concurrency=concurrency,
            connect_timeout=timeout,
            _pool_source=pool_source,
            _reexec_note=reexec_note,
        )
    except UsageError as ex:
        usage_error(_PROG, str(ex))
    if args.json:
        print(json.dumps(report.to_json(args.strict), indent=2, default=str))
    else:
        for finding in report.findings:
            print(finding.line())
        problems = report.problems(args.strict)
        print(f"{len(problems)} problem(s)" if problems else "no problem found")
    return report.exit_status(args.strict)


def _maybe_reexec(app: Any, args: argparse.Namespace, invocation: Any, reexecuted: bool) -> str | None:
    """Re-execute as greenpool's integration re-executes a worker configured for gevent; else why not."""
    from ..integrations.celery import integration_for, task_pool_name

    if args.pool is not None or gevent_patched() or not app.conf.worker_pool:
        return None
    if task_pool_name(app.conf.worker_pool) != "gevent" or integration_for(app) is None:
        return None
    if reexecuted or invocation is None or not getattr(invocation, "may_reexec", False):
        return (
            "this process is not patched, but the worker would be (greenpool re-executes it with --pool=gevent):"
            " the import-order findings describe this process, not the worker"
        )
    argv = list(getattr(invocation, "argv", sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[REEXEC_MARKER] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "greenpool", *argv, "--pool", "gevent"])
    return None  # not reached
