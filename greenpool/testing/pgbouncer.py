"""A throw-away PgBouncer in front of a PostgreSQL server, for tests and the benchmark.

:class:`PgBouncer` writes a configuration and a user list into a fresh
temporary directory, starts the ``pgbouncer`` program on a free loopback port
and waits until it accepts connections::

    with PgBouncer("host=127.0.0.1 port=5432 user=postgres dbname=test", default_pool_size=3) as bouncer:
        pool = ConnectionPool(bouncer.dsn(dsn), kwargs=pgbouncer_kwargs(), open=True)
        bouncer.admin("SHOW POOLS")   # [..., {'database': 'test', 'sv_active': 0, 'sv_idle': 1, ...}]

Every database name is routed to the same name on the target server (a
``*`` entry), logged in as the target DSN's user (and password). Clients
authenticate with ``auth_type = any`` by default: any user name is
accepted, and any user may use the admin console (database ``pgbouncer``).

Server connections are tagged: each runs ``SET application_name`` with
:attr:`PgBouncer.application_name` when PgBouncer opens it, and
:meth:`PgBouncer.dsn` gives clients the same name (unless the base DSN
names its own), so ``pg_stat_activity`` tells this PgBouncer's server
connections from everyone else's (:meth:`PgBouncer.server_connections`).

As with the other helpers, PgBouncer is owned by a small supervisor child
(``python -m greenpool.testing.pgbouncer``, stdlib only) that stops it and
deletes the directory when told to, when its stdin closes or when its parent
dies. PgBouncer refuses to run as root: run as root, the supervisor starts it
as the ``postgres`` user (which PostgreSQL's packages create), else
``nobody``, and hands it the directory.

When the program is missing, :class:`PgBouncerMissing` says how to install it
(``apt-get install pgbouncer``); :meth:`PgBouncer.start` looks in ``$PATH``,
``/usr/sbin``, ``/usr/local/sbin`` and ``/usr/local/bin``, or takes
``binary=``.

This module imports neither gevent nor psycopg at import time.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .childproc import (
    ChildController,
    LineChild,
    RunAs,
    free_port,
    log_tail,
    prepare_supervisor,
    spawn_supervisor,
    stop_process,
    supervise,
)
from .proxy import _conninfo_to_dict, _make_conninfo

__all__ = ["INSTALL_HINT", "PgBouncer", "PgBouncerMissing", "find_pgbouncer", "main", "pgbouncer_version"]

#: How to install the program, as error messages say it.
INSTALL_HINT = (
    "apt-get install pgbouncer (Debian, Ubuntu), dnf install pgbouncer (Fedora, RHEL), brew install pgbouncer"
)

#: Where the program is looked for besides ``$PATH`` (Debian installs it in /usr/sbin).
SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin")

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
_POOL_MODES = ("session", "transaction", "statement")
_AUTH_TYPES = ("any", "trust")


class PgBouncerMissing(RuntimeError):
    """The ``pgbouncer`` program is not installed, or not where ``binary`` said."""


def find_pgbouncer(binary: str | None = None) -> str:
    """The path of the ``pgbouncer`` program: `binary`, else found in ``$PATH`` or `SEARCH_DIRS`.

    Raises `PgBouncerMissing`, naming `INSTALL_HINT`, if there is none.
    """
    if binary:
        found = shutil.which(binary)
        if found is None:
            raise PgBouncerMissing(f"pgbouncer program {binary!r} not found or not executable")
        return found
    path = os.pathsep.join([os.environ.get("PATH", ""), *SEARCH_DIRS])
    found = shutil.which("pgbouncer", path=path)
    if found is None:
        raise PgBouncerMissing(f"pgbouncer is not installed: {INSTALL_HINT}")
    return found


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    """The version of the `binary` PgBouncer, e.g. ``(1, 18, 0)``, from ``pgbouncer --version``."""
    try:
        result = subprocess.run(
            [binary, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PgBouncerMissing(f"can't run {binary} --version: {exc}") from None
    match = re.search(r"PgBouncer\s+(\d+(?:\.\d+)*)", result.stdout + result.stderr)
    if match is None:
        raise PgBouncerMissing(f"{binary} --version said nothing like 'PgBouncer 1.x': {result.stdout.strip()!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _quote(value: str) -> str:
    """A value for PgBouncer's connection strings: single-quoted (quotes doubled) when it has to be."""
    if value and not any(c.isspace() or c == "'" for c in value):
        return value
    return "'" + value.replace("'", "''") + "'"


