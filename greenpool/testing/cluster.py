"""A throw-away PostgreSQL primary with a synchronous streaming replica, for failover tests.

:class:`ReplicatedCluster` runs two PostgreSQL servers on ``127.0.0.1``, each
on a free port, in a new temporary directory:

- node 0, the primary: ``initdb`` with trust auth for local and loopback
  connections (replication included), ``wal_level=replica``,
  ``hot_standby=on``, and synchronous replication to the standby
  (``synchronous_standby_names='*'``, ``synchronous_commit=on``): a commit
  is acknowledged only once the standby has its WAL, so an acknowledged
  write survives the primary's crash;
- node 1, the replica: ``pg_basebackup -R`` of the primary, streaming from it.

Then the test breaks the primary (:meth:`~ReplicatedCluster.crash_primary`:
``pg_ctl stop -m immediate``; :meth:`~ReplicatedCluster.stop_primary`: a
fast shutdown, which ends every session with 57P01) and promotes the replica
(:meth:`~ReplicatedCluster.promote`), while its clients connect with the
multi-host conninfo of :meth:`~ReplicatedCluster.dsn`::

    from greenpool.testing import ReplicatedCluster

    with ReplicatedCluster() as cluster:       # seconds: initdb once per process, then a copy
        pool = ConnectionPool(cluster.dsn(), open=True)
        ...                                     # load
        cluster.crash_primary()
        cluster.promote()                       # returns once the replica takes writes
        ...                                     # the pool's requests go to node 1 now

The servers are configured for speed, not safety (``fsync=off``, small
``shared_buffers``): nothing here must survive the machine. Running as root
works: PostgreSQL refuses to, so its programs run as the ``postgres`` user
(else ``pgserver``, else ``nobody``), which owns the temporary directory.

A watchdog child process (``python -m greenpool.testing.cluster``) stops
both servers and deletes the directory when :meth:`~ReplicatedCluster.close`
is called, or when the process that made the cluster exits or dies without
calling it.

The methods block their caller while they work (a few milliseconds to a
second). In a gevent-monkey-patched program they let other greenlets run
(they wait on ``subprocess`` and ``time.sleep``); in a program that is not
patched, call them in a thread (``gevent.get_hub().threadpool.apply(
cluster.promote)``) to keep the hub running meanwhile. The SQL they run
(waiting for the replica, for the promotion) needs psycopg.

Finding the binaries (``initdb``, ``pg_ctl``, ``pg_basebackup``,
``postgres``): the ``bindir`` argument, else ``$GREENPOOL_PG_BINDIR``, else
the directory of ``pg_ctl`` on ``PATH``, else ``pg_config --bindir``, else
the newest ``/usr/lib/postgresql/<version>/bin``, else the ``pgserver``
wheel's (``pip install 'greenpool[embedded]'``). Without them the
constructor raises :class:`PostgresNotFound`, saying what to install.

This module imports neither gevent nor psycopg at import time.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .childproc import LineChild, RunAs, free_port, log_tail, prepare_supervisor, reply, stdin_commands

__all__ = ["ClusterError", "PostgresNotFound", "ReplicatedCluster", "default_directory", "find_bindir", "main"]

#: What to install, in `PostgresNotFound`'s message.
INSTALL_HINT = (
    "install PostgreSQL's server programs (Debian/Ubuntu: apt-get install postgresql;"
    " or pip install 'greenpool[embedded]'), or point GREENPOOL_PG_BINDIR at their directory"
)

#: The programs a cluster needs, all in one directory.
PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")

#: Settings of both servers (the replica's port and synchronous_standby_names differ).
SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    # TCP only: a Unix socket in a temporary directory may exceed the path limit.
    "unix_socket_directories": "''",
    "wal_level": "replica",
    "max_wal_senders": "5",
    "hot_standby": "on",
    "synchronous_standby_names": "'*'",
    "synchronous_commit": "on",
    # Throw-away servers: the OS keeps what fsync would force to disk, and
    # only the servers crash here, not the machine.
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "100",
    "log_line_prefix": "'%m [%p] '",
}

_WATCHDOG_TIMEOUT = 30.0
_SHM_FREE = 1 << 30
_PORT_TRIES = 3
#: How much of a log its tail shows (bytes).
_LOG_TAIL = 2000


class ClusterError(RuntimeError):
    """A cluster operation failed; the message ends with the servers' log tails."""


