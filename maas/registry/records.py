"""What the registry hands out: plain records, never database rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from maas.artifacts.crypto import decrypt_bytes, decrypt_to_memory_file
from maas.registry.manifest import Manifest
from maas.registry.names import PRODUCTION


class VersionRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    tenant_id: int | None
    """The model's owning tenant (None: shared)."""
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
    tenant_id: int | None
    tenant: str | None
    """Name of the owning tenant; None means shared with every tenant."""
    task: str
    description: str
    created_at: datetime
    updated_at: datetime
    versions: tuple[VersionRecord, ...]
    aliases: dict[str, int]
    """Alias name -> version number."""
    serving: dict[str, Any] = {}
    """Batching settings set for this model (they override the defaults)."""
    sampling: dict[str, Any] = {}
    """Default sampling parameters set for this model (requests override them)."""

    @property
    def latest(self) -> VersionRecord | None:
        return self.versions[-1] if self.versions else None

    @property
    def default(self) -> VersionRecord | None:
        """What a bare name resolves to: the production alias if set, else the latest."""
        if PRODUCTION in self.aliases:
            return next(v for v in self.versions if v.version == self.aliases[PRODUCTION])
        return self.latest


@dataclass(frozen=True)
class OpenedVersion:
    """A version whose files were checked against its manifest, ready for a runtime.

    Encrypted weight files are only ever decrypted into memory: ``open_file`` gives a path
    to an in-RAM copy (``/proc/self/fd/N``) for libraries that want a path.
    """

    record: VersionRecord
    manifest: Manifest
    folder: Path
    data_keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    """relative path -> (data key, aad) of each encrypted file."""

    @contextmanager
    def open_file(self, relpath: str) -> Iterator[Path]:
        """A path to the plaintext of one of the version's files, valid inside the block."""
        if relpath not in self.data_keys:
            yield self.folder / relpath
            return
        data_key, aad = self.data_keys[relpath]
        with decrypt_to_memory_file(self.folder / relpath, data_key, aad) as memory:
            yield Path(memory.path)

    def read_bytes(self, relpath: str) -> bytes:
        if relpath not in self.data_keys:
            return (self.folder / relpath).read_bytes()
        data_key, aad = self.data_keys[relpath]
        return decrypt_bytes(self.folder / relpath, data_key, aad)
