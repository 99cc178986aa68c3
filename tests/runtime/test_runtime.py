"""`greenpool._runtime`'s own contract, without a database.

- `patching`: the unpatched originals of what gevent patches, asked without
  importing gevent.
- `hub`: "does this caller run on a gevent hub?" (`gevent_hub()`), real locks
  and sleeps.
- `executor`: where background jobs run (a greenlet of the opening hub, an OS
  thread, the main hub for hub-bound connections) and how they sleep.
- `waiters`: a parked request, for a thread (`ThreadRequest`) or a greenlet
  (`GreenRequest`), woken from the same hub or another thread.
- `timer`: `DeadlineTimer`, driven with a fake `expire` on a real hub.

In-process tests run in the pytest process, which is never monkey-patched,
each on a fresh hub; what needs `monkey.patch_all()` runs in a child
interpreter (conftest's `run_python`). Waits are on events with generous
timeouts; assertions are on what ran where and in which order, not on how
long anything took.
"""

from __future__ import annotations

import json
import math
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
from gevent._hub_local import get_hub_if_exists
from gevent.hub import Hub, set_hub
from helpers import destroy_main_hub, hub_exists, no_hub_and_deadline

from greenpool._runtime import hub as rt_hub
from greenpool._runtime.executor import Executor
from greenpool._runtime.hub import INFINITY
from greenpool._runtime.timer import DeadlineTimer
from greenpool._runtime.waiters import GreenRequest, ThreadRequest

#: Every test must end well within this (seconds); a hang fails the test.
TEST_DEADLINE = 60

#: How long a test waits for something that happens at once (a hang fails it).
WAIT = 10.0


@pytest.fixture(autouse=True)
def _fresh_hub() -> Iterator[None]:
    """No hub left over from another test, nor left to the next; a hang fails."""
    with no_hub_and_deadline(TEST_DEADLINE, dump_after=TEST_DEADLINE * 3):
        yield


@pytest.fixture
def own_loop_hub() -> Iterator[Any]:
    """This thread's hub, on a loop of its own, for tests that wait for the
    loop to end (`hub.join()`): libev's default loop outlives its hubs, and a
    watcher another test left running on it keeps any hub on it alive."""
    destroy_main_hub()
    hub = Hub(default=False)
    set_hub(hub)
    yield hub
    hub.destroy(destroy_loop=True)


def in_greenlet(fn: Callable[[], Any]) -> Any:
    """`fn()` in a greenlet of this thread's hub; its value, or its exception raised."""
    g = gevent.spawn(fn)
    g.join(WAIT)
    assert g.ready(), "the greenlet didn't finish"
    return g.get()


def in_thread(fn: Callable[[], Any]) -> Any:
    """`fn()` in a plain OS thread (the pytest process is never patched); its value or exception."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("value", fn()))
        except BaseException as ex:  # noqa: BLE001 - re-raised in the caller
            outcome.append(("error", ex))
        finally:
            hub = get_hub_if_exists()
            if hub is not None:
                hub.destroy(destroy_loop=True)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "the thread didn't finish"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


RunPython = Callable[..., Any]

#: Start of every child script: a watchdog, and `result(**values)` to report.
_CHILD_PRELUDE = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(50, exit=True)

def result(**values):
    print("RESULT:" + json.dumps(values), flush=True)
"""


def run_child(run_python: RunPython, *parts: str) -> dict[str, Any]:
    """Run the code `parts` in a fresh interpreter (no database); return what it passed to `result()`."""
    code = "".join(textwrap.dedent(part) for part in (_CHILD_PRELUDE, *parts))
    proc = run_python(code, env={"GREENPOOL_TEST_DSN": ""}, timeout=60)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    assert lines, f"child reported nothing:\n{proc.stdout}\n{proc.stderr}"
    return dict(json.loads(lines[-1][len("RESULT:") :]))


# --------------------------------------------------------------------------
# patching
# --------------------------------------------------------------------------


