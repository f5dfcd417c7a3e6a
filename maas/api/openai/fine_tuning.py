"""``/v1/fine_tuning/jobs`` in OpenAI's shape: create, list, retrieve, cancel, events,
checkpoints, for the ``openai`` SDK's ``fine_tuning.jobs`` unchanged.

A fine-tuning job is a ``fine-tune`` job of ``maas.jobs`` (also listed by ``/api/v1/jobs``):
LoRA on a Llama-family chat model the caller may use, on ``fine-tune`` files of its tenant.
Only ``admin`` and ``maintainer`` keys use these routes; another tenant's job is 404. The
statuses are OpenAI's: a job is ``validating_files`` while its worker reads and tokenises the
files, then ``running``; ``queued``, ``succeeded``, ``failed`` and ``cancelled`` are the job's
own. ``fine_tuned_model`` (``ft:<base>:<suffix>:<id>``) is set once it succeeded, and names a
model the server serves at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from maas.api import governance
from maas.api.access import resolve_for
from maas.api.deps import MaintainerKey, RegistryDep, SettingsDep
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.hardening import StrictJSONRoute
from maas.auth.principal import Principal
from maas.errors import InvalidRequest, NotFound, Unavailable
from maas.jobs import EventRecord, JobRecord, JobStatus, JobStore
from maas.jobs.kinds import check_params

KIND = "fine-tune"
EVENT_PREFIX, CHECKPOINT_PREFIX = "ftevent-", "ftckpt-"

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(governance.maintainer_key)],
    responses=error_responses("/v1", *KEYED_STATUSES, 400, 403, 404, 409),
    route_class=StrictJSONRoute,
)

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | int | None = Field(default=None)
    batch_size: Auto | int | None = Field(default=None)
    learning_rate_multiplier: Auto | float | None = Field(default=None)
    # maas's own: the LoRA adapter's shape
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    world_size: int | None = None
    """maas's own: processes training together, as ``strategy`` says."""
    strategy: str | None = None
    """maas's own: ``data`` (the default), ``pipeline``, ``hybrid`` or ``parameter-server``."""
    pipeline_stages: int | None = None
    micro_batches: int | None = None
    pipeline_schedule: str | None = None
    ps_mode: str | None = None
    max_staleness: int | None = None


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    supervised: Supervised | None = None


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=160)
    training_file: str = Field(min_length=1, max_length=40)
    validation_file: str | None = Field(default=None, min_length=1, max_length=40)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    integrations: list[dict[str, Any]] | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    method: dict[str, Any]
    user_provided_suffix: str | None
    progress: float
    """maas's own: 0 to 1."""


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None
    type: Literal["message", "metrics"]


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


JobsDep = Annotated[JobStore, Depends(get_jobs)]


def _scope(key: Principal) -> int | None:
    return None if key.is_admin else key.tenant_id


