"""Packaging: one source for the version, valid metadata, and an sdist and a wheel that hold
what they should.

The sdist and the wheel are built once per session, as ``python -m build`` does (the sdist from
the source tree, the wheel from the unpacked sdist), but without build isolation: setuptools
comes from the ``test`` extra, so no network is needed. The source tree is copied to a temporary
directory first, so the checkout gets no ``build/`` or ``*.egg-info``.
"""

from __future__ import annotations

import configparser
import email.message
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import greenpool

# What the sdist must hold besides the package: the tests and the docs, and what they need.
SDIST_DIRS = ("greenpool", "tests", "docs", "examples")
SDIST_FILES = ("README.md", "CHANGELOG.md", "setup.cfg", "setup.py", "pyproject.toml", "tox.ini", "ruff.toml")

# Not copied to the build directory: VCS data, build and tool outputs, local virtualenvs.
_NOT_SOURCE = {".git", ".tox", "build", "dist", "venv", ".venv", "__pycache__"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {
        n
        for n in names
        if n in _NOT_SOURCE or n.endswith((".egg-info", ".pyc", ".pyo")) or (n.startswith(".") and n.endswith("_cache"))
    }


def _source_files(root: Path, top: str) -> set[str]:
    """Paths (relative to *root*, ``/``-separated) of the source files under *root*/*top*."""
    found = set()
    for directory, dirnames, filenames in os.walk(root / top):
        dirnames[:] = sorted(set(dirnames) - _ignore(directory, dirnames))
        for name in set(filenames) - _ignore(directory, filenames):
            found.add((Path(directory) / name).relative_to(root).as_posix())
    return found


def _build(kind: str, source: Path, outdir: Path) -> Path:
    """Run setuptools' PEP 517 ``build_sdist``/``build_wheel`` hook in *source*; the file built."""
    script = f"import sys; from setuptools import build_meta; print(build_meta.build_{kind}(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", script, str(outdir)],
        cwd=str(source),
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"build_{kind} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return outdir / result.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class Built:
    """The sdist and the wheel built from a copy of the source tree."""

    source: Path  # the copy the sdist was built from
    sdist: Path
    wheel: Path

    def sdist_names(self) -> set[str]:
        """The sdist's files, relative to its top directory."""
        with tarfile.open(self.sdist) as tar:
            return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}

    def wheel_names(self) -> set[str]:
        """The wheel's files."""
        with zipfile.ZipFile(self.wheel) as whl:
            return set(whl.namelist())

    def wheel_metadata(self) -> email.message.Message:
        """The wheel's METADATA (core metadata, an email-style header block)."""
        with zipfile.ZipFile(self.wheel) as whl:
            (name,) = (n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            return email.parser.Parser().parsestr(whl.read(name).decode())


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """Build the sdist from a copy of the checkout, then the wheel from the unpacked sdist."""
    pytest.importorskip("setuptools", reason="the packaging tests need setuptools: pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(REPO_ROOT, source, ignore=_ignore)
    dist = tmp / "dist"
    dist.mkdir()
    sdist = _build("sdist", source, dist)
    with tarfile.open(sdist) as tar:
        # The "data" filter (refuse links out of the tree...) exists from Python 3.10.12/3.11.4.
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _build("wheel", unpacked, dist)
    yield Built(source, sdist, wheel)


# ---------------------------------------------------------------- the version


def test_installed_version_is_the_package_version() -> None:
    try:
        installed = metadata.version("greenpool")
    except metadata.PackageNotFoundError:
        pytest.fail("greenpool is not installed: pip install -e '.[test]'", pytrace=False)
    assert installed == greenpool.__version__, (
        f"the installed metadata says {installed}, greenpool.__version__ {greenpool.__version__}:"
        " reinstall after changing the version (pip install -e '.[test]')"
    )


def test_version_is_written_only_in_the_package() -> None:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    assert config["metadata"]["version"] == "attr: greenpool.__version__"
    assert str(Version(greenpool.__version__)) == greenpool.__version__, "not a normalized PEP 440 version"


def test_a_release_has_a_changelog_entry() -> None:
    version = Version(greenpool.__version__)
    if version.is_devrelease or version.is_prerelease:
        return  # a development version's changes sit under "Unreleased"
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(greenpool.__version__)}\]", changelog, re.MULTILINE), (
        f"CHANGELOG.md has no '## [{greenpool.__version__}]' section"
    )


