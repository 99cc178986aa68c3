"""A request for a connection, parked until a pool hands it one.

A request waits in a pool's queue until, under the pool's lock, exactly one
of these happens: a check-in takes it off the queue and sets its `slot`; it
takes itself off the queue when it gives up; the pool closes or fails it and
sets its `slot` to a failure. That is the accept handshake (see
`greenpool.engine.pool`). `slot` is set before `fire()`, so a waiter that
finds it set doesn't park, and the party firing never switches.
"""

from __future__ import annotations

from typing import Any

from gevent.hub import Waiter

from .hub import TIMEOUT_MAX, allocate_lock, get_thread_ident


class GreenRequest(Waiter):  # type: ignore[misc]  # gevent has no type stubs
    """A request by a greenlet of `hub`: `GreenRequest(hub)`.

    A one-shot gevent `Waiter` (C code: no Python frame to create or wake
    it); its creator sets `slot` to None, `deadline` to when it gives up and
    `since` to when it began (`time.monotonic()`: a connect attempt begun
    before then can't fail it).
    """

    __slots__ = ("slot", "deadline", "since")

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


class ThreadRequest:
    """A request by a plain OS thread: a real lock, released once."""

    __slots__ = ("slot", "since", "_lock")

    slot: Any  # set by the creator, then by the firing party
    since: float  # set by the creator: when the request began
    hub = None  # not a greenlet's: no `DeadlineTimer` wakes it

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._lock.acquire()

    def wait(self, timeout: float) -> None:
        """Block this thread until fired or `timeout` seconds pass."""
        if timeout > TIMEOUT_MAX:
            self._lock.acquire()
        else:
            self._lock.acquire(True, max(timeout, 0.0))

    def fire(self) -> None:
        """Wake the waiter; callable from any greenlet or thread."""
        self._lock.release()


class Failed:
    """A request's `slot` when it got none: cancelled, or failed by a connect's error."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


#: The request gave up, or the pool closed.
CANCELLED = Failed(None)