@router.post("/fine_tuning/jobs")
async def create_fine_tuning_job(
    body: FineTuningJobCreate,
    request: Request,
    key: MaintainerKey,
    jobs: JobsDep,
    registry: RegistryDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> FineTuningJob:
    params = await run_in_threadpool(
        _params, body, key, registry, request.app.state.files, idempotency_key
    )
    try:
        params = check_params(request.app.state.job_kinds, KIND, params)
    except InvalidRequest as err:  # name the request's field, not the job's parameter
        field = _FIELDS.get((err.param or "").removeprefix("params."), err.param)
        message = str(err.message).replace(f"{err.param}:", f"{field}:")
        raise InvalidRequest(message, param=field) from None
    job, _ = await run_in_threadpool(
        jobs.create,
        KIND,
        key.tenant_id,
        params,
        created_by=key.key_id,
        max_attempts=settings.job_max_attempts,
        idempotency_key=idempotency_key,
    )
    return _public(job)


_FIELDS = {
    name: f"hyperparameters.{name}"
    for name in (
        "n_epochs",
        "batch_size",
        "learning_rate_multiplier",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "world_size",
        "strategy",
        "pipeline_stages",
        "micro_batches",
        "pipeline_schedule",
        "ps_mode",
        "max_staleness",
    )
} | {name: name for name in ("model", "suffix", "seed", "metadata")}
"""The request field each job parameter comes from."""


def _params(
    body: FineTuningJobCreate, key: Principal, registry, files, idempotency_key: str | None
) -> dict[str, Any]:
    from maas.training.fine_tune import check_base

    if importlib.util.find_spec("peft") is None:
        raise Unavailable(
            "fine-tuning needs peft, which this server lacks: install maas's training "
            "extra (pip install 'maas[training]')"
        )

    if body.method is not None and body.method.type != "supervised":
        raise InvalidRequest(
            f"method {body.method.type!r} is not supported; maas fine-tunes with the "
            "'supervised' method (LoRA)",
            param="method.type",
        )
    hyper = _hyperparameters(body)
    record = resolve_for(registry, key, body.model)
    if record.tenant_id not in (None, key.tenant_id):  # an admin's view of another tenant's
        raise InvalidRequest(
            f"{record.name} belongs to another tenant; a fine-tuning job runs in its key's "
            "tenant and may use only that tenant's models and shared ones",
            param="model",
        )
    check_base(record)
    for name in ("training_file", "validation_file"):
        file_id = getattr(body, name)
        if file_id is None:
            continue
        try:
            found = files.get(file_id, key.tenant_id)
        except NotFound:
            raise InvalidRequest(f"no file {file_id!r} in your tenant", param=name) from None
        if found.purpose != "fine-tune":
            raise InvalidRequest(
                f"{file_id} was uploaded with purpose {found.purpose!r}; fine-tuning takes "
                "files uploaded with purpose 'fine-tune'",
                param=name,
            )
    params: dict[str, Any] = {
        "model": record.reference,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "suffix": body.suffix or "",
        "seed": body.seed if body.seed is not None else _seed(idempotency_key),
        "metadata": body.metadata,
        **hyper,
    }
    return params


def _hyperparameters(body: FineTuningJobCreate) -> dict[str, Any]:
    """The hyperparameters given at the top level (the older form) or under ``method``;
    "auto" is None."""
    given = [
        h
        for h in (
            body.hyperparameters,
            body.method and body.method.supervised and body.method.supervised.hyperparameters,
        )
        if h
    ]
    if len(given) == 2 and given[0] != given[1]:
        raise InvalidRequest(
            "hyperparameters are given twice, differently (at the top level and under "
            "method.supervised): give them once",
            param="hyperparameters",
        )
    values = given[0].model_dump(exclude_none=True) if given else {}
    return {name: None if value == "auto" else value for name, value in values.items()}


def _seed(idempotency_key: str | None) -> int:
    """A seed for a request that gave none: random, or drawn from its Idempotency-Key, so a
    retried request asks for the very job it made (and is not a conflict)."""
    if idempotency_key is None:
        return secrets.randbelow(2**31)
    return int.from_bytes(hashlib.sha256(idempotency_key.encode()).digest()[:4]) % 2**31


@router.get("/fine_tuning/jobs")
async def list_fine_tuning_jobs(
    key: MaintainerKey,
    jobs: JobsDep,
    after: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    found = await run_in_threadpool(jobs.list, _scope(key), limit=limit + 1, after=after, kind=KIND)
    return FineTuningJobList(
        data=[_public(job) for job in found[:limit]], has_more=len(found) > limit
    )


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}")
async def retrieve_fine_tuning_job(
    fine_tuning_job_id: str, key: MaintainerKey, jobs: JobsDep
) -> FineTuningJob:
    return _public(await run_in_threadpool(_get, jobs, fine_tuning_job_id, key))


@router.post("/fine_tuning/jobs/{fine_tuning_job_id}/cancel")
async def cancel_fine_tuning_job(
    fine_tuning_job_id: str, key: MaintainerKey, jobs: JobsDep
) -> FineTuningJob:
    await run_in_threadpool(_get, jobs, fine_tuning_job_id, key)
    return _public(await run_in_threadpool(jobs.cancel, fine_tuning_job_id, _scope(key)))


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}/events")
async def list_fine_tuning_events(
    fine_tuning_job_id: str,
    key: MaintainerKey,
    jobs: JobsDep,
    after: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningJobEventList:
    """Newest first; ``after`` is the last event id of the previous page."""
    await run_in_threadpool(_get, jobs, fine_tuning_job_id, key)
    before = _event_number(after) if after else None
    found = await run_in_threadpool(
        jobs.events,
        fine_tuning_job_id,
        _scope(key),
        before=before,
        limit=limit + 1,
        newest_first=True,
    )
    return FineTuningJobEventList(
        data=[_event(e) for e in found[:limit]], has_more=len(found) > limit
    )


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints")
async def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str,
    key: MaintainerKey,
    jobs: JobsDep,
    after: Annotated[str | None, Query(max_length=80)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningJobCheckpointList:
    """The checkpoint of each finished epoch, newest first."""
    job = await run_in_threadpool(_get, jobs, fine_tuning_job_id, key)
    checkpoints = _checkpoints(job)
    if after:
        ids = [c.id for c in checkpoints]
        if after not in ids:
            raise InvalidRequest(
                f"no checkpoint {after!r} in job {fine_tuning_job_id}", param="after"
            )
        checkpoints = checkpoints[ids.index(after) + 1 :]
    data = checkpoints[:limit]
    return FineTuningJobCheckpointList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(checkpoints) > limit,
    )


def _get(jobs: JobStore, job_id: str, key: Principal) -> JobRecord:
    """The fine-tuning job; any other kind of job is not one (404)."""
    job = jobs.get(job_id, _scope(key))
    if job.kind != KIND:
        raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")
    return job


def _event_number(event_id: str) -> int:
    number = event_id.removeprefix(EVENT_PREFIX)
    if not number.isdigit():
        raise InvalidRequest(f"{event_id!r} is not an event id", param="after")
    return int(number)


def _time(at: datetime | None) -> int | None:
    return int(at.timestamp()) if at is not None else None


def _status(job: JobRecord) -> str:
    if job.status is JobStatus.running and job.stage == "validating_files":
        return "validating_files"
    return str(job.status)


def _public(job: JobRecord) -> FineTuningJob:
    params, result, saved = job.params, job.result or {}, job.checkpoint or {}
    hyper = (
        result.get("hyperparameters")
        or saved.get("hyperparameters")
        or {
            name: params.get(name) or "auto"
            for name in ("n_epochs", "batch_size", "learning_rate_multiplier")
        }
    )
    error = None
    if job.status is JobStatus.failed and job.error:
        error = JobError(
            code=str(job.error.get("type") or "job_failed"),
            message=str(job.error.get("message") or "the job failed"),
            param=job.error.get("param"),
        )
    return FineTuningJob(
        id=job.id,
        created_at=_time(job.created_at),
        error=error,
        fine_tuned_model=result.get("fine_tuned_model"),
        finished_at=_time(job.finished_at),
        hyperparameters=hyper,
        model=params["model"],
        organization_id=job.tenant,
        result_files=[],
        seed=params["seed"],
        status=_status(job),
        trained_tokens=result.get("trained_tokens"),
        training_file=params["training_file"],
        validation_file=params.get("validation_file"),
        estimated_finish=_estimated_finish(job),
        integrations=None,
        metadata=params.get("metadata"),
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
        user_provided_suffix=params.get("suffix") or None,
        progress=job.progress,
    )


def _estimated_finish(job: JobRecord) -> int | None:
    """From the time the running attempt has taken and its progress."""
    if job.status is not JobStatus.running or job.started_at is None or job.progress < 0.05:
        return None
    elapsed = (datetime.now(UTC) - job.started_at).total_seconds()
    return _time(job.started_at) + int(elapsed / job.progress)


def _event(event: EventRecord) -> FineTuningJobEvent:
    data = None
    if event.metrics:
        data = {k: int(v) if k in ("step", "total_steps") else v for k, v in event.metrics.items()}
    return FineTuningJobEvent(
        id=f"{EVENT_PREFIX}{event.id}",
        created_at=_time(event.at),
        level={"warning": "warn", "error": "error"}.get(event.level, "info"),
        message=event.message,
        data=data,
        type="metrics" if data else "message",
    )


def _checkpoints(job: JobRecord) -> list[FineTuningJobCheckpoint]:
    from maas.training.fine_tune import fine_tuned_model_name

    saved = (job.checkpoint or {}).get("checkpoints") or []
    name = (job.result or {}).get("fine_tuned_model") or fine_tuned_model_name(
        job.params["model"], job.params.get("suffix", ""), job.id
    )
    last = len(saved)
    listed = []
    for number, checkpoint in enumerate(saved, start=1):
        step = int(checkpoint["step"])
        final = number == last and job.status is JobStatus.succeeded
        listed.append(
            FineTuningJobCheckpoint(
                id=f"{CHECKPOINT_PREFIX}{job.id.removeprefix('job-')}-{step}",
                created_at=int(checkpoint.get("at") or _time(job.created_at)),
                fine_tuned_model_checkpoint=name if final else f"{name}:ckpt-step-{step}",
                fine_tuning_job_id=job.id,
                metrics={k: float(v) for k, v in checkpoint["metrics"].items()},
                step_number=step,
            )
        )
    return listed[::-1]
