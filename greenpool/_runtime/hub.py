"""Real locks and thread ids, and "does this caller run on a gevent hub?".

Importing gevent patches nothing, so this module binds gevent's hub lookup
at import; what the caller is (a greenlet of a running hub, a patched
"thread", a plain OS thread) is decided at each call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import greenlet
from gevent import get_hub
from gevent import sleep as gevent_sleep
from gevent._hub_local import get_hub_if_exists

from .patching import original, threads_patched

#: A real OS lock. The pool never holds one across I/O or a greenlet switch,
#: so a real lock is correct for greenlets and threads alike, and the cheapest.
allocate_lock: Callable[[], Any] = original("_thread", "allocate_lock")
get_thread_ident: Callable[[], int] = original("_thread", "get_ident")
TIMEOUT_MAX: float = original("_thread", "TIMEOUT_MAX")
real_sleep: Callable[[float], None] = original("time", "sleep")
_real_poll: Callable[[], Any] = original("select", "poll")


def readiness_poller(fd: int) -> Any:
    """A real (unpatched) `select.poll` object watching `fd` for input.

    `poller.poll(0)` is then a zero-timeout check, non-empty when data or
    EOF waits: a tenth of a `select.select()` call's cost, so a connection
    keeps one for its checkouts.
    """
    poller = _real_poll()
    poller.register(fd, _POLLIN)
    return poller


_POLLIN: int = original("select", "POLLIN")


#: Starts a real OS thread. Not `threading.Thread`: its `start()` looks up
#: `threading._start_new_thread` when called, which after `patch_all()` is
#: gevent's, and makes a greenlet of the calling thread's hub.
start_os_thread: Callable[..., int] = original("_thread", "start_new_thread")

getcurrent = greenlet.getcurrent

INFINITY = float("inf")


def gevent_hub() -> Any | None:
    """Return the calling thread's gevent hub if greenlets are in use here.

    Greenlets are "in use" in a greenlet spawned on a hub, and anywhere once
    gevent has monkey-patched threads (every "thread" is then a greenlet and
    blocking calls run the hub). The main greenlet of an unpatched thread is
    a plain thread, even if a hub object exists there: nothing guarantees
    that hub ever runs, so the caller must block the OS thread.
    """
    # Called for every contended checkout and every query: the common case first.
    if getcurrent().parent is not None:
        hub = get_hub_if_exists()
        if hub is not None:
            return hub
    if threads_patched():
        return get_hub()
    return None


def sleep(seconds: float) -> None:
    """Sleep cooperatively under gevent, or block this OS thread otherwise."""
    if gevent_hub() is not None:
        gevent_sleep(seconds)
    else:
        real_sleep(seconds)


def _no_hub() -> Any:
    return None


#: The main thread's hub, once seen (a weak reference).
_main_hub: Callable[[], Any] = _no_hub


def note_hub(hub: Any) -> None:
    """Remember `hub` if it is the main thread's."""
    global _main_hub
    if hub.main_hub and _main_hub() is not hub:
        _main_hub = weakref.ref(hub)


def main_hub() -> Any | None:
    """The main thread's hub, if one was noted and still exists."""
    return _main_hub()
