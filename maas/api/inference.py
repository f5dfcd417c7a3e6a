"""What every inference route does around the model call: find the deployment the caller may
use, meter the request, and count it in the serving metrics (``maas_inference_*``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request

from maas.api.access import resolve_for
from maas.api.governance import meter
from maas.auth.principal import Principal
from maas.errors import (
    ClientGone,
    Conflict,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
)
from maas.registry import Reference, VersionRecord
from maas.routing.deployment import Deployment
from maas.routing.metrics import ServingMetrics
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


CLIENT_ERRORS = (
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PayloadTooLarge,
    Conflict,
    ClientGone,
    asyncio.CancelledError,  # the client went away and the server stopped the work
    GeneratorExit,  # a stream the client stopped reading
)


def outcome_of(error: BaseException | None) -> str:
    """The ``outcome`` label of a request that ended with ``error`` (None: it succeeded)."""
    if error is None:
        return "success"
    if isinstance(error, Overloaded):
        return "rejected"
    if isinstance(error, CLIENT_ERRORS):
        return "client_error"
    return "server_error"


class InferenceCount:
    """One request in ``maas_inference_requests_total`` and
    ``maas_inference_request_duration_seconds``: timed from its reference resolving to the end
    of its answer (a stream's last event), labelled by the version that answered."""

    def __init__(self, metrics: ServingMetrics, record: VersionRecord) -> None:
        self.metrics = metrics
        self.record = record
        """The version resolved first; set to the one that answered, if another did."""
        self.started = time.perf_counter()
        self.finished = False

    def finish(self, error: BaseException | None = None) -> None:
        """Count the request once, by how it ended."""
        if self.finished:
            return
        self.finished = True
        labels = (self.record.name, str(self.record.version))
        self.metrics.requests.labels(*labels, outcome_of(error)).inc()
        self.metrics.latency.labels(*labels).observe(time.perf_counter() - self.started)


@asynccontextmanager
async def serve(
    request: Request, serving: Serving, key: Principal, reference: str | Reference
) -> AsyncIterator[Deployment]:
    """The classic deployment for ``reference``, counted as in use while the block runs."""
    count = InferenceCount(serving.metrics, resolve_for(serving.registry, key, reference))
    try:
        deployment = tensor_model_of(await serving.deployment(count.record, str(reference)))
        meter(request, model=deployment.record)
        count.record = deployment.record
        async with deployment.use():
            yield deployment
    except BaseException as err:
        count.finish(err)
        raise
    count.finish()
