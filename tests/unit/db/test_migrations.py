"""The migration chain builds exactly the schema the tables declare, from an empty database."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from maas.db import make_engine, upgrade
from maas.db.migrate import current_revision, downgrade, head_revision
from maas.db.tables import Base


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:  # a real server, started by the tests (tests/postgres.py)
        url = request.getfixturevalue("postgres_url")
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
