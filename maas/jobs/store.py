"""Jobs in the database: create, list, cancel, and the worker's side: claim under a lease,
heartbeat, report, checkpoint, finish.

A worker holds a job through a lease (owner, attempt, expiry). Every write it makes is one
UPDATE that names the attempt and owner it holds ("fencing"): once its lease has run out and
another worker has claimed the job (attempt + 1), the old worker's writes match no row, change
nothing, and raise ``LeaseLost``. Claiming takes the oldest claimable job in one transaction:
``BEGIN IMMEDIATE`` on SQLite (one writer at a time), ``SELECT ... FOR UPDATE SKIP LOCKED`` on
PostgreSQL (workers never wait on each other's rows); the statement is the same.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from maas.db.engine import IMMEDIATE, make_session_factory
from maas.db.tables import Job, JobEvent, Tenant, UsageRecord, utcnow
from maas.errors import Conflict, InvalidRequest, NotFound
from maas.jobs.records import EventRecord, JobRecord, JobStatus

MAX_LIST = 101
"""Jobs in one page (100, and one more to tell whether there are more)."""


class JobNotFound(NotFound):
    pass


class LeaseLost(Exception):
    """This worker no longer holds the job: its lease ran out and the job was claimed again,
    or the job was finished or cancelled. Whatever it was about to write is dropped."""


class Cancelled(Exception):
    """The job was cancelled while it ran; the worker stops it and records it cancelled."""


@dataclass(frozen=True)
class Report:
    """What a running job says: any of progress, an event, a checkpoint."""

    at: datetime
    progress: float | None = None
    message: str | None = None
    level: str = "info"
    step: int | None = None
    metrics: dict[str, float] | None = None
    checkpoint: dict[str, Any] | None = None
    stage: str | None = None


JOB_STATUS_CODES = {JobStatus.succeeded: 200, JobStatus.cancelled: 499, JobStatus.failed: 500}
"""A finished job's status as its usage record states it, in HTTP's terms (499: the client
went away, as nginx counts it)."""


@dataclass(frozen=True)
class Lease:
    """A worker's hold on one job: what each of its writes names."""

    row_id: int
    job: JobRecord
    owner: str
    attempt: int
    resumed: bool
    """True when an earlier attempt ran (the job may have a checkpoint to resume from)."""


