"""Background jobs: greenlets of the right hub, or daemon OS threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent

from .hub import getcurrent, gevent_hub, main_hub, note_hub, real_sleep, start_os_thread
from .patching import threads_patched


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
        if hub is not None and threads_patched() and not hub.main_hub:
            hub = None  # a worker thread's hub: it may never run again
        self.hub = hub
        self.hub_bound = hub_bound
        if hub is not None:
            note_hub(hub)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` in the background; never blocks the caller."""
        # The hub, not the thread id: a thread that ended leaves its id to
        # the next one started.
        hub = gevent_hub()
        patched = threads_patched()
        if hub is not None:
            note_hub(hub)
            if hub is self.hub or (patched and hub.main_hub):
                gevent.spawn(fn, *args)
                return
        main = main_hub() if self.hub_bound and patched else None
        if main is not None:
            main.loop.run_callback_threadsafe(_spawn, fn, args)
        else:
            start_os_thread(fn, args)

    @staticmethod
    def sleep(seconds: float) -> None:
        """Sleep in a background job, a greenlet or an OS thread's main greenlet.

        Under gevent the timer doesn't keep the hub alive: an open pool must
        not stop `gevent.wait()` in the application from returning.
        """
        if getcurrent().parent is None:  # a job run in an OS thread
            real_sleep(seconds)
        else:
            gevent.sleep(seconds, ref=False)


def _spawn(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    gevent.spawn(fn, *args)
