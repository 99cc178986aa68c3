"""Hundreds of greenlets sharing 20 connections, without serializing.

GREENPOOL_DSN="host=127.0.0.1 user=postgres dbname=test" python examples/gevent_workers.py
"""

from gevent import monkey

monkey.patch_all()  # optional for psycopg: greenpool's connections cooperate either way

import os  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from greenpool import ConnectionPool  # noqa: E402

DSN = os.environ.get("GREENPOOL_DSN", "host=127.0.0.1 user=postgres dbname=test")


def task(pool: ConnectionPool) -> None:
    with pool.connection(timeout=10) as conn:
        conn.execute("select pg_sleep(0.05)")


def main() -> None:
    with ConnectionPool(DSN, min_size=20, max_size=20, open=False) as pool:
        pool.wait()
        start = time.monotonic()
        gevent.joinall([gevent.spawn(task, pool) for _ in range(200)], raise_error=True)
        # 200 x 50 ms over 20 connections: about 0.5 s, not 10 s.
        print(f"200 queries in {time.monotonic() - start:.2f} s")
        stats = pool.get_stats()
        print("p99 wait:", stats["requests_wait_p99_us"] / 1000, "ms")


if __name__ == "__main__":
    main()
