"""The registry: which models and versions exist, and what a reference points at.

Writes run in one serialised transaction each (``write_transaction``). A version folder is
renamed into place inside the transaction that inserts its row, so a version is visible
when, and only when, both exist. A folder without a row (a crash between the rename and the
commit) is moved to ``.orphans`` by ``sweep`` at start, never deleted: with the wrong
database it could be someone's model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from maas.artifacts.archive import ArchiveLimits
from maas.artifacts.store import ArtifactStore
from maas.config import Settings
from maas.db import make_engine, make_session_factory, upgrade, write_transaction
from maas.db.tables import Model, ModelVersion
from maas.errors import (
    AliasNotFound,
    Conflict,
    InvalidName,
    InvalidRequest,
    ModelNotFound,
    VersionNotFound,
)
from maas.registry import rows
from maas.registry.at_rest import KeyVault
from maas.registry.formats import choose_task
from maas.registry.importer import NoProgress, Progress, StagedVersion, stage_version
from maas.registry.manifest import TASKS, Manifest, read_manifest, verify_files, write_manifest
from maas.registry.names import (
    LATEST,
    Reference,
    is_fine_tuned_name,
    parse_reference,
    validate_alias_name,
    validate_model_name,
)
from maas.registry.records import ModelRecord, OpenedVersion, VersionRecord

log = logging.getLogger(__name__)

CACHE_SECONDS = 2.0


class _Owner(Enum):
    ANY = "any"


ANY_OWNER = _Owner.ANY
"""For writes: do not check who owns the model. For imports: a new model is shared and an
existing model keeps its owner."""
Owner = int | None | _Owner


def open_registry(settings: Settings) -> Registry:
    """Open the registry of ``settings`` (migrating the database) and sweep crash leftovers."""
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.home.stat().st_mode & 0o077:
        log.warning("%s was readable by others; it is now 0700", settings.home)
        settings.home.chmod(0o700)
    registry = Registry.from_settings(settings)
    registry.sweep()
    return registry


class Registry:
    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        limits: ArchiveLimits,
        vault: KeyVault | None = None,
    ) -> None:
        self.engine = engine
        self._sessions = make_session_factory(engine)
        self.store = store
        self.limits = limits
        self.vault = vault or KeyVault(None)
        self._models: dict[str, tuple[float, ModelRecord]] = {}
        """A short cache of model records: serving resolves a reference per request."""
        self._writes = 0
        """Writes finished by this process: a read that began before one is not cached."""
        self._cache_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, engine: Engine | None = None) -> Registry:
        """Open the registry of ``settings``, bringing the database schema up to date."""
        engine = engine or make_engine(settings.database_url)
        upgrade(engine)
        limits = ArchiveLimits(
            settings.max_archive_bytes, settings.max_archive_members, settings.max_archive_ratio
        )
        vault = KeyVault(settings.encryption_key_file)
        return cls(engine, ArtifactStore(settings.artifacts), limits, vault)

    @property
    def keyring(self):
        return self.vault.keyring

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise if the database does not answer."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    # ----- reading

    def list_models(self) -> list[ModelRecord]:
        with self._sessions() as session:
            return [
                rows.model_record(r)
                for r in session.scalars(rows.models_query().order_by(Model.name))
            ]

    def get_model(self, name: str) -> ModelRecord:
        """A model with its versions and aliases. Read through a cache of CACHE_SECONDS:
        this process's own writes clear it, another process's show within that time."""
        cached = self._models.get(name)
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        writes = self._writes
        with self._sessions() as session:
            record = rows.model_record(rows.load_model(session, name))
        with self._cache_lock:  # a write that finished meanwhile may be missing from record
            if writes == self._writes:
                self._models[name] = (time.monotonic(), record)
        return record

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A serialised write transaction; the record cache is cleared after it."""
        try:
            with write_transaction(self._sessions) as session:
                yield session
        finally:
            with self._cache_lock:
                self._writes += 1
                self._models.clear()

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
        with self._sessions() as session:
            data_keys = self.vault.data_keys(session, record, manifest)
        return OpenedVersion(record, manifest, self.folder(record), data_keys)

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
        owner: Owner = ANY_OWNER,
        sampling: dict | None = None,
        before_commit: Callable[[Session, int], None] | None = None,
        made: rows.Made | None = None,
        fine_tuned: bool = False,
    ) -> VersionRecord:
        """Import the files at ``source`` as the next version of model ``name``.

        Atomic: on any error nothing is visible and the staging folder is removed. ``owner``
        is the tenant id a new model belongs to (None: shared) and must be the owner of an
        existing model; ``ANY_OWNER`` makes a new model shared and keeps an existing one's.
        ``sampling`` (validated by the caller) sets some of the model's default sampling
        parameters in the same transaction. ``before_commit(session, version)`` runs inside the
        import's transaction, after the version's row is written: if it raises, nothing is
        imported (a job records its success there, so its model is registered exactly once).
        Only a fine-tuning job (``fine_tuned``) may use an ``ft:`` name.
        """
        validate_model_name(name)
        if is_fine_tuned_name(name) != fine_tuned:
            raise InvalidName(
                f"names of the form ft:<base>:<suffix>:<id> are given by fine-tuning jobs; "
                f"{name!r} cannot be imported"
                if not fine_tuned
                else f"{name!r} is not an ft: name",
                param="name",
            )
        if alias is not None:
            validate_alias_name(alias)
        if task is not None and task not in TASKS:
            raise InvalidRequest(
                f"unknown task {task!r}; use one of: {', '.join(TASKS)}", param="task"
            )
        existing_task = self._check_importable(name, task, owner)
        with self.store.stage() as staging:
            staged = stage_version(
                Path(source),
                staging.path,
                self.limits,
                progress or NoProgress(),
                consume=consume,
                keyring=self.vault.keyring,
            )
            task = choose_task(staged.info, task or existing_task)
            number = self._commit(
                staged,
                name,
                task,
                alias,
                description,
                source_label or str(source),
                owner,
                sampling,
                before_commit,
                made,
            )
        return self.resolve(Reference(name, version=number))

    def _check_importable(self, name: str, task: str | None, owner: Owner) -> str | None:
        """Refuse before anything is copied; returns the existing model's task."""
        with self._sessions() as session:
            found = session.execute(
                select(Model.task, Model.tenant_id).where(Model.name == name)
            ).first()
        if found is None:
            return None
        if owner is not ANY_OWNER and found.tenant_id != owner:
            raise Conflict(f"the model name {name!r} is not available", param="name")
        if task is not None and task != found.task:
            raise Conflict(f"model {name!r} serves task {found.task!r}, not {task!r}", param="task")
        return found.task

    def _commit(
        self,
        staged: StagedVersion,
        name: str,
        task: str,
        alias: str | None,
        description: str | None,
        source: str,
        owner: Owner,
        sampling: dict | None = None,
        before_commit: Callable[[Session, int], None] | None = None,
        made: rows.Made | None = None,
    ) -> int:
        with self._write() as session:
            model = self._model_for_import(session, name, task, description, owner)
            if sampling:
                model.sampling = {**(model.sampling or {}), **sampling}
            number = model.next_version
            model.next_version = number + 1
            manifest = rows.build_manifest(staged, name, number, task, description, source, made)
            manifest_sha256 = write_manifest(staged.folder, manifest)
            relpath = self.store.relpath(name, number)
            self.store.quarantine(relpath)  # a crash's leftover: no row can hold this number
            self.store.publish(staged.folder, relpath)
            # Undo the rename while we still hold the lock. If the commit itself fails
            # later, the folder stays as a row-less orphan for sweep() to set aside.
            try:
                row = rows.version_row(manifest, model, relpath, manifest_sha256)
                session.add(row)
                session.flush()
                self.vault.store(session, row.id, staged.sealed)
                if alias is not None:
                    rows.point_alias(session, model, alias, row)
                if before_commit is not None:
                    before_commit(session, number)
            except BaseException:
                self.store.discard(relpath)  # ours, published a moment ago
                raise
        return number

    @staticmethod
    def _model_for_import(
        session, name: str, task: str, description: str | None, owner: Owner
    ) -> Model:
        model = session.scalar(select(Model).where(Model.name == name))
        if model is None:
            model = Model(
                name=name,
                task=task,
                description=description or "",
                next_version=1,
                tenant_id=None if owner is ANY_OWNER else owner,
            )
            session.add(model)
            session.flush()
        elif owner is not ANY_OWNER and model.tenant_id != owner:
            raise Conflict(f"the model name {name!r} is not available", param="name")
        elif model.task != task:
            raise Conflict(f"model {name!r} serves task {model.task!r}, not {task!r}")
        elif description is not None:
            model.description = description
        return model

    def set_alias(
        self, name: str, alias: str, version: int, *, owner: Owner = ANY_OWNER
    ) -> VersionRecord:
        """Point ``alias`` at ``version`` of model ``name`` (creating or moving it)."""
        validate_alias_name(alias)
        with self._write() as session:
            model = _owned(session, name, owner)
            row = next((v for v in model.versions if v.version == version), None)
            if row is None:
                raise VersionNotFound(f"model {name!r} has no version {version}", param="version")
            rows.point_alias(session, model, alias, row)
        return self.resolve(Reference(name, version=version))

    def set_serving(self, name: str, serving: dict, *, owner: Owner = ANY_OWNER) -> ModelRecord:
        """Store a model's batching settings (validated by the caller)."""
        with self._write() as session:
            model = _owned(session, name, owner)
            model.serving = serving or None
        return self.get_model(name)

    def set_sampling(self, name: str, sampling: dict, *, owner: Owner = ANY_OWNER) -> ModelRecord:
        """Store a model's default sampling parameters (validated by the caller)."""
        with self._write() as session:
            model = _owned(session, name, owner)
            model.sampling = sampling or None
        return self.get_model(name)

    def delete_alias(self, name: str, alias: str, *, owner: Owner = ANY_OWNER) -> None:
        with self._write() as session:
            model = _owned(session, name, owner)
            row = next((a for a in model.aliases if a.name == alias), None)
            if row is None:
                raise AliasNotFound(f"model {name!r} has no alias {alias!r}", param="alias")
            session.delete(row)

    def delete_version(
        self, name: str, version: int, *, force: bool = False, owner: Owner = ANY_OWNER
    ) -> None:
        """Remove one version; refused while aliases point at it unless ``force``."""

        def delete(session) -> str:
            model = _owned(session, name, owner)
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
            return row.path

        self._delete_with_folder(delete)

    def delete_model(self, name: str, *, owner: Owner = ANY_OWNER) -> None:
        """Remove a model with all its versions and aliases."""

        def delete(session) -> str:
            session.delete(_owned(session, name, owner))
            return name

        self._delete_with_folder(delete)

    def _delete_with_folder(self, delete) -> None:
        """Delete rows and move their folder out of sight in one locked transaction; the
        folder is removed after the commit, or put back if the transaction fails."""
        with self.store.stage() as trash:
            moved = relpath = None
            try:
                with self._write() as session:
                    relpath = delete(session)
                    session.flush()
                    moved = self.store.move_out(relpath, trash)
            except BaseException:
                if moved is not None:
                    self.store.move_back(moved, relpath)
                raise

    def rotate_master_key(self, progress: Progress | None = None) -> int:
        """Make a new master key active, re-wrap every data key with it, retire the old ones.

        Returns how many data keys were re-wrapped. The file bytes do not change, so this is
        quick; afterwards the old master key alone unwraps nothing that is stored.
        """
        with self._write() as session:
            return self.vault.rotate(session, progress)

    def sweep(self) -> int:
        """Clear what crashed imports left: staging folders are removed, version folders the
        database does not know are moved to ``.orphans``. Returns how many were handled."""
        handled = self.store.sweep_staging()
        with self._write() as session:
            known = set(session.scalars(select(ModelVersion.path)))
            orphans = [
                self.store.relpath(name, version)
                for name, version, _ in self.store.version_folders()
                if self.store.relpath(name, version) not in known
            ]
            if (
                orphans
                and not known
                and session.scalar(select(func.count()).select_from(Model)) == 0
            ):
                log.warning(
                    "the artifact root holds %d versions but the database none: is "
                    "MAAS_DATABASE_URL the right database? Leaving them where they are.",
                    len(orphans),
                )
                return handled
            for relpath in orphans:
                log.warning("version folder %s is not in the database; moved to .orphans", relpath)
                self.store.quarantine(relpath)
        return handled + len(orphans)


def _owned(session, name: str, owner: Owner) -> Model:
    model = rows.load_model(session, name)
    if owner is not ANY_OWNER and model.tenant_id != owner:
        raise ModelNotFound(f"model {name!r} not found", param="model")
    return model
