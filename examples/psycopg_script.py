"""A plain script (no gevent): greenpool as a drop-in for psycopg_pool.

GREENPOOL_DSN="host=127.0.0.1 user=postgres dbname=test" python examples/psycopg_script.py
"""

import os
from concurrent.futures import ThreadPoolExecutor

from greenpool import ConnectionPool

DSN = os.environ.get("GREENPOOL_DSN", "host=127.0.0.1 user=postgres dbname=test")


def work(pool: ConnectionPool, i: int) -> int:
    with pool.connection() as conn:
        return conn.execute("select %s::int * 2", [i]).fetchone()[0]


def main() -> None:
    with ConnectionPool(DSN, min_size=2, max_size=8) as pool:
        with ThreadPoolExecutor(16) as threads:
            results = list(threads.map(lambda i: work(pool, i), range(100)))
        print("sum:", sum(results))
        print("stats:", pool.get_stats())


if __name__ == "__main__":
    main()