class PostgresNotFound(ClusterError):
    """PostgreSQL's server programs are not installed (or can't be run): see `INSTALL_HINT`."""


# --------------------------------------------------------------------------
# Finding and running the programs
# --------------------------------------------------------------------------


def _has_programs(directory: Path) -> bool:
    return all((directory / name).is_file() for name in PROGRAMS)


def _candidates() -> list[tuple[str, Path]]:
    """Where to look for the programs, in order, each with how it was found."""
    found: list[tuple[str, Path]] = []
    env = os.environ.get("GREENPOOL_PG_BINDIR", "").strip()
    if env:
        found.append(("GREENPOOL_PG_BINDIR", Path(env)))
    on_path = shutil.which("pg_ctl")
    if on_path:
        found.append(("pg_ctl on PATH", Path(os.path.realpath(on_path)).parent))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True)
            found.append(("pg_config --bindir", Path(out.stdout.strip())))
        except (OSError, subprocess.SubprocessError):
            pass
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name.replace(".", "").isdigit()),
            key=lambda p: [int(x) for x in p.name.split(".")],
            reverse=True,
        )
        found.extend((str(p / "bin"), p / "bin") for p in versions)
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        found.append(("the pgserver wheel", pkg / "pginstall" / "bin"))
    return found


def find_bindir(bindir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding `PROGRAMS` (see the module docstring for where it looks).

    Raise `PostgresNotFound`, naming where it looked and what to install, if
    none does. A `bindir` given is the only place looked at.
    """
    if bindir is not None:
        places = [("bindir", Path(bindir))]
    else:
        places = _candidates()
    for _, directory in places:
        if _has_programs(directory):
            return directory
    looked = "; ".join(f"{how}: {directory}" for how, directory in places) or "nowhere to look"
    raise PostgresNotFound(f"PostgreSQL's {', '.join(PROGRAMS)} not found ({looked}): {INSTALL_HINT}")


class _Runner(RunAs):
    """Runs PostgreSQL's programs, as an unprivileged user when we are root."""

    def __init__(self) -> None:
        super().__init__(
            ("postgres", "pgserver", "nobody"),
            PostgresNotFound(
                "running as root, but there is no 'postgres', 'pgserver' or 'nobody' user to run"
                " PostgreSQL as (it refuses to run as root)"
            ),
        )

    def run(self, args: Sequence[str], log: Path, timeout: float) -> None:
        """Run a program, its output appended to `log`; raise `ClusterError` if it fails."""
        with open(log, "ab") as out:
            out.write(f"$ {' '.join(args)}\n".encode())
            out.flush()
            try:
                result = subprocess.run(
                    list(args),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    cwd="/",
                    **self.kwargs,
                )
            except subprocess.TimeoutExpired:
                raise ClusterError(f"{Path(args[0]).name} still running after {timeout:g} s") from None
            except PermissionError as ex:
                who = f" as {self.user!r}" if self.user else ""
                raise PostgresNotFound(f"can't run {args[0]}{who}: {ex}: {INSTALL_HINT}") from None
        if result.returncode != 0:
            raise ClusterError(f"{Path(args[0]).name} failed (exit {result.returncode})")


def default_directory() -> Path:
    """Where a cluster's temporary directory goes by default.

    ``$GREENPOOL_CLUSTER_DIR`` if set; else ``/dev/shm`` if it is writable
    with 1 GiB free (memory: the servers start several times faster there
    than on a busy disk); else the system's temporary directory.
    """
    env = os.environ.get("GREENPOOL_CLUSTER_DIR", "").strip()
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    try:
        stat = os.statvfs(shm)
        if os.access(shm, os.W_OK | os.X_OK) and stat.f_bavail * stat.f_frsize >= _SHM_FREE:
            return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())