def test_original_without_patching_is_the_module_s_own_and_imports_no_gevent(run_python: RunPython) -> None:
    got = run_child(
        run_python,
        """
        import _thread, time
        from greenpool._runtime import patching
        result(
            sleep=patching.original("time", "sleep") is time.sleep,
            lock=patching.original("_thread", "allocate_lock") is _thread.allocate_lock,
            threads_patched=patching.threads_patched(),
            gevent_imported="gevent" in sys.modules,
        )
        """,
    )
    assert got == {"sleep": True, "lock": True, "threads_patched": False, "gevent_imported": False}


_ORIGINALS = """
import _thread, select, socket, threading, time
NAMES = [("time", "sleep"), ("_thread", "allocate_lock"), ("_thread", "get_ident"),
         ("_thread", "start_new_thread"), ("socket", "socket"), ("select", "select")]
real = {(m, n): getattr(sys.modules[m], n) for m, n in NAMES}
"""


def test_original_after_patch_all_is_the_unpatched_object(run_python: RunPython) -> None:
    got = run_child(
        run_python,
        _ORIGINALS,
        """
        from gevent import monkey
        monkey.patch_all()
        from greenpool._runtime import patching
        result(
            patched=[getattr(sys.modules[m], n) is not real[m, n] for m, n in NAMES],
            original=[patching.original(m, n) is real[m, n] for m, n in NAMES],
            threads_patched=patching.threads_patched(),
        )
        """,
    )
    assert got["patched"] == [True] * 6  # else this test proves nothing
    assert got["original"] == [True] * 6
    assert got["threads_patched"] is True


@pytest.mark.parametrize("order", ["imported-before-patch_all", "imported-after-patch_all"])
def test_hub_binds_real_locks_and_threads_whatever_the_import_order(run_python: RunPython, order: str) -> None:
    """`hub`'s locks, thread ids, sleep and thread start are the real ones,
    bound at import, whether gevent patched before or after that import."""
    got = run_child(
        run_python,
        _ORIGINALS,
        f"""
        before = {order == "imported-before-patch_all"}
        if before:
            from greenpool._runtime import hub
        from gevent import monkey
        monkey.patch_all()
        if not before:
            from greenpool._runtime import hub
        result(bound=[
            hub.allocate_lock is real["_thread", "allocate_lock"],
            hub.get_thread_ident is real["_thread", "get_ident"],
            hub.start_os_thread is real["_thread", "start_new_thread"],
            hub.real_sleep is real["time", "sleep"],
        ])
        """,
    )
    assert got["bound"] == [True] * 4


# --------------------------------------------------------------------------
# hub: gevent_hub() and sleep()
# --------------------------------------------------------------------------


def test_gevent_hub_in_a_spawned_greenlet_is_its_hub() -> None:
    assert in_greenlet(rt_hub.gevent_hub) is gevent.get_hub()


def test_gevent_hub_in_the_main_greenlet_of_an_unpatched_thread_is_none() -> None:
    """None without a hub (and none is made), and None even once a hub exists
    in the thread: nothing says that hub will run while the caller waits."""
    assert rt_hub.gevent_hub() is None
    assert not hub_exists()
    hub = gevent.get_hub()
    gevent.sleep(0)  # the hub has even run
    assert hub is not None and rt_hub.gevent_hub() is None


def test_gevent_hub_in_a_plain_thread_is_none() -> None:
    gevent.get_hub()  # the main thread's hub is not the thread's

    def probe() -> tuple[Any, Any]:
        return rt_hub.gevent_hub(), get_hub_if_exists()

    assert in_thread(probe) == (None, None)  # and no hub made in the thread


def test_gevent_hub_in_a_greenlet_of_another_thread_is_that_thread_s_hub() -> None:
    main_hub = gevent.get_hub()

    def probe() -> tuple[bool, bool]:
        found = in_greenlet(rt_hub.gevent_hub)
        return found is gevent.get_hub(), found is main_hub

    assert in_thread(probe) == (True, False)


