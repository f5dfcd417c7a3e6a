"""An empty, migrated database for the analytics tests: SQLite, and a real PostgreSQL
server (its tables dropped again afterwards)."""

from __future__ import annotations

import pytest

from maas.db import make_engine, upgrade
from maas.db.migrate import downgrade


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'usage.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    if request.param != "sqlite":
        downgrade(engine, "base")
    engine.dispose()
