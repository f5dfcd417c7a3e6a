"""The ``maas`` command. Errors print as one line on stderr with exit code 1, never a traceback
(set ``MAAS_DEBUG=1`` to see one)."""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from maas.cli import access, analytics, db, demo, generate, jobs, models, optimize, server
from maas.cli.output import err_console
from maas.errors import MaasError
from maas.runtime.local_cache import keep_compiled_code

app = typer.Typer(
    name="maas",
    help="maas: serve, manage and meter AI models behind standard APIs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(models.app, name="models")
app.add_typer(access.keys_app, name="keys")
app.add_typer(access.tenants_app, name="tenants")
app.add_typer(access.artifacts_app, name="artifacts")
app.add_typer(db.app, name="db")
app.add_typer(jobs.app, name="jobs")
app.command("worker")(jobs.worker)
app.command("optimize")(optimize.optimize)
app.command("usage")(access.usage)
app.command("adoption")(analytics.adoption)
app.command("forecast")(analytics.forecast)
app.add_typer(analytics.app, name="analytics")
app.add_typer(analytics.prices_app, name="prices")
app.command("costs")(analytics.cost)
app.command("generate")(generate.generate)
app.command("chat")(generate.chat)
app.command("serve")(server.serve)
app.command("url")(server.url)
app.command("version")(server.version)
app.command("demo")(demo.demo)


def main() -> None:
    keep_compiled_code()
    try:
        app()
    except MaasError as err:
        _fail(err.message)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as err:  # the last line of defence: one line, not a traceback
        if os.environ.get("MAAS_DEBUG"):
            raise
        _fail(f"unexpected {type(err).__name__}: {err} (MAAS_DEBUG=1 shows the traceback)")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(1)