def test_built_metadata_version_is_the_package_version(built: Built) -> None:
    # setuptools read the version without importing greenpool (gevent is not a build requirement).
    assert built.wheel_metadata()["Version"] == greenpool.__version__
    assert built.sdist.name == f"greenpool-{greenpool.__version__}.tar.gz"


# ---------------------------------------------------------------- metadata


def test_classifiers_are_on_pypis_list(built: Built) -> None:
    trove = pytest.importorskip("trove_classifiers", reason="pip install -e '.[test]'")
    classifiers = built.wheel_metadata().get_all("Classifier") or []
    assert classifiers
    unknown = [c for c in classifiers if c not in trove.classifiers]
    assert not unknown, f"PyPI rejects unknown classifiers: {unknown}"
    deprecated = [c for c in classifiers if c in trove.deprecated_classifiers]
    assert not deprecated


def test_python_classifiers_agree_with_requires_python(built: Built) -> None:
    meta = built.wheel_metadata()
    requires_python = SpecifierSet(meta["Requires-Python"])
    versions = [
        c.rsplit(" :: ", 1)[1]
        for c in meta.get_all("Classifier") or []
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert versions, "no Python version classifier"
    assert all(v in requires_python for v in versions), (versions, str(requires_python))


def test_only_gevent_is_required_without_extras(built: Built) -> None:
    meta = built.wheel_metadata()
    requirements = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    unconditional = sorted(r.name for r in requirements if r.marker is None)
    assert unconditional == ["gevent"]
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"psycopg", "peewee", "mysql", "celery", "embedded", "test", "dev"} <= extras
    urls = {u.split(",", 1)[0] for u in meta.get_all("Project-URL") or []}
    assert {"Documentation", "Changelog"} <= urls
    assert meta["Description-Content-Type"] == "text/markdown"


def test_tox_min_env_pins_the_declared_floors() -> None:
    # The `min` tox env must test what setup.cfg promises, not an older or newer release.
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    extras = setup["options.extras_require"]
    floors = {}
    for extra in ("psycopg", "peewee"):
        for line in extras[extra].split():
            req = Requirement(line)
            (spec,) = (s for s in req.specifier if s.operator == ">=")
            floors.setdefault(req.name, Version(spec.version))
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO_ROOT / "tox.ini")
    pins = {}
    for line in tox["testenv"]["deps"].splitlines():
        factor, _, dep = line.partition(":")
        if factor.strip() == "min":
            req = Requirement(dep.strip())
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name] = Version(spec.version)
    assert pins["psycopg"] == floors["psycopg"]
    assert pins["peewee"] == floors["peewee"]


# ---------------------------------------------------------------- contents


def test_sdist_holds_the_package_tests_and_docs(built: Built) -> None:
    names = built.sdist_names()
    expected = set(SDIST_FILES)
    for top in SDIST_DIRS:
        expected |= _source_files(built.source, top)
    assert "tests/conftest.py" in expected and "docs/design.md" in expected  # the walk found them
    missing = sorted(expected - names)
    assert not missing, f"missing from the sdist (MANIFEST.in): {missing}"
    junk = sorted(n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo")))
    assert not junk


def test_wheel_holds_only_the_package(built: Built) -> None:
    names = built.wheel_names()
    dist_info = f"greenpool-{greenpool.__version__}.dist-info"
    assert {n.split("/", 1)[0] for n in names} == {"greenpool", dist_info}
    assert "greenpool/py.typed" in names
    modules = {n for n in _source_files(built.source, "greenpool") if n.endswith(".py")}
    missing = sorted(modules - names)
    assert not missing, f"missing from the wheel: {missing}"
    assert f"{dist_info}/entry_points.txt" in names
