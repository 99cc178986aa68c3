"""What gevent's monkey-patching changed, asked without importing gevent.

Used by child processes that must not import gevent at all (see
`greenpool.testing.childproc`), so nothing here imports it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def original(module: str, name: str) -> Any:
    """Return `module.name` as it was before any gevent monkey-patching.

    gevent is consulted only when `gevent.monkey` was imported already:
    nothing can have been patched without it.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def threads_patched() -> bool:
    """Whether gevent has monkey-patched threads: every "thread" is then a greenlet."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))
