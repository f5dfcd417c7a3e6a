"""The registry: which models and versions exist, and what a reference points at.

Writes run in one serialised transaction each (``write_transaction``). A version folder is
renamed into place inside the transaction that inserts its row, so a version is visible
when, and only when, both exist; a crash in between leaves a folder without a row, which is
garbage and is removed by ``sweep`` at start or by the next import of that number.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from maas.artifacts.archive import ArchiveLimits
from maas.artifacts.keyring import MasterKeyring, WrappedKey
from maas.artifacts.store import ArtifactStore
from maas.config import Settings
from maas.db import make_engine, make_session_factory, upgrade, write_transaction
from maas.db.tables import Alias, DataKey, Model, ModelVersion
from maas.errors import (
    AliasNotFound,
    ArtifactCorrupted,
    Conflict,
    InvalidRequest,
    ModelNotFound,
    Unavailable,
    VersionNotFound,
)
from maas.registry.formats import choose_task
from maas.registry.importer import NoProgress, Progress, StagedVersion, stage_version
from maas.registry.manifest import TASKS, Manifest, read_manifest, verify_files, write_manifest
from maas.registry.names import (
    LATEST,
    Reference,
    parse_reference,
    validate_alias_name,
    validate_model_name,
)
from maas.registry.records import ModelRecord, OpenedVersion, VersionRecord

log = logging.getLogger(__name__)


def open_registry(settings: Settings) -> Registry:
    """Open the registry of ``settings`` (migrating the database) and sweep crash leftovers."""
    settings.home.mkdir(parents=True, exist_ok=True)
    registry = Registry.from_settings(settings)
    if removed := registry.sweep():
        log.warning("removed %d folder(s) left by interrupted imports or deletions", removed)
    return registry


class Registry:
    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        limits: ArchiveLimits,
        keyring: MasterKeyring | None = None,
    ) -> None:
        self.engine = engine
        self._sessions = make_session_factory(engine)
        self.store = store
        self.limits = limits
        self.keyring = keyring
        """Encrypts new versions' weight files when set (MAAS_ENCRYPTION_KEY_FILE)."""

    @classmethod
    def from_settings(cls, settings: Settings, *, engine: Engine | None = None) -> Registry:
        """Open the registry of ``settings``, bringing the database schema up to date."""
        engine = engine or make_engine(settings.database_url)
        upgrade(engine)
        limits = ArchiveLimits(settings.max_archive_bytes, settings.max_archive_members)
        keyring = None
        if settings.encryption_key_file is not None:
            keyring = MasterKeyring.load(settings.encryption_key_file)
        return cls(engine, ArtifactStore(settings.artifacts), limits, keyring)

    def close(self) -> None:
        self.engine.dispose()

    # ----- reading

    def list_models(self) -> list[ModelRecord]:
        with self._sessions() as session:
            rows = session.scalars(_models_query().order_by(Model.name))
            return [_model_record(row) for row in rows]

    def get_model(self, name: str) -> ModelRecord:
        with self._sessions() as session:
            return _model_record(_load_model(session, name))

    def resolve(self, reference: str | Reference) -> VersionRecord:
        """The version a reference points at: ``name``, ``name:3`` or ``name@alias``."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        model = self.get_model(ref.name)
        if ref.version is not None:
            found = next((v for v in model.versions if v.version == ref.version), None)
            if found is None:
                raise VersionNotFound(
                    f"model {ref.name!r} has no version {ref.version}", param="model"
                )
            return found
        if ref.alias is not None and ref.alias != LATEST:
            if ref.alias not in model.aliases:
                raise AliasNotFound(f"model {ref.name!r} has no alias {ref.alias!r}", param="model")
            return next(v for v in model.versions if v.version == model.aliases[ref.alias])
        found = model.latest if ref.alias == LATEST else model.default
        if found is None:
            raise VersionNotFound(f"model {ref.name!r} has no versions", param="model")
        return found

    def folder(self, record: VersionRecord) -> Path:
        return self.store.path(record.path)

    def read_manifest(self, record: VersionRecord) -> Manifest:
        """The manifest of a version, refused if it changed since import."""
        return read_manifest(self.folder(record), record.manifest_sha256)

    def open_version(
        self, reference: str | Reference, progress: Progress | None = None
    ) -> OpenedVersion:
        """Resolve, then check every file against the manifest before anyone loads it."""
        record = self.resolve(reference)
        manifest = self.read_manifest(record)
        progress = progress or NoProgress()
        progress.start(f"Verifying {record.reference}", manifest.size_bytes)
        verify_files(self.folder(record), manifest, progress.advance)
        return OpenedVersion(
            record=record,
            manifest=manifest,
            folder=self.folder(record),
            data_keys=self._data_keys(record, manifest),
        )

    def _data_keys(
        self, record: VersionRecord, manifest: Manifest
    ) -> dict[str, tuple[bytes, bytes]]:
        encrypted = {entry.path for entry in manifest.files if entry.encrypted}
        if not encrypted:
            return {}
        if self.keyring is None:
            raise Unavailable(
                f"{record.reference} is encrypted at rest; set MAAS_ENCRYPTION_KEY_FILE to "
                "the master key file to load it"
            )
        with self._sessions() as session:
            rows = session.scalars(
                select(DataKey)
                .join(ModelVersion)
                .join(Model)
                .where(Model.name == record.name, ModelVersion.version == record.version)
            ).all()
        keys = {
            row.path: (self.keyring.unwrap(_wrapped(row), row.aad.encode()), row.aad.encode())
            for row in rows
        }
        if missing := sorted(encrypted - set(keys)):
            raise ArtifactCorrupted(f"no data key recorded for {', '.join(missing)}")
        return keys

    # ----- writing

    def import_model(
        self,
        source: Path,
        name: str,
        *,
        task: str | None = None,
        alias: str | None = None,
        description: str | None = None,
        progress: Progress | None = None,
        consume: bool = False,
        source_label: str | None = None,
        tenant_id: int | None = None,
    ) -> VersionRecord:
        """Import the files at ``source`` as the next version of model ``name``.

        Atomic: on any error nothing is visible and the staging folder is removed.
        ``tenant_id`` owns a new model (None: shared); an existing model keeps its owner, and
        importing into another tenant's model is refused.
        """
        validate_model_name(name)
        if alias is not None:
            validate_alias_name(alias)
        if task is not None and task not in TASKS:
            raise InvalidRequest(
                f"unknown task {task!r}; use one of: {', '.join(TASKS)}", param="task"
            )
        existing_task = self._existing_task(name)
        if task is not None and existing_task is not None and task != existing_task:
            raise Conflict(
                f"model {name!r} serves task {existing_task!r}, not {task!r}", param="task"
            )
        with self.store.stage() as staging:
            staged = stage_version(
                Path(source),
                staging.path,
                self.limits,
                progress or NoProgress(),
                consume=consume,
                keyring=self.keyring,
            )
            task = choose_task(staged.info, task or existing_task)
            source_label = source_label or str(source)
            return self._commit(staged, name, task, alias, description, source_label, tenant_id)

    def _commit(
        self,
        staged: StagedVersion,
        name: str,
        task: str,
        alias: str | None,
        description: str | None,
        source: str,
        tenant_id: int | None,
    ) -> VersionRecord:
        with write_transaction(self._sessions) as session:
            model = session.scalar(select(Model).where(Model.name == name))
            if model is None:
                model = Model(
                    name=name,
                    task=task,
                    description=description or "",
                    next_version=1,
                    tenant_id=tenant_id,
                )
                session.add(model)
                session.flush()
            elif model.tenant_id != tenant_id:
                raise Conflict(f"the model name {name!r} is not available", param="name")
            elif model.task != task:
                raise Conflict(f"model {name!r} serves task {model.task!r}, not {task!r}")
            elif description is not None:
                model.description = description
            number = model.next_version
            model.next_version = number + 1
            manifest = _manifest(staged, name, number, task, description, source)
            manifest_sha256 = write_manifest(staged.folder, manifest)
            relpath = self.store.relpath(name, number)
            self.store.discard(relpath)  # a crash's leftover: no row can hold this number
            self.store.publish(staged.folder, relpath)
            # Undo the rename while we still hold the lock. If the commit itself fails
            # later, the folder stays as a row-less orphan for sweep() or the next import.
            try:
                row = ModelVersion(
                    model=model,
                    version=number,
                    format=manifest.format,
                    runtime=manifest.runtime,
                    path=relpath,
                    size_bytes=manifest.size_bytes,
                    num_files=len(manifest.files),
                    manifest_sha256=manifest_sha256,
                    created_at=manifest.created_at,
                )
                session.add(row)
                session.flush()
                for sealed in staged.sealed:
                    session.add(
                        DataKey(
                            version_id=row.id,
                            path=sealed.path,
                            aad=sealed.aad,
                            master_version=sealed.wrapped.master_version,
                            nonce=sealed.wrapped.nonce,
                            wrapped=sealed.wrapped.ciphertext,
                        )
                    )
                if alias is not None:
                    _point_alias(session, model, alias, row)
            except BaseException:
                self.store.discard(relpath)
                raise
        return self.resolve(Reference(name, version=number))

    def set_alias(self, name: str, alias: str, version: int) -> VersionRecord:
        """Point ``alias`` at ``version`` of model ``name`` (creating or moving it)."""
        validate_alias_name(alias)
        with write_transaction(self._sessions) as session:
            model = _load_model(session, name)
            row = next((v for v in model.versions if v.version == version), None)
            if row is None:
                raise VersionNotFound(f"model {name!r} has no version {version}", param="version")
            _point_alias(session, model, alias, row)
        return self.resolve(Reference(name, version=version))

    def delete_alias(self, name: str, alias: str) -> None:
        with write_transaction(self._sessions) as session:
            model = _load_model(session, name)
            row = next((a for a in model.aliases if a.name == alias), None)
            if row is None:
                raise AliasNotFound(f"model {name!r} has no alias {alias!r}", param="alias")
            session.delete(row)

    def delete_version(self, name: str, version: int, *, force: bool = False) -> None:
        """Remove one version; refused while aliases point at it unless ``force``."""
        with write_transaction(self._sessions) as session:
            model = _load_model(session, name)
            row = next((v for v in model.versions if v.version == version), None)
            if row is None:
                raise VersionNotFound(f"model {name!r} has no version {version}", param="version")
            pointing = [a.name for a in model.aliases if a.version_id == row.id]
            if pointing and not force:
                raise Conflict(
                    f"{name}:{version} is the target of alias {', '.join(pointing)}; move the "
                    "alias first or remove with force"
                )
            session.delete(row)
            session.flush()
            # Removed under the lock: numbers are never reused, but see delete_model.
            self.store.discard(row.path)

    def delete_model(self, name: str) -> None:
        """Remove a model with all its versions and aliases."""
        with write_transaction(self._sessions) as session:
            model = _load_model(session, name)
            session.delete(model)
            session.flush()
            # Under the lock, because a new model of the same name starts again at
            # version 1 and must not lose its folder to this removal.
            self.store.discard(name)

    def rotate_master_key(self, progress: Progress | None = None) -> int:
        """Make a new master key active, re-wrap every data key with it, retire the old ones.

        Returns how many data keys were re-wrapped. The file bytes do not change, so this is
        quick; afterwards the old master key alone unwraps nothing that is stored.
        """
        if self.keyring is None:
            raise InvalidRequest("no master key is configured (MAAS_ENCRYPTION_KEY_FILE)")
        old_versions = [v for v in self.keyring.versions if v != self.keyring.active_version]
        old_versions.append(self.keyring.active_version)
        self.keyring.rotate()
        with write_transaction(self._sessions) as session:
            rows = session.scalars(select(DataKey)).all()
            progress = progress or NoProgress()
            progress.start("Re-wrapping data keys", len(rows))
            for row in rows:
                wrapped = self.keyring.rewrap(_wrapped(row), row.aad.encode())
                row.master_version, row.nonce, row.wrapped = (
                    wrapped.master_version,
                    wrapped.nonce,
                    wrapped.ciphertext,
                )
                progress.advance(1)
        for version in old_versions:
            self.keyring.retire(version)
        return len(rows)

    def sweep(self) -> int:
        """Remove what crashed imports and deletions left behind; returns how many folders."""
        removed = self.store.sweep_staging()
        with write_transaction(self._sessions) as session:
            known = set(session.execute(select(ModelVersion.path)).scalars())
            names = set(session.execute(select(Model.name)).scalars())
            for name, version, _ in list(self.store.version_folders()):
                relpath = self.store.relpath(name, version)
                if relpath not in known:
                    self.store.discard(relpath)
                    removed += 1
            for entry in self.store.root.iterdir():
                unknown = not entry.name.startswith(".") and entry.name not in names
                if unknown and entry.is_dir() and not any(entry.iterdir()):
                    entry.rmdir()
        return removed

    def _existing_task(self, name: str) -> str | None:
        with self._sessions() as session:
            return session.scalar(select(Model.task).where(Model.name == name))


def _wrapped(row: DataKey) -> WrappedKey:
    return WrappedKey(master_version=row.master_version, nonce=row.nonce, ciphertext=row.wrapped)


def _models_query():
    return select(Model).options(
        selectinload(Model.versions),
        selectinload(Model.aliases).selectinload(Alias.target),
        selectinload(Model.tenant),
    )


def _load_model(session: Session, name: str) -> Model:
    model = session.scalar(_models_query().where(Model.name == name))
    if model is None:
        raise ModelNotFound(f"model {name!r} not found", param="model")
    return model


def _point_alias(session: Session, model: Model, alias: str, row: ModelVersion) -> None:
    existing = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == alias))
    if existing is None:
        session.add(Alias(model_id=model.id, name=alias, version_id=row.id))
    else:
        existing.version_id = row.id
    session.flush()


def _manifest(
    staged: StagedVersion, name: str, number: int, task: str, description: str | None, source: str
) -> Manifest:
    info = staged.info
    return Manifest(
        name=name,
        version=number,
        id=staged.id,
        task=task,
        runtime=info.runtime,
        format=info.format,
        description=description or "",
        architecture=info.architecture,
        config=info.config,
        inputs=info.inputs,
        outputs=info.outputs,
        labels=info.labels,
        tokenizer=info.tokenizer,
        chat_template=info.chat_template,
        context_length=info.context_length,
        generation_config=info.generation_config,
        task_options=info.task_options,
        source=source,
        created_at=datetime.now(UTC),
        files=staged.files,
    )


def _model_record(row: Model) -> ModelRecord:
    aliases = {a.name: a.target.version for a in row.aliases}
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(number, []).append(alias)
    versions = tuple(
        VersionRecord(
            name=row.name,
            version=v.version,
            tenant_id=row.tenant_id,
            task=row.task,
            format=v.format,
            runtime=v.runtime,
            size_bytes=v.size_bytes,
            num_files=v.num_files,
            created_at=v.created_at,
            aliases=tuple(sorted(by_version.get(v.version, []))),
            path=v.path,
            manifest_sha256=v.manifest_sha256,
        )
        for v in row.versions
    )
    return ModelRecord(
        name=row.name,
        tenant_id=row.tenant_id,
        tenant=row.tenant.name if row.tenant else None,
        task=row.task,
        description=row.description,
        created_at=row.created_at,
        updated_at=row.updated_at,
        versions=versions,
        aliases=aliases,
    )
