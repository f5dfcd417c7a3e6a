"""Jobs over HTTP: start one, list, show, follow its events, cancel.

Only ``admin`` and ``maintainer`` keys start and see jobs; a job belongs to its key's tenant,
and another tenant's job is a 404 (admins see every tenant's). ``Idempotency-Key`` on create
returns the job that key made (200 instead of 201); the same key for another request is 409.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from maas.api import governance
from maas.api.deps import MaintainerKey, SettingsDep
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.hardening import StrictJSONRoute
from maas.auth.principal import Principal
from maas.errors import InvalidRequest, NotFound
from maas.jobs import EventRecord, JobRecord, JobStatus, JobStore
from maas.jobs.kinds import check_params

router = APIRouter(
    prefix="/api/v1",
    tags=["jobs"],
    dependencies=[Depends(governance.maintainer_key)],
    responses=error_responses("/api/v1", *KEYED_STATUSES, 400, 403, 404, 409),
    route_class=StrictJSONRoute,
)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=32)
    params: dict[str, Any] = Field(default_factory=dict)


class JobPublic(BaseModel):
    object: str = "job"
    id: str
    kind: str
    tenant: str
    created_by: str | None
    status: JobStatus
    progress: float
    stage: str | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    params: dict[str, Any]
    checkpoint: dict[str, Any] | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: JobRecord) -> JobPublic:
        data = job.to_dict()
        for internal in ("lease_owner", "lease_expires_at", "tenant_id"):
            data.pop(internal)
        if data["error"]:
            data["error"] = {k: v for k, v in data["error"].items() if k != "trace"}
        return cls(**data)


class JobsPublic(BaseModel):
    object: str = "list"
    data: list[JobPublic]
    has_more: bool


class EventPublic(BaseModel):
    object: str = "job.event"
    id: int
    at: datetime
    attempt: int
    level: str
    message: str
    step: int | None
    metrics: dict[str, float] | None

    @classmethod
    def of(cls, event: EventRecord) -> EventPublic:
        data = event.to_dict()
        data.pop("job")
        return cls(**data)


class EventsPublic(BaseModel):
    object: str = "list"
    data: list[EventPublic]
    has_more: bool


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


JobsDep = Annotated[JobStore, Depends(get_jobs)]


def _check_file(files, file_id: str, key: Principal, name: str) -> None:
    try:
        files.get(file_id, key.tenant_id)
    except NotFound:
        raise InvalidRequest(
            f"no file {file_id!r} in your tenant", param=f"params.{name}"
        ) from None


def _scope(key: Principal) -> int | None:
    return None if key.is_admin else key.tenant_id


@router.post("/jobs", status_code=201)
async def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    key: MaintainerKey,
    jobs: JobsDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobPublic:
    kinds = request.app.state.job_kinds
    kind = kinds.get(body.kind)
    if kind is not None and kind.created_by:
        raise InvalidRequest(f"{body.kind} jobs are created with {kind.created_by}", param="kind")
    params = check_params(kinds, body.kind, body.params)
    for name in kinds[body.kind].file_params:
        if params[name] is not None:
            await run_in_threadpool(_check_file, request.app.state.files, params[name], key, name)
    job, created = await run_in_threadpool(
        jobs.create,
        body.kind,
        key.tenant_id,
        params,
        created_by=key.key_id,
        max_attempts=settings.job_max_attempts,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = 200
    return JobPublic.of(job)


@router.get("/jobs")
async def list_jobs(
    key: MaintainerKey,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=32)] = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    status: JobStatus | None = None,
) -> JobsPublic:
    found = await run_in_threadpool(
        jobs.list, _scope(key), limit=limit + 1, after=after, kind=kind, status=status
    )
    return JobsPublic(data=[JobPublic.of(j) for j in found[:limit]], has_more=len(found) > limit)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, key: MaintainerKey, jobs: JobsDep) -> JobPublic:
    return JobPublic.of(await run_in_threadpool(jobs.get, job_id, _scope(key)))


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    key: MaintainerKey,
    jobs: JobsDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventsPublic:
    found = await run_in_threadpool(
        jobs.events, job_id, _scope(key), after=after, limit=min(limit + 1, 1000)
    )
    return EventsPublic(
        data=[EventPublic.of(e) for e in found[:limit]], has_more=len(found) > limit
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, key: MaintainerKey, jobs: JobsDep) -> JobPublic:
    return JobPublic.of(await run_in_threadpool(jobs.cancel, job_id, _scope(key)))
