"""The workloads: `Scenario`, its phases (`Phase`) and the catalogue `SCENARIOS`.

A scenario runs on one backend (`Scenario.backend`: ``postgres`` or
``mysql``, the ``mysql-`` ones) with the contenders supporting it. It either
gives each of G greenlets a fixed number of queries (``steady``,
``overhead``, ``scale``), or runs them for a fixed time (``storm``).
``storm`` measures each pool twice through a slow-connecting TCP proxy: with
connections expiring every few seconds, and with a long lifetime; only the
contenders registered with ``storm=True`` take part. A scenario may leave a
contender out (`Scenario.skip`, e.g. ``shared`` in ``scale``) unless
``--contender`` names it. ``scaleout`` runs greenpool in several worker
Celery worker processes, direct and through PgBouncer (`greenpool.bench.scaleout`);
``celery`` runs each contender in a real Celery worker
(`greenpool.bench.celery_scenario`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .backends import MYSQL, POSTGRES

#: Lifetime of the "no storm" runs: longer than any run.
CALM_LIFETIME = 3600.0

SLEEP_SQL = "select pg_sleep(0.002)"

#: How a scale-out scenario's workers reach the server, in run order.
SCALEOUT_ROUTES = ("direct", "pgbouncer")
#: The contenders a scale-out scenario runs (its workers' pool).
SCALEOUT_CONTENDERS = ("greenpool",)
MYSQL_SLEEP_SQL = "select sleep(0.002)"


@dataclass(frozen=True)
class TaskSetting:
    """One kind of task of the ``celery`` scenario: `queries` x `sql`, each taking `query_seconds` on the server.

    A run of it sends `tasks_scale` x the scenario's `tasks` measured tasks.
    """

    name: str
    sql: str
    query_seconds: float
    queries: int
    tasks_scale: int = 1


#: The ``celery`` scenario's kinds of task, in run order: ``light`` (Celery
#: itself is the ceiling) and ``pool-bound`` (the pool's P connections are).
CELERY_SETTINGS = (
    # Light tasks run about 3 times faster: 3 times as many keep its steady state as long.
    TaskSetting("light", "select pg_sleep(0.002)", 0.002, 3, tasks_scale=3),
    TaskSetting("pool-bound", "select pg_sleep(0.02)", 0.02, 3),
)
#: The ``scaleout`` scenario's task: what a pool-bound task does, so that the
#: server connections, not the workers' CPU, set the pace.
SCALEOUT_TASK = TaskSetting("scaleout", "select pg_sleep(0.02)", 0.02, 3)
#: The contenders a ``celery`` scenario runs, each in its own worker.
CELERY_CONTENDERS = ("greenpool", "psycopg_pool", "peewee-greenpool", "peewee-playhouse", "shared")


@dataclass(frozen=True)
class Phase:
    """One measured configuration of a scenario; `storm` has two of them."""

    name: str
    max_lifetime: float


@dataclass(frozen=True)
class Scenario:
    """A workload: G greenlets sharing P connections, running `sql`.

    Exactly one of `queries_each` (fixed work) and `duration` (fixed time, in
    seconds) is set. With `storm_lifetime` set the scenario runs twice per
    contender, with that connection lifetime and with `CALM_LIFETIME`, both
    through a TCP proxy delaying each new connection by `connect_delay` seconds.
    It runs on the `backend` server, with the contenders supporting it, but
    those named in `skip` (with the reason), unless --contender names them.
    """

    name: str
    greenlets: int
    pool_size: int
    sql: str
    queries_each: int | None = None
    duration: float | None = None
    storm_lifetime: float | None = None
    connect_delay: float = 0.0
    backend: str = POSTGRES
    skip: tuple[tuple[str, str], ...] = ()
    #: A scale-out scenario: the numbers of Celery worker processes it runs, each
    #: ``-c greenlets`` on a pool of `pool_size`, direct to the server and
    #: through PgBouncer (`greenpool.bench.scaleout`); only greenpool takes part.
    processes: tuple[int, ...] = ()
    #: A Celery scenario: the tasks of each `CELERY_SETTINGS` kind sent to a
    #: real worker (``-P gevent -c greenlets``) whose pool has `pool_size`
    #: connections (`greenpool.bench.celery_scenario`); `duration` caps each.
    tasks: int | None = None

    @property
    def is_celery(self) -> bool:
        """True for a Celery scenario (a real worker per contender and kind of task)."""
        return self.tasks is not None

    @property
    def is_scaleout(self) -> bool:
        """True for a scale-out scenario (worker processes, direct and through PgBouncer)."""
        return bool(self.processes)

    @property
    def is_storm(self) -> bool:
        """True for a lifetime-storm scenario (calm vs storm comparison)."""
        return self.storm_lifetime is not None

    @property
    def phases(self) -> tuple[Phase, ...]:
        """The configurations each contender is measured in."""
        if self.processes:
            return tuple(Phase(f"{route} x{n}", CALM_LIFETIME) for route in SCALEOUT_ROUTES for n in self.processes)
        if self.tasks is not None:
            return tuple(Phase(setting.name, CALM_LIFETIME) for setting in CELERY_SETTINGS)
        if self.storm_lifetime is None:
            return (Phase("run", CALM_LIFETIME),)
        return (Phase("calm", CALM_LIFETIME), Phase("storm", self.storm_lifetime))

    def describe(self) -> str:
        """One line for the report."""
        if self.processes:
            counts = ", ".join(map(str, self.processes))
            return (
                f"{counts} Celery worker processes (-P gevent -c {self.greenlets}, P={self.pool_size} connections"
                f" each), tasks of {SCALEOUT_TASK.queries} x `{self.sql}`, {self.duration:g} s each; direct,"
                f" and through PgBouncer (default_pool_size {self.pool_size})"
            )
        if self.tasks is not None:
            kinds = "; ".join(
                f"{s.name}: {self.greenlets} + {self.tasks * s.tasks_scale} tasks of {s.queries} x `{s.sql}`"
                for s in CELERY_SETTINGS
            )
            return (
                f"a Celery worker -P gevent -c {self.greenlets}, P={self.pool_size} connections;"
                f" {kinds} (each cut {self.duration:g} s after warm-up)"
            )
        text = f"G={self.greenlets} greenlets, P={self.pool_size} connections, `{self.sql}`"
        if self.queries_each is not None:
            total = self.queries_each * self.greenlets
            text += f", {self.queries_each} queries each ({total} total)"
        else:
            text += f", for {self.duration:g} s"
        if self.storm_lifetime is not None:
            text += (
                f"; max_lifetime {self.storm_lifetime:g} s vs {CALM_LIFETIME:g} s,"
                f" via a proxy delaying connects by {self.connect_delay * 1000:g} ms"
            )
        return text


_STEADY = Scenario("steady", greenlets=200, pool_size=20, sql=SLEEP_SQL, queries_each=50)
_SCALE = Scenario(
    "scale",
    greenlets=2000,
    pool_size=50,
    sql=SLEEP_SQL,
    queries_each=10,
    # Like the field notes: one connection for 2000 greenlets only shows again
    # that a lone connection serializes everyone, at ~50 s a round.
    skip=(("shared", "one connection for 2000 greenlets takes ~50 s a round and shows nothing new"),),
)
_STORM = Scenario(
    "storm",
    greenlets=300,
    pool_size=100,
    sql=SLEEP_SQL,
    duration=10.0,
    storm_lifetime=3.0,
    connect_delay=0.03,
)
_MYSQL_STEADY = replace(_STEADY, name="mysql-steady", sql=MYSQL_SLEEP_SQL, backend=MYSQL)
# Each Celery worker process gets P connections direct; through PgBouncer the
# P server connections are shared by all of them (`greenpool.bench.scaleout`).
_SCALEOUT = Scenario("scaleout", greenlets=50, pool_size=10, sql=SCALEOUT_TASK.sql, duration=5.0, processes=(1, 2, 4))
# Each contender in its own real worker; `duration` caps each kind of task's
# steady state (one shared connection does ~16 pool-bound tasks/s).
_CELERY = Scenario("celery", greenlets=200, pool_size=10, sql=SLEEP_SQL, tasks=1000, duration=15.0)
# Half the PostgreSQL storm's pool: MariaDB allows 151 connections by default.
_MYSQL_STORM = replace(_STORM, name="mysql-storm", greenlets=150, pool_size=50, sql=MYSQL_SLEEP_SQL, backend=MYSQL)


@dataclass(frozen=True)
class Sizes:
    """A scenario's sizes: the full one (``--full``), the default run's, and ``--quick``'s."""

    full: Scenario
    quick: Scenario
    #: The default run's size; the full one if None.
    default_size: Scenario | None = None

    @property
    def default(self) -> Scenario:
        """The size `python -m greenpool bench` runs without --full or --quick."""
        return self.default_size or self.full

    def of(self, mode: str) -> Scenario:
        """The size for ``"full"``, ``"default"`` or ``"quick"``."""
        sizes = {"full": self.full, "default": self.default, "quick": self.quick}
        if mode not in sizes:
            raise ValueError(f"unknown mode {mode!r}")
        return sizes[mode]


