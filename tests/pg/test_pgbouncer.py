"""greenpool behind a real PgBouncer in transaction mode, in front of the PostgreSQL under test.

Each test starts its own PgBouncer (`greenpool.testing.PgBouncer`) with a
small `default_pool_size`, so that many client connections share few server
connections, and checks what transaction pooling asks of a client:

- no session state: psycopg's prepared statements off (`pgbouncer_kwargs()`),
  with a contrast test showing the error they cause when left on;
- no server connection pinned by an idle client: a connection given back in
  a transaction, or in a failed one, is rolled back before it is lent again;
- an interrupted query is cancelled through PgBouncer;
- the server sees at most `default_pool_size` connections, however many
  greenlets and client connections there are (`pg_stat_activity`, by the
  application_name PgBouncer tags its server connections with).

Greenlets run in this (unpatched) pytest process: greenpool's
`GeventConnection` cooperates through the hub without monkey-patching. The
PgBouncer program must be installed (``apt-get install pgbouncer``): without
it these tests skip, or fail in CI.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import helpers
import psycopg
import pytest
from conftest import skip_or_fail
from helpers import close_pools, destroy_main_hub, last_resort_deadline, open_pool, pg_params, wait_until
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

import greenpool
from greenpool.pg import pgbouncer_kwargs
from greenpool.pg.connection import GeventConnection
from greenpool.testing import PgBouncer
from greenpool.testing.pgbouncer import INSTALL_HINT, PgBouncerMissing

#: A test must end within this many seconds.
TEST_DEADLINE = 90


@pytest.fixture(autouse=True)
def _deadline() -> Iterator[None]:
    with last_resort_deadline(TEST_DEADLINE * 2):
        yield


@pytest.fixture
def hub() -> Iterator[Any]:
    """This thread's gevent hub, destroyed after the test (later tests use plain threads)."""
    the_hub = gevent.get_hub()
    yield the_hub
    destroy_main_hub()


@pytest.fixture
def make_bouncer(pg_dsn: str) -> Iterator[Callable[..., PgBouncer]]:
    """`make_bouncer(**options)`: a started `PgBouncer` in front of ``pg_dsn``'s server; stopped at teardown."""
    bouncers: list[PgBouncer] = []

    def factory(**options: Any) -> PgBouncer:
        options.setdefault("default_pool_size", 3)
        bouncer = PgBouncer(pg_dsn, **options)
        try:
            bouncer.start()
        except PgBouncerMissing as exc:
            skip_or_fail(f"needs PgBouncer: {exc}")
        bouncers.append(bouncer)
        return bouncer

    yield factory
    for bouncer in bouncers:
        bouncer.close()


@pytest.fixture
def pools(hub: Any) -> Iterator[list[Any]]:
    """Pools to close at teardown, before the hub goes."""
    made: list[Any] = []
    yield made
    close_pools(made)