class JobStore:
    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._sessions = make_session_factory(engine)
        self._clock = clock

    # -- users' side -----------------------------------------------------------------------

    def create(
        self,
        kind: str,
        tenant_id: int,
        params: dict[str, Any],
        *,
        created_by: str | None,
        max_attempts: int,
        idempotency_key: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """A queued job; with an ``idempotency_key`` already used in the tenant, the job it
        made (and False). Reusing a key for another request is a conflict."""
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 128:
            raise InvalidRequest(
                "Idempotency-Key must be 1 to 128 characters", param="Idempotency-Key"
            )
        with self._transaction() as session:
            if idempotency_key is not None:
                found = self._by_idempotency_key(session, tenant_id, idempotency_key, kind, params)
                if found is not None:
                    return found, False
            job = Job(
                public_id=f"job-{secrets.token_hex(8)}",
                kind=kind,
                tenant_id=tenant_id,
                created_by=created_by,
                status=JobStatus.queued,
                progress=0.0,
                attempt=0,
                max_attempts=max_attempts,
                cancel_requested=False,
                idempotency_key=idempotency_key,
                params=params,
                created_at=self._clock(),
            )
            session.add(job)
            try:
                session.flush()
            except IntegrityError:  # the same key at the same moment: PostgreSQL only
                raise Conflict("a job with this Idempotency-Key is being created") from None
            self._event(session, job, "info", f"created ({kind})")
            return self._record(session, job), True

    def get(self, job_id: str, tenant_id: int | None) -> JobRecord:
        """``tenant_id`` None: any tenant's (admins)."""
        with self._sessions() as session:
            return self._record(session, self._row(session, job_id, tenant_id))

    def list(
        self,
        tenant_id: int | None,
        *,
        limit: int = 20,
        after: str | None = None,
        kind: str | None = None,
        status: JobStatus | None = None,
    ) -> list[JobRecord]:
        """Newest first; ``after`` is the last job id of the previous page."""
        if not 1 <= limit <= MAX_LIST:
            raise InvalidRequest(f"limit must be 1 to {MAX_LIST}", param="limit")
        with self._sessions() as session:
            query = select(Job).order_by(Job.id.desc()).limit(limit)
            if tenant_id is not None:
                query = query.where(Job.tenant_id == tenant_id)
            if after is not None:
                query = query.where(Job.id < self._row(session, after, tenant_id).id)
            if kind is not None:
                query = query.where(Job.kind == kind)
            if status is not None:
                query = query.where(Job.status == status)
            return [self._record(session, job) for job in session.scalars(query)]

    def events(
        self,
        job_id: str,
        tenant_id: int | None,
        *,
        after: int = 0,
        limit: int = 100,
        before: int | None = None,
        newest_first: bool = False,
    ) -> list[EventRecord]:
        """Oldest first, from the event after ``after`` (an event id); or ``newest_first``,
        from the event before ``before`` (None: the newest)."""
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be 1 to 1000", param="limit")
        with self._sessions() as session:
            job = self._row(session, job_id, tenant_id)
            query = select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.id > after)
            if before is not None:
                query = query.where(JobEvent.id < before)
            order = JobEvent.id.desc() if newest_first else JobEvent.id
            query = query.order_by(order).limit(limit)
            return [_event_record(event, job.public_id) for event in session.scalars(query)]

    def cancel(self, job_id: str, tenant_id: int | None) -> JobRecord:
        """A queued job is cancelled at once; a running one is asked to stop (its worker sees
        it at its next heartbeat, within seconds). A finished job stays as it is."""
        with self._transaction() as session:
            job = self._row(session, job_id, tenant_id)
            if job.status == JobStatus.queued:
                self._close(session, job, JobStatus.cancelled)
                self._event(session, job, "info", "cancelled before it ran")
            elif job.status == JobStatus.running and not job.cancel_requested:
                job.cancel_requested = True
                self._event(session, job, "info", "cancellation requested")
            return self._record(session, job)

    # -- workers' side ---------------------------------------------------------------------

    def claim(self, owner: str, kinds: tuple[str, ...], lease_seconds: float) -> Lease | None:
        """The oldest queued job of one of ``kinds``, or a running one whose lease expired (its
        worker died): leased to ``owner`` with attempt + 1. None when there is none."""
        now = self._clock()
        while True:
            with self._transaction() as session:
                job = session.scalars(
                    select(Job)
                    .where(
                        Job.kind.in_(kinds),
                        or_(
                            Job.status == JobStatus.queued,
                            (Job.status == JobStatus.running) & (Job.lease_expires_at < now),
                        ),
                    )
                    .order_by(Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if job is None:
                    return None
                expired = job.status == JobStatus.running
                if expired and self._settle_abandoned(session, job):
                    continue  # cancelled or out of attempts: look for another
                resumed = job.attempt > 0
                job.status = JobStatus.running
                job.attempt += 1
                job.lease_owner = owner
                job.lease_expires_at = now + timedelta(seconds=lease_seconds)
                job.heartbeat_at = now
                job.started_at = job.started_at or now
                why = "its last worker stopped heartbeating" if expired else "queued"
                self._event(session, job, "info", f"claimed by {owner} ({why})")
                record = self._record(session, job)
                return Lease(job.id, record, owner, job.attempt, resumed)

    def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        """Extends the lease; True when cancellation was requested. Raises LeaseLost."""
        now = self._clock()
        with self._transaction() as session:
            self._fenced(
                session,
                lease,
                heartbeat_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
            )
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == lease.row_id)))

    def report(self, lease: Lease, **fields: Any) -> None:
        """Progress (0..1), an event (``message``, ``level``, ``step``, ``metrics``) and the
        checkpoint a new attempt would resume from, in one fenced write."""
        self.report_many(lease, [Report(at=self._clock(), **fields)])

    def report_many(
        self, lease: Lease, reports: list[Report], *, session: Session | None = None
    ) -> None:
        """Several reports in one fenced write: the last progress and checkpoint, and every
        event, in order, at the time it was made; in ``session``'s transaction if given."""
        if session is None:
            with self._transaction() as own:
                self.report_many(lease, reports, session=own)
            return
        values: dict[str, Any] = {}
        for report in reports:
            if report.progress is not None:
                values["progress"] = min(1.0, max(0.0, float(report.progress)))
            if report.checkpoint is not None:
                values["checkpoint"] = report.checkpoint
            if report.stage is not None:
                values["stage"] = report.stage
        self._fenced(session, lease, **values)
        for report in reports:
            if report.message is not None:
                session.add(
                    JobEvent(
                        job_id=lease.row_id,
                        at=report.at,
                        attempt=lease.attempt,
                        level=report.level,
                        message=report.message,
                        step=report.step,
                        metrics=report.metrics,
                    )
                )

    def checkpoint(self, lease: Lease) -> dict[str, Any] | None:
        with self._sessions() as session:
            return session.scalar(select(Job.checkpoint).where(Job.id == lease.row_id))

    def finish(
        self,
        lease: Lease,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        session: Session | None = None,
    ) -> None:
        """The job's end, fenced. Given the ``session`` of another write (the registry's import
        of the job's result), it commits or fails with that write: a result is registered
        exactly once, by the attempt that holds the lease."""
        if not status.finished:
            raise ValueError(f"{status} is not an end")
        values: dict[str, Any] = {
            "status": status,
            "finished_at": self._clock(),
            "lease_owner": None,
            "lease_expires_at": None,
            "result": result,
            "error": error,
        }
        if status == JobStatus.succeeded:
            values["progress"] = 1.0
        message = {"succeeded": "succeeded", "cancelled": "cancelled"}.get(status)
        text = message or f"failed: {(error or {}).get('message', 'unknown error')}"
        if session is not None:
            self._fenced(session, lease, **values)
            session.add(self._event_row(lease, "info" if message else "error", text))
            session.add(self._usage_row(session, lease, status, values["finished_at"], result))
            return
        with self._transaction() as own:
            self._fenced(own, lease, **values)
            own.add(self._event_row(lease, "info" if message else "error", text))
            own.add(self._usage_row(own, lease, status, values["finished_at"], result))

    @staticmethod
    def _usage_row(
        session: Session, lease: Lease, status: JobStatus, at: datetime, result: dict | None
    ) -> UsageRecord:
        """A job is metered like a request, once, when it ends (with the end's fenced write):
        ``JOB <kind>`` as the endpoint, its key and tenant, the model it made, the tokens or
        samples it trained on (its result's ``usage``) and its time from first claim to end."""
        job, done = lease.job, result or {}
        usage = done.get("usage") or {}
        tenant = session.get(Tenant, job.tenant_id)
        started = job.started_at or at
        return UsageRecord(
            at=at,
            day=at.date().isoformat(),
            key_id=job.created_by,
            tenant=tenant.name if tenant else None,
            industry=tenant.industry if tenant else None,
            model=done.get("fine_tuned_model") or done.get("model"),
            version=done.get("version"),
            endpoint=f"JOB {job.kind}",
            prompt_tokens=int(usage.get("tokens", 0)),
            items=int(usage.get("samples", 0)),
            latency_ms=max(0.0, (at - started).total_seconds() * 1000),
            status=JOB_STATUS_CODES[status],
        )

    def release(self, lease: Lease, reason: str) -> None:
        """Back to the queue (its worker is stopping): the next worker resumes it from its
        checkpoint without waiting for the lease to run out."""
        with self._transaction() as session:
            self._fenced(
                session, lease, status=JobStatus.queued, lease_owner=None, lease_expires_at=None
            )
            session.add(self._event_row(lease, "warning", f"back in the queue: {reason}"))

    # -- internals -------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A write transaction: SQLite takes its write lock up front (BEGIN IMMEDIATE)."""
        with self._sessions() as session:
            session.connection(execution_options={IMMEDIATE: True})
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def _settle_abandoned(self, session: Session, job: Job) -> bool:
        """A running job whose worker died: True if it ends here (cancelled while nobody ran
        it, or out of attempts) instead of being claimed again."""
        if job.cancel_requested:
            self._close(session, job, JobStatus.cancelled)
            self._event(session, job, "info", "cancelled (its worker had stopped)")
            return True
        if job.attempt >= job.max_attempts:
            message = f"its worker stopped heartbeating {job.attempt} times"
            self._close(
                session, job, JobStatus.failed, {"message": message, "type": "lease_expired"}
            )
            self._event(session, job, "error", f"failed: {message}")
            return True
        return False

    def _close(
        self, session: Session, job: Job, status: JobStatus, error: dict | None = None
    ) -> None:
        job.status = status
        job.finished_at = self._clock()
        job.lease_owner = None
        job.lease_expires_at = None
        job.error = error

    def _fenced(self, session: Session, lease: Lease, **values: Any) -> None:
        if not values:
            values = {"heartbeat_at": self._clock()}
        done = session.execute(
            update(Job)
            .where(
                Job.id == lease.row_id,
                Job.attempt == lease.attempt,
                Job.lease_owner == lease.owner,
                Job.status == JobStatus.running,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if done.rowcount != 1:
            raise LeaseLost(f"job {lease.job.id}: attempt {lease.attempt} no longer holds it")

    def _by_idempotency_key(
        self, session: Session, tenant_id: int, key: str, kind: str, params: dict
    ) -> JobRecord | None:
        job = session.scalars(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
        ).first()
        if job is None:
            return None
        if job.kind != kind or job.params != params:
            raise Conflict(
                "this Idempotency-Key was used for another request; use a new key",
                param="Idempotency-Key",
            )
        return self._record(session, job)

    @staticmethod
    def _row(session: Session, job_id: str, tenant_id: int | None) -> Job:
        query = select(Job).where(Job.public_id == job_id)
        if tenant_id is not None:
            query = query.where(Job.tenant_id == tenant_id)
        job = session.scalars(query).first()
        if job is None:
            raise JobNotFound(f"no job {job_id!r}", param="job_id")
        return job

    def _event(self, session: Session, job: Job, level: str, message: str) -> None:
        session.add(
            JobEvent(
                job_id=job.id, at=self._clock(), attempt=job.attempt, level=level, message=message
            )
        )

    def _event_row(self, lease: Lease, level: str, message: str) -> JobEvent:
        return JobEvent(
            job_id=lease.row_id,
            at=self._clock(),
            attempt=lease.attempt,
            level=level,
            message=message,
        )

    @staticmethod
    def _record(session: Session, job: Job) -> JobRecord:
        tenant = session.get(Tenant, job.tenant_id)
        return JobRecord(
            id=job.public_id,
            kind=job.kind,
            tenant=tenant.name if tenant else "",
            tenant_id=job.tenant_id,
            created_by=job.created_by,
            status=JobStatus(job.status),
            progress=job.progress,
            stage=job.stage,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            params=job.params,
            checkpoint=job.checkpoint,
            result=job.result,
            error=job.error,
            lease_owner=job.lease_owner,
            lease_expires_at=job.lease_expires_at,
            heartbeat_at=job.heartbeat_at,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


def _event_record(event: JobEvent, job_id: str) -> EventRecord:
    return EventRecord(
        id=event.id,
        job=job_id,
        at=event.at,
        attempt=event.attempt,
        level=event.level,
        message=event.message,
        step=event.step,
        metrics=event.metrics,
    )
