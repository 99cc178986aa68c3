"""Helper child processes and their line protocol (shared by :mod:`greenpool.testing.proxy`,
:mod:`~greenpool.testing.embedded`, :mod:`~greenpool.testing.pgbouncer` and
:mod:`~greenpool.testing.cluster`).

A helper child is one of greenpool's own modules run as ``__main__`` in a
fresh interpreter. The parent talks to it over two private pipes: it writes
one command per line to the child's stdin and reads one reply per line
(``ok ...`` or ``err ...``) from the child's stdout. Closing the child's stdin
(or the parent dying) tells the child to clean up and exit.

The parent side must behave identically in a plain process and in one that
gevent has monkey-patched -- possibly *after* the child was started. So the
blocking primitives used to talk to the child (poll, read, write, the lock)
are fetched through :func:`original`, and the pipes are raw file descriptors
we own rather than ``Popen``'s file objects (gevent's ``Popen`` would hand
back cooperative, non-blocking ones). The
price is that a command blocks the whole gevent hub for its round trip, which
is a few hundred microseconds; in exchange, two greenlets can never interleave
halves of a request/reply exchange.

Parent side: :class:`LineChild` (one child and its pipes),
:func:`spawn_supervisor` (start one and read its ``ok key=value ...``
announcement) and :class:`ChildController` (an object that owns one once
started). Child side (stdlib only): :func:`prepare_supervisor`,
:func:`supervise` (run one server program in a temporary directory until
told to stop), :func:`serve_until_quit`, :func:`stdin_commands`,
:func:`reply`, and what starting and stopping a server program takes
(:class:`RunAs`, :func:`free_port`, :func:`log_tail`,
:func:`stop_process`).

POSIX only.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .._runtime.patching import original

__all__ = [
    "ChildController",
    "HelperError",
    "LineChild",
    "RunAs",
    "free_port",
    "log_tail",
    "prepare_supervisor",
    "reply",
    "serve_until_quit",
    "spawn_supervisor",
    "stdin_commands",
    "stop_process",
    "supervise",
]

T = TypeVar("T")
C = TypeVar("C", bound="ChildController")


#: The directory of the ``greenpool`` package, handed to children so they can
#: import greenpool's modules without executing ``greenpool/__init__.py``.
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in the child via ``python -I -c``. It installs an empty stand-in for the
# ``greenpool`` package and then runs the target module like ``python -m``
# would. Skipping the real ``__init__`` keeps children fast (no gevent or
# psycopg import) and free of whatever side effects the engine's import has,
# and ``-I`` keeps PYTHONPATH / the cwd from shadowing the stdlib in a child
# that only needs the stdlib.
_BOOTSTRAP = (
    "import runpy, sys, types\n"
    "pkg = types.ModuleType('greenpool')\n"
    "pkg.__path__ = [sys.argv[1]]\n"
    "sys.modules['greenpool'] = pkg\n"
    "mod = sys.argv[2]\n"
    "sys.argv = [mod] + sys.argv[3:]\n"
    "runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
)

_STDERR_TAIL = 4000


class HelperError(RuntimeError):
    """A helper child failed to start, answer, or exited unexpectedly."""


def _wait_readable(fd: int, timeout: float) -> bool:
    """Block (without yielding to gevent) until *fd* is readable or *timeout* passes."""
    poll_cls = original("select", "poll")
    poller = poll_cls()
    # POLLHUP matters: it is how a closed write end (child exited) shows up.
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(max(0.0, timeout) * 1000.0))


class LineChild:
    """One helper child process and the pipes to talk to it.

    Thread-safe and greenlet-safe: a lock serialises request/reply round trips.
    """

    def __init__(self, module: str, args: Sequence[str], *, what: str) -> None:
        """Spawn ``python -m <module> <args>`` (without importing greenpool's ``__init__``).

        *what* names the child in error messages ("proxy", "embedded PostgreSQL").
        """
        self._what = what
        self._lock = original("_thread", "allocate_lock")()
        self._buf = b""
        self._closed = False
        # A file, not a pipe: nobody reads the child's stderr until something
        # goes wrong, and an unread pipe would eventually block the child.
        self._stderr = tempfile.TemporaryFile()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            # The *current* Popen: gevent's replacement in a patched process.
            # The stdlib original cannot be used there (gevent's patch also
            # swaps out the fork/exec helper it relies on), and since we pass
            # raw fds, gevent's Popen wraps nothing in cooperative objects.
            self._proc: subprocess.Popen[bytes] = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP, _PKG_DIR, module, *args],
                stdin=in_r,
                stdout=out_w,
                stderr=self._stderr,
                close_fds=True,
                # A new session keeps terminal signals (Ctrl-C) away from the
                # child: the parent decides when it stops, so the parent's own
                # cleanup can still talk to it.
                start_new_session=True,
            )
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            self._stderr.close()
            raise
        os.close(in_r)
        os.close(out_w)
        self._in = in_w
        self._out = out_r

    @property
    def pid(self) -> int:
        """Process id of the child."""
        return self._proc.pid

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def stderr_tail(self) -> str:
        """The last few KB the child wrote to stderr (for error messages)."""
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - _STDERR_TAIL))
            return self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def _error(self, message: str) -> HelperError:
        tail = self.stderr_tail()
        if tail:
            message = f"{message}\n--- {self._what} stderr ---\n{tail}"
        return HelperError(message)

    def readline(self, timeout: float) -> str:
        """Read one line from the child, without the newline.

        Raises :class:`HelperError` if the child exits or stays silent
        for *timeout* seconds.
        """
        read = original("os", "read")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._error(f"{self._what} (pid {self.pid}) did not answer within {timeout:g}s")
            if not _wait_readable(self._out, remaining):
                continue
            chunk = read(self._out, 65536)
            if not chunk:
                raise self._error(
                    f"{self._what} (pid {self.pid}) exited unexpectedly (exit status {self._proc.poll()})"
                )
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def _write(self, data: bytes) -> None:
        write = original("os", "write")
        view = memoryview(data)
        while view:
            try:
                n = write(self._in, view)
            except BrokenPipeError:
                raise self._error(f"{self._what} (pid {self.pid}) is gone") from None
            view = view[n:]

    def request(self, command: str, timeout: float = 10.0) -> str:
        """Send one command line and return the text after ``ok`` in the reply.

        Raises :class:`HelperError` on an ``err`` reply, a dead child,
        or no reply within *timeout* seconds.
        """
        with self._lock:
            if self._closed:
                raise HelperError(f"{self._what} has been stopped")
            self._write(command.encode("utf-8") + b"\n")
            reply = self.readline(timeout)
        if reply == "ok" or reply.startswith("ok "):
            return reply[3:]
        raise self._error(f"{self._what} rejected {command!r}: {reply}")

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit, wait up to *timeout* s for it, then kill it.

        Idempotent. Closing stdin rather than signalling gives the child the
        chance to clean up (stop servers, delete temp dirs).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                # "quit" and not only EOF: a process that forked after starting
                # us (celery prefork, multiprocessing) holds a copy of this pipe's
                # write end, so EOF alone might not arrive until it exits.
                self._write(b"quit\n")
            except HelperError:
                pass
            os.close(self._in)
            self._drain_until_eof(timeout)
            if self._proc.poll() is None:
                # Either the child is exiting right now (EOF seen) or it did not
                # react in time; in the latter case it has lost its chance.
                try:
                    self._proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            os.close(self._out)
            self._stderr.close()

    def _drain_until_eof(self, timeout: float) -> None:
        read = original("os", "read")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if _wait_readable(self._out, remaining) and not read(self._out, 65536):
                return


def spawn_supervisor(
    module: str,
    args: Sequence[str],
    *,
    what: str,
    failure: str,
    parse: Callable[[dict[str, str]], T],
    timeout: float,
    stop_timeout: float,
) -> tuple[LineChild, T]:
    """Start the supervisor child *module* and read its announcement; return the child and ``parse(fields)``.

    The child's first line is ``ok key=value ...`` (values shell-quoted) or
    ``err <reason>``; *parse* gets the fields as a dict. When the child says
    ``err``, says nothing within *timeout* seconds, exits, or *parse* raises
    :class:`KeyError` or :class:`ValueError`, the child is closed (waiting
    up to *stop_timeout* s) and :class:`RuntimeError` raised:
    ``"<failure>: <reason>"`` followed by the end of the child's stderr.
    """
    child = LineChild(module, args, what=what)
    try:
        line = child.readline(timeout)
        if not line.startswith("ok "):
            raise HelperError(line[4:] if line.startswith("err ") else line)
        fields = dict(item.split("=", 1) for item in shlex.split(line[3:]))
        parsed = parse(fields)
    except (HelperError, KeyError, ValueError) as exc:
        tail = child.stderr_tail()
        child.close(timeout=stop_timeout)
        detail = str(exc)
        if tail and tail not in detail:
            detail = f"{detail}\n{tail}"
        raise RuntimeError(f"{failure}: {detail}") from None
    return child, parsed


class ChildController:
    """Base of an object that runs a helper child listening on a loopback port.

    Subclasses say how to start the child (:meth:`_spawn`, which also sets
    ``_port``) and what they are called in errors (``_name``). :meth:`start`
    and the ``with`` block start the child once; :meth:`_stop_child` (and the
    end of the ``with`` block) stop it. Safe to use from threads and
    greenlets, in plain or monkey-patched processes.
    """

    #: Address the child listens on.
    host: str = "127.0.0.1"
    #: What the object is called in error messages.
    _name = "child"
    #: Seconds :meth:`_stop_child` waits for the child to exit before killing it.
    _stop_timeout = 10.0

    def __init__(self) -> None:
        self._port: int | None = None
        self._child: LineChild | None = None
        # Serialises start/stop. A real lock even under gevent: nothing inside
        # yields to the hub (the child's pipes block), so a greenlet can never
        # block while holding it.
        self._lifecycle = original("_thread", "allocate_lock")()

    @property
    def port(self) -> int:
        """The loopback port the child listens on (known once started)."""
        if self._port is None:
            raise RuntimeError(f"{self._name} has not been started")
        return self._port

    @property
    def running(self) -> bool:
        """True between starting and stopping."""
        return self._child is not None and not self._child.closed

    def start(self: C) -> C:
        """Start the child and wait until it is ready; return ``self``. Does nothing if it runs already."""
        with self._lifecycle:
            if not self.running:
                self._child = self._spawn()
        return self

    def _spawn(self) -> LineChild:
        """Start the child, wait until it is ready, set ``_port``; return the child."""
        raise NotImplementedError

    def _stop_child(self) -> None:
        """Stop the child. Idempotent."""
        with self._lifecycle:
            child, self._child = self._child, None
            if child is not None:
                child.close(timeout=self._stop_timeout)

    def __enter__(self: C) -> C:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_child()


# --------------------------------------------------------------------------
# Child side (stdlib only)
# --------------------------------------------------------------------------


def reply(text: str) -> None:
    """Write one reply line to the parent."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def prepare_supervisor() -> int:
    """Set a supervisor child up: return its parent's pid, and make SIGTERM and SIGHUP exit cleanly.

    Call it before the first reply: once it has that, the parent may exit at
    once, and a parent read after that would be the reaper that adopted us.
    A plain ``kill`` must still stop the server and delete its directory: the
    signals become :class:`SystemExit`, so ``finally`` clauses run.
    """
    parent = os.getppid()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGHUP, lambda signum, frame: sys.exit(128 + signum))
    return parent


