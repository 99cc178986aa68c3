"""What a run asks of a contender (`Workload`), and running greenlets together (`run_parallel`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gevent
import gevent.event

perf_counter = time.perf_counter

#: Bound on closing one contender's pool or connections, and on killing a
#: run's greenlets.
CLOSE_TIMEOUT = 30.0


@dataclass
class Workload:
    """What to run in one timed (or warm-up) phase, and the latencies seen."""

    sql: str
    greenlets: int
    queries_each: int | None
    duration: float | None
    latencies: list[float] = field(default_factory=list)
    _remaining: int = 0
    _deadline: float = math.inf

    def start(self) -> None:
        """Start the budget: the clock for fixed-time, the shared count otherwise."""
        if self.duration is not None:
            self._deadline = perf_counter() + self.duration
        else:
            assert self.queries_each is not None
            self._remaining = self.queries_each * self.greenlets

    def more(self, done: int) -> bool:
        """Whether a client greenlet that has run `done` queries runs another."""
        if self.duration is not None:
            return perf_counter() < self._deadline
        assert self.queries_each is not None
        return done < self.queries_each

    def take(self) -> bool:
        """Claim one query from the shared budget (for workers that don't map to clients).

        No lock needed: greenlets only switch on I/O, never inside this method.
        """
        if self.duration is not None:
            return perf_counter() < self._deadline
        if self._remaining <= 0:
            return False
        self._remaining -= 1
        return True


def run_parallel(jobs: Sequence[Callable[[], None]]) -> None:
    """Run each job in its own greenlet until all return.

    The first failure kills the other greenlets and is raised here; killing
    the greenlets also happens when this caller is interrupted (its
    gevent.Timeout), so no client outlives its run.
    """
    failures: list[BaseException] = []
    finished = gevent.event.Event()
    pending = len(jobs)

    def guarded(job: Callable[[], None]) -> None:
        nonlocal pending
        try:
            job()
        except gevent.GreenletExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - a pool's own gevent.Timeout too
            failures.append(exc)
            finished.set()
        finally:
            pending -= 1
            if pending == 0:
                finished.set()

    if not jobs:
        return
    greenlets = [gevent.spawn(guarded, job) for job in jobs]
    try:
        finished.wait()
    finally:
        gevent.killall(greenlets, block=True, timeout=CLOSE_TIMEOUT)
    if failures:
        raise failures[0]
