"""The pool engine: knows no database driver, only the `Driver` contract.

- `pool`: `Pool`, its lifecycle and the hot path (checkout, check-in, the handshake).
- `idle`: `Slot` (a pooled connection) and the segmented idle bag.
- `connector`: connect and close jobs, connect failures and backoff.
- `housekeeper`: replacement before expiry, idle shrinking, leak and outage reports.
- `stats`: counters and wait-time percentiles.
- `instances`: every pool made, held weakly, for metrics exporters.
- `events`: the rare things that happen to a pool, for logging, metrics and alerts.
- `driver`: the contract an adapter implements (`Driver`, `OK`/`DIRTY`/`BROKEN`).
- `options`: checks of user-supplied options.
- `state`: the attributes the parts of `Pool` share, declared for the type checker.
"""

from __future__ import annotations

from .driver import BROKEN, DIRTY, OK, Driver
from .idle import GONE, IDLE, OUT, Slot
from .pool import Pool

__all__ = ["BROKEN", "DIRTY", "GONE", "IDLE", "OK", "OUT", "Driver", "Pool", "Slot"]