def test_gevent_hub_and_sleep_in_a_patched_process(run_python: RunPython) -> None:
    """Patched, every "thread" is a greenlet: the main greenlet's hub is
    returned (made if need be), a `threading.Thread` runs on that hub, a
    real thread of gevent's pool has its own, and `sleep()` yields."""
    got = run_child(
        run_python,
        """
        from gevent import monkey
        monkey.patch_all()
        import threading
        import gevent
        from gevent._hub_local import get_hub_if_exists
        from greenpool._runtime import hub

        none_before = get_hub_if_exists() is None
        main = hub.gevent_hub()
        main_is_hub = main is gevent.get_hub() and main is not None

        seen = []
        t = threading.Thread(target=lambda: seen.append(hub.gevent_hub()))
        t.start(); t.join()

        def in_pool_thread():
            found = hub.gevent_hub()
            return found is not None and found is not main and not found.main_hub

        pool_thread_own_hub = gevent.get_hub().threadpool.apply(in_pool_thread)

        ran = []
        gevent.spawn(ran.append, "other")
        hub.sleep(0.01)
        result(
            none_before=none_before,
            main_is_hub=main_is_hub,
            thread_on_main_hub=seen == [main],
            pool_thread_own_hub=pool_thread_own_hub,
            other_ran_during_sleep=ran == ["other"],
        )
        """,
    )
    assert got == dict.fromkeys(
        ("none_before", "main_is_hub", "thread_on_main_hub", "pool_thread_own_hub", "other_ran_during_sleep"), True
    )


def test_sleep_in_a_greenlet_is_cooperative() -> None:
    """Another greenlet runs while one sleeps: set before the sleeper wakes."""
    other_ran = gevent.event.Event()

    def sleeper() -> tuple[bool, bool]:
        before = other_ran.is_set()
        rt_hub.sleep(0.01)
        return before, other_ran.is_set()

    first = gevent.spawn(sleeper)
    gevent.spawn(other_ran.set)  # runs only when the sleeper yields
    first.join(WAIT)
    assert first.get() == (False, True)


def test_sleep_in_the_main_greenlet_blocks_the_thread_without_running_the_hub() -> None:
    rt_hub.sleep(0.001)
    assert not hub_exists()  # no hub needed, none made
    ran: list[str] = []
    gevent.spawn(ran.append, "other")
    rt_hub.sleep(0.01)
    assert ran == []  # the hub didn't run: a real sleep
    gevent.sleep(0)
    assert ran == ["other"]


# --------------------------------------------------------------------------
# executor
# --------------------------------------------------------------------------


def _where() -> dict[str, Any]:
    """Where the calling job runs."""
    current = gevent.getcurrent()
    return {
        "thread": threading.get_ident(),
        "greenlet": current,
        "os_thread_main_greenlet": current.parent is None,
        "hub": get_hub_if_exists(),
    }


def test_executor_job_submitted_from_the_opening_hub_runs_as_its_greenlet() -> None:
    order: list[str] = []
    ran = gevent.event.Event()
    where: dict[str, Any] = {}

    def job(tag: str) -> None:
        where.update(_where(), tag=tag)
        order.append("job")
        ran.set()

    def opener() -> tuple[Executor, Any]:
        executor = Executor()
        executor.submit(job, "the-arg")
        order.append("submitted")  # submit() didn't run the job: it never blocks
        assert ran.wait(WAIT)
        return executor, gevent.getcurrent()

    executor, submitter = in_greenlet(opener)
    assert executor.hub is gevent.get_hub()
    assert order == ["submitted", "job"]
    assert where["tag"] == "the-arg"
    assert isinstance(where["greenlet"], gevent.Greenlet) and where["greenlet"] is not submitter
    assert where["greenlet"].parent is gevent.get_hub()
    assert where["thread"] == threading.get_ident()


