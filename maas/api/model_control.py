"""Triton's model repository API: ``POST /v2/repository/index``, ``.../models/{m}/load`` and
``.../unload``, so Triton clients and tools can load and unload maas models."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from maas.api import governance
from maas.api.access import check_force, resolve_managed, usable_models
from maas.api.deps import MaintainerKey
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.inference import ServingDep

router = APIRouter(
    prefix="/v2/repository",
    tags=["inference v2"],
    dependencies=[Depends(governance.maintainer_key)],
    responses=error_responses("/v2/repository", *KEYED_STATUSES, 403),
)


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str
    """READY when loaded, UNAVAILABLE otherwise (Triton's words)."""
    reason: str = ""


@router.post("/index")
def index(key: MaintainerKey, serving: ServingDep) -> list[RepositoryModel]:
    return [
        RepositoryModel(
            name=model.name,
            version=str(version.version),
            state="READY" if serving.pool.is_ready(version) else "UNAVAILABLE",
        )
        for model in usable_models(serving.registry, key)
        for version in model.versions
    ]


@router.post("/models/{model}/load", responses=error_responses(router.prefix, 400, 404))
async def load(model: str, key: MaintainerKey, serving: ServingDep) -> dict:
    await serving.pool.get(resolve_managed(serving.registry, key, model))
    return {}


@router.post("/models/{model}/unload", responses=error_responses(router.prefix, 400, 404, 409))
async def unload(model: str, key: MaintainerKey, serving: ServingDep, force: bool = False) -> dict:
    """Unload once running requests finish; a pinned model needs an admin and ``force``."""
    check_force(key, force)
    await serving.pool.unload(resolve_managed(serving.registry, key, model), force=force)
    return {}
