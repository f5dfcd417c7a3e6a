"""Settings for the server and the CLI.

Every field reads from an environment variable with the ``MAAS_`` prefix (``MAAS_HOME``,
``MAAS_DATABASE_URL``, ...). Paths are resolved to absolute paths and derived defaults are
filled in once, at construction, so the rest of the code never has to guess.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MAAS_", use_attribute_docstrings=True, extra="ignore"
    )

    home: Path = Path(".maas")
    """Folder for everything maas keeps: database, artifacts, secrets. Relative paths are
    taken from the current folder, so the default is ``./.maas``."""

    database_url: str = ""
    """SQLAlchemy URL of the database. Empty means a SQLite file ``maas.db`` under ``home``;
    use ``postgresql+psycopg://user:pass@host/db`` for PostgreSQL (extra ``postgres``)."""

    artifact_root: Path | None = None
    """Folder holding model versions (one sub-folder per model and version). Empty means
    ``artifacts`` under ``home``."""

    host: str = "127.0.0.1"
    """Address the server binds to. The default is loopback only."""

    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port the server listens on."""

    log_level: str = Field(default="info", pattern="^(critical|error|warning|info|debug)$")
    """Server log level: critical, error, warning, info or debug."""

    max_archive_bytes: int = Field(default=64 * GiB, gt=0)
    """Largest total uncompressed size accepted when importing a .tar.gz or .zip archive."""

    max_archive_members: int = Field(default=100_000, gt=0)
    """Largest number of entries accepted in an imported archive."""

    max_upload_bytes: int = Field(default=64 * GiB, gt=0)
    """Largest model file accepted by the upload route of the management API."""

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if self.artifact_root is None:
            self.artifact_root = self.home / "artifacts"
        self.artifact_root = self.artifact_root.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'maas.db'}"
        return self

    @property
    def artifacts(self) -> Path:
        """The artifact root, never None after construction."""
        assert self.artifact_root is not None  # set by _derive_paths
        return self.artifact_root


def settings_table() -> str:
    """The Markdown table of every setting, for docs/configuration.md (a test keeps them equal)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "" if field.default in (None, "") else str(field.default)
        meaning = " ".join((field.description or "").split())
        rows.append(
            f"| `MAAS_{name.upper()}` | {f'`{default}`' if default else '(derived)'} | {meaning} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
