"""What a job and its events look like outside the database."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    tenant: str
    tenant_id: int
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
    lease_owner: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = str(self.status)
        return data


@dataclass(frozen=True)
class EventRecord:
    id: int
    job: str
    at: datetime
    attempt: int
    level: str
    message: str
    step: int | None
    metrics: dict[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
