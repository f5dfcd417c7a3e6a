"""The job store on SQLite and on a real PostgreSQL server: leases, fencing, cancellation,
idempotency, tenants."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from maas.auth.store import TenantStore
from maas.errors import Conflict
from maas.jobs import JobNotFound, JobStatus, JobStore, LeaseLost

LEASE = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def engine(migrated_database):
    return migrated_database


@pytest.fixture
def tenants(engine) -> tuple[int, int]:
    store = TenantStore(engine)
    store.create("acme", "retail")
    store.create("globex", "finance")
    return store.get_id("acme"), store.get_id("globex")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine, clock) -> JobStore:
    return JobStore(engine, clock=clock)


def make(store, tenant, params=None, key=None, attempts=3):
    job, _ = store.create(
        "train",
        tenant,
        params or {"epochs": 1},
        created_by="k1",
        max_attempts=attempts,
        idempotency_key=key,
    )
    return job


def test_a_job_is_seen_only_within_its_tenant(store, tenants):
    acme, globex = tenants
    job = make(store, acme)
    assert job.status is JobStatus.queued and job.tenant == "acme" and job.attempt == 0
    assert store.get(job.id, acme).id == job.id
    assert store.get(job.id, None).id == job.id  # admins see every tenant's
    with pytest.raises(JobNotFound):
        store.get(job.id, globex)
    with pytest.raises(JobNotFound):
        store.events(job.id, globex)
    with pytest.raises(JobNotFound):
        store.cancel(job.id, globex)
    assert [j.id for j in store.list(acme)] == [job.id]
    assert store.list(globex) == []


def test_the_list_is_newest_first_and_pages(store, tenants):
    acme, _ = tenants
    ids = [make(store, acme, {"n": n}).id for n in range(5)]
    first = store.list(acme, limit=2)
    assert [j.id for j in first] == ids[::-1][:2]
    second = store.list(acme, limit=2, after=first[-1].id)
    assert [j.id for j in second] == ids[::-1][2:4]


def test_an_idempotency_key_returns_the_same_job(store, tenants):
    acme, globex = tenants
    first, created = store.create(
        "train", acme, {"a": 1}, created_by=None, max_attempts=3, idempotency_key="k-1"
    )
    again, created_again = store.create(
        "train", acme, {"a": 1}, created_by=None, max_attempts=3, idempotency_key="k-1"
    )
    assert created and not created_again and again.id == first.id
    assert len(store.list(acme)) == 1
    with pytest.raises(Conflict):  # the same key for another request
        store.create(
            "train", acme, {"a": 2}, created_by=None, max_attempts=3, idempotency_key="k-1"
        )
    other, created_other = store.create(
        "train", globex, {"a": 1}, created_by=None, max_attempts=3, idempotency_key="k-1"
    )
    assert created_other and other.id != first.id  # keys are per tenant


def test_claim_leases_the_oldest_job_once(store, tenants):
    acme, _ = tenants
    first, second = make(store, acme, {"n": 1}), make(store, acme, {"n": 2})
    lease = store.claim("w1", ("train",), LEASE)
    assert lease.job.id == first.id and lease.attempt == 1 and not lease.resumed
    job = store.get(first.id, acme)
    assert job.status is JobStatus.running and job.lease_owner == "w1" and job.started_at
    assert store.claim("w2", ("train",), LEASE).job.id == second.id
    assert store.claim("w3", ("train",), LEASE) is None
    assert store.claim("w3", ("optimize",), LEASE) is None  # kinds filter


def test_a_dead_workers_job_is_claimed_again_and_its_late_writes_are_fenced(store, tenants, clock):
    acme, _ = tenants
    job = make(store, acme)
    old = store.claim("w1", ("train",), LEASE)
    store.report(old, progress=0.4, checkpoint={"epoch": 2}, message="epoch 2", step=20)
    store.report(old, stage="training")
    clock.advance(LEASE / 2)
    store.heartbeat(old, LEASE)
    clock.advance(LEASE / 2 + 1)
    assert store.claim("w2", ("train",), LEASE) is None  # the heartbeat kept it
    clock.advance(LEASE)  # w1 is silent now: its lease runs out
    new = store.claim("w2", ("train",), LEASE)
    assert new.job.id == job.id and new.attempt == 2 and new.resumed
    assert store.checkpoint(new) == {"epoch": 2}  # resumes where the last attempt got to
    for late_write in (
        lambda: store.report(old, progress=0.9, checkpoint={"epoch": 9}, stage="late"),
        lambda: store.heartbeat(old, LEASE),
        lambda: store.finish(old, JobStatus.succeeded, result={"model": "late"}),
        lambda: store.release(old, "stopping"),
    ):
        with pytest.raises(LeaseLost):
            late_write()
    now = store.get(job.id, acme)
    assert now.progress == pytest.approx(0.4) and now.checkpoint == {"epoch": 2}
    assert now.stage == "training"
    assert now.status is JobStatus.running and now.lease_owner == "w2" and now.result is None
    store.finish(new, JobStatus.succeeded, result={"model": "m"})
    done = store.get(job.id, acme)
    assert done.status is JobStatus.succeeded and done.result == {"model": "m"}
    assert done.progress == 1.0 and done.lease_owner is None
    messages = [e.message for e in store.events(job.id, acme)]
    assert "epoch 2" in messages and "succeeded" in messages
    assert any("stopped heartbeating" in m for m in messages)


def test_a_job_whose_workers_keep_dying_fails(store, tenants, clock):
    acme, _ = tenants
    job = make(store, acme, attempts=2)
    store.claim("w1", ("train",), LEASE)
    clock.advance(LEASE + 1)
    store.claim("w2", ("train",), LEASE)
    clock.advance(LEASE + 1)
    assert store.claim("w3", ("train",), LEASE) is None
    failed = store.get(job.id, acme)
    assert failed.status is JobStatus.failed and failed.error["type"] == "lease_expired"


def test_cancel(store, tenants, clock):
    acme, _ = tenants
    queued = make(store, acme, {"n": 1})
    assert store.cancel(queued.id, acme).status is JobStatus.cancelled  # at once
    running = make(store, acme, {"n": 2})
    lease = store.claim("w1", ("train",), LEASE)
    assert not store.heartbeat(lease, LEASE)
    asked = store.cancel(running.id, acme)
    assert asked.status is JobStatus.running and asked.cancel_requested
    assert store.heartbeat(lease, LEASE)  # the worker learns it at its next heartbeat
    store.finish(lease, JobStatus.cancelled)
    assert store.get(running.id, acme).status is JobStatus.cancelled
    assert store.cancel(running.id, acme).status is JobStatus.cancelled  # stays as it is
    # cancelled while its worker was dead: ends at the next claim instead of running again
    orphan = make(store, acme, {"n": 3})
    store.claim("w1", ("train",), LEASE)
    store.cancel(orphan.id, acme)
    clock.advance(LEASE + 1)
    assert store.claim("w2", ("train",), LEASE) is None
    assert store.get(orphan.id, acme).status is JobStatus.cancelled


def test_a_released_job_is_resumed_by_the_next_worker_without_waiting(store, tenants):
    acme, _ = tenants
    job = make(store, acme)
    lease = store.claim("w1", ("train",), LEASE)
    store.report(lease, checkpoint={"epoch": 1})
    store.release(lease, "the server is stopping")
    assert store.get(job.id, acme).status is JobStatus.queued
    again = store.claim("w2", ("train",), LEASE)
    assert again.attempt == 2 and again.resumed and store.checkpoint(again) == {"epoch": 1}


def test_concurrent_workers_never_claim_the_same_job(store, tenants):
    acme, _ = tenants
    jobs = {make(store, acme, {"n": n}).id for n in range(12)}
    claimed: list[str] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        for _ in range(20):
            lease = store.claim(owner, ("train",), LEASE)
            if lease is None:
                return
            with lock:
                claimed.append(lease.job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == sorted(jobs)  # each exactly once
