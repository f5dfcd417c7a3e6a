"""``maas jobs ...`` (local, straight on the database, as ``maas keys``) and ``maas worker``."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from maas.cli.context import load_settings, open_registry
from maas.cli.output import console, err_console
from maas.jobs import JobRecord, JobStatus, JobStore

app = typer.Typer(
    help="Jobs (training, fine-tuning): list, show, follow, cancel.", no_args_is_help=True
)


def _store(registry) -> JobStore:
    return JobStore(registry.engine)


@app.command("list")
def list_jobs(
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this state.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
) -> None:
    """Jobs of every tenant, newest first."""
    with open_registry() as registry:
        jobs = _store(registry).list(None, limit=limit, kind=kind, status=status)
    table = Table("id", "kind", "tenant", "status", "progress", "attempt", "created")
    for job in jobs:
        table.add_row(
            job.id,
            job.kind,
            job.tenant,
            str(job.status),
            f"{job.progress:.0%}",
            str(job.attempt),
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@app.command("show")
def show(job_id: str) -> None:
    """One job, as JSON."""
    with open_registry() as registry:
        job = _store(registry).get(job_id, None)
    console.print_json(json.dumps(job.to_dict(), default=str))


@app.command("events")
def events(job_id: str, limit: Annotated[int, typer.Option(min=1, max=1000)] = 100) -> None:
    """What a job reported, oldest first."""
    with open_registry() as registry:
        found = _store(registry).events(job_id, None, limit=limit)
    for event in found:
        console.print(_event_line(event), highlight=False)


@app.command("cancel")
def cancel(job_id: str) -> None:
    """Cancel a queued job at once, or ask a running one to stop (within seconds)."""
    with open_registry() as registry:
        job = _store(registry).cancel(job_id, None)
    stopping = job.cancel_requested and not job.status.finished
    console.print(f"{job.id}: {job.status}{' (stopping)' if stopping else ''}")


@app.command("wait")
def wait(
    job_id: str,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
) -> None:
    """Follow a job to its end with a progress bar and its latest metrics; exit 1 unless it
    succeeded."""
    started = time.monotonic()
    with open_registry() as registry:
        store = _store(registry)
        job = store.get(job_id, None)
        seen = 0
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
        )
        with Progress(
            *columns, console=err_console, transient=False, disable=not err_console.is_terminal
        ) as bar:
            task = bar.add_task(f"{job.id} ({job.kind})", total=1.0, metrics="")
            while True:
                job = store.get(job_id, None)
                for event in store.events(job_id, None, after=seen, limit=1000):
                    seen = event.id
                    if event.metrics:
                        shown = "  ".join(f"{k} {v:.4g}" for k, v in event.metrics.items())
                        bar.update(task, metrics=shown)
                    if not err_console.is_terminal:
                        err_console.print(_event_line(event), highlight=False)
                bar.update(task, completed=job.progress, description=f"{job.id} {job.status}")
                if job.status.finished:
                    break
                if timeout is not None and time.monotonic() - started > timeout:
                    err_console.print(f"{job.id} still {job.status} after {timeout:g} s")
                    raise typer.Exit(2)
                time.sleep(0.5)
    _summary(job)
    if job.status is not JobStatus.succeeded:
        raise typer.Exit(1)


def _summary(job: JobRecord) -> None:
    if job.status is JobStatus.succeeded:
        console.print(f"{job.id} succeeded: {json.dumps(job.result)}", highlight=False)
    elif job.status is JobStatus.failed:
        console.print(f"{job.id} failed: {(job.error or {}).get('message')}", highlight=False)
    else:
        console.print(f"{job.id} {job.status}", highlight=False)


def _event_line(event) -> str:
    metrics = "  ".join(f"{k}={v:.4g}" for k, v in (event.metrics or {}).items())
    step = f" step {event.step}" if event.step is not None else ""
    stamp = event.at.strftime("%H:%M:%S")
    line = f"{stamp} [{event.level}] (attempt {event.attempt}){step} {event.message} {metrics}"
    return line.rstrip()


def worker() -> None:
    """Run a job worker in the foreground until Ctrl-C or SIGTERM (``maas serve`` starts
    MAAS_JOB_WORKERS of them itself). A stopped worker puts its job back in the queue; the
    next worker resumes it from its last checkpoint."""
    import logging

    from maas.jobs.worker import run_worker

    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    run_worker(settings)