#: The default run's storms: 4 s instead of 10, so that one round of each
#: stays under a minute; the same pool, lifetime and connect delay, so each
#: connection still expires in the timed phase (which starts ~1.4 s after
#: the pool's first connects: opening and warm-up).
DEFAULT_STORM_DURATION = 4.0

#: name -> sizes, in the order they run.
SCENARIOS: dict[str, Sizes] = {
    "steady": Sizes(
        _STEADY,
        quick=replace(_STEADY, queries_each=5),
        # One connection serializes everyone: ~25 s a round for what the
        # overhead scenario shows in 1.5 s.
        default_size=replace(
            _STEADY,
            skip=(("shared", "one connection for 200 greenlets takes ~25 s a round; overhead shows it"),),
        ),
    ),
    "overhead": Sizes(
        replace(_STEADY, name="overhead", sql="select 1"),
        quick=replace(_STEADY, name="overhead", sql="select 1", queries_each=5),
    ),
    "scale": Sizes(_SCALE, quick=replace(_SCALE, queries_each=2)),
    "storm": Sizes(
        _STORM,
        # --quick: half the pool, so that opening it (50 connects, 3 at a time,
        # 30 ms each) stays well within the 1 s lifetime and the run short.
        quick=replace(_STORM, greenlets=150, pool_size=50, duration=2.0, storm_lifetime=1.0),
        default_size=replace(_STORM, duration=DEFAULT_STORM_DURATION),
    ),
    # Not in the default run: it starts processes and a PgBouncer (--full, --scenario scaleout).
    "scaleout": Sizes(_SCALEOUT, quick=replace(_SCALEOUT, greenlets=16, pool_size=4, duration=1.0, processes=(1, 2))),
    # Not in the default run: it starts Celery workers (--full, --scenario celery).
    "celery": Sizes(_CELERY, quick=replace(_CELERY, greenlets=50, pool_size=5, tasks=200, duration=5.0)),
    "mysql-steady": Sizes(_MYSQL_STEADY, quick=replace(_MYSQL_STEADY, queries_each=5)),
    "mysql-overhead": Sizes(
        replace(_MYSQL_STEADY, name="mysql-overhead", sql="select 1"),
        quick=replace(_MYSQL_STEADY, name="mysql-overhead", sql="select 1", queries_each=5),
    ),
    "mysql-storm": Sizes(
        _MYSQL_STORM,
        quick=replace(_MYSQL_STORM, greenlets=60, pool_size=20, duration=2.0, storm_lifetime=1.0),
        default_size=replace(_MYSQL_STORM, duration=DEFAULT_STORM_DURATION),
    ),
}
