"""Each script in examples/ runs as its docstring says, against the PostgreSQL under test.

(examples/celery_app.py is run by a real worker in tests/integrations/test_celery.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.parametrize(
    "script, expected",
    [
        ("gevent_workers.py", "200 queries in"),
        ("peewee_models.py", "notes: 100"),
        ("psycopg_script.py", "sum: 9900"),
    ],
)
def test_example_runs(pg_dsn: str, script: str, expected: str) -> None:
    env = dict(os.environ, GREENPOOL_DSN=pg_dsn)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO_ROOT),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
