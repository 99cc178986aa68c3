"""Every `Pool` made in this process, held weakly: what metrics exporters look at.

`Pool.__init__` adds each pool here, once; nothing else in the engine
touches this module. A pool dropped is forgotten with it.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from .._runtime.hub import allocate_lock

_pools: weakref.WeakSet[Any] = weakref.WeakSet()
# Adding while another thread copies the set would break the copy.
_lock = allocate_lock()


def _renew_lock() -> None:
    """In a forked child: a new lock (another thread of the parent may have held the old one)."""
    global _lock
    _lock = allocate_lock()


os.register_at_fork(after_in_child=_renew_lock)


def add(pool: Any) -> None:
    """Remember `pool` (weakly)."""
    with _lock:
        _pools.add(pool)


def pools() -> list[Any]:
    """The pools made in this process and not dropped yet, oldest first."""
    with _lock:
        found = list(_pools)
    return sorted(found, key=lambda pool: pool._serial)
