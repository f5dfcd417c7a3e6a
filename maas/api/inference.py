"""What every inference route does around the model call: find the deployment the caller may
use, meter the request, and count it in the serving metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request

from maas.api.access import resolve_for
from maas.api.governance import meter
from maas.auth.principal import Principal
from maas.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
)
from maas.registry import Reference
from maas.routing.deployment import Deployment
from maas.routing.serving import Serving


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]


def tensor_model_of(deployment) -> Deployment:
    """The deployment, if it is a classic model (tensors in and out); a text-generation model
    answers on the generation routes only."""
    if not isinstance(deployment, Deployment):
        raise InvalidRequest(
            f"{deployment.record.reference} is a {deployment.manifest.task} model; send it "
            "to /v1/chat/completions or /v1/completions",
            param="model",
        )
    return deployment


@asynccontextmanager
async def serve(
    request: Request, serving: Serving, key: Principal, reference: str | Reference
) -> AsyncIterator[Deployment]:
    """The classic deployment for ``reference``, counted as in use while the block runs."""
    record = resolve_for(serving.registry, key, reference)
    started = time.perf_counter()
    outcome = "server_error"
    labels = (record.name, str(record.version))
    try:
        deployment = tensor_model_of(await serving.deployment(record, str(reference)))
        meter(request, model=deployment.record)
        labels = (deployment.record.name, str(deployment.record.version))
        async with deployment.use():
            yield deployment
        outcome = "success"
    except Overloaded:
        outcome = "rejected"
        raise
    except (InvalidRequest, NotFound, PermissionDenied, PayloadTooLarge, Conflict):
        outcome = "client_error"
        raise
    finally:
        serving.metrics.requests.labels(*labels, outcome).inc()
        serving.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
