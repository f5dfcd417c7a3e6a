"""``GET /v1/models`` and ``GET /v1/models/{model}`` in the OpenAI shape.

Each model appears under its name (what a bare name resolves to), under each alias
(``name@production``) and under each version (``name:3``): all are valid ``model`` values.
Text-generation models also show ``max_model_len`` (vLLM's field): prompt plus output tokens,
and ``sampling_defaults``: what a request that leaves a sampling field out gets.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from maas.api import governance
from maas.api.access import resolve_for, usable_models
from maas.api.deps import CurrentKey, RegistryDep, SettingsDep
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.config import Settings
from maas.registry import ModelRecord, Registry, VersionRecord
from maas.registry.manifest import GENERATION_TASKS
from maas.tasks.sampling import effective_defaults

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(governance.current_key)],
    responses=error_responses("/v1", *KEYED_STATUSES),
)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "maas"
    """The owning tenant, or ``maas`` for models shared with everyone."""
    root: str
    """The concrete version this id resolves to now (``name:3``)."""
    parent: str | None = None
    task: str
    max_model_len: int | None = None
    """Prompt plus output tokens a request may have (text-generation models only)."""
    sampling_defaults: dict[str, Any] | None = None
    """The model's default sampling parameters (text-generation models only)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models")
def list_models(key: CurrentKey, registry: RegistryDep, settings: SettingsDep) -> ModelList:
    """The models this key may use."""
    cards = [
        card
        for model in usable_models(registry, key)
        for card in _cards(model, partial(_generation, registry, settings, model))
    ]
    return ModelList(data=cards)


@router.get("/models/{model}", responses=error_responses(router.prefix, 400, 403, 404))
def retrieve_model(
    model: str, key: CurrentKey, registry: RegistryDep, settings: SettingsDep
) -> ModelCard:
    record = resolve_for(registry, key, model)
    owner = registry.get_model(record.name)
    return _card(
        model,
        record,
        parent=None if model == record.name else record.name,
        owner=owner.tenant,
        generation=_generation(registry, settings, owner, record),
    )


def _cards(model: ModelRecord, generation) -> list[ModelCard]:
    if model.default is None:
        return []
    by_number = {v.version: v for v in model.versions}
    per_version = {v.version: generation(v) for v in model.versions}
    owner = model.tenant

    def card(model_id: str, record: VersionRecord, parent: str | None) -> ModelCard:
        info = per_version[record.version]
        return _card(model_id, record, parent=parent, owner=owner, generation=info)

    cards = [card(model.name, model.default, None)]
    cards += [
        card(f"{model.name}@{alias}", by_number[number], model.name)
        for alias, number in sorted(model.aliases.items())
    ]
    cards += [card(v.reference, v, model.name) for v in model.versions]
    return cards


def _card(
    model_id: str,
    record: VersionRecord,
    *,
    parent: str | None,
    owner: str | None,
    generation: tuple[int | None, dict[str, Any] | None],
) -> ModelCard:
    max_model_len, defaults = generation
    return ModelCard(
        id=model_id,
        created=int(record.created_at.timestamp()),
        owned_by=owner or "maas",
        root=record.reference,
        parent=parent,
        task=record.task,
        max_model_len=max_model_len,
        sampling_defaults=defaults,
    )


def _generation(
    registry: Registry, settings: Settings, model: ModelRecord, record: VersionRecord
) -> tuple[int | None, dict[str, Any] | None]:
    """A text-generation version's context (capped by MAAS_LLM_MAX_MODEL_LEN, as the engine
    caps it) and default sampling parameters; (None, None) for other tasks."""
    if record.task not in GENERATION_TASKS:
        return None, None
    manifest = registry.read_manifest(record)
    context = min(manifest.context_length or settings.llm_max_model_len, settings.llm_max_model_len)
    return context, effective_defaults(manifest.generation_config, model.sampling)
