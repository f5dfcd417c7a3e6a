"""``build_app(settings)``: the FastAPI application with its lifespan."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from maas import __version__
from maas.analytics import costs
from maas.api import (
    governance,
    inference_v2,
    inference_v2_infer,
    manage,
    metrics,
    model_control,
    openai,
    predict,
)
from maas.api.deps import CurrentKey, NothingLoaded
from maas.api.drain import Drain, DrainMiddleware
from maas.api.errors import install_error_handlers
from maas.api.hardening import BodyLimitMiddleware, HostCheckMiddleware, allowed_hosts
from maas.api.manage.models import UPLOAD_PATH
from maas.api.openai.files import FILES_PATH
from maas.auth.authenticator import Authenticator
from maas.auth.bootstrap import open_stores, server_secret
from maas.auth.limits import RateLimiter
from maas.config import Settings
from maas.console import install as install_console
from maas.files import FileStore
from maas.jobs import JobStore
from maas.jobs.kinds import job_kinds
from maas.metering.recorder import UsageRecorder
from maas.metering.usage import month_tokens
from maas.registry import Registry, open_registry
from maas.routing.metrics import PoolCollector, ServingMetrics
from maas.routing.serving import Serving


def open_state(app: FastAPI, settings: Settings) -> Registry:
    """Open the registry and the governance parts the routes use (blocking)."""
    os.umask(0o077)  # everything maas creates is for its own user only
    registry = open_registry(settings)
    keys, tenants = open_stores(settings, registry.engine)
    app.state.registry = registry
    app.state.keys = keys
    app.state.tenants = tenants
    app.state.authenticator = Authenticator(keys, server_secret(settings))
    app.state.prices = prices = costs.PriceBook(registry.engine)
    prices.load()

    def month_used(key_id: str, unit: str, month: str) -> float:
        """What a budget's key and the keys made under it used this month: tokens or cost."""
        if unit == "tokens":
            return month_tokens(registry.engine, keys.subtree(key_id), month)
        return costs.month_cost(registry.engine, keys.subtree(key_id), month)

    app.state.limiter = RateLimiter(month_used, currency=prices.currency)
    app.state.recorder = UsageRecorder(registry.engine, settings.home, on_flush=keys.touch)
    app.state.jobs = JobStore(registry.engine)
    app.state.files = FileStore.of_registry(registry, settings)
    app.state.job_kinds = job_kinds(settings.job_plugins)
    app.state.recorder.start()
    return registry


def build_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics_registry = CollectorRegistry()
    http_metrics = metrics.HttpMetrics(metrics_registry)

    serving_metrics = ServingMetrics(metrics_registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = await run_in_threadpool(open_state, app, settings)
        serving = app.state.serving = Serving(registry, settings, serving_metrics)
        app.state.readiness = serving.pool
        collectors = [metrics.RegistryCollector(registry), PoolCollector(serving.pool.deployments)]
        for collector in collectors:
            metrics_registry.register(collector)
        try:
            serving.start(settings.pin_models)  # loads in the background: live answers now
            yield
        finally:
            for collector in collectors:
                metrics_registry.unregister(collector)
            await serving.pool.close()
            await run_in_threadpool(app.state.recorder.close)
            registry.close()

    # FastAPI's own docs routes would be public; ours is served behind a key below.
    app = FastAPI(
        title="maas",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.readiness = NothingLoaded()
    app.state.drain = Drain(settings.shutdown_timeout)
    app.state.metrics_registry = metrics_registry
    install_error_handlers(app)
    _add_middleware(app, settings, http_metrics)
    routers = [
        inference_v2.health_router,
        inference_v2.router,
        inference_v2_infer.router,
        model_control.router,
        predict.router,
        *openai.routers,
        *manage.routers,
        metrics.router,
    ]
    for router in routers:
        app.include_router(router)
    install_console(app)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request, key: CurrentKey) -> dict:
        return request.app.openapi()

    return app


def _add_middleware(app: FastAPI, settings: Settings, http_metrics: metrics.HttpMetrics) -> None:
    """Outermost first: Host check, CORS, metrics, drain, governance, body limit, then the
    routes. Metrics and governance sit outside the body limit so a 413 is counted as a 413;
    metrics outside the drain, so a 503 while draining is counted too."""
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_request_bytes,
        uploads=[(UPLOAD_PATH, settings.max_upload_bytes), (FILES_PATH, settings.max_file_bytes)],
    )
    app.add_middleware(governance.GovernanceMiddleware)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(metrics.MetricsMiddleware, metrics=http_metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    hosts = allowed_hosts(settings)
    if hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed=hosts)
