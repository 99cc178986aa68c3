"""Tests for greenpool.testing.cluster: finding PostgreSQL's programs, a cluster's
replication, faults and promotion, and its clean-up (also when its owner is killed)."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import skip_or_fail
from helpers import replicated_cluster, wait_until

from greenpool.testing import PostgresNotFound, ReplicatedCluster
from greenpool.testing import cluster as cluster_module


def postmaster_pids(cluster: ReplicatedCluster) -> list[int]:
    return [
        int(pid_file.read_text().split("\n", 1)[0])
        for node in (0, 1)
        if (pid_file := cluster.base / f"node{node}" / "postmaster.pid").exists()
    ]


@pytest.fixture
def cluster() -> Iterator[ReplicatedCluster]:
    with replicated_cluster() as made:
        yield made


def test_missing_programs_say_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(PostgresNotFound) as excinfo:
        ReplicatedCluster(bindir=tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path) in message
    assert "pip install 'greenpool[embedded]'" in message
    assert "GREENPOOL_PG_BINDIR" in message


def test_the_programs_are_found_where_the_environment_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in cluster_module.PROGRAMS:
        (tmp_path / name).write_text("")
    monkeypatch.setenv("GREENPOOL_PG_BINDIR", str(tmp_path))
    assert cluster_module.find_bindir() == tmp_path


def test_the_dsn_names_both_nodes(cluster: ReplicatedCluster) -> None:
    p0, p1 = cluster.ports
    assert cluster.dsn() == (
        f"host=127.0.0.1,127.0.0.1 port={p0},{p1} user=postgres dbname=postgres target_session_attrs=read-write"
    )
    assert cluster.dsn(None, connect_timeout=2).endswith(
        f"port={p0},{p1} user=postgres dbname=postgres connect_timeout=2"
    )
    assert cluster.params(application_name="a b")["application_name"] == "a b"
    assert cluster.dsn(application_name="a b").endswith("application_name='a b'")


def test_a_crashed_primary_s_acknowledged_writes_are_on_the_promoted_replica(cluster: ReplicatedCluster) -> None:
    assert cluster.primary == 0
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        assert conn.execute("select inet_server_port()").fetchone() == (cluster.ports[0],)
        conn.execute("create table t (id int)")
        conn.execute("insert into t select generate_series(1, 1000)")  # acknowledged: on the standby too
    with psycopg.connect(cluster.node_dsn(1)) as conn:
        assert conn.execute("select pg_is_in_recovery()").fetchone() == (True,)
    cluster.crash_primary()
    assert cluster.primary is None and not cluster.running(0)
    with pytest.raises(psycopg.OperationalError, match="read-only"):
        psycopg.connect(cluster.dsn(connect_timeout=2))  # node 0 refuses, node 1 is a standby
    promoted = cluster.promote()
    assert promoted == cluster.promoted_at <= time.monotonic()
    assert cluster.primary == 1
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        assert conn.execute("select inet_server_port()").fetchone() == (cluster.ports[1],)
        assert conn.execute("select count(*) from t").fetchone() == (1000,)
        conn.execute("insert into t values (0)")  # takes writes


def test_a_stopped_primary_ends_its_sessions_with_57P01(cluster: ReplicatedCluster) -> None:
    with psycopg.connect(cluster.node_dsn(0)) as conn:
        conn.execute("begin")
        cluster.stop_primary()
        with pytest.raises(psycopg.OperationalError) as excinfo:
            conn.execute("select 1")
    assert isinstance(excinfo.value, psycopg.errors.AdminShutdown), repr(excinfo.value)
    assert cluster.primary is None
    cluster.promote()
    with psycopg.connect(cluster.dsn()) as conn:
        assert conn.execute("select inet_server_port()").fetchone() == (cluster.ports[1],)


def test_close_stops_the_servers_and_deletes_their_directory(cluster: ReplicatedCluster) -> None:
    pids = postmaster_pids(cluster)
    assert len(pids) == 2
    cluster.close()
    cluster.close()  # idempotent
    assert not cluster.base.exists()
    assert not any(cluster_module._alive(pid) for pid in pids)
    with pytest.raises(cluster_module.ClusterError, match="closed"):
        cluster.promote()


_KILLED_OWNER = """
import json, os, signal
from greenpool.testing import ReplicatedCluster

cluster = ReplicatedCluster()
pids = [int((cluster.base / f"node{n}" / "postmaster.pid").read_text().split()[0]) for n in (0, 1)]
print(json.dumps({"base": str(cluster.base), "pids": pids}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_the_watchdog_cleans_up_after_a_killed_owner(run_python: Callable[..., Any]) -> None:
    """The owner dies without `close()`: its watchdog stops the servers, deletes the directory."""
    try:
        cluster_module.find_bindir()
    except PostgresNotFound as ex:
        skip_or_fail(f"needs PostgreSQL's server programs: {ex}")
    result = run_python(textwrap.dedent(_KILLED_OWNER), env={"GREENPOOL_TEST_DSN": ""}, timeout=120)
    assert result.returncode == -9, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    base = Path(info["base"])
    wait_until(
        lambda: not base.exists() and not any(cluster_module._alive(pid) for pid in info["pids"]),
        timeout=30,
        what="the servers stopped and their directory deleted",
    )
