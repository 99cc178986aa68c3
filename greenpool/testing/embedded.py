"""A throw-away PostgreSQL server for when no server is configured.

:func:`embedded_dsn` starts (once per process, on first use) a PostgreSQL from
the binaries bundled in the ``pgserver`` wheel (``pip install
'greenpool[embedded]'``), in a fresh temporary directory, listening on TCP
``127.0.0.1`` on a free port, and returns its DSN. The server is stopped and
its directory deleted when the process exits.

Why not ``pgserver.get_server()``: pgserver always starts postgres with
``-h ""`` (Unix socket only), and the benchmark needs a TCP endpoint to put a
fault-injection proxy in front of. So this module uses pgserver only as a
source of binaries and runs ``initdb`` and ``postgres`` itself.

The server is owned by a small supervisor child process (``python -m
greenpool.testing.embedded``), not by the caller: the caller may be gevent
monkey-patched by the time it exits, and a hard-killed caller would otherwise
leak a running postgres. The supervisor stops postgres and deletes the
directory when told to, when its stdin closes, or when its parent dies.

Running as root works: PostgreSQL refuses to run as root, so the supervisor
runs it as the ``pgserver`` user (which pgserver itself creates when used as
root) or else ``nobody``. If that user cannot reach the installed binaries
(e.g. a virtualenv inside a ``0700`` directory), they are copied into the
temporary directory rather than loosening permissions on the caller's
directories.

This module imports neither gevent nor anything that gevent patches, so it
can be imported before ``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from .childproc import (
    LineChild,
    RunAs,
    free_port,
    log_tail,
    prepare_supervisor,
    reply,
    spawn_supervisor,
    stop_process,
    supervise,
)

__all__ = ["embedded_dsn", "main", "resolve_dsn"]

logger = logging.getLogger("greenpool.testing")

_INSTALL_HINT = "pip install 'greenpool[embedded]'"
# Generous: the cold start is about 1 s, but a loaded CI box can be much slower
# and failing here fails a whole test session.
_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 30.0

# Settings for a throw-away server: durability off (nothing here must survive
# a crash, and it makes DDL-heavy tests much faster), TCP on loopback only, no
# Unix socket (macOS temp paths can exceed the socket path limit).
_SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Benchmarks open several pools side by side; the default 100 is tight.
    "max_connections": "200",
    "shared_buffers": "32MB",
}


class _PgserverMissing(RuntimeError):
    """pgserver (the source of the PostgreSQL binaries) is not installed."""


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------


class _EmbeddedServer:
    """Handle on a running supervisor child and the server it manages."""

    def __init__(self, child: LineChild, port: int, base_dir: str, version: str) -> None:
        self.child = child
        self.port = port
        self.base_dir = base_dir
        self.version = version
        # A forked child inherits this object; only the process that started
        # the server may stop it.
        self.owner_pid = os.getpid()

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"


_lock = threading.Lock()
_server: _EmbeddedServer | None = None


def _pgserver_dir() -> Path:
    """Locate the installed pgserver package without importing it.

    Importing pgserver would import psutil/fasteners and set up its own state;
    only its bundled binaries are needed.
    """
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _PgserverMissing(
            "no PostgreSQL server configured and pgserver is not installed; "
            f"install the embedded server with: {_INSTALL_HINT}"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    bin_dir = pkg / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists() or not (bin_dir / "initdb").exists():
        raise RuntimeError(
            f"pgserver at {pkg} does not contain pginstall/bin/postgres and initdb; reinstall it with: {_INSTALL_HINT}"
        )
    return pkg


def _start_server() -> _EmbeddedServer:
    pkg = _pgserver_dir()
    started = time.monotonic()
    child, (port, base_dir, version, run_as, binaries) = spawn_supervisor(
        "greenpool.testing.embedded",
        ["--pgserver-dir", str(pkg)],
        what="embedded PostgreSQL",
        failure="could not start the embedded PostgreSQL server",
        parse=lambda info: (
            int(info["port"]),
            info["dir"],
            info["version"],
            info.get("user", ""),
            info.get("binaries", "installed"),
        ),
        timeout=_START_TIMEOUT,
        stop_timeout=_STOP_TIMEOUT,
    )
    server = _EmbeddedServer(child, port, base_dir, version)
    atexit.register(_shutdown)
    logger.info(
        "started embedded PostgreSQL %s on 127.0.0.1:%d in %.2fs (directory %s, supervisor pid %d%s%s); "
        "it is stopped and deleted when this process exits",
        server.version,
        server.port,
        time.monotonic() - started,
        server.base_dir,
        child.pid,
        f", running as {run_as!r}" if run_as else "",
        f", from a copy of the binaries that {run_as!r} could not reach" if binaries == "copy" else "",
    )
    return server


def _shutdown() -> None:
    """atexit hook: stop the server if this process started it."""
    global _server
    server = _server
    if server is None or server.owner_pid != os.getpid():
        return
    _server = None
    server.child.close(timeout=_STOP_TIMEOUT)


def embedded_dsn() -> str:
    """Return the DSN of this process's embedded PostgreSQL, starting it if needed.

    The first call starts a server (about 1-2 s) from the ``pgserver`` wheel's
    binaries, listening on ``127.0.0.1`` on a free port with trust auth; later
    calls (from any thread) return the same DSN, e.g.
    ``host=127.0.0.1 port=54321 user=postgres dbname=postgres``. The server
    and its data are deleted at process exit.

    Raises :class:`RuntimeError` if pgserver is not installed (the message
    says ``pip install 'greenpool[embedded]'``) or the server fails to start.
    """
    global _server
    with _lock:
        if _server is None:
            _server = _start_server()
        return _server.dsn


def resolve_dsn(explicit: str | None, env_var: str) -> str:
    """Pick the DSN to use: *explicit*, else ``$env_var``, else the embedded server.

    Empty strings count as unset. Raises :class:`RuntimeError` naming both
    *env_var* and ``pip install 'greenpool[embedded]'`` when nothing is
    configured and pgserver is not installed.
    """
    if explicit:
        return explicit
    from_env = os.environ.get(env_var, "").strip()
    if from_env:
        return from_env
    try:
        return embedded_dsn()
    except _PgserverMissing:
        raise RuntimeError(
            f"no PostgreSQL server configured: set {env_var} to a libpq DSN "
            f"(e.g. 'host=127.0.0.1 port=5432 user=postgres dbname=postgres'), "
            f"or install the embedded server with: {_INSTALL_HINT}"
        ) from None


# --------------------------------------------------------------------------
# Supervisor child (stdlib only; runs as ``python -m greenpool.testing.embedded``)
# --------------------------------------------------------------------------


class _Runner(RunAs):
    """Runs PostgreSQL programs, as an unprivileged user when we are root."""

    def __init__(self) -> None:
        super().__init__(
            ("pgserver", "nobody"),
            RuntimeError(
                "running as root, but there is no 'pgserver' or 'nobody' user to run "
                "PostgreSQL as (it refuses to run as root)"
            ),
        )

    def can_run(self, exe: Path) -> bool:
        try:
            result = subprocess.run(
                [str(exe), "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30, **self.kwargs
            )
        except OSError:
            return False
        return result.returncode == 0

    def run(self, args: list[str], log: Path) -> None:
        with open(log, "ab") as out:
            result = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **self.kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed (exit {result.returncode}):\n{log_tail(log)}")

    def popen(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **self.kwargs)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _binaries(pkg: Path, base: Path, runner: _Runner) -> Path:
    """Return a bin dir whose programs the server's user can execute."""
    bin_dir = pkg / "pginstall" / "bin"
    if runner.user is None or (runner.can_run(bin_dir / "initdb") and runner.can_run(bin_dir / "postgres")):
        return bin_dir
    # The unprivileged user cannot reach the wheel (e.g. a venv under a 0700
    # directory). Copy it, keeping the site-packages layout: the programs find
    # libpq through an rpath relative to themselves ($ORIGIN/../../../pgserver.libs)
    # and find share/ and lib/ relative to bin/.
    root = base / "pgserver-copy"
    # Hard links where possible: instant, and a file's own mode (world
    # readable in a wheel install) is all that matters once the path leading
    # to it is traversable. Headers and static libraries are not needed.
    shutil.copytree(
        pkg / "pginstall",
        root / pkg.name / "pginstall",
        symlinks=True,
        ignore=shutil.ignore_patterns("include", "*.a"),
        copy_function=_link_or_copy,
    )
    libs = pkg.parent / f"{pkg.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, root / libs.name, symlinks=True, copy_function=_link_or_copy)
    for directory in [root, *root.rglob("*")]:
        if directory.is_dir():
            directory.chmod(0o755)
    copied = root / pkg.name / "pginstall" / "bin"
    if not runner.can_run(copied / "initdb"):
        raise RuntimeError(f"user {runner.user!r} cannot run PostgreSQL from {bin_dir} nor from a copy in {copied}")
    return copied


