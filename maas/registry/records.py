"""What the registry hands out: plain records, never database rows."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from maas.registry.manifest import Manifest
from maas.registry.names import PRODUCTION


class VersionRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    task: str
    format: str
    runtime: str
    size_bytes: int
    num_files: int
    created_at: datetime
    aliases: tuple[str, ...] = ()
    path: str
    """Folder relative to the artifact root (internal; never sent to clients)."""
    manifest_sha256: str

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.version}"


class ModelRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    task: str
    description: str
    created_at: datetime
    updated_at: datetime
    versions: tuple[VersionRecord, ...]
    aliases: dict[str, int]
    """Alias name -> version number."""

    @property
    def latest(self) -> VersionRecord | None:
        return self.versions[-1] if self.versions else None

    @property
    def default(self) -> VersionRecord | None:
        """What a bare name resolves to: the production alias if set, else the latest."""
        if PRODUCTION in self.aliases:
            return next(v for v in self.versions if v.version == self.aliases[PRODUCTION])
        return self.latest


class OpenedVersion(BaseModel):
    """A version whose files were checked against its manifest, ready for a runtime."""

    record: VersionRecord
    manifest: Manifest
    folder: Path
