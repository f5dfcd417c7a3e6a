"""Running a request's prompts on the engine and sending back what comes: usage metered as
tokens come, engine failures raised as errors, several prompts' deltas merged into one
stream, server-sent events, and what happens when the client hangs up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from maas.api.errors import error_body, kind_of
from maas.api.governance import meter
from maas.api.inference import InferenceCount
from maas.errors import ClientGone, MaasError, TimedOut, Unavailable
from maas.messages import FailureKind, GenerationDelta, SamplingParams
from maas.routing.llm_deployment import LLMDeployment

log = logging.getLogger(__name__)

T = TypeVar("T")

FAILURE_ERRORS: dict[FailureKind, type[MaasError]] = {
    FailureKind.TIMEOUT: TimedOut,
    FailureKind.UNAVAILABLE: Unavailable,
    FailureKind.FAILED: MaasError,
}


class Generation:
    """One request's prompts on the engine: their deltas, and usage kept on the request for
    metering."""

    def __init__(self, request: Request, deployment: LLMDeployment, timeout: float) -> None:
        self.request = request
        self.deployment = deployment
        self.timeout = timeout
        self.id = uuid.uuid4().hex
        self.created = int(time.time())

    async def run(
        self, prompt_ids: list[int], params: SamplingParams, n: int
    ) -> AsyncIterator[GenerationDelta]:
        """One prompt's ``n`` sequences; a failed sequence raises its error here."""
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
            principal = getattr(self.request.state, "principal", None)
            tenant = principal.tenant if principal is not None else None
            async for delta in self.deployment.generate(
                prompt_ids,
                params,
                n=n,
                timeout=self.timeout,
                cache_salt=f"tenant:{tenant}" if tenant else "",
            ):
                if delta.error:
                    raise FAILURE_ERRORS[delta.error_kind or FailureKind.FAILED](delta.error)
                usage["completion"] += delta.completion_tokens - completion[delta.index]
                completion[delta.index] = delta.completion_tokens
                metered()
                yield delta
        finally:
            metered()


async def collect(deltas: AsyncIterator[T]) -> list[T]:
    return [delta async for delta in deltas]


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items of several streams as they come, each with its stream's index. The first
    error of any stream raises here; leaving early, or an error, cancels them all (which
    aborts their generations)."""
    queue: asyncio.Queue[tuple[int, T]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        async for item in stream:
            await queue.put((index, item))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        pending = set(tasks)
        while pending or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            try:
                done, _ = await asyncio.wait(
                    {getter, *pending}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                if not getter.done():
                    getter.cancel()  # an item it had not taken stays in the queue
            for task in done - {getter}:
                pending.discard(task)
                task.result()  # a stream's error raises here
            if getter in done:
                yield getter.result()
    finally:
        for task in tasks:
            task.cancel()


async def watch_disconnect(request: Request, work: Awaitable[T]) -> T:
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


def sse(
    request: Request,
    chunks: AsyncIterator[BaseModel],
    *,
    include_usage: bool,
    count: InferenceCount,
) -> StreamingResponse:
    """Server-sent events: one ``data:`` line per chunk, an error event if one comes up, then
    ``data: [DONE]``. A chunk's ``usage`` is sent only with ``include_usage``. The request is
    counted in the serving metrics when the stream ends."""
    exclude = None if include_usage else {"usage"}

    async def events() -> AsyncIterator[str]:
        error: BaseException | None = None
        try:
            async for chunk in chunks:
                data = json.dumps(chunk.model_dump(exclude=exclude), ensure_ascii=False)
                yield f"data: {data}\n\n"
        except MaasError as err:
            error = err
            kind = kind_of(err)
            body = error_body(request.url.path, err.message, type_=kind.type, code=kind.code)
            yield f"data: {json.dumps(body)}\n\n"
        except BaseException as err:  # the client went away, or a bug
            error = err
            raise
        finally:
            count.finish(error)
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **request_id_header(request)},
    )
