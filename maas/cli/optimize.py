"""``maas optimize MODEL --recipe ...`` (local, straight on the database, as ``maas jobs``):
queue an ``optimize`` job once its recipe is checked against the parent, then follow it.
A ``maas serve`` with job workers, or a ``maas worker``, runs it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from maas.auth.store import TenantStore
from maas.cli import jobs
from maas.cli.context import load_settings, open_registry
from maas.cli.output import console
from maas.files import FileStore
from maas.jobs import JobStore


def optimize(
    model: Annotated[str, typer.Argument(help="The parent: name, name:version or name@alias.")],
    recipe: Annotated[
        str, typer.Option(help="Steps in order, e.g. 'prune 0.5 -> quantize int8-dynamic'.")
    ],
    name: Annotated[
        str | None, typer.Option(help="The model the result becomes a version of.")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="The report's sample inputs.")] = 0,
    training_file: Annotated[
        str | None,
        typer.Option(
            help="The dataset the learning steps learn from: a file id from /v1/files, or "
            "a local file (an image-folder archive, CSV or JSON Lines), uploaded first."
        ),
    ] = None,
    evaluation_file: Annotated[
        str | None,
        typer.Option(help="A dataset (file id or local file) the report measures accuracy on."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job to its end.")] = True,
) -> None:
    """Compress a registered version into a new, measured version (docs/optimize.md)."""
    from maas.optimize.job import check_parent, validate

    settings = load_settings()
    with open_registry() as registry:
        record = registry.resolve(model)
        tenant = record.tenant_id
        if tenant is None:  # a shared parent: the result is the operator's
            tenants = TenantStore(registry.engine)
            tenant = tenants.get_id(tenants.ensure_platform().name)
        files = FileStore.of_registry(registry, settings)
        params = validate(
            {
                "model": model,
                "recipe": recipe,
                "name": name,
                "seed": seed,
                "training_file": _file_id(files, training_file, tenant),
                "evaluation_file": _file_id(files, evaluation_file, tenant),
            }
        )
        check_parent(registry, files, registry.open_version(record.reference), params, tenant)
        job, _ = JobStore(registry.engine).create(
            "optimize",
            tenant,
            {**params, "model": record.reference},
            created_by=None,
            max_attempts=settings.job_max_attempts,
        )
    console.print(f"queued {job.id}: {record.reference} through {recipe}", highlight=False)
    if wait:
        jobs.wait(job.id)


def _file_id(files: FileStore, given: str | None, tenant: int) -> str | None:
    """A file id as given, or a local dataset file uploaded into the tenant first."""
    if given is None or not Path(given).is_file():
        return given
    with tempfile.TemporaryDirectory() as scratch:
        upload = Path(scratch) / "upload"
        shutil.copyfile(given, upload)  # create() consumes its upload
        record = files.create(tenant, "dataset", Path(given).name, upload, created_by=None)
    console.print(f"uploaded {given} as {record.id}", highlight=False)
    return record.id
