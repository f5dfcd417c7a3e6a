"""``maas db ...``: the database schema."""

from __future__ import annotations

import typer

from maas.cli.context import load_settings
from maas.cli.output import console
from maas.db import make_engine
from maas.db.migrate import current_revision, head_revision, upgrade

app = typer.Typer(
    help="Database schema migrations (run automatically at start).", no_args_is_help=True
)


@app.command("upgrade")
def upgrade_() -> None:
    """Apply every pending migration to MAAS_DATABASE_URL."""
    engine = make_engine(load_settings().database_url)
    try:
        upgrade(engine)
        console.print(f"database at revision {current_revision(engine)}")
    finally:
        engine.dispose()


@app.command("current")
def current() -> None:
    """Show the database's revision and the newest one this maas knows."""
    engine = make_engine(load_settings().database_url)
    try:
        console.print(
            f"database {current_revision(engine) or 'empty'}, newest {head_revision(engine)}"
        )
    finally:
        engine.dispose()
