"""``maas serve`` and ``maas version``."""

from __future__ import annotations

from typing import Annotated

import typer

from maas import __version__
from maas.auth.bootstrap import admin_key_path, ensure_admin_key
from maas.cli import address
from maas.cli.context import load_settings, open_access
from maas.cli.output import console


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (MAAS_HOST, default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (MAAS_PORT, default 8000).")
    ] = None,
) -> None:
    """Start the server: OpenAI API at /v1, Open Inference Protocol v2 at /v2, management at
    /api/v1."""
    import uvicorn

    from maas.api.app import build_app
    from maas.api.drain import DrainingServer
    from maas.api.hardening import uvicorn_log_config
    from maas.jobs.worker import WorkerPool

    settings = load_settings(host=host, port=port)
    with open_access() as access:
        created = ensure_admin_key(settings, access.keys)
        for reference in settings.pin_models:  # a typo stops here, with one clear line
            access.registry.resolve(reference)
    key_file = admin_key_path(settings)
    base = address.url_of(settings.host, settings.port)
    console.print(f"maas {__version__} on {base}  (data in {settings.home})")
    if created:
        console.print("  first start: created an admin API key; it is shown only now and kept in")
        console.print(f"  {key_file} (readable by you alone):")
        console.print(f"  {created}", highlight=False)
    elif key_file.exists():
        console.print(f"  admin API key:    {key_file}")
    console.print(f"  OpenAI clients:   base_url={base}/v1  api_key=<your key>")
    console.print(f"  tritonclient:     url={settings.host}:{settings.port}")
    console.print(f"  management API:   {base}/api/v1/models   metrics: {base}/metrics")
    console.print(f"  web console:      {base}/ui")
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(settings.log_level),
    )
    workers = WorkerPool(settings.job_workers, settings.shutdown_timeout)
    if settings.job_workers:
        console.print(f"  job workers:      {settings.job_workers} (maas jobs list)")
    workers.start()
    try:  # once bound, note where, so that the CLI finds this server on any port
        DrainingServer(config, app.state.drain, lambda: address.record(settings)).run()
    finally:
        workers.stop()
        address.forget(settings)


def url() -> None:
    """Print the URL of the server the other commands talk to (for scripts: curl $(maas url)/v2).

    MAAS_URL if set; else the server running on this MAAS_HOME, wherever it listens; else
    MAAS_HOST and MAAS_PORT."""
    print(address.server_url(load_settings()))


def version() -> None:
    """Print the maas version."""
    console.print(f"maas {__version__}")
