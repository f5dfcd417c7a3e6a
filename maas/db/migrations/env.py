"""Alembic environment: runs on the engine the caller passes (see maas.db.migrate).

Migrations are serialised (SQLite: BEGIN IMMEDIATE; PostgreSQL: the registry's advisory lock),
so two processes starting on a fresh database do not race. On SQLite, foreign keys are off
while migrations run: a batch migration rebuilds a table by copy, drop and rename, and with
foreign keys on the drop would cascade into the rows that point at it.
"""

from alembic import context
from sqlalchemy import text

from maas.db.engine import IMMEDIATE, REGISTRY_LOCK
from maas.db.tables import Base

config = context.config
engine = config.attributes["engine"]

with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    # PRAGMA foreign_keys is ignored inside a transaction: set it on the driver's connection,
    # which runs in autocommit mode (see maas.db.engine).
    driver = connection.connection.driver_connection
    if sqlite:
        driver.execute("PRAGMA foreign_keys=OFF")
    connection = connection.execution_options(**{IMMEDIATE: True})
    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK})
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left rows pointing nowhere: {broken[:3]}")
    if sqlite:
        driver.execute("PRAGMA foreign_keys=ON")
