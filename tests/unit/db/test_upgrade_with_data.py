"""Upgrading a database that holds models keeps every row (SQLite batch migrations rebuild
tables, which must not cascade into the rows that point at them)."""

from __future__ import annotations

from sqlalchemy import text

from maas.db import make_engine, upgrade
from maas.db.migrate import downgrade


def count(engine, table):
    with engine.connect() as connection:
        return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_upgrade_from_the_first_schema_keeps_models_versions_and_aliases(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO models (id, name, task, description, next_version, created_at, updated_at)"
            " VALUES (1, 'm', 'chat', '', 2, '2026-01-01', '2026-01-01')"
        )
        connection.exec_driver_sql(
            "INSERT INTO model_versions (id, model_id, version, format, runtime, path, size_bytes,"
            " num_files, manifest_sha256, created_at)"
            " VALUES (1, 1, 1, 'gguf', 'llm', 'm/1', 10, 1, 'x', '2026-01-01')"
        )
        connection.exec_driver_sql(
            "INSERT INTO aliases (id, model_id, name, version_id, updated_at)"
            " VALUES (1, 1, 'production', 1, '2026-01-01')"
        )
    upgrade(engine)
    assert (count(engine, "models"), count(engine, "model_versions"), count(engine, "aliases")) == (
        1,
        1,
        1,
    )
    downgrade(engine, "0001")
    assert (count(engine, "models"), count(engine, "model_versions"), count(engine, "aliases")) == (
        1,
        1,
        1,
    )
    with engine.connect() as connection:  # foreign keys are back on for normal work
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