@pytest.mark.parametrize("submitter", ["plain-thread", "main-greenlet", "other-thread-s-hub"])
def test_executor_job_submitted_from_elsewhere_runs_in_an_os_thread_of_its_own(submitter: str) -> None:
    """From a plain thread, from the main greenlet of an unpatched thread
    (which blocks its thread, so its hub doesn't run), or from a greenlet of
    another thread's hub (which may stop when its thread ends): a new OS
    thread, where the job is that thread's main greenlet."""
    executor = in_greenlet(Executor)  # opened on this thread's hub
    assert executor.hub is gevent.get_hub()
    done = threading.Event()
    where: dict[str, Any] = {}

    def job() -> None:
        where.update(_where())
        done.set()

    def submit() -> int:
        executor.submit(job)
        return threading.get_ident()

    if submitter == "plain-thread":
        submitted_in = in_thread(submit)
    elif submitter == "main-greenlet":
        submitted_in = submit()
    else:
        submitted_in = in_thread(lambda: in_greenlet(submit))
    assert done.wait(WAIT)
    assert where["thread"] not in (submitted_in, threading.get_ident())
    assert where["os_thread_main_greenlet"] is True
    assert where["hub"] is None  # nothing made a hub there


def test_executor_jobs_of_a_patched_program_s_other_threads(run_python: RunPython) -> None:
    """Patched: a job submitted from the main hub runs there as a greenlet;
    one submitted from another thread's hub (a worker of gevent's thread
    pool) runs in an OS thread of its own, unless the connections are
    `hub_bound`: then it runs as a greenlet of the main hub."""
    got = run_child(
        run_python,
        """
        from gevent import monkey
        monkey.patch_all()
        import gevent
        from greenpool._runtime.executor import Executor
        from greenpool._runtime.patching import original

        os_thread_id = original("_thread", "get_ident")  # threading's is a greenlet's now
        main_thread = os_thread_id()
        plain, bound = Executor(), Executor(hub_bound=True)
        ran = {}

        def job(name):
            current = gevent.getcurrent()
            ran[name] = {
                "main_thread": os_thread_id() == main_thread,
                "greenlet_of_main_hub": current.parent is not None and current.parent is gevent.get_hub(),
            }

        plain.submit(job, "from-main-hub")
        def in_pool_thread():
            plain.submit(job, "plain-from-other-hub")
            bound.submit(job, "bound-from-other-hub")
        gevent.get_hub().threadpool.apply(in_pool_thread)
        for _ in range(1000):
            if len(ran) == 3:
                break
            gevent.sleep(0.01)
        result(**ran)
        """,
    )
    assert got == {
        "from-main-hub": {"main_thread": True, "greenlet_of_main_hub": True},
        "plain-from-other-hub": {"main_thread": False, "greenlet_of_main_hub": False},
        "bound-from-other-hub": {"main_thread": True, "greenlet_of_main_hub": True},
    }


def test_executor_sleep_in_a_greenlet_yields_and_does_not_keep_the_hub_alive(own_loop_hub: Any) -> None:
    """An open pool's housekeeper sleeps this way: `gevent.wait()` in the
    application must still return."""
    sleeper = gevent.spawn(Executor.sleep, 60)
    other = gevent.spawn(lambda: "ran")
    assert own_loop_hub.join(timeout=WAIT) is True  # the loop ended: nothing held it
    assert other.value == "ran"
    assert not sleeper.dead  # still asleep: its timer didn't keep the loop running


def test_executor_sleep_in_an_os_thread_is_a_real_sleep() -> None:
    def job() -> Any:
        Executor.sleep(0.01)
        return get_hub_if_exists()

    assert in_thread(job) is None  # slept without gevent


# --------------------------------------------------------------------------
# waiters
# --------------------------------------------------------------------------


def test_thread_request_fired_from_another_thread() -> None:
    req = ThreadRequest()
    req.slot = None

    def fire() -> None:
        req.slot = "handed"
        req.fire()

    threading.Timer(0.01, fire).start()
    req.wait(WAIT)
    assert req.slot == "handed"


