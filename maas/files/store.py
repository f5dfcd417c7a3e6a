"""Uploaded files: checked by purpose, kept in the artifact store under ``.files/`` (sealed
with a data key of their own when a master key is set), one row each, per tenant.

A file appears whole or not at all: it is written beside its final place and renamed there
inside the transaction that adds its row; a failed upload leaves nothing.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from maas.artifacts import crypto
from maas.artifacts.archive import ArchiveLimits
from maas.artifacts.keyring import WrappedKey
from maas.artifacts.store import fsync_dir
from maas.db import make_session_factory, write_transaction
from maas.db.tables import DataKey, StoredFile, Tenant
from maas.errors import InvalidRequest, NotFound
from maas.files.validation import check_upload_name, validate
from maas.registry.at_rest import KeyVault

CHUNK = 1024 * 1024
MAX_LIST = 10_001


class FileNotFound(NotFound):
    pass


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    sha256: str
    encrypted: bool
    details: dict[str, Any] | None
    created_at: datetime


class FileStore:
    def __init__(
        self,
        engine: Engine,
        root: Path,
        vault: KeyVault,
        limits: ArchiveLimits,
        *,
        max_chat_chars: int,
    ) -> None:
        self._sessions = make_session_factory(engine)
        self.root = root / ".files"
        self.vault = vault
        self.limits = limits
        self.max_chat_chars = max_chat_chars

    @classmethod
    def of_registry(cls, registry, settings) -> FileStore:
        """The files beside ``registry``'s artifacts: its database, key vault and archive
        limits, and ``settings``' chat size limit."""
        return cls(
            registry.engine,
            settings.artifacts,
            registry.vault,
            registry.limits,
            max_chat_chars=settings.fine_tune_max_chat_chars,
        )

    def create(
        self,
        tenant_id: int,
        purpose: str,
        filename: str | None,
        upload: Path,
        *,
        created_by: str | None,
    ) -> FileRecord:
        """Check ``upload`` (a temporary file, consumed whatever happens) and keep it;
        InvalidRequest lists what is wrong with it."""
        try:
            filename = check_upload_name(filename)
            details = validate(
                purpose, filename, upload, max_chat_chars=self.max_chat_chars, limits=self.limits
            )
            described = StoredFile(
                tenant_id=tenant_id,
                created_by=created_by,
                purpose=purpose,
                filename=filename,
                details=details,
            )
            return self._keep(upload, described)
        finally:
            upload.unlink(missing_ok=True)

    def _keep(self, upload: Path, row: StoredFile) -> FileRecord:
        """``upload`` written under a new id and ``row`` committed, or neither."""
        public_id = f"file-{secrets.token_hex(12)}"
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / public_id
        partial = self.root / f".{public_id}.partial"
        aad = f"file/{public_id}"
        row.public_id, row.relpath = public_id, f".files/{public_id}"
        row.bytes, row.sha256 = upload.stat().st_size, _sha256(upload)
        kept = False
        try:
            wrapped = self._write(upload, partial, aad)
            row.encrypted = wrapped is not None
            with write_transaction(self._sessions) as session:
                session.add(row)
                session.flush()
                if wrapped is not None:
                    session.add(
                        DataKey(
                            file_id=row.id,
                            path=public_id,
                            aad=aad,
                            master_version=wrapped.master_version,
                            nonce=wrapped.nonce,
                            wrapped=wrapped.ciphertext,
                        )
                    )
                os.replace(partial, final)
                fsync_dir(self.root)
                record = self._record(session, row)
            kept = True
        except BaseException:
            partial.unlink(missing_ok=True)
            if not kept:  # renamed, but the row was not committed
                final.unlink(missing_ok=True)
            raise
        return record

    def _write(self, upload: Path, target: Path, aad: str) -> WrappedKey | None:
        """``upload`` copied to ``target`` and synced: sealed with a fresh data key when a
        master key is set (its wrapped key returned), as it is otherwise."""
        keyring = self.vault.keyring
        wrapped = None
        if keyring is not None:
            data_key = crypto.new_data_key()
            crypto.encrypt_file(upload, target, data_key, aad.encode())
            wrapped = keyring.wrap(data_key, aad.encode())
        else:
            shutil.copyfile(upload, target)
        with open(target, "rb") as written:
            os.fsync(written.fileno())
        return wrapped

    def get(self, file_id: str, tenant_id: int | None) -> FileRecord:
        with self._sessions() as session:
            return self._record(session, self._row(session, file_id, tenant_id))

    def list(
        self,
        tenant_id: int | None,
        *,
        purpose: str | None = None,
        limit: int = 10_000,
        after: str | None = None,
        newest_first: bool = True,
    ) -> list[FileRecord]:
        if not 1 <= limit <= MAX_LIST:
            raise InvalidRequest(f"limit must be 1 to {MAX_LIST - 1}", param="limit")
        with self._sessions() as session:
            order = StoredFile.id.desc() if newest_first else StoredFile.id
            query = select(StoredFile).order_by(order).limit(limit)
            if tenant_id is not None:
                query = query.where(StoredFile.tenant_id == tenant_id)
            if purpose is not None:
                query = query.where(StoredFile.purpose == purpose)
            if after is not None:
                mark = self._row(session, after, tenant_id).id
                query = query.where(StoredFile.id < mark if newest_first else StoredFile.id > mark)
            return [self._record(session, row) for row in session.scalars(query)]

    def content(self, file_id: str, tenant_id: int | None) -> Iterator[bytes]:
        """The file's bytes, decrypted, a chunk at a time (checked as they are read)."""
        with self._sessions() as session:
            row = self._row(session, file_id, tenant_id)
            key = self.vault.file_key(session, row.id) if row.encrypted else None
            path, aad = self.root / row.public_id, f"file/{row.public_id}".encode()
        if key is not None:
            yield from crypto.decrypt_file(path, key, aad)
            return
        with open(path, "rb") as source:
            while chunk := source.read(CHUNK):
                yield chunk

    def copy_to(self, file_id: str, tenant_id: int | None, target: Path) -> Path:
        """The file's bytes, decrypted, written to ``target`` (for a job that reads it)."""
        with open(target, "wb") as out:
            for chunk in self.content(file_id, tenant_id):
                out.write(chunk)
        return target

    def delete(self, file_id: str, tenant_id: int | None) -> None:
        with write_transaction(self._sessions) as session:
            row = self._row(session, file_id, tenant_id)
            session.delete(row)  # its data key goes with it (ON DELETE CASCADE)
        # after the commit: a crash in between leaves an unlisted file, never a listed one
        # without its bytes
        (self.root / row.public_id).unlink(missing_ok=True)

    @staticmethod
    def _row(session, file_id: str, tenant_id: int | None) -> StoredFile:
        query = select(StoredFile).where(StoredFile.public_id == file_id)
        if tenant_id is not None:
            query = query.where(StoredFile.tenant_id == tenant_id)
        row = session.scalars(query).first()
        if row is None:
            raise FileNotFound(f"no file {file_id!r}", param="file_id")
        return row

    @staticmethod
    def _record(session, row: StoredFile) -> FileRecord:
        tenant = session.get(Tenant, row.tenant_id)
        return FileRecord(
            id=row.public_id,
            tenant=tenant.name if tenant else "",
            purpose=row.purpose,
            filename=row.filename,
            bytes=row.bytes,
            sha256=row.sha256,
            encrypted=row.encrypted,
            details=row.details,
            created_at=row.created_at,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
