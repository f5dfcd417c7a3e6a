"""The registry's side of encryption at rest: wrapped data keys in the database.

The master key file can change under a running process (``maas artifacts rotate-master-key``
runs in another one), so the key file is read again whenever it matters: before data keys
are stored (they must be wrapped by the active master key) and when a key does not unwrap.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from maas.artifacts.keyring import MasterKeyring, WrappedKey
from maas.db.tables import DataKey, Model, ModelVersion
from maas.errors import ArtifactCorrupted, InvalidRequest, Unavailable
from maas.registry.importer import NoProgress, Progress, SealedFile
from maas.registry.manifest import Manifest
from maas.registry.records import VersionRecord


class KeyVault:
    def __init__(self, key_file: Path | None) -> None:
        self.key_file = key_file
        self.keyring = MasterKeyring.load(key_file) if key_file is not None else None
        """Encrypts new versions' weight files when set (MAAS_ENCRYPTION_KEY_FILE)."""

    def store(self, session: Session, version_id: int, sealed: list[SealedFile]) -> None:
        """Record a new version's data keys, wrapped by the master key active *now*
        (call inside the registry's write transaction)."""
        if not sealed:
            return
        staged_with = self.keyring  # the keyring the files were sealed with
        fresh = self._reload()
        for item in sealed:
            wrapped = item.wrapped
            if wrapped.master_version != fresh.active_version:  # rotated while we staged
                holder = staged_with if wrapped.master_version in staged_with.versions else fresh
                data_key = holder.unwrap(wrapped, item.aad.encode())
                wrapped = fresh.wrap(data_key, item.aad.encode())
            session.add(
                DataKey(
                    version_id=version_id,
                    path=item.path,
                    aad=item.aad,
                    master_version=wrapped.master_version,
                    nonce=wrapped.nonce,
                    wrapped=wrapped.ciphertext,
                )
            )

    def data_keys(
        self, session: Session, record: VersionRecord, manifest: Manifest
    ) -> dict[str, tuple[bytes, bytes]]:
        """relative path -> (data key, aad) for each encrypted file of a version."""
        encrypted = {entry.path for entry in manifest.files if entry.encrypted}
        if not encrypted:
            return {}
        if self.keyring is None:
            raise Unavailable(
                f"{record.reference} is encrypted at rest; set MAAS_ENCRYPTION_KEY_FILE to "
                "the master key file to load it"
            )
        rows = session.scalars(
            select(DataKey)
            .join(ModelVersion)
            .join(Model)
            .where(Model.name == record.name, ModelVersion.version == record.version)
        ).all()
        keys = {
            row.path: (self._unwrap(_wrapped(row), row.aad.encode()), row.aad.encode())
            for row in rows
        }
        if missing := sorted(encrypted - set(keys)):
            raise ArtifactCorrupted(f"no data key recorded for {', '.join(missing)}")
        return keys

    def file_key(self, session: Session, file_id: int) -> bytes:
        """The data key of an uploaded file (``maas/files/``), unwrapped."""
        if self.keyring is None:
            raise Unavailable(
                "this file is encrypted at rest; set MAAS_ENCRYPTION_KEY_FILE to read it"
            )
        row = session.scalars(select(DataKey).where(DataKey.file_id == file_id)).first()
        if row is None:
            raise ArtifactCorrupted(f"no data key recorded for file {file_id}")
        return self._unwrap(_wrapped(row), row.aad.encode())

    def rotate(self, session: Session, progress: Progress | None = None) -> int:
        """New active master key; every data key re-wrapped; old master keys retired once no
        stored key needs them (call inside the registry's write transaction)."""
        if self.keyring is None:
            raise InvalidRequest("no master key is configured (MAAS_ENCRYPTION_KEY_FILE)")
        keyring = self._reload()
        keyring.rotate()
        rows = session.scalars(select(DataKey)).all()
        progress = progress or NoProgress()
        progress.start("Re-wrapping data keys", len(rows))
        for row in rows:
            wrapped = keyring.rewrap(_wrapped(row), row.aad.encode())
            row.master_version, row.nonce, row.wrapped = (
                wrapped.master_version,
                wrapped.nonce,
                wrapped.ciphertext,
            )
            progress.advance(1)
        session.flush()
        for version in keyring.versions:
            in_use = session.scalar(
                select(func.count()).select_from(DataKey).where(DataKey.master_version == version)
            )
            if version != keyring.active_version and not in_use:
                keyring.retire(version)
        return len(rows)

    def _reload(self) -> MasterKeyring:
        assert self.key_file is not None  # only called when a keyring exists
        self.keyring = MasterKeyring.load(self.key_file)
        return self.keyring

    def _unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        keyring = self.keyring
        assert keyring is not None  # data_keys() checked
        if wrapped.master_version not in keyring.versions:
            keyring = self._reload()  # rotated by another process since we read the file
        return keyring.unwrap(wrapped, aad)


def _wrapped(row: DataKey) -> WrappedKey:
    return WrappedKey(master_version=row.master_version, nonce=row.nonce, ciphertext=row.wrapped)
