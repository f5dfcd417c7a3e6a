"""The database: SQLAlchemy 2 tables, engine set-up and Alembic migrations.

Only portable SQL is used, so the same code runs on SQLite (the default) and PostgreSQL.
"""

from maas.db.engine import make_engine, make_session_factory, write_transaction
from maas.db.migrate import upgrade

__all__ = ["make_engine", "make_session_factory", "upgrade", "write_transaction"]
