"""Pool events: the rare things that happen to a pool, for logging, metrics and alerts.

In the spirit of SQLAlchemy's pool events, greenpool's own logging sits on
them, and so may metrics and your own alerting::

    from greenpool.engine import events

    def page_someone(pool, error):
        ...

    events.listen(None, "outage_started", page_someone)   # every pool
    events.listen(pool, "failover", lambda pool, error: ...)  # one pool

Nothing here runs on the checkout or return path: each event is fired
where the pool already handles something rare. A listener runs in the
thread or greenlet that saw the event (often a background job), must be
quick and must not block on the pool; an exception it raises is logged
and otherwise ignored.

Events (`EVENTS`), and what their listeners get after the pool:

- `connect_failed(error)`: a connect attempt failed.
- `outage_started(error)`: the first failed connect after one that worked.
- `outage_ended(seconds, attempts, lost)`: a connect works again, after
  `seconds` of failing connects, `attempts` of them, and `lost` connections
  found broken meanwhile.
- `connection_lost(reason, error)`: a connection found unusable, `reason`
  one of "closed while idle", "failed check", "broken at return", "failed
  reset", "failed ping" (`error` None where none was raised).
- `leak(slot, seconds)`: a connection lent longer than `leak_threshold`
  (once per lending).
- `failover(error)`: the server is no longer the primary (`Pool.failover()`).
- `reconnect_failed()`: connects have failed for `reconnect_timeout` seconds.
- `request_timed_out(seconds)`: a request got no connection within its
  timeout (the pool exhausted).
"""

from __future__ import annotations

import logging
import traceback
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("greenpool.engine")

#: The events, and what their listeners are given after the pool.
EVENTS = {
    "connect_failed": ("error",),
    "outage_started": ("error",),
    "outage_ended": ("seconds", "attempts", "lost"),
    "connection_lost": ("reason", "error"),
    "leak": ("slot", "seconds"),
    "failover": ("error",),
    "reconnect_failed": (),
    "request_timed_out": ("seconds",),
}

Listener = Callable[..., Any]

#: Listeners for every pool, by event.
_everywhere: dict[str, list[Listener]] = {name: [] for name in EVENTS}
#: Listeners for one pool, by pool (weakly) and event.
_per_pool: weakref.WeakKeyDictionary[Any, dict[str, list[Listener]]] = weakref.WeakKeyDictionary()


def _check(name: str, fn: Listener) -> None:
    if name not in EVENTS:
        raise ValueError(f"name must be one of {', '.join(EVENTS)}, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")


def listen(pool: Any, name: str, fn: Listener) -> None:
    """Call `fn(pool, *arguments)` on event `name` of `pool` (None: of every pool)."""
    _check(name, fn)
    if pool is None:
        _everywhere[name].append(fn)
    else:
        _per_pool.setdefault(pool, {}).setdefault(name, []).append(fn)


def remove(pool: Any, name: str, fn: Listener) -> None:
    """Stop calling `fn` on event `name` of `pool` (None: of every pool); raise ValueError if it wasn't."""
    _check(name, fn)
    listeners = _everywhere[name] if pool is None else _per_pool.get(pool, {}).get(name, [])
    listeners.remove(fn)


def fire(pool: Any, name: str, *arguments: Any) -> None:
    """Call the listeners of event `name` for `pool` (the pool's own, then everyone's)."""
    own = _per_pool.get(pool)
    for fn in [*(own.get(name, ()) if own else ()), *_everywhere[name]]:
        try:
            fn(pool, *arguments)
        except Exception:
            logger.exception("a listener of %r on pool %r failed", name, getattr(pool, "name", pool))


# -- greenpool's own logging, on the events ------------------------------------


def describe(error: BaseException | None) -> str:
    """`error` as the end of a message: ": Type: text" (nothing for None)."""
    return "" if error is None else f": {type(error).__name__}: {error}"


def _log_connect_failed(pool: Any, error: BaseException) -> None:
    logger.debug("pool %r: connect failed%s", pool.name, describe(error))


def _log_outage_started(pool: Any, error: BaseException) -> None:
    logger.warning("pool %r: connects failing%s; retrying in the background", pool.name, describe(error))


def _log_outage_ended(pool: Any, seconds: float, attempts: int, lost: int) -> None:
    logger.warning(
        "pool %r: connects work again after %.1f s (%d failed attempt(s), %d connection(s) lost meanwhile)",
        pool.name,
        seconds,
        attempts,
        lost,
    )


def _log_connection_lost(pool: Any, reason: str, error: BaseException | None) -> None:
    logger.warning("pool %r: discarding a connection %s%s", pool.name, reason, describe(error))


def _log_leak(pool: Any, slot: Any, seconds: float) -> None:
    logger.warning(
        "connection %r lent by %r for %.1f sec (leak_threshold=%s), taken at:\n%s",
        slot.conn,
        pool.name,
        seconds,
        pool.leak_threshold,
        "".join(traceback.format_list(slot.stack or [])),
    )


def _log_failover(pool: Any, error: BaseException | None) -> None:
    logger.warning(
        "pool %r: its server is no longer the primary%s: replacing its connections", pool.name, describe(error)
    )


def _log_reconnect_failed(pool: Any) -> None:
    logger.warning("pool %r: reconnection attempts failing for %s sec", pool.name, pool.reconnect_timeout)


def _log_request_timed_out(pool: Any, seconds: float) -> None:
    logger.debug("pool %r: a request got no connection in %.2f sec", pool.name, seconds)


for _name, _fn in (
    ("connect_failed", _log_connect_failed),
    ("outage_started", _log_outage_started),
    ("outage_ended", _log_outage_ended),
    ("connection_lost", _log_connection_lost),
    ("leak", _log_leak),
    ("failover", _log_failover),
    ("reconnect_failed", _log_reconnect_failed),
    ("request_timed_out", _log_request_timed_out),
):
    listen(None, _name, _fn)
