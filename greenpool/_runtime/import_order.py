"""Which drivers bound blocking objects because gevent patched the process too late (or never).

Shared by the Celery integration's start-up line (`greenpool.integrations.celery.patch_state`)
and ``python -m greenpool doctor``. Like `patching`, nothing here imports gevent or a driver:
it looks at what this process has imported already.

The traps, and how each is told:

- psycopg imported before `monkey.patch_all()`: `psycopg.waiting.wait` is the C `wait_c`,
  which psycopg picks only when `select` was not patched at its import.
- peewee imported before `monkey.patch_all()`: its `_ConnectionLocal` derives from the
  unpatched `threading.local` (`gevent.monkey.get_original("threading", "local")`).
- pymysql in a process whose `socket` module is not patched: pymysql looks `socket` up at
  each connect, so the import order doesn't matter, only whether the patch ran.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = ["ImportTrap", "gevent_patched", "import_traps", "patched_after"]


@dataclass(frozen=True)
class ImportTrap:
    """A patch-sensitive library holding blocking objects in this process."""

    #: "psycopg", "peewee" or "pymysql".
    library: str
    #: What was found, e.g. "psycopg.waiting.wait is wait_c".
    found: str
    #: What that does to code that doesn't go through greenpool.
    effect: str
    #: What greenpool does about it (short: it ends the Celery start-up line's notes).
    handled: str
    #: What the user does.
    fix: str
    #: Whether greenpool's own pools cope with it (False: the pools block too).
    coped_with: bool


#: The fix for the two import-order traps.
PATCH_FIRST = (
    "call gevent.monkey.patch_all() before anything else is imported (first lines of the entry"
    " point, `python -m gevent.monkey --module ...`, or `celery worker -P gevent`)"
)


def gevent_patched() -> bool:
    """Whether gevent has monkey-patched the socket module."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def psycopg_bound_wait_c() -> bool:
    """Whether psycopg chose its blocking C wait function (it was imported before `select` was patched)."""
    waiting = sys.modules.get("psycopg.waiting")
    wait_c = getattr(waiting, "wait_c", None)
    return waiting is not None and wait_c is not None and getattr(waiting, "wait", None) is wait_c


def peewee_bound_thread_local() -> bool:
    """Whether peewee's per-connection state derives from the unpatched `threading.local`."""
    peewee = sys.modules.get("peewee")
    monkey = sys.modules.get("gevent.monkey")
    local_class = getattr(peewee, "_ConnectionLocal", None)
    if local_class is None or monkey is None:
        return False
    return monkey.get_original("threading", "local") in local_class.__mro__


def patched_after(library: str) -> bool | None:
    """For a library imported in this patched process: whether it was imported after the patch.

    None if the library is not imported, the process is not patched, or
    the library's import order doesn't matter (pymysql).
    """
    if library not in sys.modules or not gevent_patched():
        return None
    if library == "psycopg":
        return not psycopg_bound_wait_c() if "psycopg.waiting" in sys.modules else None
    if library == "peewee":
        return not peewee_bound_thread_local()
    return None


def import_traps() -> list[ImportTrap]:
    """The traps present in this process (see the module docstring), psycopg, peewee, pymysql in order.

    The import-order traps (psycopg, peewee) are reported only in a patched
    process: unpatched, the originals are what every module uses anyway.
    """
    traps = []
    patched = gevent_patched()
    if patched and psycopg_bound_wait_c():
        traps.append(
            ImportTrap(
                library="psycopg",
                found="psycopg was imported before gevent patched the process (psycopg.waiting.wait is wait_c)",
                effect="connections of plain psycopg.connect() or of a class not derived from GeventConnection"
                " block the whole hub while they wait",
                handled="greenpool's connections wait cooperatively anyway",
                fix=PATCH_FIRST,
                coped_with=True,
            )
        )
    if patched and peewee_bound_thread_local():
        traps.append(
            ImportTrap(
                library="peewee",
                found="peewee was imported before gevent patched the process"
                " (peewee._ConnectionLocal derives from the unpatched threading.local)",
                effect="a Peewee database not pooled by greenpool shares one connection among all greenlets",
                handled="greenpool's databases keep per-greenlet state anyway",
                fix=PATCH_FIRST,
                coped_with=True,
            )
        )
    if "pymysql" in sys.modules and not patched:
        traps.append(
            ImportTrap(
                library="pymysql",
                found="pymysql is imported and gevent has not patched the socket module",
                effect="under gevent every pymysql query blocks the hub (fine in plain threads)",
                handled="greenpool can't make pymysql cooperative: it needs patched sockets",
                fix="call gevent.monkey.patch_all() (before or after importing pymysql) in any program that uses"
                " MySQL from greenlets",
                coped_with=False,
            )
        )
    return traps