def test_thread_request_waiting_for_good_is_fired_too() -> None:
    """A timeout beyond the lock's maximum (`math.inf`) waits until fired."""
    req = ThreadRequest()
    req.slot = None

    def fire() -> None:
        req.slot = "handed"
        req.fire()

    timer = threading.Timer(0.01, fire)
    timer.start()
    req.wait(math.inf)
    assert req.slot == "handed"


@pytest.mark.parametrize("timeout", [0.01, 0.0, -1.0])
def test_thread_request_times_out_unfired(timeout: float) -> None:
    """Not fired: `wait()` returns when the timeout passes (at once for one
    <= 0, a deadline already past), the slot unset."""
    req = ThreadRequest()
    req.slot = None
    req.wait(timeout)
    assert req.slot is None


def test_green_request_fired_from_the_same_hub_never_switches_the_firing_party() -> None:
    order: list[str] = []
    hub = gevent.get_hub()
    req = GreenRequest(hub)
    req.slot = None

    def waiter() -> Any:
        order.append("waiting")
        req.wait()
        order.append("woken")
        return req.slot

    def firer() -> None:
        req.slot = "handed"
        req.fire()
        order.append("fired, still running")

    parked = gevent.spawn(waiter)
    gevent.spawn(firer)
    parked.join(WAIT)
    assert parked.get() == "handed"
    assert order == ["waiting", "fired, still running", "woken"]


def test_green_request_fired_from_another_thread() -> None:
    """The fire crosses threads (`run_callback_threadsafe`) and wakes the
    parked greenlet; a `gevent.Timeout` keeps the loop alive (and fails the
    test if the fire never arrives)."""
    req = GreenRequest(gevent.get_hub())
    req.slot = None

    def fire() -> None:
        req.slot = "handed"
        req.fire()

    def waiter() -> Any:
        with gevent.Timeout(WAIT):
            threading.Thread(target=fire, daemon=True).start()
            req.wait()
        return req.slot

    assert in_greenlet(waiter) == "handed"


def test_green_request_with_its_slot_set_does_not_park_and_a_late_fire_is_ignored() -> None:
    """A request handed its slot before it waits (the firing party sets it
    before `fire()`) returns from `wait()` without parking; the fire that
    comes after the wait ended doesn't cut the greenlet's next wait short."""
    req = GreenRequest(gevent.get_hub())
    req.slot = None
    ran: list[str] = []
    later = gevent.event.Event()

    def waiter() -> tuple[Any, bool, bool]:
        req.slot = "handed"
        gevent.spawn(ran.append, "other")  # runs only if this greenlet parks
        req.wait()
        parked = ran != []
        req.fire()
        gevent.spawn_later(0.05, later.set)
        woken_early = not later.wait(WAIT)
        return req.slot, parked, woken_early

    assert in_greenlet(waiter) == ("handed", False, False)


def test_green_request_wait_interrupted_raises_and_a_late_fire_is_ignored() -> None:
    """An exception thrown into the parked greenlet (a `gevent.Timeout`)
    propagates out of `wait()`; a fire after that is ignored."""
    req = GreenRequest(gevent.get_hub())
    req.slot = None
    later = gevent.event.Event()

    def waiter() -> bool:
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.01):
                req.wait()
        req.slot = "handed"  # a check-in racing the give-up, as the pool settles it
        req.fire()
        gevent.spawn_later(0.05, later.set)
        return not later.wait(WAIT)  # woken early by the late fire?

    assert in_greenlet(waiter) is False


# --------------------------------------------------------------------------
# timer
# --------------------------------------------------------------------------


