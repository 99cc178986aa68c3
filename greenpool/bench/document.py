"""The JSON document of a run (``--json``): what was run where, every figure, and writing it."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write `document` to `path` atomically, NaN as null."""

    # NaN is not JSON: write null instead.
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(clean(document), out, indent=2, default=str)
        out.write("\n")
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    """Python's version and the installed versions of gevent, the drivers and the pools."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("gevent", "psycopg", "psycopg-binary", "psycopg-pool", "peewee", "pymysql"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()
