"""The database servers: PostgreSQL and MySQL backends (`BACKENDS`), and finding the servers to use.

`dsn` is a libpq connection string for PostgreSQL, a ``mysql://`` URL for
MySQL. The drivers (psycopg, pymysql) are imported inside the methods, after
the monkey-patch.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import describe_error

if TYPE_CHECKING:
    from .contenders import ContenderConfig

#: Environment variable holding the DSN, as for the test suite.
DSN_ENV = "GREENPOOL_DSN"
#: Environment variable holding the MySQL/MariaDB URL.
MYSQL_ENV = "GREENPOOL_MYSQL"
#: Where a MySQL server is looked for when neither --mysql nor $GREENPOOL_MYSQL is set.
MYSQL_DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"
#: Seconds the MySQL probe (and every pymysql connect) may take to connect.
MYSQL_CONNECT_TIMEOUT = 10
#: Every contender's connections are opened with these.
CONNECT_KWARGS: Mapping[str, Any] = {"autocommit": True}

#: Backend names, as in `Scenario.backend` and `contender(backends=...)`.
POSTGRES = "postgres"
MYSQL = "mysql"


class Backend(ABC):
    """A kind of database server: how to reach it, connect, query and describe it.

    `dsn` is a libpq connection string for PostgreSQL, a ``mysql://`` URL for
    MySQL. Drivers are imported in the methods, after the monkey-patch.
    """

    #: `Scenario.backend` / `contender(backends=...)` name.
    name: str
    #: For the report.
    title: str

    @abstractmethod
    def connect(self, config: ContenderConfig) -> Any:
        """A new driver connection in autocommit (for the no-pool contenders)."""

    @abstractmethod
    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` on a driver connection and fetch the result."""

    @abstractmethod
    def server_info(self, dsn: str, connection_class: type[Any] | None = None) -> dict[str, Any]:
        """Version, ``max_connections`` and other clients' connections, read once.

        `connection_class`: the psycopg class to connect with (PostgreSQL).
        """

    @abstractmethod
    def tcp_target(self, dsn: str) -> tuple[str, int]:
        """Host and port of the server, for the storm proxy (TCP only)."""

    @abstractmethod
    def via_proxy(self, dsn: str, host: str, port: int) -> str:
        """`dsn` rewritten to connect to `host`:`port` (the storm proxy)."""

    @abstractmethod
    def peewee_params(self, dsn: str) -> tuple[str, dict[str, Any]]:
        """Database name and connect keywords of a Peewee `Database` for `dsn`."""

    @abstractmethod
    def masked(self, dsn: str) -> str:
        """`dsn` without its password, for printing and JSON."""


