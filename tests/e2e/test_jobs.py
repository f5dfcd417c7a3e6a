"""``maas serve`` runs job workers beside the server: a job created over HTTP runs to its end
and registers its model; a killed server's worker does not run on alone, nor does anything
it started (the fork server its training processes came from)."""

from __future__ import annotations

import os
import signal
import time
import zipfile
from pathlib import Path

from tests.e2e.conftest import Server, start_digits_training

ROOT = Path(__file__).resolve().parents[2]


def children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in found]


def descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [grandchild for child in found for grandchild in descendants(child)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_serve_runs_a_job_to_its_end_and_its_workers_never_outlive_it(tmp_path):
    env = {
        "MAAS_JOB_PLUGINS": "tests.jobs_plugin",
        "MAAS_JOB_LEASE_SECONDS": "2",
        "MAAS_JOB_POLL_SECONDS": "0.2",
        "PYTHONPATH": str(ROOT),
    }
    server = Server(tmp_path / "home", env=env)
    workers: list[int] = []
    try:
        server.wait_ready()
        made = server.admin.post(
            "/api/v1/jobs", json={"kind": "count", "params": {"steps": 5, "step_seconds": 0.05}}
        )
        assert made.status_code == 201, made.text
        job_id = made.json()["id"]
        deadline = time.monotonic() + 60
        while (job := server.admin.get(f"/api/v1/jobs/{job_id}").json())["status"] != "succeeded":
            assert job["status"] in ("queued", "running"), job
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["progress"] == 1.0 and job["result"]["version"] == 1
        assert server.admin.get("/api/v1/models/counted").status_code == 200
        events = server.admin.get(f"/api/v1/jobs/{job_id}/events").json()["data"]
        assert [e["step"] for e in events if e["step"] is not None] == [1, 2, 3, 4, 5]
        workers = children(server.process.pid)
        assert len(workers) == 1  # MAAS_JOB_WORKERS=1 by default
        trained = train_in_two_processes(server, tmp_path)
        assert trained["status"] == "succeeded", trained["error"]
        started = descendants(workers[0])
        # the fork server its training processes came from, and multiprocessing's tracker
        assert started, "the worker keeps the fork server its training processes came from"
        workers += started
        server.process.send_signal(signal.SIGKILL)  # no chance to stop its workers
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "a worker or its fork server outlived the server"
            time.sleep(0.2)
    finally:
        for pid in workers:  # the server's own worker, if the check above failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        server.stop()


def train_in_two_processes(server: Server, folder: Path) -> dict:
    """A ``train`` job of ``world_size`` 2 on the digits, run to its end."""
    from maas.training.demo_data import write_digits_archive

    every, digits = folder / "every.zip", folder / "digits.zip"
    write_digits_archive(every)
    with zipfile.ZipFile(every) as source, zipfile.ZipFile(digits, "w") as target:
        for name in [n for n in source.namelist() if n.startswith(("digits/0/", "digits/1/"))]:
            target.writestr(name, source.read(name))
    job_id = start_digits_training(server, digits, epochs=1, world_size=2)
    deadline = time.monotonic() + 120
    while (job := server.admin.get(f"/api/v1/jobs/{job_id}").json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job
