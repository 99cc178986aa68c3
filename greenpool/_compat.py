"""Concurrency primitives chosen when they are used, not when they are imported.

`gevent.monkey.patch_all()` may run before or after greenpool (or psycopg, or
peewee) is imported, and the same pool may be used from greenlets and from
plain OS threads. So nothing here binds to a patched or unpatched module at
import time: every decision looks at the calling thread when it is made.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from time import monotonic
from typing import Any

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
_TIMEOUT_MAX: float = _original("_thread", "TIMEOUT_MAX")
_real_sleep: Callable[[float], None] = _original("time", "sleep")
#: Starts a real OS thread. Not `threading.Thread`: its `start()` looks up
#: `threading._start_new_thread` when called, which after `patch_all()` is
#: gevent's, and makes a greenlet of the calling thread's hub.
_start_os_thread: Callable[..., int] = _original("_thread", "start_new_thread")

getcurrent = greenlet.getcurrent

INFINITY = float("inf")


def _hub_if_exists_before_gevent() -> Any | None:
    """Stand-in for gevent's `get_hub_if_exists` until gevent is imported."""
    if "gevent" not in sys.modules:
        return None  # no hub can exist yet
    _bind_gevent()
    return _hub_if_exists()


def _bind_gevent() -> None:
    """Bind what needs gevent, once gevent is imported and a hub may exist."""
    global _hub_if_exists, GreenRequest
    from gevent._hub_local import get_hub_if_exists
    from gevent.hub import Waiter

    class _GreenRequest(Waiter):  # type: ignore[misc]
        """A request for a connection by a greenlet (see `GreenRequest`)."""

        __slots__ = ("slot", "deadline")

        def wait(self) -> None:
            """Park this greenlet until fired (or woken by its `DeadlineTimer`).

            Exceptions thrown into the greenlet (`gevent.Timeout`,
            `GreenletExit`) propagate: the caller settles who owns what.
            A fire that comes after the wait ended is ignored by `Waiter`.
            """
            if self.slot is None:
                self.get()

        def fire(self) -> None:
            """Wake the waiter; callable from any greenlet or thread."""
            hub = self.hub
            if get_thread_ident() == hub.thread_ident:
                hub.loop.run_callback(self.switch, None)
            else:
                hub.loop.run_callback_threadsafe(self.switch, None)

    _hub_if_exists = get_hub_if_exists
    GreenRequest = _GreenRequest


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
    if _threads_patched():
        from gevent import get_hub

        if _hub_if_exists is _hub_if_exists_before_gevent:
            _bind_gevent()
        return get_hub()
    return None


def _threads_patched() -> bool:
    """Whether gevent has monkey-patched threads: every "thread" is a greenlet."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def sleep(seconds: float) -> None:
    """Sleep cooperatively under gevent, or block this OS thread otherwise."""
    if gevent_hub() is not None:
        import gevent

        gevent.sleep(seconds)
    else:
        _real_sleep(seconds)


class Executor:
    """Runs background jobs as greenlets of one hub, or as daemon OS threads.

    Jobs submitted by greenlets of the hub that opened the pool run as
    greenlets there, and so do those submitted from the main thread of a
    monkey-patched program, whose hub runs whenever anything waits. Any
    other job runs in an OS thread of its own: the main greenlet of an
    unpatched thread blocks its thread, so that thread's hub doesn't run
    while the submitter waits (for a connect, say); the hub of another
    thread may stop, or never run again, when its thread ends (in a patched
    program, a worker of gevent's thread pool runs its hub only while it
    waits). With `hub_bound` connections (pymysql's patched sockets belong
    to the hub that made them), the jobs of a patched program's other
    threads go to its main hub instead, where the connections are used.
    (Not to the asking thread's hub: it runs only while that thread waits,
    and most jobs outlive the wait.)
    """

    def __init__(self, hub_bound: bool = False) -> None:
        hub = gevent_hub()
        if hub is not None and _threads_patched() and not hub.main_hub:
            hub = None  # a worker thread's hub: it may never run again
        self.hub = hub
        self.hub_bound = hub_bound
        if hub is not None:
            _note_hub(hub)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` in the background; never blocks the caller."""
        # The hub, not the thread id: a thread that ended leaves its id to
        # the next one started.
        hub = gevent_hub()
        patched = _threads_patched()
        if hub is not None:
            _note_hub(hub)
            if hub is self.hub or (patched and hub.main_hub):
                import gevent

                gevent.spawn(fn, *args)
                return
        main_hub = _main_hub() if self.hub_bound and patched else None
        if main_hub is not None:
            main_hub.loop.run_callback_threadsafe(_spawn, fn, args)
        else:
            _start_os_thread(fn, args)

    @staticmethod
    def sleep(seconds: float) -> None:
        """Sleep in a background job, a greenlet or an OS thread's main greenlet.

        Under gevent the timer doesn't keep the hub alive: an open pool must
        not stop `gevent.wait()` in the application from returning.
        """
        if getcurrent().parent is None:  # a job run in an OS thread
            _real_sleep(seconds)
        else:
            import gevent

            gevent.sleep(seconds, ref=False)


