"""Real worker processes (``maas worker``) on a real database: kill -9 and resume from the
checkpoint with exactly one registered model, cancel within seconds, and a stopped worker's
job resumed by the next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maas.auth.store import TenantStore
from maas.config import Settings
from maas.jobs import JobStatus, JobStore
from maas.registry import open_registry

ROOT = Path(__file__).resolve().parents[3]
LEASE = 2.0


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAAS_")},
        "MAAS_HOME": str(tmp_path / "home"),
        "MAAS_JOB_PLUGINS": "tests.jobs_plugin",
        "MAAS_JOB_LEASE_SECONDS": str(LEASE),
        "MAAS_JOB_POLL_SECONDS": "0.2",
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture
def jobs(env):
    settings = Settings(home=Path(env["MAAS_HOME"]))
    registry = open_registry(settings)  # creates the database
    TenantStore(registry.engine).create("acme", "retail")
    store = JobStore(registry.engine)
    store.tenant = TenantStore(registry.engine).get_id("acme")
    store.registry = registry
    yield store
    registry.close()


@pytest.fixture
def start_worker(env):
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "maas", "worker"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started.append(process)
        return process

    yield start
    for process in started:  # only ours, by PID
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def create(jobs, **params):
    job, _ = jobs.create("count", jobs.tenant, params, created_by=None, max_attempts=3)
    return job.id


def test_a_killed_worker_s_job_resumes_from_its_checkpoint_and_registers_once(
    jobs, start_worker, env
):
    job_id = create(jobs, steps=30, step_seconds=0.1, model="counted")
    first = start_worker()
    until(lambda: jobs.get(job_id, None).progress >= 0.3, 60, "a third of the steps")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = jobs.get(job_id, None).checkpoint["done"]
    second = start_worker()
    done = until(
        lambda: (job := jobs.get(job_id, None)).status.finished and job, 90, "the job's end"
    )
    assert done.status is JobStatus.succeeded, done.error
    assert done.attempt == 2
    assert done.result["started_from"] >= killed_at > 0  # resumed, not started over
    assert done.result["version"] == 1
    versions = jobs.registry.get_model("counted").versions
    assert [v.version for v in versions] == [1]  # registered exactly once
    attempts = (Path(env["MAAS_HOME"]) / "jobs" / job_id / "attempts.log").read_text().split("\n")
    assert [line.split()[0] for line in attempts if line] == ["1", "2"]
    messages = [e.message for e in jobs.events(job_id, None, limit=1000)]
    assert any("stopped heartbeating" in m for m in messages)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=20) == 0


def test_cancel_stops_a_running_job_within_seconds(jobs, start_worker):
    job_id = create(jobs, steps=1000, step_seconds=0.05)
    start_worker()
    until(lambda: jobs.get(job_id, None).progress > 0, 60, "the job to start")
    asked = time.monotonic()
    jobs.cancel(job_id, None)
    until(lambda: jobs.get(job_id, None).status is JobStatus.cancelled, 10, "the cancellation")
    assert time.monotonic() - asked < LEASE + 2
    assert jobs.get(job_id, None).progress < 1
    follower = create(jobs, steps=2, step_seconds=0.0, model="after-cancel")
    until(lambda: jobs.get(follower, None).status is JobStatus.succeeded, 60, "the next job")


def test_a_stopped_worker_puts_its_job_back_and_the_next_one_resumes_it(jobs, start_worker):
    job_id = create(jobs, steps=40, step_seconds=0.1, model="restarted")
    first = start_worker()
    until(lambda: jobs.get(job_id, None).progress >= 0.2, 60, "a fifth of the steps")
    first.send_signal(signal.SIGTERM)  # as maas serve stops its workers
    assert first.wait(timeout=20) == 0
    back = jobs.get(job_id, None)
    assert back.status is JobStatus.queued and back.checkpoint["done"] > 0
    start_worker()
    done = until(lambda: (j := jobs.get(job_id, None)).status.finished and j, 90, "the end")
    assert done.status is JobStatus.succeeded and done.attempt == 2
    assert done.result["started_from"] >= back.checkpoint["done"]
