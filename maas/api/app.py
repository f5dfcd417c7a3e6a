"""``build_app(settings)``: the FastAPI application with its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from maas import __version__
from maas.api import inference_v2, manage, metrics, openai
from maas.api.deps import NothingLoaded
from maas.api.errors import install_error_handlers
from maas.config import Settings
from maas.registry import open_registry


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics_registry = CollectorRegistry()
    http_metrics = metrics.HttpMetrics(metrics_registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = await run_in_threadpool(open_registry, settings)
        collector = metrics.RegistryCollector(registry)
        metrics_registry.register(collector)
        app.state.registry = registry
        try:
            yield
        finally:
            metrics_registry.unregister(collector)
            registry.close()

    app = FastAPI(title="maas", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.readiness = NothingLoaded()
    app.state.metrics_registry = metrics_registry
    install_error_handlers(app)
    app.add_middleware(metrics.MetricsMiddleware, metrics=http_metrics)
    for router in [inference_v2.router, *openai.routers, *manage.routers, metrics.router]:
        app.include_router(router)
    return app