def _no_hub() -> Any:
    return None


#: The main thread's hub, once seen (a weak reference).
_main_hub: Callable[[], Any] = _no_hub


def _note_hub(hub: Any) -> None:
    """Remember `hub` if it is the main thread's."""
    global _main_hub
    if hub.main_hub and _main_hub() is not hub:
        _main_hub = weakref.ref(hub)


def _spawn(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import gevent

    gevent.spawn(fn, *args)


def _green_request_before_gevent(hub: Any) -> Any:
    raise AssertionError("no gevent hub can exist before gevent is imported")


#: `GreenRequest(hub)`: a request for a connection by a greenlet of `hub`.
#: A one-shot gevent `Waiter` (C code: no Python frame to create or wake
#: it) whose `slot`, which the creator sets to None, carries what the
#: firing party hands over. `slot` is set before `fire()`, so a waiter that
#: finds it set doesn't park; the party firing never switches. Bound when
#: gevent is imported.
GreenRequest: Any = _green_request_before_gevent


class ThreadRequest:
    """A request for a connection by a plain OS thread: a real lock, released once."""

    __slots__ = ("slot", "_lock")

    slot: Any  # set by the creator, then by the firing party
    hub = None  # not a greenlet's: no `DeadlineTimer` wakes it

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._lock.acquire()

    def wait(self, timeout: float) -> None:
        """Block this thread until fired or `timeout` seconds pass."""
        if timeout > _TIMEOUT_MAX:
            self._lock.acquire()
        else:
            self._lock.acquire(True, max(timeout, 0.0))

    def fire(self) -> None:
        """Wake the waiter; callable from any greenlet or thread."""
        self._lock.release()


#: Longest a `DeadlineTimer` sleeps: for a request that waits without a
#: deadline it only holds the loop, and wakes now and then to go on doing so.
_HOLD_AT_MOST = 3600.0


class DeadlineTimer:
    """Wakes the queued greenlets of one hub whose requests reached their deadline.

    A pool keeps one per hub instead of a libev timer per wait: making,
    starting and closing a timer for every queued checkout, with hundreds
    of them in libev's heap, cost 5-10 % of the contended checkout's
    throughput. Requests mostly queue in deadline order (they share the
    pool's timeout), so the timer stays armed for the earliest deadline it
    has been shown; when it fires, `expire(now)` wakes the requests that are
    due and returns the earliest deadline left, which it re-arms for.

    Like the per-wait timers it replaces, it keeps the hub's loop alive only
    while a request waits. The pool's contended checkout drives it inline,
    without a call per wait: before parking a request it counts itself in
    `waiting`, then `arm()`s for an earlier deadline than `at` or `hold()`s
    the loop if not `held`; after, it counts itself out and, the last one
    out, calls `let_go()`. All of it runs in the hub's thread.
    """

    __slots__ = ("at", "waiting", "held", "_loop", "_timer", "_expire")

    def __init__(self, hub: Any, expire: Callable[[float], float]) -> None:
        self._loop = hub.loop
        self._expire = expire
        self._timer: Any = None
        self.waiting = 0  # requests of this hub parked
        self.held = False  # the timer keeps the loop alive
        self.at = INFINITY  # the deadline armed for

    def arm(self, deadline: float) -> None:
        """Fire at `deadline` instead (it is earlier than `at`); hold the loop.

        `INFINITY`: only hold the loop (a request waits for good).
        """
        if self._timer is not None:
            self._timer.close()
        self.at = deadline
        now = monotonic()
        self._timer = self._loop.timer(max(min(deadline, now + _HOLD_AT_MOST) - now, 0.0))
        self._timer.start(self._fire)
        self.held = True

    def hold(self) -> None:
        """Keep the loop alive until the armed deadline (a request waits)."""
        if self._timer is None:
            self.arm(INFINITY)
            return
        self._timer.ref = True
        self.held = True

    def let_go(self) -> None:
        """No request waits any more: stop keeping the loop alive."""
        if self.held:
            self._timer.ref = False
            self.held = False

    def _fire(self) -> None:
        self._timer.close()
        self._timer = None
        self.held = False
        self.at = INFINITY
        deadline = self._expire(monotonic())
        if deadline != INFINITY or self.waiting:
            self.arm(deadline)
