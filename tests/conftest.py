from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maas.config import Settings
from maas.registry import Registry, open_registry
from tests.fixtures import wide_console


def pytest_configure(config: pytest.Config) -> None:
    """OpenMP threads that wait sleep instead of spinning, in this process and the ones it
    starts (set before any of them loads torch's OpenMP). pytest-xdist runs a worker per
    core, each with engine, training or server processes of as many threads as there are
    cores: spinning threads then take the cores the others need (bench/omp_sharing.py: two
    processes of two threads on two cores, 57 s each spinning against 4.3 s sleeping, 2.5
    alone); the q8_0 export test took 221 s in the suite and 70 s alone."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local cache (built kernels, converted tokenizers, measured dtype choices) for the
    whole run, not ~/.cache: shared by pytest-xdist's workers (the folder above each worker's
    own), as by the processes of a machine, which is what its atomic writes are for. It is
    MAAS_CACHE_DIR from the session's start, so module fixtures' servers use it too."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, above popen-gw0, popen-gw1...
    folder = root / "maas-cache"
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as session_env:
        session_env.setenv("MAAS_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _isolated_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, _session_cache: Path
) -> None:
    """No test reads the developer's MAAS_* settings or writes into the current folder or
    the user's cache."""
    for key in list(os.environ):
        if key.startswith("MAAS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "maas-home"))
    monkeypatch.setenv("MAAS_CACHE_DIR", str(_session_cache))


@pytest.fixture(scope="session")
def template_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database that maas's migrations brought to their newest revision, once for
    the run: ``home_with_database`` copies it into a test's home. Migrating a fresh
    database takes about 60 ms and opening a copy 13, in each of a few thousand tests;
    the migrations themselves are tested on their own (tests/unit/db)."""
    home = tmp_path_factory.mktemp("migrated") / "maas-home"
    open_registry(suite_settings(home)).close()
    database = home / "maas.db"
    assert not database.with_name("maas.db-wal").exists(), "the template was left open"
    return database


def home_with_database(tmp_path: Path, template_database: Path) -> Path:
    """``tmp_path``'s maas home, holding a copy of the migrated database."""
    home = tmp_path / "maas-home"
    home.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(template_database, home / "maas.db")
    return home


@pytest.fixture
def settings(tmp_path: Path, template_database: Path) -> Settings:
    """The server's settings for a test (``suite_settings``), whose home holds a copy of the
    migrated database."""
    return suite_settings(home_with_database(tmp_path, template_database))


def suite_settings(home: Path, **changes) -> Settings:
    """The defaults with two changes, and ``changes``, read while no MAAS_* variable of the
    developer's is set (module fixtures are made before each test's environment is
    cleaned): the TestClient's Host header ("testserver") is allowed, and
    text-generation models' decode steps are not compiled
    (vLLM's tests run eagerly as much, with ``enforce_eager``). Compiling takes 10 to 30 s
    a load on two cores, and most tests load a model to test something else. The compiled
    steps are tested on their own (tests/unit/engine/test_compiled.py,
    test_stored_weights.py, test_int8_matmul.py, test_pipeline_llm.py), and with the
    default settings by the e2e tests' servers."""
    fields = {"allowed_hosts": ["testserver"], "llm_compile": False, **changes}
    with pytest.MonkeyPatch.context() as env:
        for key in [key for key in os.environ if key.startswith("MAAS_")]:
            env.delenv(key)
        return Settings(home=home, **fields)


@pytest.fixture
def registry(settings: Settings) -> Registry:
    registry = open_registry(settings)
    yield registry
    registry.close()


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str, str]]:
    """Run ``maas ARGS...`` in this process: ``cli("models", "list") -> (code, stdout, stderr)``."""
    from maas.cli import main

    wide_console(monkeypatch)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["maas", *args])
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the whole session (started on first use)."""
    from tests.postgres import PostgresServer, binaries

    if binaries() is None:
        pytest.fail("PostgreSQL's server binaries are missing: run `make install-dev`")
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def migrated_database(request, tmp_path):
    """An empty database at the newest schema, as a SQLAlchemy engine: SQLite, and a fresh
    database on the session's PostgreSQL server."""
    from maas.db import make_engine, upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'maas.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()
