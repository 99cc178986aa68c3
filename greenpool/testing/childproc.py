"""Line-protocol helper child processes (shared by :mod:`greenpool.testing.proxy`
and :mod:`greenpool.testing.embedded`).

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

POSIX only.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from .._runtime.patching import original

__all__ = ["HelperError", "LineChild"]

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
