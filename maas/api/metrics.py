"""``/metrics`` in the Prometheus text format, with one collector registry per app."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.api import governance
from maas.auth import policy
from maas.auth.principal import Role
from maas.registry import Registry

router = APIRouter(tags=["metrics"])


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "maas_http_requests",
            "HTTP requests by route template, method and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "maas_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["method", "route"],
            registry=registry,
        )


class MetricsMiddleware:
    """Counts requests and times them, labelled by route template (never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


class RegistryCollector(Collector):
    """How many models and versions the registry holds, read at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        models = self.registry.list_models()
        yield GaugeMetricFamily("maas_models", "Registered models.", value=len(models))
        yield GaugeMetricFamily(
            "maas_model_versions",
            "Registered model versions.",
            value=sum(len(m.versions) for m in models),
        )


async def metrics_access(request: Request) -> None:
    """An admin key, unless the operator made /metrics public (MAAS_METRICS_PUBLIC)."""
    if request.app.state.settings.metrics_public:
        return
    principal = await governance.current_key(request)
    policy.require_role(principal, Role.admin)


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_access)])
def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST
    )
