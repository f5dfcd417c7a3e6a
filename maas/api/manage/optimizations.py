"""Optimizations over HTTP: ``POST /api/v1/optimizations`` starts an ``optimize`` job (see
maas/optimize/job.py) once the recipe is read and checked against the parent version, so a
recipe that cannot run is a 400 naming its step and nothing is queued. The job is then
followed, listed and cancelled under ``/api/v1/jobs``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from maas.api import governance
from maas.api.access import resolve_for
from maas.api.deps import MaintainerKey, RegistryDep, SettingsDep
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.hardening import StrictJSONRoute
from maas.api.manage.jobs import JobPublic, JobsDep
from maas.errors import InvalidRequest, ModelNotFound
from maas.jobs.kinds import check_params

router = APIRouter(
    prefix="/api/v1",
    tags=["optimizations"],
    dependencies=[Depends(governance.maintainer_key)],
    responses=error_responses("/api/v1", *KEYED_STATUSES, 400, 403, 404, 409),
    route_class=StrictJSONRoute,
)


class OptimizationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=160)
    """The parent version: ``name``, ``name:version`` or ``name@alias``."""
    recipe: str | list[dict[str, Any]]
    """``prune 0.5 -> quantize int8-dynamic``, or the steps as objects."""
    name: str | None = Field(default=None, max_length=128)
    """The model the result becomes a version of (by default the parent's own model)."""
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    training_file: str | None = Field(default=None, min_length=1, max_length=40)
    """A dataset file (``/v1/files``) the learning steps learn from: a fine-tune after
    pruning (``fine_tune_steps``) and distillation."""
    evaluation_file: str | None = Field(default=None, min_length=1, max_length=40)
    """A dataset file on which the report measures parent's and child's accuracy."""


@router.post("/optimizations", status_code=201)
async def create_optimization(
    body: OptimizationCreate,
    request: Request,
    response: Response,
    key: MaintainerKey,
    jobs: JobsDep,
    registry: RegistryDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobPublic:
    try:
        params = check_params(request.app.state.job_kinds, "optimize", body.model_dump())
    except InvalidRequest as err:  # name the request's field, not the job's parameter
        field = (err.param or "").removeprefix("params.") or None
        raise InvalidRequest(str(err.message).removeprefix("params."), param=field) from None
    params = await run_in_threadpool(_checked, registry, settings, key, params)
    job, created = await run_in_threadpool(
        jobs.create,
        "optimize",
        key.tenant_id,
        params,
        created_by=key.key_id,
        max_attempts=settings.job_max_attempts,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = 200
    return JobPublic.of(job)


def _checked(registry, settings, key, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters with the parent fixed to one version, once the recipe, its teacher
    and its files fit it."""
    from maas.files import FileStore
    from maas.optimize.job import check_parent

    record = resolve_for(registry, key, params["model"])
    if record.tenant_id not in (None, key.tenant_id):  # an admin's view of another tenant's
        raise ModelNotFound(
            f"{record.name} belongs to another tenant; an optimization runs in its key's tenant",
            param="model",
        )
    files = FileStore.of_registry(registry, settings)
    check_parent(registry, files, registry.open_version(record.reference), params, key.tenant_id)
    return {**params, "model": record.reference}
