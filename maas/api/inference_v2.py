"""Open Inference Protocol v2 (KServe / Triton): health (liveness and readiness), server and
model metadata, and per-model readiness. Inference (``/infer``) is in ``inference_v2_infer``.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from maas import __version__
from maas.api import governance
from maas.api.access import resolve_for
from maas.api.deps import CurrentKey, ModelReadiness, ReadinessDep, RegistryDep
from maas.api.errors import KEYED_STATUSES, V2ErrorBody, error_responses
from maas.registry import Reference, Registry, VersionRecord
from maas.registry.manifest import TensorSpec
from maas.registry.names import parse_reference

log = logging.getLogger(__name__)

health_router = APIRouter(prefix="/v2/health", tags=["inference v2"])
"""Liveness and readiness: the only routes that need no key (load balancers call them)."""
router = APIRouter(
    prefix="/v2",
    tags=["inference v2"],
    dependencies=[Depends(governance.current_key)],
    responses=error_responses("/v2", *KEYED_STATUSES),
)


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool


LOOKUP = error_responses(router.prefix, 400, 403, 404)
"""A model reference in the path: malformed, not allowed to this key, or unknown."""
READY_LOOKUP = LOOKUP | {
    400: {
        "model": ModelReady | V2ErrorBody,
        "description": "The model is not ready (a ModelReady body, as the v2 protocol has it), "
        "or the reference is malformed",
    }
}


@router.get("")
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="maas", version=__version__, extensions=[])


@health_router.get("/live")
def live() -> dict[str, bool]:
    return {"live": True}


class ServerReady(BaseModel):
    ready: bool
    reason: str | None = None
    """Why not, when not ready."""


@health_router.get("/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
async def ready(request: Request) -> JSONResponse:
    """200 when the server can take traffic; 503 while pinned models load or restart, while
    draining, or when the database does not answer (orchestrators route around it)."""
    reasons = await run_in_threadpool(_not_ready_because, request.app.state)
    body = ServerReady(ready=not reasons, reason="; ".join(reasons) or None)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503 if reasons else 200)


def _not_ready_because(state) -> list[str]:
    reasons = []
    if state.drain.draining:
        reasons.append("the server is shutting down")
    try:
        state.registry.ping()
    except Exception as err:  # any failure of the database is "not ready", never a 500
        log.warning("readiness: the database does not answer: %s", err)
        reasons.append("the database does not answer")
    serving = getattr(state, "serving", None)
    loading = serving.pool.not_ready_pinned() if serving is not None else []
    if loading:
        names = ", ".join(f"{name}:{version}" for name, version in loading)
        reasons.append(f"pinned models are loading: {names}")
    return reasons


@router.get("/models/{model}", responses=LOOKUP)
def model_metadata(model: str, key: CurrentKey, registry: RegistryDep) -> ModelMetadata:
    return _metadata(registry, resolve_for(registry, key, model))


@router.get("/models/{model}/versions/{version}", responses=LOOKUP)
def version_metadata(
    model: str, version: str, key: CurrentKey, registry: RegistryDep
) -> ModelMetadata:
    return _metadata(registry, resolve_for(registry, key, versioned(model, version)))


@router.get("/models/{model}/ready", response_model=ModelReady, responses=READY_LOOKUP)
def model_ready(
    model: str, key: CurrentKey, registry: RegistryDep, readiness: ReadinessDep
) -> JSONResponse:
    return _ready(resolve_for(registry, key, model), readiness)


@router.get(
    "/models/{model}/versions/{version}/ready", response_model=ModelReady, responses=READY_LOOKUP
)
def version_ready(
    model: str, version: str, key: CurrentKey, registry: RegistryDep, readiness: ReadinessDep
) -> JSONResponse:
    return _ready(resolve_for(registry, key, versioned(model, version)), readiness)


def versioned(model: str, version: str) -> Reference:
    name = parse_reference(model).name
    return parse_reference(f"{name}:{version}")


def _metadata(registry: Registry, record: VersionRecord) -> ModelMetadata:
    manifest = registry.read_manifest(record)
    model = registry.get_model(record.name)
    return ModelMetadata(
        name=record.name,
        versions=[str(v.version) for v in model.versions],
        platform=f"{manifest.runtime}_{manifest.format}",
        inputs=manifest.inputs,
        outputs=manifest.outputs,
    )


def _ready(record: VersionRecord, readiness: ModelReadiness) -> JSONResponse:
    ready = readiness.is_ready(record)
    body = ModelReady(name=record.name, version=str(record.version), ready=ready)
    # v2: 200 means ready, a 4xx status means not ready (Triton answers 400 too).
    return JSONResponse(body.model_dump(), status_code=200 if ready else 400)