class FakeRequests:
    """`expire(now)` for a `DeadlineTimer`, as a pool's: wakes ("fires") the
    requests whose deadline is due and returns the earliest deadline left
    (`INFINITY`: none). Each request fired may queue another, due `delay`
    seconds after it fired (`follow_ups`): a deadline the timer is never
    armed for, but told of by `expire()`."""

    def __init__(self, deadlines: list[float], follow_ups: list[float] | None = None) -> None:
        self.pending = sorted(deadlines)
        self.follow_ups = list(follow_ups or [])
        self.fired: list[float] = []  # their deadlines, in firing order
        self.calls = 0
        self.done = gevent.event.Event()  # nothing left pending

    def expire(self, now: float) -> float:
        self.calls += 1
        while self.pending and self.pending[0] <= now:
            self.fired.append(self.pending.pop(0))
            if self.follow_ups:
                self.pending.append(now + self.follow_ups.pop(0))
                self.pending.sort()
        if not self.pending:
            self.done.set()
        return self.pending[0] if self.pending else INFINITY


def test_timer_fires_at_the_deadline_and_rearms_for_the_earliest_left(own_loop_hub: Any) -> None:
    first = time.monotonic() + 0.02
    requests = FakeRequests([first], follow_ups=[0.02, 0.02])
    timer = DeadlineTimer(own_loop_hub, requests.expire)
    timer.arm(first)
    assert (timer.at, timer.held) == (first, True)
    assert requests.done.wait(WAIT)
    # The two follow-ups fired too: each time, the timer re-armed itself for
    # the deadline `expire()` returned.
    assert len(requests.fired) == 3 and requests.fired[0] == first
    assert requests.fired == sorted(requests.fired)
    assert (timer.at, timer.held) == (INFINITY, False)  # nothing left, nobody waiting: let go
    assert own_loop_hub.join(timeout=WAIT) is True


def test_timer_armed_earlier_replaces_the_later_deadline(own_loop_hub: Any) -> None:
    now = time.monotonic()
    requests = FakeRequests([now + 0.02])
    timer = DeadlineTimer(own_loop_hub, requests.expire)
    timer.arm(now + 60)
    timer.arm(now + 0.02)
    assert timer.at == now + 0.02
    assert requests.done.wait(WAIT)
    assert requests.fired == [now + 0.02] and timer.at == INFINITY
    # The 60 s timer was closed, not left behind: nothing holds the loop now.
    assert own_loop_hub.join(timeout=WAIT) is True


def test_timer_holds_the_loop_while_requests_wait_without_a_deadline(own_loop_hub: Any) -> None:
    """A request waiting for good: the timer only holds the loop. Fired with
    requests still waiting and no deadline left, it goes on holding it."""
    requests = FakeRequests([])
    timer = DeadlineTimer(own_loop_hub, requests.expire)
    timer.waiting = 1
    timer.hold()  # no timer yet: armed for INFINITY
    assert (timer.at, timer.held) == (INFINITY, True)
    assert own_loop_hub.join(timeout=0.05) is False  # held
    assert requests.calls == 0

    deadline_ = time.monotonic() + 0.01
    requests.pending.append(deadline_)  # a request with a deadline queues...
    timer.arm(deadline_)
    assert requests.done.wait(WAIT)  # ... and is woken
    assert requests.fired == [deadline_]
    assert (timer.at, timer.held) == (INFINITY, True)  # re-armed: one still waits
    assert own_loop_hub.join(timeout=0.05) is False

    timer.waiting = 0  # the last one leaves
    timer.let_go()
    assert timer.held is False
    assert own_loop_hub.join(timeout=WAIT) is True


def test_timer_let_go_then_hold_again(own_loop_hub: Any) -> None:
    """`let_go()` leaves the timer armed but no longer keeping the loop alive;
    `hold()` makes it keep it alive again, for the same deadline."""
    requests = FakeRequests([])
    timer = DeadlineTimer(own_loop_hub, requests.expire)
    at = time.monotonic() + 60
    timer.arm(at)
    timer.let_go()
    assert (timer.at, timer.held) == (at, False)
    timer.hold()
    assert (timer.at, timer.held) == (at, True)
    assert own_loop_hub.join(timeout=0.05) is False  # held
    timer.let_go()
    assert own_loop_hub.join(timeout=WAIT) is True  # the loop ended with the timer still armed
    assert requests.calls == 0  # and it never fired: its deadline is a minute away
