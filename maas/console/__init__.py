"""The web console at /ui: server-rendered views of models, jobs, usage and costs, adoption
and forecasts, keys and tenants, and a chat playground, for people who would rather look than
read JSON. Governed by the same keys and roles as the API (see ``routes``)."""

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from maas.console.routes import STATIC, shell, views


def install(app: FastAPI) -> None:
    """Serve the console's pages, views and static files (its script, style and the chart
    library npm installed into ``static/vendor``)."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")
    app.include_router(shell)
    app.include_router(views)
