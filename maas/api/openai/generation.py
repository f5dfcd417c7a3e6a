"""What chat and text completions share: the model, the limits, running the engine, and
streaming its output as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from maas.api import governance
from maas.api.errors import KEYED_STATUSES, error_body, error_responses, kind_of
from maas.api.governance import meter
from maas.api.hardening import StrictJSONRoute
from maas.errors import (
    ClientGone,
    ContextTooLong,
    InvalidRequest,
    MaasError,
    TimedOut,
    Unavailable,
)
from maas.messages import FailureKind, GenerationDelta, SamplingParams
from maas.routing.llm_deployment import LLMDeployment
from maas.tasks.sampling import effective_defaults

log = logging.getLogger(__name__)

GENERATION_STATUSES = (*KEYED_STATUSES, 400, 403, 404, 413, 504)


def generation_router() -> APIRouter:
    """A router for a generation route: inference keys, strict JSON, the statuses it answers."""
    return APIRouter(
        prefix="/v1",
        tags=["openai"],
        dependencies=[Depends(governance.inference_key)],
        responses=error_responses("/v1", *GENERATION_STATUSES),
        route_class=StrictJSONRoute,
    )


"""What a generation route answers besides 200: an inference route's errors, and 504 when
the generation passes its deadline (a stream reports it as an error event instead)."""


def generator_of(deployment, model: str) -> LLMDeployment:
    if not isinstance(deployment, LLMDeployment):
        raise InvalidRequest(
            f"{model} is a {deployment.manifest.task} model; it does not generate text",
            param="model",
        )
    return deployment


def output_budget(
    deployment: LLMDeployment,
    prompt_tokens: int,
    asked: int | None,
    *,
    prompt_param: str,
    default: int | None = None,
) -> int:
    """max_tokens for a prompt: what was asked (too long is 400), else the ``default`` cut to
    what is left of the context, else all that is left. ``prompt_param`` names the request
    field the prompt came in (``messages``, ``prompt``)."""
    limit = deployment.max_len
    if prompt_tokens >= limit:
        raise ContextTooLong(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{prompt_tokens} tokens. Please reduce the length of the messages or prompt.",
            param=prompt_param,
        )
    if asked is not None and prompt_tokens + asked > limit:
        raise ContextTooLong(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} for the "
            "completion). Please reduce the length of the prompt or of max_tokens.",
            param="max_tokens",
        )
    if asked is not None:
        return asked
    return min(default or limit, limit - prompt_tokens)


def sampling_defaults(serving, deployment: LLMDeployment) -> dict[str, Any]:
    """The model's default sampling parameters (its own over its generation_config.json)."""
    model = serving.registry.get_model(deployment.record.name)
    return effective_defaults(deployment.manifest.generation_config, model.sampling)


def check_sequences(count: int, limit: int) -> None:
    """A request may start at most ``limit`` sequences (prompts x n)."""
    if count > limit:
        raise InvalidRequest(
            f"this request would start {count} sequences (prompts x n); the limit is {limit} "
            "(MAAS_LLM_MAX_REQUEST_SEQUENCES)",
            param="n",
        )


FAILURE_ERRORS: dict[FailureKind, type[MaasError]] = {
    FailureKind.TIMEOUT: TimedOut,
    FailureKind.UNAVAILABLE: Unavailable,
    FailureKind.FAILED: MaasError,
}


class Generation:
    """One prompt's run on the engine: its deltas, and usage kept on the request for metering."""

    def __init__(self, request: Request, deployment: LLMDeployment, timeout: float) -> None:
        self.request = request
        self.deployment = deployment
        self.timeout = timeout
        self.id = uuid.uuid4().hex
        self.created = int(time.time())

    async def run(
        self, prompt_ids: list[int], params: SamplingParams, n: int
    ) -> AsyncIterator[GenerationDelta]:
        completion = [0] * n
        usage = self.request.state.__dict__.setdefault(
            "generation_usage", {"prompt": 0, "completion": 0}
        )
        usage["prompt"] += len(prompt_ids)

        def metered() -> None:
            meter(
                self.request, prompt_tokens=usage["prompt"], completion_tokens=usage["completion"]
            )

        # Metered as tokens come, not only at the end: when a streaming client goes away while
        # its chunk is being sent, this generator is closed later than the request is recorded.
        metered()
        try:
            async for delta in self.deployment.generate(
                prompt_ids, params, n=n, timeout=self.timeout
            ):
                if delta.error:
                    raise FAILURE_ERRORS[delta.error_kind or FailureKind.FAILED](delta.error)
                usage["completion"] += delta.completion_tokens - completion[delta.index]
                completion[delta.index] = delta.completion_tokens
                metered()
                yield delta
        finally:
            metered()


async def watch_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; if the client goes away first, cancel it (which aborts the generation)
    and answer 499, which nobody reads but the log and the usage record show. Hanging up is
    normal traffic, so no traceback: an exception out of the app would make uvicorn log one."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()  # aborts the generation; its cleanup meters what was generated
            with contextlib.suppress(asyncio.CancelledError):
                await task  # before the governance middleware records the request
            log.info("%s: the client hung up; generation stopped", request.url.path)
            raise ClientGone("the client closed the connection before the answer")
    return task.result()


def request_id_header(request: Request) -> dict[str, str]:
    """The caller's ``X-Request-Id``, to send back with the answer (as vLLM does)."""
    value = request.headers.get("x-request-id")
    return {"x-request-id": value} if value else {}


def sse(chunks: Callable[[], AsyncIterator[dict]], request: Request) -> StreamingResponse:
    """Server-sent events: one ``data:`` line per chunk, an error event if one comes up, then
    ``data: [DONE]``."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks():
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except MaasError as err:
            kind = kind_of(err)
            body = error_body(request.url.path, err.message, type_=kind.type, code=kind.code)
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **request_id_header(request)},
    )