@pytest.fixture
def server(hub: Any, pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection straight to the server (cooperative under the hub), in autocommit."""
    conn = GeventConnection.connect(pg_dsn, autocommit=True)
    yield conn
    conn.close()


@pytest.fixture
def table(pg_dsn: str) -> Iterator[str]:
    """A fresh table ``(x int)``, dropped at teardown."""
    name = f"gp_bouncer_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"create table {name} (x int)")
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"drop table if exists {name}")


def run_green(fn: Callable[[], Any], timeout: float = TEST_DEADLINE) -> Any:
    return helpers.run_green(fn, timeout)


def server_side(bouncer: PgBouncer) -> int:
    """The server connections PgBouncer's own pool counts (SHOW POOLS, every state)."""
    rows = [row for row in bouncer.admin("SHOW POOLS") if row["database"] != "pgbouncer"]
    return sum(int(row[key]) for row in rows for key in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


class PeakSampler:
    """Samples, every few ms in a greenlet, the server connections carrying the bouncer's tag."""

    def __init__(self, bouncer: PgBouncer, server: psycopg.Connection[Any]) -> None:
        self.bouncer, self.server = bouncer, server
        self.peak = 0
        self.samples = 0
        self._running = True
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.bouncer.server_connections(self.server))
            self.samples += 1
            gevent.sleep(0.005)

    def stop(self) -> int:
        """Stop sampling (between two samples: `server` stays usable); the peak seen."""
        self._running = False
        self._greenlet.join(timeout=10)
        self._greenlet.get(block=False)  # raise what failed it
        return self.peak


# --------------------------------------------------------------------------
# The helpers
# --------------------------------------------------------------------------


def test_pgbouncer_kwargs() -> None:
    assert pgbouncer_kwargs() == {"prepare_threshold": None}
    assert pgbouncer_kwargs(prepared_statements=False) == {"prepare_threshold": None}
    if psycopg.capabilities.has_send_close_prepared():
        assert pgbouncer_kwargs(prepared_statements=True) == {}
    else:
        with pytest.raises(psycopg.NotSupportedError, match="libpq >= 17"):
            pgbouncer_kwargs(prepared_statements=True)
    with pytest.raises(TypeError):
        pgbouncer_kwargs("yes")  # type: ignore[arg-type]
    # Nothing session-scoped, now or later: only client-side psycopg options.
    assert set(pgbouncer_kwargs()) <= {"prepare_threshold"}


def test_network_defaults_are_libpq_options_not_server_settings() -> None:
    """The pool's `NETWORK_DEFAULTS` never reach the server: none is a startup parameter PgBouncer refuses."""
    from greenpool.pg.driver import NETWORK_DEFAULTS

    assert set(NETWORK_DEFAULTS) == {
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
    }


def test_missing_program_is_named_with_how_to_install(monkeypatch: pytest.MonkeyPatch, pg_dsn: str) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("greenpool.testing.pgbouncer.SEARCH_DIRS", ())
    with pytest.raises(PgBouncerMissing, match="apt-get install pgbouncer") as info:
        PgBouncer(pg_dsn).start()
    assert INSTALL_HINT in str(info.value)
    with pytest.raises(PgBouncerMissing, match="not found"):
        PgBouncer(pg_dsn, binary="/nonexistent/pgbouncer").start()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"pool_mode": "txn"}, "pool_mode"),
        ({"auth_type": "md5"}, "auth_type"),
        ({"default_pool_size": 0}, "default_pool_size"),
        ({"max_prepared_statements": -1}, "max_prepared_statements"),
        ({"application_name": "x" * 64}, "application_name"),
    ],
)
def test_bad_options_are_refused(pg_dsn: str, options: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        PgBouncer(pg_dsn, **options)


def test_config_routes_every_database_to_the_target() -> None:
    bouncer = PgBouncer(
        "host=db.example port=5433 user=app password='p w' dbname=x",
        default_pool_size=7,
        application_name="tag",
        settings={"query_wait_timeout": 2, "server_round_robin": True},
    )
    config = bouncer.config(port=6000, directory="/d")
    assert config["databases"] == {
        "*": "host=db.example port=5433 user=app password='p w' connect_query='set application_name = ''tag'''"
    }
    settings = config["pgbouncer"]
    assert settings["listen_addr"] == "127.0.0.1"
    assert settings["listen_port"] == "6000"
    assert settings["pool_mode"] == "transaction"
    assert settings["default_pool_size"] == "7"
    assert settings["auth_file"] == "/d/userlist.txt"
    assert settings["admin_users"] == "app"
    assert settings["query_wait_timeout"] == "2"
    assert settings["server_round_robin"] == "1"
    assert "max_prepared_statements" not in settings


def test_start_admin_dsn_and_close(make_bouncer: Callable[..., PgBouncer], pg_dsn: str) -> None:
    bouncer = make_bouncer(default_pool_size=2)
    assert bouncer.running and bouncer.version is not None
    dsn = bouncer.dsn(pg_dsn)
    params = conninfo_to_dict(dsn)
    assert (params["host"], params["port"]) == ("127.0.0.1", str(bouncer.port))
    assert params["application_name"] == bouncer.application_name
    assert params["dbname"] == conninfo_to_dict(pg_dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A pooler: the pid the client was told isn't the server's.
        assert conn.execute("select pg_backend_pid()").fetchone()[0] != conn.info.backend_pid
        assert conn.execute("select current_setting('application_name')").fetchone()[0] == bouncer.application_name
    config = {row["key"]: row["value"] for row in bouncer.admin("SHOW CONFIG")}
    assert config["pool_mode"] == "transaction"
    assert config["default_pool_size"] == "2"
    assert bouncer.admin("RELOAD") == []
    with psycopg.connect(pg_dsn, autocommit=True) as server:
        assert bouncer.server_connections(server) == 1
    pid = bouncer.pid
    bouncer.close()
    assert not bouncer.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
    assert not _process_alive(pid)
    bouncer.close()  # idempotent


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_doctor_detects_the_bouncer_and_its_pool_mode(make_bouncer: Callable[..., PgBouncer], pg_dsn: str) -> None:
    from greenpool.tools.doctor import diagnose

    bouncer = make_bouncer()
    report = diagnose(dsn=bouncer.dsn(pg_dsn))
    found = [f for f in report.findings if f.check == "pgbouncer"]
    assert found[0].data["detected"] is True
    assert "pool_mode transaction, default_pool_size 3" in found[0].message
    # No pool known: doctor can't tell whether prepared statements are off.
    assert any("max_prepared_statements" in f.message for f in found[1:])


# --------------------------------------------------------------------------
# greenpool through PgBouncer
# --------------------------------------------------------------------------


def test_200_greenlets_on_20_client_connections_and_3_server_connections(
    make_bouncer: Callable[..., PgBouncer], pools: list[Any], server: Any, table: str, pg_dsn: str
) -> None:
    bouncer = make_bouncer(default_pool_size=3)
    pool = open_pool(
        pools, greenpool.ConnectionPool, bouncer.dsn(pg_dsn), min_size=20, kwargs=pgbouncer_kwargs(), timeout=60
    )
    sampler = PeakSampler(bouncer, server)
    done: list[int] = []

    def task(i: int) -> None:
        # Each connection runs the same statements far more often than
        # psycopg's prepare_threshold: they would be prepared by default.
        for round_no in range(5):
            with pool.connection() as conn:
                with conn.transaction():
                    conn.execute(f"insert into {table} values (%s)", [i * 10 + round_no])
                    conn.execute("select pg_sleep(0.001)")
                    row = conn.execute(f"select count(*) from {table} where x = %s", [i * 10 + round_no]).fetchone()
                    assert row[0] == 1
        done.append(i)

    def body() -> None:
        greenlets = [gevent.spawn(task, i) for i in range(200)]
        gevent.joinall(greenlets, timeout=TEST_DEADLINE - 20, raise_error=True)

    run_green(body)
    peak = sampler.stop()
    assert sorted(done) == list(range(200))
    assert server.execute(f"select count(*) from {table}").fetchone()[0] == 1000
    assert sampler.samples > 5
    assert 1 <= peak <= 3, f"the server saw {peak} connections from PgBouncer"
    assert server_side(bouncer) <= 3
    stats = pool.get_stats()
    assert stats["pool_size"] == 20
    assert stats["returns_bad"] == stats["connections_lost"] == stats["requests_errors"] == 0


@pytest.mark.parametrize("helper", [False, True], ids=["prepared-statements-on", "pgbouncer_kwargs"])
def test_prepared_statements_collide_without_the_helper(
    make_bouncer: Callable[..., PgBouncer], pools: list[Any], pg_dsn: str, helper: bool
) -> None:
    """Contrast: two client connections sharing one server connection both prepare ``_pg3_0``.

    psycopg prepares a statement on its 6th run on a connection (`prepare_threshold` 5), naming
    it ``_pg3_0`` on every connection: the second client's PREPARE meets the first's on the
    server connection they share. With `pgbouncer_kwargs()` nothing is prepared.
    """
    bouncer = make_bouncer(default_pool_size=1)
    kwargs = {"autocommit": True, **(pgbouncer_kwargs() if helper else {})}
    pool = open_pool(pools, greenpool.ConnectionPool, bouncer.dsn(pg_dsn), min_size=2, kwargs=kwargs)

    def body() -> None:
        first, second = pool.getconn(), pool.getconn()
        try:
            for conn in (first, second):
                for _ in range(8):
                    conn.execute("select 1").fetchone()
        finally:
            pool.putconn(first)
            pool.putconn(second)

    if helper:
        run_green(body)
    else:
        with pytest.raises(pg_errors.DuplicatePreparedStatement, match='prepared statement "_pg3_0" already exists'):
            run_green(body)


@pytest.mark.parametrize("how", ["open", "failed"])
def test_a_transaction_left_open_is_rolled_back_on_return(
    make_bouncer: Callable[..., PgBouncer], pools: list[Any], server: Any, table: str, pg_dsn: str, how: str
) -> None:
    """A client inside a transaction pins its server connection; the pool's return path ends it.

    One server connection for two client connections: had the first one's transaction stayed
    open, the next borrower's query would wait out query_wait_timeout (2 s here) and fail.
    """
    bouncer = make_bouncer(default_pool_size=1, settings={"query_wait_timeout": 2})
    pool = open_pool(pools, greenpool.ConnectionPool, bouncer.dsn(pg_dsn), min_size=2, kwargs=pgbouncer_kwargs())

    def body() -> None:
        conn = pool.getconn()
        conn.execute(f"insert into {table} values (1)")
        if how == "failed":
            with pytest.raises(pg_errors.DivisionByZero):
                conn.execute("select 1 / 0")
            assert conn.info.transaction_status == TransactionStatus.INERROR
        else:
            assert conn.info.transaction_status == TransactionStatus.INTRANS
        pool.putconn(conn)  # given back in the transaction
        # Both client connections in turn: neither is in that transaction, and the one
        # server connection is free for each.
        first, second = pool.getconn(timeout=10), pool.getconn(timeout=10)
        try:
            for other in (first, second):
                assert other.info.transaction_status == TransactionStatus.IDLE
                assert other.execute(f"select count(*) from {table}").fetchone()[0] == 0
                other.rollback()
        finally:
            pool.putconn(first)
            pool.putconn(second)

    run_green(body)
    assert server.execute(f"select count(*) from {table}").fetchone()[0] == 0
    idle_in_transaction = server.execute(
        "select count(*) from pg_stat_activity where application_name = %s and state like 'idle in transaction%%'",
        [bouncer.application_name],
    ).fetchone()[0]
    assert idle_in_transaction == 0
    stats = pool.get_stats()
    assert stats["returns_reset"] >= 1
    assert stats["returns_bad"] == 0


def test_an_interrupted_query_is_cancelled_through_pgbouncer(
    make_bouncer: Callable[..., PgBouncer], pools: list[Any], server: Any, pg_dsn: str
) -> None:
    bouncer = make_bouncer(default_pool_size=2)
    pool = open_pool(pools, greenpool.ConnectionPool, bouncer.dsn(pg_dsn), min_size=2, kwargs=pgbouncer_kwargs())
    marker = f"gp_cancel_{uuid.uuid4().hex[:8]}"

    def running() -> int:
        return int(
            server.execute(
                "select count(*) from pg_stat_activity where state = 'active' and query like %s"
                " and pid <> pg_backend_pid()",
                [f"%{marker}%"],
            ).fetchone()[0]
        )

    def slow() -> None:
        with pool.connection() as conn:
            conn.execute(f"select pg_sleep(30) /* {marker} */")

    def body() -> None:
        started = time.monotonic()
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.5):
                slow()
        # Cancelled on the server through PgBouncer's cancel key, not left to run 30 s.
        wait_until(lambda: running() == 0, timeout=10, what="the query cancelled on the server", interval=0.01)
        wait_until(
            lambda: pool.get_stats()["pool_available"] == 2, timeout=10, what="the connection back", interval=0.01
        )
        assert time.monotonic() - started < 10
        # Healthy: every connection, and the server connections, work.
        results: list[int] = []

        def query(i: int) -> None:
            with pool.connection(timeout=10) as conn:
                results.append(conn.execute("select %s::int", [i]).fetchone()[0])

        gevent.joinall([gevent.spawn(query, i) for i in range(20)], timeout=20, raise_error=True)
        assert sorted(results) == list(range(20))

    run_green(body)
    stats = pool.get_stats()
    assert stats["returns_reset"] >= 1
    assert stats["connections_closed_returned_active"] == 0  # repaired, not replaced
    assert stats["connections_created"] == 2
    active = [row for row in bouncer.admin("SHOW POOLS") if row["database"] != "pgbouncer"]
    assert all(int(row["sv_active"]) == 0 for row in active)


def test_query_wait_timeout_breaks_the_waiting_client_which_the_pool_replaces(
    make_bouncer: Callable[..., PgBouncer], pools: list[Any], pg_dsn: str
) -> None:
    """What a long transaction costs the others behind a full PgBouncer pool.

    One server connection, held in a transaction past query_wait_timeout: PgBouncer fails the
    client waiting for it and closes that client connection; the pool sees it broken at return
    and makes another.
    """
    bouncer = make_bouncer(default_pool_size=1, settings={"query_wait_timeout": 1})
    pool = open_pool(pools, greenpool.ConnectionPool, bouncer.dsn(pg_dsn), min_size=2, kwargs=pgbouncer_kwargs())

    def body() -> None:
        holder = pool.getconn()
        holder.execute("select 1")  # in a transaction: the server connection is this client's
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            with pool.connection(timeout=5) as conn:
                conn.execute("select 2")
        pool.putconn(holder)  # rolled back: the server connection is free again
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, timeout=10, what="a replacement", interval=0.01)
        for _ in range(3):
            with pool.connection(timeout=10) as conn:
                assert conn.execute("select 3").fetchone()[0] == 3

    run_green(body)
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert stats["connections_created"] == 3


