"""Database rows <-> registry records, and the queries the registry repeats."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, selectinload

from maas.db.tables import Alias, Model, ModelVersion
from maas.errors import ModelNotFound
from maas.registry.importer import StagedVersion
from maas.registry.manifest import Manifest, ParentRef
from maas.registry.records import ModelRecord, VersionRecord


def models_query() -> Select:
    return select(Model).options(
        selectinload(Model.versions),
        selectinload(Model.aliases).selectinload(Alias.target),
        selectinload(Model.tenant),
    )


def load_model(session: Session, name: str) -> Model:
    model = session.scalar(models_query().where(Model.name == name))
    if model is None:
        raise ModelNotFound(f"model {name!r} not found", param="model")
    return model


def point_alias(session: Session, model: Model, alias: str, row: ModelVersion) -> None:
    existing = session.scalar(select(Alias).where(Alias.model_id == model.id, Alias.name == alias))
    if existing is None:
        session.add(Alias(model_id=model.id, name=alias, version_id=row.id))
    else:
        existing.version_id = row.id
    session.flush()


def version_row(
    manifest: Manifest, model: Model, relpath: str, manifest_sha256: str
) -> ModelVersion:
    return ModelVersion(
        model=model,
        version=manifest.version,
        format=manifest.format,
        runtime=manifest.runtime,
        path=relpath,
        size_bytes=manifest.size_bytes,
        num_files=len(manifest.files),
        manifest_sha256=manifest_sha256,
        created_at=manifest.created_at,
    )


def build_manifest(
    staged: StagedVersion,
    name: str,
    number: int,
    task: str,
    description: str | None,
    source: str,
    made: Made | None = None,
) -> Manifest:
    info = staged.info
    return Manifest(
        id=staged.id,
        name=name,
        version=number,
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
        metrics=made.metrics if made else {},
        recipe=made.recipe if made else None,
        parent=ParentRef(name=made.parent[0], version=made.parent[1])
        if made and made.parent
        else None,
        files=staged.files,
    )


@dataclass(frozen=True)
class Made:
    """What a version made by maas (a training job) records about itself."""

    metrics: dict[str, float]
    recipe: dict[str, Any]
    parent: tuple[str, int] | None = None
    """The version it was made from (a fine-tuned model's base)."""


def model_record(row: Model) -> ModelRecord:
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
        serving=row.serving or {},
        sampling=row.sampling or {},
    )