class PostgresBackend(Backend):
    """PostgreSQL through psycopg 3."""

    name = POSTGRES
    title = "PostgreSQL"

    def connect(self, config: ContenderConfig) -> Any:
        """A psycopg connection of the config's `connection_class`, with its `connect_kwargs` (autocommit)."""
        return config.connection_class.connect(config.dsn, **config.connect_kwargs)

    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` with psycopg's ``conn.execute()`` and fetch every row."""
        conn.execute(sql).fetchall()

    def server_info(self, dsn: str, connection_class: type[Any] | None = None) -> dict[str, Any]:
        """One query for version, ``max_connections`` and other client backends (``pg_stat_activity``)."""
        if connection_class is None:
            import psycopg

            connection_class = psycopg.Connection
        with connection_class.connect(dsn, **CONNECT_KWARGS) as conn:
            version, max_conn, clients = conn.execute(
                "select current_setting('server_version'), current_setting('max_connections')::int,"
                " (select count(*) from pg_stat_activity"
                "  where backend_type = 'client backend' and pid <> pg_backend_pid())"
            ).fetchone()
        return {"version": version, "max_connections": max_conn, "client_connections": clients}

    def tcp_target(self, dsn: str) -> tuple[str, int]:
        """The DSN's single TCP host (``hostaddr`` first) and port, defaulting to ``PGHOST``/``PGPORT``/5432."""
        return _tcp_target(dsn)

    def via_proxy(self, dsn: str, host: str, port: int) -> str:
        """The DSN with `host` and `port` set and ``hostaddr`` dropped, as a conninfo string."""
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(dsn)
        params.pop("hostaddr", None)
        params.update(host=host, port=str(port))
        return make_conninfo("", **params)

    def peewee_params(self, dsn: str) -> tuple[str, dict[str, Any]]:
        """The DSN's ``dbname`` (else the user, as libpq) and its other parameters, plus ``prefer_psycopg3``."""
        from psycopg.conninfo import conninfo_to_dict

        params: dict[str, Any] = dict(conninfo_to_dict(dsn))
        # libpq's default database is the user name.
        database = str(
            params.pop("dbname", None)
            or os.environ.get("PGDATABASE")
            or params.get("user")
            or os.environ.get("PGUSER")
            or ""
        )
        if not database:
            raise ValueError("the DSN names no database (dbname) nor user")
        # peewee 4 picks psycopg 3 only when psycopg2 is absent, unless told.
        params["prefer_psycopg3"] = True
        return database, params

    def masked(self, dsn: str) -> str:
        """The DSN with its password replaced by ``***``."""
        return masked_dsn(dsn)


class MySQLBackend(Backend):
    """MySQL or MariaDB through pymysql (pure Python on the patched `socket`)."""

    name = MYSQL
    title = "MySQL"

    def connect(self, config: ContenderConfig) -> Any:
        """A pymysql connection from the URL's parameters, in utf8mb4 and autocommit as Peewee connects."""
        import pymysql

        database, params = self.peewee_params(config.dsn)
        # As peewee's MySQLDatabase connects (utf8mb4, autocommit).
        params.setdefault("charset", "utf8mb4")
        return pymysql.connect(database=database, autocommit=True, **params)

    def execute(self, conn: Any, sql: str) -> None:
        """Run `sql` on a new pymysql cursor and fetch every row."""
        cursor = conn.cursor()
        cursor.execute(sql)
        cursor.fetchall()

    def server_info(self, dsn: str, connection_class: type[Any] | None = None) -> dict[str, Any]:
        """Version, ``@@max_connections`` and ``Threads_connected`` less this probe's own connection."""
        import pymysql

        database, params = self.peewee_params(dsn)
        conn = pymysql.connect(database=database, autocommit=True, **params)
        try:
            cursor = conn.cursor()
            cursor.execute("select version(), @@max_connections")
            version, max_conn = cursor.fetchone()
            cursor.execute("show global status like 'Threads_connected'")
            (_, connected) = cursor.fetchone()
        finally:
            conn.close()
        return {"version": version, "max_connections": int(max_conn), "client_connections": int(connected) - 1}

    def tcp_target(self, dsn: str) -> tuple[str, int]:
        """The URL's host and port; a ``unix_socket`` parameter raises `ValueError`."""
        _, params = self.peewee_params(dsn)
        if "unix_socket" in params:
            raise ValueError("storm needs a TCP host in the MySQL URL, got a unix_socket")
        return str(params["host"]), int(params["port"])

    def via_proxy(self, dsn: str, host: str, port: int) -> str:
        """The URL with `host` and `port` in place of its own, user and password kept."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def peewee_params(self, dsn: str) -> tuple[str, dict[str, Any]]:
        """Database and pymysql keywords of a ``mysql://user:password@host:port/db?k=v`` URL.

        Query parameters are passed to pymysql, whole numbers as `int` and
        true/false/yes/no/on/off as `bool` (e.g. ``?ssl_disabled=true``).
        """
        from urllib.parse import parse_qsl, unquote, urlsplit

        parts = urlsplit(dsn)
        if parts.scheme not in ("mysql", "mariadb", "mysql+pymysql"):
            raise ValueError(f"expected a mysql:// URL, got {self.masked(dsn)!r}")
        params: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 3306,
            "user": unquote(parts.username) if parts.username else "root",
            "connect_timeout": MYSQL_CONNECT_TIMEOUT,
        }
        if parts.password is not None:
            params["password"] = unquote(parts.password)
        params.update((key, _url_value(value)) for key, value in parse_qsl(parts.query))
        database = unquote(parts.path.lstrip("/"))
        if not database:
            raise ValueError(f"the MySQL URL names no database: {self.masked(dsn)!r}")
        return database, params

    def masked(self, dsn: str) -> str:
        """The URL with its password replaced by ``***``, or as is if it has none."""
        from urllib.parse import urlsplit, urlunsplit

        try:
            parts = urlsplit(dsn)
            if parts.password is None:
                return dsn
            user, _, hostport = parts.netloc.rpartition("@")
            user = user.partition(":")[0]
            return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
        except ValueError:  # never fail on printing
            return "(unparsable URL)"


def _url_value(text: str) -> Any:
    """A URL query value as pymysql wants it: int, bool or str."""
    if text.isdigit():
        return int(text)
    words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
    return words.get(text.lower(), text)


#: Backend name -> backend.
BACKENDS: dict[str, Backend] = {b.name: b for b in (PostgresBackend(), MySQLBackend())}


# ---------------------------------------------------------------- servers


@dataclass(frozen=True)
class Server:
    """A database server the benchmark runs against."""

    backend: Backend
    dsn: str
    #: Where `dsn` came from (--dsn, $GREENPOOL_DSN, ...), for the report.
    source: str
    #: `Backend.server_info()`.
    info: dict[str, Any]

    def describe(self) -> str:
        """One line for the report."""
        info = self.info
        return (
            f"{self.backend.title} {info['version']} at {self.backend.masked(self.dsn)} ({self.source});"
            f" max_connections {info['max_connections']},"
            f" {info['client_connections']} client connections open"
        )


def resolve_dsn(explicit: str | None) -> tuple[str, str]:
    """The DSN to use and where it came from: --dsn, $GREENPOOL_DSN or embedded."""
    if explicit:
        return explicit, "--dsn"
    if os.environ.get(DSN_ENV):
        return os.environ[DSN_ENV], f"${DSN_ENV}"
    from greenpool.testing.embedded import resolve_dsn as embedded_dsn

    return embedded_dsn(None, DSN_ENV), "embedded throw-away pgserver"


def resolve_mysql(explicit: str | None) -> tuple[str, str, bool]:
    """The MySQL URL to use, where it came from, and whether it was asked for.

    --mysql, else $GREENPOOL_MYSQL, else the `MYSQL_DEFAULT_URL` probe.
    """
    if explicit:
        return explicit, "--mysql", True
    if os.environ.get(MYSQL_ENV):
        return os.environ[MYSQL_ENV], f"${MYSQL_ENV}", True
    return MYSQL_DEFAULT_URL, "default", False


def connect_mysql(explicit: str | None) -> Server | None:
    """The MySQL server, or None (with a note printed) if none answers at the default URL.

    No server at the default URL never fails the run: its scenarios are
    skipped. A URL given (--mysql, $GREENPOOL_MYSQL) that doesn't work
    ends the run with its error: a mistyped one must not pass for a run.
    """
    url, source, asked = resolve_mysql(explicit)
    backend = BACKENDS[MYSQL]
    try:
        info = backend.server_info(url)
    except Exception as exc:  # noqa: BLE001 - skip the MySQL scenarios, run the rest
        if asked:
            raise SystemExit(f"no MySQL server at {backend.masked(url)} ({source}): {describe_error(exc)}") from None
        print(f"MySQL scenarios skipped: no server (set {MYSQL_ENV})", flush=True)
        return None
    return Server(backend, url, source, info)


def resolve_connection_class() -> tuple[type[Any], str]:
    """greenpool's gevent-aware connection class if importable, else psycopg's."""
    try:
        from greenpool.pg import GeventConnection
    except Exception as exc:  # noqa: BLE001 - any import problem means: fall back
        import psycopg

        return psycopg.Connection, (
            f"psycopg.Connection (greenpool.GeventConnection unavailable: {describe_error(exc)})"
        )
    return GeventConnection, "greenpool.GeventConnection"


def masked_dsn(dsn: str) -> str:
    """The libpq DSN with its password replaced by ``***``, for printing and JSON (never raises)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - never fail on printing
        return "(unparsable DSN)"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


def _tcp_target(dsn: str) -> tuple[str, int]:
    """Host and port of the server, for the storm proxy (TCP only)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST") or "")
    if not host or host.startswith("/") or "," in host:
        raise ValueError(f"storm needs a single TCP host in the DSN, got host={host!r}")
    port = int(str(params.get("port") or os.environ.get("PGPORT") or 5432))
    return host, port
