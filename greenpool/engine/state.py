"""The state that the parts of `Pool` share, declared once for the type checker.

`Pool` is one object with one lock, written in parts by concern: the
connector (connects and closes), the housekeeper (replacement, shrinking,
leaks), the stats, and the pool proper (lifecycle, checkout, check-in).
Each part is a base class of `Pool` in a module of its own; this base
declares the attributes they share, which `Pool.__init__` sets, and the
methods one part calls in another.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .. import errors
from .._runtime.executor import Executor
from .._runtime.timer import DeadlineTimer
from .driver import Driver
from .idle import IdleBag, Slot

if TYPE_CHECKING:
    from .stats import WaitTimes

C = TypeVar("C")


class PoolState(Generic[C]):
    """Attributes and cross-part methods of `Pool` (see the module docstring)."""

    # The error classes raised; an adapter may set its own subclasses.
    PoolTimeout: type[errors.PoolTimeout] = errors.PoolTimeout
    PoolClosed: type[errors.PoolClosed] = errors.PoolClosed
    TooManyRequests: type[errors.TooManyRequests] = errors.TooManyRequests

    name: str
    driver: Driver[C]
    timeout: float
    max_waiting: int
    max_lifetime: float
    lifetime_jitter: float
    max_idle: float
    reconnect_timeout: float
    num_workers: int
    check_idle: float
    leak_threshold: float | None

    _min_size: int
    _max_size: int
    _retain_idle: bool
    _check: Callable[[C], None] | None
    _reconnect_failed: Callable[[Any], None] | None
    _status: Callable[[C], int]
    _checkout_status: Callable[[C], int]

    _lock: Any
    _idle: IdleBag[C]
    # Requests waiting for a connection (`GreenRequest`s and `ThreadRequest`s).
    _waiters: deque[Any]
    _timers: weakref.WeakKeyDictionary[Any, DeadlineTimer]
    _last_timer: tuple[Any, Any]
    _slots: set[Slot[C]]
    _todo: deque[Slot[C] | None]
    _connecting: int
    _inflight: int
    _cleaning: int
    _closing: int
    _epoch: int
    _failing_since: float | None
    _last_error: BaseException | None
    _last_failure: float
    _outage_attempts: int  # failed connects since the outage started
    _outage_lost: int  # connections_lost + returns_bad when it started
    _retry_delay: float
    _probing: bool
    _backoff_generation: int
    _reconnect_reported: bool
    _connect_ewma: float
    _drains: int
    _opened: bool
    _closed: bool
    _executor: Executor | None
    _pid: int
    _serial: int

    _wait_times: WaitTimes
    requests_num: int
    requests_queued: int
    requests_errors: int
    returns_bad: int
    returns_reset: int
    connections_num: int
    connections_ms: int
    connections_errors: int
    connections_lost: int
    failovers: int
    connections_created: int
    requests_timeouts: int
    leaks: int
    _closed_by: dict[str, int]
    _lent_closed: int
    _stats_generation: int
    _wait_total: float
    _usage: float

    def _pending(self) -> int:
        """Connects reserved or under way."""
        return len(self._todo) + self._inflight

    def _planned(self, closing: bool = True) -> int:
        """Connections open, lent or being made, and (`closing`) those being closed.

        `max_size` caps them all, those being closed too: the server still
        has them. The stats' `pool_size`, as psycopg_pool's, leaves them out.
        """
        n = len(self._slots) + self._pending()
        return n + self._closing if closing else n

    if TYPE_CHECKING:
        # Pool proper
        def _release(self, slot: Slot[C], fresh: bool = True) -> None: ...
        def reconnect_failed(self) -> None:  # noqa: D102
            ...

        # Connector
        def _fill(self) -> None: ...
        def _start_connectors(self) -> None: ...
        def _discard(self, slot: Slot[C], close_now: bool = False, reason: str | None = None) -> None: ...
        def _discard_if_idle(self, slot: Slot[C]) -> None: ...

        # Housekeeper
        def _tick(self) -> float: ...
        def _replace_expiring(self, now: float) -> None: ...
        def _draw_lifetime(self) -> float: ...
