"""``GET /v1/models`` and ``GET /v1/models/{model}`` in the OpenAI shape.

Each model appears under its name (what a bare name resolves to), under each alias
(``name@production``) and under each version (``name:3``): all are valid ``model`` values.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from maas.api import governance
from maas.api.access import resolve_for, usable_models
from maas.api.deps import CurrentKey, RegistryDep
from maas.registry import ModelRecord, VersionRecord

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(governance.current_key)])


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models")
def list_models(key: CurrentKey, registry: RegistryDep) -> ModelList:
    """The models this key may use."""
    cards = [card for model in usable_models(registry, key) for card in _cards(model)]
    return ModelList(data=cards)


@router.get("/models/{model}")
def retrieve_model(model: str, key: CurrentKey, registry: RegistryDep) -> ModelCard:
    record = resolve_for(registry, key, model)
    owner = registry.get_model(record.name).tenant
    return _card(model, record, parent=None if model == record.name else record.name, owner=owner)


def _cards(model: ModelRecord) -> list[ModelCard]:
    if model.default is None:
        return []
    by_number = {v.version: v for v in model.versions}
    owner = model.tenant
    cards = [_card(model.name, model.default, parent=None, owner=owner)]
    cards += [
        _card(f"{model.name}@{alias}", by_number[number], parent=model.name, owner=owner)
        for alias, number in sorted(model.aliases.items())
    ]
    cards += [_card(v.reference, v, parent=model.name, owner=owner) for v in model.versions]
    return cards


def _card(
    model_id: str, record: VersionRecord, *, parent: str | None, owner: str | None
) -> ModelCard:
    return ModelCard(
        id=model_id,
        created=int(record.created_at.timestamp()),
        owned_by=owner or "maas",
        root=record.reference,
        parent=parent,
        task=record.task,
    )
