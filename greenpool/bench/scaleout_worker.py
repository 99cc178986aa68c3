"""One worker process of the benchmark's ``scaleout`` scenario (see `greenpool.bench.scaleout`).

Run by the scenario as ``python -m gevent.monkey --module
greenpool.bench.scaleout_worker CONFIG``, so gevent patches the process
before anything is imported; CONFIG is a JSON object: ``dsn``, ``pool_size``,
``greenlets``, ``sql``, ``duration`` (seconds), ``timeout`` (the pool's),
``kwargs`` (the connections' psycopg keywords).

It opens a `greenpool.ConnectionPool` of ``pool_size`` connections, warms it
up (each greenlet runs `WARMUP_QUERIES` queries), prints ``{"event":
"ready"}`` and waits for a ``go`` line on stdin; then ``greenlets``
greenlets run ``sql`` on pooled connections for ``duration`` seconds, and
it prints ``{"event": "result", ...}``: the queries, the seconds, every
latency in microseconds, the CPU seconds the process used meanwhile, and
the pool's statistics. It keeps its connections open until its stdin
closes (the parent reads their backends' CPU first), then closes the pool
and exits. A failure prints ``{"event": "error", "error": ...}``
and exits 1. Every line is one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

#: Untimed queries each greenlet runs before the timed phase.
WARMUP_QUERIES = 2
#: Most seconds the worker waits for ``go`` once ready.
GO_TIMEOUT = 300.0


def _say(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_line(timeout: float) -> bytes:
    """The next line on stdin (without its newline), b"" at EOF; `TimeoutError` after `timeout` seconds."""
    import gevent.select

    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing on stdin within {timeout:g} s")
        readable, _, _ = gevent.select.select([0], [], [], remaining)
        if readable:
            chunk = os.read(0, 1024)
            if not chunk:
                return buf
            buf += chunk
    return buf.split(b"\n", 1)[0].strip()


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Open the pool, warm it up, say ready, wait for ``go``, run the timed phase; its figures."""
    import gevent

    from greenpool import ConnectionPool

    sql, greenlets, duration = config["sql"], int(config["greenlets"]), float(config["duration"])
    pool = ConnectionPool(
        config["dsn"],
        min_size=int(config["pool_size"]),
        max_size=int(config["pool_size"]),
        kwargs=dict(config["kwargs"]),
        timeout=float(config["timeout"]),
        name=f"scaleout-{os.getpid()}",
        open=False,
    )
    try:
        pool.open(wait=True, timeout=float(config["timeout"]))

        def warm() -> None:
            for _ in range(WARMUP_QUERIES):
                with pool.connection() as conn:
                    conn.execute(sql).fetchall()

        gevent.joinall([gevent.spawn(warm) for _ in range(greenlets)], raise_error=True)
        pool.pop_stats()
        _say("ready", pid=os.getpid())
        line = _read_line(GO_TIMEOUT)
        if line != b"go":
            raise ValueError(f"expected 'go', got {line!r}")

        latencies: list[int] = []
        record = latencies.append
        perf_counter = time.perf_counter
        deadline = perf_counter() + duration

        def client() -> None:
            while perf_counter() < deadline:
                start = perf_counter()
                with pool.connection() as conn:
                    conn.execute(sql).fetchall()
                record(int((perf_counter() - start) * 1e6))

        cpu, started = _cpu_seconds(), perf_counter()
        gevent.joinall([gevent.spawn(client) for _ in range(greenlets)], raise_error=True)
        seconds, cpu = perf_counter() - started, _cpu_seconds() - cpu
        figures = {
            "queries": len(latencies),
            "seconds": seconds,
            "cpu_s": cpu,
            "latencies_us": latencies,
            "stats": dict(pool.get_stats()),
        }
        # The connections stay open until the parent has read the server's
        # CPU figures of their backends: it closes our stdin then.
        _say("result", **figures)
        _read_line(GO_TIMEOUT)
        return figures
    finally:
        pool.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the worker described by the JSON in ``argv[0]`` (default: ``sys.argv[1]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) != 1:
            raise ValueError("usage: python -m gevent.monkey --module greenpool.bench.scaleout_worker CONFIG_JSON")
        run(json.loads(args[0]))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, whatever it is
        _say("error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
