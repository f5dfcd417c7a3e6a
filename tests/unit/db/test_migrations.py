"""The migration chain builds exactly the schema the tables declare, from an empty database."""

from __future__ import annotations

import os

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from maas.db import make_engine, upgrade
from maas.db.migrate import current_revision, downgrade, head_revision
from maas.db.tables import Base

# Read at import: the autouse fixture clears MAAS_* variables before each test.
POSTGRES_URL = os.environ.get("MAAS_TEST_POSTGRES_URL")
URLS = ["sqlite", "postgres"] if POSTGRES_URL else ["sqlite"]


@pytest.fixture(params=URLS)
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}" if request.param == "sqlite" else POSTGRES_URL
    engine = make_engine(url)
    yield engine
    if request.param != "sqlite":
        downgrade(engine, "base")
    engine.dispose()


def _differences(engine):
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_fresh_database_matches_the_tables(engine):
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision(engine)
    assert _differences(engine) == []
    assert {"models", "model_versions", "aliases"} <= set(inspect(engine).get_table_names())


def test_upgrade_is_idempotent_and_reversible(engine):
    upgrade(engine)
    upgrade(engine)
    downgrade(engine, "base")
    assert not {"models", "model_versions", "aliases"} & set(inspect(engine).get_table_names())
    upgrade(engine)
    assert _differences(engine) == []


def test_every_revision_has_a_downgrade_and_one_head(engine):
    from alembic.script import ScriptDirectory

    from maas.db.migrate import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config(engine))
    assert len(scripts.get_heads()) == 1
    for revision in scripts.walk_revisions():
        assert callable(getattr(revision.module, "downgrade", None))
