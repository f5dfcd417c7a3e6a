"""What chat and text completions share around the engine, as vLLM's ``OpenAIServing``:
find the model the key may use, check what the request asks of it (sequences, context,
capacity), merge the model's sampling defaults, then answer in full or as a stream. Each
request is counted in the serving metrics (``maas_inference_*``) like any inference request.

``ChatServing`` (``serving_chat.py``) and ``CompletionServing`` (``serving_completion.py``)
add what differs: how the prompts are made, and what the answer and its chunks look like.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from maas.api import governance
from maas.api.access import resolve_for
from maas.api.deps import InferenceKey
from maas.api.errors import KEYED_STATUSES, error_responses
from maas.api.governance import meter
from maas.api.hardening import StrictJSONRoute
from maas.api.inference import InferenceCount, ServingDep
from maas.api.openai.generation import (
    Generation,
    collect,
    request_id_header,
    sse,
    watch_disconnect,
)
from maas.api.openai.protocol import GenerationFields
from maas.auth.principal import Principal
from maas.errors import ContextTooLong, InvalidRequest
from maas.messages import GenerationDelta, SamplingParams
from maas.routing.llm_deployment import LLMDeployment
from maas.routing.serving import Serving
from maas.tasks.sampling import effective_defaults

GENERATION_STATUSES = (*KEYED_STATUSES, 400, 403, 404, 413, 504)
"""What a generation route answers besides 200: an inference route's errors, and 504 when
the generation passes its deadline (a stream reports it as an error event instead)."""


def generation_router() -> APIRouter:
    """A router for a generation route: inference keys, strict JSON, the statuses it answers."""
    return APIRouter(
        prefix="/v1",
        tags=["openai"],
        dependencies=[Depends(governance.inference_key)],
        responses=error_responses("/v1", *GENERATION_STATUSES),
        route_class=StrictJSONRoute,
    )


@dataclass(frozen=True)
class GenerationCall:
    """What a generation route hands its serving class: the HTTP exchange, the caller's key
    and the server's models."""

    request: Request
    response: Response
    key: Principal
    serving: Serving


def generation_call(
    request: Request, response: Response, key: InferenceKey, serving: ServingDep
) -> GenerationCall:
    return GenerationCall(request, response, key, serving)


GenerationCallDep = Annotated[GenerationCall, Depends(generation_call)]


@dataclass(frozen=True)
class PromptRun:
    """One prompt of a request, as the engine takes it."""

    prompt_ids: list[int]
    params: SamplingParams


Body = TypeVar("Body", bound=GenerationFields)


class GenerationServing(ABC, Generic[Body]):
    """One generation request, from its body to its answer."""

    prompt_param: ClassVar[str]
    """The request field the prompt comes in, named by context errors."""
    default_max_tokens: ClassVar[int | None] = None
    """Output tokens when neither the request nor the model says; None: what the context
    leaves."""
    deployment: LLMDeployment
    """The loaded version that answers, once ``answer`` has found it."""

    def __init__(self, call: GenerationCall, body: Body) -> None:
        self.call = call
        self.body = body
        self.n = body.n or 1

    async def answer(self) -> BaseModel | StreamingResponse:
        """The whole answer, or a stream of server-sent events."""
        self.body.check()
        serving = self.call.serving
        record = resolve_for(serving.registry, self.call.key, self.body.model)
        count = InferenceCount(serving.metrics, record)
        try:
            self.deployment = await self._deployment(count)
            check_sequences(self.num_prompts() * self.n, serving.max_request_sequences)
            runs = await self._runs()
            self.deployment.check_room(len(runs) * self.n)  # 503 now, before a stream starts
            timeout = min(self.body.timeout or 1e9, serving.request_timeout)
            generation = Generation(self.call.request, self.deployment, timeout)
            if self.body.stream:
                chunks = self._in_use(self.chunks(generation, runs))
                return sse(
                    self.call.request, chunks, include_usage=self.body.include_usage, count=count
                )
            answer = await self._whole(generation, runs)
        except BaseException as err:
            count.finish(err)
            raise
        count.finish()
        return answer

    def num_prompts(self) -> int:
        """Prompts in the request, before they are made."""
        return 1

    def check_model(self, deployment: LLMDeployment) -> None:
        """400 if the model cannot answer this endpoint."""

    @abstractmethod
    def prompts(self) -> list[list[int]]:
        """The request's prompts as token ids (run in a worker thread)."""

    @abstractmethod
    def response(
        self,
        generation: Generation,
        runs: list[PromptRun],
        results: list[list[GenerationDelta]],
    ) -> BaseModel:
        """The whole answer from each prompt's deltas."""

    @abstractmethod
    def chunks(self, generation: Generation, runs: list[PromptRun]) -> AsyncIterator[BaseModel]:
        """The chunks of a stream, as the deltas come."""

    async def _deployment(self, count: InferenceCount) -> LLMDeployment:
        """The loaded version, metered and counted as the one that answers."""
        deployment = await self.call.serving.deployment(count.record, self.body.model)
        if not isinstance(deployment, LLMDeployment):
            raise InvalidRequest(
                f"{self.body.model} is a {deployment.manifest.task} model; it does not "
                "generate text",
                param="model",
            )
        meter(self.call.request, model=deployment.record)
        count.record = deployment.record
        self.check_model(deployment)
        return deployment

    async def _runs(self) -> list[PromptRun]:
        prompts = await run_in_threadpool(self.prompts)
        defaults = sampling_defaults(self.call.serving, self.deployment)
        default_max = defaults.get("max_tokens", self.default_max_tokens)
        budgets = [self._output_budget(len(prompt), default_max) for prompt in prompts]
        vocab_size = self.deployment.tokenizer.vocab_size
        return [
            PromptRun(prompt, self.body.sampling(budget, vocab_size, defaults))
            for prompt, budget in zip(prompts, budgets, strict=True)
        ]

    def _output_budget(self, prompt_tokens: int, default: int | None) -> int:
        """max_tokens for a prompt: what was asked (too long is 400), else ``default`` cut to
        what is left of the context, else all that is left."""
        limit, asked = self.deployment.max_len, self.body.asked_max_tokens
        if prompt_tokens >= limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {prompt_tokens} tokens. Please reduce the length of the messages or "
                "prompt.",
                param=self.prompt_param,
            )
        if asked is not None and prompt_tokens + asked > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, "
                f"{asked} for the completion). Please reduce the length of the prompt or of "
                "max_tokens.",
                param="max_tokens",
            )
        if asked is not None:
            return asked
        return min(default or limit, limit - prompt_tokens)

    async def _whole(self, generation: Generation, runs: list[PromptRun]) -> BaseModel:
        deltas = [collect(generation.run(run.prompt_ids, run.params, self.n)) for run in runs]
        async with self.deployment.use():
            results = await watch_disconnect(self.call.request, asyncio.gather(*deltas))
        self.call.response.headers.update(request_id_header(self.call.request))
        return self.response(generation, runs, results)

    async def _in_use(self, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[BaseModel]:
        """The chunks, the deployment counted in use until the last (an unload waits)."""
        async with self.deployment.use(), contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk


def sampling_defaults(serving: Serving, deployment: LLMDeployment) -> dict[str, Any]:
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