def stdin_commands(parent: int, idle: Callable[[], None] | None = None) -> Iterator[str]:
    """The command lines the parent writes to stdin (stripped), until stdin's end or *parent*'s death.

    Polling rather than only waiting for EOF: a parent that forked keeps our
    stdin open in its children after it dies. *idle* is called after each
    second without input.
    """
    buf = b""
    while True:
        readable, _, _ = select.select([0], [], [], 1.0)
        if not readable:
            if os.getppid() != parent:
                return
            if idle is not None:
                idle()
            continue
        chunk = os.read(0, 4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            yield line.decode("utf-8", "replace").strip()


def serve_until_quit(proc: subprocess.Popen[bytes], parent: int, what: str, *, log_prefix: str | None = None) -> None:
    """Answer ``ping`` (whether *proc*, called *what*, runs) until ``quit``, stdin's end, or *parent*'s death.

    With *log_prefix*, *proc* exiting on its own is said once on stderr
    (``<log_prefix>: <what> exited unexpectedly (<status>)``).
    """
    reported_exit = False

    def idle() -> None:
        nonlocal reported_exit
        if log_prefix is not None and proc.poll() is not None and not reported_exit:
            reported_exit = True
            print(f"{log_prefix}: {what} exited unexpectedly ({proc.returncode})", file=sys.stderr)

    for command in stdin_commands(parent, idle):
        if command == "quit":
            reply("ok bye")
            return
        if command == "ping":
            reply("ok pong" if proc.poll() is None else f"err {what} is not running")
        else:
            reply(f"err unknown command {command!r}")


def supervise(
    parent: int,
    prefix: str,
    start: Callable[[Path], tuple[subprocess.Popen[bytes], str]],
    stop: Callable[[subprocess.Popen[bytes]], None],
    *,
    what: str,
    log_prefix: str | None = None,
) -> int:
    """Run one server program for *parent* in a new temporary directory; return the exit status.

    ``start(directory)`` starts it and returns its process and the text of
    the ``ok`` reply (``port=... dir=...``); a failure is replied as ``err
    <first line>``, with the traceback on stderr. Then ``ping``/``quit``
    are served (:func:`serve_until_quit`); on ``quit``, stdin's end or the
    parent's death, ``stop(process)`` stops it and the directory is deleted.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    proc: subprocess.Popen[bytes] | None = None
    try:
        try:
            proc, ready = start(base)
        except Exception as exc:  # report any failure to the parent, not just the expected ones
            traceback.print_exc()  # the full story (log tail) for the parent's error message
            summary = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            reply(f"err {summary}")
            return 1
        reply(f"ok {ready}")
        serve_until_quit(proc, parent, what, log_prefix=log_prefix)
        return 0
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def stop_process(proc: subprocess.Popen[bytes], signals: Sequence[tuple[signal.Signals, float]]) -> None:
    """Stop *proc*: send each of *signals* in turn, waiting its seconds for the process to exit."""
    if proc.poll() is not None:
        return
    for sig, wait in signals:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


class RunAs:
    """The user a server program runs as: ours, or an unprivileged one when we are root.

    Servers (PostgreSQL, PgBouncer) refuse to run as root: then the first of
    *names* that exists is picked, and *missing* raised if none does.
    """

    def __init__(self, names: Sequence[str], missing: Exception) -> None:
        #: The user picked (None: this process's own).
        self.user: str | None = None
        self.uid = self.gid = -1
        #: Keyword arguments for `subprocess.run` and `~subprocess.Popen` that run a program as `user`.
        self.kwargs: dict[str, Any] = {}
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            import pwd

            for name in names:
                try:
                    entry = pwd.getpwnam(name)
                except KeyError:
                    continue
                self.user, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
                # Drop the group and supplementary groups too, not just the uid.
                self.kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
                break
            else:
                raise missing

    def chown(self, path: str | os.PathLike[str]) -> None:
        """Give *path* to `user` (nothing to do when it is us)."""
        if self.user is not None:
            os.chown(path, self.uid, self.gid)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, size: int = 3000) -> str:
    """The last *size* bytes of the file *path*, as text ("" if it can't be read)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-size:].decode("utf-8", "replace").strip()
