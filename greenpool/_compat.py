"""Concurrency primitives chosen when they are used, not when they are imported.

`gevent.monkey.patch_all()` may run before or after greenpool (or psycopg, or
peewee) is imported, and the same pool may be used from greenlets and from
plain OS threads. So nothing here binds to a patched or unpatched module at
import time: every decision looks at the calling thread when it is made.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

import greenlet


def _original(module: str, name: str) -> Any:
    """Return the unpatched `module.name`, whatever gevent has patched so far."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(__import__(module), name)


#: A real OS lock. The pool never holds one across I/O or a greenlet switch,
#: so a real lock is correct for greenlets and threads alike, and the cheapest.
allocate_lock: Callable[[], Any] = _original("_thread", "allocate_lock")
get_thread_ident: Callable[[], int] = _original("_thread", "get_ident")
_real_sleep: Callable[[float], None] = _original("time", "sleep")
_RealThread: type[threading.Thread] = _original("threading", "Thread")

getcurrent = greenlet.getcurrent

INFINITY = float("inf")


def _hub_if_exists_before_gevent() -> Any | None:
    """Stand-in for gevent's `get_hub_if_exists` until gevent is imported."""
    global _hub_if_exists
    if "gevent" not in sys.modules:
        return None  # no hub can exist yet
    from gevent._hub_local import get_hub_if_exists

    _hub_if_exists = get_hub_if_exists
    return get_hub_if_exists()


_hub_if_exists: Callable[[], Any] = _hub_if_exists_before_gevent


def gevent_hub() -> Any | None:
    """Return the calling thread's gevent hub if greenlets are in use here.

    Greenlets are "in use" in a greenlet spawned on a hub, and anywhere once
    gevent has monkey-patched threads (every "thread" is then a greenlet and
    blocking calls run the hub). The main greenlet of an unpatched thread is
    a plain thread, even if a hub object exists there: nothing guarantees
    that hub ever runs, so the caller must block the OS thread.
    """
    # Called for every checkout and every query: the common case first.
    if getcurrent().parent is not None:
        hub = _hub_if_exists()
        if hub is not None:
            return hub
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        from gevent import get_hub

        return get_hub()
    return None


def sleep(seconds: float) -> None:
    """Sleep cooperatively under gevent, or block this OS thread otherwise."""
    if gevent_hub() is not None:
        import gevent

        gevent.sleep(seconds)
    else:
        _real_sleep(seconds)


class Executor:
    """Runs background jobs as greenlets of one hub, or as daemon OS threads.

    Which one is decided once, by the thread that creates the executor
    (normally the one opening the pool): a pool opened under gevent does its
    maintenance in greenlets of that hub, even when a job is submitted from
    another OS thread.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.hub = gevent_hub()
        self._hub_thread = get_thread_ident() if self.hub is not None else None

    @property
    def uses_gevent(self) -> bool:
        """True if jobs run as greenlets."""
        return self.hub is not None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` in the background; never blocks the caller."""
        if self.hub is None:
            _RealThread(target=fn, args=args, name=self.name, daemon=True).start()
        elif get_thread_ident() == self._hub_thread:
            self._spawn(fn, args)
        else:
            self.hub.loop.run_callback_threadsafe(self._spawn, fn, args)

    @staticmethod
    def _spawn(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        import gevent

        gevent.spawn(fn, *args)

    def sleep(self, seconds: float) -> None:
        """Sleep in a background job (greenlet or thread) of this executor.

        Under gevent the timer doesn't keep the hub alive: an open pool must
        not stop `gevent.wait()` in the application from returning.
        """
        if self.hub is None:
            _real_sleep(seconds)
        else:
            import gevent

            gevent.sleep(seconds, ref=False)


class GreenWakeup:
    """A one-shot signal for a greenlet, fired through a hub loop callback.

    `slot` carries what the firing party hands over; it is set before
    `fire()`, so a waiter that finds it set doesn't park. The party firing
    never switches; a late fire after the waiter gave up is harmless.
    """

    __slots__ = ("slot", "_hub", "_greenlet")

    def __init__(self, hub: Any) -> None:
        self.slot: Any = None
        self._hub = hub
        self._greenlet: Any = None

    def wait(self, timeout: float) -> bool:
        """Block this greenlet until fired or `timeout` seconds pass.

        Exceptions thrown into the greenlet (`gevent.Timeout`,
        `GreenletExit`) propagate: the caller settles who owns what.
        """
        if self.slot is not None:
            return True
        hub = self._hub
        # An infinite timeout (Peewee's timeout=0, "wait forever") arms no timer.
        timer = hub.loop.timer(max(timeout, 0.0)) if timeout != INFINITY else None
        self._greenlet = getcurrent()
        if timer is not None:
            timer.start(self._expire)
        try:
            return bool(hub.switch())
        finally:
            self._greenlet = None
            if timer is not None:
                timer.close()

    def _expire(self) -> None:
        greenlet = self._greenlet
        if greenlet is not None:
            greenlet.switch(False)

    def _wake(self) -> None:
        greenlet = self._greenlet
        if greenlet is not None:
            greenlet.switch(True)

    def fire(self) -> None:
        """Wake the waiter; callable from any greenlet or thread."""
        hub = self._hub
        if get_thread_ident() == hub.thread_ident:
            hub.loop.run_callback(self._wake)
        else:
            hub.loop.run_callback_threadsafe(self._wake)


class ThreadWakeup:
    """A one-shot signal for a plain OS thread: a real lock, released once."""

    __slots__ = ("slot", "_lock")

    def __init__(self) -> None:
        self.slot: Any = None
        self._lock = allocate_lock()
        self._lock.acquire()

    def wait(self, timeout: float) -> bool:
        """Block this thread until fired or `timeout` seconds pass."""
        if timeout == INFINITY:
            return bool(self._lock.acquire())
        return bool(self._lock.acquire(True, max(timeout, 0.0)))

    def fire(self) -> None:
        """Wake the waiter; callable from any greenlet or thread."""
        self._lock.release()