#: initdb's output, per (bindir, directory, user), copied by each new cluster:
#: initdb takes seconds, a copy a fraction of one. Each is deleted by a
#: watchdog of its own when the process exits.
_templates: dict[tuple[str, str, str | None], Path] = {}
_template_watchdogs: list[LineChild] = []


def _watched_directory(parent: Path, prefix: str, runner: _Runner) -> tuple[Path, LineChild]:
    """A new directory under `parent`, owned by the servers' user, and its watchdog."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        runner.chown(base)
        watchdog = LineChild("greenpool.testing.cluster", ["--dir", str(base)], what="cluster watchdog")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        reply = watchdog.readline(_WATCHDOG_TIMEOUT)
        if reply != "ok watching":
            raise ClusterError(f"unexpected reply from the cluster watchdog: {reply!r}")
    except BaseException:
        watchdog.close()
        shutil.rmtree(base, ignore_errors=True)
        raise
    return base, watchdog


def _quote(value: str) -> str:
    """A libpq conninfo value, quoted if it needs to be."""
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conninfo(params: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={_quote(str(value))}" for key, value in params.items() if value is not None)


# --------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------


class ReplicatedCluster:
    """A primary (node 0) and a synchronous streaming replica (node 1) on loopback.

    `ReplicatedCluster()` starts both and waits until the replica streams
    synchronously (a few seconds); use it as a context manager, or call
    `close()`. `bindir` is where PostgreSQL's programs are (default: see
    `find_bindir()`); `settings` are added to both servers' configuration
    (values as in postgresql.conf: strings quoted); `timeout` bounds each
    step (start, stop, promotion).

    Raises `PostgresNotFound` if the programs are missing, `ClusterError`
    if a server fails to start (with the servers' log tails).
    """

    #: The address both servers listen on.
    host = "127.0.0.1"
    #: The superuser, and the database `dsn()` names.
    user = "postgres"
    dbname = "postgres"

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        directory: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.bindir = find_bindir(bindir)
        self.timeout = timeout
        self._runner = _Runner()
        self._parent = Path(directory) if directory is not None else default_directory()
        self._settings = {**SETTINGS, **(settings or {})}
        self._closed = False
        #: `time.monotonic()` when the promoted replica was first seen out of recovery.
        self.promoted_at: float | None = None
        self._primary: int | None = 0
        self._running = [False, False]
        self.ports = (0, 0)
        self.base, self._watchdog = _watched_directory(self._parent, "greenpool-cluster-", self._runner)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- what clients connect to ----------------------------------------

    def params(self, target_session_attrs: str | None = "read-write", **extra: Any) -> dict[str, str]:
        """Connection parameters naming both nodes, for `psycopg.connect(**params)` or Peewee.

        ``{"host": "127.0.0.1,127.0.0.1", "port": "P0,P1", "user": "postgres",
        "dbname": "postgres", "target_session_attrs": "read-write"}``, plus
        `extra` (``connect_timeout=2``, ``application_name=...``); a None
        value leaves its parameter out.
        """
        params: dict[str, Any] = {
            "host": f"{self.host},{self.host}",
            "port": ",".join(str(port) for port in self.ports),
            "user": self.user,
            "dbname": self.dbname,
            "target_session_attrs": target_session_attrs,
            **extra,
        }
        return {key: str(value) for key, value in params.items() if value is not None}

    def dsn(self, target_session_attrs: str | None = "read-write", **extra: Any) -> str:
        """The multi-host conninfo of both nodes (see `params()`).

        ``host=127.0.0.1,127.0.0.1 port=P0,P1 user=postgres dbname=postgres
        target_session_attrs=read-write``: libpq tries node 0, then node 1,
        and keeps the first that takes writes.
        """
        return _conninfo(self.params(target_session_attrs, **extra))

    def node_dsn(self, node: int, **extra: Any) -> str:
        """The conninfo of node `node` alone (0: the first primary, 1: the replica)."""
        return _conninfo(
            {"host": self.host, "port": self.ports[node], "user": self.user, "dbname": self.dbname, **extra}
        )

    @property
    def primary(self) -> int | None:
        """The node that takes writes: 0, 1 once promoted, None while there is none."""
        return self._primary

    def running(self, node: int) -> bool:
        """Whether node `node`'s server runs (as far as this object knows)."""
        return self._running[node]

    # -- faults -----------------------------------------------------------

    def crash_primary(self) -> None:
        """Kill the primary as a crash would: ``pg_ctl stop -m immediate``.

        Its sessions end without a word (clients see their connection
        closed); no shutdown checkpoint is written. Returns once it is gone.
        """
        self._stop(0, "immediate")

    def stop_primary(self) -> None:
        """Shut the primary down cleanly: ``pg_ctl stop -m fast``.

        Every session, idle or busy, is ended with 57P01 ("terminating
        connection due to administrator command"), new ones are refused with
        57P03 meanwhile; all WAL reaches the replica. Returns once it is gone.
        """
        self._stop(0, "fast")

    def promote(self) -> float:
        """Promote the replica (``pg_ctl promote``); return once it takes writes.

        Returns, and sets `promoted_at` to, the `time.monotonic()` at which
        a session on the replica first saw it out of recovery (polled every
        millisecond): from then on a new connection with
        ``target_session_attrs=read-write`` is accepted, which is checked
        before returning.
        """
        import psycopg

        self._check_open()
        if self._primary == 1 or not self._running[1]:
            raise ClusterError("the replica is not running as a replica: nothing to promote")
        deadline = time.monotonic() + self.timeout
        with psycopg.connect(self.node_dsn(1), autocommit=True, connect_timeout=10) as watch:
            self._pg_ctl(1, "promote", "-W")
            while True:
                row = watch.execute("select pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    break
                if time.monotonic() > deadline:
                    raise self._error(f"the replica was still in recovery {self.timeout:g} s after pg_ctl promote")
                time.sleep(0.001)
        promoted_at = self.promoted_at = time.monotonic()
        self._primary = 1
        with psycopg.connect(self.node_dsn(1, target_session_attrs="read-write"), connect_timeout=10):
            pass
        return promoted_at

    # -- lifecycle --------------------------------------------------------

    def close(self) -> None:
        """Stop both servers (immediately) and delete their directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._watchdog.close(timeout=_WATCHDOG_TIMEOUT)
        if self.base.exists():  # the watchdog failed, or never started
            _clean_up(self.base)
        self._running = [False, False]
        self._primary = None

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed

    def __enter__(self) -> ReplicatedCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"primary={self._primary}"
        return f"<ReplicatedCluster ports={self.ports} {state} at {self.base}>"

    def log(self, node: int) -> str:
        """The tail of node `node`'s server log."""
        return log_tail(self.base / f"node{node}.log", _LOG_TAIL)

    # -- inside -----------------------------------------------------------

    def _data(self, node: int) -> Path:
        return self.base / f"node{node}"

    def _check_open(self) -> None:
        if self._closed:
            raise ClusterError("the cluster is closed")

    def _error(self, message: str) -> ClusterError:
        parts = [message]
        for name in ("commands.log", "node0.log", "node1.log"):
            tail = log_tail(self.base / name, _LOG_TAIL)
            if tail:
                parts.append(f"--- {name} ---\n{tail}")
        return ClusterError("\n".join(parts))

    def _program(self, name: str) -> str:
        return str(self.bindir / name)

    def _run(self, *args: str) -> None:
        """Run PostgreSQL's program `args[0]` with arguments `args[1:]`."""
        self._exec(self._program(args[0]), *args[1:])

    def _exec(self, *args: str) -> None:
        try:
            self._runner.run(args, self.base / "commands.log", self.timeout + 30)
        except PostgresNotFound:
            raise
        except ClusterError as ex:
            raise self._error(str(ex)) from None

    def _pg_ctl(self, node: int, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self._data(node)), "-t", str(int(self.timeout)), *args)

    def _configure(self, node: int, settings: Mapping[str, str]) -> None:
        with open(self._data(node) / "postgresql.conf", "a") as conf:
            conf.write("\n# greenpool.testing.cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_node(self, node: int, settings: Mapping[str, str]) -> int:
        """Configure and start node `node` on a free port (another if that one is taken)."""
        self._configure(node, settings)
        for attempt in range(_PORT_TRIES):
            port = free_port()
            self._configure(node, {"port": str(port)})  # the last setting wins
            try:
                self._pg_ctl(node, "-l", str(self.base / f"node{node}.log"), "-w", "start")
            except ClusterError:
                if attempt + 1 < _PORT_TRIES and "could not bind" in self.log(node):
                    continue  # taken by someone else meanwhile
                raise
            self._running[node] = True
            return port
        raise AssertionError("unreachable")

    def _initdb(self, data: Path) -> None:
        self._run("initdb", "-D", str(data), "-U", self.user, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")

    def _template(self) -> Path:
        """This process's initdb output for this bindir, directory and user (see `_templates`)."""
        key = (str(self.bindir), str(self._parent), self._runner.user)
        template = _templates.get(key)
        if template is None or not template.is_dir():
            # No lock: two threads racing both make one, and one is kept.
            base, watchdog = _watched_directory(self._parent, "greenpool-cluster-template-", self._runner)
            _template_watchdogs.append(watchdog)
            self._initdb(base / "data")
            template = _templates.setdefault(key, base / "data")
        return template

    def _start(self) -> None:
        primary = self._data(0)
        template = self._template()
        self._exec("cp", "-R", "-p", str(template), str(primary))
        port0 = self._start_node(0, self._settings)
        self.ports = (port0, 0)
        replica = self._data(1)
        self._run(
            "pg_basebackup",
            *("-D", str(replica), "-h", self.host, "-p", str(port0), "-U", self.user),
            *("-R", "-X", "stream", "-c", "fast", "--no-sync"),
        )
        # A promoted replica has no standby of its own: with the primary's
        # setting, its every commit would wait for one forever.
        port1 = self._start_node(1, {"synchronous_standby_names": "''"})
        self.ports = (port0, port1)
        self._wait_streaming()

    def _wait_streaming(self) -> None:
        """Wait until the replica streams from the primary, as its synchronous standby."""
        import psycopg

        deadline = time.monotonic() + self.timeout
        with psycopg.connect(self.node_dsn(0), autocommit=True, connect_timeout=10) as conn:
            while True:
                row = conn.execute(
                    "select count(*) from pg_stat_replication where state = 'streaming' and sync_state = 'sync'"
                ).fetchone()
                if row is not None and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise self._error(f"the replica was not streaming after {self.timeout:g} s")
                time.sleep(0.01)

    def _stop(self, node: int, mode: str) -> None:
        self._check_open()
        if not self._running[node]:
            raise ClusterError(f"node {node} is not running")
        self._pg_ctl(node, "-m", mode, "-w", "stop")
        self._running[node] = False
        if self._primary == node:
            self._primary = None


# --------------------------------------------------------------------------
# The watchdog (stdlib only; runs as ``python -m greenpool.testing.cluster``)
# --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie no one reaped yet is gone too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _clean_up(base: Path, wait: float = 10.0) -> None:
    """Stop every server under `base` at once (SIGQUIT, as ``-m immediate``), then delete `base`."""
    pids = []
    for pid_file in base.glob("*/postmaster.pid"):
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGQUIT)
            pids.append(pid)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    shutil.rmtree(base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The watchdog: print ``ok watching``, then wait for ``quit``, stdin's end or the parent's death.

    Then stop the servers under ``--dir`` and delete it (see `_clean_up()`).
    """
    parser = argparse.ArgumentParser(prog="python -m greenpool.testing.cluster")
    parser.add_argument("--dir", type=Path, required=True, help="the cluster's directory")
    args = parser.parse_args(argv)
    parent = prepare_supervisor()
    reply("ok watching")
    try:
        for command in stdin_commands(parent):
            if command == "quit":
                break
        return 0
    finally:
        _clean_up(args.dir)


if __name__ == "__main__":
    raise SystemExit(main())