def _wait_ready(proc: subprocess.Popen[bytes], data: Path, deadline: float) -> bool:
    """Wait for postmaster.pid to say "ready"; False if postgres exited."""
    pid_file = data / "postmaster.pid"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            lines = []
        # Line 8 is the postmaster status; "ready" means accepting connections.
        if len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready":
            return True
        time.sleep(0.02)
    raise RuntimeError("PostgreSQL did not become ready in time")


class _Started(NamedTuple):
    proc: subprocess.Popen[bytes]
    port: int
    version: str
    user: str | None
    copied_binaries: bool


def _start_postgres(pkg: Path, base: Path) -> _Started:
    runner = _Runner()
    if runner.user is not None:
        # mkdtemp makes 0700; the server's user must be able to traverse it.
        base.chmod(0o711)
    bin_dir = _binaries(pkg, base, runner)
    data = base / "data"
    data.mkdir(mode=0o700)
    runner.chown(data)
    log = base / "postgres.log"
    # -N: no fsync of the new cluster (it is thrown away anyway); --locale=C:
    # deterministic, and immune to a LANG naming a locale that isn't installed.
    runner.run(
        [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-N"],
        log,
    )
    version = (data / "PG_VERSION").read_text().strip()
    settings = [arg for name, value in _SERVER_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
    deadline = time.monotonic() + _START_TIMEOUT
    for _attempt in range(5):
        # The port can be taken between probing and binding; postgres then
        # exits with "could not bind", and we try another one.
        port = free_port()
        proc = runner.popen([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), *settings], log)
        try:
            ready = _wait_ready(proc, data, deadline)
        except BaseException:  # timeout, or SIGTERM while waiting: don't leave it running
            _stop_postgres(proc)
            raise
        if ready:
            return _Started(proc, port, version, runner.user, bin_dir != pkg / "pginstall" / "bin")
        if "could not bind" not in log_tail(log):
            break
    raise RuntimeError(f"PostgreSQL failed to start:\n{log_tail(log)}")


def _stop_postgres(proc: subprocess.Popen[bytes]) -> None:
    # SIGINT = "fast" shutdown: abort sessions, clean exit. Escalate to
    # SIGQUIT ("immediate") and finally SIGKILL if it hangs.
    stop_process(proc, ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the supervisor child (``python -m greenpool.testing.embedded``).

    Starts PostgreSQL in a new temporary directory, prints
    ``ok port=<port> version=<v> dir=<path> user=<run-as> binaries=<installed|copy>``
    (or ``err <reason>``), serves
    ``ping``/``quit`` on stdin, and on ``quit``, stdin EOF or parent death
    stops the server and deletes the directory.
    """
    parser = argparse.ArgumentParser(prog="python -m greenpool.testing.embedded")
    parser.add_argument("--pgserver-dir", type=Path, default=None, help="installed pgserver package directory")
    args = parser.parse_args(argv)
    parent = prepare_supervisor()
    try:
        pkg = args.pgserver_dir or _pgserver_dir()
    except RuntimeError as exc:
        reply(f"err {exc}")
        return 1

    def start(base: Path) -> tuple[subprocess.Popen[bytes], str]:
        started = _start_postgres(pkg, base)
        return started.proc, (
            f"port={started.port} version={shlex.quote(started.version)} dir={shlex.quote(str(base))}"
            f" user={started.user or ''} binaries={'copy' if started.copied_binaries else 'installed'}"
        )

    return supervise(
        parent,
        "greenpool-embedded-",
        start,
        _stop_postgres,
        what="postgres",
        log_prefix="greenpool.testing.embedded",
    )


if __name__ == "__main__":
    raise SystemExit(main())