def test_peewee_pooled_database_through_pgbouncer(
    make_bouncer: Callable[..., PgBouncer], server: Any, table: str, pg_dsn: str
) -> None:
    import peewee

    from greenpool.peewee import PooledPostgresqlDatabase

    bouncer = make_bouncer(default_pool_size=3)
    params = pg_params(bouncer.dsn(pg_dsn))
    database = params.pop("dbname")
    db = PooledPostgresqlDatabase(database, max_connections=20, timeout=30, **params, **pgbouncer_kwargs())

    class Item(peewee.Model):
        x = peewee.IntegerField()

        class Meta:
            table_name = table
            primary_key = False

    Item._meta.set_database(db)
    sampler = PeakSampler(bouncer, server)

    def task(i: int) -> None:
        for round_no in range(4):
            with db.connection_context():
                with db.atomic():
                    Item.insert(x=i * 10 + round_no).execute()
                    assert Item.select().where(Item.x == i * 10 + round_no).count() == 1
                try:
                    with db.atomic():
                        Item.insert(x=-1).execute()
                        db.execute_sql("select 1 / 0")
                except peewee.DataError:
                    pass

    def body() -> None:
        greenlets = [gevent.spawn(task, i) for i in range(100)]
        gevent.joinall(greenlets, timeout=TEST_DEADLINE - 20, raise_error=True)

    try:
        run_green(body)
    finally:
        peak = sampler.stop()
        db.close_idle()
        db.pool.close()
    assert server.execute(f"select count(*) from {table}").fetchone()[0] == 400
    assert 1 <= peak <= 3, f"the server saw {peak} connections from PgBouncer"
    assert db.pool_stats()["returns_bad"] == 0
