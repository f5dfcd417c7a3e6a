"""The analytics tests run on an empty, migrated database: SQLite, and a real PostgreSQL
server."""

from __future__ import annotations

import pytest


@pytest.fixture
def database(migrated_database):
    return migrated_database
