"""``GET /v1/models`` and ``GET /v1/models/{model}`` in the OpenAI shape.

Each model appears under its name (what a bare name resolves to), under each alias
(``name@production``) and under each version (``name:3``): all are valid ``model`` values.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from maas.api.deps import RegistryDep
from maas.registry import ModelRecord, VersionRecord

router = APIRouter(prefix="/v1", tags=["openai"])


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "maas"
    root: str
    """The concrete version this id resolves to now (``name:3``)."""
    parent: str | None = None
    task: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/models")
def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[card for model in registry.list_models() for card in _cards(model)])


@router.get("/models/{model}")
def retrieve_model(model: str, registry: RegistryDep) -> ModelCard:
    record = registry.resolve(model)
    return _card(model, record, parent=None if model == record.name else record.name)


def _cards(model: ModelRecord) -> list[ModelCard]:
    if model.default is None:
        return []
    by_number = {v.version: v for v in model.versions}
    cards = [_card(model.name, model.default, parent=None)]
    cards += [
        _card(f"{model.name}@{alias}", by_number[number], parent=model.name)
        for alias, number in sorted(model.aliases.items())
    ]
    cards += [_card(v.reference, v, parent=model.name) for v in model.versions]
    return cards


def _card(model_id: str, record: VersionRecord, *, parent: str | None) -> ModelCard:
    return ModelCard(
        id=model_id,
        created=int(record.created_at.timestamp()),
        root=record.reference,
        parent=parent,
        task=record.task,
    )