def _setting(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class PgBouncer(ChildController):
    """A PgBouncer in front of `target_dsn`'s server, in a child process, on a free loopback port.

    `pool_mode`, `default_pool_size`, `max_client_conn` and
    `max_prepared_statements` are PgBouncer's settings of the same names
    (`max_prepared_statements` > 0 needs PgBouncer >= 1.21: older ones
    raise `ValueError` at `start()`); `settings` adds or overrides any other
    ``[pgbouncer]`` setting (``{"query_wait_timeout": 2}``). `auth_type` is
    ``"any"`` (any client user name; every client may use the admin
    console) or ``"trust"`` (only the target DSN's user, which is also an
    admin). `application_name` tags the server connections (default
    ``greenpool-pgbouncer-<random>``). `binary`: the program (default: found
    by `find_pgbouncer()`).

    `start()` (or ``with``) runs it, `close()` stops it; both are
    idempotent. Safe to use from threads and greenlets, in plain or
    monkey-patched processes.
    """

    _name = "PgBouncer"
    _stop_timeout = _STOP_TIMEOUT

    def __init__(
        self,
        target_dsn: str,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 5,
        max_client_conn: int = 1000,
        max_prepared_statements: int = 0,
        auth_type: str = "any",
        application_name: str | None = None,
        settings: Mapping[str, str | int | float | bool] | None = None,
        binary: str | None = None,
    ) -> None:
        if pool_mode not in _POOL_MODES:
            raise ValueError(f"pool_mode must be one of {', '.join(_POOL_MODES)}, got {pool_mode!r}")
        if auth_type not in _AUTH_TYPES:
            raise ValueError(f"auth_type must be one of {', '.join(_AUTH_TYPES)}, got {auth_type!r}")
        for name, value, least in (
            ("default_pool_size", default_pool_size, 1),
            ("max_client_conn", max_client_conn, 1),
            ("max_prepared_statements", max_prepared_statements, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        super().__init__()
        self.target_dsn = target_dsn
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.max_prepared_statements = max_prepared_statements
        self.auth_type = auth_type
        #: The ``application_name`` of every server connection PgBouncer opens.
        self.application_name = application_name or f"greenpool-pgbouncer-{secrets.token_hex(4)}"
        if not isinstance(self.application_name, str) or len(self.application_name.encode()) > 63:
            # PostgreSQL truncates longer names: pg_stat_activity would not match.
            raise ValueError(f"application_name must be a string of at most 63 bytes, got {application_name!r}")
        self.settings = dict(settings or {})
        self.binary = binary
        #: The program's version, e.g. ``(1, 18, 0)`` (known once started).
        self.version: tuple[int, ...] | None = None
        self._pid: int | None = None
        self._target = _conninfo_to_dict(target_dsn)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        port = self._port if self._port is not None else "?"
        return f"<PgBouncer {self.host}:{port} {self.pool_mode} pool {self.default_pool_size} {state}>"

    # -- configuration ------------------------------------------------------

    def config(self, port: int | str = "{port}", directory: str = "{dir}") -> dict[str, dict[str, str]]:
        """The ``pgbouncer.ini`` sections as dicts (``{port}`` and ``{dir}`` stand for what `start()` picks)."""
        target = self._target
        route = []
        host = (target.get("hostaddr") or target.get("host") or "").split(",")[0].strip()
        if host:
            route.append(f"host={_quote(host)}")
        port_text = (target.get("port") or "").split(",")[0].strip()
        if port_text:
            route.append(f"port={port_text}")
        user = self._user()
        route.append(f"user={_quote(user)}")
        if target.get("password"):
            route.append(f"password={_quote(target['password'])}")
        query = "set application_name = '{}'".format(self.application_name.replace("'", "''"))
        route.append(f"connect_query={_quote(query)}")
        pgbouncer = {
            "listen_addr": self.host,
            "listen_port": str(port),
            "unix_socket_dir": "",
            "auth_type": self.auth_type,
            "auth_file": f"{directory}/userlist.txt",
            "admin_users": user,
            "stats_users": user,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "max_client_conn": str(self.max_client_conn),
            "log_connections": "0",
            "log_disconnections": "0",
        }
        if self.max_prepared_statements:
            pgbouncer["max_prepared_statements"] = str(self.max_prepared_statements)
        pgbouncer.update({name: _setting(value) for name, value in self.settings.items()})
        return {"databases": {"*": " ".join(route)}, "pgbouncer": pgbouncer}

    def _user(self) -> str:
        """The target DSN's user, defaulting as libpq does: ``$PGUSER``, else the OS user."""
        return self._target.get("user") or os.environ.get("PGUSER") or getpass.getuser()

    def _userlist(self) -> str:
        user = self._user()
        password = self._target.get("password", "")
        return '"{}" "{}"\n'.format(user.replace('"', '""'), password.replace('"', '""'))

    # -- lifecycle --------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The process id of the ``pgbouncer`` program (known once started)."""
        if self._pid is None:
            raise RuntimeError("PgBouncer has not been started")
        return self._pid

    def start(self) -> PgBouncer:
        """Start PgBouncer and wait until it accepts connections; return ``self``.

        Raises `PgBouncerMissing` without the program, `ValueError` for a
        setting the installed version lacks, `RuntimeError` if it doesn't
        start (with the end of its log). Does nothing if it runs already.
        """
        return super().start()

    def _spawn(self) -> LineChild:
        binary = find_pgbouncer(self.binary)
        version = pgbouncer_version(binary)
        if self.max_prepared_statements and version < (1, 21):
            raise ValueError(
                f"PgBouncer {'.'.join(map(str, version))} has no max_prepared_statements (1.21 and later):"
                " leave it 0 and turn psycopg's prepared statements off (greenpool.pg.pgbouncer_kwargs())"
            )
        spec = {"config": self.config(), "userlist": self._userlist()}
        child, (self._port, self._pid) = spawn_supervisor(
            "greenpool.testing.pgbouncer",
            ["--binary", binary, "--version", ".".join(map(str, version)), "--spec", json.dumps(spec)],
            what="pgbouncer",
            failure="could not start PgBouncer",
            parse=lambda info: (int(info["port"]), int(info["pid"])),
            timeout=_START_TIMEOUT,
            stop_timeout=_STOP_TIMEOUT,
        )
        self.version = version
        return child

    def close(self) -> None:
        """Stop PgBouncer (its clients' connections break) and delete its directory. Idempotent."""
        self._stop_child()

    # -- use ----------------------------------------------------------------------

    def dsn(self, base_dsn: str) -> str:
        """`base_dsn` rewritten to connect through PgBouncer.

        ``host`` and ``port`` are replaced (``hostaddr`` dropped), and
        ``application_name`` set to this PgBouncer's unless `base_dsn` sets
        one; everything else is kept. (PgBouncer refuses the ``options``
        startup parameter.)
        """
        params = _conninfo_to_dict(base_dsn)
        params.pop("hostaddr", None)
        params["host"] = self.host
        params["port"] = str(self.port)
        params.setdefault("application_name", self.application_name)
        return _make_conninfo(params)

    def admin(self, sql: str) -> list[dict[str, Any]]:
        """Run `sql` on the admin console (database ``pgbouncer``) and return its rows as dicts.

        ``admin("SHOW POOLS")``, ``admin("SHOW SERVERS")``, ``admin("SHOW CONFIG")``;
        commands without rows (``RELOAD``, ``PAUSE``) return ``[]``. Needs psycopg.
        """
        import psycopg

        from ..pg.connection import GeventConnection

        params = {"host": self.host, "port": str(self.port), "dbname": "pgbouncer", "connect_timeout": "10"}
        params["user"] = self._user()
        if self._target.get("password"):
            params["password"] = self._target["password"]
        with GeventConnection.connect(
            _make_conninfo(params), autocommit=True, cursor_factory=psycopg.ClientCursor, prepare_threshold=None
        ) as conn:
            cursor = conn.execute(sql)
            if cursor.description is None:
                return []
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def server_connections(self, conn: Any) -> int:
        """How many connections on the server carry this PgBouncer's `application_name`.

        `conn` is a psycopg connection straight to the server (not through
        PgBouncer). Every server connection PgBouncer opened counts, unless a
        client whose base DSN set another ``application_name`` renamed it.
        """
        row = conn.execute(
            "select count(*) from pg_stat_activity where application_name = %s", [self.application_name]
        ).fetchone()
        return int(row[0])


# --------------------------------------------------------------------------
# Supervisor child (stdlib only; runs as ``python -m greenpool.testing.pgbouncer``)
# --------------------------------------------------------------------------


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _write_ini(path: Path, config: Mapping[str, Mapping[str, str]]) -> None:
    lines = []
    for section, entries in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def _start(binary: str, spec: Mapping[str, Any], base: Path) -> tuple[subprocess.Popen[bytes], int, str | None]:
    run_as = RunAs(
        ("postgres", "nobody"),
        RuntimeError("running as root, but there is no 'postgres' or 'nobody' user to run PgBouncer as"),
    )
    run_as.chown(base)
    userlist = base / "userlist.txt"
    userlist.write_text(spec["userlist"], encoding="utf-8")
    userlist.chmod(0o600)
    run_as.chown(userlist)
    log = base / "pgbouncer.log"
    deadline = time.monotonic() + _START_TIMEOUT
    for _attempt in range(5):
        # The port may be taken between probing and binding: PgBouncer then
        # exits, and we try another one.
        port = free_port()
        config = json.loads(json.dumps(spec["config"]).replace("{port}", str(port)).replace("{dir}", str(base)))
        ini = base / "pgbouncer.ini"
        _write_ini(ini, config)
        run_as.chown(ini)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [binary, str(ini)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **run_as.kwargs
            )
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _accepts(port):
                return proc, port, run_as.user
            time.sleep(0.02)
        else:
            _stop(proc, "")
            raise RuntimeError(f"PgBouncer did not accept connections within {_START_TIMEOUT:g} s:\n{log_tail(log)}")
        if "Address already in use" not in log_tail(log):
            break
    raise RuntimeError(f"PgBouncer exited at start (exit status {proc.returncode}):\n{log_tail(log)}")


def _stop(proc: subprocess.Popen[bytes], version: str) -> None:
    # Immediate shutdown: SIGTERM up to 1.22, SIGQUIT from 1.23 (where SIGTERM
    # waits for the clients to leave); SIGKILL if it hangs.
    parts = tuple(int(p) for p in version.split(".") if p.isdigit())
    first = signal.SIGQUIT if parts >= (1, 23) else signal.SIGTERM
    stop_process(proc, ((first, 5.0), (signal.SIGKILL, 5.0)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the supervisor child (``python -m greenpool.testing.pgbouncer``).

    Writes the configuration (``--spec``, JSON: ``config`` sections with
    ``{port}`` and ``{dir}`` placeholders, ``userlist``) into a new temporary
    directory, starts PgBouncer, prints ``ok port=<port> pid=<pid> dir=<path>
    user=<run-as>`` (or ``err <reason>``), serves ``ping``/``quit`` on stdin,
    and on ``quit``, stdin EOF or parent death stops PgBouncer and deletes
    the directory.
    """
    parser = argparse.ArgumentParser(prog="python -m greenpool.testing.pgbouncer")
    parser.add_argument("--binary", required=True)
    parser.add_argument("--version", default="")
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    parent = prepare_supervisor()

    def start(base: Path) -> tuple[subprocess.Popen[bytes], str]:
        proc, port, user = _start(args.binary, json.loads(args.spec), base)
        return proc, f"port={port} pid={proc.pid} dir={shlex.quote(str(base))} user={user or ''}"

    return supervise(parent, "greenpool-pgbouncer-", start, lambda proc: _stop(proc, args.version), what="pgbouncer")


if __name__ == "__main__":
    raise SystemExit(main())
